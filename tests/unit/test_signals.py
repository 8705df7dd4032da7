"""Each signal of ``celery_idem.signals`` fires once, with exactly the documented kwargs.

Tasks run eagerly (``.apply()``) on their own app, against the in-process MemoryStore
and against the suite's redis-server (db 5, per-test key prefix). Receivers are
connected for one ``with`` block only, so none outlives its test. Log lines are checked
to name the task, the task id and the key, in the text and as ``extra`` fields.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from celery import Celery
from celery.utils.dispatch import Signal

from celery_idem import (
    DuplicateInProgress,
    IdempotencyKeyMismatch,
    IdempotentTask,
    InProgressPolicy,
    ResultNotStored,
    StoreErrorPolicy,
    StoreUnavailable,
    signals,
)
from celery_idem.store import ClaimRequest, ClaimState
from celery_idem.task import execution, invalidate_settings
from devtools.processes import free_port, wait_for
from tests.unit.conftest import Env, make_app

LOGGER = "celery_idem"

DOCUMENTED = {
    "replayed": {"key", "task_id", "original_task_id", "fence"},
    "key_mismatch": {"key", "task_id", "original_task_id"},
    "duplicate_in_progress": {
        "key",
        "task_id",
        "owner_task_id",
        "lease_left",
        "retry_in",
        "policy",
    },
    "lease_lost": {"key", "task_id", "fence", "stage"},
    "store_error": {"key", "task_id", "exc", "stage", "policy"},
    "result_not_stored": {"key", "task_id", "reason"},
}
"""The kwargs each signal is documented to carry (besides ``sender`` and ``signal``)."""


@contextmanager
def received(signal: Signal) -> Iterator[list[dict[str, Any]]]:
    """Collect the kwargs (and ``sender``) of every send of ``signal`` in the block."""
    calls: list[dict[str, Any]] = []

    def receiver(sender: Any = None, **kwargs: Any) -> None:
        kwargs.pop("signal", None)
        calls.append({"sender": sender, **kwargs})

    signal.connect(receiver, weak=False)
    try:
        yield calls
    finally:
        signal.disconnect(receiver)


def documented_kwargs(call: dict[str, Any]) -> set[str]:
    return set(call) - {"sender"}


def log_lines(caplog: pytest.LogCaptureFixture, fragment: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and fragment in r.getMessage()]


def assert_names_run(record: logging.LogRecord, task: Any, task_id: str, key: str) -> None:
    """A log line names task, task id and key in its text and in its ``extra`` fields."""
    message = record.getMessage()
    assert task.name in message
    assert task_id in message
    assert key in message
    assert record.idem_task == task.name  # type: ignore[attr-defined]
    assert record.idem_task_id == task_id  # type: ignore[attr-defined]
    assert record.idem_key == key  # type: ignore[attr-defined]


@pytest.fixture
def down_app() -> Iterator[Celery]:
    """An eager app whose store URL points at a port nothing listens on."""
    app = make_app("down")
    app.conf.idem_redis_url = f"redis://127.0.0.1:{free_port()}/0"
    app.conf.idem_key_prefix = "t-" + uuid.uuid4().hex[:10]
    invalidate_settings()
    try:
        yield app
    finally:
        invalidate_settings()


# --------------------------------------------------------------------------- replayed


def test_replayed_fires_on_a_duplicate_only(env: Env) -> None:
    runs: list[int] = []

    @env.task()
    def echo(x: int) -> int:
        runs.append(x)
        return x

    with received(signals.replayed) as calls:
        first = echo.apply((1,), idempotency_key="K-replay")
        assert first.get() == 1
        assert calls == []
        duplicate = echo.apply((1,), idempotency_key="K-replay")
        assert duplicate.get() == 1

    assert runs == [1]
    assert len(calls) == 1
    call = calls[0]
    assert documented_kwargs(call) == DOCUMENTED["replayed"]
    assert call["sender"].name == echo.name
    assert call["key"] == "K-replay"
    assert call["task_id"] == duplicate.id
    assert call["original_task_id"] == first.id
    record = env.store.read(env.storage(echo, "K-replay"))
    assert record is not None
    assert call["fence"] == record.fence


# --------------------------------------------------------------------------- key_mismatch


def test_key_mismatch_fires_and_is_logged_with_task_id_and_key(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    runs: list[int] = []

    @env.task()
    def pay(amount: int) -> int:
        runs.append(amount)
        return amount

    first = pay.apply((10,), idempotency_key="K-mismatch")
    assert first.get() == 10
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with received(signals.key_mismatch) as calls:
        other = pay.apply((20,), idempotency_key="K-mismatch")
        with pytest.raises(IdempotencyKeyMismatch):
            other.get()

    assert runs == [10]
    assert len(calls) == 1
    call = calls[0]
    assert documented_kwargs(call) == DOCUMENTED["key_mismatch"]
    assert call["sender"].name == pay.name
    assert call["key"] == "K-mismatch"
    assert call["task_id"] == other.id
    assert call["original_task_id"] == first.id

    lines = log_lines(caplog, "other arguments")
    assert len(lines) == 1
    assert lines[0].levelno == logging.WARNING
    assert_names_run(lines[0], pay, other.id, "K-mismatch")
    assert first.id in lines[0].getMessage()


# --------------------------------------------------------------------------- duplicate_in_progress


@pytest.mark.parametrize("policy", list(InProgressPolicy), ids=lambda p: p.value)
def test_duplicate_in_progress_fires_with_the_policy(env: Env, policy: InProgressPolicy) -> None:
    runs: list[int] = []

    @env.task()
    def held(x: int) -> int:
        runs.append(x)
        return x

    storage = env.storage(held, "K-held")
    holder = env.store.claim(
        ClaimRequest(
            storage, token="holder-token", task_id="holder-task", fingerprint="", lease=60, ttl=60
        )
    )
    assert holder.state is ClaimState.CLAIMED

    with received(signals.duplicate_in_progress) as calls:
        duplicate = held.apply((1,), idempotency_key="K-held", idem_on_in_progress=policy.value)
        with pytest.raises(DuplicateInProgress) as info:
            duplicate.get()

    assert info.value.key == "K-held"
    assert runs == []
    assert len(calls) == 1
    call = calls[0]
    assert documented_kwargs(call) == DOCUMENTED["duplicate_in_progress"]
    assert call["sender"].name == held.name
    assert call["key"] == "K-held"
    assert call["task_id"] == duplicate.id
    assert call["owner_task_id"] == "holder-task"
    assert 0 < call["lease_left"] <= 60
    assert call["policy"] is policy
    assert call["retry_in"] is None  # eager: it raises, it does not come back
    record = env.store.read(storage)
    assert record is not None
    assert (record.task_id, record.fence, record.stored) == ("holder-task", holder.fence, None)


# --------------------------------------------------------------------------- lease_lost


def test_lease_lost_at_completion_fires_logs_and_leaves_the_thief_alone(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    thieves: list[Any] = []
    fences: list[int | None] = []

    @env.task(bind=True)
    def robbed(self: Any, x: int) -> int:
        fences.append(self.idempotency_fence)
        storage = env.storage(self, self.idempotency_key)
        assert env.store.forget(storage)
        thieves.append(
            env.store.claim(
                ClaimRequest(
                    storage, token="thief", task_id="thief-task", fingerprint="", lease=60, ttl=60
                )
            )
        )
        return x * 3

    caplog.set_level(logging.WARNING, logger=LOGGER)
    with received(signals.lease_lost) as calls:
        result = robbed.apply((2,), idempotency_key="K-robbed")
        assert result.get() == 6  # the caller still gets the body's return value

    assert len(calls) == 1
    call = calls[0]
    assert documented_kwargs(call) == DOCUMENTED["lease_lost"]
    assert call["sender"].name == robbed.name
    assert call["stage"] == "complete"
    assert call["key"] == "K-robbed"
    assert call["task_id"] == result.id
    assert call["fence"] == fences[0]

    thief = thieves[0]
    assert thief.state is ClaimState.CLAIMED
    record = env.store.read(env.storage(robbed, "K-robbed"))
    assert record is not None
    assert record.task_id == "thief-task"
    assert record.fence == thief.fence
    assert record.stored is None
    assert record.lease_left is not None
    assert record.lease_left > 0

    lines = log_lines(caplog, "lease lost")
    assert len(lines) == 1
    assert_names_run(lines[0], robbed, result.id, "K-robbed")


def test_lease_lost_is_reported_by_the_renewer_while_the_body_runs(env: Env) -> None:
    with received(signals.lease_lost) as calls:

        @env.task(bind=True, idem_lease=1)
        def slow(self: Any, x: int) -> str:
            storage = env.storage(self, self.idempotency_key)
            env.store.forget(storage)
            env.store.claim(
                ClaimRequest(
                    storage, token="thief", task_id="thief-task", fingerprint="", lease=60, ttl=60
                )
            )
            # The renewer's next renewal (lease/3) finds the key taken: wait for it.
            wait_for(lambda: calls, timeout=5, message="lease_lost from the renewer")
            return str(self.request.id)

        result = slow.apply((1,), idempotency_key="K-slow")
        task_id = result.get()

    assert calls[0]["stage"] == "renew"
    assert calls[0]["task_id"] == task_id
    assert calls[0]["key"] == "K-slow"
    assert documented_kwargs(calls[0]) == DOCUMENTED["lease_lost"]
    assert len(calls) == 1  # one loss, one signal: the refused completion adds none
    record = env.store.read(env.storage(slow, "K-slow"))
    assert record is not None
    assert record.task_id == "thief-task"
    assert record.stored is None


# --------------------------------------------------------------------------- result_not_stored


def test_result_not_stored_fires_with_the_reason(env: Env) -> None:
    @env.task()
    def opaque(x: int) -> object:
        return object()

    with received(signals.result_not_stored) as calls:
        first = opaque.apply((1,), idempotency_key="K-opaque")
        first.get()
        duplicate = opaque.apply((1,), idempotency_key="K-opaque")
        with pytest.raises(ResultNotStored) as info:
            duplicate.get()

    assert len(calls) == 1  # the duplicate raised, it did not store anything
    call = calls[0]
    assert documented_kwargs(call) == DOCUMENTED["result_not_stored"]
    assert call["sender"].name == opaque.name
    assert call["key"] == "K-opaque"
    assert call["task_id"] == first.id
    assert isinstance(call["reason"], str)
    assert call["reason"]
    assert call["reason"] in str(info.value)  # the duplicate is told the same reason


# --------------------------------------------------------------------------- store_error


@pytest.mark.parametrize("policy", [StoreErrorPolicy.RAISE, StoreErrorPolicy.RETRY])
def test_store_error_raises_in_eager_mode_without_running(
    down_app: Celery, policy: StoreErrorPolicy
) -> None:
    runs: list[int] = []

    @down_app.task(
        base=IdempotentTask,
        shared=False,
        name=f"{down_app.main}.unprotected",
        idem_on_store_error=policy.value,
    )
    def unprotected(x: int) -> int:
        runs.append(x)
        return x

    with received(signals.store_error) as calls:
        result = unprotected.apply((1,), idempotency_key="K-down")
        with pytest.raises(StoreUnavailable) as info:
            result.get()

    assert runs == []
    assert info.value.key == "K-down"
    assert info.value.task_name == unprotected.name
    assert len(calls) == 1
    call = calls[0]
    assert documented_kwargs(call) == DOCUMENTED["store_error"]
    assert call["sender"].name == unprotected.name
    assert call["key"] == "K-down"
    assert call["task_id"] == result.id
    assert call["stage"] == "claim"
    assert call["policy"] is policy
    assert call["exc"] is info.value


def test_store_error_with_policy_run_runs_the_body_and_warns(
    down_app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    runs: list[int] = []

    @down_app.task(
        base=IdempotentTask,
        shared=False,
        name=f"{down_app.main}.available",
        idem_on_store_error="run",
    )
    def available(x: int) -> int:
        runs.append(x)
        return x + 1

    caplog.set_level(logging.WARNING, logger=LOGGER)
    with received(signals.store_error) as calls:
        result = available.apply((1,), idempotency_key="K-run")
        assert result.get() == 2

    assert runs == [1]
    assert len(calls) == 1
    call = calls[0]
    assert documented_kwargs(call) == DOCUMENTED["store_error"]
    assert call["policy"] is StoreErrorPolicy.RUN
    assert call["stage"] == "claim"
    assert call["task_id"] == result.id
    assert isinstance(call["exc"], StoreUnavailable)

    lines = log_lines(caplog, "WITHOUT idempotency")
    assert len(lines) == 1
    assert lines[0].levelno == logging.WARNING
    assert_names_run(lines[0], available, result.id, "K-run")


@pytest.mark.parametrize("stage", ["complete", "release"])
def test_store_error_after_the_body_names_the_users_key_and_the_task(
    env: Env, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    """Issue #14 item 15: it used to carry the storage name of the record and no task."""
    monkeypatch.setattr(execution, "COMPLETE_RETRIES", (0.0, 0.0, 0.0))

    @env.task()
    def flaky_store(x: int) -> int:
        if stage == "release":
            raise ValueError("the body failed")
        return x

    store = flaky_store.idem_spec().store
    cause = StoreUnavailable("Redis went away (record 'idem:abc:def')", key="idem:abc:def")

    def down(*_: Any, **__: Any) -> Any:
        raise cause

    monkeypatch.setattr(store, stage, down)
    with received(signals.store_error) as calls:
        result = flaky_store.apply((1,), idempotency_key="K-after")
        if stage == "release":
            with pytest.raises(ValueError, match="the body failed"):  # the task's own error wins
                result.get()
        else:
            assert result.get() == 1

    assert calls
    call = calls[-1]
    assert call["stage"] == stage
    assert call["key"] == "K-after"
    exc = call["exc"]
    assert isinstance(exc, StoreUnavailable)
    assert exc.key == "K-after"
    assert exc.task_name == flaky_store.name
    assert f"task {flaky_store.name!r} could not {stage} key 'K-after'" in str(exc)
    assert exc.__cause__ is cause
