"""``self.idem_atomic()`` and ``step(atomic=...)`` on the in-memory test store (the stand-in).

What a user's unit tests see: their task runs eagerly under ``use_memory_store()``
(the ``idem_store`` fixture), against their test database, which is not the records'
database (there is none: the task's ``idem_store_url`` names a server nobody listens
on). The block commits the body's writes, the completion goes to the memory store, a
duplicate replays ``done.result``, an exception rolls back and frees the key, a lost
key raises ``LeaseLost`` with the writes rolled back, and a commit that fails takes the
completion back. The body's database: PostgreSQL through psycopg (``fresh_pg_url``),
SQLite through SQLAlchemy (a Connection, a Session), and SQLite through Django (in a
process of its own, which configures Django's settings).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery

from celery_idem import IdempotentTask
from celery_idem.exceptions import IdempotencyConfigError, IdempotencyError, LeaseLost
from celery_idem.keys import storage_key
from celery_idem.store import ClaimRequest, RecordState, StoredRecord
from celery_idem.store.memory import MemoryStore
from celery_idem.testing import use_memory_store
from tests.integration.conftest import ROOT, with_db

psycopg = pytest.importorskip("psycopg")
sa = pytest.importorskip("sqlalchemy")
orm = importlib.import_module("sqlalchemy.orm")

T = 60
NOWHERE = "postgresql://nobody@127.0.0.1:1/records"
"""The tasks' records' database: never reached, the memory store replaces it."""

app = Celery("idem-atomic-memory", broker="memory://", backend="cache+memory://")
app.conf.update(idem_store_url=NOWHERE)


class Boom(Exception):
    """A failure inside the block: everything in it rolls back."""


class Via:
    """The test's database as a task body reaches it: its connection, a write, a count."""

    def __init__(
        self,
        connect: Callable[[], contextlib.AbstractContextManager[Any]],
        insert: Callable[[Any, str, int, str], None],
        count: Callable[[str, str], int],
    ) -> None:
        self.connect, self.insert, self.count = connect, insert, count


VIAS: dict[str, Via] = {}
FAILED: set[str] = set()


def steal(task: Any) -> None:
    """Another attempt takes the key over, as the memory store lets a test play it."""
    spec = task.idem_spec()
    store: MemoryStore = spec.store
    storage = storage_key(spec.settings.key_prefix, spec.scope, task.idempotency_key)
    store.forget(storage)
    request = ClaimRequest(storage, token="thief", task_id="thief", fingerprint="",
                           lease=60.0, ttl=600.0)  # fmt: skip
    assert store.claim(request).state.name == "CLAIMED"


@app.task(base=IdempotentTask, bind=True, name="atm.write")
def write(self: Any, uid: str, via: str, fail: bool = False, lose: bool = False) -> Any:
    db, fence = VIAS[via], self.idempotency_fence
    with db.connect() as conn, self.idem_atomic(conn) as done:
        db.insert(done.connection, uid, fence, "row")
        if fail:
            raise Boom(uid)
        if lose:
            steal(self)
        done.result = {"uid": uid, "fence": fence}
    return done.result


@app.task(base=IdempotentTask, bind=True, name="atm.step")
def step(self: Any, uid: str, via: str, fail_after: bool = False, lose: bool = False) -> Any:
    db, fence = VIAS[via], self.idempotency_fence

    with db.connect() as conn:

        def row() -> dict[str, Any]:
            db.insert(conn, uid, fence, "step")
            if lose:
                steal(self)
            return {"fence": fence, "key": self.step_key}

        value = self.step("row", row, atomic=conn)
    if fail_after and uid not in FAILED:
        FAILED.add(uid)
        raise Boom("after the step, on the first run")
    return {"step": value, "fence": fence}


