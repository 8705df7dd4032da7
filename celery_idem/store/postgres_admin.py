"""The PostgreSQL store's schema (migrate, drop, purge) and operators' tools.

The schema is ``sql/schema.sql``, one file: :func:`migration_statements` splits it for
``celery idem migrate`` (:func:`migrate`) and for the Django app's ``RunSQL``, so both
apply the same statements. :class:`PostgresAdmin` is the
:class:`~celery_idem.store.base.StoreAdmin` protocol on PostgreSQL (a record as it
stands, forgetting it, listing keys, summaries and sizes, server facts for ``doctor``);
``PostgresStore`` is one, on the same pool as its hot path. Every record function is in
the schema; this module turns their rows into the protocol's types.

Expired rows are not deleted by the server (PostgreSQL has no key expiry): every
function treats them as absent and the next claim of the key reuses the row;
:func:`purge` deletes them in short batches (from a cron job, or the CLI).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from importlib import resources
from typing import Any

from celery_idem.exceptions import IdempotencyConfigError, IdempotencyError
from celery_idem.store.base import ForgetResult, RecordSummary, ServerFacts, Stored, StoredRecord
from celery_idem.store.memory_admin import glob_regex
from celery_idem.store.postgres_base import (
    SCHEMA_VERSION,
    PostgresBase,
    check_schema,
    cursor_key,
    psycopg_module,
    scan_cursor,
    schema_version,
)
from celery_idem.store.record import RecordState, decode_steps

__all__ = [
    "SCHEMA_VERSION",
    "STATEMENT_MARKER",
    "PostgresAdmin",
    "check_schema",
    "drop_statements",
    "glob_prefix",
    "migrate",
    "migration_statements",
    "prefix_end",
    "purge",
]

STATEMENT_MARKER = "-- ;;"
"""The line that ends each statement of ``schema.sql`` (function bodies hold ``;``)."""

_MIGRATION_LOCK = 0x1DE3_5C4E
"""The advisory lock two concurrent migrations take in turn (DDL racing DDL fails)."""

_CONFIG_FACTS = (
    "synchronous_commit", "fsync", "full_page_writes", "default_transaction_isolation",
    "max_connections", "statement_timeout", "idle_session_timeout",
)  # fmt: skip
_FACTS_SQL = ", ".join(
    [
        "SELECT extract(epoch FROM clock_timestamp())::float8",
        "current_setting('server_version')",
        "current_setting('server_version_num')",
        "pg_is_in_recovery()",
        "current_database()",
        "current_user",
        "(SELECT max(version) FROM celery_idem_schema)",
        *(f"current_setting('{name}', true)" for name in _CONFIG_FACTS),
    ]
)
"""What ``server_facts`` reads, in one statement: clock, version, role, settings."""


def _schema_text() -> str:
    return (
        resources.files("celery_idem.store")
        .joinpath("sql")
        .joinpath("schema.sql")
        .read_text("utf-8")
    )


def migration_statements() -> list[str]:
    """The DDL statements of ``schema.sql``, in order, each runnable on its own.

    No psql meta-commands and no ``%`` (a driver that interpolates parameters leaves
    them alone); each is idempotent, so running them all again is harmless.
    """
    chunks: list[list[str]] = [[]]
    for line in _schema_text().splitlines():
        if line.strip() == STATEMENT_MARKER:
            chunks.append([])
        else:
            chunks[-1].append(line)
    statements = ["\n".join(lines).strip() for lines in chunks]
    return [s for s in statements if any(_is_sql(line) for line in s.splitlines())]


def _is_sql(line: str) -> bool:
    text = line.strip()
    return bool(text) and not text.startswith("--")


def drop_statements() -> list[str]:
    """Statements that remove the schema, records included (functions, then tables)."""
    functions = re.findall(r"CREATE OR REPLACE FUNCTION (\w+)\(", _schema_text())
    tables = re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", _schema_text())
    return [
        *(f"DROP FUNCTION IF EXISTS {name}" for name in reversed(functions)),
        *(f"DROP TABLE IF EXISTS {name}" for name in reversed(tables)),
    ]


def migrate(url: str) -> str:
    """Create or upgrade the schema in the database of ``url``, in one transaction.

    Returns:
        One line saying what was done (created / already at version N / upgraded).

    Raises:
        IdempotencyConfigError: Not a PostgreSQL URL, psycopg missing, or a schema newer
            than this celery-idem knows (nothing is changed).
        StoreUnavailable: The database could not be reached.
        IdempotencyError: PostgreSQL refused a statement (permissions?); nothing changed.
    """
    base = PostgresBase(url)
    psycopg = psycopg_module()
    try:
        conn = base.connect(autocommit=False)
    except psycopg.Error as exc:
        raise base.error_for(None, exc, command="migrate (connect)") from exc
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            where = f"database {conn.info.dbname!r} at {base.url}"
            version, missing = schema_version(conn)
            before = None if missing else version
            if before is not None and before > SCHEMA_VERSION:
                raise IdempotencyConfigError(
                    f"the celery-idem schema in {where} is at version {before}, newer than "
                    f"the version {SCHEMA_VERSION} this celery-idem knows: nothing was "
                    f"changed. Upgrade celery-idem where you migrate from."
                )
            for statement in migration_statements():
                conn.execute(statement)
    except psycopg.Error as exc:
        raise base.error_for(None, exc, command="migrate") from exc
    finally:
        conn.close()
    if before is None:
        return f"created the celery-idem schema (version {SCHEMA_VERSION}) in {where}"
    if before == SCHEMA_VERSION:
        return (
            f"the celery-idem schema in {where} is already at version {SCHEMA_VERSION} "
            f"(functions refreshed)"
        )
    return f"upgraded the celery-idem schema in {where} from version {before} to {SCHEMA_VERSION}"


def purge(store_or_url: PostgresBase | str, *, batch: int = 1000) -> int:
    """Delete expired records in batches of ``batch``, each in its own short transaction.

    Until none is left (a row some transaction holds is skipped: a claim reusing it).
    Rows only count as expired for the functions, so purging is housekeeping, never
    needed for correctness.

    Returns:
        How many rows were deleted.

    Raises:
        ValueError: ``batch`` is below 1.
        StoreUnavailable, IdempotencyConfigError, IdempotencyError: As any statement.
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, not {batch}")
    own = not isinstance(store_or_url, PostgresBase)
    base = PostgresBase(store_or_url) if isinstance(store_or_url, str) else store_or_url
    total = 0
    try:
        while True:
            ((deleted,),) = base.call(
                None, "SELECT celery_idem_purge(%s::integer)", (batch,), command="purge"
            )
            total += int(deleted)
            if deleted < batch:
                return total
    finally:
        if own:
            base.close()


