"""The PostgreSQL store under faults: prefork workers killed or paused around the commit.

The task (``tests/faults/pg_tasks.py``) inserts a customer row and completes its key in
one transaction (``self.idem_atomic``). Each scenario counts the rows in the database
and the points the bodies reached in the effect ledger, never what the library says:
whatever is killed or paused, a key leaves exactly one row.
"""

from __future__ import annotations

import importlib
import os
import signal
import uuid
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
import redis

from celery_idem.store.postgres_admin import migrate
from devtools.processes import wait_for
from tests.faults.harness import SUCCESS, delivery_count, entries
from tests.faults.test_worker_faults import kill_and_reap
from tests.integration.conftest import Worker, ledger_count

psycopg = pytest.importorskip("psycopg")

pytestmark = pytest.mark.integration
T = 60
APP = "tests.faults.pg_tasks"


@pytest.fixture(scope="module")
def pg_store(pg_server: Any) -> str:
    """A database of its own, migrated, with the scenarios' customers table."""
    url = str(pg_server.create_database(f"faults_{uuid.uuid4().hex[:8]}"))
    migrate(url)
    return url


@pytest.fixture(scope="module")
def pg_tasks(pg_store: str, celery_env: dict[str, str]) -> Iterator[ModuleType]:
    """``tests.faults.pg_tasks`` imported with its store set (the test process sends)."""
    os.environ["IDEM_TEST_PG_STORE"] = pg_store
    module = importlib.import_module(APP)
    with psycopg.connect(pg_store, autocommit=True) as conn:
        conn.execute(module.CUSTOMERS)
    yield module
    os.environ.pop("IDEM_TEST_PG_STORE", None)


def spawn_pg(spawn: Any, pg_store: str, *, lease: float = 60.0, **kwargs: Any) -> Worker:
    env = {"IDEM_TEST_PG_STORE": pg_store, "IDEM_TEST_LEASE": str(lease)}
    return spawn(app=APP, extra_env=env, **kwargs)  # type: ignore[no-any-return]


def rows(pg_store: str, uid: str) -> list[tuple[int, int]]:
    """The customers rows of ``uid``: (id, fence) each."""
    with psycopg.connect(pg_store) as conn:
        found = conn.execute(
            "SELECT id, fence FROM customers WHERE uid = %s ORDER BY id", (uid,)
        ).fetchall()
    return [(int(a), int(b)) for a, b in found]


def database_effects(count: int) -> str:
    """The report's note: rows beyond the first for the key, counted in the database."""
    return f"duplicate database effects: {count - 1} (rows of the key: {count})"


def reached(ledger: redis.Redis, uid: str, name: str) -> list[dict[str, Any]]:
    return entries(ledger, f"{uid}:{name}")


@pytest.mark.scenario(
    "PostgreSQL: kill before the commit",
    inject="SIGKILL the child after the body's INSERT, inside idem_atomic, before its commit",
    expect="nothing committed; the redelivery inserts once",
)
def test_a_child_killed_before_its_commit_leaves_nothing_and_the_redelivery_inserts_once(
    spawn: Any, pg_tasks: ModuleType, pg_store: str, ledger: redis.Redis, uid: str,
    fault_report: Any,
) -> None:  # fmt: skip
    w = spawn_pg(spawn, pg_store, lease=2.0)
    ledger.set(f"hold:{uid}:inserted", 1)
    res = pg_tasks.signup.apply_async((uid, "a@x"), idempotency_key=uid, queue=w.queue)
    wait_for(lambda: ledger_count(ledger, f"{uid}:inserted") == 1, T, message="the INSERT")
    assert rows(pg_store, uid) == []  # inserted, not committed
    kill_and_reap(reached(ledger, uid, "inserted")[0]["pid"], w)
    ledger.delete(f"hold:{uid}:inserted")
    out = res.get(timeout=T)
    found = rows(pg_store, uid)
    inserted = reached(ledger, uid, "inserted")
    assert len(inserted) == 2  # the killed body's INSERT, rolled back, and the redelivery's
    assert inserted[1]["fence"] > inserted[0]["fence"]  # taken over after the lease
    assert found == [(out["customer"], inserted[1]["fence"])]
    fault_report(
        deliveries=delivery_count(ledger, uid), executions=len(inserted),
        completions=1 if res.state == SUCCESS else 0, lost=0, duplicate_effects=len(found) - 1,
        notes=database_effects(len(found)),
    )  # fmt: skip


