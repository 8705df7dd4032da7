"""Tasks whose database writes commit with their key's completion (``self.idem_atomic``).

Their records live in PostgreSQL (``IDEM_TEST_ATOMIC_DB``) and each body writes an
``items`` row into that same database, through one of the four kinds of connection
``idem_atomic()`` takes (``VIAS``): psycopg 3, a SQLAlchemy ``Connection``, a SQLAlchemy
``Session`` (ORM), Django. The test process sends them eagerly (``apply``) or to a real
worker (``test_atomic.py``); both build this same app from the environment.

Counted from outside the library: rows in ``items``; ``points`` notes where a body got
to (on its own autocommit connection, so a rolled-back block keeps its points), and a
``holds`` row makes the body wait at that point until the test deletes it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import sqlalchemy as sa
from celery import Celery
from sqlalchemy import orm

from celery_idem import IdempotentTask
from celery_idem.keys import storage_key
from celery_idem.store import ClaimRequest
from tests.worker_settings import redelivering_worker

DB = os.environ.get("IDEM_TEST_ATOMIC_DB", "")
VIAS = ("psycopg", "sa_conn", "sa_session", "django")

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS items (id bigserial PRIMARY KEY, uid text NOT NULL, "
    "via text NOT NULL, fence bigint NOT NULL, what text NOT NULL DEFAULT 'row')",
    "CREATE TABLE IF NOT EXISTS points (uid text NOT NULL, name text NOT NULL, "
    "at timestamptz NOT NULL DEFAULT clock_timestamp())",
    "CREATE TABLE IF NOT EXISTS holds (uid text NOT NULL, name text NOT NULL)",
]
"""No unique constraint on ``items``: one row per key must come from the transaction."""

app = Celery(
    "idematomic",
    broker=os.environ.get("IDEM_TEST_ATOMIC_BROKER", "memory://"),
    backend=os.environ.get("IDEM_TEST_ATOMIC_BACKEND", "cache+memory://"),
)
app.conf.update(
    idem_store_url=DB or "postgresql://unset@127.0.0.1:1/unset",
    idem_lease=float(os.environ.get("IDEM_TEST_LEASE", "30")),
    **redelivering_worker(3600.0),
)


class Boom(Exception):
    """A failure inside the block: everything in it must roll back."""


class Base(orm.DeclarativeBase):
    """The ORM's view of ``items``, for the Session path."""


class Item(Base):
    """One row of ``items``."""

    __tablename__ = "items"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    uid: orm.Mapped[str]
    via: orm.Mapped[str]
    fence: orm.Mapped[int] = orm.mapped_column(sa.BigInteger)
    what: orm.Mapped[str] = orm.mapped_column(default="row")


# -- this process's connections (prefork children make their own) -----------------------

_cache: dict[tuple[int, str], Any] = {}


def psycopg_connection(**kwargs: Any) -> psycopg.Connection[Any]:
    """This process's psycopg connection to the test database (autocommit)."""
    key = (os.getpid(), "psycopg")
    conn = _cache.get(key)
    if conn is None or conn.closed:
        conn = _cache[key] = psycopg.connect(DB, autocommit=True, **kwargs)
    return conn  # type: ignore[no-any-return]


def engine() -> sa.Engine:
    """This process's SQLAlchemy engine on the test database (psycopg 3 driver)."""
    key = (os.getpid(), "engine")
    if key not in _cache:
        _cache[key] = sa.create_engine(DB.replace("postgresql://", "postgresql+psycopg://", 1))
    return _cache[key]  # type: ignore[no-any-return]


DJANGO_ALIAS = "idem_atomic"


def django_alias() -> str:
    """Django's alias on the test database: ``default`` when this configures Django.

    When something else configured Django first, the database is added under
    :data:`DJANGO_ALIAS` instead.
    """
    settings = importlib.import_module("django.conf").settings
    params = psycopg.conninfo.conninfo_to_dict(DB)
    database = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": params["dbname"],
        "USER": params.get("user", ""),
        "HOST": params.get("host", ""),
        "PORT": str(params.get("port", "")),
    }
    if not settings.configured:
        settings.configure(DATABASES={"default": database}, INSTALLED_APPS=[], USE_TZ=True)
        importlib.import_module("django").setup()
    connections = importlib.import_module("django.db").connections
    if connections.settings["default"]["NAME"] == database["NAME"]:
        return "default"
    if DJANGO_ALIAS not in connections.settings:
        default = dict(connections.settings["default"])
        both = connections.configure_settings({"default": default, DJANGO_ALIAS: database})
        connections.settings[DJANGO_ALIAS] = both[DJANGO_ALIAS]
    return DJANGO_ALIAS


