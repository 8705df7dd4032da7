"""One suite, every store: the in-memory store must behave exactly like Redis.

Each test runs against ``MemoryStore`` (time moved with freezegun) and against
``RedisStore`` on every topology the suite starts itself (time passes for real; every
wait is a condition with a deadline): the suite's redis-server, a 3-master Redis
Cluster (marker ``cluster``), and a Sentinel deployment (marker ``sentinel``), the
latter also with ``idem_min_replicas=1`` so every claim and completion goes through
the ``WAIT`` pipeline; and against ``PostgresStore`` on the suite's own PostgreSQL
(its server clock decides, as Redis'; ``-k postgres`` runs it alone).
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import pytest
from freezegun import freeze_time

from celery_idem.checks import MAX_DURATION
from celery_idem.exceptions import IdempotencyConfigError
from celery_idem.keys import KeyRule
from celery_idem.store import (
    ClaimRequest,
    ClaimState,
    CompleteRequest,
    MemoryStore,
    RecordKind,
    RecordState,
    ReserveRequest,
    Stored,
)
from celery_idem.store.base import ForgetResult
from celery_idem.store.postgres import PostgresStore
from celery_idem.store.redis import RedisStore
from devtools.processes import wait_for
from tests.contract.conftest import LEASE, RESULT, TTL, Backend, claim, complete


def test_fresh_key_is_claimed_with_a_fence_from_the_store_clock(backend: Backend) -> None:
    out = claim(backend, "k")
    assert out.state is ClaimState.CLAIMED
    assert out.fence >= 1_700_000_000_000  # milliseconds: grows even across expiry
    assert out.took_over is False


def test_fence_keeps_growing_after_the_record_expired(backend: Backend) -> None:
    first = claim(backend, "k")
    complete(backend, backend.key("k"), token="t1", stored=RESULT, ttl=0.2)
    backend.advance(backend.key("k"), 0.25)
    if isinstance(backend.store, RedisStore):
        wait_for(lambda: backend.store.read(backend.key("k")) is None, timeout=5, message="expiry")
    assert backend.store.read(backend.key("k")) is None
    again = claim(backend, "k", token="t2", task_id="id-2")
    assert again.state is ClaimState.CLAIMED
    assert again.fence > first.fence


def test_second_attempt_sees_in_progress_with_owner_and_lease_left(backend: Backend) -> None:
    claim(backend, "k", lease=10.0)
    out = claim(backend, "k", token="t2", task_id="id-2", lease=10.0)
    assert out.state is ClaimState.IN_PROGRESS
    assert out.task_id == "id-1"
    assert 0 < out.lease_left <= 10.0


def test_same_attempt_claiming_again_gets_the_same_claim(backend: Backend) -> None:
    first = claim(backend, "k")
    again = claim(backend, "k")
    assert again.state is ClaimState.CLAIMED
    assert again.fence == first.fence


def test_completed_key_replays_payload_codec_kind_and_task_id(backend: Backend) -> None:
    out = claim(backend, "k")
    payload = Stored(RecordKind.RESULT, b"\x00\xffbinary\x00", "p")
    assert complete(backend, backend.key("k"), token="t1", stored=payload, ttl=TTL)
    dup = claim(backend, "k", token="t2", task_id="id-2")
    assert dup.state is ClaimState.COMPLETED
    assert dup.stored == payload
    assert dup.task_id == "id-1"
    assert dup.fence == out.fence


def test_complete_is_fenced_by_token(backend: Backend) -> None:
    claim(backend, "k")
    assert not complete(backend, backend.key("k"), token="zz", stored=RESULT, ttl=TTL)
    assert claim(backend, "k", token="t2").state is ClaimState.IN_PROGRESS


def test_complete_twice_by_the_same_attempt_is_true(backend: Backend) -> None:
    claim(backend, "k")
    k = backend.key("k")
    assert complete(backend, k, token="t1", stored=RESULT, ttl=TTL)
    assert complete(backend, k, token="t1", stored=RESULT, ttl=TTL)


def test_other_fingerprint_is_a_mismatch_and_changes_nothing(backend: Backend) -> None:
    claim(backend, "k")
    before = backend.store.read(backend.key("k"))
    out = claim(backend, "k", token="t2", task_id="id-2", fingerprint="other")
    assert out.state is ClaimState.MISMATCH
    assert out.task_id == "id-1"
    after = backend.store.read(backend.key("k"))
    assert before is not None
    assert after is not None
    assert (after.state, after.fence, after.task_id, after.fingerprint) == (
        before.state,
        before.fence,
        before.task_id,
        before.fingerprint,
    )


def test_mismatch_also_on_a_completed_key(backend: Backend) -> None:
    claim(backend, "k")
    complete(backend, backend.key("k"), token="t1", stored=RESULT, ttl=TTL)
    out = claim(backend, "k", token="t2", fingerprint="other")
    assert out.state is ClaimState.MISMATCH


def test_empty_fingerprint_is_not_checked(backend: Backend) -> None:
    claim(backend, "k", fingerprint="")
    complete(backend, backend.key("k"), token="t1", stored=RESULT, ttl=TTL)
    assert claim(backend, "k", token="t2", fingerprint="").state is ClaimState.COMPLETED


def _on_event(event: dict[str, Any], received_at: str) -> None:
    """A webhook task's signature, for the fingerprints below."""


@pytest.mark.parametrize(
    ("setting", "second"),
    [
        (True, ClaimState.MISMATCH),
        (("event.delivery_attempt", "received_at"), ClaimState.COMPLETED),
        (False, ClaimState.COMPLETED),
    ],
    ids=["all", "leave-out", "off"],
)
def test_the_mismatch_check_covers_what_idem_fingerprint_covers(
    backend: Backend, setting: Any, second: ClaimState
) -> None:
    """Two deliveries of one event, their fingerprints computed as a worker does."""
    rule = KeyRule("hooks.on_event", _on_event, None, setting)

    def fingerprint(attempt: int, received_at: str) -> str:
        event = {"id": "evt_1", "delivery_attempt": attempt, "data": {"email": "a@b"}}
        return rule.resolve((event, received_at), {}, "evt_1").fingerprint

    assert claim(backend, "k", fingerprint=fingerprint(1, "10:00")).state is ClaimState.CLAIMED
    complete(backend, backend.key("k"), token="t1", stored=RESULT, ttl=TTL)
    again = claim(backend, "k", token="t2", task_id="id-2", fingerprint=fingerprint(2, "10:05"))
    assert again.state is second