def _seconds(ms: Any) -> float | None:
    return None if ms is None else int(ms) / 1000.0


def glob_prefix(match: str) -> str:
    """The part of a glob before its first wildcard, escapes resolved: a listing's range."""
    out: list[str] = []
    i = 0
    while i < len(match):
        ch = match[i]
        if ch in "*?[":
            break
        if ch == "\\":
            if i + 1 == len(match):
                break
            ch = match[i + 1]
            i += 1
        out.append(ch)
        i += 1
    return "".join(out)


def prefix_end(prefix: str) -> str | None:
    """The least string above every string starting with ``prefix`` (None: none)."""
    chars = list(prefix)
    while chars:
        code = ord(chars[-1]) + 1
        if code <= 0x10FFFF:
            chars[-1] = chr(0xE000 if 0xD800 <= code <= 0xDFFF else code)
            return "".join(chars)
        chars.pop()
    return None


class PostgresAdmin(PostgresBase):
    """A :class:`~celery_idem.store.base.StoreAdmin` on PostgreSQL.

    ``PostgresStore`` is one, on the same pool as its hot path; see
    :class:`~celery_idem.store.postgres_base.PostgresBase` for the arguments.
    """

    def read(self, key: str) -> StoredRecord | None:
        """See :meth:`celery_idem.store.base.StoreAdmin.read` and ``celery_idem_read``."""
        rows = self.call(key, "SELECT * FROM celery_idem_read(%s::text)", (key,))
        if not rows:
            return None
        (state, fence, task_id, fingerprint, lease_left_ms, ttl_ms, parked, takeovers,
         _pending, codec, payload, steps, step_count) = rows[0]  # fmt: skip
        found = RecordState.of(state)
        kind = found.kind if found else None
        try:
            held = () if kind else decode_steps(bytes(steps))
        except ValueError as exc:
            raise IdempotencyError(
                f"record {key!r} in the idempotency store at {self.url} holds durable "
                f"steps that cannot be read ({exc})",
                key=key,
            ) from exc
        return StoredRecord(
            state=state,
            fence=int(fence),
            task_id=task_id,
            fingerprint=fingerprint,
            lease_left=_seconds(lease_left_ms),
            ttl=_seconds(ttl_ms),
            stored=Stored(kind, bytes(payload), codec) if kind else None,
            parked=bool(parked),
            takeovers=int(takeovers),
            steps=held,
            steps_done=int(step_count) if kind else 0,
        )

    def forget(self, key: str) -> bool:
        """See :meth:`celery_idem.store.base.StoreAdmin.forget` (a forced forget_if)."""
        return self.forget_if(key, force=True) is ForgetResult.DELETED

    def forget_if(self, key: str, *, fence: int | None = None, force: bool = False) -> ForgetResult:
        """See :meth:`celery_idem.store.base.StoreAdmin.forget_if` and ``celery_idem_forget``.

        Every row is a record here, so :attr:`ForgetResult.NOT_A_RECORD` never comes.
        """
        ((code, _fence),) = self.call(
            key, "SELECT * FROM celery_idem_forget(%s::text, %s::bigint, %s::boolean)",
            (key, fence, force),
        )  # fmt: skip
        return ForgetResult(int(code))

    def scan(self, match: str, *, cursor: int = 0, count: int = 500) -> tuple[int, list[str]]:
        """See :meth:`celery_idem.store.base.StoreAdmin.scan`: keyset steps in byte order.

        Each step reads up to ``count`` keys after the cursor's (the primary key's order:
        a key present throughout comes exactly once), within the range of the glob's
        literal prefix, and returns those the whole glob matches (Redis' ``MATCH``
        syntax, as the memory store reads it). The cursor encodes the last key read.
        """
        pattern = glob_regex(match)
        prefix = glob_prefix(match)
        try:
            after = cursor_key(cursor)
        except (ValueError, OverflowError) as exc:
            raise IdempotencyError(f"scan of {self.url}: {exc}") from exc
        count = max(1, count)
        rows = self.call(
            None,
            "SELECT * FROM celery_idem_keys(%s::text, %s::text, %s::text, %s::integer)",
            (after, prefix, prefix_end(prefix), count),
            command=f"a listing of {match!r}",
        )
        keys = [str(row[0]) for row in rows]
        next_cursor = scan_cursor(keys[-1]) if len(keys) == count else 0
        return next_cursor, [key for key in keys if pattern.fullmatch(key)]

    def summarize(self, keys: Sequence[str]) -> list[RecordSummary | None]:
        """See :meth:`celery_idem.store.base.StoreAdmin.summarize`: one round trip."""
        if not keys:
            return []
        rows = self.call(keys[0], "SELECT * FROM celery_idem_summary(%s::text[])", (list(keys),))
        found: dict[str, RecordSummary] = {}
        for key, state, fence, task_id, parked, lease_ms, ttl_ms, size, codec, takeovers in rows:
            found[key] = RecordSummary(
                key=key, state=state, fence=int(fence), task_id=task_id, parked=bool(parked),
                lease_left=_seconds(lease_ms), ttl=_seconds(ttl_ms),
                payload_bytes=int(size), codec=codec, takeovers=int(takeovers),
            )  # fmt: skip
        return [found.get(key) for key in keys]

    def memory_usage(self, keys: Sequence[str]) -> list[int | None]:
        """Bytes each row takes (``pg_column_size``, payload included), None when absent."""
        if not keys:
            return []
        rows = self.call(keys[0], "SELECT * FROM celery_idem_sizes(%s::text[])", (list(keys),))
        sizes = {key: int(size) for key, size in rows}
        return [sizes.get(key) for key in keys]

    def server_facts(self) -> ServerFacts:
        """See :meth:`celery_idem.store.base.StoreAdmin.server_facts` (``kind="postgres"``).

        ``info``: the server's version, its role (``primary``, or ``standby`` in
        recovery), the database, the user and the schema version; ``config``: the
        settings that decide durability and time-outs (None where hidden).
        """
        before = time.time()
        ((now, version, version_num, standby, database, user, schema, *config),) = self.call(
            None, _FACTS_SQL, (), command="server facts"
        )
        after = time.time()
        return ServerFacts(
            kind="postgres",
            url=self.url,
            info={
                "server_version": str(version),
                "server_version_num": str(version_num),
                "role": "standby" if standby else "primary",
                "database": str(database),
                "user": str(user),
                "schema_version": str(schema),
            },
            config=dict(zip(_CONFIG_FACTS, config, strict=True)),
            server_time=float(now),
            local_time=(before + after) / 2,
            round_trip=after - before,
        )

    def probe(self, timeout: float) -> None:
        """See :meth:`celery_idem.store.base.StoreAdmin.probe`: connect, check the schema.

        On a connection of its own (``timeout`` to connect, libpq's 2 s at least, and as
        the statement timeout); the schema check is the store's first-use one.

        Raises:
            StoreUnavailable: Not reachable in time.
            IdempotencyConfigError: The schema is missing or older than this celery-idem.
        """
        psycopg = psycopg_module()
        try:
            conn = self.connect(connect_timeout=max(1, math.ceil(timeout)))
        except psycopg.Error as exc:
            raise self.unavailable(None, exc, command="connect") from exc
        try:
            statement_ms = str(max(1, int(timeout * 1000)))
            conn.execute("SELECT set_config('statement_timeout', %s, false)", (statement_ms,))
            check_schema(conn, self.url)
            self._schema_checked = True
        except psycopg.Error as exc:
            raise self.error_for(None, exc, command="a probe") from exc
        finally:
            conn.close()

    def eviction_policy(self) -> str | None:
        """None: PostgreSQL evicts nothing (expired rows wait for :func:`purge`)."""
        return None

    def replica_count(self) -> int | None:
        """Standbys streaming from this server (``pg_stat_replication``), None if unknown."""
        try:
            ((count,),) = self.call(
                None, "SELECT count(*) FROM pg_stat_replication", (), command="replicas"
            )
        except IdempotencyError:
            return None
        return int(count)
