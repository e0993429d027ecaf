"""Journey definitions: immutable published versions, loaded by the router."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import structlog
from pydantic import ValidationError

from models.definition_errors import Problem, explain, problem_of
from models.definition_text import ParsedText, TextError, as_mapping, parse_yaml
from models.journey import JourneyDefinition, SendStep, Template
from models.loading import RUNTIME
from models.validation import check
from store.templates import CHANNELS, InvalidTemplate, check_content, get_template, get_version

log = structlog.stdlib.get_logger("journeys")


class DefinitionError(ValueError):
    """A definition that does not parse or validate. `problems` name the field, the step and,
    for text, the line and column (`models.definition_errors`); the message says them all,
    after `source` (a file name, or "definition")."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        super().__init__(f"{source}: " + "; ".join(str(p) for p in problems))
        self.source = source
        self.problems = problems


def parse_definition(
    data: Mapping[str, Any] | ParsedText, source: str = "definition"
) -> JourneyDefinition:
    """Schema validation plus the publish-time checks of `models.validation` (graph, results
    references, templates). Workflows decode definitions without re-running the latter.
    `data` parsed from text (`models.definition_text`) gives errors their line and column."""
    parsed = data if isinstance(data, ParsedText) else ParsedText(data, {})
    try:
        defn = JourneyDefinition.model_validate(parsed.data)
    except ValidationError as err:
        raise DefinitionError(source, explain(err, parsed, JourneyDefinition)) from None
    try:
        check(defn)
    except ValueError as err:
        raise DefinitionError(source, [problem_of(str(err), parsed)]) from None
    return defn


def read_yaml(text: str | bytes, source: str = "definition") -> ParsedText:
    """YAML (or JSON) text of a definition, parsed safely (`models.definition_text`).

    Raises:
        DefinitionError: the text does not parse or is not a mapping, with line and column.
    """
    try:
        parsed = parse_yaml(text)
        as_mapping(parsed, "a journey definition")
    except TextError as err:
        raise DefinitionError(
            source, [Problem(err.field, err.message, position=err.position)]
        ) from None
    return parsed


def load_file(path: Path) -> JourneyDefinition:
    """A definition file (`journeys/*.yaml`); errors name the file, line and column."""
    return parse_definition(read_yaml(path.read_bytes(), str(path)), str(path))


async def resolve_templates(
    conn: asyncpg.Connection | asyncpg.Pool,
    defn: JourneyDefinition,
    source: str = "definition",
    *,
    text: ParsedText | None = None,
) -> JourneyDefinition:
    """The definition with every stored template a send step refers to (`template.ref`) pinned
    to a version: the one given, else the template's current one. Runs render exactly that
    version, even after the template gets a new one.

    Raises:
        DefinitionError: naming the step: the template or version does not exist, it is for
            a channel the step does not send on, or its content does not pass the checks
            (with line and column when `text` is what `defn` was parsed from).
    """
    errors: list[str] = []
    steps = []
    for step in defn.steps:
        if not isinstance(step, SendStep):
            steps.append(step)
            continue
        pinned: dict[str, Template] = {}
        for field, ref in step.templates():
            if ref.ref is None:
                continue
            where = f"step {step.id!r}: {field}.ref"
            found = await get_version(conn, ref.ref, ref.version)
            if found is None:
                if ref.version is not None and await get_template(conn, ref.ref) is not None:
                    errors.append(f"{where}: template {ref.ref!r} has no version {ref.version}")
                else:
                    errors.append(f"{where}: no stored template {ref.ref!r}")
                continue
            fits = (
                [field.removeprefix("variants.")]
                if field != "template"
                else list(CHANNELS)
                if step.channel == "best"
                else step.channels
            )
            if found.channel not in fits:
                errors.append(
                    f"{where}: template {ref.ref!r} is for {found.channel}, the step sends on "
                    f"{', '.join(fits)}"
                )
            try:
                check_content(subject=found.subject, body=found.body, html=found.html)
            except InvalidTemplate as err:
                errors.append(f"{where}: template {ref.ref!r} v{found.version}: {err}")
            pinned[field] = ref.model_copy(update={"version": found.version})
        update: dict[str, object] = {}
        if "template" in pinned:
            update["template"] = pinned.pop("template")
        if pinned:
            variants = dict(step.variants)
            for field, t in pinned.items():
                variants[field.removeprefix("variants.")] = t  # type: ignore[index]
            update["variants"] = variants
        steps.append(step.model_copy(update=update) if update else step)
    if errors:
        written = text or ParsedText(defn.model_dump(mode="json", by_alias=True), {})
        raise DefinitionError(source, [problem_of(e, written) for e in errors])
    return defn.model_copy(update={"steps": steps})


def _checksum(defn: JourneyDefinition) -> str:
    body = defn.model_dump(mode="json", by_alias=True, exclude={"version"})
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


