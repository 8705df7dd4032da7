"""``celery idem doctor`` on the PostgreSQL store: is this database fit for the records?

:func:`gather` reads the facts over one short connection of its own, read-only
(catalog queries and ``pg_settings``; nothing is written), and asks the store's own
start-up check (``probe``) whether it accepts the schema. :func:`judge_postgres` is
pure: it turns :class:`PostgresFacts` into findings. The checks:

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
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from celery_idem.cli import render
from celery_idem.cli.findings import Finding, clock_finding
from celery_idem.exceptions import IdempotencyConfigError, IdempotencyError

if TYPE_CHECKING:
    from celery_idem.cli.context import Target

__all__ = [
    "RECOMMENDED_IDLE_TIMEOUT",
    "IndexFact",
    "PostgresFacts",
    "Schema",
    "examine",
    "gather",
    "judge_postgres",
    "schema",
]

RECORDS = "celery_idem_records"
"""The records' table."""
VERSIONS = "celery_idem_schema"
"""The table that holds the schema's version."""
EXPIRY_COLUMN = "expires_at"
"""The column ``purge`` walks (its index is the expiry index)."""
RECOMMENDED_IDLE_TIMEOUT = "60s"
"""What ``doctor`` suggests for ``idle_in_transaction_session_timeout``."""
CONNECT_TIMEOUT = 5
"""Seconds ``doctor`` waits for a connection (unless the URL sets ``connect_timeout``)."""

_SETTINGS = (
    "idle_in_transaction_session_timeout",
    "fsync",
    "synchronous_commit",
    "default_transaction_read_only",
)
"""The server settings the checks read (``pg_settings``: the values of this session)."""
_FUNCTION = re.compile(r"CREATE\s+(?:OR\s+REPLACE\s+)?FUNCTION\s+([\w.]+)\s*\(", re.I)
_INDEX = re.compile(
    r"CREATE\s+(?:UNIQUE\s+)?INDEX\s+(?:CONCURRENTLY\s+)?(?:IF\s+NOT\s+EXISTS\s+)?(\w+)\s+"
    r"ON\s+(?:ONLY\s+)?([\w.]+)\s*(?:USING\s+\w+\s*)?\(([^)]*)\)",
    re.I,
)


@dataclass(frozen=True)
class Schema:
    """What this celery-idem's schema creates (from ``migration_statements()``)."""

    version: int
    functions: frozenset[str]
    indexes: Mapping[str, tuple[str, ...]]
    """Index name -> its columns, for the indexes on the records' table."""


def schema() -> Schema:
    """The expected schema, read from the statements ``migrate`` runs.

    Raises:
        IdempotencyConfigError: psycopg is not installed.
    """
    from celery_idem.cli.maintenance import postgres_admin  # noqa: PLC0415 - psycopg: optional

    admin = postgres_admin()
    statements = "\n".join(admin.migration_statements())
    indexes = {
        name: tuple(column.strip().strip('"') for column in columns.split(","))
        for name, table, columns in _INDEX.findall(statements)
        if table.rsplit(".", 1)[-1] == RECORDS
    }
    return Schema(
        version=int(admin.SCHEMA_VERSION),
        functions=frozenset(name.rsplit(".", 1)[-1] for name in _FUNCTION.findall(statements)),
        indexes=indexes,
    )


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
        settings: ``pg_settings`` values of :data:`_SETTINGS` (with their unit).
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


_INDEXES = """
SELECT c.relname, ix.indisprimary, ix.indisunique, ix.indisvalid,
       array(SELECT a.attname::text
             FROM unnest(ix.indkey) WITH ORDINALITY AS k(attnum, n)
             JOIN pg_attribute a ON a.attrelid = ix.indrelid AND a.attnum = k.attnum
             ORDER BY k.n)
FROM pg_index ix JOIN pg_class c ON c.oid = ix.indexrelid
WHERE ix.indrelid = to_regclass(%s)
ORDER BY c.relname
"""
_FUNCTIONS = """
SELECT DISTINCT p.proname::text FROM pg_proc p
WHERE p.proname LIKE %s AND pg_function_is_visible(p.oid)
"""
_TABLE_PRIVILEGE = "has_table_privilege(%s, %s)"
_PRIVILEGES: dict[str, tuple[str, tuple[str, ...]]] = {
    f"{RECORDS}: SELECT, INSERT, UPDATE, DELETE": (
        # One privilege per call: given a list, has_table_privilege answers "any of them".
        "SELECT " + " AND ".join([_TABLE_PRIVILEGE] * 4),
        (RECORDS, "SELECT", RECORDS, "INSERT", RECORDS, "UPDATE", RECORDS, "DELETE"),
    ),
    f"{VERSIONS}: SELECT": (f"SELECT {_TABLE_PRIVILEGE}", (VERSIONS, "SELECT")),
}
_EXECUTE = """
SELECT coalesce(bool_and(has_function_privilege(p.oid, 'EXECUTE')), true) FROM pg_proc p
WHERE p.proname LIKE %s AND pg_function_is_visible(p.oid)
"""
_OURS = "celery\\_idem\\_%"
"""LIKE pattern of the schema's function names."""


