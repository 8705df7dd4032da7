"""Durable steps on a real worker: each finished step runs once over all attempts.

Counted from outside the library: each step's function writes to the effect ledger
when it really runs (``tests/integration/step_tasks.py``), and every ``step_replayed``
signal is noted under ``replayed:<key>``. The kill and pause faults are in
``tests/faults/test_step_faults.py``.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import pytest
import redis

from celery_idem.keys import storage_key
from celery_idem.store import RecordState
from celery_idem.store.redis import RedisStore
from devtools.redis_server import RedisServer
from tests.faults.harness import entries
from tests.integration.conftest import Worker, ledger_count, standalone_only
from tests.integration.test_round_trips import Monitor

pytestmark = pytest.mark.integration
T = 60


@pytest.fixture(scope="session")
def steps(tasks: ModuleType) -> ModuleType:
    """``tests.integration.step_tasks`` (the workers import it through ``include``)."""
    return importlib.import_module("tests.integration.step_tasks")


def test_autoretry_runs_the_finished_step_once_over_all_attempts(
    worker: Worker, steps: ModuleType, ledger: redis.Redis, uid: str, celery_env: dict[str, str]
) -> None:
    key = f"ar-{uid}"
    out = steps.st_autoretry.apply_async((uid, 2), idempotency_key=key, queue=worker.queue).get(
        timeout=T
    )
    assert ledger_count(ledger, f"{uid}:one") == 1
    assert ledger_count(ledger, f"{uid}:two") == 3  # two failed runs, then the success
    assert out == {"one": 1, "two": 3}  # "one" is the first run's stored value
    replays = entries(ledger, f"replayed:{key}")
    assert [(r["step"], r["occurrence"]) for r in replays] == [("one", 1), ("one", 1)]
    record = RedisStore.from_url(celery_env["IDEM_TEST_STORE"]).read(
        storage_key("idem", "t.st_autoretry", key)
    )
    assert record is not None
    assert record.state == RecordState.RESULT.value
    assert (record.steps, record.steps_done) == ((), 2)  # dropped; their count is kept


def test_a_loop_of_steps_with_one_name_replays_its_occurrences_in_order(
    worker: Worker, steps: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    key = f"loop-{uid}"
    out = steps.st_loop.apply_async((uid, 10, 4), idempotency_key=key, queue=worker.queue).get(
        timeout=T
    )
    assert out == [i * i for i in range(10)]
    assert ledger_count(ledger, f"{uid}:attempt") == 2
    items = entries(ledger, f"{uid}:item")
    assert [e["i"] for e in items] == list(range(10))  # each occurrence ran once, in order
    assert [e["key"] for e in items] == [f"{key}/item"] + [f"{key}/item#{n}" for n in range(2, 11)]
    replays = entries(ledger, f"replayed:{key}")
    assert [(r["step"], r["occurrence"]) for r in replays] == [("item", n) for n in (1, 2, 3, 4)]


def test_a_step_costs_one_round_trip_and_a_replayed_one_none(
    start_worker: Any,
    store_server: RedisServer,
    steps: ModuleType,
    ledger: redis.Redis,
    uid: str,
    store_topology: str,
) -> None:
    standalone_only(store_topology, "counted on a private standalone server")
    w = start_worker(pool="solo", concurrency=1, extra_env={"IDEM_TEST_STORE": store_server.url(0)})
    monitor = Monitor(store_server)
    try:
        # Warm up: load every script this test meets (claim, step, park, complete).
        steps.st_autoretry.apply_async((f"warm-{uid}", 1), queue=w.queue).get(timeout=T)
        monitor.sync()

        steps.st_checkout.apply_async((uid,), queue=w.queue).get(timeout=T)
        assert monitor.sync() == ["evalsha"] * 4  # claim, step row, step email, complete

        again = steps.st_checkout.apply_async((uid,), queue=w.queue).get(timeout=T)
        assert again["email"] == f"mail-{again['row']['row']}"
        assert monitor.sync() == ["evalsha"]  # a duplicate: the claim answers

        # Attempt 1: claim, step one, (two fails) park. Attempt 2: claim (its reply
        # carries step one: no read to replay it), step two, complete.
        steps.st_autoretry.apply_async((f"ar-{uid}", 1), queue=w.queue).get(timeout=T)
        assert monitor.sync() == ["evalsha"] * 6
        assert ledger_count(ledger, f"ar-{uid}:one") == 1
    finally:
        monitor.close()