def test_release_frees_the_key_and_the_fence_keeps_growing(backend: Backend) -> None:
    first = claim(backend, "k")
    assert backend.store.release(backend.key("k"), token="t1")
    out = claim(backend, "k", token="t2", task_id="id-2", fingerprint="other-args-ok")
    assert out.state is ClaimState.CLAIMED
    assert out.fence > first.fence
    assert out.took_over is False


def test_release_by_a_non_owner_changes_nothing(backend: Backend) -> None:
    claim(backend, "k", lease=10.0)
    assert not backend.store.release(backend.key("k"), token="intruder")
    assert claim(backend, "k", token="t2", lease=10.0).state is ClaimState.IN_PROGRESS


def test_expired_lease_is_taken_over_with_a_higher_fence(backend: Backend) -> None:
    first = claim(backend, "k")
    backend.advance(backend.key("k"), LEASE + 0.05)
    out = claim(backend, "k", token="t2", task_id="id-2")
    assert out.state is ClaimState.CLAIMED
    # max(last fence + 1, clock in ms): the clock, a lease later, not the last fence + 1
    # (what the docs tell a downstream system that compares fences).
    assert out.fence >= first.fence + int(LEASE * 1000)
    assert out.took_over is True
    k = backend.key("k")
    # The stale owner can neither renew, complete nor release the newer attempt's key.
    assert not backend.store.renew(k, token="t1", lease=LEASE)
    assert not complete(backend, k, token="t1", stored=RESULT, ttl=TTL)
    assert not backend.store.release(k, token="t1")
    assert complete(backend, k, token="t2", stored=RESULT, ttl=TTL)


def test_renewal_keeps_the_lease_alive(backend: Backend) -> None:
    claim(backend, "k")
    k = backend.key("k")
    for _ in range(3):
        backend.advance(k, LEASE / 2)
        assert backend.store.renew(k, token="t1", lease=LEASE)
    assert claim(backend, "k", token="t2", task_id="id-2").state is ClaimState.IN_PROGRESS


def test_parked_key_is_claimable_by_its_task_id_only(backend: Backend) -> None:
    first = claim(backend, "k")
    k = backend.key("k")
    assert backend.store.park(k, token="t1", hold=10.0)
    other = claim(backend, "k", token="t2", task_id="id-2")
    assert other.state is ClaimState.IN_PROGRESS
    retry = claim(backend, "k", token="t3", task_id="id-1")
    assert retry.state is ClaimState.CLAIMED
    assert retry.fence > first.fence
    assert retry.took_over is False


def test_park_by_a_non_owner_changes_nothing(backend: Backend) -> None:
    claim(backend, "k", lease=10.0)
    assert not backend.store.park(backend.key("k"), token="intruder", hold=10.0)
    assert claim(backend, "k", token="t9", task_id="id-1", lease=10.0).state is (
        ClaimState.IN_PROGRESS
    )


def test_completed_record_expires_after_ttl(backend: Backend) -> None:
    claim(backend, "k")
    k = backend.key("k")
    complete(backend, k, token="t1", stored=RESULT, ttl=0.3)
    assert backend.store.read(k) is not None
    backend.advance(k, 0.35)
    if isinstance(backend.store, RedisStore):  # expiry is lazy/periodic on the server
        wait_for(lambda: backend.store.read(k) is None, timeout=5, message="record expiry")
    assert backend.store.read(k) is None
    assert claim(backend, "k", token="t2").state is ClaimState.CLAIMED


def test_read_reports_the_record_and_forget_deletes_it(backend: Backend) -> None:
    k = backend.key("k")
    assert backend.store.read(k) is None
    out = claim(backend, "k", lease=10.0)
    rec = backend.store.read(k)
    assert rec is not None
    assert rec.state == RecordState.IN_PROGRESS.value
    assert rec.fence == out.fence
    assert rec.task_id == "id-1"
    assert rec.fingerprint == "fp"
    assert rec.lease_left is not None
    assert 0 < rec.lease_left <= 10.0
    assert backend.store.forget(k) is True
    assert backend.store.forget(k) is False
    assert backend.store.read(k) is None


def test_cached_error_and_no_result_kinds_round_trip(backend: Backend) -> None:
    for name, kind in (("e", RecordKind.ERROR), ("x", RecordKind.NO_RESULT)):
        claim(backend, name)
        stored = Stored(kind, b'{"reason": "r"}', "j")
        complete(backend, backend.key(name), token="t1", stored=stored, ttl=TTL)
        out = claim(backend, name, token="t2")
        assert out.state is ClaimState.COMPLETED
        assert out.stored == stored


def test_many_threads_claiming_one_key_on_redis_only_one_wins(
    redis_store: RedisStore, key_prefix: str
) -> None:
    # Redis only: freezegun's frozen clock is process-wide, so the memory store's race
    # is covered by its lock rather than by threads here.
    store = redis_store
    key = f"{key_prefix}:race"
    results: list[ClaimState] = []
    lock = threading.Lock()

    def go(i: int) -> None:
        out = store.claim(
            ClaimRequest(key, token=f"t{i}", task_id=f"id-{i}", fingerprint="", lease=30, ttl=30)
        )
        with lock:
            results.append(out.state)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results.count(ClaimState.CLAIMED) == 1
    assert results.count(ClaimState.IN_PROGRESS) == 19