@app.task(base=IdempotentTask, bind=True, name="atm.misuse")
def misuse(self: Any, uid: str, via: str, how: str) -> Any:
    db = VIAS[via]
    with db.connect() as conn:
        if how == "second-block":
            with self.idem_atomic(conn) as done:
                db.insert(conn, uid, 0, "row")
                done.result = "first"
            with self.idem_atomic(conn) as done:
                done.result = "second"
        elif how == "step-after":
            with self.idem_atomic(conn) as done:
                done.result = "first"
            self.step("late", lambda: 1)
        elif how == "step-inside":
            with self.idem_atomic(conn):
                db.insert(conn, uid, 0, "row")
                self.step("inside", lambda: 1)
        elif how == "nested":
            with self.idem_atomic(conn), self.idem_atomic(conn):
                pass
        elif how == "not-idle":
            conn.execute(sa.text("SELECT 1"))  # autobegins a transaction
            with self.idem_atomic(conn):
                pass
        elif how == "commit-fails":  # the deferred unique constraint fails the COMMIT
            with self.idem_atomic(conn) as done:
                db.insert(conn, uid, 0, "row")
                db.insert(conn, uid, 0, "once")
                db.insert(conn, uid, 0, "once")
                done.result = "never"
    return "done"


# -- the test databases ------------------------------------------------------------------


@pytest.fixture(scope="module")
def sqlite() -> Iterator[Any]:
    """SQLite in memory, through SQLAlchemy: one connection the whole module shares."""
    engine = sa.create_engine("sqlite://", poolclass=sa.StaticPool)
    meta = sa.MetaData()
    items = sa.Table(
        "items", meta,
        sa.Column("id", sa.Integer, primary_key=True), sa.Column("uid", sa.String),
        sa.Column("fence", sa.Integer), sa.Column("what", sa.String),
    )  # fmt: skip

    class Base(orm.DeclarativeBase):
        pass

    class Item(Base):
        __table__ = items

    meta.create_all(engine)

    def insert_conn(conn: Any, uid: str, fence: int, what: str) -> None:
        conn.execute(items.insert().values(uid=uid, fence=fence, what=what))

    def insert_session(session: Any, uid: str, fence: int, what: str) -> None:
        session.add(Item(uid=uid, fence=fence, what=what))  # flushed before the completion

    def count(uid: str, what: str) -> int:
        with engine.connect() as conn:
            query = sa.select(sa.func.count()).where(items.c.uid == uid, items.c.what == what)
            return int(conn.execute(query).scalar_one())

    VIAS["sa_conn"] = Via(engine.connect, insert_conn, count)
    VIAS["sa_session"] = Via(lambda: orm.Session(engine), insert_session, count)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def pg(pg_server: Any) -> str:
    """A PostgreSQL database of the tests' own (not the records': there are none)."""
    url = str(pg_server.create_database(f"atm_{uuid.uuid4().hex[:8]}"))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id bigserial PRIMARY KEY, uid text NOT NULL, "
                     "fence bigint NOT NULL, what text NOT NULL, "
                     "UNIQUE (uid, what) DEFERRABLE INITIALLY DEFERRED)")  # fmt: skip

    @contextlib.contextmanager
    def connect() -> Iterator[Any]:
        with psycopg.connect(url, autocommit=True) as conn:
            yield conn

    def insert(conn: Any, uid: str, fence: int, what: str) -> None:
        conn.execute("INSERT INTO items (uid, fence, what) VALUES (%s, %s, %s)",
                     (uid, fence, what))  # fmt: skip

    def count(uid: str, what: str) -> int:
        with psycopg.connect(url, autocommit=True) as conn:
            sql = "SELECT count(*) FROM items WHERE uid = %s AND what = %s"
            return int(conn.execute(sql, (uid, what)).fetchone()[0])

    VIAS["psycopg"] = Via(connect, insert, count)
    return url


@pytest.fixture(params=["psycopg", "sa_conn", "sa_session"])
def via(request: pytest.FixtureRequest, sqlite: Any) -> str:
    if request.param == "psycopg":
        request.getfixturevalue("pg")
    return str(request.param)


@pytest.fixture
def store() -> Iterator[MemoryStore]:
    with use_memory_store() as memory:
        yield memory


@pytest.fixture
def uid() -> str:
    return uuid.uuid4().hex[:12]


def record(store: MemoryStore, task: Any, key: str) -> StoredRecord:
    spec = task.idem_spec()
    found = store.read(storage_key(spec.settings.key_prefix, spec.scope, key))
    assert found is not None
    return found


