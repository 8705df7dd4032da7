"""Durable steps in eager mode, on both stores (``env``: MemoryStore and Redis).

The same semantics as on a worker (``tests/integration/test_steps.py``, the kill and
pause faults in ``tests/faults/test_step_faults.py``): what is replayed, what is
refused, what is stored when a value cannot be.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

from celery_idem import IdempotencyError, LeaseLost, ResultNotStored, StoreUnavailable
from celery_idem import signals as idem_signals
from celery_idem.store import ClaimRequest
from tests.unit.conftest import Env


class Flaky(Exception):
    """A failure the test's task retries or lets release the key."""


def test_a_plain_call_just_calls_the_function(env: Env) -> None:
    seen: list[Any] = []

    @env.task(bind=True)
    def plain(self: Any, x: int) -> int:
        value = self.step("double", lambda: seen.append(self.step_key) or x * 2)
        return int(value)

    assert plain(4) == 8
    assert plain(4) == 8
    assert seen == [None, None]  # no execution, no key: no downstream key either
    assert plain.step_key is None


def test_a_failed_attempt_resumes_after_its_finished_steps(env: Env) -> None:
    runs: list[str] = []
    fail = [True]

    @env.task(bind=True)
    def checkout(self: Any, order: int) -> list[Any]:
        row = self.step("row", lambda: runs.append(f"row:{self.step_key}") or {"id": order})
        if fail[0]:
            fail[0] = False
            raise Flaky("the mailer is down")
        mail = self.step("mail", lambda: runs.append(f"mail:{self.step_key}") or "sent")
        return [row, mail]

    with pytest.raises(Flaky):
        checkout.apply((7,), idempotency_key="K").get()
    record = env.record(checkout, "K")
    assert record is not None
    assert [s.name for s in record.steps] == ["row"]  # released, the step kept
    assert checkout.apply((7,), idempotency_key="K").get() == [{"id": 7}, "sent"]
    assert runs == ["row:K/row", "mail:K/mail"]
    record = env.record(checkout, "K")
    assert record is not None
    assert (record.steps, record.steps_done) == ((), 2)


def test_a_replay_sends_step_replayed_and_returns_the_decoded_value(env: Env) -> None:
    replays: list[dict[str, Any]] = []

    def note(sender: Any, **fields: Any) -> None:
        replays.append(fields)

    idem_signals.step_replayed.connect(note, weak=False)
    fail = [True]
    firsts: list[Any] = []

    @env.task(bind=True)
    def pair(self: Any) -> Any:
        value = self.step("pair", lambda: (1, 2))
        firsts.append(value)
        if fail[0]:
            fail[0] = False
            raise Flaky
        return value

    try:
        with pytest.raises(Flaky):
            pair.apply(idempotency_key="K2").get()
        result = pair.apply(idempotency_key="K2")
        assert result.get() == [1, 2]
    finally:
        idem_signals.step_replayed.disconnect(note)
    assert firsts == [[1, 2], [1, 2]]  # the first run gets the value as it is replayed
    assert len(replays) == 1
    assert replays[0]["key"] == "K2"
    assert replays[0]["task_id"] == result.id
    assert (replays[0]["step"], replays[0]["occurrence"]) == ("pair", 1)
    assert replays[0]["fence"] > 0


def test_steps_of_one_name_are_occurrences_with_their_own_keys(env: Env) -> None:
    keys: list[str] = []

    @env.task(bind=True)
    def loop(self: Any) -> list[int]:
        return [self.step("item", lambda i=i: keys.append(self.step_key) or i) for i in range(3)]

    assert loop.apply(idempotency_key="L").get() == [0, 1, 2]
    assert keys == ["L/item", "L/item#2", "L/item#3"]


def test_another_step_where_a_stored_one_stands_is_refused_naming_both(env: Env) -> None:
    names = ["row", "charge"]
    ran: list[str] = []

    @env.task(bind=True)
    def changed(self: Any) -> str:
        name = names.pop(0)
        self.step(name, lambda: ran.append(name))
        raise Flaky

    with pytest.raises(Flaky):
        changed.apply(idempotency_key="C").get()
    with pytest.raises(IdempotencyError) as info:
        changed.apply(idempotency_key="C").get()
    assert "'charge'" in str(info.value)
    assert "'row'" in str(info.value)
    assert "forget" in str(info.value)
    assert ran == ["row"]


def test_a_step_that_raises_stores_nothing(env: Env) -> None:
    runs: list[int] = []

    @env.task(bind=True)
    def fragile(self: Any) -> int:
        def charge() -> int:
            runs.append(1)
            if len(runs) == 1:
                raise Flaky("declined")
            return len(runs)

        return int(self.step("charge", charge))

    with pytest.raises(Flaky):
        fragile.apply(idempotency_key="F").get()
    record = env.record(fragile, "F")
    assert record is not None
    assert record.steps == ()
    assert fragile.apply(idempotency_key="F").get() == 2