def test_memory_store_time_follows_freezegun() -> None:
    store = MemoryStore()
    second = ClaimRequest("k", token="b", task_id="2", fingerprint="", lease=60, ttl=10)
    with freeze_time("2026-01-01") as frozen:
        store.claim(ClaimRequest("k", token="a", task_id="1", fingerprint="", lease=60, ttl=10))
        frozen.tick(59)
        assert store.claim(second).state is ClaimState.IN_PROGRESS
        frozen.tick(2)
        assert store.claim(second).state is ClaimState.CLAIMED


def test_parked_retry_may_change_its_arguments(backend: Backend) -> None:
    # self.retry(args=...) comes back under the same task id; a retry sends no
    # fingerprint (its key is carried in a header, not derived from its arguments).
    first = claim(backend, "k", fingerprint="page-1")
    assert backend.store.park(backend.key("k"), token="t1", hold=10.0)
    retry = claim(backend, "k", token="t2", task_id="id-1", fingerprint="")
    assert retry.state is ClaimState.CLAIMED
    assert retry.fence > first.fence
    # ...and the record keeps the original request's fingerprint for its duplicates.
    assert claim(backend, "k", token="t3", task_id="id-9", fingerprint="page-1").state is (
        ClaimState.IN_PROGRESS
    )
    assert claim(backend, "k", token="t4", task_id="id-9", fingerprint="page-2").state is (
        ClaimState.MISMATCH
    )


def test_a_retry_that_takes_over_an_unparked_key_keeps_the_original_fingerprint(
    backend: Backend,
) -> None:
    # The park failed (the store was down when the retry was raised), so the retry finds
    # its first attempt's record in progress and takes it over once the lease ran out. A
    # retry sends no fingerprint: the record must keep the original request's, or a call
    # with other arguments would be answered with the stored result. (Found by the
    # chaos soak on PostgreSQL, seed 661255426; the same on every store.)
    first = claim(backend, "k", fingerprint="page-1")
    backend.advance(backend.key("k"), LEASE + 0.05)
    retry = claim(backend, "k", token="t2", task_id="id-1", fingerprint="")
    assert retry.state is ClaimState.CLAIMED
    assert retry.fence > first.fence
    assert claim(backend, "k", token="t3", task_id="id-9", fingerprint="page-2").state is (
        ClaimState.MISMATCH
    )
    assert complete(backend, backend.key("k"), token="t2", stored=RESULT, ttl=TTL)
    assert claim(backend, "k", token="t4", task_id="id-9", fingerprint="page-2").state is (
        ClaimState.MISMATCH
    )
    assert claim(backend, "k", token="t5", task_id="id-9", fingerprint="page-1").state is (
        ClaimState.COMPLETED
    )


def test_a_new_request_reusing_a_parked_task_id_with_other_arguments_is_a_mismatch(
    backend: Backend,
) -> None:
    # apply_async((o1, 999), task_id="order-o1") while "order-o1" (o1, 100) is parked
    # for its retry: the new request must not take the retry's place.
    claim(backend, "k", fingerprint="amount-100")
    assert backend.store.park(backend.key("k"), token="t1", hold=10.0)
    other = claim(backend, "k", token="t2", task_id="id-1", fingerprint="amount-999")
    assert other.state is ClaimState.MISMATCH
    # The parked retry itself still claims.
    assert claim(backend, "k", token="t3", task_id="id-1", fingerprint="").state is (
        ClaimState.CLAIMED
    )


def test_takeovers_are_counted_and_the_one_past_the_cap_quarantines(backend: Backend) -> None:
    k = backend.key("k")
    claim(backend, "k", max_takeovers=2)
    for n in (1, 2):
        backend.advance(k, LEASE)
        out = claim(backend, "k", token=f"t{n + 1}", max_takeovers=2)
        assert out.state is ClaimState.CLAIMED
        assert out.took_over
    record = backend.store.read(k)
    assert record is not None
    assert record.takeovers == 2
    backend.advance(k, LEASE)
    third = claim(backend, "k", token="t9", task_id="id-9", max_takeovers=2)
    assert third.state is ClaimState.QUARANTINED
    assert third.quarantined_now
    assert third.takeovers == 3
    # Every later claim is refused too, but only the first says it quarantined.
    again = claim(backend, "k", token="t10", task_id="id-10", max_takeovers=2)
    assert again.state is ClaimState.QUARANTINED
    assert not again.quarantined_now
    record = backend.store.read(k)
    assert record is not None
    assert record.state == RecordState.QUARANTINED.value
    assert record.ttl is None
    assert (
        backend.store.peek(k, fingerprint="fp") is None
    )  # the publisher sends; the worker refuses
    # An operator's forget releases it.
    assert backend.store.forget_if(k) is ForgetResult.DELETED
    assert claim(backend, "k", token="t11", max_takeovers=2).state is ClaimState.CLAIMED


def test_takeovers_survive_a_release_and_a_parked_hold_running_out_is_not_one(
    backend: Backend,
) -> None:
    k = backend.key("k")
    claim(backend, "k", max_takeovers=1)
    backend.advance(k, LEASE)
    assert claim(backend, "k", token="t2", max_takeovers=1).took_over
    assert backend.store.release(k, token="t2")
    claim(backend, "k", token="t3", max_takeovers=1)
    assert backend.store.park(k, token="t3", hold=LEASE)
    backend.advance(k, LEASE)
    # Another task id takes a parked key whose hold ran out: no worker died there.
    assert claim(backend, "k", token="t4", task_id="id-2", max_takeovers=1).took_over
    record = backend.store.read(k)
    assert record is not None
    assert record.takeovers == 1
    backend.advance(k, LEASE)
    assert claim(backend, "k", token="t5", max_takeovers=1).state is ClaimState.QUARANTINED


def test_no_cap_means_takeovers_never_quarantine(backend: Backend) -> None:
    k = backend.key("k")
    claim(backend, "k")
    for n in range(3):
        backend.advance(k, LEASE)
        assert claim(backend, "k", token=f"t{n + 2}", max_takeovers=0).state is ClaimState.CLAIMED


