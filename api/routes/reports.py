"""What each send step achieved, per channel: the delivery funnel marketers read (admin key)."""

from __future__ import annotations

from fastapi import APIRouter, Query

from api.deps import AdminDep, PoolDep
from api.errors import ApiError
from models.public import ChannelReport, Int32, StepChannelStats

router = APIRouter(prefix="/v1/journeys", tags=["reports"], dependencies=[AdminDep])

_FUNNEL = """
SELECT step_id, channel, count(*) AS messages,
       count(*) FILTER (WHERE status = 'sent') AS sent,
       count(*) FILTER (WHERE status = 'bounced') AS bounced,
       count(*) FILTER (WHERE status IN ('pending', 'sending')) AS in_flight,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(delivered_at) AS delivered, count(opened_at) AS opened,
       count(clicked_at) AS clicked, count(read_at) AS read
FROM messages WHERE journey_id = $1 AND NOT test AND ($2::int IS NULL OR journey_version = $2)
GROUP BY 1, 2 ORDER BY 1, 2
"""
_SKIPS = """
SELECT step_id, channel, skip_reason, count(*) AS n FROM messages
WHERE journey_id = $1 AND NOT test AND status = 'skipped'
  AND ($2::int IS NULL OR journey_version = $2)
GROUP BY 1, 2, 3
"""
_FAILURES = """
SELECT step_id, channel, coalesce(skip_reason, 'error') AS reason, count(*) AS n FROM messages
WHERE journey_id = $1 AND NOT test AND status = 'failed'
  AND ($2::int IS NULL OR journey_version = $2)
GROUP BY 1, 2, 3
"""


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


@router.get("/{journey_id}/channels", response_model=ChannelReport)
async def channel_report(
    journey_id: str,
    pool: PoolDep,
    version: Int32 | None = Query(None, ge=1, description="one version; default all"),
) -> ChannelReport:
    """Per send step and channel: messages, sent, delivered, opened, clicked, read, bounced,
    failed (and `failures` by reason: template_error, rejected, ...), and skipped by reason;
    rates are over sent messages."""
    if not await pool.fetchval("SELECT 1 FROM journeys WHERE id = $1", journey_id):
        raise ApiError(404, "not_found", f"journey_id: no journey {journey_id!r}")
    skips: dict[tuple[str, str], dict[str, int]] = {}
    for r in await pool.fetch(_SKIPS, journey_id, version):
        skips.setdefault((r["step_id"], r["channel"]), {})[r["skip_reason"] or "unknown"] = r["n"]
    failures: dict[tuple[str, str], dict[str, int]] = {}
    for r in await pool.fetch(_FAILURES, journey_id, version):
        failures.setdefault((r["step_id"], r["channel"]), {})[r["reason"]] = r["n"]
    rows = []
    for r in await pool.fetch(_FUNNEL, journey_id, version):
        sent = r["sent"] + r["bounced"]  # handed to the provider
        rows.append(
            StepChannelStats(
                **dict(r),
                skipped=skips.get((r["step_id"], r["channel"]), {}),
                failures=failures.get((r["step_id"], r["channel"]), {}),
                delivery_rate=_rate(r["delivered"], sent),
                open_rate=_rate(r["opened"], sent),
                click_rate=_rate(r["clicked"], sent),
                bounce_rate=_rate(r["bounced"], sent),
            )
        )
    return ChannelReport(journey_id=journey_id, version=version, steps=rows)
