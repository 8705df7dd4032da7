"""Lease renewal (``celery_idem.renewer``) and the MemoryStore's lease clock.

The renewer tests run a private :class:`Renewer` (its own daemon thread) against a
MemoryStore with a real one-second lease, and wait on counters with deadlines
(``wait_for``), never on bare sleeps. freezegun stays out of them: it also freezes
``time.monotonic``, which the renewer thread schedules by. The MemoryStore's lease
and retention arithmetic is checked separately under freezegun, without any thread.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from freezegun import freeze_time

from celery_idem.exceptions import IdempotencyError, StoreUnavailable
from celery_idem.renewer import Lease, Renewer, next_due
from celery_idem.store import (
    ClaimOutcome,
    ClaimRequest,
    ClaimState,
    CompleteRequest,
    MemoryStore,
    RecordKind,
    Stored,
)
from devtools.processes import wait_for

LEASE = 1.0
"""The shortest lease the settings accept, so a test sees several renewals quickly."""
TTL = 60.0

_keys = itertools.count()


def fresh_key() -> str:
    return f"renew:{next(_keys)}"


def claim(store: Any, key: str, token: str, *, lease: float = LEASE) -> ClaimOutcome:
    outcome: ClaimOutcome = store.claim(
        ClaimRequest(
            key, token=token, task_id=f"task-{token}", fingerprint="", lease=lease, ttl=TTL
        )
    )
    return outcome


@pytest.fixture(scope="module")
def renewer() -> Renewer:
    """One private renewer (and thread) for this module; the app's is left alone."""
    return Renewer()


@pytest.fixture
def leases(renewer: Renewer) -> Iterator[Callable[[Lease], Lease]]:
    """Register leases with the renewer; every one is removed when the test ends."""
    added: list[Lease] = []

    def add(lease: Lease) -> Lease:
        added.append(lease)
        return renewer.add(lease)

    yield add
    for lease in added:
        renewer.remove(lease)


class FlakyStore:
    """A MemoryStore whose first ``failures`` renewals raise ``error``; logs attempt times."""

    def __init__(self, error: Exception, failures: int) -> None:
        self.inner = MemoryStore()
        self.error = error
        self.failures = failures
        self.attempts: list[float] = []

    def renew(self, key: str, *, token: str, lease: float) -> bool:
        self.attempts.append(time.monotonic())
        if len(self.attempts) <= self.failures:
            raise self.error
        return self.inner.renew(key, token=token, lease=lease)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


# --------------------------------------------------------------------------- next_due


@pytest.mark.parametrize(("now", "lease"), [(0.0, 60.0), (1000.0, 1.0), (12.5, 7.5)])
def test_next_due_is_a_third_of_the_lease_normally(now: float, lease: float) -> None:
    due = next_due(now, lease)
    assert due == pytest.approx(now + lease / 3)
    # Two more renewals fit before the lease would run out.
    assert now + 2 * (due - now) < now + lease


@pytest.mark.parametrize(("now", "lease"), [(0.0, 60.0), (1000.0, 1.0), (12.5, 7.5)])
def test_next_due_is_a_tenth_of_the_lease_after_a_failure(now: float, lease: float) -> None:
    due = next_due(now, lease, failed=True)
    assert due == pytest.approx(now + lease / 10)
    assert due < next_due(now, lease)


# --------------------------------------------------------------------------- renewer thread


def test_registered_claim_stays_owned_past_two_and_a_half_leases(
    leases: Callable[[Lease], Lease],
) -> None:
    store, key = MemoryStore(), fresh_key()
    lost: list[Lease] = []
    owner = claim(store, key, "owner")
    assert owner.state is ClaimState.CLAIMED
    lease = leases(Lease(store, key, "owner", LEASE, lost.append))
    start = time.monotonic()
    rival_saw: list[ClaimState] = []

    def renewed_long_enough() -> bool:
        rival_saw.append(claim(store, key, "rival").state)
        return lease.renewals >= 8  # the 8th renewal comes >= 8/3 leases after add

    wait_for(renewed_long_enough, timeout=10, interval=0.05, message="8 renewals")

    assert time.monotonic() - start >= 2.5 * LEASE
    assert set(rival_saw) == {ClaimState.IN_PROGRESS}
    record = store.read(key)
    assert record is not None
    assert record.task_id == "task-owner"
    assert record.fence == owner.fence
    assert lost == []
    assert not lease.lost