def test_a_completion_with_a_continuation_stays_pending_until_dispatched(
    backend: Backend,
) -> None:
    k = backend.key("k")
    out = claim(backend, "k")
    assert backend.store.complete(CompleteRequest(
        k, token="t1", fence=out.fence, task_id="id-1", stored=RESULT, ttl=TTL,
        continuation=True,
    ))  # fmt: skip
    redelivered = claim(backend, "k", token="t2")
    assert redelivered.state is ClaimState.COMPLETED
    assert redelivered.continuation_pending
    assert not backend.store.dispatched(k, task_id="id-9")  # not that run's completion
    assert backend.store.dispatched(k, task_id="id-1")
    assert not claim(backend, "k", token="t3").continuation_pending
    assert claim(backend, "k", token="t4").stored == RESULT
    # Without a continuation there is nothing pending.
    out = claim(backend, "k2")
    backend.store.complete(
        CompleteRequest(
            backend.key("k2"), token="t1", fence=out.fence, task_id="id-1", stored=RESULT, ttl=TTL
        )
    )
    assert not claim(backend, "k2", token="t2").continuation_pending


def test_a_renewal_never_moves_the_deadline_back(backend: Backend) -> None:
    # A hand-over renews for a long hold; an ordinary renewal still in flight must not
    # undo it.
    k = backend.key("k")
    claim(backend, "k")
    assert backend.store.renew(k, token="t1", lease=60.0)
    assert backend.store.renew(k, token="t1", lease=LEASE)
    record = backend.store.read(k)
    assert record is not None
    assert record.lease_left is not None
    assert record.lease_left > 30


def test_a_stale_attempt_cannot_pass_for_the_one_that_completed(backend: Backend) -> None:
    out = claim(backend, "k")
    k = backend.key("k")
    assert backend.store.complete(
        CompleteRequest(k, token="t1", fence=out.fence, task_id="id-1", stored=RESULT, ttl=TTL)
    )
    assert not backend.store.complete(
        CompleteRequest(k, token="t9", fence=out.fence, task_id="id-9", stored=RESULT, ttl=TTL)
    )


def test_peek_reports_what_holds_a_key_and_writes_nothing(backend: Backend) -> None:
    k = backend.key("k")
    assert backend.store.peek(k, fingerprint="fp") is None
    first = claim(backend, "k", lease=10.0)
    held = backend.store.peek(k, fingerprint="fp")
    assert held is not None
    assert (held.state, held.task_id, held.fence) == (ClaimState.IN_PROGRESS, "id-1", first.fence)
    assert 0 < held.lease_left <= 10.0
    other = backend.store.peek(k, fingerprint="other")
    assert other is not None
    assert other.state is ClaimState.MISMATCH
    complete(backend, k, token="t1", stored=RESULT, ttl=TTL)
    done = backend.store.peek(k, fingerprint="")
    assert done is not None
    assert (done.state, done.task_id, done.stored) == (ClaimState.COMPLETED, "id-1", None)
    record = backend.store.read(k)
    assert record is not None
    assert record.fence == first.fence  # peeking claimed nothing


def test_peek_sees_nothing_after_a_release_or_a_lapsed_lease(backend: Backend) -> None:
    claim(backend, "r")
    backend.store.release(backend.key("r"), token="t1")
    assert backend.store.peek(backend.key("r"), fingerprint="fp") is None
    claim(backend, "l")
    backend.advance(backend.key("l"), LEASE + 0.05)
    assert backend.store.peek(backend.key("l"), fingerprint="fp") is None


# --------------------------------------------------------------------------- reservations


def reserve(backend: Backend, key: str, task_id: str = "sent-1", **kw: Any) -> Any:
    kw.setdefault("fingerprint", "fp")
    kw.setdefault("hold", LEASE)
    return backend.store.reserve(ReserveRequest(backend.key(key), task_id=task_id, **kw))


def test_reserve_takes_a_fresh_key_for_the_task_id_and_a_second_send_finds_it(
    backend: Backend,
) -> None:
    k = backend.key("k")
    first = reserve(backend, "k", hold=10.0)
    assert first is not None
    assert (first.state, first.task_id) == (ClaimState.RESERVED, "sent-1")
    assert first.fence >= 1_700_000_000_000  # no record has fence 0: the store's clock
    second = reserve(backend, "k", task_id="sent-2", hold=10.0)
    assert second is not None
    assert (second.state, second.task_id) == (ClaimState.IN_PROGRESS, "sent-1")
    assert 0 < second.lease_left <= 10.0
    again = reserve(backend, "k", hold=10.0)  # the same publisher asking again
    assert again is not None
    assert (again.state, again.task_id) == (ClaimState.RESERVED, "sent-1")
    record = backend.store.read(k)
    assert record is not None
    assert (record.state, record.task_id, record.fingerprint) == (
        RecordState.RESERVED.value, "sent-1", "fp"
    )  # fmt: skip
    assert record.lease_left is not None
    assert 0 < record.lease_left <= 10.0
    assert record.ttl is not None
    assert record.ttl <= 10.0
    peeked = backend.store.peek(k, fingerprint="fp")
    assert peeked is not None
    assert (peeked.state, peeked.task_id) == (ClaimState.IN_PROGRESS, "sent-1")


def test_reserve_answers_a_completed_a_running_or_another_arguments_key(
    backend: Backend,
) -> None:
    claim(backend, "run", lease=10.0)
    running = reserve(backend, "run")
    assert running is not None
    assert (running.state, running.task_id) == (ClaimState.IN_PROGRESS, "id-1")
    claim(backend, "done")
    complete(backend, backend.key("done"), token="t1", stored=RESULT, ttl=TTL)
    done = reserve(backend, "done")
    assert done is not None
    assert (done.state, done.task_id, done.stored) == (ClaimState.COMPLETED, "id-1", None)
    mismatch = reserve(backend, "done", fingerprint="other")
    assert mismatch is not None
    assert mismatch.state is ClaimState.MISMATCH
    reserve(backend, "res", hold=10.0)
    other = reserve(backend, "res", task_id="sent-2", fingerprint="other")
    assert other is not None
    assert (other.state, other.task_id) == (ClaimState.MISMATCH, "sent-1")
    for name in ("run", "done"):  # nothing was written
        record = backend.store.read(backend.key(name))
        assert record is not None
        assert record.task_id == "id-1"


