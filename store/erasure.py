"""Erasure and export of one customer's data: the SQL, and the owner of `erasures` writes.

Erasure deletes every row that holds the customer (their id and the ids merged into it) and
keeps two things, both hashed: the erasure record (who asked, when, sha256 of the customer id
and of the refs that named them, so a repeated request is recognised), and what the person
asked for or a provider reported about their addresses: real suppressions (bounce, complaint,
STOP, manual) and channel-wide opt-outs block the hashed address on that channel; a topic
opt-out becomes a marketing opt-out of it (transactional mail still goes).

The deletion runs in one transaction holding the router's chunk lock: no chunk of events is
being routed meanwhile, so an event is either routed before (to the old profile, and deleted
with it) or after (to a fresh profile with nothing of the old one). The customer ids are
computed again in that transaction, following `merged_into` both ways: a merge the router made
before it could see the request (the only window: while an erasure runs, `store.profiles`
makes no merge that involves its customers) moved rows to a survivor or brought a loser's.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import asyncpg

from core.logs import get_logger
from models.privacy import DataErased, ErasureMode
from store.feedback import (
    HASH_PREFIX,
    MARKETING_OPT_OUT,
    SMS_KEYWORD_SOURCE,
    hashed_address,
    normalize_address,
    suppression_keys,
)

__all__ = ["HASH_PREFIX", "hashed_address", "suppression_keys"]  # kept for their importers

log = get_logger("erasure")

Conn = asyncpg.Connection | asyncpg.Pool

# Where a channel's address lives on a profile (as activities.contact_policy.ADDRESS_TRAIT) and
# in identities.
_TRAIT_CHANNEL = {"email": "email", "phone": "sms", "push_token": "push"}
_IDENTITY_CHANNEL = {"email": "email", "phone": "sms"}


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def ref_hashes(refs: list[str]) -> list[str]:
    """Hashes a ref is recognised by later (emails are matched lower-case, as find_customer)."""
    return sorted({sha256(r) for r in refs} | {sha256(r.strip().lower()) for r in refs})


# -- the erasure record ---------------------------------------------------------------------
async def start_erasure(
    conn: asyncpg.Connection,
    customer_id: str,
    *,
    requested_by: str,
    source: str,
    mode: ErasureMode,
) -> tuple[asyncpg.Record, bool]:
    """The running erasure of this customer, or a new one. Returns (row, created)."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('erasure:' || $1))", customer_id)
    # Also one that took this customer in later (a merge it found while deleting).
    row = await conn.fetchrow(
        "SELECT * FROM erasures WHERE status = 'running' "
        "AND (customer_id = $1 OR $1 = ANY(customer_ids)) ORDER BY requested_at LIMIT 1",
        customer_id,
    )
    if row is not None:
        return row, False
    ids = await customer_ids(conn, customer_id)
    refs = await _refs(conn, ids)
    row = await conn.fetchrow(
        "INSERT INTO erasures (id, mode, status, customer_hash, customer_id, customer_ids, "
        "workflow_ids, ref_hashes, requested_by, source) "
        "VALUES ($1, $2, 'running', $3, $4, $5, '{}', $6, $7, $8) RETURNING *",
        uuid.uuid4().hex,
        mode,
        sha256(customer_id),
        customer_id,
        ids,
        ref_hashes(refs),
        requested_by,
        source,
    )
    assert row is not None
    return row, True


