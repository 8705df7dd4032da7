"""What PostgresStore's two halves share: a URL, a tiny pool, what an error means.

``PostgresStore`` is its hot path (``postgres.py``) plus its operators' tools
(``postgres_admin.py``): both are a :class:`PostgresBase` on one pool of autocommit
connections. Each transition is one PL/pgSQL function of ``sql/schema.sql`` run as one
statement, so one round trip in its own transaction. This module owns which errors count
as an outage (:func:`is_outage`): an outage becomes
:class:`~celery_idem.exceptions.StoreUnavailable`, a missing or old schema
:class:`~celery_idem.exceptions.IdempotencyConfigError` (saying what to run), anything
else PostgreSQL refuses a permanent :class:`~celery_idem.exceptions.IdempotencyError`.

psycopg is an optional dependency (``pip install celery-idem[postgres]``): it is imported
when a store is built, never when this module is, so ``celery_idem`` imports without it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from celery_idem.endpoint import sanitize_url
from celery_idem.exceptions import IdempotencyConfigError, IdempotencyError, StoreUnavailable

if TYPE_CHECKING:
    import psycopg

    Connection = psycopg.Connection[tuple[Any, ...]]

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "MIGRATE_ADVICE",
    "OUTAGE_SQLSTATES",
    "SCHEMA_VERSION",
    "SCHEMES",
    "PostgresBase",
    "check_schema",
    "cursor_key",
    "display_url",
    "is_outage",
    "psycopg_module",
    "scan_cursor",
    "schema_version",
]

SCHEMA_VERSION = 1
"""The schema version this celery-idem needs (``sql/schema.sql`` writes it)."""

SCHEMES = frozenset({"postgresql", "postgres"})
DEFAULT_CONNECT_TIMEOUT = 5
LOCK_TIMEOUT_MS = 10_000
"""How long the store's statements wait for a key's row lock (``lock_timeout``) unless the
URL's ``options`` (or ``PGOPTIONS``) say otherwise: the lock is held from a completion
statement to its transaction's commit, normally microseconds."""
"""Seconds to connect when the URL (or ``PGCONNECT_TIMEOUT``) names none: a worker must
learn an outage in seconds, not in psycopg's default two minutes."""

MIGRATE_ADVICE = (
    "Run `celery -A proj idem migrate` (with Django: `python manage.py migrate celery_idem`)"
)

OUTAGE_SQLSTATES: Mapping[str, str] = MappingProxyType(
    {
        "08": "the connection failed",
        "53": "the server ran out of a resource (connections, memory or disk)",
        "57P01": "the server is shutting down (admin_shutdown)",
        "57P02": "the server crashed (crash_shutdown)",
        "57P03": "the server cannot accept connections now (starting up, or in recovery)",
        "57P05": "the server closed an idle session (idle_session_timeout)",
        "57014": "the statement was cancelled (statement_timeout)",
        "55P03": "a lock was not available in time (lock_timeout)",
        "40001": "a serialization failure",
        "40P01": "a deadlock was detected",
        "25006": "the server is read-only: a standby, or a failover demoted it",
        "25P03": "an idle transaction was terminated (idle_in_transaction_session_timeout)",
        "58000": "a system error on the server",
        "58030": "an I/O error on the server",
    }
)
"""SQLSTATEs (or their two-letter classes) that mean "not now" rather than "never".

An error without a SQLSTATE from psycopg's ``OperationalError`` or ``InterfaceError``
(the connection could not be made, or broke) is an outage too.
"""

_SCHEMA_SQLSTATES = frozenset({"42883", "42P01"})
"""undefined_function, undefined_table: the schema is missing (or was dropped)."""

STEP_GAP_SQLSTATE = "IDM01"
"""What ``celery_idem_step`` raises when a step's position skips one never stored."""


def psycopg_module() -> Any:
    """psycopg, imported on first use.

    Raises:
        IdempotencyConfigError: psycopg is not installed.
    """
    try:
        import psycopg  # noqa: PLC0415 - optional dependency, imported when needed
    except ImportError as exc:
        raise IdempotencyConfigError(
            "the PostgreSQL idempotency store needs psycopg 3, which is not installed: "
            "pip install 'celery-idem[postgres]' (or psycopg[binary])"
        ) from exc
    return psycopg