def test_reserve_leaves_a_lapsed_lease_and_a_quarantined_key_to_the_claim(
    backend: Backend,
) -> None:
    k = backend.key("k")
    first = claim(backend, "k", max_takeovers=1)
    backend.advance(k, LEASE + 0.05)
    assert reserve(backend, "k") is None  # publish: the message's claim counts the takeover
    record = backend.store.read(k)
    assert record is not None
    assert (record.state, record.fence) == (RecordState.IN_PROGRESS.value, first.fence)
    assert claim(backend, "k", token="t2", max_takeovers=1).took_over
    backend.advance(k, LEASE + 0.05)
    assert claim(backend, "k", token="t3", max_takeovers=1).state is ClaimState.QUARANTINED
    assert reserve(backend, "k") is None
    quarantined = backend.store.read(k)
    assert quarantined is not None
    assert quarantined.state == RecordState.QUARANTINED.value


def test_reserve_keeps_the_fence_and_takeovers_of_a_free_record(backend: Backend) -> None:
    k = backend.key("k")
    claim(backend, "k", max_takeovers=5)
    backend.advance(k, LEASE + 0.05)
    taken = claim(backend, "k", token="t2", max_takeovers=5)
    assert backend.store.release(k, token="t2")
    out = reserve(backend, "k", fingerprint="new-args-ok")
    assert out is not None
    assert (out.state, out.fence) == (ClaimState.RESERVED, taken.fence)
    record = backend.store.read(k)
    assert record is not None
    assert (record.fence, record.takeovers) == (taken.fence, 1)
    claimed = claim(backend, "k", token="t3", task_id="sent-1", fingerprint="new-args-ok")
    assert claimed.state is ClaimState.CLAIMED
    assert claimed.fence > taken.fence
    after = backend.store.read(k)
    assert after is not None
    assert after.takeovers == 1


def test_a_claim_takes_its_own_reservation_without_a_takeover(backend: Backend) -> None:
    k = backend.key("k")
    reserve(backend, "k", hold=10.0)
    out = claim(backend, "k", token="w1", task_id="sent-1", max_takeovers=1)
    assert out.state is ClaimState.CLAIMED
    assert out.took_over is False
    assert out.fence >= 1_700_000_000_000
    record = backend.store.read(k)
    assert record is not None
    assert (record.state, record.task_id, record.fingerprint, record.takeovers) == (
        RecordState.IN_PROGRESS.value, "sent-1", "fp", 0
    )  # fmt: skip
    assert complete(backend, k, token="w1", stored=RESULT, ttl=TTL)
    done = reserve(backend, "k", task_id="sent-2")
    assert done is not None
    assert (done.state, done.task_id) == (ClaimState.COMPLETED, "sent-1")


def test_a_late_message_still_claims_its_own_reservation_after_it_ran_out(
    backend: Backend,
) -> None:
    k = backend.key("k")
    reserve(backend, "k", hold=LEASE)
    backend.advance(k, LEASE + 0.05)
    out = claim(backend, "k", token="w1", task_id="sent-1")
    assert out.state is ClaimState.CLAIMED
    assert out.took_over is False


def test_another_message_waits_for_a_live_reservation_as_for_a_running_holder(
    backend: Backend,
) -> None:
    k = backend.key("k")
    reserve(backend, "k", hold=10.0)
    other = claim(backend, "k", token="w2", task_id="id-2")
    assert other.state is ClaimState.IN_PROGRESS
    assert other.task_id == "sent-1"
    assert 0 < other.lease_left <= 10.0
    assert claim(backend, "k", token="w3", task_id="id-3", fingerprint="x").state is (
        ClaimState.MISMATCH
    )  # the reservation keeps the publisher's fingerprint
    record = backend.store.read(k)
    assert record is not None
    assert record.state == RecordState.RESERVED.value


def test_an_expired_reservation_is_free_for_any_claim_and_counts_no_takeover(
    backend: Backend,
) -> None:
    # The publish failed after reserving (or its publisher died): nobody ran, so the
    # next message runs at once, whatever its arguments, and no takeover is counted.
    k = backend.key("k")
    reserve(backend, "k", hold=LEASE)
    backend.advance(k, LEASE + 0.05)
    out = claim(backend, "k", token="w2", task_id="id-2", fingerprint="other", max_takeovers=1)
    assert out.state is ClaimState.CLAIMED
    assert out.took_over is False
    record = backend.store.read(k)
    assert record is not None
    assert (record.task_id, record.fingerprint, record.takeovers) == ("id-2", "other", 0)
    # The late message of the lapsed reservation waits for the run that took the key.
    late = claim(backend, "k", token="w1", task_id="sent-1", fingerprint="other")
    assert late.state is ClaimState.IN_PROGRESS


def test_an_expired_reservation_is_replaced_by_the_next_send(backend: Backend) -> None:
    k = backend.key("k")
    reserve(backend, "k", hold=LEASE)
    backend.advance(k, LEASE + 0.05)
    assert backend.store.peek(k, fingerprint="fp") is None
    out = reserve(backend, "k", task_id="sent-2", fingerprint="other", hold=10.0)
    assert out is not None
    assert (out.state, out.task_id) == (ClaimState.RESERVED, "sent-2")
    assert claim(backend, "k", token="w1", task_id="sent-1", fingerprint="other").state is (
        ClaimState.IN_PROGRESS
    )


