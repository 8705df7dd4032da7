"""Durable steps in the store contract: every store keeps them the same way.

A step is appended by its attempt only (fenced by the owner token), survives every
transition that does not complete the key (release, park, takeover, reservation),
comes back in the next claim's reply, and is dropped by a completion (which keeps
their count) or a forget.
"""

from __future__ import annotations

import pytest

from celery_idem.exceptions import IdempotencyError
from celery_idem.store import ClaimState, ReserveRequest, StepRecord, StepRequest
from celery_idem.store.record import encode_steps
from tests.contract.conftest import LEASE, RESULT, TTL, Backend, claim, complete


def step(
    backend: Backend,
    key: str,
    position: int,
    name: str,
    *,
    token: str = "t1",
    occurrence: int = 1,
    value: bytes = b'{"id": 1}',
    codec: str = "j",
) -> bool:
    request = StepRequest(
        backend.key(key),
        token=token,
        position=position,
        name=name,
        occurrence=occurrence,
        codec=codec,
        value=value,
    )
    return backend.store.step(request)


def released_after_a_step(backend: Backend) -> None:
    """Key ``k``: claimed by ``t1`` with fingerprint ``fp``, step ``order`` stored, released."""
    claim(backend, "k", fingerprint="fp")
    assert step(backend, "k", 1, "order")
    assert backend.store.release(backend.key("k"), token="t1")


def shape(steps: tuple[StepRecord, ...]) -> list[tuple[str, int, str, bytes]]:
    return [(s.name, s.occurrence, s.codec, s.value) for s in steps]


def test_a_takeover_gets_the_steps_the_dead_attempt_stored(backend: Backend) -> None:
    claim(backend, "k")
    assert step(backend, "k", 1, "order", value=b'{"row": 7}')
    assert step(backend, "k", 2, "charge", value=b'"ch_1"')
    backend.advance(backend.key("k"), LEASE + 0.05)
    out = claim(backend, "k", token="t2")  # the redelivery: same task id, new attempt
    assert out.state is ClaimState.CLAIMED
    assert out.took_over is True
    assert shape(out.steps) == [("order", 1, "j", b'{"row": 7}'), ("charge", 1, "j", b'"ch_1"')]


def test_a_fresh_claim_has_no_steps(backend: Backend) -> None:
    assert claim(backend, "k").steps == ()


def test_steps_are_stored_at_the_store_clock(backend: Backend) -> None:
    claim(backend, "k")
    before = backend.clock_ms()
    step(backend, "k", 1, "order")
    after = backend.clock_ms()
    record = backend.store.read(backend.key("k"))
    assert record is not None
    assert before <= round(record.steps[0].at * 1000) <= after


def test_a_stale_attempt_cannot_store_a_step(backend: Backend) -> None:
    claim(backend, "k")
    step(backend, "k", 1, "order")
    backend.advance(backend.key("k"), LEASE + 0.05)
    claim(backend, "k", token="t2")
    assert step(backend, "k", 2, "charge", token="t1") is False
    record = backend.store.read(backend.key("k"))
    assert record is not None
    assert [s.name for s in record.steps] == ["order"]
    assert step(backend, "k", 2, "charge", token="t2") is True


def test_storing_a_position_again_is_answered_as_stored(backend: Backend) -> None:
    """A client retry after a lost reply must not append the step twice."""
    claim(backend, "k")
    assert step(backend, "k", 1, "order")
    assert step(backend, "k", 1, "order")
    record = backend.store.read(backend.key("k"))
    assert record is not None
    assert len(record.steps) == 1


def test_a_position_past_the_stored_steps_is_refused(backend: Backend) -> None:
    claim(backend, "k")
    with pytest.raises(IdempotencyError, match="fewer durable steps"):
        step(backend, "k", 2, "charge")
    record = backend.store.read(backend.key("k"))
    assert record is not None
    assert record.steps == ()


