"""Item 14: keys through groups, and callbacks of replayed and redelivered messages."""

from __future__ import annotations

import json
import re
import sys
from types import ModuleType
from typing import Any

import pytest
import redis
from celery import group

from celery_idem.checks import MAX_DURATION
from devtools.processes import free_port, wait_for
from tests.integration.conftest import Worker, ledger_count, standalone_only

pytestmark = pytest.mark.integration
T = 30


def test_key_given_to_a_group_keeps_one_record_per_member(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    key = f"grp-{uid}"
    members = [tasks.record.s(f"{uid}-{i}", i) for i in range(3)]
    first = group(members).apply_async(idempotency_key=key, queue=worker.queue).get(timeout=T)
    assert [r["value"] for r in first] == [0, 1, 2]
    member_keys = [r["key"] for r in first]
    assert [k.split(".")[0] for k in member_keys] == [f"{key}#0", f"{key}#1", f"{key}#2"]
    assert len(set(member_keys)) == 3
    again = group(members).apply_async(idempotency_key=key, queue=worker.queue).get(timeout=T)
    assert again == first
    assert [ledger_count(ledger, f"{uid}-{i}") for i in range(3)] == [1, 1, 1]


def test_duplicate_with_a_new_task_id_runs_its_own_callbacks_with_the_stored_value(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    cb = f"cb-{uid}"
    link = tasks.plain_collect.s(cb).set(queue=worker.queue)
    a = tasks.record.apply_async((uid, 1), link=link, queue=worker.queue)
    b = tasks.record.apply_async((uid, 1), link=link, queue=worker.queue)
    assert a.get(timeout=T) == b.get(timeout=T)
    wait_for(lambda: ledger_count(ledger, cb) == 2, timeout=T, message="both callbacks ran")
    values = [json.loads(x)["value"] for x in ledger.lrange(f"ledger:{cb}", 0, -1)]
    assert values == [a.get(), a.get()]
    assert ledger_count(ledger, uid) == 1


def test_redelivered_completed_message_does_not_dispatch_callbacks_twice(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    cb = f"cb-{uid}"
    link = tasks.plain_collect.s(cb).set(queue=worker.queue)
    task_id = f"redeliver-{uid}"
    value = tasks.record.apply_async((uid, 1), task_id=task_id, link=link, queue=worker.queue)
    value = value.get(timeout=T)
    wait_for(lambda: ledger_count(ledger, cb) == 1, timeout=T, message="first callback")
    # The broker hands the same message (same task id) out again after it completed,
    # as it does when a worker dies between storing the result and acking.
    again = tasks.record.apply_async((uid, 1), task_id=task_id, link=link, queue=worker.queue)
    done = f"t.record[{task_id}] succeeded"
    wait_for(lambda: worker.log().count(done) == 2, timeout=T, message="redelivery handled")
    assert again.get(timeout=T) == value
    # A callback the redelivery sent would be queued ahead of this marker (one FIFO
    # queue), so once the marker ran and every received task finished, it would have run.
    tasks.plain_collect.apply_async((0, f"marker-{uid}"), queue=worker.queue).get(timeout=T)
    wait_for(lambda: all_received_finished(worker), timeout=T, message="queue drained")
    assert ledger_count(ledger, cb) == 1
    assert ledger_count(ledger, uid) == 1


def all_received_finished(worker: Worker) -> bool:
    log = worker.log()
    ids = re.findall(r"Task (\S+\[[^\]]+\]) received", log)
    return all(f"{i} succeeded" in log or f"{i} raised" in log or f"{i} retry" in log for i in ids)


@pytest.mark.parametrize(
    ("lease", "named"),
    [("0.5", "idem_lease"), (str(sys.maxsize), rf"idem_lease .*<= {MAX_DURATION} \(10 years\)")],
    ids=["too short to renew", "longer than Redis holds"],
)
def test_invalid_setting_stops_the_worker_at_start_naming_it(
    start_worker: Any, lease: str, named: str
) -> None:
    # A lease of sys.maxsize seconds used to start the worker, then fail every claim.
    with pytest.raises(RuntimeError, match=named):
        start_worker(extra_env={"IDEM_TEST_LEASE": lease})


def test_a_store_that_is_down_at_start_is_said_at_start_and_the_worker_starts(
    start_worker: Any, store_topology: str
) -> None:
    standalone_only(store_topology, "the store is a closed port in every run")
    down = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    worker = start_worker(extra_env={"IDEM_TEST_STORE": down})
    log = worker.log()
    assert "ready." in log
    warning = next((line for line in log.splitlines() if "did not answer within" in line), "")
    assert f"celery-idem: the store at {down} did not answer" in warning
    assert re.search(r"messages of t\.\w+, t\.\w+", warning)  # names the tasks that use it
    # The suite's default idem_on_store_error is retry: what those messages will meet.
    assert "(idem_on_store_error=retry) are retried later and nothing runs without a claim" in (
        warning
    )
