"""``celery idem doctor`` on the PostgreSQL store, the judging: facts in, findings out.

Pure (no psycopg, no connection): :func:`judge_postgres` turns the
:class:`PostgresFacts` that ``cli/postgres.py`` gathers into findings, so every verdict
is tested without a database. The checks:

* **reachable** - the server answers, with the round trip and its version; else a
  failure with the URL's parts to check.
* **schema** - ``celery_idem_records`` and ``celery_idem_schema`` exist at this
  celery-idem's ``SCHEMA_VERSION``: missing or older fails (workers refuse to start;
  ``celery idem migrate``), newer warns (upgrade celery-idem here).
* **functions** - the transitions' PL/pgSQL functions the schema creates all exist.
* **indexes** - the primary key on ``key`` (claims rely on it: fail) and the expiry
  index (``purge`` walks it: warn without it), both valid (a failed ``CREATE INDEX
  CONCURRENTLY`` leaves an invalid one).
* **privileges** - the URL's role may read and write both tables and run the functions.
* **writable** - a primary, not a standby in recovery nor ``default_transaction_read_only``.
* **idle_tx_timeout** - ``idle_in_transaction_session_timeout``: 0 (unset) warns, since
  a body stuck inside ``idem_atomic()`` would hold its key's row lock forever.
* **durability** - ``fsync`` and ``synchronous_commit`` on: off, a crash can lose the
  last completions, and their duplicates run the body again (a warning).
* **clock** - the offset of the server's clock (``clock_timestamp()``) from this
  machine's: informational, since every deadline is on the server's clock.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from celery_idem.cli import render
from celery_idem.cli.findings import Finding, clock_finding

__all__ = [
    "RECOMMENDED_IDLE_TIMEOUT",
    "RECORDS",
    "SETTINGS",
    "VERSIONS",
    "IndexFact",
    "PostgresFacts",
    "Schema",
    "judge_postgres",
]

RECORDS = "celery_idem_records"
"""The records' table."""
VERSIONS = "celery_idem_schema"
"""The table that holds the schema's version."""
RECOMMENDED_IDLE_TIMEOUT = "60s"
"""What ``doctor`` suggests for ``idle_in_transaction_session_timeout``."""
SETTINGS = (
    "idle_in_transaction_session_timeout",
    "fsync",
    "synchronous_commit",
    "default_transaction_read_only",
)
"""The server settings the checks read (``pg_settings``: the values of this session)."""


@dataclass(frozen=True)
class Schema:
    """What this celery-idem's schema creates (from ``migration_statements()``)."""

    version: int
    functions: frozenset[str]
    indexes: Mapping[str, tuple[str, ...]]
    """Index name -> its columns, for the indexes on the records' table."""


@dataclass(frozen=True)
class IndexFact:
    """One index on the records' table, from ``pg_index``."""

    name: str
    columns: tuple[str, ...]
    primary: bool
    unique: bool
    valid: bool


@dataclass(frozen=True)
class PostgresFacts:
    """What ``doctor`` learnt from the database (None: could not be read).

    Attributes:
        url: The store's URL without its password.
        user: The role the URL connects as; database: the database.
        server_version: ``server_version``.
        server_time: The server's clock (``clock_timestamp()``), seconds since the epoch.
        local_time: This machine's clock half-way through that round trip.
        round_trip: Seconds the round trip took.
        tables: Which of the two tables exist (as the URL's ``search_path`` finds them).
        schema_version: The version ``celery_idem_schema`` holds (None: no row, no table).
        indexes: The indexes on ``celery_idem_records``.
        functions: The ``celery_idem_*`` functions the ``search_path`` finds.
        privileges: Privilege -> held, for the URL's role (empty without the tables).
        settings: ``pg_settings`` values of :data:`SETTINGS` (with their unit).
        in_recovery: ``pg_is_in_recovery()``: a standby.
        probe_error: What the store's own start-up check refused, if it did.
    """

    url: str
    user: str = ""
    database: str = ""
    server_version: str = ""
    server_time: float | None = None
    local_time: float | None = None
    round_trip: float | None = None
    tables: frozenset[str] = frozenset()
    schema_version: int | None = None
    indexes: tuple[IndexFact, ...] = ()
    functions: frozenset[str] = frozenset()
    privileges: Mapping[str, bool] = field(default_factory=dict)
    settings: Mapping[str, str] = field(default_factory=dict)
    in_recovery: bool = False
    probe_error: str | None = None