def test_release_keeps_steps_for_the_same_request_only(backend: Backend) -> None:
    released_after_a_step(backend)
    other = claim(backend, "k", token="t2", task_id="id-2", fingerprint="other")
    assert other.state is ClaimState.MISMATCH
    again = claim(backend, "k", token="t3", task_id="id-3", fingerprint="fp")
    assert again.state is ClaimState.CLAIMED
    assert [s.name for s in again.steps] == ["order"]


def test_a_released_key_without_steps_takes_any_arguments(backend: Backend) -> None:
    claim(backend, "k", fingerprint="fp")
    backend.store.release(backend.key("k"), token="t1")
    assert claim(backend, "k", token="t2", fingerprint="other").state is ClaimState.CLAIMED


def test_a_parked_retry_resumes_the_steps(backend: Backend) -> None:
    claim(backend, "k")
    step(backend, "k", 1, "order")
    assert backend.store.park(backend.key("k"), token="t1", hold=10.0)
    retry = claim(backend, "k", token="t2", fingerprint="")  # a retry sends no fingerprint
    assert retry.state is ClaimState.CLAIMED
    assert [s.name for s in retry.steps] == ["order"]


def test_completion_drops_the_steps_and_keeps_their_count(backend: Backend) -> None:
    claim(backend, "k")
    step(backend, "k", 1, "order")
    step(backend, "k", 2, "order", occurrence=2)
    assert complete(backend, backend.key("k"), token="t1", stored=RESULT, ttl=TTL)
    record = backend.store.read(backend.key("k"))
    assert record is not None
    assert record.steps == ()
    assert record.steps_done == 2
    assert record.stored == RESULT
    replay = claim(backend, "k", token="t2", task_id="id-2")
    assert replay.state is ClaimState.COMPLETED
    assert replay.stored == RESULT


def test_a_step_without_its_value_is_kept_as_done(backend: Backend) -> None:
    claim(backend, "k")
    step(backend, "k", 1, "export", codec="", value=b"ResultTooLarge: 9 bytes")
    backend.store.release(backend.key("k"), token="t1")
    (kept,) = claim(backend, "k", token="t2").steps
    assert kept.kept is False
    assert kept.value == b"ResultTooLarge: 9 bytes"


def test_a_reservation_keeps_the_steps_for_its_message(backend: Backend) -> None:
    released_after_a_step(backend)
    refused = backend.store.reserve(
        ReserveRequest(backend.key("k"), task_id="id-9", fingerprint="other", hold=10.0)
    )
    assert refused is not None
    assert refused.state is ClaimState.MISMATCH
    reserved = backend.store.reserve(
        ReserveRequest(backend.key("k"), task_id="id-2", fingerprint="fp", hold=10.0)
    )
    assert reserved is not None
    assert reserved.state is ClaimState.RESERVED
    out = claim(backend, "k", token="t2", task_id="id-2", fingerprint="fp")
    assert out.state is ClaimState.CLAIMED
    assert [s.name for s in out.steps] == ["order"]


def test_a_withdrawn_reservation_keeps_the_steps(backend: Backend) -> None:
    released_after_a_step(backend)
    backend.store.reserve(
        ReserveRequest(backend.key("k"), task_id="id-2", fingerprint="fp", hold=10.0)
    )
    assert backend.store.unreserve(backend.key("k"), task_id="id-2")
    out = claim(backend, "k", token="t3", task_id="id-3", fingerprint="fp")
    assert [s.name for s in out.steps] == ["order"]


def test_forget_drops_the_steps(backend: Backend) -> None:
    released_after_a_step(backend)
    assert backend.store.forget(backend.key("k"))
    assert claim(backend, "k", token="t2", fingerprint="other").steps == ()


def test_listings_count_the_steps_bytes(backend: Backend) -> None:
    claim(backend, "k")
    step(backend, "k", 1, "order", value=b'{"row": 7}')
    record = backend.store.read(backend.key("k"))
    assert record is not None
    (summary,) = backend.store.summarize([backend.key("k")])
    assert summary is not None
    assert summary.payload_bytes == len(encode_steps(record.steps))
