"""``idem_dedupe_on_publish`` reserves the key (issue #14 item 12), seen from the call site.

Tasks live on a non-eager app whose ``send_task`` is replaced by a recorder (as in
``test_call_site.py``), with the in-process store: what reaches the broker, under which
task id, and what the reservation holds, without a worker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from celery import Celery

from celery_idem import IdempotentTask
from celery_idem.keys import storage_key
from celery_idem.store import RecordState
from celery_idem.task import invalidate_settings
from tests.unit.conftest import Sent

LEASE = 60.0


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery("reserve", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.idem_redis_url = "memory://publish-reserve"
    app.conf.idem_lease = LEASE
    invalidate_settings()
    yield app
    invalidate_settings()


@pytest.fixture
def task(app: Celery) -> Any:
    def charge(order_id: str, amount: int = 0) -> str:
        return order_id

    t = app.task(
        charge, base=IdempotentTask, name="pr.charge", shared=False, idem_dedupe_on_publish=True
    )
    t.idem_spec().store.clear()
    return t


def reservation(task: Any, key: str) -> Any:
    spec = task.idem_spec()
    return spec.store.read(storage_key(spec.settings.key_prefix, spec.scope, key))


def test_back_to_back_sends_publish_once_under_the_reserved_id(task: Any, sent: Sent) -> None:
    task.apply_async(("o1", 5), idempotency_key="order-1")
    (call,) = sent.calls
    record = reservation(task, "order-1")
    assert record is not None
    assert (record.state, record.task_id) == (RecordState.RESERVED.value, call["task_id"])
    assert LEASE - 1 < record.lease_left <= LEASE
    again = task.apply_async(("o1", 5), idempotency_key="order-1")
    assert again.id == call["task_id"]
    assert len(sent.calls) == 1


def test_a_callers_own_task_id_is_the_one_reserved(task: Any, sent: Sent) -> None:
    task.apply_async(("o1",), idempotency_key="order-1", task_id="chosen-1")
    assert sent.calls[0]["task_id"] == "chosen-1"
    assert task.apply_async(("o1",), idempotency_key="order-1").id == "chosen-1"
    # Another caller that chose its own id waits on it: published, nothing reserved.
    task.apply_async(("o1",), idempotency_key="order-1", task_id="chosen-2")
    assert [c["task_id"] for c in sent.calls] == ["chosen-1", "chosen-2"]
    assert reservation(task, "order-1").task_id == "chosen-1"


def in_300_s() -> datetime:
    return datetime.now(timezone.utc) + timedelta(seconds=300)


@pytest.mark.parametrize(
    "when",
    [
        lambda: {"countdown": 300},
        lambda: {"eta": in_300_s()},
        lambda: {"eta": in_300_s().isoformat()},
    ],
    ids=["countdown", "eta", "eta-text"],
)
def test_a_delayed_message_keeps_its_reservation_past_its_delay(
    task: Any, sent: Sent, when: Callable[[], dict[str, Any]]
) -> None:
    # The eta is computed now, not when the module was collected (minutes earlier in
    # a whole-suite run, which had let it come within 290 s).
    task.apply_async(("o1",), idempotency_key="order-1", **when())
    record = reservation(task, "order-1")
    assert LEASE + 290 < record.lease_left <= LEASE + 300
    assert len(sent.calls) == 1


def test_a_publish_that_raises_withdraws_its_reservation(
    task: Any, sent: Sent, app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise ConnectionRefusedError("broker down")

    monkeypatch.setattr(app, "send_task", refuse)
    with pytest.raises(ConnectionRefusedError):
        task.apply_async(("o1",), idempotency_key="order-1")
    assert reservation(task, "order-1") is None
    monkeypatch.setattr(app, "send_task", sent)
    task.apply_async(("o1",), idempotency_key="order-1")
    assert len(sent.calls) == 1  # the next send is published, not handed a dead id


def test_other_arguments_under_a_reserved_key_are_published_for_the_worker_to_refuse(
    task: Any, sent: Sent
) -> None:
    task.apply_async(("o1", 5), idempotency_key="order-1")
    task.apply_async(("o1", 999), idempotency_key="order-1")
    assert len(sent.calls) == 2
    assert reservation(task, "order-1").task_id == sent.calls[0]["task_id"]