def test_unreserve_withdraws_only_its_own_reservation(backend: Backend) -> None:
    k = backend.key("k")
    reserve(backend, "k", hold=10.0)
    assert not backend.store.unreserve(k, task_id="sent-9")
    assert backend.store.unreserve(k, task_id="sent-1")
    assert backend.store.read(k) is None
    assert not backend.store.unreserve(k, task_id="sent-1")
    out = reserve(backend, "k", task_id="sent-2", hold=10.0)
    assert out is not None
    assert (out.state, out.task_id) == (ClaimState.RESERVED, "sent-2")
    claim(backend, "k", token="w2", task_id="sent-2")
    assert not backend.store.unreserve(k, task_id="sent-2")  # claimed: not a reservation
    record = backend.store.read(k)
    assert record is not None
    assert record.state == RecordState.IN_PROGRESS.value


def test_unreserve_keeps_the_fence_growing(backend: Backend) -> None:
    k = backend.key("k")
    fences = run_ahead(backend, "k")
    reserve(backend, "k", hold=10.0)
    assert backend.store.unreserve(k, task_id="sent-1")
    assert backend.store.read(k) is None  # a tombstone, as forget leaves
    after = claim(backend, "k", token="after", task_id="id-after")
    assert after.fence > max(fences)


def test_the_owner_only_writes_refuse_a_reservation(backend: Backend) -> None:
    k = backend.key("k")
    reserve(backend, "k", hold=10.0)
    assert not backend.store.renew(k, token="", lease=LEASE)
    assert not backend.store.release(k, token="")
    assert not backend.store.park(k, token="", hold=LEASE)
    assert not complete(backend, k, token="", stored=RESULT, ttl=TTL)
    record = backend.store.read(k)
    assert record is not None
    assert record.state == RecordState.RESERVED.value


def test_forget_if_refuses_a_live_reservation_unless_forced(backend: Backend) -> None:
    k = backend.key("k")
    reserve(backend, "k", hold=10.0)
    assert backend.store.forget_if(k) is ForgetResult.HELD
    (summary,) = backend.store.summarize([k])
    assert summary is not None
    assert (summary.state, summary.task_id, summary.parked) == (
        RecordState.RESERVED.value, "sent-1", False
    )  # fmt: skip
    assert summary.lease_left is not None
    assert 0 < summary.lease_left <= 10.0
    assert backend.store.forget_if(k, force=True) is ForgetResult.DELETED
    reserve(backend, "lapsed", hold=LEASE)
    backend.advance(backend.key("lapsed"), LEASE + 0.05)
    assert backend.store.forget_if(backend.key("lapsed")) in (
        ForgetResult.DELETED, ForgetResult.ABSENT  # the record may expire with its hold
    )  # fmt: skip


def test_a_reservation_longer_than_any_store_holds_is_refused(backend: Backend) -> None:
    with pytest.raises(IdempotencyConfigError, match="hold="):
        reserve(backend, "k", hold=MAX_DURATION * 2)
    assert backend.store.read(backend.key("k")) is None


# --------------------------------------------------------------------------- operators' tools


def scan_all(backend: Backend, match: str, count: int) -> tuple[list[str], int]:
    """Every key a full SCAN iteration returns (repeats kept), and how many steps it took."""
    keys: list[str] = []
    cursor, steps = 0, 0
    while True:
        cursor, page = backend.store.scan(match, cursor=cursor, count=count)
        keys.extend(page)
        steps += 1
        assert steps < 1000, "the scan never came back to cursor 0"
        if cursor == 0:
            return keys, steps


def test_scan_returns_every_matching_key_over_several_steps(backend: Backend) -> None:
    names = [f"s{i}" for i in range(40)]
    for name in names:
        claim(backend, name)
    backend.store.claim(
        ClaimRequest(  # same characters, another prefix: not matched
            f"{backend.prefix}x:s1", token="t", task_id="i", fingerprint="", lease=LEASE, ttl=TTL
        )
    )
    keys, steps = scan_all(backend, f"{backend.prefix}:*", count=5)
    assert set(keys) == {backend.key(n) for n in names}
    assert steps > 1
    backend.store.forget(f"{backend.prefix}x:s1")


def test_scan_returns_keys_present_throughout_while_others_come_and_go(
    backend: Backend,
) -> None:
    stay = [f"stay{i}" for i in range(30)]
    go = [f"go{i}" for i in range(30)]
    for name in stay + go:
        claim(backend, name)
    match = f"{backend.prefix}:*"
    seen: set[str] = set()
    cursor, step = 0, 0
    while True:
        cursor, page = backend.store.scan(match, cursor=cursor, count=5)
        seen.update(page)
        # Between steps, records are deleted and others written.
        if step < len(go):
            backend.store.forget(backend.key(go[step]))
            claim(backend, f"new{step}")
        step += 1
        if cursor == 0:
            break
    assert {backend.key(n) for n in stay} <= seen


def test_scan_glob_escapes_match_literally(backend: Backend) -> None:
    plain, starred = f"{backend.prefix}:ab", f"{backend.prefix}:a*"
    for key in (plain, starred):
        backend.store.claim(
            ClaimRequest(key, token="t", task_id="i", fingerprint="", lease=LEASE, ttl=TTL)
        )
    assert set(scan_all(backend, f"{backend.prefix}:a\\*", count=10)[0]) == {starred}
    assert set(scan_all(backend, f"{backend.prefix}:a?", count=10)[0]) == {plain, starred}