_MIGRATE = (
    "run `celery -A APP idem migrate` (Django: `python manage.py migrate celery_idem`) "
    "with the workers' idem_store_url"
)


def _schema_finding(facts: PostgresFacts, expected: Schema) -> Finding:
    missing = [name for name in (RECORDS, VERSIONS) if name not in facts.tables]
    if missing:
        detail = (
            f"no table {' or '.join(missing)} in database {facts.database!r}: workers refuse "
            "to start, and every claim fails"
        )
        return Finding("schema", "fail", detail, _MIGRATE)
    have, want = facts.schema_version, expected.version
    if have is None or have < want:
        detail = (
            f"schema version {have if have is not None else 'unknown (no row)'}, this "
            f"celery-idem needs {want}: workers refuse to start"
        )
        return Finding("schema", "fail", detail, _MIGRATE)
    if have > want:
        detail = (
            f"schema version {have} is newer than this celery-idem's ({want}): a newer "
            "release migrated this database"
        )
        return Finding("schema", "warn", detail, "upgrade celery-idem on this machine")
    if facts.probe_error is not None:
        detail = f"the store refuses the database: {facts.probe_error}"
        return Finding("schema", "fail", detail, _MIGRATE)
    return Finding("schema", "ok", f"{RECORDS} and {VERSIONS} at schema version {have}")


def _functions_finding(facts: PostgresFacts, expected: Schema) -> Finding:
    missing = sorted(expected.functions - facts.functions)
    if missing:
        detail = f"{len(missing)} function(s) missing: {', '.join(missing)}"
        return Finding("functions", "fail", detail, _MIGRATE)
    return Finding("functions", "ok", f"the {len(expected.functions)} functions of the schema")


def _indexes_finding(facts: PostgresFacts, expected: Schema) -> Finding:
    problems: list[tuple[str, str]] = []  # (status, text)
    primary = [ix for ix in facts.indexes if ix.primary]
    if not primary or primary[0].columns != ("key",):
        shown = f" (on {', '.join(primary[0].columns)})" if primary else ""
        problems.append(("fail", f"no primary key on {RECORDS} (key){shown}: claims need it"))
    elif not primary[0].valid:
        problems.append(("fail", f"the primary key {primary[0].name} is invalid"))
    for name, columns in sorted(expected.indexes.items()):
        found = [ix for ix in facts.indexes if ix.columns == columns]
        valid = [ix for ix in found if ix.valid]
        status = "warn"
        what = f"{name} ({', '.join(columns)})"
        if not found:
            problems.append(
                (status, f"no index on {', '.join(columns)} ({name}): purge scans the whole table")
            )
        elif not valid:
            problems.append(
                (
                    status,
                    f"the index {found[0].name} on {', '.join(columns)} is "
                    f"invalid (a failed CREATE INDEX CONCURRENTLY?): {what}",
                )
            )
    if problems:
        status = "fail" if any(s == "fail" for s, _ in problems) else "warn"
        fix = f"{_MIGRATE}; an invalid index: REINDEX INDEX <name> (or DROP it, then migrate)"
        return Finding("indexes", status, "; ".join(text for _, text in problems), fix)
    names = [primary[0].name, *sorted(expected.indexes)]
    return Finding("indexes", "ok", f"primary key and expiry index: {', '.join(names)}")


def _privileges_finding(facts: PostgresFacts) -> Finding | None:
    if not facts.privileges:
        return None
    refused = [label for label, held in facts.privileges.items() if not held]
    if refused:
        detail = f"role {facts.user!r} lacks {'; '.join(refused)}: claims fail"
        fix = (
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON {RECORDS} TO {facts.user}; GRANT "
            f"SELECT ON {VERSIONS} TO {facts.user}; and EXECUTE on the celery_idem_* functions"
        )
        return Finding("privileges", "fail", detail, fix)
    detail = f"role {facts.user!r} may read and write {RECORDS} and read {VERSIONS}"
    return Finding("privileges", "ok", detail)