def gather(url: str, display: str, *, timeout: float = CONNECT_TIMEOUT) -> PostgresFacts:
    """The facts of the database at ``url``, over one connection of its own.

    Raises:
        StoreUnavailable: psycopg could not connect, or a query failed.
        IdempotencyConfigError: psycopg is not installed.
    """
    try:
        import psycopg  # noqa: PLC0415 - optional dependency
    except ImportError as exc:
        raise IdempotencyConfigError(
            f"the PostgreSQL store needs psycopg 3 ({exc}): pip install 'celery-idem[postgres]'"
        ) from exc
    from celery_idem.exceptions import StoreUnavailable  # noqa: PLC0415

    options: dict[str, Any] = {"autocommit": True}
    if "connect_timeout" not in url:
        options["connect_timeout"] = max(1, round(timeout))
    try:
        with psycopg.connect(url, **options) as conn:
            return _read_facts(conn, display)
    except psycopg.Error as exc:
        raise StoreUnavailable(f"PostgreSQL at {display}: {type(exc).__name__}: {exc}") from exc


def _read_facts(conn: Any, display: str) -> PostgresFacts:
    """The catalog queries of :func:`gather`, on an open autocommit connection."""
    before = time.time()
    row = conn.execute(
        "SELECT extract(epoch FROM clock_timestamp())::float8, current_setting('server_version'),"
        " current_user::text, current_database()::text, pg_is_in_recovery()"
    ).fetchone()
    after = time.time()
    server_time, version, user, database, in_recovery = row
    found = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL, to_regclass(%s) IS NOT NULL", (RECORDS, VERSIONS)
    ).fetchone()
    tables = frozenset(
        name for name, there in zip((RECORDS, VERSIONS), found, strict=True) if there
    )
    schema_version = None
    if VERSIONS in tables:
        got = conn.execute(f"SELECT max(version) FROM {VERSIONS}").fetchone()  # noqa: S608
        schema_version = None if got is None or got[0] is None else int(got[0])
    indexes: tuple[IndexFact, ...] = ()
    if RECORDS in tables:
        indexes = tuple(
            IndexFact(name, tuple(columns), primary, unique, valid)
            for name, primary, unique, valid, columns in conn.execute(_INDEXES, (RECORDS,))
        )
    functions = frozenset(name for (name,) in conn.execute(_FUNCTIONS, (_OURS,)).fetchall())
    privileges: dict[str, bool] = {}
    for label, (query, params) in _PRIVILEGES.items():
        if label.split(":", 1)[0] in tables:
            privileges[label] = bool(conn.execute(query, params).fetchone()[0])
    if functions:
        privileges["EXECUTE on the celery_idem_* functions"] = bool(
            conn.execute(_EXECUTE, (_OURS,)).fetchone()[0]
        )
    settings = {
        name: f"{setting}{unit or ''}"
        for name, setting, unit in conn.execute(
            "SELECT name, setting, unit FROM pg_settings WHERE name = ANY(%s)", (list(_SETTINGS),)
        )
    }
    return PostgresFacts(
        url=display,
        user=user,
        database=database,
        server_version=version,
        server_time=float(server_time),
        local_time=(before + after) / 2,
        round_trip=after - before,
        tables=tables,
        schema_version=schema_version,
        indexes=indexes,
        functions=functions,
        privileges=privileges,
        settings=settings,
        in_recovery=bool(in_recovery),
    )


# --------------------------------------------------------------------------- judging

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


_UNREACHABLE_FIX = (
    "check idem_store_url (host, port, database, user, password, sslmode) and that "
    "PostgreSQL runs and accepts connections from this machine (listen_addresses, "
    "pg_hba.conf)"
)


def examine(target: Target, *, timeout: float = CONNECT_TIMEOUT) -> list[Finding]:
    """``doctor``'s findings for the PostgreSQL store of ``target``."""
    endpoint = target.settings.endpoint
    url = endpoint.url if endpoint is not None else None
    if not url:
        return [Finding("reachable", "fail", "no PostgreSQL URL", _UNREACHABLE_FIX)]
    try:
        expected = schema()
        facts = gather(url, target.url, timeout=timeout)
    except IdempotencyConfigError as exc:
        fix = "pip install 'celery-idem[postgres]' (or psycopg[binary])"
        return [Finding("reachable", "fail", str(exc), fix)]
    except IdempotencyError as exc:
        return [Finding("reachable", "fail", str(exc), _UNREACHABLE_FIX)]
    try:
        target.store.probe(timeout)
    except IdempotencyError as exc:
        facts = replace(facts, probe_error=str(exc))
    return judge_postgres(facts, expected)
