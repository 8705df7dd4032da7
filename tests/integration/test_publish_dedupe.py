"""Publish-side short-circuit (``idem_dedupe_on_publish``): a known key is not sent."""

from __future__ import annotations

from types import ModuleType

import pytest
import redis
from celery import Celery

from celery_idem import IdempotentTask
from devtools.processes import free_port, wait_for
from tests.integration.conftest import Worker, ledger_count

pytestmark = pytest.mark.integration
T = 30


def received(worker: Worker, task_id: str) -> int:
    return worker.log().count(f"[{task_id}] received")


def test_a_completed_key_returns_the_original_result_without_publishing(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    first = tasks.deduped.apply_async((uid,), queue=worker.queue)
    value = first.get(timeout=T)
    again = tasks.deduped.apply_async((uid,), queue=worker.queue)
    assert again.id == first.id  # the original task's AsyncResult: nothing was sent
    assert again.get(timeout=T) == value
    assert received(worker, first.id) == 1
    assert ledger_count(ledger, uid) == 1


def test_a_key_in_progress_returns_the_running_task(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    first = tasks.deduped.apply_async((uid, 1.5), queue=worker.queue)
    wait_for(lambda: ledger_count(ledger, uid) == 1, timeout=T, message="first run started")
    again = tasks.deduped.apply_async((uid, 1.5), queue=worker.queue)
    assert again.id == first.id
    assert again.get(timeout=T) == first.get(timeout=T)
    assert ledger_count(ledger, uid) == 1


def test_without_the_option_a_duplicate_is_published_and_replayed_by_the_worker(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    first = tasks.record.apply_async((uid,), queue=worker.queue)
    first.get(timeout=T)
    again = tasks.record.apply_async((uid,), queue=worker.queue)
    assert again.id != first.id
    assert again.get(timeout=T) == first.get(timeout=T)
    wait_for(lambda: received(worker, again.id) == 1, timeout=T, message="published")


def test_a_publisher_whose_store_is_down_publishes_and_the_worker_still_dedupes(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str, celery_env: dict[str, str]
) -> None:
    first = tasks.deduped.apply_async((uid,), queue=worker.queue)
    value = first.get(timeout=T)
    # A second publisher whose idempotency store is unreachable, same broker and task.
    publisher = Celery(
        "down-publisher",
        broker=celery_env["IDEM_TEST_BROKER"],
        backend=celery_env["IDEM_TEST_BACKEND"],
        set_as_current=False,
    )
    publisher.conf.idem_redis_url = f"redis://127.0.0.1:{free_port()}/0"
    deduped = publisher.task(
        tasks.deduped.run,
        base=IdempotentTask,
        bind=True,
        shared=False,
        name="t.deduped",
        idem_dedupe_on_publish=True,
    )
    again = deduped.apply_async((uid,), queue=worker.queue)
    assert again.id != first.id  # published normally despite the store being down
    assert again.get(timeout=T) == value  # ...and the worker replayed the stored result
    assert ledger_count(ledger, uid) == 1
