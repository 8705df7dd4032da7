"""``self.idem_atomic()`` and ``step(atomic=...)`` on a real PostgreSQL.

Each body (``tests/integration/atomic_tasks.py``) writes an ``items`` row through one of
the four kinds of connection (psycopg 3, SQLAlchemy Connection, SQLAlchemy Session,
Django) and completes its key in the same transaction. Counted from outside the library:
rows in ``items``, the points a body reached, and the record as the store reads it.

Most tests run the task eagerly (``apply``: the same claim, lease, completion and replay
as a worker, in this process); the ``worker`` ones on a real prefork worker.
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from celery import Celery

from celery_idem import IdempotentTask
from celery_idem.exceptions import (
    IdempotencyConfigError,
    IdempotencyError,
    LeaseLost,
    ResultNotStored,
)
from celery_idem.keys import storage_key
from celery_idem.store import RecordState, StoredRecord
from celery_idem.task import invalidate_settings
from celery_idem.testing import use_memory_store
from devtools.processes import wait_for
from tests.integration.conftest import ROOT, Worker, with_db

psycopg = pytest.importorskip("psycopg")
sqlalchemy = pytest.importorskip("sqlalchemy")

from celery_idem.store.postgres_admin import migrate  # noqa: E402 - needs psycopg
from tests.integration.atomic_tasks import SCHEMA  # noqa: E402 - needs psycopg, SQLAlchemy

pytestmark = pytest.mark.integration
T = 60
needs_django = pytest.mark.skipif(
    importlib.util.find_spec("django") is None, reason="Django is not installed"
)
VIAS = ["psycopg", "sa_conn", "sa_session", pytest.param("django", marks=needs_django)]


@pytest.fixture(scope="module")
def atomic_db(pg_server: Any) -> str:
    """A database of its own: the records' schema and the tasks' tables."""
    url = str(pg_server.create_database(f"atomic_{uuid.uuid4().hex[:8]}"))
    migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in SCHEMA:
            conn.execute(statement)
    return url


@pytest.fixture(scope="module")
def env(atomic_db: str, redis_url: str) -> Iterator[dict[str, str]]:
    """What the test process's app and the workers are built from."""
    values = {
        "IDEM_TEST_ATOMIC_DB": atomic_db,
        "IDEM_TEST_ATOMIC_BROKER": with_db(redis_url, 1),
        "IDEM_TEST_ATOMIC_BACKEND": with_db(redis_url, 2),
    }
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    yield values
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def at(env: dict[str, str]) -> ModuleType:
    """``tests.integration.atomic_tasks`` built on this module's database."""
    module = importlib.import_module("tests.integration.atomic_tasks")
    module.DB = env["IDEM_TEST_ATOMIC_DB"]
    module.app.conf.update(
        idem_store_url=module.DB,
        broker_url=env["IDEM_TEST_ATOMIC_BROKER"],
        result_backend=env["IDEM_TEST_ATOMIC_BACKEND"],
    )
    invalidate_settings()
    return module


@pytest.fixture
def uid() -> str:
    return uuid.uuid4().hex[:12]


def rows(at: ModuleType, uid: str, what: str = "row") -> list[tuple[Any, ...]]:
    """The ``items`` rows of ``uid``: (via, fence) each."""
    return at.side("SELECT via, fence FROM items WHERE uid = %s AND what = %s ORDER BY id",
                   (uid, what))  # fmt: skip


def points(at: ModuleType, uid: str, name: str) -> int:
    """How many times a body reached ``name``."""
    return len(at.side("SELECT 1 FROM points WHERE uid = %s AND name = %s", (uid, name)))


def record(at: ModuleType, task: Any, key: str) -> StoredRecord | None:
    """The key's record as the store reads it."""
    spec = task.idem_spec()
    return spec.store.read(storage_key(spec.settings.key_prefix, spec.scope, key))  # type: ignore[no-any-return]


def failure(result: Any) -> BaseException:
    """The exception an eager run failed with."""
    assert result.failed(), result.result
    error = result.result
    assert isinstance(error, BaseException)
    return error


# -- the block: one commit for the row and the completion --------------------------------


