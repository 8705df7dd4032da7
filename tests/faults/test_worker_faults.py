"""Worker-side faults: duplicate storms, SIGKILLed children and workers, long bodies,
broker redeliveries (Redis visibility timeout, RabbitMQ requeue on a lost connection).

Every figure is counted from outside the library: the effect ledger that the
``t.wf_*`` tasks write (one entry per body run, per delivery), the result backend's
records, and the processes the test killed.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import defaultdict
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
import redis
from celery import Celery

from celery_idem.keys import storage_key
from celery_idem.store import RecordState
from celery_idem.store.redis import RedisStore
from devtools.processes import wait_for
from tests.faults.harness import (
    SUCCESS,
    ChildKiller,
    amqp_url,
    delivery_count,
    entries,
    redelivered_count,
    states,
    wait_for_results,
)
from tests.integration.conftest import Worker, ledger_count

pytestmark = pytest.mark.integration
T = 60


@pytest.fixture
def backend(celery_env: dict[str, str]) -> Iterator[redis.Redis]:
    """The result backend's Redis, read directly (records ``celery-task-meta-<id>``)."""
    client = redis.Redis.from_url(celery_env["IDEM_TEST_BACKEND"])
    yield client
    client.close()


def kill_and_reap(pid: int, worker: Worker) -> None:
    """SIGKILL one pool child and wait until it is gone (its pool reaped it)."""
    assert pid in worker.children(), (pid, worker.children())
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: pid not in worker.children(), timeout=T, message=f"child {pid} reaped")


# ------------------------------------------------------------------------ storms


@pytest.mark.scenario(
    "duplicate storm",
    inject="200 concurrent deliveries of one key, 2 workers x 2 prefork children",
    expect="body runs once; 200 identical results",
)
def test_duplicate_storm_runs_the_body_once_and_gives_every_delivery_its_result(
    spawn: Any,
    tasks: ModuleType,
    ledger: redis.Redis,
    backend: redis.Redis,
    uid: str,
    fault_report: Any,
) -> None:
    first = spawn(concurrency=2)
    second = spawn(queue=first.queue, concurrency=2)
    key = f"storm-{uid}"
    sent = [
        tasks.wf_storm.apply_async((uid, "v", 2.0), idempotency_key=key, queue=first.queue)
        for _ in range(200)
    ]
    records = wait_for_results(backend, [r.id for r in sent], timeout=T)
    counts = states(records)
    assert counts == {SUCCESS: 200}, counts
    results = [r["result"] for r in records.values() if r is not None]
    runs = entries(ledger, uid)
    assert len(runs) == 1
    assert ledger_count(ledger, f"{uid}:end") == 1
    assert results == [{"value": "v", "key": key, "fence": runs[0]["fence"]}] * 200
    # All four processes, in both workers, took deliveries of the one key.
    handlers = {e["pid"] for e in entries(ledger, f"{uid}:delivered")}
    assert handlers == set(first.children()) | set(second.children()), handlers
    assert len(handlers) == 4
    fault_report(
        deliveries=delivery_count(ledger, uid),
        executions=len(runs),
        completions=len({(r["key"], r["fence"]) for r in results}),
        lost=200 - counts[SUCCESS],
        duplicate_effects=len(runs) - 1,
    )


# 5 000 messages: 3 200 keys sent once, 300 keys sent 6 times (1 500 duplicates, 30 %),
# each of those in two bursts of 3 back-to-back copies, so that copies meet a running
# first execution (deferred) as well as a completed one (replayed).
STORM_UNIQUE, STORM_HOT, STORM_BURSTS, STORM_BURST = 3200, 300, 2, 3
STORM_PAUSE, STORM_HOT_PAUSE = 0.01, 0.05


