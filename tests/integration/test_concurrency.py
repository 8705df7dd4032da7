"""Items 5-7 and 16: concurrent duplicates, renewal, crashes, redelivery and fencing,
on real prefork workers (one child is SIGKILLed from outside), and renewal on every
execution pool (prefork, solo, threads, gevent)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
from types import ModuleType
from typing import Any

import kombu
import pytest
import redis

from celery_idem import DuplicateInProgress
from celery_idem.keys import storage_key
from celery_idem.store import ClaimRequest, ClaimState, RecordState
from celery_idem.store.redis import RedisStore
from devtools.processes import wait_for
from tests.integration.conftest import Worker, ledger_count, standalone_only

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


LEASE = 2.0
GEVENT = pytest.mark.skipif(
    importlib.util.find_spec("gevent") is None,
    reason="gevent is not installed (a dev extra: pip install -e '.[dev]')",
)
POOLS = [
    pytest.param("prefork", 2, id="prefork"),
    pytest.param("solo", 1, id="solo"),
    pytest.param("threads", 4, id="threads"),
    pytest.param("gevent", 10, id="gevent", marks=GEVENT),
]


def server_ms(store: RedisStore) -> int:
    seconds, micros = store.client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def wait_leases_after(store: RedisStore, fence: int, leases: float) -> None:
    """Until the server clock is ``leases`` leases past a fresh key's claim (its fence)."""
    wait_for(
        lambda: server_ms(store) > fence + leases * LEASE * 1000,
        timeout=T,
        message=f"{leases} leases after the claim",
    )


@pytest.mark.parametrize("body", ["sleeps", "computes"])
@pytest.mark.parametrize(("pool", "concurrency"), POOLS)
def test_a_body_three_leases_long_runs_once_on_every_pool(
    start_worker: Any,
    tasks: ModuleType,
    ledger: redis.Redis,
    uid: str,
    celery_env: dict[str, str],
    store_topology: str,
    pool: str,
    concurrency: int,
    body: str,
) -> None:
    # The renewer is a background thread, a greenlet under gevent's monkeypatching: on
    # every pool it must keep a 2 s lease alive through a 6 s body that sleeps (which
    # yields under gevent) or computes, while duplicates (same key, new task ids) reach
    # the same worker and another one. Without renewal the other worker's duplicate,
    # coming back every 0.5 to 2 s, would take the key over and run the body again.
    standalone_only(store_topology, "the pool is under test, not the store")
    w = start_worker(pool=pool, concurrency=concurrency)
    other = start_worker(pool="solo", concurrency=1)
    task = tasks.slow if body == "sleeps" else tasks.compute
    args: tuple[Any, ...] = (uid, 3 * LEASE)
    if body == "computes" and pool == "gevent":
        # Under gevent a computing body must yield now and then for the renewal
        # greenlet to run (one that never does: the next test); threads need not.
        args = (uid, 3 * LEASE, 0.1)
    key = f"pool-{pool}-{body}-{uid}"
    store = RedisStore.from_url(celery_env["IDEM_TEST_STORE"])
    record_key = storage_key("idem", task.name, key)

    def send(queue: str) -> Any:
        return task.apply_async(args, idempotency_key=key, idem_lease=LEASE, queue=queue)

    first = send(w.queue)
    wait_for(lambda: ledger_count(ledger, uid) == 1, timeout=T, message="first run started")
    fence = ledger_entries(ledger, uid)[0]["fence"]  # a fresh key's fence: the claim's ms
    dups = []
    for leases in (1.5, 2.5):
        # Past the deadline the claim set (and, at 2.5, past the first renewal's too).
        wait_leases_after(store, fence, leases)
        record = store.read(record_key)
        assert record is not None
        assert (record.state, record.fence, record.task_id) == (
            RecordState.IN_PROGRESS.value,
            fence,
            first.id,
        )
        assert record.lease_left is not None
        assert record.lease_left > 0, "the lease was not renewed"
        dups.append(send(w.queue))
        elsewhere = send(other.queue)
        dups.append(elsewhere)
        # The other worker's duplicate has claimed: deferred (RETRY), or, had it taken the
        # key over, run (SUCCESS, and two effects in the ledger).
        wait_for(lambda: elsewhere.state != "PENDING", timeout=T, message="duplicate handled")  # noqa: B023
    out = first.get(timeout=T)
    assert out == {"name": uid, "fence": fence}
    assert [d.get(timeout=T) for d in dups] == [out] * len(dups)
    assert ledger_count(ledger, uid) == 1
    assert "took over" not in w.log() + other.log()
    assert "overdue" not in w.log()