@pytest.mark.parametrize(
    ("value", "options", "why"),
    [
        (lambda: object(), {}, "EncodeError"),
        (lambda: "x" * 200, {"idem_max_result_bytes": 100}, "ResultTooLarge"),
    ],
    ids=["unserializable", "too large"],
)
def test_a_value_that_cannot_be_kept_marks_the_step_done_and_fails_the_task(
    env: Env, value: Any, options: dict[str, Any], why: str
) -> None:
    runs: list[int] = []

    @env.task(bind=True, **options)
    def export(self: Any) -> str:
        self.step("export", lambda: runs.append(1) or value())
        return "done"

    with pytest.raises(ResultNotStored) as first:
        export.apply(idempotency_key="X").get()
    assert "step 'export'" in str(first.value)
    assert why in str(first.value)
    record = env.record(export, "X")
    assert record is not None
    (step,) = record.steps
    assert step.kept is False
    with pytest.raises(ResultNotStored) as again:
        export.apply(idempotency_key="X").get()
    assert "an earlier attempt ran it" in str(again.value)
    assert runs == [1]  # not run again


def test_steps_do_not_nest(env: Env) -> None:
    @env.task(bind=True)
    def nested(self: Any) -> Any:
        return self.step("outer", lambda: self.step("inner", lambda: 1))

    with pytest.raises(IdempotencyError, match="do not nest"):
        nested.apply(idempotency_key="N").get()


def test_a_step_after_the_key_was_taken_over_raises_lease_lost(env: Env) -> None:
    lost: list[dict[str, Any]] = []

    def note(sender: Any, **fields: Any) -> None:
        lost.append(fields)

    ran: list[str] = []

    @env.task(bind=True)
    def stale(self: Any) -> str:
        self.step("one", lambda: ran.append("one"))
        # Another attempt takes the key over (its lease ran out, say).
        storage = env.storage(stale, "S")
        assert env.store.forget(storage)
        env.store.claim(
            ClaimRequest(storage, token="other", task_id="other-id", fingerprint="",
                         lease=60.0, ttl=60.0)
        )  # fmt: skip
        self.step("two", lambda: ran.append("two"))
        return "unreachable"

    idem_signals.lease_lost.connect(note, weak=False)
    try:
        with pytest.raises(LeaseLost) as info:
            stale.apply(idempotency_key="S").get()
    finally:
        idem_signals.lease_lost.disconnect(note)
    assert "step 'two'" in str(info.value)
    assert ran == ["one", "two"]  # the side effect ran; storing it was refused
    record = env.record(stale, "S")
    assert record is not None
    assert (record.task_id, record.steps) == ("other-id", ())
    assert [f["stage"] for f in lost] == ["step"]


@pytest.mark.parametrize("name", ["", 5], ids=["empty", "not a str"])
def test_a_step_needs_a_name(env: Env, name: Any) -> None:
    @env.task(bind=True)
    def unnamed(self: Any) -> Any:
        return self.step(name, lambda: 1)

    with pytest.raises(IdempotencyError, match="non-empty str"):
        unnamed.apply(idempotency_key="U").get()


def test_a_caught_step_failure_takes_no_place_in_the_record(env: Env) -> None:
    @env.task(bind=True)
    def declined(self: Any) -> Any:
        with contextlib.suppress(Flaky):
            self.step("charge", lambda: (_ for _ in ()).throw(Flaky("declined")))
        return self.step("notify", lambda: "told")

    assert declined.apply(idempotency_key="D").get() == "told"
    record = env.record(declined, "D")
    assert record is not None
    assert record.steps_done == 1


def test_a_step_the_store_cannot_record_fails_the_task_and_signals_store_error(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    errors: list[dict[str, Any]] = []

    def note(sender: Any, **fields: Any) -> None:
        errors.append(fields)

    @env.task(bind=True)
    def unrecorded(self: Any) -> Any:
        return self.step("charge", lambda: "ch_1")

    store = unrecorded.idem_spec().store

    def down(request: Any) -> bool:
        raise StoreUnavailable("connection refused", key=request.key)

    monkeypatch.setattr(store, "step", down)
    monkeypatch.setattr("celery_idem.task.execution.COMPLETE_RETRIES", ())
    idem_signals.store_error.connect(note, weak=False)
    try:
        with pytest.raises(StoreUnavailable, match="record step 'charge'"):
            unrecorded.apply(idempotency_key="R").get()
    finally:
        idem_signals.store_error.disconnect(note)
    assert [e["stage"] for e in errors][:1] == ["step"]
    assert errors[0]["exc"].key == "R"