@pytest.mark.parametrize("via", VIAS)
def test_the_row_and_the_completion_commit_together_and_a_duplicate_replays(
    at: ModuleType, uid: str, via: str
) -> None:
    key = f"w-{uid}"
    first = at.write.apply((uid, via), idempotency_key=key)
    assert first.successful(), first.traceback
    out = first.result
    assert out == {"uid": uid, "via": via, "fence": out["fence"]}
    assert rows(at, uid) == [(via, out["fence"])]
    found = record(at, at.write, key)
    assert found is not None
    assert found.state == RecordState.RESULT.value
    assert found.fence == out["fence"]

    again = at.write.apply((uid, via), idempotency_key=key)
    assert again.successful()
    assert again.result == out
    assert rows(at, uid) == [(via, out["fence"])]
    assert points(at, uid, "inserted") == 1


@pytest.mark.parametrize("via", VIAS)
def test_a_lost_lease_rolls_the_whole_transaction_back(at: ModuleType, uid: str, via: str) -> None:
    key = f"lost-{uid}"
    error = failure(at.write.apply((uid, via), {"lose": True}, idempotency_key=key))
    assert isinstance(error, LeaseLost)
    assert error.key == key
    assert error.task_name == "at.write"
    assert "rolled back" in str(error)
    assert points(at, uid, "inserted") == 1  # the body did write its row...
    assert rows(at, uid) == []  # ...and it was never committed
    assert points(at, uid, "committed") == 0
    found = record(at, at.write, key)
    assert found is not None
    assert (found.state, found.task_id) == ("P", "thief")


@pytest.mark.parametrize("via", VIAS)
def test_an_exception_inside_rolls_back_and_frees_the_key_for_a_retry(
    at: ModuleType, uid: str, via: str
) -> None:
    key = f"boom-{uid}"
    error = failure(at.write.apply((uid, via), {"fail": True}, idempotency_key=key))
    assert isinstance(error, at.Boom)
    assert rows(at, uid) == []
    found = record(at, at.write, key)
    assert found is not None
    assert found.state == RecordState.FREE.value

    retry = at.write.apply((uid, via), idempotency_key=key)
    assert retry.successful(), retry.traceback
    assert rows(at, uid) == [(via, retry.result["fence"])]
    assert retry.result["fence"] > found.fence


# -- step(atomic=...) --------------------------------------------------------------------


@pytest.mark.parametrize("via", VIAS)
def test_an_atomic_step_commits_its_value_with_its_row_and_replays_it(
    at: ModuleType, uid: str, via: str
) -> None:
    key = f"step-{uid}"
    error = failure(at.step.apply((uid, via, True), idempotency_key=key))
    assert isinstance(error, at.Boom)  # after the step: the key is released with it
    assert len(rows(at, uid, "step")) == 1
    found = record(at, at.step, key)
    assert found is not None
    assert [s.name for s in found.steps] == ["row"]

    second = at.step.apply((uid, via, True), idempotency_key=key)
    assert second.successful(), second.traceback
    assert points(at, uid, "step-ran") == 1  # replayed from the record
    assert len(rows(at, uid, "step")) == 1
    first_fence = rows(at, uid, "step")[0][1]
    assert second.result["step"] == {"fence": first_fence, "key": f"{key}/row"}
    assert second.result["fence"] > first_fence


@pytest.mark.parametrize("via", VIAS)
def test_a_lost_lease_rolls_an_atomic_step_back_with_its_row(
    at: ModuleType, uid: str, via: str
) -> None:
    key = f"steplost-{uid}"
    error = failure(at.step.apply((uid, via, False, True), idempotency_key=key))
    assert isinstance(error, LeaseLost)
    assert "rolled back" in str(error)
    assert points(at, uid, "step-ran") == 1
    assert rows(at, uid, "step") == []
    found = record(at, at.step, key)
    assert found is not None
    assert (found.task_id, found.steps) == ("thief", ())


# -- what the completion costs -----------------------------------------------------------