async def publish(
    conn: asyncpg.Connection | asyncpg.Pool,
    defn: JourneyDefinition,
    *,
    text: ParsedText | None = None,
    source: str = "definition",
) -> int:
    """Publish as a new immutable version; publishing an unchanged definition is a no-op.
    Stored templates are pinned first (`resolve_templates`), so republishing after a template
    changed is a new version that pins the template's new version.

    Raises:
        DefinitionError: a stored template reference does not resolve.
    """
    async with _acquire(conn) as c, c.transaction():
        await c.execute("SELECT pg_advisory_xact_lock(hashtext($1))", defn.id)
        defn = await resolve_templates(c, defn, source, text=text)
        checksum = _checksum(defn)
        row = await c.fetchrow(
            "SELECT v.version, v.checksum FROM journeys j JOIN journey_versions v "
            "ON v.journey_id = j.id AND v.version = j.current_version WHERE j.id = $1",
            defn.id,
        )
        if row and row["checksum"] == checksum:
            return int(row["version"])
        version = (row["version"] if row else 0) + 1
        pinned = defn.model_copy(update={"version": version})
        # A first version makes a new (or draft-only) journey active; later versions keep
        # the status a marketer chose (a paused journey stays paused).
        await c.execute(
            "INSERT INTO journeys (id, name, status, current_version) VALUES ($1, $2, 'active', 0) "
            "ON CONFLICT (id) DO UPDATE SET status = CASE WHEN journeys.status = 'draft' "
            "THEN 'active' ELSE journeys.status END",
            defn.id,
            defn.name,
        )
        await c.execute(
            "INSERT INTO journey_versions (journey_id, version, definition, checksum) "
            "VALUES ($1, $2, $3, $4)",
            defn.id,
            version,
            pinned.model_dump(mode="json", by_alias=True),
            checksum,
        )
        await c.execute(
            "UPDATE journeys SET current_version = $2, name = $3, updated_at = now() WHERE id = $1",
            defn.id,
            version,
            defn.name,
        )
        await c.execute("NOTIFY journeys_changed")
    return version


@dataclass
class RoutedJourney:
    """What the router needs of a journey: the version new entries get, whether entries are
    open, and every event any published version reacts to (runs keep their own version).

    `unreadable` says why the current version cannot be read (it validated when published;
    a deploy changed the model since). `current` is then the newest readable version, for
    its id and the runs pinned to it, and the router holds back every event that hits `keys`
    (`RunStateUnusable`) rather than route it past the journey as if it were paused."""

    current: JourneyDefinition
    status: str
    keys: set[tuple[str, str | None]]
    interest: set[tuple[str, str | None]]  # what running runs react to (not entries)
    unreadable: str | None = None

    @property
    def open(self) -> bool:
        return self.status == "active" and self.unreadable is None


async def routed_journeys(conn: asyncpg.Connection | asyncpg.Pool) -> list[RoutedJourney]:
    """Every non-draft journey with the events its versions react to.

    A version that no longer validates is skipped and logged (error, journey id and version):
    one bad stored version must not stop routing for every journey. If it is the current
    version, the journey is routed as `unreadable` (see `RoutedJourney`); if no version of
    a journey can be read, nothing is known of the events it wants and it is left out,
    logged as an error at every load (`journeys.not_routed`)."""
    rows = await conn.fetch(
        "SELECT j.id, j.status, j.current_version, v.version, v.definition FROM journeys j "
        "JOIN journey_versions v ON v.journey_id = j.id WHERE j.status <> 'draft' "
        "ORDER BY j.id, v.version"
    )
    out: dict[str, RoutedJourney] = {}
    unreadable: dict[str, str] = {}
    found: set[str] = set()  # journeys whose current version has been read
    for r in rows:
        current = r["version"] == r["current_version"]
        try:
            defn = JourneyDefinition.model_validate(r["definition"], context=RUNTIME)
        except ValueError as err:
            log.error(
                "journeys.version_unreadable", journey_id=r["id"], version=r["version"],
                current=current, error=str(err),
            )  # fmt: skip
            if current:
                unreadable[r["id"]] = f"journey {r['id']} v{r['version']}: {err}"
            continue
        interest = {(m.type, m.event) for m in defn.interesting()}
        if r["id"] not in out:
            out[r["id"]] = RoutedJourney(defn, r["status"], set(), set())
        routed = out[r["id"]]
        routed.keys |= interest | {(defn.entry.type, defn.entry.event)}
        routed.interest |= interest
        if current:
            found.add(r["id"])
        if r["id"] not in found or current:  # else the newest readable one stands in
            routed.current = defn
    for journey_id, why in unreadable.items():
        if journey_id in out:
            out[journey_id].unreadable = why
        else:
            log.error("journeys.not_routed", journey_id=journey_id, error=why)
    return list(out.values())


