"""Items 5-7 and 16: concurrent duplicates, renewal, crashes, redelivery and fencing,
on real prefork workers (one child is SIGKILLed from outside)."""

from __future__ import annotations

import json
import os
import signal
from types import ModuleType
from typing import Any

import pytest
import redis

from celery_idem import DuplicateInProgress
from tests.integration.conftest import Worker, ledger_count
from tests.redis_server import wait_for

pytestmark = pytest.mark.integration
T = 60


def ledger_entries(ledger: redis.Redis, name: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in ledger.lrange(f"ledger:{name}", 0, -1)]


def test_concurrent_duplicates_run_the_body_once_and_all_succeed(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    key = f"storm-{uid}"
    results = [
        tasks.record.apply_async((uid, 1, 1.5), idempotency_key=key, queue=worker.queue)
        for _ in range(8)
    ]
    values = [r.get(timeout=T) for r in results]
    assert all(r.state == "SUCCESS" for r in results)
    assert values == [values[0]] * 8
    assert ledger_count(ledger, uid) == 1
    # Both prefork children handled these messages, each through its own store
    # connection made after the fork (a shared socket would garble the replies).
    handlers = {
        line.split("/")[1].split("]")[0]
        for line in worker.log().splitlines()
        if any(r.id in line for r in results) and "ForkPoolWorker" in line
    }
    assert len(handlers) == 2, handlers


def test_task_five_times_longer_than_its_lease_is_never_taken_over(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    # t.slow has idem_lease=1; the body runs 5 s, duplicates keep arriving meanwhile.
    first = tasks.slow.apply_async((uid, 5.0), queue=worker.queue)
    wait_for(lambda: ledger_count(ledger, uid) == 1, timeout=T, message="first run started")
    dups = []
    for _ in range(4):
        dups.append(tasks.slow.apply_async((uid, 5.0), queue=worker.queue))
        wait_for(lambda: dups[-1].state == "RETRY", timeout=T, message="duplicate deferred")
    out = first.get(timeout=T)
    assert out["fence"] == ledger_entries(ledger, uid)[0]["fence"]  # never taken over
    assert [d.get(timeout=T) for d in dups] == [out] * 4
    assert ledger_count(ledger, uid) == 1


def test_sigkilled_child_frees_the_key_within_a_lease_and_redelivery_runs_once(
    start_worker: Any, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    w = start_worker(extra_env={"IDEM_TEST_LEASE": "3"})
    res = tasks.record.apply_async((uid, 1, 4.0), queue=w.queue)
    wait_for(lambda: ledger_count(ledger, uid) == 1, timeout=T, message="first run started")
    pid = ledger_entries(ledger, uid)[0]["pid"]
    assert pid in w.children()
    os.kill(pid, signal.SIGKILL)
    out = res.get(timeout=T)
    entries = ledger_entries(ledger, uid)
    assert len(entries) == 2  # the killed run and the redelivered one, nothing more
    assert entries[1]["fence"] > entries[0]["fence"]  # taken over once the lease ran out
    assert entries[1]["task_id"] == res.id  # the same message, redelivered
    assert out["name"] == uid
    assert "took over" in w.log()


def test_visibility_timeout_redelivery_while_running_does_not_run_the_body(
    start_worker: Any, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    # The broker hands the unacked message out again after 1 s while the body runs 6 s.
    w = start_worker(extra_env={"IDEM_TEST_VISIBILITY": "1"})
    res = tasks.record.apply_async((uid, 1, 6.0), queue=w.queue)
    wait_for(lambda: ledger_count(ledger, uid) == 1, timeout=T, message="first run started")
    wait_for(
        lambda: w.log().count(f"t.record[{res.id}] received") >= 2,
        timeout=T,
        message="the broker redelivered the running message",
    )
    assert res.get(timeout=T)["name"] == uid
    assert ledger_count(ledger, uid) == 1


def test_wait_policy_blocks_the_duplicate_until_the_result_is_stored(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    first = tasks.wait_slow.apply_async((uid, 2.0), queue=worker.queue)
    wait_for(lambda: ledger_count(ledger, uid) == 1, timeout=T, message="first run started")
    dup = tasks.wait_slow.apply_async((uid, 2.0), queue=worker.queue)
    assert dup.get(timeout=T) == first.get(timeout=T) == f"{uid} done"
    assert ledger_count(ledger, uid) == 1
    assert f"t.wait_slow[{dup.id}] retry" not in worker.log()  # it waited, it did not re-queue


def test_raise_policy_fails_the_duplicate_with_duplicate_in_progress(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    first = tasks.raise_slow.apply_async((uid, 2.0), queue=worker.queue)
    wait_for(lambda: ledger_count(ledger, uid) == 1, timeout=T, message="first run started")
    dup = tasks.raise_slow.apply_async((uid, 2.0), queue=worker.queue)
    with pytest.raises(DuplicateInProgress, match=first.id):
        dup.get(timeout=T)
    assert first.get(timeout=T) == f"{uid} done"
    assert ledger_count(ledger, uid) == 1