@pytest.mark.scenario(
    "mixed storm",
    inject="5 000 messages: 3 500 keys, 300 of them sent 6 times in bursts (30 % duplicates); "
    "a worker child SIGKILLed every 2-3 s",
    expect="each key completed once; no task lost; re-runs only of killed runs (counted)",
)
def test_mixed_storm_with_children_killed_completes_every_key_once_and_loses_nothing(
    spawn: Any,
    tasks: ModuleType,
    ledger: redis.Redis,
    backend: redis.Redis,
    uid: str,
    fault_report: Any,
) -> None:
    w = spawn(concurrency=4, extra_env={"IDEM_TEST_LEASE": "2"})
    rng = random.Random(uid)
    units = [[(f"u{i}", STORM_PAUSE)] for i in range(STORM_UNIQUE)]
    units += [[(f"h{i}", STORM_HOT_PAUSE)] * STORM_BURST for i in range(STORM_HOT)] * STORM_BURSTS
    rng.shuffle(units)
    messages = [message for unit in units for message in unit]
    assert len(messages) == 5000
    sent: dict[str, str] = {}  # task id -> key
    with ChildKiller([w], every=(2.0, 3.0), max_kills=40, max_seconds=150, seed=rng.random()) as k:
        for key, pause in messages:
            res = tasks.wf_storm.apply_async(
                (uid, key, pause), idempotency_key=f"{uid}-{key}", queue=w.queue
            )
            sent[res.id] = key
        records = wait_for_results(backend, list(sent), timeout=150)
    killed = set(k.killed)
    counts = states(records)
    lost = len(sent) - counts[SUCCESS]
    assert lost == 0, counts
    assert len(killed) >= 2, f"the killer only killed {len(killed)} children"

    # One completion per key: every delivery of a key got the same value and fence.
    outcomes: dict[str, set[tuple[Any, ...]]] = defaultdict(set)
    for tid, rec in records.items():
        assert rec is not None
        outcomes[sent[tid]].add(
            (rec["result"]["key"], rec["result"]["value"], rec["result"]["fence"])
        )
    assert len(outcomes) == STORM_UNIQUE + STORM_HOT
    bad = {key: o for key, o in outcomes.items() if len(o) != 1}
    assert not bad, f"keys with more than one outcome: {bad}"
    completed_fence = {}
    for key, ((full_key, value, fence),) in outcomes.items():
        assert (full_key, value) == (f"{uid}-{key}", key)
        completed_fence[key] = fence

    # Runs per key from the ledger: the last one (highest fence) is the one whose
    # outcome everyone got; every earlier one ran in a child the killer killed.
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in entries(ledger, uid):
        runs[run["key"].removeprefix(f"{uid}-")].append(run)
    assert set(runs) == set(outcomes)
    extra = 0
    for key, key_runs in runs.items():
        key_runs.sort(key=lambda r: r["fence"])
        fences = [r["fence"] for r in key_runs]
        assert len(set(fences)) == len(fences), (key, key_runs)
        assert fences[-1] == completed_fence[key], (key, key_runs)
        outside = [r for r in key_runs[:-1] if r["pid"] not in killed]
        assert not outside, f"{key}: re-run after a run that was not killed: {key_runs}"
        extra += len(key_runs) - 1
    executions = sum(len(r) for r in runs.values())
    fault_report(
        deliveries=delivery_count(ledger, uid),
        executions=executions,
        completions=sum(len(o) for o in outcomes.values()),
        lost=lost,
        duplicate_effects=extra,
    )


# ------------------------------------------------------------------------ crashes


@pytest.mark.scenario(
    "kill before effect",
    inject="SIGKILL the child right after its claim, before the side effect",
    expect="re-run after the lease; one completion",
)
def test_child_killed_after_its_claim_is_rerun_after_the_lease_and_completes_once(
    spawn: Any, tasks: ModuleType, ledger: redis.Redis, uid: str, fault_report: Any
) -> None:
    lease = 2.0
    w = spawn(extra_env={"IDEM_TEST_LEASE": str(lease)})
    ledger.set(f"ledger:{uid}:hold", 1)
    res = tasks.wf_hold.apply_async((uid, "v"), queue=w.queue)
    wait_for(lambda: ledger_count(ledger, f"{uid}:claimed") == 1, timeout=T, message="claimed")
    kill_and_reap(entries(ledger, f"{uid}:claimed")[0]["pid"], w)
    ledger.delete(f"ledger:{uid}:hold")
    out = res.get(timeout=T)
    claims, effects = entries(ledger, f"{uid}:claimed"), entries(ledger, uid)
    assert len(claims) == 2
    assert len(effects) == 1
    assert claims[0]["task_id"] == claims[1]["task_id"] == res.id  # the message, redelivered
    assert redelivered_count(ledger, uid, res.id) >= 1
    assert claims[1]["fence"] > claims[0]["fence"]  # taken over...
    assert claims[1]["t"] - claims[0]["t"] >= lease - 0.25  # ...once the lease ran out
    assert out == {"name": uid, "value": "v", "fence": claims[1]["fence"]}
    assert effects[0]["fence"] == claims[1]["fence"]
    fault_report(
        deliveries=delivery_count(ledger, uid),
        executions=len(claims),
        completions=len(effects),
        lost=0 if res.state == SUCCESS else 1,
        duplicate_effects=len(effects) - 1,
    )


