"""``celery idem doctor`` on the PostgreSQL store, the reading: is this database fit?

:func:`gather` reads the facts over one short connection of its own, read-only
(catalog queries and ``pg_settings``; nothing is written), :func:`schema` what this
celery-idem's schema creates (from the statements ``migrate`` runs), and
:func:`examine` also asks the store's own start-up check (``probe``) whether it accepts
the schema, then hands everything to the pure
:func:`~celery_idem.cli.postgres_judge.judge_postgres`, whose module lists the checks.
"""

from __future__ import annotations

import re
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from celery_idem.cli.findings import Finding
from celery_idem.cli.postgres_judge import (
    RECORDS,
    SETTINGS,
    VERSIONS,
    IndexFact,
    PostgresFacts,
    Schema,
    judge_postgres,
)
from celery_idem.exceptions import IdempotencyConfigError, IdempotencyError

if TYPE_CHECKING:
    from celery_idem.cli.context import Target

__all__ = ["CONNECT_TIMEOUT", "examine", "gather", "schema"]

CONNECT_TIMEOUT = 5
"""Seconds ``doctor`` waits for a connection (unless the URL sets ``connect_timeout``)."""

_FUNCTION = re.compile(r"CREATE\s+(?:OR\s+REPLACE\s+)?FUNCTION\s+([\w.]+)\s*\(", re.I)
_INDEX = re.compile(
    r"CREATE\s+(?:UNIQUE\s+)?INDEX\s+(?:CONCURRENTLY\s+)?(?:IF\s+NOT\s+EXISTS\s+)?(\w+)\s+"
    r"ON\s+(?:ONLY\s+)?([\w.]+)\s*(?:USING\s+\w+\s*)?\(([^)]*)\)",
    re.I,
)


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
            "SELECT name, setting, unit FROM pg_settings WHERE name = ANY(%s)", (list(SETTINGS),)
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
