"""The user's database connections that ``idem_atomic()`` and ``step(atomic=...)`` run in.

A task body writes through its own connection: a psycopg 3 ``Connection``, a SQLAlchemy
``Connection`` or ``Session`` (a ``scoped_session`` too), or Django's ORM on one of its
database aliases. :func:`target_for` recognises which one it was given, by the classes
of the libraries already imported (a connection of a library that was never imported
cannot exist, so none of them is imported here: all three stay optional), and wraps it
in a :class:`Target` that opens the transaction and runs one statement in it.

Every :class:`Target` opens the *outermost* transaction, so that leaving the block
commits it: a connection already inside a transaction is refused (its commit would be
someone else's, later or never), as Django's ``atomic(durable=True)`` refuses a nested
block (and, like it, allows the transaction a ``TestCase`` wraps each test in).

:func:`check_database` refuses a connection to another database than the records'
one. The token fence alone would keep that safe (the completion would match no row, or
find no table), but as a ``LeaseLost`` or an SQL error that hides the real mistake.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from celery_idem.exceptions import IdempotencyError

__all__ = [
    "IDENTITY_SQL",
    "SNAPSHOT_LEVELS",
    "DjangoTarget",
    "PsycopgTarget",
    "Refusal",
    "SessionTarget",
    "SqlAlchemyTarget",
    "Target",
    "check_database",
    "isolation_of",
    "store_identity",
    "target_for",
]

IDENTITY_SQL = (
    "SELECT current_database(), extract(epoch FROM pg_postmaster_start_time())::text, "
    "current_setting('default_transaction_isolation')"
)
"""Which database of which server a session is on, and its default isolation level.
The start time tells two servers apart whatever address each side used to reach it (a
socket, an IP, a pooler), and, as epoch text, reads the same in sessions of any
``TimeZone`` and through any driver."""

Refusal = Callable[[str], IdempotencyError]
"""Builds the error for a refused connection (naming the task and key) from its text."""


class Target:
    """A connection to run one transaction on, whatever library it comes from.

    Attributes:
        handle: What the body writes through (``done.connection``): the connection
            or session it passed, or Django's connection for the alias.
        describe: How messages name it (``"psycopg connection"``, ...).
    """

    handle: Any
    describe: str

    def transaction(self, refuse: Refusal) -> contextlib.AbstractContextManager[Any]:
        """The outermost transaction: commits on leaving, rolls back on an exception."""
        raise NotImplementedError

    def rows(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Run ``sql`` (``%s`` placeholders) in the open transaction; its rows."""
        raise NotImplementedError

    def dbapi(self) -> Any:
        """The driver's own connection under it (what :func:`check_database` caches)."""
        raise NotImplementedError