@pytest.mark.scenario(
    "PostgreSQL: kill after the commit",
    inject="SIGKILL the child after the row and the completion committed, before the ack",
    expect="the redelivery replays the stored result; no second row",
)
def test_a_child_killed_after_its_commit_is_replayed_without_a_second_row(
    spawn: Any, pg_tasks: ModuleType, pg_store: str, ledger: redis.Redis, uid: str,
    fault_report: Any,
) -> None:  # fmt: skip
    w = spawn_pg(spawn, pg_store)
    ledger.set(f"hold:{uid}:committed", 1)
    res = pg_tasks.signup.apply_async((uid, "a@x"), idempotency_key=uid, queue=w.queue)
    wait_for(lambda: ledger_count(ledger, f"{uid}:committed") == 1, T, message="the commit")
    first = rows(pg_store, uid)
    assert len(first) == 1
    kill_and_reap(reached(ledger, uid, "committed")[0]["pid"], w)
    ledger.delete(f"hold:{uid}:committed")
    out = res.get(timeout=T)
    assert out == {"customer": first[0][0], "fence": first[0][1]}  # the stored result
    assert ledger_count(ledger, f"{uid}:inserted") == 1  # the body did not run again
    assert rows(pg_store, uid) == first
    fault_report(
        deliveries=delivery_count(ledger, uid), executions=1,
        completions=1 if res.state == SUCCESS else 0, lost=0,
        duplicate_effects=len(rows(pg_store, uid)) - 1,
        notes=database_effects(len(rows(pg_store, uid))),
    )  # fmt: skip


@pytest.mark.scenario(
    "PostgreSQL: paused past the lease",
    inject="SIGSTOP the child after its INSERT, past its lease; a duplicate takes the key "
    "over and commits; SIGCONT",
    expect="the stale transaction rolls back with LeaseLost; one row",
)
def test_a_paused_attempt_that_resumes_after_a_takeover_rolls_back_with_lease_lost(
    spawn: Any, pg_tasks: ModuleType, pg_store: str, ledger: redis.Redis, uid: str,
    fault_report: Any,
) -> None:  # fmt: skip
    w = spawn_pg(spawn, pg_store, lease=2.0)
    ledger.set(f"hold:{uid}:inserted", 1)
    stale = pg_tasks.signup.apply_async((uid, "old@x"), idempotency_key=uid, queue=w.queue)
    wait_for(lambda: ledger_count(ledger, f"{uid}:inserted") == 1, T, message="the INSERT")
    pid = reached(ledger, uid, "inserted")[0]["pid"]
    os.kill(pid, signal.SIGSTOP)  # the body and its renewal thread freeze
    try:
        ledger.delete(f"hold:{uid}:inserted")
        newer = pg_tasks.signup.apply_async((uid, "old@x"), idempotency_key=uid, queue=w.queue)
        wait_for(lambda: ledger_count(ledger, f"{uid}:committed") == 1, T, message="takeover")
    finally:
        os.kill(pid, signal.SIGCONT)
    out = newer.get(timeout=T)
    wait_for(stale.ready, T, message="the stale run ends")
    assert stale.state == "FAILURE"
    assert type(stale.result).__name__ == "LeaseLost"
    assert uid in str(stale.result)
    found = rows(pg_store, uid)
    committed = reached(ledger, uid, "committed")
    assert len(committed) == 1
    assert committed[0]["task_id"] == newer.id
    assert found == [(out["customer"], committed[0]["fence"])]  # the newer run's row only
    fault_report(
        deliveries=delivery_count(ledger, uid), executions=2,
        completions=1 if newer.state == SUCCESS else 0, lost=0, duplicate_effects=len(found) - 1,
        notes=database_effects(len(found)),
    )  # fmt: skip


@pytest.mark.scenario(
    "PostgreSQL: duplicate storm",
    inject="40 concurrent deliveries of one key, 2 workers x 2 prefork children",
    expect="one row; 40 identical results",
)
def test_a_storm_of_duplicates_inserts_one_row(
    spawn: Any, pg_tasks: ModuleType, pg_store: str, ledger: redis.Redis, uid: str,
    fault_report: Any,
) -> None:  # fmt: skip
    first = spawn_pg(spawn, pg_store)
    spawn_pg(spawn, pg_store, queue=first.queue)
    sent = [
        pg_tasks.signup.apply_async((uid, "a@x"), idempotency_key=uid, queue=first.queue)
        for _ in range(40)
    ]
    results = [r.get(timeout=T) for r in sent]
    found = rows(pg_store, uid)
    assert len(found) == 1
    assert results == [{"customer": found[0][0], "fence": found[0][1]}] * 40
    assert ledger_count(ledger, f"{uid}:inserted") == 1
    fault_report(
        deliveries=delivery_count(ledger, uid), executions=1,
        completions=1 if all(r.state == SUCCESS for r in sent) else 0, lost=0,
        duplicate_effects=len(found) - 1,
        notes=database_effects(len(found)),
    )  # fmt: skip


def test_a_worker_refuses_to_start_on_a_database_without_the_table(
    spawn: Any, pg_tasks: ModuleType, pg_server: Any
) -> None:
    empty = str(pg_server.create_database(f"empty_{uuid.uuid4().hex[:8]}"))
    with pytest.raises(RuntimeError, match="worker exited at start") as refused:
        spawn_pg(spawn, empty)
    assert "celery_idem_records" in str(refused.value)
    assert "idem migrate" in str(refused.value)
