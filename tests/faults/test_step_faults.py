"""Durable steps under faults: a child killed between two steps, an owner paused past
its lease between two steps.

Counted from outside the library: each step's function writes to the effect ledger
when it really runs (``tests/integration/step_tasks.py``), deliveries are noted by the
task base, and ``step_replayed`` signals under ``replayed:<key>``.
"""

from __future__ import annotations

import importlib
import os
import signal
from types import ModuleType
from typing import Any

import pytest
import redis

from celery_idem.keys import storage_key
from celery_idem.store import RecordState
from celery_idem.store.redis import RedisStore
from devtools.processes import wait_for
from tests.faults.harness import SUCCESS, delivery_count, entries, redelivered_count
from tests.faults.test_worker_faults import kill_and_reap
from tests.integration.conftest import ledger_count

pytestmark = pytest.mark.integration
T = 60


@pytest.fixture(scope="session")
def steps(tasks: ModuleType) -> ModuleType:
    """``tests.integration.step_tasks`` (the workers import it through ``include``)."""
    return importlib.import_module("tests.integration.step_tasks")


@pytest.mark.scenario(
    "kill between steps",
    inject="SIGKILL the child after step 1 (a row) was stored, before step 2 (an email)",
    expect="the redelivery replays step 1 and runs step 2 once",
)
def test_child_killed_between_steps_resumes_at_the_second_step(
    spawn: Any, steps: ModuleType, ledger: redis.Redis, uid: str, fault_report: Any
) -> None:
    lease = 2.0
    w = spawn(extra_env={"IDEM_TEST_LEASE": str(lease)})
    key = f"kill-{uid}"
    ledger.set(f"ledger:{uid}:hold", 1)
    res = steps.st_checkout.apply_async((uid,), idempotency_key=key, queue=w.queue)
    wait_for(lambda: ledger_count(ledger, f"{uid}:between") == 1, timeout=T, message="step 1")
    kill_and_reap(entries(ledger, f"{uid}:between")[0]["pid"], w)
    ledger.delete(f"ledger:{uid}:hold")
    out = res.get(timeout=T)
    rows, emails = entries(ledger, f"{uid}:row"), entries(ledger, f"{uid}:email")
    betweens = entries(ledger, f"{uid}:between")
    assert len(rows) == 1  # step 1 ran zero times on the redelivery...
    assert len(emails) == 1  # ...and step 2 once
    assert len(betweens) == 2  # two executions of the body: the killed one, the redelivery
    assert betweens[0]["task_id"] == betweens[1]["task_id"] == res.id
    assert redelivered_count(ledger, uid, res.id) >= 1
    assert betweens[1]["fence"] > betweens[0]["fence"]  # taken over after the lease
    replays = entries(ledger, f"replayed:{key}")
    assert [(r["step"], r["fence"]) for r in replays] == [("row", betweens[1]["fence"])]
    # The email got the row the killed run created, and the downstream key of its step.
    assert out["row"] == {"row": rows[0]["fence"]} == {"row": betweens[0]["fence"]}
    assert emails[0]["row"] == rows[0]["fence"]
    assert (rows[0]["key"], emails[0]["key"]) == (f"{key}/row", f"{key}/email")
    fault_report(
        deliveries=delivery_count(ledger, uid),
        executions=len(betweens),
        completions=1 if res.state == SUCCESS else 0,
        lost=0 if res.state == SUCCESS else 1,
        duplicate_effects=len(rows) - 1 + len(emails) - 1,
    )


@pytest.mark.scenario(
    "pause between steps",
    inject="SIGSTOP the owner after step 1, past its lease; a duplicate takes over and "
    "stores step 2; SIGCONT",
    expect="the stale owner's next step raises LeaseLost, runs and stores nothing",
)
def test_owner_paused_between_steps_stops_at_its_next_step_with_lease_lost(
    spawn: Any,
    steps: ModuleType,
    ledger: redis.Redis,
    uid: str,
    celery_env: dict[str, str],
    fault_report: Any,
) -> None:
    w = spawn(extra_env={"IDEM_TEST_LEASE": "2"})
    key = f"pause-{uid}"
    ledger.set(f"ledger:{uid}:hold", 1)
    ledger.set(f"ledger:{uid}:after", 1)
    stale = steps.st_pause.apply_async((uid,), idempotency_key=key, queue=w.queue)
    wait_for(lambda: ledger_count(ledger, f"{uid}:between") == 1, timeout=T, message="step 1")
    pid = entries(ledger, f"{uid}:between")[0]["pid"]
    os.kill(pid, signal.SIGSTOP)  # the owner and its renewal thread freeze
    try:
        ledger.delete(f"ledger:{uid}:hold")  # on waking, the stale run goes on to step 2
        newer = steps.st_pause.apply_async((uid,), idempotency_key=key, queue=w.queue)
        # The newer message waits out the lease, takes over, replays step 1, stores step 2
        # and holds at "after" with the key still in progress.
        wait_for(lambda: ledger_count(ledger, f"{uid}:two") == 1, timeout=T, message="step 2")
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: stale.ready(), timeout=T, message="the stale run ends")
    assert stale.state == "FAILURE"
    assert type(stale.result).__name__ == "LeaseLost"
    assert key in str(stale.result)
    ones, twos = entries(ledger, f"{uid}:one"), entries(ledger, f"{uid}:two")
    assert len(ones) == 1  # the newer owner replayed step 1
    assert len(twos) == 1  # the stale run did not run step 2...
    assert twos[0]["task_id"] == newer.id
    store = RedisStore.from_url(celery_env["IDEM_TEST_STORE"])
    record = store.read(storage_key("idem", "t.st_pause", key))
    assert record is not None
    assert (record.state, record.task_id) == (RecordState.IN_PROGRESS.value, newer.id)
    # ...nor stored anything: the record holds step 1 as the stale run stored it and
    # step 2 as the new owner did.
    assert [s.name for s in record.steps] == ["one", "two"]
    assert [s.value for s in record.steps] == [
        str(ones[0]["fence"]).encode(),
        str(twos[0]["fence"]).encode(),
    ]
    assert twos[0]["fence"] > ones[0]["fence"]
    wait_for(lambda: "lease lost (" in w.log(), timeout=T, message="lease-lost log")
    ledger.delete(f"ledger:{uid}:after")
    assert newer.get(timeout=T) == {"fence": twos[0]["fence"]}
    fault_report(
        deliveries=delivery_count(ledger, uid),
        executions=2,
        completions=1 if newer.state == SUCCESS else 0,
        lost=0 if newer.state == SUCCESS else 1,
        duplicate_effects=len(ones) - 1 + len(twos) - 1,
    )
