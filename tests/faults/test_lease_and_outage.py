"""Items 7 and 10: a paused owner loses its lease and cannot overwrite the newer run;
an unreachable store keeps the body from running until it is back, then it runs once."""

from __future__ import annotations

import json
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
from devtools.redis_server import RedisServer
from tests.integration.conftest import ledger_count

pytestmark = pytest.mark.integration
T = 60


@pytest.mark.scenario(
    "pause beyond lease",
    inject="SIGSTOP the owner past its lease, a duplicate takes over, SIGCONT",
    expect="take-over with a higher fence; the stale owner's completion refused and reported",
)
def test_paused_owner_is_taken_over_and_its_late_completion_is_refused(
    start_worker: Any,
    tasks: ModuleType,
    ledger: redis.Redis,
    uid: str,
    celery_env: dict[str, str],
    fault_report: Any,
) -> None:
    w = start_worker(extra_env={"IDEM_TEST_LEASE": "2"})
    key = f"pause-{uid}"
    stale = tasks.record.apply_async((uid, "stale", 3.0), idempotency_key=key, queue=w.queue)
    wait_for(lambda: ledger_count(ledger, uid) == 1, timeout=T, message="first run started")
    pid = json.loads(ledger.lindex(f"ledger:{uid}", 0))["pid"]
    os.kill(pid, signal.SIGSTOP)  # the owner and its renewal thread freeze
    try:
        # Other arguments would be a mismatch; the same ones wait for the lease to end.
        newer = tasks.record.apply_async((uid, "stale", 3.0), idempotency_key=key, queue=w.queue)
        out = newer.get(timeout=T)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert out["value"] == "stale"
    entries = [json.loads(x) for x in ledger.lrange(f"ledger:{uid}", 0, -1)]
    assert len(entries) == 2
    assert entries[1]["fence"] > entries[0]["fence"]  # the take-over ran with a higher fence
    assert entries[1]["task_id"] == newer.id
    # The paused run wakes up, finishes its body, and its completion is refused.
    stale.get(timeout=T)
    # Reported once: by its renewal thread when it wakes, or else by the refused completion.
    wait_for(lambda: "lease lost (" in w.log(), timeout=T, message="lease-lost log")
    line = next(x for x in w.log().splitlines() if "lease lost (" in x)
    assert stale.id in line
    assert key in line
    store = RedisStore.from_url(celery_env["IDEM_TEST_STORE"])
    record = store.read(storage_key("idem", "t.record", key))
    assert record is not None
    assert (record.state, record.fence, record.task_id) == (
        RecordState.RESULT.value,
        entries[1]["fence"],
        newer.id,
    )
    # Two executions by design: the stale one had run its body before it was paused.
    fault_report(deliveries=2, executions=2, completions=1, lost=0, duplicate_effects=1)


@pytest.mark.scenario(
    "store down before claim",
    inject="stop the store's Redis, enqueue, restart it",
    expect="fail closed: not run while down, runs once after",
)
def test_store_down_body_does_not_run_until_it_is_back_then_runs_once(
    start_worker: Any,
    store_server: RedisServer,
    tasks: ModuleType,
    ledger: redis.Redis,
    uid: str,
    fault_report: Any,
) -> None:
    w = start_worker(extra_env={"IDEM_TEST_STORE": store_server.url(0)})
    tasks.record.apply_async((f"warm-{uid}",), queue=w.queue).get(timeout=T)
    store_server.stop()
    res = tasks.record.apply_async((uid, 1), queue=w.queue)
    wait_for(
        lambda: w.log().count(f"t.record[{res.id}] key=") >= 2,
        timeout=T,
        message="at least two deferrals while the store is down",
    )
    assert "store unavailable, body not run" in w.log()
    assert ledger_count(ledger, uid) == 0
    store_server.start()
    assert res.get(timeout=T)["name"] == uid
    assert ledger_count(ledger, uid) == 1
    fault_report(deliveries=1, executions=1, completions=1, lost=0, duplicate_effects=0)


def test_a_full_store_defers_the_task_until_it_has_memory_then_runs_once(
    start_worker: Any,
    server_per_version: RedisServer,
    tasks: ModuleType,
    ledger: redis.Redis,
    uid: str,
) -> None:
    # maxmemory under noeviction (the recommended policy) refuses writes with OOM: an
    # outage, which fails closed like a stopped Redis. Redis 6.2 wraps that OOM into a
    # script error, which must not fail the task for good as a foreign record would.
    w = start_worker(extra_env={"IDEM_TEST_STORE": server_per_version.url(0)})
    tasks.record.apply_async((f"warm-{uid}",), queue=w.queue).get(timeout=T)
    client = server_per_version.client(0)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)
    res = tasks.record.apply_async((uid, 1), queue=w.queue)
    wait_for(
        lambda: res.ready() or w.log().count(f"t.record[{res.id}] key=") >= 2,
        timeout=T,
        message="at least two deferrals while the store is full",
    )
    assert not res.ready(), f"not deferred: {res.result!r}"
    assert "Redis answered OOM" in w.log()
    assert ledger_count(ledger, uid) == 0
    client.config_set("maxmemory", 0)
    assert res.get(timeout=T)["name"] == uid
    assert ledger_count(ledger, uid) == 1