@contextlib.contextmanager
def connection_for(via: str) -> Iterator[Any]:
    """What the body passes to ``idem_atomic()`` for ``via`` (None: Django's default)."""
    if via == "psycopg":
        yield psycopg_connection()
    elif via == "sa_conn":
        with engine().connect() as conn:
            yield conn
    elif via == "sa_session":
        with orm.Session(engine()) as session:
            yield session
    else:
        alias = django_alias()
        yield None if alias == "default" else alias


def atomic(task: IdempotentTask, via: str, conn: Any) -> Any:
    """``task.idem_atomic(...)`` as ``via`` opens it: Django with no argument when it can."""
    if via == "django":
        return task.idem_atomic() if conn is None else task.idem_atomic(using=conn)
    return task.idem_atomic(conn)


def insert(via: str, handle: Any, uid: str, fence: int, what: str = "row") -> None:
    """One ``items`` row, written through the block's own connection."""
    sql = "INSERT INTO items (uid, via, fence, what) VALUES (%s, %s, %s, %s)"
    if via == "psycopg":
        handle.execute(sql, (uid, via, fence, what))
    elif via == "sa_conn":
        handle.execute(
            sa.text("INSERT INTO items (uid, via, fence, what) VALUES (:u, :v, :f, :w)"),
            {"u": uid, "v": via, "f": fence, "w": what},
        )
    elif via == "sa_session":
        handle.add(Item(uid=uid, via=via, fence=fence, what=what))
    else:
        with handle.cursor() as cursor:
            cursor.execute(sql, (uid, via, fence, what))


# -- points and holds (each on its own autocommit connection) ---------------------------