def test_summarize_reports_each_state_without_the_payload(backend: Backend) -> None:
    running = claim(backend, "run", lease=10.0)
    claim(backend, "park", token="tp", task_id="id-p", lease=10.0)
    assert backend.store.park(backend.key("park"), token="tp", hold=20.0)
    claim(backend, "free", token="tf")
    assert backend.store.release(backend.key("free"), token="tf")
    done = claim(backend, "done", token="td", task_id="id-d")
    stored = Stored(RecordKind.RESULT, b"x" * 42, "j")
    assert complete(backend, backend.key("done"), token="td", stored=stored, ttl=TTL)
    keys = [backend.key(n) for n in ("run", "park", "free", "done", "absent")]
    run, park, free, finished, absent = backend.store.summarize(keys)
    assert absent is None
    assert run is not None
    assert (run.key, run.state, run.parked, run.task_id) == (
        keys[0],
        RecordState.IN_PROGRESS.value,
        False,
        "id-1",
    )
    assert run.fence == running.fence
    assert run.lease_left is not None
    assert 0 < run.lease_left <= 10.0
    assert park is not None
    assert (park.state, park.parked, park.task_id) == (RecordState.IN_PROGRESS.value, True, "id-p")
    assert park.lease_left is not None
    assert 10.0 < park.lease_left <= 20.0
    assert free is not None
    assert (free.state, free.lease_left, free.payload_bytes) == (RecordState.FREE.value, None, 0)
    assert finished is not None
    assert (finished.state, finished.task_id, finished.fence) == (
        RecordState.RESULT.value,
        "id-d",
        done.fence,
    )
    assert (finished.payload_bytes, finished.codec, finished.lease_left) == (42, "j", None)
    assert finished.ttl is not None
    assert 0 < finished.ttl <= TTL
    assert backend.store.summarize([]) == []


def test_summarize_shows_a_lapsed_lease_as_a_negative_lease_left(backend: Backend) -> None:
    claim(backend, "k")
    backend.advance(backend.key("k"), LEASE + 0.05)
    (summary,) = backend.store.summarize([backend.key("k")])
    assert summary is not None
    assert summary.state == RecordState.IN_PROGRESS.value
    assert summary.lease_left is not None
    assert summary.lease_left < 0


def test_read_tells_a_parked_record_from_a_running_one(backend: Backend) -> None:
    claim(backend, "run", lease=10.0)
    claim(backend, "park", token="tp", lease=10.0)
    assert backend.store.park(backend.key("park"), token="tp", hold=10.0)
    run, park = backend.store.read(backend.key("run")), backend.store.read(backend.key("park"))
    assert run is not None
    assert park is not None
    assert (run.state, run.parked) == (RecordState.IN_PROGRESS.value, False)
    assert (park.state, park.parked) == (RecordState.IN_PROGRESS.value, True)


def test_forget_if_refuses_a_live_attempt_unless_forced(backend: Backend) -> None:
    k = backend.key("k")
    assert backend.store.forget_if(k) is ForgetResult.ABSENT
    out = claim(backend, "k", lease=10.0)
    assert backend.store.forget_if(k, fence=out.fence) is ForgetResult.HELD
    assert backend.store.read(k) is not None
    assert backend.store.forget_if(k, fence=out.fence, force=True) is ForgetResult.DELETED
    assert backend.store.read(k) is None


def test_forget_if_refuses_a_parked_retry_unless_forced(backend: Backend) -> None:
    k = backend.key("k")
    claim(backend, "k", lease=10.0)
    assert backend.store.park(k, token="t1", hold=10.0)
    assert backend.store.forget_if(k) is ForgetResult.HELD
    assert backend.store.forget_if(k, force=True) is ForgetResult.DELETED


def test_forget_if_deletes_a_lapsed_lease_a_free_or_a_completed_record(backend: Backend) -> None:
    claim(backend, "lapsed")
    backend.advance(backend.key("lapsed"), LEASE + 0.05)
    claim(backend, "free")
    backend.store.release(backend.key("free"), token="t1")
    claim(backend, "done")
    complete(backend, backend.key("done"), token="t1", stored=RESULT, ttl=TTL)
    for name in ("lapsed", "free", "done"):
        assert backend.store.forget_if(backend.key(name)) is ForgetResult.DELETED, name
        assert backend.store.read(backend.key(name)) is None


def test_forget_if_keeps_a_record_whose_fence_changed(backend: Backend) -> None:
    k = backend.key("k")
    first = claim(backend, "k")
    backend.advance(k, LEASE + 0.05)
    second = claim(backend, "k", token="t2", task_id="id-2")  # takes the lapsed lease over
    assert second.fence > first.fence
    assert backend.store.forget_if(k, fence=first.fence, force=True) is ForgetResult.CHANGED
    record = backend.store.read(k)
    assert record is not None
    assert record.task_id == "id-2"
    complete(backend, k, token="t2", stored=RESULT, ttl=TTL)
    assert backend.store.forget_if(k, fence=second.fence) is ForgetResult.DELETED


AHEAD_MS = 100


def run_ahead(backend: Backend, name: str) -> list[int]:
    """Claim and release ``name`` until its fence is AHEAD_MS ms ahead of the store's clock.

    A claim's fence is max(last fence + 1, clock in ms), so more than one claim per
    millisecond pushes it ahead of the clock (the memory store's clock is frozen; Redis
    answers a claim and a release in well under a millisecond, on every topology). That
    is when a fence restarted from the clock would not exceed one already handed out.
    Returns every fence handed out, in order.
    """
    fences: list[int] = []
    for i in range(20_000):
        if i % 10 == 0 and fences and fences[-1] >= backend.clock_ms() + AHEAD_MS:
            return fences
        out = claim(backend, name, token=f"ahead-{i}", task_id=f"id-ahead-{i}")
        assert out.state is ClaimState.CLAIMED
        fences.append(out.fence)
        assert backend.store.release(backend.key(name), token=f"ahead-{i}")
    raise AssertionError(f"the fence never ran {AHEAD_MS} ms ahead of the clock: {fences[-3:]}")