async def save_draft(conn: asyncpg.Connection | asyncpg.Pool, journey_id: str, data: dict) -> None:
    name = data.get("name") if isinstance(data.get("name"), str) else journey_id
    await conn.execute(
        "INSERT INTO journeys (id, name, status, current_version, draft, draft_updated_at) "
        "VALUES ($1, $2, 'draft', 0, $3, now()) "
        "ON CONFLICT (id) DO UPDATE SET draft = $3, draft_updated_at = now(), updated_at = now()",
        journey_id,
        name,
        data,
    )


async def active_definitions(conn: asyncpg.Connection | asyncpg.Pool) -> list[JourneyDefinition]:
    rows = await conn.fetch(
        "SELECT v.definition FROM journeys j JOIN journey_versions v "
        "ON v.journey_id = j.id AND v.version = j.current_version WHERE j.status = 'active' "
        "ORDER BY j.id"
    )
    return [JourneyDefinition.model_validate(r["definition"], context=RUNTIME) for r in rows]


@dataclass
class FolderPublished:
    """What `publish_folder` did: the version of each journey published, and each file that
    was not, with its problems."""

    versions: dict[str, int]
    invalid: dict[Path, DefinitionError]


async def publish_folder(
    conn: asyncpg.Connection | asyncpg.Pool, folder: Path, *, source_root: Path | None = None
) -> FolderPublished:
    """Publish every `*.yaml` of `folder`; a file that does not parse or validate is set
    aside (in `invalid`) and the others are published all the same. Files are named relative
    to `source_root` when given (`journeys/x.yaml`)."""
    out = FolderPublished({}, {})
    for path in sorted(folder.glob("*.yaml")):
        name = str(path.relative_to(source_root)) if source_root else str(path)
        try:
            parsed = read_yaml(path.read_bytes(), name)
            defn = parse_definition(parsed, name)
            out.versions[defn.id] = await publish(conn, defn, text=parsed, source=name)
        except DefinitionError as err:
            out.invalid[path] = err
    return out


class _acquire:
    """Use a pool or an existing connection the same way."""

    def __init__(self, conn: asyncpg.Connection | asyncpg.Pool) -> None:
        self._conn = conn
        self._held: Any = None

    async def __aenter__(self) -> asyncpg.Connection:
        if isinstance(self._conn, asyncpg.Pool):
            self._held = self._conn.acquire()
            return await self._held.__aenter__()
        return self._conn

    async def __aexit__(self, *exc: object) -> None:
        if self._held is not None:
            await self._held.__aexit__(*exc)


async def record_run_abandoned(
    conn: asyncpg.Connection | asyncpg.Pool, enrollment_id: str, outcome: str
) -> bool:
    """A run whose workflow ended outside our code (terminated, failed, timed out): the row
    says it ended (`exited`, the outcome as its reason) and its unsent messages are `failed`
    (`skip_reason` `abandoned`), so caps, reports and the read API stop counting them as
    under way. Returns False if the row had already ended."""
    async with _acquire(conn) as tx, tx.transaction():
        row = await tx.fetchrow(
            "UPDATE journey_runs SET status = 'exited', exit_reason = $2, ended_at = now() "
            "WHERE enrollment_id = $1 AND status IN ('starting', 'running') "
            "RETURNING workflow_id, started_at",
            enrollment_id,
            outcome,
        )
        if row is None:
            return False
        await tx.execute(
            "UPDATE messages SET status = 'failed', skip_reason = 'abandoned', error = $3 "
            "WHERE workflow_id = $1 AND status IN ('pending', 'sending') AND created_at >= $2",
            row["workflow_id"],
            row["started_at"],
            outcome,
        )
    return True


async def record_duplicate_closed(
    conn: asyncpg.Connection | asyncpg.Pool, enrollment_id: str, outcome: str
) -> bool:
    """A run a merge ended (`exit_reason` `merged`: its workflow still had to be told) whose
    workflow has closed or is gone: the reason says how (`merged (workflow terminated)`), so
    reconciliation stops checking it. A run that exited by itself has already replaced the
    reason with its own (`record_run_finished`), which is kept. Returns False if nothing
    changed."""
    status = await conn.execute(
        "UPDATE journey_runs SET exit_reason = $2 "
        "WHERE enrollment_id = $1 AND status = 'exited' AND exit_reason = 'merged'",
        enrollment_id,
        f"merged (workflow {outcome})",
    )
    return status != "UPDATE 0"


async def record_not_entered(
    conn: asyncpg.Connection | asyncpg.Pool,
    journey: JourneyDefinition,
    customer_id: str,
    message_id: str,
    event: str | None,
    reason: str,
) -> None:
    """An event that would have entered `journey` but did not (`reason`: `paused`). Once per
    event and journey, so an event routed again is not counted twice."""
    await conn.execute(
        "INSERT INTO entry_skips (journey_id, journey_version, customer_id, message_id, event, "
        "reason) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (journey_id, message_id) DO NOTHING",
        journey.id,
        journey.version,
        customer_id,
        message_id,
        event,
        reason,
    )