async def get_erasure(conn: Conn, erasure_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM erasures WHERE id = $1", erasure_id)


async def erasure_for_ref(conn: Conn, ref: str) -> asyncpg.Record | None:
    """The latest erasure of a customer this ref (id, userId, anonymousId, email) named."""
    return await conn.fetchrow(
        "SELECT * FROM erasures WHERE ref_hashes && $1::varchar[] "
        "ORDER BY requested_at DESC LIMIT 1",
        ref_hashes([ref]),
    )


async def erasure_recorded(conn: Conn, erasure_id: str) -> bool:
    """Whether the erasure's row is committed (the API starts its workflow just before)."""
    return bool(await conn.fetchval("SELECT 1 FROM erasures WHERE id = $1", erasure_id))


async def erasure_targets(conn: Conn, erasure_id: str) -> tuple[list[str], list[str], str]:
    """(customer ids, workflow ids seen so far, mode) of a running erasure; empty once done."""
    row = await conn.fetchrow(
        "SELECT customer_ids, workflow_ids, mode, status FROM erasures WHERE id = $1", erasure_id
    )
    if row is None or row["status"] != "running":
        return [], [], row["mode"] if row else "erase"
    return list(row["customer_ids"] or []), list(row["workflow_ids"] or []), row["mode"]


async def remember_workflows(conn: Conn, erasure_id: str, workflow_ids: list[str]) -> None:
    """Keep the workflow ids to delete from Temporal once their journey_runs rows are gone."""
    await conn.execute(
        "UPDATE erasures SET workflow_ids = ARRAY(SELECT DISTINCT unnest("
        "coalesce(workflow_ids, '{}') || $2::varchar[])) WHERE id = $1",
        erasure_id,
        workflow_ids,
    )


async def finish_erasure(conn: Conn, erasure_id: str, counts: dict[str, Any]) -> None:
    """Completed: the customer ids and workflow ids go; only hashes and counts stay."""
    await conn.execute(
        "UPDATE erasures SET status = 'completed', completed_at = coalesce(completed_at, now()), "
        "customer_id = NULL, customer_ids = NULL, workflow_ids = NULL, counts = $2 "
        "WHERE id = $1",
        erasure_id,
        counts,
    )


# -- what a customer is made of ---------------------------------------------------------------
async def customer_ids(conn: Conn, customer_id: str) -> list[str]:
    """The customer and every customer merged into it (their rows may still hold data)."""
    rows = await conn.fetch(
        "SELECT id FROM customers WHERE id = $1 OR merged_into = $1 ORDER BY id <> $1, id",
        customer_id,
    )
    return [r["id"] for r in rows] or [customer_id]


async def current_customer_ids(conn: Conn, erasure_id: str) -> list[str]:
    """The running erasure's customer ids as they are now, stored back on its row: the ids
    it started with, the customers they were merged into, and every customer merged into
    any of those (to a fixed point). Merges happen under the router's chunk lock: call with
    it held for an answer that stays true until the transaction ends."""
    ids = set((await erasure_targets(conn, erasure_id))[0])
    if not ids:
        return []
    while True:
        rows = await conn.fetch(
            "SELECT id, merged_into FROM customers "
            "WHERE id = ANY($1::text[]) OR merged_into = ANY($1::text[])",
            sorted(ids),
        )
        found = ids | {r["id"] for r in rows} | {r["merged_into"] for r in rows if r["merged_into"]}
        if found == ids:
            break
        ids = found
    await conn.execute(
        "UPDATE erasures SET customer_ids = ARRAY(SELECT DISTINCT unnest("
        "customer_ids || $2::varchar[])) WHERE id = $1",
        erasure_id,
        sorted(ids),
    )
    return sorted(ids)


async def customers_under_erasure(conn: Conn, customer_ids: list[str]) -> set[str]:
    """Which of these customers a running erasure (one that deletes) is about to delete."""
    rows = await conn.fetch(
        "SELECT DISTINCT c FROM erasures, unnest(customer_ids) AS c "
        "WHERE status = 'running' AND mode <> 'suppress' AND c = ANY($1::varchar[])",
        customer_ids,
    )
    return {r["c"] for r in rows}


async def _refs(conn: Conn, ids: list[str]) -> list[str]:
    rows = await conn.fetch(
        "SELECT value FROM identities WHERE customer_id = ANY($1::text[]) "
        "AND kind IN ('user', 'anonymous', 'email')",
        ids,
    )
    return [*ids, *(r["value"] for r in rows)]


async def run_workflow_ids(conn: Conn, ids: list[str]) -> list[str]:
    rows = await conn.fetch(
        "SELECT DISTINCT workflow_id FROM journey_runs WHERE customer_id = ANY($1::text[])", ids
    )
    return [r["workflow_id"] for r in rows]


async def live_runs(conn: Conn, ids: list[str]) -> dict[str, str]:
    """enrollment id → workflow id of their runs still `starting` or `running`."""
    rows = await conn.fetch(
        "SELECT enrollment_id, workflow_id FROM journey_runs WHERE customer_id = ANY($1::text[]) "
        "AND status IN ('starting', 'running') ORDER BY enrollment_id",
        ids,
    )
    return {r["enrollment_id"]: r["workflow_id"] for r in rows}


async def mark_runs_erased(conn: Conn, enrollment_ids: list[str]) -> None:
    """Their executions are deleted: the rows say so (`exited`, reason `erased`), so nothing
    starts them again (the router restarts `starting` rows) and the delete step sees no live
    run left. The rows themselves go with the customer's data."""
    await conn.execute(
        "UPDATE journey_runs SET status = 'exited', exit_reason = 'erased', "
        "ended_at = coalesce(ended_at, now()) "
        "WHERE enrollment_id = ANY($1::text[]) AND status IN ('starting', 'running')",
        enrollment_ids,
    )


async def addresses(conn: Conn, ids: list[str]) -> set[tuple[str, str]]:
    """(channel, normalized address) the customer was reachable at: traits, identities,
    messages."""
    out: set[tuple[str, str]] = set()
    for r in await conn.fetch("SELECT traits FROM customers WHERE id = ANY($1::text[])", ids):
        traits = r["traits"] if isinstance(r["traits"], dict) else {}
        for trait, channel in _TRAIT_CHANNEL.items():
            value = traits.get(trait)
            if isinstance(value, str) and value.strip():
                out.add((channel, value))
    for r in await conn.fetch(
        "SELECT kind, value FROM identities WHERE customer_id = ANY($1::text[]) "
        "AND kind IN ('email', 'phone')",
        ids,
    ):
        out.add((_IDENTITY_CHANNEL[r["kind"]], r["value"]))
    for r in await conn.fetch(
        "SELECT DISTINCT channel, address FROM messages WHERE customer_id = ANY($1::text[]) "
        "AND address IS NOT NULL",
        ids,
    ):
        out.add((r["channel"], r["address"]))
    normalized = {(c, normalize_address(c, a)) for c, a in out}
    return {(c, a) for c, a in normalized if a}


# -- erasure ----------------------------------------------------------------------------------
async def erase_customer(
    conn: asyncpg.Connection,
    erasure_id: str,
    ids: list[str],
    mode: ErasureMode,
    *,
    router_lock: int,
) -> DataErased:
    """Delete everything of these customer ids (idempotent: a second pass finds nothing).

    Call inside a transaction; it takes the router's chunk lock `router_lock` (waiting for a
    chunk being routed to finish) and the customers' contact locks (waiting for sends being
    decided).
    """
    await conn.execute("SELECT pg_advisory_xact_lock($1)", router_lock)
    for cid in ids:
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('contact:' || $1))", cid)
    requested_at = await conn.fetchval(
        "SELECT requested_at FROM erasures WHERE id = $1", erasure_id
    )
    out = DataErased()
    # Refs seen now (an identify during the erasure may have added some) name it later.
    await conn.execute(
        "UPDATE erasures SET ref_hashes = ARRAY(SELECT DISTINCT unnest(ref_hashes || "
        "$2::varchar[])) WHERE id = $1",
        erasure_id,
        ref_hashes(await _refs(conn, ids)),
    )
    out.suppressed = await _keep_hashed_suppressions(conn, ids, mode)
    if mode == "suppress":
        return out
    await remember_workflows(conn, erasure_id, await run_workflow_ids(conn, ids))
    user_ids = [
        r["value"]
        for r in await conn.fetch(
            "SELECT value FROM identities WHERE customer_id = ANY($1::text[]) "
            "AND kind IN ('user', 'anonymous')",
            ids,
        )
    ]
    counts = out.counts
    # Events routed to them, and events not routed yet that carry their ids and came before
    # the request (later ones make a fresh profile when routed).
    event_ids = [
        r["id"]
        for r in await conn.fetch(
            "SELECT id FROM events WHERE customer_id = ANY($1::text[]) OR (customer_id IS NULL "
            "AND received_at <= $3 AND (user_id = ANY($2::text[]) OR anonymous_id = "
            "ANY($2::text[]) OR previous_id = ANY($2::text[])))",
            ids,
            user_ids,
            requested_at,
        )
    ]
    # Tables added later that point at events (e.g. dead letters) lose those rows first.
    for table in await _tables_with(conn, "event_id", exclude=()):
        counts[table] = _n(
            await conn.execute(
                f'DELETE FROM "{table}" WHERE event_id = ANY($1::bigint[])', event_ids
            )
        )
    counts["events"] = _n(
        await conn.execute("DELETE FROM events WHERE id = ANY($1::bigint[])", event_ids)
    )
    # Idempotency keys of profile updates, webhooks and tasks start with the enrollment id.
    counts["applied_effects"] = _n(
        await conn.execute(
            "DELETE FROM applied_effects a USING journey_runs r "
            "WHERE r.customer_id = ANY($1::text[]) "
            "AND starts_with(a.idempotency_key, r.enrollment_id || ':')",
            ids,
        )
    )
    # Every table with a customer_id column: identities, messages (the inbox, send claims),
    # journey_runs, tasks, subscriptions, and any added later.
    skip = ("customers", "erasures", "events")
    for table in await _tables_with(conn, "customer_id", exclude=skip):
        counts[table] = _n(
            await conn.execute(f'DELETE FROM "{table}" WHERE customer_id = ANY($1::text[])', ids)
        )
    counts["customers"] = _n(
        await conn.execute(
            "DELETE FROM customers WHERE id = ANY($1::text[]) OR merged_into = ANY($1::text[])",
            ids,
        )
    )
    log.info("erasure.data_deleted", erasure_id=erasure_id, **counts)
    return out