def _writable_finding(facts: PostgresFacts) -> Finding:
    if facts.in_recovery:
        detail = "a standby in recovery: it refuses writes, so every claim fails"
        return Finding("writable", "fail", detail, "point idem_store_url at the primary")
    if facts.settings.get("default_transaction_read_only") == "on":
        detail = "default_transaction_read_only is on: every claim fails"
        fix = f"ALTER ROLE {facts.user or '<role>'} SET default_transaction_read_only = off"
        return Finding("writable", "fail", detail, fix)
    return Finding("writable", "ok", "a primary, read-write")


def _idle_milliseconds(value: str | None) -> int | None:
    """``pg_settings``' ``60000ms`` as 60000; None when unreadable."""
    match = re.fullmatch(r"(\d+)(ms)?", value or "")
    return int(match[1]) if match else None


def _idle_finding(facts: PostgresFacts) -> Finding:
    value = facts.settings.get("idle_in_transaction_session_timeout")
    millis = _idle_milliseconds(value)
    setting = "idle_in_transaction_session_timeout"
    fix = (
        f"ALTER ROLE {facts.user or '<role>'} SET {setting} = '{RECOMMENDED_IDLE_TIMEOUT}' "
        f"(or ALTER DATABASE {facts.database or '<database>'} SET ...; new sessions get it): "
        "longer than any pause of your tasks between the statements of one transaction"
    )
    if millis is None:
        return Finding("idle_tx_timeout", "warn", f"{setting} is not readable ({value!r})", fix)
    if millis == 0:
        detail = (
            f"{setting} is 0 (no limit): a task stuck inside idem_atomic() (a hung call, a "
            "paused worker) keeps its transaction open, with the locks of the rows it "
            "wrote and a connection, for as long as it hangs"
        )
        return Finding("idle_tx_timeout", "warn", detail, fix)
    detail = (
        f"{setting} = {render.duration(millis / 1000)}: a transaction left idle that long is "
        "ended, and its row locks released"
    )
    return Finding("idle_tx_timeout", "ok", detail)


def _durability_finding(facts: PostgresFacts) -> Finding:
    fsync = facts.settings.get("fsync")
    commit = facts.settings.get("synchronous_commit")
    if fsync == "off":
        detail = (
            "fsync is off: a crash of the server can lose or corrupt committed records, "
            "and the duplicates of lost completions run the body again"
        )
        return Finding("durability", "warn", detail, "fsync = on in postgresql.conf")
    if commit == "off":
        detail = (
            "synchronous_commit is off: a crash of the server loses the last commits "
            "(up to 3 x wal_writer_delay), and the duplicates of those completions run "
            "the body again"
        )
        fix = f"ALTER ROLE {facts.user or '<role>'} SET synchronous_commit = on"
        return Finding("durability", "warn", detail, fix)
    if fsync is None or commit is None:
        return Finding("durability", "warn", "fsync or synchronous_commit is not readable")
    return Finding("durability", "ok", f"fsync on, synchronous_commit {commit}")


def judge_postgres(facts: PostgresFacts, expected: Schema) -> list[Finding]:
    """Findings for a reachable PostgreSQL database's facts."""
    findings = [
        Finding(
            "reachable",
            "ok",
            f"{facts.url} (PostgreSQL {facts.server_version}, role {facts.user!r}) answered "
            f"in {render.duration(facts.round_trip)}",
        ),
        _schema_finding(facts, expected),
    ]
    if RECORDS in facts.tables:
        findings.append(_functions_finding(facts, expected))
        findings.append(_indexes_finding(facts, expected))
    privileges = _privileges_finding(facts)
    if privileges is not None:
        findings.append(privileges)
    findings.append(_writable_finding(facts))
    findings.append(_idle_finding(facts))
    findings.append(_durability_finding(facts))
    findings.append(
        clock_finding(
            "PostgreSQL",
            server_time=facts.server_time,
            local_time=facts.local_time,
            round_trip=facts.round_trip,
            clock="clock_timestamp()",
        )
    )
    return findings