def test_the_completion_is_one_statement_of_the_users_transaction(at: ModuleType, uid: str) -> None:
    """psycopg: every statement through the connection's cursors is counted."""
    seen: list[str] = []

    class Counting(psycopg.Cursor):  # type: ignore[misc]
        def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
            seen.append(str(query))
            return super().execute(query, *args, **kwargs)

    conn = psycopg.connect(at.DB, autocommit=True, cursor_factory=Counting)
    key_of = (os.getpid(), "psycopg")
    previous = at._cache.get(key_of)
    at._cache[key_of] = conn
    try:
        assert at.write.apply((f"{uid}-1", "psycopg"), idempotency_key=f"c1-{uid}").successful()
        first = list(seen)
        seen.clear()
        assert at.write.apply((f"{uid}-2", "psycopg"), idempotency_key=f"c2-{uid}").successful()
        second = list(seen)
    finally:
        at._cache[key_of] = previous
        conn.close()
    # A connection's first block checks which database it is on, once in its life.
    assert len(first) == 3
    assert "current_database()" in first[0]
    assert "INSERT INTO items" in first[1]
    assert "celery_idem_complete" in first[2]
    # Every later block: the body's statements plus ONE, the completion.
    assert len(second) == 2
    assert "INSERT INTO items" in second[0]
    assert "celery_idem_complete" in second[1]


def test_on_sqlalchemy_too_the_completion_is_one_more_statement(at: ModuleType, uid: str) -> None:
    engine = at.engine()
    seen: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    with engine.connect() as warm, at.orm.Session(engine):  # the pool's connection, checked
        pass
    assert at.write.apply((f"{uid}-0", "sa_conn"), idempotency_key=f"s0-{uid}").successful()
    sqlalchemy.event.listen(engine, "before_cursor_execute", note)
    try:
        assert at.write.apply((uid, "sa_conn"), idempotency_key=f"s1-{uid}").successful()
    finally:
        sqlalchemy.event.remove(engine, "before_cursor_execute", note)
    assert warm is not None
    assert len(seen) == 2, seen
    assert "INSERT INTO items" in seen[0]
    assert "celery_idem_complete" in seen[1]


# -- what the block refuses --------------------------------------------------------------


def run_misuse(at: ModuleType, uid: str, how: str, **kwargs: Any) -> BaseException:
    return failure(at.misuse.apply((uid, how), kwargs, idempotency_key=f"{how}-{uid}"))


def test_a_second_block_is_refused_and_the_first_result_stands(at: ModuleType, uid: str) -> None:
    error = run_misuse(at, uid, "second-block")
    assert type(error) is IdempotencyError
    assert "a second time" in str(error)
    assert len(rows(at, uid)) == 1
    replay = at.misuse.apply((uid, "second-block"), idempotency_key=f"second-block-{uid}")
    assert replay.successful()
    assert replay.result == "first"


def test_a_step_after_the_block_is_refused(at: ModuleType, uid: str) -> None:
    error = run_misuse(at, uid, "step-after")
    assert type(error) is IdempotencyError
    assert "after its idem_atomic() block committed" in str(error)
    found = record(at, at.misuse, f"step-after-{uid}")
    assert found is not None
    assert found.state == RecordState.RESULT.value


def test_a_step_inside_the_block_is_refused_and_rolled_back(at: ModuleType, uid: str) -> None:
    error = run_misuse(at, uid, "step-inside")
    assert type(error) is IdempotencyError
    assert "inside an idem_atomic() block" in str(error)
    found = record(at, at.misuse, f"step-inside-{uid}")
    assert found is not None
    assert found.state == RecordState.FREE.value


def test_blocks_do_not_nest(at: ModuleType, uid: str) -> None:
    error = run_misuse(at, uid, "nested")
    assert type(error) is IdempotencyError
    assert "do not nest" in str(error)


def test_a_connection_to_another_database_is_refused(
    at: ModuleType, uid: str, fresh_pg_url: str
) -> None:
    error = run_misuse(at, uid, "other-db", other_db=fresh_pg_url)
    assert isinstance(error, IdempotencyConfigError)
    other = fresh_pg_url.rsplit("/", 1)[1]
    assert f"to the database {other!r}" in str(error)
    assert at.DB.rsplit("/", 1)[1] in str(error)
    found = record(at, at.misuse, f"other-db-{uid}")
    assert found is not None
    assert found.state == RecordState.FREE.value


def test_a_connection_inside_a_transaction_is_refused(at: ModuleType, uid: str) -> None:
    error = run_misuse(at, uid, "not-idle")
    assert isinstance(error, IdempotencyConfigError)
    assert "INTRANS" in str(error)


@needs_django
def test_a_django_block_inside_atomic_is_refused(at: ModuleType, uid: str) -> None:
    error = run_misuse(at, uid, "django-nested")
    assert isinstance(error, IdempotencyConfigError)
    assert "outermost" in str(error)