async def _keep_hashed_suppressions(
    conn: asyncpg.Connection, ids: list[str], mode: ErasureMode
) -> int:
    """Keep, hashed, what blocks the customer's addresses, and drop their plain suppressions.

    Per address and channel, the strongest of: its suppression (its reason: hard_bounce,
    complaint, stop, manual); an opt-out of the whole channel (topic `*`: `stop` if an SMS
    STOP made it, so a START lifts it, else `opted_out`); with a SUPPRESS regulation,
    `regulation`; an opt-out of some topic: `unsubscribed`, which blocks marketing sends only
    (store.feedback.MARKETING_OPT_OUT). A weaker hashed row already there is strengthened."""
    channel_wide: dict[str, str] = {}
    topic_level: set[str] = set()
    for r in await conn.fetch(
        "SELECT channel, topic, source FROM subscriptions WHERE customer_id = ANY($1::text[]) "
        "AND status = 'unsubscribed' ORDER BY channel, topic, source",
        ids,
    ):
        if r["topic"] != "*":
            topic_level.add(r["channel"])
        elif channel_wide.get(r["channel"]) != "stop":
            channel_wide[r["channel"]] = (
                "stop" if r["source"] == SMS_KEYWORD_SOURCE else "opted_out"
            )
    kept = 0
    for channel, address in sorted(await addresses(conn, ids)):
        plain, hashed = suppression_keys(channel, address)
        reason = await conn.fetchval(
            "DELETE FROM suppressions WHERE channel = $1 AND address = $2 RETURNING reason",
            channel,
            plain,
        )
        if reason is None:
            reason = channel_wide.get(channel)
        if reason is None and mode != "erase":
            reason = "regulation"
        if reason is None and channel in topic_level:
            reason = MARKETING_OPT_OUT
        if reason is None:
            continue
        kept += _n(
            await conn.execute(
                "INSERT INTO suppressions (channel, address, reason) VALUES ($1, $2, $3) "
                "ON CONFLICT (channel, address) DO UPDATE SET reason = EXCLUDED.reason "
                "WHERE suppressions.reason = $4 AND EXCLUDED.reason <> $4",
                channel,
                hashed,
                reason,
                MARKETING_OPT_OUT,
            )
        )
    return kept


