"""Outbound calls to URLs that journey authors and admins configure (the webhook step, a
hand-off's `notify_url`, the webhook channel) never reach our own network.

Without a guard such a URL could read the admin API or the Temporal UI on loopback, a cloud
metadata service (169.254.169.254) or anything on the private network, and the answer would
land in run results the live view shows. So, unless the policy allows it:

- the host is resolved **once**, every resolved address is checked, and the connection goes to
  a checked address (no second lookup a DNS-rebinding server could answer differently); the
  Host header, TLS SNI and certificate verification stay on the hostname of the URL;
- loopback, link-local, private (RFC 1918, CGNAT 100.64/10, ULA fc00::/7), unspecified,
  multicast and reserved addresses are refused, also when embedded in IPv6 (IPv4-mapped,
  IPv4-compatible, 6to4, NAT64), and a host with any such address is refused as a whole;
- redirects are not followed (a 3xx is the answer), and environment proxies are not used.

The refusal is `OutboundRefused`, raised before any byte is sent: callers turn it into a
non-retryable failure of that one call. Operator-configured provider base URLs (SMTP host,
SMS and push APIs) are trusted and do not go through this guard.

Settings: `OUTBOUND_ALLOW_PRIVATE` (unset = allowed only when `JOURNEYS_ENV` is development or
test) and `OUTBOUND_ALLOWED` (hosts and CIDRs allowed even when private addresses are not).
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
import typing
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import anyio
import httpcore
import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# host, port -> the addresses to try, in order (the default asks the system resolver).
Resolver = Callable[[str, int], Awaitable[list[str]]]

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network
_FORBIDDEN_V4: tuple[tuple[ipaddress.IPv4Network, str], ...] = (
    (_V4("0.0.0.0/8"), "unspecified"),
    (_V4("10.0.0.0/8"), "private"),
    (_V4("100.64.0.0/10"), "private (CGNAT)"),
    (_V4("127.0.0.0/8"), "loopback"),
    (_V4("169.254.0.0/16"), "link-local"),
    (_V4("172.16.0.0/12"), "private"),
    (_V4("192.0.0.0/24"), "reserved"),  # IETF protocol assignments
    (_V4("192.0.2.0/24"), "reserved"),  # documentation
    (_V4("192.88.99.0/24"), "reserved"),  # 6to4 relay anycast
    (_V4("192.168.0.0/16"), "private"),
    (_V4("198.18.0.0/15"), "reserved"),  # benchmarking
    (_V4("198.51.100.0/24"), "reserved"),
    (_V4("203.0.113.0/24"), "reserved"),
    (_V4("224.0.0.0/4"), "multicast"),
    (_V4("240.0.0.0/4"), "reserved"),  # and 255.255.255.255
)
_FORBIDDEN_V6: tuple[tuple[ipaddress.IPv6Network, str], ...] = (
    (_V6("::/128"), "unspecified"),
    (_V6("::1/128"), "loopback"),
    (_V6("fe80::/10"), "link-local"),
    (_V6("fec0::/10"), "private"),  # deprecated site-local
    (_V6("fc00::/7"), "private"),
    (_V6("ff00::/8"), "multicast"),
    (_V6("64:ff9b:1::/48"), "private"),  # local-use NAT64
    (_V6("100::/64"), "reserved"),  # discard-only
    (_V6("2001::/32"), "reserved"),  # Teredo: reaches an address we cannot check
    (_V6("2001:2::/48"), "reserved"),  # benchmarking
    (_V6("2001:10::/28"), "reserved"),  # ORCHID
    (_V6("2001:20::/28"), "reserved"),  # ORCHIDv2
    (_V6("2001:db8::/32"), "reserved"),  # documentation
)
# IPv6 forms that carry an IPv4 address the packets end up at: judged by that address.
_MAPPED = _V6("::ffff:0:0/96")
_COMPATIBLE = _V6("::/96")
_NAT64 = _V6("64:ff9b::/96")
_6TO4 = _V6("2002::/16")
_GLOBAL_UNICAST = _V6("2000::/3")
# What inet_aton also reads as IPv4: 2130706433, 0x7f.1, 017700000001, 127.1.
_IPV4_SPELLING = re.compile(r"^[0-9a-fx.]+$", re.IGNORECASE)


def forbidden_reason(address: IPAddress) -> str | None:
    """Why an outbound call must not reach `address` ("loopback", "private", ...), or None
    for a public unicast address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_v4(address)
        if embedded is not None:
            reason = forbidden_reason(embedded)
            return f"{reason} (embedded {embedded})" if reason else None
        for net, reason in _FORBIDDEN_V6:
            if address in net:
                return reason
        return None if address in _GLOBAL_UNICAST else "reserved"
    for net, reason in _FORBIDDEN_V4:
        if address in net:
            return reason
    # Whatever else this Python knows is not globally reachable.
    return None if address.is_global else "reserved"