def test_removed_lease_is_no_longer_renewed_and_the_key_can_be_taken_over(
    renewer: Renewer, leases: Callable[[Lease], Lease]
) -> None:
    store, key = MemoryStore(), fresh_key()
    lost: list[Lease] = []
    owner = claim(store, key, "owner")
    assert owner.state is ClaimState.CLAIMED
    first_fence = owner.fence
    lease = leases(Lease(store, key, "owner", LEASE, lost.append))
    wait_for(lambda: lease.renewals >= 1, timeout=5, message="first renewal")

    renewer.remove(lease)

    def rival_claims() -> ClaimOutcome | None:
        outcome = claim(store, key, "rival")
        return outcome if outcome.state is ClaimState.CLAIMED else None

    # Renewed every lease/3, the key would never be free; unrenewed, it is within ~a lease.
    taken = wait_for(rival_claims, timeout=3 * LEASE, message="take-over after removal")
    assert taken is not None
    assert taken.took_over
    assert taken.fence > first_fence
    assert not store.renew(key, token="owner", lease=LEASE)
    assert lost == []  # a finished run is not told it lost anything
    assert not lease.lost


def test_stolen_lease_calls_on_lost_exactly_once(
    renewer: Renewer, leases: Callable[[Lease], Lease]
) -> None:
    store, key = MemoryStore(), fresh_key()
    lost: list[Lease] = []
    assert claim(store, key, "owner").state is ClaimState.CLAIMED
    lease = leases(Lease(store, key, "owner", LEASE, lost.append))
    assert store.forget(key)
    thief = claim(store, key, "thief", lease=60)
    assert thief.state is ClaimState.CLAIMED

    wait_for(lambda: lost, timeout=5, message="on_lost")
    # Let the renewer go round several more times (a probe lease counts its rounds):
    # a lost lease that were still scheduled would be due again within lease/3.
    probe_key = fresh_key()
    assert claim(store, probe_key, "probe").state is ClaimState.CLAIMED
    probe = leases(Lease(store, probe_key, "probe", LEASE, lost.append))
    wait_for(lambda: probe.renewals >= 4, timeout=5, message="probe renewals")

    assert lost == [lease]
    assert lease.lost
    record = store.read(key)
    assert record is not None
    assert (record.task_id, record.fence) == ("task-thief", thief.fence)
    assert record.lease_left is not None
    assert record.lease_left > LEASE  # the thief's own 60 s lease, not renewed by us


def test_store_error_is_retried_sooner_and_does_not_lose_the_lease(
    leases: Callable[[Lease], Lease],
) -> None:
    store = FlakyStore(StoreUnavailable("redis is restarting"), failures=1)
    key = fresh_key()
    lost: list[Lease] = []
    assert claim(store, key, "owner").state is ClaimState.CLAIMED
    lease = leases(Lease(store, key, "owner", LEASE, lost.append))

    def renewed_after_error() -> bool:
        assert claim(store, key, "rival").state is ClaimState.IN_PROGRESS
        return lease.renewals >= 3

    wait_for(renewed_after_error, timeout=5, interval=0.05, message="renewals after an error")

    assert lost == []
    assert not lease.lost
    first, second, third = store.attempts[:3]
    assert second - first < LEASE / 3  # after the failure: lease/10, not lease/3
    assert third - second >= LEASE / 3 * 0.9  # back to the normal pace


def test_unexpected_renewal_error_is_not_silent(
    leases: Callable[[Lease], Lease],
) -> None:
    store = FlakyStore(IdempotencyError("READONLY You can't write against a replica"), 1)
    key = fresh_key()
    lost: list[Lease] = []
    assert claim(store, key, "owner").state is ClaimState.CLAIMED
    lease = leases(Lease(store, key, "owner", LEASE, lost.append))

    wait_for(lambda: store.attempts, timeout=5, message="first renewal attempt")
    # Either the lease keeps being renewed (rescheduled like a store error, lease/10)
    # or the run is told it lost it; both happen well within one lease.
    wait_for(
        lambda: lease.renewals >= 1 or lost,
        timeout=LEASE,
        message="renewal or on_lost after an unexpected error",
    )
    if not lost:
        assert claim(store, key, "rival").state is ClaimState.IN_PROGRESS


# --------------------------------------------------------------------------- MemoryStore clock


def test_memory_store_lease_runs_out_under_freezegun() -> None:
    store, key = MemoryStore(), fresh_key()
    with freeze_time("2024-01-01 12:00:00") as frozen:
        owner = claim(store, key, "owner", lease=10)
        assert owner.state is ClaimState.CLAIMED

        frozen.tick(9.5)
        rival = claim(store, key, "rival", lease=10)
        assert rival.state is ClaimState.IN_PROGRESS
        assert rival.task_id == "task-owner"
        assert rival.lease_left == pytest.approx(0.5)

        frozen.tick(0.5)  # the deadline itself: the lease has run out
        taken = claim(store, key, "rival", lease=10)
        assert taken.state is ClaimState.CLAIMED
        assert taken.took_over
        assert taken.fence > owner.fence

        # The old owner can neither renew nor complete any more.
        assert not store.renew(key, token="owner", lease=10)
        stored = Stored(RecordKind.RESULT, b"1", "j")
        assert not store.complete(
            CompleteRequest(
                key, token="owner", fence=owner.fence, task_id="task-owner", stored=stored, ttl=TTL
            )
        )
        record = store.read(key)
        assert record is not None
        assert record.task_id == "task-rival"