async def _tables_with(conn: asyncpg.Connection, column: str, exclude: tuple[str, ...]) -> list:
    rows = await conn.fetch(
        "SELECT c.table_name FROM information_schema.columns c "
        "JOIN information_schema.tables t USING (table_schema, table_name) "
        "WHERE c.table_schema = current_schema() AND c.column_name = $1 "
        "AND t.table_type = 'BASE TABLE' ORDER BY c.table_name",
        column,
    )
    return [r["table_name"] for r in rows if r["table_name"] not in exclude]


def _n(status: str) -> int:
    """Rows affected, from a command status ('DELETE 3', 'INSERT 0 1')."""
    return int(status.split()[-1])


# -- export -----------------------------------------------------------------------------------
async def export_rows(conn: Conn, customer_id: str) -> dict[str, Any]:
    """Rows about a customer the read API does not show in full: events with their payload,
    messages with address and provider id, tasks, consent, suppressions of their addresses."""
    ids = await customer_ids(conn, customer_id)
    events = await conn.fetch(
        "SELECT id, message_id, type, event, user_id, anonymous_id, previous_id, timestamp, "
        "received_at, payload FROM events WHERE customer_id = ANY($1::text[]) "
        "ORDER BY timestamp, id",
        ids,
    )
    messages = await conn.fetch(
        "SELECT * FROM messages WHERE customer_id = ANY($1::text[]) ORDER BY id", ids
    )
    tasks = await conn.fetch(
        "SELECT * FROM tasks WHERE customer_id = ANY($1::text[]) ORDER BY id", ids
    )
    consent = await conn.fetch(
        "SELECT channel, topic, status, source, updated_at FROM subscriptions "
        "WHERE customer_id = ANY($1::text[]) ORDER BY channel, topic",
        ids,
    )
    pairs = sorted(await addresses(conn, ids))
    # Plain and hashed rows (a hashed one an erasure kept for someone earlier at this
    # address blocks them too), shown with the address they are about.
    suppressions = []
    for channel, address in pairs:
        rows = await conn.fetch(
            "SELECT channel, address, reason, created_at FROM suppressions "
            "WHERE channel = $1 AND address = ANY($2::text[]) ORDER BY address",
            channel,
            suppression_keys(channel, address),
        )
        suppressions += [
            {**dict(r), "address": address, "hashed": r["address"].startswith(HASH_PREFIX)}
            for r in rows
        ]
    return {
        "merged_ids": [i for i in ids if i != customer_id],
        "events": [dict(r) for r in events],
        "messages": [dict(r) for r in messages],
        "tasks": [dict(r) for r in tasks],
        "consent": [dict(r) for r in consent],
        "suppressions": suppressions,
    }