class PsycopgTarget(Target):
    """A psycopg 3 ``Connection`` (autocommit or not); ``conn.transaction()``."""

    describe = "psycopg connection"

    def __init__(self, conn: Any) -> None:
        self.handle = conn

    def transaction(self, refuse: Refusal) -> contextlib.AbstractContextManager[Any]:
        """``conn.transaction()``, on a connection with no transaction open."""
        conn = self.handle
        if conn.closed:
            raise refuse("was given a closed psycopg connection")
        status = conn.info.transaction_status.name
        if status != "IDLE":
            raise refuse(
                f"was given a psycopg connection that is not idle (transaction status "
                f"{status}): a query of the body began a transaction (a connection "
                f"without autocommit begins one on its first statement), or a "
                f"conn.transaction() block is open. idem_atomic() must begin and commit "
                f"the transaction itself: conn.commit() or conn.rollback() first, or use "
                f"an autocommit connection (psycopg.connect(..., autocommit=True))"
            )
        return conn.transaction()  # type: ignore[no-any-return]

    def rows(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """``conn.execute()``: the statement goes through the body's own connection."""
        return list(self.handle.execute(sql, params or None).fetchall())

    def dbapi(self) -> Any:
        """The connection itself."""
        return self.handle


class SqlAlchemyTarget(Target):
    """A SQLAlchemy ``Connection``; ``conn.begin()``, statements by ``exec_driver_sql``.

    ``any_vendor``: any database (the in-memory test store's stand-in writes no record).
    """

    describe = "SQLAlchemy Connection"

    def __init__(self, conn: Any, any_vendor: bool = False) -> None:
        self.handle, self.any_vendor = conn, any_vendor

    def connection(self) -> Any:
        """The SQLAlchemy ``Connection`` the statements go through."""
        return self.handle

    def check_dialect(self, dialect: Any, refuse: Refusal) -> None:
        """PostgreSQL, through a driver taking ``%s`` placeholders (psycopg, psycopg2, pg8000)."""
        if self.any_vendor:
            return
        if dialect.name != "postgresql":
            raise refuse(f"was given a {self.describe} to {dialect.name}, not PostgreSQL")
        if dialect.paramstyle not in {"format", "pyformat"}:
            raise refuse(
                f"was given a {self.describe} whose driver {dialect.driver!r} takes "
                f"{dialect.paramstyle!r} parameters; use psycopg (postgresql+psycopg://)"
            )

    def transaction(self, refuse: Refusal) -> contextlib.AbstractContextManager[Any]:
        """``conn.begin()``, on a connection with no transaction begun."""
        conn = self.handle
        if conn.closed:
            raise refuse("was given a closed SQLAlchemy Connection")
        self.check_dialect(conn.dialect, refuse)
        if conn.in_transaction():
            raise refuse(
                "was given a SQLAlchemy Connection already in a transaction (a statement "
                "autobegins one, as does conn.begin()): idem_atomic() must begin and "
                "commit it itself. conn.commit() or conn.rollback() first, or pass a "
                "connection fresh from engine.connect()"
            )
        return conn.begin()  # type: ignore[no-any-return]

    def rows(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """``exec_driver_sql()``: the SQL goes to the driver as it is, ``%s`` and all."""
        result = self.connection().exec_driver_sql(sql, params or None)
        return [tuple(row) for row in result.fetchall()]

    def dbapi(self) -> Any:
        """The driver's connection the pool lent the SQLAlchemy connection."""
        return self.connection().connection.dbapi_connection


class SessionTarget(SqlAlchemyTarget):
    """A SQLAlchemy ``Session``: ``session.begin()``; flushed before the fenced statement."""

    describe = "SQLAlchemy Session"

    def connection(self) -> Any:
        """The session's connection (of its default bind) in the open transaction."""
        return self.handle.connection()

    def transaction(self, refuse: Refusal) -> contextlib.AbstractContextManager[Any]:
        """``session.begin()``, on a session with no transaction begun."""
        session = self.handle
        self.check_dialect(session.get_bind().dialect, refuse)
        if session.in_transaction():
            raise refuse(
                "was given a SQLAlchemy Session already in a transaction (a query "
                "autobegins one, as does session.begin()): idem_atomic() must begin and "
                "commit it itself. session.commit() or session.rollback() first, or pass "
                "a new Session"
            )
        return session.begin()  # type: ignore[no-any-return]

    def rows(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Flush the ORM's pending writes, then run the statement.

        A flush that fails then fails the block before its completion is written (the
        commit would flush them after it), and the completion is the last statement.
        """
        self.handle.flush()
        return super().rows(sql, params)


class DjangoTarget(Target):
    """One of Django's database aliases: ``transaction.atomic(using=alias, durable=True)``."""

    def __init__(self, alias: str, refuse: Refusal, any_vendor: bool = False) -> None:
        try:  # Django is optional (and ships no type hints): imported by name, here
            settings = importlib.import_module("django.conf").settings
            db = importlib.import_module("django.db")
        except ImportError as exc:
            raise refuse(
                f"opens a Django transaction when no connection is passed, and Django "
                f"cannot be imported ({exc}): pass the connection the body writes "
                f"through, a psycopg 3 Connection or a SQLAlchemy Connection or Session"
            ) from exc
        if not settings.configured:
            raise refuse(
                "opens a Django transaction when no connection is passed, and Django's "
                "settings are not configured in this worker (set DJANGO_SETTINGS_MODULE "
                "and call django.setup() where the Celery app is created), or pass the "
                "connection the body writes through (psycopg 3, SQLAlchemy)"
            )
        try:
            connection = db.connections[alias]
        except db.utils.ConnectionDoesNotExist as exc:
            raise refuse(f"was given the Django database alias {alias!r}, which "
                         f"settings.DATABASES does not define") from exc  # fmt: skip
        if connection.vendor != "postgresql" and not any_vendor:
            raise refuse(
                f"was given the Django database {alias!r}, which is {connection.vendor}, "
                f"not PostgreSQL"
            )
        self.alias, self.handle, self.atomic = alias, connection, db.transaction.atomic
        self.describe = f"Django database {alias!r}"

    @contextlib.contextmanager
    def transaction(self, refuse: Refusal) -> Iterator[Any]:
        """``atomic(durable=True)``: refused inside another atomic block of the body."""
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(self.atomic(using=self.alias, durable=True))
            except RuntimeError as exc:  # durable: nested in an atomic block of the body
                raise refuse(
                    f"was called inside a transaction.atomic() block on the Django "
                    f"database {self.alias!r}: idem_atomic() must be the outermost "
                    f"block, so that leaving it commits ({exc}). Move the outer block "
                    f"inside, or drop it"
                ) from exc
            yield self.handle

    def rows(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """On a cursor of the alias's connection, the one the ORM writes through."""
        with self.handle.cursor() as cursor:
            cursor.execute(sql, params or None)
            return [tuple(row) for row in cursor.fetchall()]

    def dbapi(self) -> Any:
        """The driver's connection under Django's (open once the block is)."""
        return self.handle.connection


def target_for(
    conn: Any, using: str | None, refuse: Refusal, *, any_vendor: bool = False
) -> Target:
    """The :class:`Target` for ``conn``, or Django's alias ``using`` when ``conn`` is None.

    ``any_vendor``: not only PostgreSQL (for the in-memory test store's ``standin.py``).

    Raises:
        IdempotencyError: (built by ``refuse``) Not a connection it can use.
    """
    if conn is None or isinstance(conn, str):
        if isinstance(conn, str) and using is not None:
            raise refuse(f"was given both the Django alias {conn!r} and using={using!r}")
        return DjangoTarget(using or conn or "default", refuse, any_vendor)
    if using is not None:
        raise refuse("was given using= (a Django alias) together with a connection: pass one")
    module = type(conn).__module__.split(".", 1)[0]
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None and isinstance(conn, psycopg.Connection):
        return PsycopgTarget(conn)
    if psycopg is not None and isinstance(conn, psycopg.AsyncConnection):
        raise refuse("was given an async psycopg connection: a task body is synchronous; "
                     "pass a psycopg.Connection")  # fmt: skip
    engine, orm = sys.modules.get("sqlalchemy.engine"), sys.modules.get("sqlalchemy.orm")
    if engine is not None and isinstance(conn, engine.Connection):
        return SqlAlchemyTarget(conn, any_vendor)
    if orm is not None and isinstance(conn, orm.scoped_session):
        return SessionTarget(conn(), any_vendor)  # this thread's session, as the body's
    if orm is not None and isinstance(conn, orm.Session):
        return SessionTarget(conn, any_vendor)
    if engine is not None and isinstance(conn, engine.Engine):
        raise refuse(
            "was given a SQLAlchemy Engine: pass a connection the body writes through "
            "(with engine.connect() as conn: with self.idem_atomic(conn) as done: ...) or "
            "a Session"
        )
    base = sys.modules.get("django.db.backends.base.base")
    if base is not None and isinstance(conn, base.BaseDatabaseWrapper):
        return DjangoTarget(conn.alias, refuse, any_vendor)
    raise refuse(
        f"was given {type(conn).__qualname__} (from {module}), which is not a psycopg 3 "
        f"Connection, a SQLAlchemy Connection or Session, or a Django database alias"
    )


SNAPSHOT_LEVELS = frozenset({"repeatable read", "serializable"})
"""Isolation levels whose transaction fails to lock a row that another transaction
changed after its snapshot: a lease renewal committed during the block would make the
fenced statement fail with a serialization failure (SQLSTATE 40001)."""

_DRIVER_LEVELS = {
    "psycopg": {
        1: "read uncommitted",
        2: "read committed",
        3: "repeatable read",
        4: "serializable",
    },
    "psycopg2": {
        4: "read uncommitted",
        1: "read committed",
        2: "repeatable read",
        3: "serializable",
    },
}

_checked: weakref.WeakKeyDictionary[Any, tuple[str, str, str]] = weakref.WeakKeyDictionary()
"""Driver connections found on the records' database, with what ``IDENTITY_SQL`` said
(so each costs one identity query in its life, not one per block)."""
_store_identity: dict[tuple[int, str], tuple[str, str]] = {}


def store_identity(store: Any, *, again: bool = False) -> tuple[str, str]:
    """The records' database and server (``IDENTITY_SQL``), asked once per process.

    Through the PostgreSQL store's own pool (``PostgresBase.call``), as one statement
    of its own. ``again`` asks anew (the server may have restarted since).

    Raises:
        StoreUnavailable: The store could not be reached.
    """
    key = (os.getpid(), str(store.url))
    known = _store_identity.get(key)
    if known is None or again:
        rows = store.call(None, IDENTITY_SQL, (), command="which database holds the records")
        known = _store_identity[key] = (str(rows[0][0]), str(rows[0][1]))
    return known


def isolation_of(target: Target) -> str | None:
    """The isolation level the open transaction on ``target`` runs at, when known for free.

    The one the driver connection was set to (psycopg's and psycopg2's
    ``isolation_level``, which SQLAlchemy's ``isolation_level`` option and Django's
    ``OPTIONS["isolation_level"]`` set), else the server's default as the connection's
    first block read it; None before that. A ``SET TRANSACTION ISOLATION LEVEL`` run
    inside the block is not seen.
    """
    raw = target.dbapi()
    level = getattr(raw, "isolation_level", None)
    names = _DRIVER_LEVELS.get(type(raw).__module__.split(".", 1)[0])
    if level is not None and names is not None:
        return names.get(int(level))
    try:
        seen = _checked.get(raw)
    except TypeError:
        seen = None
    return None if seen is None else seen[2]


def check_database(target: Target, store: Any, refuse: Refusal) -> str:
    """Refuse ``target`` unless it is on the records' database (first use per connection).

    Runs inside the open transaction: the block's first statement, once in the life
    of each driver connection.

    Returns:
        The server's default isolation level for the connection's transactions.
    """
    raw = target.dbapi()
    try:
        seen = _checked.get(raw)
    except TypeError:  # a driver connection that takes no weak reference: not cached
        seen = None
    if seen is not None and seen[:2] == store_identity(store):
        return seen[2]
    rows = target.rows(IDENTITY_SQL, ())
    found = (str(rows[0][0]), str(rows[0][1]), str(rows[0][2]))
    records = store_identity(store)
    if found[:2] != records:  # or the server restarted since it was asked
        records = store_identity(store, again=True)
    if found[:2] != records:
        where = " of another server" if found[0] == records[0] else ""
        raise refuse(
            f"was given a {target.describe} to the database {found[0]!r}, and the "
            f"idempotency records live in {records[0]!r}{where}: "
            f"the completion must commit in the records' own database. Pass a "
            f"connection to the database idem_store_url names, or point idem_store_url "
            f"at the database the body writes to"
        )
    with contextlib.suppress(TypeError):
        _checked[raw] = found
    return found[2]