def test_a_result_set_after_the_block_is_refused(at: ModuleType, uid: str) -> None:
    error = run_misuse(at, uid, "result-late")
    assert type(error) is IdempotencyError
    assert "after its block ended" in str(error)
    # The block had committed its completion (with None) before the body went on.
    replay = at.misuse.apply((uid, "result-late"), idempotency_key=f"result-late-{uid}")
    assert replay.successful()
    assert replay.result is None


def test_an_unencodable_result_rolls_back(at: ModuleType, uid: str) -> None:
    error = run_misuse(at, uid, "unencodable")
    assert isinstance(error, ResultNotStored)
    assert "rolled back" in str(error)
    assert rows(at, uid) == []
    found = record(at, at.misuse, f"unencodable-{uid}")
    assert found is not None
    assert found.state == RecordState.FREE.value


def test_the_task_returns_done_result_whatever_the_body_returns(
    at: ModuleType, uid: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="celery_idem"):
        first = at.misuse.apply((uid, "returns-other"), idempotency_key=f"ro-{uid}")
    assert first.successful()
    assert first.result == {"stored": uid}
    assert "the key's result is done.result" in caplog.text
    again = at.misuse.apply((uid, "returns-other"), idempotency_key=f"ro-{uid}")
    assert again.result == {"stored": uid}


def test_outside_a_running_execution_it_is_refused(at: ModuleType, uid: str) -> None:
    with pytest.raises(IdempotencyError, match="outside a running execution"):
        at.misuse(uid, "returns-other")  # a plain call bypasses celery-idem
    assert rows(at, uid) == []


def test_a_store_that_is_not_postgresql_is_refused(
    at: ModuleType, uid: str, redis_url: str
) -> None:
    app = Celery("atomic-on-redis", broker="memory://", backend="cache+memory://")
    store_url = with_db(redis_url, 5)
    app.conf.idem_store_url = store_url

    @app.task(base=IdempotentTask, bind=True, name="at.elsewhere")
    def elsewhere(self: IdempotentTask) -> None:
        with self.idem_atomic(at.psycopg_connection()):
            pass

    error = failure(elsewhere.apply(idempotency_key=uid))
    assert isinstance(error, IdempotencyConfigError)
    assert "needs the idempotency records in PostgreSQL" in str(error)
    assert store_url.rsplit("/", 1)[0].split("//", 1)[1] in str(error)


def test_the_in_memory_test_store_stands_in(at: ModuleType, uid: str) -> None:
    """Its completion goes to the memory store: nothing to the records' table.

    The stand-in's own tests (psycopg, SQLAlchemy on SQLite, Django on SQLite, lost
    leases, failed commits, refusals) are ``test_atomic_memory.py``'s.
    """
    with use_memory_store() as store:
        first = at.write.apply((uid, "psycopg"), idempotency_key=uid)
        assert first.successful(), first.traceback
        again = at.write.apply((uid, "psycopg"), idempotency_key=uid)
        assert again.result == first.result
        spec = at.write.idem_spec()
        found = store.read(storage_key(spec.settings.key_prefix, spec.scope, uid))
        assert found is not None
        assert found.state == RecordState.RESULT.value
    assert rows(at, uid) == [("psycopg", first.result["fence"])]
    assert points(at, uid, "inserted") == 1
    assert record(at, at.write, uid) is None  # the PostgreSQL store never saw the key