def display_url(url: str) -> str:
    """``url`` without its password (in the netloc or the query), for messages."""
    shown = sanitize_url(url)
    parts = urlsplit(shown)
    if "password" not in parts.query:
        return shown
    query = [(k, "**" if k == "password" else v) for k, v in parse_qsl(parts.query, True)]
    return parts._replace(query=urlencode(query, safe="*")).geturl()


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE psycopg read from the server for ``exc``, if any."""
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) else None


def outage_meaning(exc: BaseException) -> str | None:
    """What an outage SQLSTATE of ``exc`` means, or None when it has none of them."""
    state = sqlstate_of(exc)
    if state is None:
        return None
    return OUTAGE_SQLSTATES.get(state) or OUTAGE_SQLSTATES.get(state[:2])


def is_outage(exc: BaseException) -> bool:
    """True for an error that a moment later may be gone: under ``idem_on_store_error``.

    A connection that could not be made or broke (no SQLSTATE), or a SQLSTATE of
    :data:`OUTAGE_SQLSTATES`. Anything else PostgreSQL refuses would fail again.
    """
    psycopg = psycopg_module()
    if outage_meaning(exc) is not None:
        return True
    connection_level = isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))
    return connection_level and sqlstate_of(exc) is None


# A listing's (``scan``) cursor: the last key it read.


def scan_cursor(key: str) -> int:
    """A scan cursor naming the last key listed (never 0: a leading 1 byte)."""
    return int.from_bytes(b"\x01" + key.encode("utf-8"), "big")


def cursor_key(cursor: int) -> str:
    """The key a :func:`scan_cursor` names; ``""`` (before every key) for cursor 0."""
    if cursor == 0:
        return ""
    data = cursor.to_bytes((cursor.bit_length() + 7) // 8, "big")
    if data[:1] != b"\x01":
        raise ValueError(f"{cursor} is not a cursor this store handed out")
    return data[1:].decode("utf-8")


def _schema_error(where: str, problem: str) -> IdempotencyConfigError:
    return IdempotencyConfigError(
        f"the PostgreSQL idempotency store {where} {problem}. {MIGRATE_ADVICE} against "
        f"this database (it is idempotent) and start again."
    )


def schema_version(conn: Connection) -> tuple[int, tuple[str, ...]]:
    """The schema version in ``conn``'s database (0: none), and the tables it lacks.

    ``to_regclass`` first, so a missing table aborts nothing (a caller's transaction).
    """
    tables = ("celery_idem_records", "celery_idem_schema")
    row = conn.execute("SELECT to_regclass(%s) IS NULL, to_regclass(%s) IS NULL", tables).fetchone()
    missing = tuple(
        table for table, absent in zip(tables, row or (True, True), strict=True) if absent
    )
    if missing:
        return 0, missing
    found = conn.execute("SELECT max(version) FROM celery_idem_schema").fetchone()
    return (int(found[0]) if found and found[0] is not None else 0), ()


def check_schema(conn: Connection, url: str) -> int:
    """The schema version of ``conn``'s database; raises when it is missing or too old.

    Returns:
        The version found (at least :data:`SCHEMA_VERSION`; a newer one is accepted:
        the migration of a rolling upgrade may run before every worker is upgraded).

    Raises:
        IdempotencyConfigError: A table is missing, or the version is older than this
            celery-idem needs (the message says which database and what to run).
        psycopg.Error: The queries failed (the caller translates it).
    """
    version, missing = schema_version(conn)
    if not missing and version >= SCHEMA_VERSION:
        return version
    where = f"database {conn.info.dbname!r} at {url}"
    if missing:
        lacks = " and ".join(f"table {name}" for name in missing)
        raise _schema_error(where, f"has no {lacks} (no celery-idem schema)")
    raise _schema_error(
        where,
        f"has celery-idem schema version {version}, older than the version "
        f"{SCHEMA_VERSION} this celery-idem needs",
    )


class _Pool:
    """A few idle autocommit connections, shared by the threads of one process.

    Connections are taken for one statement and given back; there are as many as
    statements were ever in flight at once (idle ones beyond ``max_idle`` are closed).
    A fork starts with none: the parent's connections are dropped without closing them
    (psycopg does not end a connection from a process that did not open it, so the
    parent's sessions live on).
    """

    def __init__(self, connect: Callable[[], Connection], max_idle: int = 8) -> None:
        self._connect = connect
        self._max_idle = max_idle
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def take(self) -> tuple[Connection, bool]:
        """A connection, and whether it was idle here (it may have died since)."""
        with self._lock:
            if self._pid != os.getpid():
                self._idle, self._pid = [], os.getpid()
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed:
                    return conn, True
        return self._connect(), False

    def give(self, conn: Connection) -> None:
        """Back to the idle list (or closed: broken, surplus, or from another process)."""
        with self._lock:
            if self._pid == os.getpid() and not conn.closed and len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def clear(self) -> None:
        """Close every idle connection (after one died: the server may have restarted)."""
        with self._lock:
            idle, self._idle = self._idle, []
            if self._pid != os.getpid():
                return
        for conn in idle:
            conn.close()


class PostgresBase:
    """One database URL, its pool, and how a failed statement becomes an error.

    Args:
        url: ``postgresql://`` or ``postgres://`` URL (libpq's parameters may go in its
            query: ``sslmode``, ``connect_timeout``, ``options``, ...).
        max_idle: Idle connections kept per process.

    Raises:
        IdempotencyConfigError: Not a PostgreSQL URL, a URL libpq cannot parse, or
            psycopg is not installed.
    """

    def __init__(self, url: str, *, max_idle: int = 8) -> None:
        scheme = urlsplit(url).scheme.lower()
        self.url = display_url(url)
        if scheme not in SCHEMES:
            raise IdempotencyConfigError(
                f"{self.url!r} is not a PostgreSQL URL: the PostgreSQL store takes "
                f"'postgresql://user:password@host:5432/dbname'"
            )
        psycopg = psycopg_module()
        try:
            params = psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise IdempotencyConfigError(
                f"the PostgreSQL store URL {self.url!r} cannot be parsed: {exc}"
            ) from exc
        self._conninfo = url
        self._options: dict[str, Any] = {}
        if "connect_timeout" not in params and not os.environ.get("PGCONNECT_TIMEOUT"):
            self._options["connect_timeout"] = DEFAULT_CONNECT_TIMEOUT
        if "options" not in params and not os.environ.get("PGOPTIONS"):
            # A row left locked by a transaction that does not end must not hang a
            # worker: the call fails as an outage (55P03) and idem_on_store_error decides.
            self._options["options"] = f"-c lock_timeout={LOCK_TIMEOUT_MS}"
        if "application_name" not in params and not os.environ.get("PGAPPNAME"):
            self._options["application_name"] = "celery-idem"
        self._pool = _Pool(self.connect, max_idle)
        self._schema_checked = False

    def connect(self, **options: Any) -> Connection:
        """A new connection, autocommit unless ``options`` say otherwise, off the pool."""
        psycopg = psycopg_module()
        conn: Connection = psycopg.Connection.connect(
            self._conninfo, **{"autocommit": True, **self._options, **options}
        )
        return conn

    def close(self) -> None:
        """Close the idle connections (a later call opens new ones)."""
        self._pool.clear()

    def call(
        self, key: str | None, sql: str, params: Sequence[Any], *, command: str = ""
    ) -> list[tuple[Any, ...]]:
        """Run one statement in its own transaction; its rows, or the error it means.

        The first call of the store checks the schema first (:func:`check_schema`). A
        connection that was idle here and turns out dead (the server restarted, or
        closed an idle session) is replaced and the statement sent once more: every
        function is safe to run again for the same attempt, as every Lua script is.

        Raises:
            StoreUnavailable: An outage (:func:`is_outage`).
            IdempotencyConfigError: The schema is missing or older than this celery-idem.
            IdempotencyError: Anything else PostgreSQL refused.
        """
        psycopg = psycopg_module()
        for attempt in (1, 2):
            try:
                conn, reused = self._pool.take()
            except psycopg.Error as exc:
                raise self.error_for(key, exc, command=command) from exc
            try:
                if not self._schema_checked:
                    check_schema(conn, self.url)
                    self._schema_checked = True
                rows: list[tuple[Any, ...]] = conn.execute(sql, params).fetchall()
            except psycopg.Error as exc:
                broken = conn.closed
                self._pool.give(conn)
                if broken:
                    self._pool.clear()  # the others are likely dead too
                    if reused and attempt == 1:
                        continue
                raise self.error_for(key, exc, command=command) from exc
            except IdempotencyError:  # the schema check's verdict: the connection is fine
                self._pool.give(conn)
                raise
            except BaseException:
                conn.close()  # interrupted mid-statement: its state is unknown
                raise
            self._pool.give(conn)
            return rows
        raise AssertionError("unreachable")  # pragma: no cover

    def error_for(
        self, key: str | None, exc: BaseException, *, command: str = ""
    ) -> IdempotencyError:
        """An outage becomes StoreUnavailable, a missing schema a config error, else permanent."""
        if is_outage(exc):
            return self.unavailable(key, exc, command=command)
        where = f"record {key!r}" if key is not None else command or "a statement"
        cause = f"{type(exc).__name__}: {str(exc).strip().rstrip('.')}"
        if sqlstate_of(exc) in _SCHEMA_SQLSTATES:
            self._schema_checked = False
            return _schema_error(
                f"at {self.url}", f"failed on {where} ({cause}): its schema is missing or old"
            )
        return IdempotencyError(
            f"the idempotency store at {self.url} refused {where}: {cause}. Is another "
            f"application writing celery-idem's table, or was the schema changed by hand?",
            key=key,
        )

    def unavailable(
        self, key: str | None, exc: BaseException, *, command: str = ""
    ) -> StoreUnavailable:
        """The outage ``exc``, met on record ``key`` or on ``command``, as StoreUnavailable."""
        where = f"record {key!r}" if key is not None else command or "a statement"
        cause = f"{type(exc).__name__}: {str(exc).strip().rstrip('.')}"
        meaning = outage_meaning(exc)
        if meaning is not None:  # the server answered: reachability is not the question
            return StoreUnavailable(
                f"the idempotency store at {self.url} failed on {where}: PostgreSQL "
                f"answered SQLSTATE {sqlstate_of(exc)} ({meaning}): {cause}. Treated as "
                f"an outage: tasks follow idem_on_store_error until it passes.",
                key=key,
            )
        return StoreUnavailable(
            f"the idempotency store at {self.url} failed on {where}: {cause}. Check that "
            f"PostgreSQL is reachable and idem_store_url is right.",
            key=key,
        )
