"""Issue #14 items 4, 7 and 15 on a real prefork worker: what the call site refuses
before sending, what the worker refuses from other producers, and what the errors say.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
import redis

from celery_idem import (
    IdempotencyConfigError,
    IdempotentTask,
    InvalidIdempotencyKey,
    MisplacedCallOption,
)
from tests.integration.conftest import Worker, ledger_count

pytestmark = pytest.mark.integration
T = 30  # seconds any one result may take


@pytest.mark.parametrize(
    ("bad", "message"),
    [("", "must not be empty"), (5, "must be a str, got int 5"), ("k" * 1025, "over the limit")],
    ids=["empty", "int", "too-long"],
)
def test_a_bad_key_from_a_raw_header_says_it_came_from_the_header_and_carries_it(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str, bad: Any, message: str
) -> None:
    # Items 7 and 15: it said "(from the call site)" and carried repr(bad) as .key.
    res = tasks.app.send_task(
        "t.record", (uid, 0), queue=worker.queue, headers={"idempotency_key": bad}
    )
    with pytest.raises(InvalidIdempotencyKey, match=message) as info:
        res.get(timeout=T)
    text = str(info.value)
    assert "from the message header 'idempotency_key'" in text
    assert "app.send_task" in text
    assert "call site" not in text
    assert info.value.key == bad  # through the result backend, as the producer sent it
    assert info.value.task_name == "t.record"
    assert ledger_count(ledger, uid) == 0


@pytest.fixture
def broker(celery_env: dict[str, str]) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(celery_env["IDEM_TEST_BROKER"])
    yield client
    client.close()


def enqueued(broker: redis.Redis, queue: str) -> list[bytes]:
    """The broker's keys for ``queue`` (kombu's Redis transport: one list per queue)."""
    return list(broker.scan_iter(match=f"*{queue}*"))


def test_refused_calls_send_nothing_to_the_broker(
    tasks: ModuleType, broker: redis.Redis, uid: str
) -> None:
    # Items 4, 5 and 14 at the call site, against the real broker: a queue nobody reads.
    nowhere = f"nowhere-{uid}"

    def broken(x: int) -> int:  # registered here only: a worker would refuse to start
        return x

    broken_rule = tasks.app.task(
        broken, base=IdempotentTask, shared=False, name=f"t.broken-{uid}", idempotency_key="{nope}"
    )
    refusals: list[tuple[Any, type[Exception]]] = [
        (lambda: tasks.keyed.apply_async((uid,), queue=nowhere), InvalidIdempotencyKey),
        (lambda: tasks.keyed.apply_async((uid,), idempotency_key=None, queue=nowhere),
         InvalidIdempotencyKey),
        (lambda: tasks.keyed.s(uid).set(queue=nowhere).delay(), InvalidIdempotencyKey),
        (lambda: tasks.record.apply_async((uid,), idempotancy_key="k1", queue=nowhere),
         IdempotencyConfigError),
        (lambda: tasks.record.apply_async((uid,), idem_tll=60, queue=nowhere),
         IdempotencyConfigError),
        (lambda: tasks.record.s(uid).set(queue=nowhere).delay(idempotency_key="k1"),
         MisplacedCallOption),
        (lambda: broken_rule.apply_async((1,), queue=nowhere), IdempotencyConfigError),
    ]  # fmt: skip
    for call, error in refusals:
        with pytest.raises(error):
            call()
    assert enqueued(broker, nowhere) == []
    # The same queue does receive a call that gives its key.
    tasks.keyed.apply_async((uid,), idempotency_key=f"evt-{uid}", queue=nowhere)
    found = enqueued(broker, nowhere)
    assert found
    assert sum(broker.llen(name) for name in found if broker.type(name) == b"list") == 1
    broker.delete(*found)


def test_require_key_on_the_worker_refuses_a_message_without_one_and_runs_one_with_it(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    # Item 4 from another producer: app.send_task, which celery-idem does not check.
    refused = [
        tasks.app.send_task("t.keyed", (uid,), queue=worker.queue),
        tasks.app.send_task(
            "t.keyed", (uid,), queue=worker.queue, headers={"idempotency_key": None}
        ),
    ]
    for res in refused:
        with pytest.raises(InvalidIdempotencyKey) as info:
            res.get(timeout=T)
        assert "requires an explicit idempotency key (idem_require_key)" in str(info.value)
        assert info.value.key is None
        assert info.value.task_name == "t.keyed"
    assert ledger_count(ledger, uid) == 0

    key = f"evt-{uid}"
    via_header = tasks.app.send_task(
        "t.keyed", (uid,), queue=worker.queue, headers={"idempotency_key": key}
    )
    assert via_header.get(timeout=T) == {"name": uid, "key": key, "retries": 0}
    duplicate = tasks.keyed.apply_async((uid,), idempotency_key=key, queue=worker.queue)
    assert duplicate.get(timeout=T) == {"name": uid, "key": key, "retries": 0}
    assert ledger_count(ledger, uid) == 1


def test_require_key_lets_the_worker_retry_under_the_same_key(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    key = f"evt-{uid}"
    res = tasks.keyed.apply_async((uid, True), idempotency_key=key, queue=worker.queue)
    assert res.get(timeout=T) == {"name": uid, "key": key, "retries": 1}
    assert ledger_count(ledger, uid) == 2  # the first run and its retry, nothing else