@pytest.mark.scenario(
    "kill after complete, before ack",
    inject="SIGKILL the child after its record is completed, before the result and the ack",
    expect="the redelivery is served from the store; no new execution",
)
def test_child_killed_between_completion_and_ack_is_replayed_not_rerun(
    spawn: Any, tasks: ModuleType, ledger: redis.Redis, uid: str, fault_report: Any
) -> None:
    w = spawn()
    res = tasks.wf_die_after_complete.apply_async((uid,), queue=w.queue)
    died = int(wait_for(lambda: ledger.get(f"ledger:{uid}:died"), timeout=T, message="kill"))
    out = res.get(timeout=T)  # only the redelivery stores a result in the backend
    deliveries = entries(ledger, f"{uid}:delivered")
    runs = entries(ledger, uid)
    assert [(d["task_id"], d["redelivered"]) for d in deliveries] == [
        (res.id, False),
        (res.id, True),
    ]
    assert deliveries[0]["pid"] == died != deliveries[1]["pid"]
    assert len(runs) == 1  # the redelivery did not run the body...
    assert runs[0]["pid"] == died
    assert out == {"name": uid, "fence": runs[0]["fence"]}  # ...it replayed the stored one
    fault_report(
        deliveries=delivery_count(ledger, uid),
        executions=len(runs),
        completions=1 if res.state == SUCCESS else 0,
        lost=0 if res.state == SUCCESS else 1,
        duplicate_effects=len(runs) - 1,
    )


# ------------------------------------------------------------------------ long bodies


@pytest.mark.scenario(
    "long task",
    inject="body runs 10 s under a 1 s lease; a duplicate arrives every second",
    expect="never taken over (one execution, fence unchanged)",
)
def test_body_ten_times_its_lease_is_never_taken_over(
    worker: Worker,
    tasks: ModuleType,
    ledger: redis.Redis,
    celery_env: dict[str, str],
    uid: str,
    fault_report: Any,
) -> None:
    key = f"long-{uid}"
    first = tasks.wf_long.apply_async((uid, 10.0), idempotency_key=key, queue=worker.queue)
    wait_for(lambda: ledger_count(ledger, uid) == 1, timeout=T, message="first run started")
    started = time.monotonic()
    dups = []
    for i in range(1, 10):  # paced by the clock: one duplicate per lease, 1 s .. 9 s in
        wait_for(lambda i=i: time.monotonic() - started >= i, timeout=T)
        assert ledger_count(ledger, f"{uid}:end") == 0  # still running
        dups.append(tasks.wf_long.apply_async((uid, 10.0), idempotency_key=key, queue=worker.queue))
    out = first.get(timeout=T)
    runs = entries(ledger, uid)
    assert len(runs) == 1
    assert ledger_count(ledger, f"{uid}:end") == 1
    assert out == {"name": uid, "fence": runs[0]["fence"]}
    assert [d.get(timeout=T) for d in dups] == [out] * len(dups)
    # Each duplicate reached a worker while the body still ran (and was deferred).
    ended = entries(ledger, f"{uid}:end")[0]["t"]
    first_seen: dict[str, float] = {}
    for d in entries(ledger, f"{uid}:delivered"):
        first_seen.setdefault(d["task_id"], d["t"])
    assert all(first_seen[d.id] < ended for d in dups), (first_seen, ended)
    store = RedisStore.from_url(celery_env["IDEM_TEST_STORE"])
    record = store.read(storage_key("idem", "t.wf_long", key))
    assert record is not None
    assert (record.state, record.fence) == (RecordState.RESULT.value, runs[0]["fence"])
    fault_report(
        deliveries=delivery_count(ledger, uid),
        executions=len(runs),
        completions=ledger_count(ledger, f"{uid}:end"),
        lost=0,
        duplicate_effects=len(runs) - 1,
    )


