"""Publish-side short-circuit (``idem_dedupe_on_publish``): a known key is not sent."""

from __future__ import annotations

import threading
from types import ModuleType
from typing import Any

import pytest
import redis
from celery import Celery
from kombu.exceptions import OperationalError

from celery_idem import IdempotentTask
from celery_idem.keys import storage_key
from celery_idem.store import ClaimState, RecordState, ReserveRequest
from celery_idem.task import publish
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


def publisher(celery_env: dict[str, str], tasks: ModuleType, *, broker: str) -> Any:
    """Another process's view of ``t.deduped``: the same store and task, this ``broker``."""
    app = Celery("other-publisher", broker=broker, backend=celery_env["IDEM_TEST_BACKEND"],
                 set_as_current=False)  # fmt: skip
    app.conf.idem_redis_url = celery_env["IDEM_TEST_STORE"]
    app.conf.idem_min_replicas = int(celery_env["IDEM_TEST_MIN_REPLICAS"])
    return app.task(
        tasks.deduped.run, base=IdempotentTask, bind=True, shared=False, name="t.deduped",
        idem_dedupe_on_publish=True,
    )  # fmt: skip


def record_of(tasks: ModuleType, uid: str) -> tuple[Any, str]:
    """The store and storage key of ``t.deduped((uid,))``, as its publisher computes them."""
    spec = tasks.deduped.idem_spec()
    key = spec.rule.resolve((uid,), {}, None, spec.settings.fingerprint).key
    return spec.store, storage_key(spec.settings.key_prefix, spec.scope, key)


def test_back_to_back_sends_before_a_worker_claims_return_the_first_id(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    # A countdown keeps the worker from claiming the key while the others are sent: the
    # second send finds the first one's reservation (state R), not a claim.
    first = tasks.deduped.apply_async((uid,), queue=worker.queue, countdown=2)
    store, key = record_of(tasks, uid)
    reserved = store.read(key)
    assert reserved is not None
    assert (reserved.state, reserved.task_id) == (RecordState.RESERVED.value, first.id)
    assert reserved.lease_left > 60  # one lease plus the countdown
    again = tasks.deduped.apply_async((uid,), queue=worker.queue, countdown=2)
    assert again.id == first.id  # "as with Singleton": nothing was sent
    ids: list[str] = []
    threads = [
        threading.Thread(
            target=lambda: ids.append(tasks.deduped.apply_async((uid,), queue=worker.queue).id)
        )
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T)
    assert ids == [first.id] * 8
    value = first.get(timeout=T)
    assert again.get(timeout=T) == value
    assert ledger_count(ledger, uid) == 1
    assert received(worker, first.id) == 1


def test_a_publish_that_fails_after_reserving_withdraws_and_a_later_send_runs_once(
    worker: Worker,
    tasks: ModuleType,
    ledger: redis.Redis,
    uid: str,
    celery_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refused = publisher(celery_env, tasks, broker=f"redis://127.0.0.1:{free_port()}/0")
    store, key = record_of(tasks, uid)
    withdrawn: list[tuple[str, str | None]] = []
    withdraw = publish.withdraw

    def spy(task: Any, reservation: publish.Reservation) -> None:
        record = store.read(key)  # as the failed publish left it
        withdrawn.append((record.state if record else "", reservation.task_id))
        withdraw(task, reservation)

    monkeypatch.setattr(publish, "withdraw", spy)
    with pytest.raises(OperationalError):
        refused.apply_async((uid,), queue=worker.queue, retry=False)
    (left,) = withdrawn
    assert left[0] == RecordState.RESERVED.value  # reserved, then the broker refused
    assert store.read(key) is None  # the reservation was withdrawn
    first = tasks.deduped.apply_async((uid,), queue=worker.queue)
    value = first.get(timeout=T)
    assert tasks.deduped.apply_async((uid,), queue=worker.queue).id == first.id
    assert value["task_id"] == first.id
    assert ledger_count(ledger, uid) == 1


def test_a_reservation_whose_message_never_left_runs_out_and_the_claim_still_guards(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    # The publisher died between its reservation and its publish (nothing withdrew it).
    store, key = record_of(tasks, uid)
    lost = f"lost-{uid}"
    out = store.reserve(ReserveRequest(key, task_id=lost, fingerprint="", hold=2.0))
    assert out is not None
    assert out.state is ClaimState.RESERVED
    # While it stands, publishers hand out its id (the documented cost of the hint)...
    assert tasks.deduped.apply_async((uid,), queue=worker.queue).id == lost
    # ...and a message from a producer that does not reserve waits for it, as for a
    # running holder, then runs once when it has run out (not a takeover).
    sent = tasks.app.send_task("t.deduped", (uid,), queue=worker.queue)
    value = sent.get(timeout=T)
    assert value["task_id"] == sent.id
    assert ledger_count(ledger, uid) == 1
    assert "took over" not in worker.log().split(f"[{sent.id}] received", 1)[1]
    assert tasks.deduped.apply_async((uid,), queue=worker.queue).id == sent.id
    again = tasks.app.send_task("t.deduped", (uid,), queue=worker.queue)
    assert again.get(timeout=T) == value
    assert ledger_count(ledger, uid) == 1