@pytest.mark.parametrize("how", ["forget", "forget_if", "forget_if_forced_while_held"])
def test_a_claim_right_after_forget_gets_a_fence_above_every_earlier_one(
    backend: Backend, how: str
) -> None:
    # "The fence only grows", forget included: a downstream system that kept the highest
    # fence it saw must accept the next run after an operator forgot the key.
    k = backend.key("k")
    fences = run_ahead(backend, "k")
    if how == "forget_if_forced_while_held":
        held = claim(backend, "k", token="holder", task_id="id-holder", lease=10.0)
        assert held.state is ClaimState.CLAIMED
        fences.append(held.fence)
        assert backend.store.forget_if(k, fence=held.fence, force=True) is ForgetResult.DELETED
    elif how == "forget_if":
        assert backend.store.forget_if(k, fence=fences[-1]) is ForgetResult.DELETED
    else:
        assert backend.store.forget(k) is True
    after = claim(backend, "k", token="after", task_id="id-after")
    assert after.state is ClaimState.CLAIMED
    assert after.took_over is False
    assert after.fence > max(fences)


def test_a_forgotten_record_reads_as_absent_and_is_gone_once_the_clock_passes_its_fence(
    backend: Backend,
) -> None:
    k = backend.key("k")
    fences = run_ahead(backend, "k")
    assert backend.store.forget(k) is True
    # What keeps the fence until the clock catches up is invisible to readers...
    assert backend.store.read(k) is None
    assert backend.store.summarize([k]) == [None]
    assert backend.store.peek(k, fingerprint="fp") is None
    assert backend.store.forget(k) is False
    assert backend.store.forget_if(k, force=True) is ForgetResult.ABSENT
    # ...and leaves nothing behind: once the clock passed the fence, the key is gone.
    backend.advance(k, (fences[-1] - backend.clock_ms() + 5) / 1000)
    wait_for(lambda: backend.store.memory_usage([k]) == [None], timeout=5, message="tombstone")
    after = claim(backend, "k", token="after", task_id="id-after")
    assert after.state is ClaimState.CLAIMED
    assert after.fence > fences[-1]


def test_memory_usage_is_positive_for_records_and_none_when_absent(backend: Backend) -> None:
    claim(backend, "small")
    claim(backend, "big", token="tb")
    big = Stored(RecordKind.RESULT, b"x" * 5000, "j")
    complete(backend, backend.key("big"), token="tb", stored=big, ttl=TTL)
    small, large, absent = backend.store.memory_usage(
        [backend.key("small"), backend.key("big"), backend.key("absent")]
    )
    assert absent is None
    assert small is not None
    assert large is not None
    assert 0 < small < 5000 < large


def test_server_facts_describe_the_store(backend: Backend) -> None:
    facts = backend.store.server_facts()
    if isinstance(backend.store, MemoryStore):
        assert (facts.kind, facts.server_time, dict(facts.info)) == ("memory", None, {})
        return
    if isinstance(backend.store, PostgresStore):
        assert facts.kind == "postgres"
        assert facts.info["server_version"].split(".")[0].isdigit()
        assert (facts.info["role"], facts.info["schema_version"]) == ("primary", "1")
        assert facts.config["synchronous_commit"] in {"on", "off", "local", "remote_write"}
        assert facts.server_time is not None
        assert facts.local_time is not None
        assert abs(facts.server_time - facts.local_time) < 5  # same machine
        return
    assert facts.kind == "redis"
    assert "password" not in facts.url
    assert facts.info["redis_version"].split(".")[0].isdigit()
    assert facts.info["role"] == "master"
    assert set(facts.config) == {"maxmemory-policy", "appendonly", "appendfsync", "save"}
    assert facts.server_time is not None
    assert facts.local_time is not None
    assert facts.round_trip is not None
    assert abs(facts.server_time - facts.local_time) < 5  # same machine


def test_redis_summarize_and_forget_if_on_a_key_that_is_not_a_record(
    redis_store: RedisStore, key_prefix: str
) -> None:
    store = redis_store
    listed, garbage = f"{key_prefix}:list", f"{key_prefix}:garbage"
    store.client.rpush(listed, "x")
    store.client.set(garbage, "not a record")
    summaries = store.summarize([listed, garbage])
    assert [(s.state, s.fence) if s else None for s in summaries] == [("", 0), ("", 0)]
    assert store.forget_if(listed) is ForgetResult.NOT_A_RECORD
    assert store.forget_if(garbage) is ForgetResult.NOT_A_RECORD
    assert store.client.exists(listed, garbage) == 2
    assert store.forget_if(listed, force=True) is ForgetResult.DELETED
    assert store.forget_if(garbage, force=True) is ForgetResult.DELETED
    assert store.client.exists(listed, garbage) == 0


def test_a_duration_no_store_can_hold_is_refused_alike_and_changes_nothing(
    backend: Backend,
) -> None:
    # idem_ttl=sys.maxsize once worked on the memory store and failed every Redis call
    # with "value is not an integer or out of range": both must refuse it, and the same.
    key = backend.key("k")
    for name, value in (("lease", sys.maxsize), ("ttl", MAX_DURATION + 1)):
        with pytest.raises(IdempotencyConfigError, match=f"{name}={value} .*{MAX_DURATION} s"):
            claim(backend, "k", **{name: value})
    assert backend.store.read(key) is None
    assert claim(backend, "k", ttl=MAX_DURATION).state is ClaimState.CLAIMED  # the maximum holds
    before = backend.store.read(key)
    with pytest.raises(IdempotencyConfigError, match="lease="):
        backend.store.renew(key, token="t1", lease=float("inf"))
    with pytest.raises(IdempotencyConfigError, match="hold="):
        backend.store.park(key, token="t1", hold=MAX_DURATION * 2)
    with pytest.raises(IdempotencyConfigError, match="ttl="):
        complete(backend, key, token="t1", stored=RESULT, ttl=sys.maxsize)
    after = backend.store.read(key)
    assert after is not None
    assert before is not None
    assert (after.state, after.fence, after.parked) == (before.state, before.fence, False)
    assert complete(backend, key, token="t1", stored=RESULT, ttl=MAX_DURATION)
    done = backend.store.read(key)
    assert done is not None
    assert done.ttl is not None
    assert done.ttl > MAX_DURATION - 60