# ------------------------------------------------------------------------ brokers


@pytest.mark.scenario(
    "visibility timeout",
    inject="Redis broker visibility_timeout 1 s, body 6 s: the running message is redelivered",
    expect="the second delivery does not run the body",
)
def test_visibility_timeout_redelivery_does_not_run_the_body_again(
    spawn: Any, tasks: ModuleType, ledger: redis.Redis, uid: str, fault_report: Any
) -> None:
    w = spawn(extra_env={"IDEM_TEST_VISIBILITY": "1"})
    res = tasks.wf_storm.apply_async((uid, "v", 6.0), queue=w.queue)
    wait_for(lambda: ledger_count(ledger, uid) == 1, timeout=T, message="first run started")
    wait_for(
        lambda: redelivered_count(ledger, uid, res.id) >= 1,
        timeout=T,
        message="the broker redelivered the running message",
    )
    assert ledger_count(ledger, f"{uid}:end") == 0  # redelivered while the body ran
    out = res.get(timeout=T)
    runs = entries(ledger, uid)
    assert len(runs) == 1
    assert ledger_count(ledger, f"{uid}:end") == 1
    assert out["fence"] == runs[0]["fence"]
    fault_report(
        deliveries=delivery_count(ledger, uid),
        executions=len(runs),
        completions=ledger_count(ledger, f"{uid}:end"),
        lost=0 if res.state == SUCCESS else 1,
        duplicate_effects=len(runs) - 1,
    )


@pytest.fixture
def amqp_app(celery_env: dict[str, str]) -> Iterator[Celery]:
    """A producer on RabbitMQ with the suite's Redis result backend."""
    app = Celery("idemtest-amqp", broker=amqp_url(), backend=celery_env["IDEM_TEST_BACKEND"])
    app.conf.broker_connection_retry_on_startup = True
    yield app
    app.close()


@pytest.mark.rabbitmq
@pytest.mark.scenario(
    "RabbitMQ redelivery",
    inject="worker on RabbitMQ SIGKILLed (whole process group) mid-task, then restarted",
    expect="the unacked message comes back; one completion",
)
def test_rabbitmq_worker_killed_mid_task_redelivers_and_completes_once(
    spawn: Any,
    amqp_app: Celery,
    ledger: redis.Redis,
    uid: str,
    fault_report: Any,
) -> None:
    lease = 2.0
    env = {"IDEM_TEST_BROKER": amqp_url(), "IDEM_TEST_LEASE": str(lease)}
    w = spawn(extra_env=env)
    try:
        ledger.set(f"ledger:{uid}:hold", 1)
        res = amqp_app.send_task("t.wf_hold", (uid, "v"), queue=w.queue)
        wait_for(lambda: ledger_count(ledger, f"{uid}:claimed") == 1, timeout=T, message="claim")
        w.kill()  # main process and children: the connection drops, the message is unacked
        ledger.delete(f"ledger:{uid}:hold")
        spawn(queue=w.queue, extra_env=env)
        out = res.get(timeout=T)
        claims, effects = entries(ledger, f"{uid}:claimed"), entries(ledger, uid)
        assert len(claims) == 2
        assert len(effects) == 1
        assert claims[0]["task_id"] == claims[1]["task_id"] == res.id
        assert redelivered_count(ledger, uid, res.id) >= 1  # RabbitMQ's own flag
        assert claims[1]["fence"] > claims[0]["fence"]
        assert out == {"name": uid, "value": "v", "fence": claims[1]["fence"]}
        assert effects[0]["fence"] == claims[1]["fence"]
    finally:
        spawn.kill_all()  # before the queue goes: a consumer of a deleted queue complains
        with amqp_app.connection_for_write() as conn:
            conn.default_channel.queue_delete(w.queue)
            conn.default_channel.exchange_delete(w.queue)
    fault_report(
        deliveries=delivery_count(ledger, uid),
        executions=len(claims),
        completions=len(effects),
        lost=0 if res.state == SUCCESS else 1,
        duplicate_effects=len(effects) - 1,
    )