@GEVENT
def test_under_gevent_a_body_that_never_yields_starves_the_renewer_which_says_so(
    start_worker: Any,
    tasks: ModuleType,
    ledger: redis.Redis,
    uid: str,
    celery_env: dict[str, str],
    store_topology: str,
) -> None:
    # gevent is cooperative: while a body computes without yielding, no other greenlet
    # runs, the renewal one included, so its lease runs out (another worker could take
    # the key over: docs/failure-modes.md, "Pools"). The worker's log must say why.
    standalone_only(store_topology, "the pool is under test, not the store")
    w = start_worker(pool="gevent", concurrency=10)
    key = f"starved-{uid}"
    store = RedisStore.from_url(celery_env["IDEM_TEST_STORE"])
    first = tasks.compute.apply_async(
        (uid, 3 * LEASE), idempotency_key=key, idem_lease=LEASE, queue=w.queue
    )
    wait_for(lambda: ledger_count(ledger, uid) == 1, timeout=T, message="first run started")
    fence = ledger_entries(ledger, uid)[0]["fence"]
    wait_leases_after(store, fence, 1.5)
    record = store.read(storage_key("idem", "t.compute", key))
    assert record is not None
    assert record.lease_left is not None
    assert record.lease_left < 0  # not renewed: the limit this test documents
    assert first.get(timeout=T) == {"name": uid, "fence": fence}  # nobody took it over
    warning = f"renewal of the lease of t.compute[{first.id}]"
    wait_for(lambda: warning in w.log(), timeout=T, message=f"{warning!r} in the worker log")
    (line,) = [line for line in w.log().splitlines() if warning in line]
    assert "WARNING" in line
    assert "computes without yielding" in line


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


@pytest.mark.skipif(
    kombu.VERSION[:2] < (5, 7),
    reason="needs kombu 5.7's unacked_restore_interval: an older Redis transport restores "
    "unacked messages about every 100 s, after this test's deadline",
)
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


def test_a_waiting_duplicate_looks_again_at_most_every_2_s_and_says_so_once(
    worker: Worker,
    tasks: ModuleType,
    ledger: redis.Redis,
    uid: str,
    celery_env: dict[str, str],
    store_topology: str,
) -> None:
    standalone_only(store_topology, "the deferral schedule is under test, not the store")
    key = f"wait-{uid}"
    store = RedisStore.from_url(celery_env["IDEM_TEST_STORE"])
    # A holder that stopped renewing (its worker died) with 9 s of lease left: the
    # duplicate waits it out, then takes the key over and runs. Backing off to 4 s and
    # more, it used to come back seconds after it could have.
    held = store.claim(
        ClaimRequest(
            storage_key("idem", tasks.record.name, key),
            token="dead-worker", task_id="dead-task", fingerprint="", lease=9, ttl=60,
        )
    )  # fmt: skip
    assert held.state is ClaimState.CLAIMED
    duplicate = tasks.record.apply_async((uid,), idempotency_key=key, queue=worker.queue)
    assert duplicate.get(timeout=T)["name"] == uid
    assert ledger_count(ledger, uid) == 1

    looks = [entry["retry_in"] for entry in ledger_entries(ledger, f"waits:{key}")]
    assert len(looks) >= 4, looks
    assert max(looks) <= 2.0, looks
    lines = [line for line in worker.log().splitlines() if duplicate.id in line]
    # One INFO line for the first look, the later ones at DEBUG; Celery's own "retry"
    # line of each deferral is left out.
    assert len([line for line in lines if "held by task dead-task" in line]) == 1, lines
    assert not [line for line in lines if " retry: " in line], lines