def test_without_django_configured_the_default_is_refused(at: ModuleType, uid: str) -> None:
    """In a process of its own: this one may have configured Django already."""
    pytest.importorskip("django")
    script = textwrap.dedent(f"""
        from tests.integration import atomic_tasks as at
        from celery_idem import IdempotentTask
        @at.app.task(base=IdempotentTask, bind=True, name="at.django_less")
        def django_less(self):
            with self.idem_atomic():
                pass
        error = django_less.apply(idempotency_key={uid!r}).result
        print(type(error).__name__, error)
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=T, check=True,
    ).stdout  # fmt: skip
    assert out.startswith("IdempotencyConfigError ")
    assert "Django's settings are not configured" in out


# -- on a real worker --------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker(env: dict[str, str], at: ModuleType) -> Iterator[Worker]:
    """A prefork worker (2 children) running ``tests.integration.atomic_tasks``."""
    started = Worker(env, app="tests.integration.atomic_tasks").start()
    yield started
    started.stop()


@pytest.mark.parametrize("via", ["psycopg", VIAS[-1]])
def test_on_a_worker_two_messages_of_one_key_commit_one_row(
    at: ModuleType, worker: Worker, uid: str, via: str
) -> None:
    key = f"wk-{uid}"
    first = at.write.apply_async((uid, via), idempotency_key=key, queue=worker.queue)
    out = first.get(timeout=T)
    second = at.write.apply_async((uid, via), idempotency_key=key, queue=worker.queue)
    assert second.id != first.id
    assert second.get(timeout=T) == out
    assert rows(at, uid) == [(via, out["fence"])]
    assert points(at, uid, "inserted") == 1


def test_on_a_worker_a_stale_attempt_commits_nothing(
    at: ModuleType, worker: Worker, uid: str
) -> None:
    """The key is taken over while the body holds inside its block, after its INSERT."""
    key = f"stale-{uid}"
    at.side("INSERT INTO holds (uid, name) VALUES (%s, 'inserted')", (uid,))
    result = at.write.apply_async((uid, "psycopg"), idempotency_key=key, queue=worker.queue)
    wait_for(lambda: points(at, uid, "inserted") == 1, timeout=T, message="the INSERT")
    at.steal(at.write, key)
    at.side("DELETE FROM holds WHERE uid = %s", (uid,))
    with pytest.raises(LeaseLost, match="rolled back"):
        result.get(timeout=T)
    assert rows(at, uid) == []
    assert points(at, uid, "committed") == 0
    found = record(at, at.write, key)
    assert found is not None
    assert (found.state, found.task_id) == ("P", "thief")


# -- isolation levels that take a snapshot ----------------------------------------------


@pytest.mark.parametrize(
    ("via", "level"),
    [
        ("psycopg", "REPEATABLE_READ"),
        ("psycopg", "SERIALIZABLE"),
        ("sa_conn", "SERIALIZABLE"),
        ("psycopg", "server:serializable"),
    ],
)
def test_under_snapshot_isolation_no_renewal_breaks_the_transaction(
    at: ModuleType, uid: str, via: str, level: str
) -> None:
    """A renewal committed after the snapshot would fail the fenced statement (40001).

    With a 1.5 s lease, renewals come every 0.5 s: each 1.2 s transaction would meet
    two. The block and the step pause them; after the step they resume (the record's
    lease is still alive after the body slept through 1.2 s more).
    """
    key = f"iso-{uid}"
    result = at.isolated.apply((uid, via, level, 1.2), idempotency_key=key, idem_lease=1.5)
    assert result.successful(), result.traceback
    assert result.result["lease_left"] > 0.2
    assert [
        what for (what,) in at.side("SELECT what FROM items WHERE uid = %s ORDER BY id", (uid,))
    ] == ["step", "row"]
    found = record(at, at.isolated, key)
    assert found is not None
    assert found.state == RecordState.RESULT.value


# -- where there is no key to complete ----------------------------------------------------


def test_with_the_store_down_under_run_the_block_is_a_plain_transaction(
    at: ModuleType, uid: str
) -> None:
    """``idem_on_store_error='run'``: no claim, so the block commits the body's writes alone."""
    app = Celery("atomic-store-down", broker="memory://", backend="cache+memory://")
    app.conf.update(
        idem_store_url="postgresql://postgres@127.0.0.1:1/nowhere?connect_timeout=1",
        idem_on_store_error="run",
    )

    @app.task(base=IdempotentTask, bind=True, name="at.unprotected")
    def unprotected(self: IdempotentTask) -> Any:
        conn = at.psycopg_connection()
        value = self.step("row", at.insert, "psycopg", conn, uid, 0, "step", atomic=conn)
        with self.idem_atomic(conn) as done:
            at.insert("psycopg", done.connection, uid, 0)
            done.result = "unprotected"
        return value, done.result

    result = unprotected.apply(idempotency_key=uid)
    assert result.successful(), result.traceback
    assert result.result == (None, "unprotected")
    assert [
        what for (what,) in at.side("SELECT what FROM items WHERE uid = %s ORDER BY id", (uid,))
    ] == ["step", "row"]


def test_a_plain_call_runs_an_atomic_step_in_a_transaction_with_nothing_recorded(
    at: ModuleType, uid: str
) -> None:
    """``task(x)`` bypasses celery-idem: the step's function still commits as one."""
    assert at.step(uid, "psycopg", False)["step"]["key"] is None
    assert len(rows(at, uid, "step")) == 1
