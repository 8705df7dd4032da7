"""The guarantee wherever Celery takes a task: canvas, replace, reused task ids, retries.

Each test runs on a real prefork worker against the suite's Redis (broker, backend,
store) and counts real executions in the effect ledger (``tests.integration.tasks``).
"""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any

import pytest
import redis
from celery import chain

from celery_idem import IdempotencyKeyMismatch
from devtools.processes import wait_for
from tests.integration.conftest import Worker, ledger_count

pytestmark = pytest.mark.integration
T = 60


def values(ledger: redis.Redis, name: str, field: str) -> list[Any]:
    return [json.loads(x)[field] for x in ledger.lrange(f"ledger:{name}", 0, -1)]


# -- idem_dedupe_on_publish and continuations ------------------------------------------


def test_a_chain_through_a_step_deduplicated_at_publish_completes(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    q = worker.queue
    assert tasks.cp_double.apply_async((3, f"{uid}:double"), queue=q).get(timeout=T) == 6
    flow = chain(
        tasks.cp_add1.s(2, f"{uid}:add1").set(queue=q),
        tasks.cp_double.s(f"{uid}:double").set(queue=q),
        tasks.plain_collect.s(f"{uid}:collect").set(queue=q),
    )
    assert flow.apply_async().get(timeout=T) == 6
    assert ledger_count(ledger, f"{uid}:double") == 1  # double(3) ran once
    assert values(ledger, f"{uid}:collect", "value") == [6]


def test_a_duplicate_deduplicated_at_publish_still_runs_its_own_callback(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    q = worker.queue
    assert tasks.cp_double.apply_async((5, f"{uid}:double"), queue=q).get(timeout=T) == 10
    link = tasks.plain_collect.s(f"{uid}:cb").set(queue=q)
    again = tasks.cp_double.apply_async((5, f"{uid}:double"), link=link, queue=q)
    assert again.get(timeout=T) == 10
    wait_for(lambda: ledger_count(ledger, f"{uid}:cb") == 1, timeout=T, message="callback ran")
    assert values(ledger, f"{uid}:cb", "value") == [10]
    assert ledger_count(ledger, f"{uid}:double") == 1


def test_dedupe_on_publish_sends_a_call_it_cannot_bind_as_celery_would(
    worker: Worker, tasks: ModuleType
) -> None:
    # typing=False: Celery does not check the arguments when sending; neither may we.
    res = tasks.cp_untyped.apply_async((1,), queue=worker.queue)
    with pytest.raises(TypeError):
        res.get(timeout=T)
    assert tasks.cp_untyped.apply_async((1, 2), queue=worker.queue).get(timeout=T) == 3


# -- self.replace() ----------------------------------------------------------------------


@pytest.mark.parametrize("target", ["idem", "plain"], ids=["idempotent-target", "plain-target"])
def test_replace_keeps_the_key_and_duplicates_get_the_replacements_result(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str, target: str
) -> None:
    key, q = f"replace-{uid}", worker.queue
    first = tasks.cp_replacer.apply_async((uid, 4, target), idempotency_key=key, queue=q)
    # A duplicate while the replacement still runs (it sleeps 1 s), one after.
    wait_for(lambda: ledger_count(ledger, f"{uid}:target") == 1, timeout=T, message="target")
    during = tasks.cp_replacer.apply_async((uid, 4, target), idempotency_key=key, queue=q)
    assert first.get(timeout=T) == 40
    assert during.get(timeout=T) == 40
    after = tasks.cp_replacer.apply_async((uid, 4, target), idempotency_key=key, queue=q)
    assert after.get(timeout=T) == 40
    assert ledger_count(ledger, uid) == 1  # the replaced body ran once
    assert ledger_count(ledger, f"{uid}:target") == 1  # and so did the replacement


def test_a_replacement_that_fails_releases_the_key_for_the_next_call(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    key, q = f"replace-{uid}", worker.queue
    first = tasks.cp_replacer.apply_async((uid, 4, "fragile"), idempotency_key=key, queue=q)
    with pytest.raises(ValueError, match="the replacement failed"):
        first.get(timeout=T)
    # The failure released the key, as any failure does: the next call runs both again.
    again = tasks.cp_replacer.apply_async((uid, 4, "fragile"), idempotency_key=key, queue=q)
    assert again.get(timeout=T) == 40
    assert ledger_count(ledger, uid) == 2
    assert ledger_count(ledger, f"{uid}:target") == 2


def test_a_body_rejected_back_to_the_queue_runs_again_on_the_requeued_message(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    res = tasks.cp_reject.apply_async((uid,), queue=worker.queue)
    assert res.get(timeout=T) == f"{uid} ok"
    assert values(ledger, uid, "task_id") == [res.id, res.id]


def test_a_body_that_raises_ignore_leaves_the_key_free_for_the_next_call(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    first = tasks.cp_ignore.apply_async((uid,), queue=worker.queue)
    wait_for(lambda: ledger_count(ledger, uid) == 1, timeout=T, message="first run")
    second = tasks.cp_ignore.apply_async((uid,), queue=worker.queue)
    assert second.get(timeout=T) == f"{uid} ok"
    assert values(ledger, uid, "task_id") == [first.id, second.id]


# -- retries -------------------------------------------------------------------------------


def test_a_new_request_reusing_a_parked_task_id_with_other_arguments_is_refused(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    order, task_id, q = f"o-{uid}", f"order-{uid}", worker.queue
    tasks.cp_charge.apply_async((order, 100), task_id=task_id, idempotency_key=order, queue=q)
    wait_for(lambda: ledger_count(ledger, f"charge:{order}") == 1, timeout=T, message="first try")
    clash = tasks.cp_charge.apply_async(
        (order, 999), task_id=task_id, idempotency_key=order, queue=q
    )
    # Both share the task id: the refusal's FAILURE is stored first, then the retry's
    # SUCCESS replaces it (read afresh each time: an AsyncResult caches what it saw).
    wait_for(
        lambda: tasks.app.AsyncResult(task_id).state == "SUCCESS",
        timeout=T,
        message="the retry's result",
    )
    assert tasks.app.AsyncResult(task_id).get(timeout=T) == "charged 100"
    assert clash.id == task_id
    assert values(ledger, f"charge:{order}", "cents") == [100, 100]
    assert "IdempotencyKeyMismatch" in worker.log()
    # The same key with other arguments and a fresh task id is refused outright.
    fresh = tasks.cp_charge.apply_async((order, 999), idempotency_key=order, queue=q)
    with pytest.raises(IdempotencyKeyMismatch):
        fresh.get(timeout=T)


def test_retry_without_throw_parks_the_key_and_the_retry_runs_the_body(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    res = tasks.cp_retry_nothrow.apply_async((uid,), queue=worker.queue)
    wait_for(lambda: ledger_count(ledger, uid) == 2, timeout=T, message="the retry ran")
    assert values(ledger, uid, "retries") == [0, 1]
    # Celery keeps the first SUCCESS of a task id in the result backend ("first"); the
    # key's outcome is the retry's, which every duplicate replays.
    assert res.get(timeout=T) == "first"
    dup = tasks.cp_retry_nothrow.apply_async((uid,), queue=worker.queue)
    assert dup.get(timeout=T) == "second"
    assert ledger_count(ledger, uid) == 2


def test_a_retry_honours_its_carried_key_before_deriving_one_from_new_arguments(
    start_worker: Any, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    # Solo: a prefork pool would have to pickle the deeply nested argument to its child.
    worker = start_worker(pool="solo", concurrency=1)
    res = tasks.cp_retry_deep.apply_async((uid,), queue=worker.queue)
    assert res.get(timeout=T) == tasks.DEEP
    assert ledger_count(ledger, uid) == 2
    # The original request's duplicates replay the retry's outcome.
    again = tasks.cp_retry_deep.apply_async((uid,), queue=worker.queue)
    assert again.get(timeout=T) == tasks.DEEP
    assert ledger_count(ledger, uid) == 2