def failure(result: Any) -> BaseException:
    assert result.failed(), result.result
    assert isinstance(result.result, BaseException)
    return result.result


# -- the block ---------------------------------------------------------------------------


def test_the_block_commits_and_a_duplicate_replays(store: MemoryStore, via: str, uid: str) -> None:
    first = write.apply((uid, via), idempotency_key=uid)
    assert first.successful(), first.traceback
    assert first.result == {"uid": uid, "fence": first.result["fence"]}
    assert VIAS[via].count(uid, "row") == 1
    found = record(store, write, uid)
    assert (found.state, found.fence) == (RecordState.RESULT.value, first.result["fence"])

    again = write.apply((uid, via), idempotency_key=uid)
    assert again.successful()
    assert again.result == first.result
    assert VIAS[via].count(uid, "row") == 1


def test_an_exception_inside_rolls_back_and_frees_the_key(
    store: MemoryStore, via: str, uid: str
) -> None:
    assert isinstance(failure(write.apply((uid, via, True), idempotency_key=uid)), Boom)
    assert VIAS[via].count(uid, "row") == 0
    freed = record(store, write, uid)
    assert freed.state == RecordState.FREE.value
    retry = write.apply((uid, via), idempotency_key=uid)
    assert retry.successful(), retry.traceback
    assert retry.result["fence"] > freed.fence
    assert VIAS[via].count(uid, "row") == 1


def test_a_lost_lease_raises_and_rolls_the_writes_back(
    store: MemoryStore, via: str, uid: str
) -> None:
    error = failure(write.apply((uid, via, False, True), idempotency_key=uid))
    assert isinstance(error, LeaseLost)
    assert "rolled back" in str(error)
    assert VIAS[via].count(uid, "row") == 0
    assert record(store, write, uid).task_id == "thief"


def test_a_failed_commit_takes_the_completion_back(store: MemoryStore, pg: str, uid: str) -> None:
    """psycopg: a deferred unique constraint fails the COMMIT, after the completion."""
    error = failure(misuse.apply((uid, "psycopg", "commit-fails"), idempotency_key=uid))
    assert isinstance(error, psycopg.errors.UniqueViolation)
    assert VIAS["psycopg"].count(uid, "row") == 0
    assert record(store, misuse, uid).state == RecordState.FREE.value  # released, not done


# -- step(atomic=...) --------------------------------------------------------------------


def test_an_atomic_step_commits_with_its_record_and_replays(
    store: MemoryStore, via: str, uid: str
) -> None:
    assert isinstance(failure(step.apply((uid, via, True), idempotency_key=uid)), Boom)
    assert VIAS[via].count(uid, "step") == 1
    assert [s.name for s in record(store, step, uid).steps] == ["row"]
    second = step.apply((uid, via, True), idempotency_key=uid)
    assert second.successful(), second.traceback
    assert VIAS[via].count(uid, "step") == 1  # replayed, not run again
    assert second.result["step"]["key"] == f"{uid}/row"
    assert second.result["fence"] > second.result["step"]["fence"]


def test_a_lost_lease_rolls_an_atomic_step_back(store: MemoryStore, via: str, uid: str) -> None:
    error = failure(step.apply((uid, via, False, True), idempotency_key=uid))
    assert isinstance(error, LeaseLost)
    assert "rolled back" in str(error)
    assert VIAS[via].count(uid, "step") == 0
    found = record(store, step, uid)
    assert (found.task_id, found.steps) == ("thief", ())


def test_a_plain_call_runs_an_atomic_step_on_sqlite(
    store: MemoryStore, sqlite: Any, uid: str
) -> None:
    """``task(x)`` bypasses celery-idem: the step is one transaction, of any vendor here."""
    assert step(uid, "sa_conn") == {"step": {"fence": None, "key": None}, "fence": None}
    assert VIAS["sa_conn"].count(uid, "step") == 1


# -- the refusals production makes, made in tests too --------------------------------------