def side(sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """One statement outside every block (a fresh autocommit connection)."""
    with psycopg.connect(DB, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


def point(uid: str, name: str) -> None:
    """Note that the body reached ``name``; wait there while a hold is set (60 s at most)."""
    side("INSERT INTO points (uid, name) VALUES (%s, %s)", (uid, name))
    deadline = time.monotonic() + 60.0
    while side("SELECT 1 FROM holds WHERE uid = %s AND name = %s", (uid, name)):
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)


def steal(task: IdempotentTask, key: str) -> None:
    """Another attempt takes the key over: forgotten, then claimed by another token.

    Through the store's own API, as a takeover after a lapsed lease would do it.
    """
    spec = task.idem_spec()
    store: Any = spec.store
    storage = storage_key(spec.settings.key_prefix, spec.scope, key)
    store.forget(storage)
    outcome = store.claim(
        ClaimRequest(storage, token="thief", task_id="thief", fingerprint="", lease=60.0, ttl=600.0)
    )
    assert outcome.state.name == "CLAIMED", outcome


# -- the tasks -------------------------------------------------------------------------


@app.task(base=IdempotentTask, bind=True, name="at.write")
def write(
    self: IdempotentTask, uid: str, via: str, fail: bool = False, lose: bool = False
) -> dict[str, Any]:
    """Insert one row and complete the key in one transaction.

    ``fail``: raise inside the block. ``lose``: another attempt takes the key over
    inside the block (after the insert), so the completion matches no row.
    """
    fence = self.idempotency_fence
    assert fence is not None
    with connection_for(via) as conn, atomic(self, via, conn) as done:
        insert(via, done.connection, uid, fence)
        point(uid, "inserted")
        if fail:
            raise Boom(f"inside the block of {uid}")
        if lose:
            assert self.idempotency_key is not None
            steal(self, self.idempotency_key)
        done.result = {"uid": uid, "via": via, "fence": fence}
    point(uid, "committed")
    return done.result  # type: ignore[no-any-return]


@app.task(base=IdempotentTask, bind=True, name="at.step")
def step(self: IdempotentTask, uid: str, via: str, fail_after: bool, lose: bool = False) -> Any:
    """A durable step whose row and value commit together; then, maybe, a failure.

    ``fail_after``: the first run fails after the step (the key is released with it),
    so the next run replays the step. ``lose``: the key is taken over inside the step.
    """
    fence = self.idempotency_fence or 0  # 0: a plain call, which claims nothing

    with connection_for(via) as conn:
        atomic_arg = conn if conn is not None else True
        handle = conn
        if via == "django":
            alias = django_alias()
            atomic_arg = True if alias == "default" else alias
            handle = importlib.import_module("django.db").connections[alias]

        def row() -> dict[str, Any]:
            insert(via, handle, uid, fence, what="step")
            point(uid, "step-ran")
            if lose:
                assert self.idempotency_key is not None
                steal(self, self.idempotency_key)
            return {"fence": fence, "key": self.step_key}

        value = self.step("row", row, atomic=atomic_arg)
    if (
        fail_after
        and len(side("SELECT 1 FROM points WHERE uid = %s AND name = 'after'", (uid,))) == 0
    ):
        point(uid, "after")
        raise Boom("after the step, on the first run")
    return {"step": value, "fence": fence}


@app.task(base=IdempotentTask, bind=True, name="at.misuse")
def misuse(self: IdempotentTask, uid: str, how: str, other_db: str = "") -> Any:
    """Uses ``idem_atomic()`` in a way it refuses (``how``)."""
    fence = self.idempotency_fence or 0
    conn = psycopg_connection()
    if how == "second-block":
        with self.idem_atomic(conn) as done:
            insert("psycopg", conn, uid, fence)
            done.result = "first"
        with self.idem_atomic(conn) as done:
            done.result = "second"
    elif how == "step-after":
        with self.idem_atomic(conn) as done:
            insert("psycopg", conn, uid, fence)
            done.result = "first"
        self.step("late", lambda: 1)
    elif how == "step-inside":
        with self.idem_atomic(conn) as done:
            self.step("inside", lambda: 1)
    elif how == "nested":
        with self.idem_atomic(conn), self.idem_atomic(conn):
            pass
    elif how == "other-db":
        with psycopg.connect(other_db, autocommit=True) as other, self.idem_atomic(other):
            insert("psycopg", other, uid, fence)
    elif how == "not-idle":
        with psycopg.connect(DB) as busy:  # no autocommit: the SELECT begins a transaction
            busy.execute("SELECT 1")
            with self.idem_atomic(busy):
                pass
    elif how == "django-nested":
        transaction = importlib.import_module("django.db").transaction
        alias = django_alias()
        with transaction.atomic(using=alias), self.idem_atomic(using=alias):
            pass
    elif how == "result-late":
        with self.idem_atomic(conn) as done:
            insert("psycopg", conn, uid, fence)
        done.result = "too late"
    elif how == "unencodable":
        with self.idem_atomic(conn) as done:
            insert("psycopg", conn, uid, fence)
            done.result = object()
    elif how == "returns-other":
        with self.idem_atomic(conn) as done:
            insert("psycopg", conn, uid, fence)
            done.result = {"stored": uid}
        return {"returned": "something else"}
    return None


@app.task(base=IdempotentTask, bind=True, name="at.isolated")
def isolated(self: IdempotentTask, uid: str, via: str, level: str, seconds: float) -> Any:
    """A block and an atomic step, each ``seconds`` long, at isolation ``level``.

    ``level`` is set on the driver connection (``REPEATABLE_READ``, ``SERIALIZABLE``),
    or ``server:<level>`` as the server's default for the session. The lease renews
    every lease/3 meanwhile, unless ``idem_atomic`` pauses it. Returns what the key's
    record said of its lease after the step and a pause of ``seconds`` more.
    """
    fence = self.idempotency_fence
    assert fence is not None
    conn: Any
    if level.startswith("server:"):
        options = f"-c default_transaction_isolation={level.split(':', 1)[1]}"
        conn = psycopg.connect(DB, autocommit=True, options=options)
    elif via == "psycopg":
        conn = psycopg.connect(DB, autocommit=True)
        conn.isolation_level = getattr(psycopg.IsolationLevel, level)
    else:
        conn = engine().connect().execution_options(isolation_level=level.replace("_", " "))
    handle = conn

    def step_row() -> int:
        insert(via, handle, uid, fence, what="step")
        time.sleep(seconds)
        return fence

    with conn:
        self.step("row", step_row, atomic=conn)
        time.sleep(seconds)
        spec = self.idem_spec()
        assert self.idempotency_key is not None
        found = spec.store.read(
            storage_key(spec.settings.key_prefix, spec.scope, self.idempotency_key)
        )  # type: ignore[attr-defined]
        with self.idem_atomic(conn) as done:
            insert(via, handle, uid, fence)
            time.sleep(seconds)
            done.result = {"lease_left": found.lease_left, "fence": fence}
    return done.result
