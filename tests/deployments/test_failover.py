"""Sentinel failover: what a killed primary costs, with and without ``idem_min_replicas``.

Each test starts its own deployment (1 master, 1 replica, 3 sentinels), works through
the store exactly as a worker does (claim, run, complete; a duplicate claims too), kills
the master with SIGKILL at one point, waits for the sentinels to promote the replica
and goes on through the same store object, which follows the failover by itself.

Asynchronous replication usually delivers a write within a millisecond on one machine,
so "the write had not reached the replica yet" is made certain, not hoped for:
``cut_replication()`` stops the replica and drops its link before the write. The
outcomes asserted here are the table in ``docs/deployment.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any, TypeVar

import pytest

from celery_idem import ReplicasNotReached
from celery_idem.store import (
    ClaimRequest,
    ClaimState,
    CompleteRequest,
    RecordKind,
    RecordState,
    Stored,
)
from celery_idem.store.redis import RedisStore
from devtools.processes import wait_for
from devtools.topologies import SentinelDeployment
from tests.integration.conftest import Worker, ledger_count

pytestmark = [pytest.mark.sentinel, pytest.mark.slow]
T = TypeVar("T")

KEY = "idem:failover:k"
LEASE = 8.0  # outlives a failover (~2-3 s here): a held claim stays held
TTL = 60.0
RESULT = Stored(RecordKind.RESULT, b'"sent"', "j")


@pytest.fixture
def deployment() -> Iterator[SentinelDeployment]:
    with SentinelDeployment() as fresh:
        yield fresh


def store(deployment: SentinelDeployment, min_replicas: int) -> RedisStore:
    # A short WAIT timeout keeps the fail-closed cases quick.
    store = RedisStore.from_url(deployment.sentinel_url(0), min_replicas=min_replicas)
    store._wait_ms = 300
    return store


def claim(s: RedisStore, token: str) -> ClaimState:
    return s.claim(
        ClaimRequest(
            KEY, token=token, task_id=f"id-{token}", fingerprint="fp", lease=LEASE, ttl=TTL
        )
    ).state


def first_claim(s: RedisStore) -> int:
    outcome = s.claim(
        ClaimRequest(KEY, token="first", task_id="id-first", fingerprint="fp", lease=LEASE, ttl=TTL)
    )
    assert outcome.state is ClaimState.CLAIMED
    return outcome.fence


def complete(s: RedisStore, fence: int) -> bool:
    return s.complete(
        CompleteRequest(KEY, token="first", fence=fence, task_id="id-first", stored=RESULT, ttl=TTL)
    )


def once_durable(write: Callable[[], T]) -> T:
    """``write()`` once a replica confirms it: a refused claim is released, and a
    completion is the same attempt again, so both may be repeated until then."""

    def attempt() -> tuple[T] | None:
        try:
            return (write(),)
        except ReplicasNotReached:
            return None

    return wait_for(attempt, 15.0, message="a replica confirmed the write")[0]


def fail_over(deployment: SentinelDeployment) -> None:
    old = deployment.kill_master()
    deployment.wait_for_failover(old)


def test_killed_between_claim_and_complete_without_min_replicas_loses_the_claim(
    deployment: SentinelDeployment,
) -> None:
    s = store(deployment, 0)
    with deployment.cut_replication():
        fence = first_claim(s)  # acknowledged by the master only
        deployment.kill_master()
    deployment.wait_for_failover(("127.0.0.1", deployment.servers[0].port))
    # The promoted replica never saw the claim: a duplicate runs the body again...
    assert claim(s, "dup") is ClaimState.CLAIMED
    # ...and the first run's result is refused (fenced): it no longer owns the key.
    assert complete(s, fence) is False


def test_killed_between_claim_and_complete_with_min_replicas_keeps_the_claim(
    deployment: SentinelDeployment,
) -> None:
    s = store(deployment, 1)
    fence = first_claim(s)  # WAIT saw the replica acknowledge it
    fail_over(deployment)
    assert claim(s, "dup") is ClaimState.IN_PROGRESS  # the duplicate waits, does not run
    # With its only replica promoted, the new master has none to confirm a write: the
    # completion is kept on it but reported, until the old master is back as a replica.
    with pytest.raises(ReplicasNotReached):
        complete(s, fence)
    deployment.restart_old_master_as_replica()
    # The scripts are not replicated: the new master may not know them (NOSCRIPT).
    deployment.master.client().script_flush()
    # The first run's retry is confirmed once the replica acknowledges again (the
    # sentinels may still be reconfiguring it for a moment).
    assert once_durable(lambda: complete(s, fence)) is True
    replay = s.claim(
        ClaimRequest(KEY, token="dup2", task_id="id-dup2", fingerprint="fp", lease=LEASE, ttl=TTL)
    )
    assert (replay.state, replay.stored) == (ClaimState.COMPLETED, RESULT)


def test_min_replicas_refuses_a_claim_the_replica_did_not_confirm(
    deployment: SentinelDeployment,
) -> None:
    s = store(deployment, 1)
    with deployment.cut_replication():
        with pytest.raises(ReplicasNotReached, match=KEY) as info:
            first_claim(s)
        assert "0 of idem_min_replicas=1" in str(info.value)
        # Released on the master, so nothing holds the key there either.
        record = s.read(KEY)
        assert record is not None
        assert record.state == RecordState.FREE.value
        deployment.kill_master()
    deployment.wait_for_failover(("127.0.0.1", deployment.servers[0].port))
    # No replica is left to confirm anything: claims stay refused (fail closed)...
    with pytest.raises(ReplicasNotReached):
        claim(s, "early")
    # ...until the old master is back as a replica. The body never ran; the retry
    # claims on the new master and runs it once.
    deployment.restart_old_master_as_replica()
    assert once_durable(lambda: claim(s, "retry")) is ClaimState.CLAIMED


def test_killed_after_complete_without_min_replicas_loses_the_result(
    deployment: SentinelDeployment,
) -> None:
    s = store(deployment, 0)
    fence = first_claim(s)
    wait_for(lambda: deployment.replica.client().exists(KEY), 5.0, message="claim replicated")
    with deployment.cut_replication():
        assert complete(s, fence) is True  # acknowledged by the master only
        deployment.kill_master()
    deployment.wait_for_failover(("127.0.0.1", deployment.servers[0].port))
    # The new master has the claim, not the result: duplicates wait out the lease...
    assert claim(s, "dup") is ClaimState.IN_PROGRESS
    # ...then one of them takes the key over and runs the body a second time.
    takeover = wait_for(
        lambda: (o := s.claim(ClaimRequest(KEY, token="late", task_id="id-late", fingerprint="fp",
                                           lease=LEASE, ttl=TTL))).state is ClaimState.CLAIMED
        and o,
        timeout=LEASE + 5,
        message="lease ran out",
    )  # fmt: skip
    assert takeover.took_over is True


def test_killed_after_complete_with_min_replicas_keeps_the_result(
    deployment: SentinelDeployment,
) -> None:
    s = store(deployment, 1)
    fence = first_claim(s)
    assert complete(s, fence) is True  # WAIT saw the replica acknowledge it
    fail_over(deployment)
    # A duplicate is answered at once: reads need no replica.
    replay = s.claim(
        ClaimRequest(KEY, token="dup", task_id="id-dup", fingerprint="fp", lease=LEASE, ttl=TTL)
    )
    assert (replay.state, replay.stored) == (ClaimState.COMPLETED, RESULT)


def test_min_replicas_reports_a_result_the_replica_did_not_confirm(
    deployment: SentinelDeployment,
) -> None:
    s = store(deployment, 1)
    fence = first_claim(s)
    with deployment.cut_replication():
        with pytest.raises(ReplicasNotReached, match="result"):
            complete(s, fence)
        # Kept on the master: a retry of the completion finds it there (same attempt).
        record = s.read(KEY)
        assert record is not None
        assert record.state == RecordState.RESULT.value
    # The replica is back: the retry is confirmed.
    wait_for(lambda: complete(s, fence), 10.0, message="completion confirmed after reconnect")


@pytest.mark.parametrize("min_replicas", [0, 1])
def test_a_worker_rides_out_a_failover_while_a_body_runs(
    deployment: SentinelDeployment, start_worker: Any, tasks: ModuleType, ledger: Any, uid: str,
    min_replicas: int,
) -> None:  # fmt: skip
    w: Worker = start_worker(
        extra_env={
            "IDEM_TEST_STORE": deployment.sentinel_url(0),
            "IDEM_TEST_MIN_REPLICAS": str(min_replicas),
        }
    )
    first = tasks.sf_wait_flag.apply_async((uid, uid), queue=w.queue)
    wait_for(lambda: ledger_count(ledger, uid) == 1, 30, message="the body started")
    # The claim is on the replica (WAIT saw to it, or replication did): kill the master.
    wait_for(lambda: deployment.replica.client().dbsize() >= 1, 5, message="claim replicated")
    old = deployment.kill_master()
    deployment.wait_for_failover(old)
    deployment.restart_old_master_as_replica()  # a replica again, for WAIT to count
    duplicate = tasks.sf_wait_flag.apply_async((uid, uid), queue=w.queue)
    ledger.set(f"flag:{uid}", 1)  # let the first body return
    assert duplicate.get(timeout=60) == first.get(timeout=60)
    assert ledger_count(ledger, uid) == 1  # the body ran once across the failover