def test_memory_store_renew_pushes_the_deadline_under_freezegun() -> None:
    store, key = MemoryStore(), fresh_key()
    with freeze_time("2024-01-01 12:00:00") as frozen:
        assert claim(store, key, "owner", lease=10).state is ClaimState.CLAIMED
        frozen.tick(8)
        assert store.renew(key, token="owner", lease=10)
        frozen.tick(8)  # 16 s after the claim, 8 s after the renewal
        rival = claim(store, key, "rival", lease=10)
        assert rival.state is ClaimState.IN_PROGRESS
        assert rival.lease_left == pytest.approx(2.0)
        frozen.tick(2)
        assert claim(store, key, "rival", lease=10).state is ClaimState.CLAIMED


def test_memory_store_parked_key_waits_for_its_own_retry_under_freezegun() -> None:
    store, key = MemoryStore(), fresh_key()
    with freeze_time("2024-01-01 12:00:00") as frozen:
        owner = claim(store, key, "owner", lease=10)
        assert store.park(key, token="owner", hold=30)
        frozen.tick(20)  # past the lease, within the hold
        other = store.claim(
            ClaimRequest(key, token="dup", task_id="task-dup", fingerprint="", lease=10, ttl=TTL)
        )
        assert other.state is ClaimState.IN_PROGRESS
        retry = store.claim(
            ClaimRequest(
                key, token="retry", task_id="task-owner", fingerprint="", lease=10, ttl=TTL
            )
        )
        assert retry.state is ClaimState.CLAIMED
        assert not retry.took_over
        assert retry.fence > owner.fence


def test_memory_store_completed_record_expires_after_its_ttl_under_freezegun() -> None:
    store, key = MemoryStore(), fresh_key()
    with freeze_time("2024-01-01 12:00:00") as frozen:
        owner = claim(store, key, "owner", lease=10)
        stored = Stored(RecordKind.RESULT, b"42", "j")
        assert store.complete(
            CompleteRequest(
                key, token="owner", fence=owner.fence, task_id="task-owner", stored=stored, ttl=30
            )
        )

        frozen.tick(29.9)
        replay = claim(store, key, "dup")
        assert replay.state is ClaimState.COMPLETED
        assert replay.stored == stored
        record = store.read(key)
        assert record is not None
        assert record.ttl == pytest.approx(0.1)

        frozen.tick(0.1)
        assert store.read(key) is None
        again = claim(store, key, "later")
        assert again.state is ClaimState.CLAIMED
        assert again.fence > owner.fence  # the record is gone; the fence still grew


def test_short_tasks_do_not_wake_the_renewer_thread() -> None:
    # Waking the thread on every add costs a GIL hand-off per task; a lease no shorter
    # than those seen before must not wake it.
    private = Renewer()
    store = MemoryStore()
    first = private.add(Lease(store, fresh_key(), "t0", 60.0, lambda _l: None))
    wakes: list[int] = []
    original_set = private._wake.set

    def counting_set() -> None:
        wakes.append(1)
        original_set()

    private._wake.set = counting_set  # type: ignore[method-assign]
    for i in range(200):
        lease = private.add(Lease(store, fresh_key(), f"t{i}", 60.0, lambda _l: None))
        private.remove(lease)
    private.remove(first)
    assert wakes == []
    shorter = private.add(Lease(store, fresh_key(), "short", 3.0, lambda _l: None))
    assert wakes == [1]  # a shorter lease than any before wakes it, once
    private.remove(shorter)


def test_a_lease_whose_renewal_was_a_whole_period_overdue_is_reported_when_removed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Under gevent a body that computes without yielding keeps the renewal greenlet from
    # running until the body ends; its end must say why the lease may have been lost.
    now = [1000.0]
    private = Renewer(clock=lambda: now[0])
    store = MemoryStore()
    on_time = Lease(store, fresh_key(), "t1", LEASE, lambda _l: None, describe="on time")
    starved = Lease(store, fresh_key(), "t2", LEASE, lambda _l: None, describe="starved")
    with caplog.at_level(logging.WARNING, logger="celery_idem.renewer"):
        for lease in (on_time, starved):
            lease.due = next_due(now[0], LEASE)  # as add() sets it, without the thread
        now[0] += LEASE / 3 + LEASE / 6  # due, half a period ago: not reported
        private.remove(on_time)
        now[0] += 5 * LEASE  # the renewal never ran for five leases
        private.remove(starved)
        private.remove(starved)  # a second remove (the renewer's, then the task's): once
    (warning,) = caplog.records
    assert warning.levelno == logging.WARNING
    assert warning.args is not None
    assert warning.args[0] == "starved"  # type: ignore[index]
    assert warning.args[1] == pytest.approx(5 * LEASE + LEASE / 6)  # type: ignore[index]
    assert "gevent" in warning.getMessage()
