"""The outbound guard (core.outbound): which addresses a user-configured URL may reach, in
every spelling, and that the guarded client resolves once, refuses before connecting, and
keeps the Host header and TLS verification on the URL's hostname. Against real local servers
(the `receiver` fixture, a TLS server made here)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from activities.channels import (
    PermanentDeliveryError,
    RenderedMessage,
    build_channels,
    close_channels,
)
from activities.channels.http import WebhookChannel
from core.outbound import (
    OutboundPolicy,
    OutboundRefused,
    forbidden_reason,
    literal_address,
    outbound_client,
)
from core.settings import Settings
from tests.receiver import Receiver

GUARD_ON = OutboundPolicy(allow_private=False)

# address -> why it is refused (None: a public address, allowed).
ADDRESSES = [
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("0.0.0.0", "unspecified"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("100.64.0.1", "private (CGNAT)"),
    ("100.127.255.255", "private (CGNAT)"),
    ("169.254.169.254", "link-local"),  # cloud metadata
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("192.0.2.10", "reserved"),
    ("198.18.0.1", "reserved"),
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fe80::1", "link-local"),
    ("fc00::1", "private"),
    ("fd12:3456::1", "private"),
    ("fec0::1", "private"),
    ("ff02::1", "multicast"),
    ("::ffff:127.0.0.1", "loopback (embedded 127.0.0.1)"),
    ("::ffff:169.254.169.254", "link-local (embedded 169.254.169.254)"),
    ("::ffff:10.0.0.1", "private (embedded 10.0.0.1)"),
    ("::127.0.0.1", "loopback (embedded 127.0.0.1)"),  # IPv4-compatible
    ("64:ff9b::7f00:1", "loopback (embedded 127.0.0.1)"),  # NAT64
    ("64:ff9b::a9fe:a9fe", "link-local (embedded 169.254.169.254)"),
    ("2002:7f00:1::", "loopback (embedded 127.0.0.1)"),  # 6to4
    ("2002:c0a8:101::1", "private (embedded 192.168.1.1)"),
    ("2001:db8::1", "reserved"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "reserved"),  # Teredo
    ("100::1", "reserved"),
    ("4000::1", "reserved"),  # outside global unicast
    ("93.184.215.14", None),
    ("8.8.8.8", None),
    ("100.128.0.1", None),  # just past CGNAT
    ("172.32.0.1", None),  # just past 172.16/12
    ("2606:4700:4700::1111", None),
    ("::ffff:8.8.8.8", None),
    ("2002:808:808::1", None),  # 6to4 of 8.8.8.8
    ("64:ff9b::808:808", None),
]


@pytest.mark.parametrize(("address", "reason"), ADDRESSES)
def test_address_classification(address: str, reason: str | None) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) == reason


# Spellings the system resolver reads as an address: each must be judged as that address.
SPELLINGS = [
    ("127.0.0.1", "127.0.0.1"),
    ("2130706433", "127.0.0.1"),
    ("0x7f.1", "127.0.0.1"),
    ("0x7f000001", "127.0.0.1"),
    ("017700000001", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"),
    ("127.1", "127.0.0.1"),
    ("[::ffff:127.0.0.1]", "::ffff:7f00:1"),
    ("[::1]", "::1"),
    ("[fe80::1%25eth0]", "fe80::1"),
    ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"),
    ("example.com", None),
    ("deadbeef.example", None),
]


@pytest.mark.parametrize(("host", "address"), SPELLINGS)
def test_literal_spellings(host: str, address: str | None) -> None:
    found = literal_address(host)
    assert (None if found is None else str(found)) == address


@pytest.mark.parametrize(
    "url",
    [
        "http://2130706433/",
        "http://0x7f.1/",
        "http://[::ffff:127.0.0.1]/",
        "http://localhost:8000/v1/journeys",
        "http://LOCALHOST./",
        "http://api.localhost/",
        "http://169.254.169.254/latest/meta-data/",
        "https://[::1]:7243/api/v1/namespaces",
        "http://100.64.0.1/",
    ],
)
def test_literal_refusal_at_publish_time(url: str) -> None:
    assert GUARD_ON.literal_refusal(url) is not None
    assert OutboundPolicy(allow_private=True).literal_refusal(url) is None


def test_names_and_public_literals_wait_for_the_call() -> None:
    assert GUARD_ON.literal_refusal("https://hooks.example.com/x") is None
    assert GUARD_ON.literal_refusal("http://8.8.8.8/") is None


def test_allowed_hosts_and_networks() -> None:
    policy = OutboundPolicy.parse(allow_private=False, allowed="crm.internal, 10.2.0.0/16,[::1]")
    assert policy.refusal("crm.internal.", ipaddress.ip_address("10.9.9.9")) is None
    assert policy.refusal("x.example", ipaddress.ip_address("10.2.3.4")) is None
    assert policy.refusal("x.example", ipaddress.ip_address("::1")) is None
    assert policy.refusal("x.example", ipaddress.ip_address("10.3.0.1")) == "private"
    assert policy.literal_refusal("http://10.2.0.9/") is None
    assert policy.literal_refusal("http://10.3.0.9/") is not None
    with pytest.raises(ValueError, match="OUTBOUND_ALLOWED"):
        OutboundPolicy.parse(allow_private=False, allowed="http://crm/")


def test_default_follows_journeys_env_unless_set() -> None:
    def policy(**values: Any) -> OutboundPolicy:
        return OutboundPolicy.from_settings(Settings(**values))

    assert policy(journeys_env="production").allow_private is False
    assert policy(journeys_env="development").allow_private is True
    assert policy(journeys_env="test").allow_private is True
    assert policy(journeys_env="test", outbound_allow_private=False).allow_private is False
    assert policy(journeys_env="production", outbound_allow_private=True).allow_private is True
    # Compose passes `OUTBOUND_ALLOW_PRIVATE=` when it is not set: unset, not an error.
    assert policy(journeys_env="production", outbound_allow_private="").allow_private is False
    allowed = policy(journeys_env="production", outbound_allowed="crm.internal")
    assert allowed.allowed_hosts == frozenset({"crm.internal"})


def _port(receiver: str) -> int:
    return httpx.URL(receiver).port or 80


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "2130706433", "0x7f.1", "127.1", "[::ffff:127.0.0.1]", "localhost"]
)
async def test_the_guarded_client_refuses_before_connecting(receiver: str, host: str) -> None:
    """Real resolution by the system resolver; the receiver listens on 127.0.0.1."""
    url = f"http://{host}:{_port(receiver)}/hook"
    async with outbound_client(GUARD_ON) as client:
        with pytest.raises(OutboundRefused, match="loopback"):
            await client.post(url, json={"a": 1})
    assert Receiver.calls == []
    async with outbound_client(OutboundPolicy(allow_private=True)) as client:
        if host.startswith("[::ffff"):
            return  # IPv4-mapped needs a dual-stack listener; the receiver is IPv4 only
        assert (await client.post(url, json={"a": 1})).status_code == 200
    assert len(Receiver.calls) == 1


async def test_a_name_resolving_to_loopback_is_refused(receiver: str) -> None:
    """A public-looking name whose records include a loopback address (a DNS rebinding
    set-up): refused as a whole, whichever address comes first."""
    lookups: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        lookups.append(host)
        return {"hooks.example.com": ["93.184.215.14", "127.0.0.1"],
                "evil.example.com": ["127.0.0.1"]}[host]  # fmt: skip

    async with outbound_client(GUARD_ON, resolve=resolve) as client:
        for name in ("hooks.example.com", "evil.example.com"):
            with pytest.raises(OutboundRefused, match=r"\(127\.0\.0\.1\) is a loopback"):
                await client.post(f"http://{name}:{_port(receiver)}/hook", json={})
    assert lookups == ["hooks.example.com", "evil.example.com"]
    assert Receiver.calls == []


class _Echo(BaseHTTPRequestHandler):
    """Answers with the Host header it got; /redirect answers 302 to a loopback URL."""

    def do_GET(self) -> None:
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1:1/admin")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = (self.headers.get("Host") or "").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        """Quiet."""


def _self_signed(name: str, folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
def tls_server() -> Iterator[tuple[int, Path, list[str | None]]]:
    """An HTTPS server on 127.0.0.1 whose certificate names only `hooks.test`; records the
    SNI name each handshake carried."""
    folder = Path(tempfile.mkdtemp(prefix="journeys-tls-"))
    cert, key = _self_signed("hooks.test", folder)
    sni: list[str | None] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda _sock, name, _ctx: sni.append(name)  # type: ignore[assignment,misc,return-value]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], cert, sni
    server.shutdown()


async def test_connects_to_the_checked_address_with_host_and_tls_on_the_name(tls_server) -> None:
    """hooks.test resolves (once) to 127.0.0.1, allowed by name: the connection goes to that
    address, the certificate is verified against `hooks.test` (it names no IP), the SNI and
    Host header say `hooks.test`, and a redirect to loopback is an answer, not followed."""
    port, cert, sni = tls_server
    lookups: list[str] = []

    async def resolve(host: str, p: int) -> list[str]:
        lookups.append(host)
        return ["127.0.0.1"]

    policy = OutboundPolicy.parse(allow_private=False, allowed="hooks.test")
    trust = ssl.create_default_context(cafile=str(cert))
    async with outbound_client(policy, resolve=resolve, ssl_context=trust) as client:
        resp = await client.get(f"https://hooks.test:{port}/")
        assert resp.status_code == 200 and resp.text == f"hooks.test:{port}"
        redirect = await client.get(f"https://hooks.test:{port}/redirect")
        assert redirect.status_code == 302
    # One lookup per connection (this HTTP/1.0 server closes each), none between the check
    # and the connect; every handshake named the host.
    assert sni == ["hooks.test", "hooks.test"]
    assert lookups == ["hooks.test", "hooks.test"]


async def test_the_webhook_channel_fails_the_message_with_the_reason(receiver: str) -> None:
    msg = RenderedMessage("k-1", "c1", "webhook", None, "hello", message_id=1)
    async with outbound_client(GUARD_ON) as client:
        channel = WebhookChannel(client, url=f"{receiver}/hooks", secret="s")
        with pytest.raises(PermanentDeliveryError) as refused:
            await channel.deliver(msg)
    assert refused.value.suppress is False
    assert "loopback" in str(refused.value)
    assert Receiver.calls == []


async def test_build_channels_guards_the_webhook_channel(receiver: str) -> None:
    """In production (the default there), the webhook channel's URL is checked; SMS and push
    base URLs are the operator's and are not."""
    settings = Settings(journeys_env="production", webhook_channel_url=f"{receiver}/hooks")
    async with httpx.AsyncClient() as providers:
        channels = build_channels(settings, providers)
        with pytest.raises(PermanentDeliveryError, match="loopback"):
            await channels["webhook"].deliver(
                RenderedMessage("k-2", "c1", "webhook", None, "hello", message_id=2)
            )
        assert channels["webhook"].http is not providers  # type: ignore[attr-defined]
        await close_channels(channels)
    assert Receiver.calls == []