@pytest.mark.parametrize(
    ("how", "kind", "text"),
    [
        ("second-block", IdempotencyError, "a second time"),
        ("step-after", IdempotencyError, "after its idem_atomic() block committed"),
        ("step-inside", IdempotencyError, "inside an idem_atomic() block"),
        ("nested", IdempotencyError, "do not nest"),
        ("not-idle", IdempotencyConfigError, "already in a transaction"),
    ],
)
def test_misuse_is_refused_as_in_production(
    store: MemoryStore, sqlite: Any, uid: str, how: str, kind: type[Exception], text: str
) -> None:
    error = failure(misuse.apply((uid, "sa_conn", how), idempotency_key=uid))
    assert isinstance(error, kind)
    assert text in str(error)
    if how == "second-block":
        assert misuse.apply((uid, "sa_conn", how), idempotency_key=uid).result == "first"
    if how == "step-inside":
        assert VIAS["sa_conn"].count(uid, "row") == 0
        assert record(store, misuse, uid).state == RecordState.FREE.value


def test_a_task_configured_with_redis_is_refused(redis_url: str, sqlite: Any, uid: str) -> None:
    """On Redis, and under the memory store too: production would refuse it."""
    other = Celery("atomic-redis", broker="memory://", backend="cache+memory://")
    other.conf.idem_store_url = with_db(redis_url, 5)

    @other.task(base=IdempotentTask, bind=True, name="atm.on_redis")
    def on_redis(self: Any) -> None:
        with VIAS["sa_conn"].connect() as conn, self.idem_atomic(conn):
            pass

    for memory in (False, True):
        with use_memory_store() if memory else contextlib.nullcontext():
            error = failure(on_redis.apply(idempotency_key=f"{uid}-{memory}"))
        assert isinstance(error, IdempotencyConfigError)
        assert "needs the idempotency records in PostgreSQL" in str(error)
        assert ("in-memory store stands in" in str(error)) is memory


# -- Django, on SQLite -------------------------------------------------------------------

DJANGO_SCRIPT = """
import json, django
from django.conf import settings
settings.configure(DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3",
                                          "NAME": ":memory:"}}, INSTALLED_APPS=[])
django.setup()
from django.db import connection
from celery import Celery
from celery_idem import IdempotentTask
from celery_idem.testing import use_memory_store
from tests.integration.test_atomic_memory import steal

app = Celery("idem-django-memory", broker="memory://", backend="cache+memory://")
app.conf.idem_store_url = "postgresql://nobody@127.0.0.1:1/records"
with connection.cursor() as cursor:
    cursor.execute("CREATE TABLE items (uid text, what text)")

def insert(uid, what):
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO items VALUES (%s, %s)", [uid, what])

def count(uid):
    with connection.cursor() as cursor:
        cursor.execute("SELECT what FROM items WHERE uid = %s ORDER BY what", [uid])
        return [what for (what,) in cursor.fetchall()]

MODE = {}

@app.task(base=IdempotentTask, bind=True, name="dj.write")
def write(self, uid):
    how = MODE[uid]
    self.step("row", lambda: insert(uid, "step"), atomic=True)
    with self.idem_atomic() as done:
        insert(uid, "row")
        if how == "fail":
            raise ValueError("inside")
        if how == "lose":
            steal(self)
        done.result = uid
    return done.result

out = {}
with use_memory_store():
    for how in ("ok", "fail", "lose"):
        MODE[how] = how
        first = write.apply((how,), idempotency_key=how)
        MODE[how] = "ok"
        again = write.apply((how,), idempotency_key=how).result if how != "lose" else None
        out[how] = [type(first.result).__name__, again, count(how)]
print(json.dumps(out))
"""


def test_django_on_sqlite(uid: str) -> None:
    """In a process of its own: this one may have configured Django on PostgreSQL."""
    pytest.importorskip("django")
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(DJANGO_SCRIPT)], cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=T,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == {
        "ok": ["str", "ok", ["row", "step"]],  # committed once, replayed
        "fail": ["ValueError", "fail", ["row", "step"]],  # the step stayed, the row retried
        "lose": ["LeaseLost", None, ["step"]],  # the block's row rolled back
    }