def _embedded_v4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address in _MAPPED or address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _6TO4:
        return address.sixtofour
    if address in _COMPATIBLE and int(address) > 1:  # :: and ::1 are judged as IPv6
        return ipaddress.IPv4Address(int(address))
    return None


def literal_address(host: str) -> IPAddress | None:
    """The address a URL host spells directly, in any form the system resolver accepts
    (`[::ffff:127.0.0.1]`, `2130706433`, `0x7f.1`, `0177.0.0.1`), or None for a name."""
    host = host.strip("[]").split("%", 1)[0]
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _IPV4_SPELLING.match(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _normal_host(host: str) -> str:
    return host.strip("[]").rstrip(".").lower()


class OutboundRefused(Exception):
    """A call to a user-configured URL was refused before connecting: the host is (or
    resolves to) an address the outbound policy does not allow."""

    def __init__(self, host: str, address: str, reason: str) -> None:
        self.host = host
        self.address = address
        self.reason = reason
        where = host if host == address else f"{host} ({address})"
        super().__init__(
            f"{where} is a {reason} address; calls to private addresses are refused "
            "(OUTBOUND_ALLOW_PRIVATE, OUTBOUND_ALLOWED)"
        )


@dataclass(frozen=True)
class OutboundPolicy:
    """Which addresses a user-configured URL may reach.

    Attributes:
        allow_private: every address is allowed (development and tests).
        allowed_hosts: host names whose addresses are allowed whatever they are.
        allowed_networks: addresses inside these are allowed (an internal CRM, say).
    """

    allow_private: bool = False
    allowed_hosts: frozenset[str] = frozenset()
    allowed_networks: tuple[IPNetwork, ...] = field(default=())

    @classmethod
    def parse(cls, *, allow_private: bool, allowed: str | Iterable[str] = "") -> OutboundPolicy:
        """From settings values: `allowed` is a comma list of host names and CIDRs
        (`crm.internal, 10.20.0.0/16, 192.168.1.7`).

        Raises:
            ValueError: an entry is neither a host name nor a network.
        """
        items = allowed.split(",") if isinstance(allowed, str) else allowed
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for raw in (i.strip() for i in items):
            if not raw:
                continue
            try:
                networks.append(ipaddress.ip_network(raw.strip("[]"), strict=False))
            except ValueError:
                if not re.fullmatch(r"[A-Za-z0-9_.\-]+", raw):
                    raise ValueError(f"OUTBOUND_ALLOWED: {raw!r} is not a host or CIDR") from None
                hosts.add(_normal_host(raw))
        return cls(allow_private, frozenset(hosts), tuple(networks))

    @classmethod
    def from_settings(cls, settings: typing.Any) -> OutboundPolicy:
        """`OUTBOUND_ALLOW_PRIVATE` when set; unset, it follows JOURNEYS_ENV: allowed in
        development and test (local receivers, the sandbox), refused in production."""
        allow = settings.outbound_allow_private
        if allow is None:
            allow = settings.journeys_env in ("development", "test")
        return cls.parse(allow_private=allow, allowed=settings.outbound_allowed)

    def refusal(self, host: str, address: IPAddress) -> str | None:
        """Why `host`, resolved to `address`, may not be called; None when it may."""
        if self.allow_private or _normal_host(host) in self.allowed_hosts:
            return None
        if any(address in net for net in self.allowed_networks):
            return None
        return forbidden_reason(address)

    def check(self, host: str, addresses: Iterable[str]) -> list[str]:
        """The addresses to connect to, all checked.

        Raises:
            OutboundRefused: naming the first address that is not allowed (one is enough:
                a name that also resolves inside our network is refused as a whole).
        """
        checked = []
        for text in addresses:
            address = ipaddress.ip_address(text.split("%", 1)[0])
            reason = self.refusal(host, address)
            if reason is not None:
                raise OutboundRefused(host, text, reason)
            checked.append(text)
        return checked

    def literal_refusal(self, url: str) -> str | None:
        """A refusal that needs no lookup (publish time): the URL's host is `localhost` or
        an address literal the policy refuses. Names are judged when called."""
        try:
            host = httpx.URL(url).host
        except httpx.InvalidURL as err:
            return f"not a valid URL ({err})"
        name = _normal_host(host)
        if self.allow_private or name in self.allowed_hosts:
            return None
        if name == "localhost" or name.endswith(".localhost"):
            return str(OutboundRefused(host, host, "loopback"))
        address = literal_address(host)
        if address is None:
            return None
        reason = self.refusal(host, address)
        return None if reason is None else str(OutboundRefused(host, str(address), reason))


async def system_resolve(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for `host`, in its order, once each."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class GuardedNetworkBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network layer with the policy in it: `connect_tcp` resolves the host
    once, checks every address and connects to a checked one. httpcore then starts TLS on
    that stream with the URL's hostname (SNI and certificate check), and the request keeps
    its Host header: only the address lookup moved here."""

    def __init__(self, policy: OutboundPolicy, resolve: Resolver | None = None) -> None:
        self.policy = policy
        self.resolve = resolve or system_resolve
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            with anyio.fail_after(timeout):
                found = await self.resolve(host.strip("[]"), port)
        except TimeoutError as err:
            raise httpcore.ConnectTimeout(f"resolving {host}: timed out") from err
        except OSError as err:
            raise httpcore.ConnectError(f"resolving {host}: {err}") from err
        if not found:
            raise httpcore.ConnectError(f"resolving {host}: no address")
        last: Exception | None = None
        for address in self.policy.check(host, found):
            try:
                return await self._inner.connect_tcp(
                    address,
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as err:
                last = err
        assert last is not None
        raise last

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise OutboundRefused(path, path, "local socket")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport over `GuardedNetworkBackend`. httpx takes no network backend, so
    the connection pool it built is replaced by the same pool on ours (httpx 0.28 keeps it
    in `_pool`; tests/channels/test_outbound_guard.py fails if that ever changes)."""

    def __init__(
        self,
        policy: OutboundPolicy,
        *,
        resolve: Resolver | None = None,
        ssl_context: ssl.SSLContext | None = None,
        limits: httpx.Limits = httpx.Limits(max_connections=100, max_keepalive_connections=20),
    ) -> None:
        super().__init__(trust_env=False, limits=limits)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context or httpx.create_ssl_context(trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=GuardedNetworkBackend(policy, resolve),
        )


def outbound_client(
    policy: OutboundPolicy,
    *,
    timeout: float = 10.0,
    resolve: Resolver | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> httpx.AsyncClient:
    """The client for user-configured URLs: guarded, no redirects, no environment proxies
    (a proxy would resolve the name where we cannot check it). `resolve` and `ssl_context`
    replace the system resolver and CA bundle (tests, a private CA)."""
    return httpx.AsyncClient(
        transport=GuardedTransport(policy, resolve=resolve, ssl_context=ssl_context),
        timeout=timeout,
        follow_redirects=False,
        trust_env=False,
    )
