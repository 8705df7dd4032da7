"""Issue #14 items 3 and 11 on a real prefork worker: idem_fingerprint and idem_scope.

Runs are counted in the effect ledger (``tasks.effect``), not by what the library says.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest
import redis

from celery_idem import IdempotencyKeyMismatch
from celery_idem.keys import storage_key
from celery_idem.store import store_for_url
from tests.integration.conftest import Worker, ledger_count

pytestmark = pytest.mark.integration
T = 30  # seconds any one result may take


def event(uid: str, attempt: int, email: str = "ada@example.com") -> dict[str, Any]:
    """One delivery of the provider's event ``evt-<uid>``."""
    return {
        "id": f"evt-{uid}",
        "type": "customer.created",
        "delivery_attempt": attempt,
        "data": {"email": email},
    }


# --------------------------------------------------------------------------- idem_fingerprint


def test_two_deliveries_of_one_event_run_once_and_answer_alike(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    """Sent back to back (the second may find the first still running), both answer."""
    key = f"evt-{uid}"
    first = tasks.fs_event.apply_async(
        (uid, event(uid, 1), "2024-05-01T10:00:00Z"), idempotency_key=key, queue=worker.queue
    )
    again = tasks.fs_event.apply_async(
        (uid, event(uid, 2), "2024-05-01T10:01:00Z"), idempotency_key=key, queue=worker.queue
    )
    answer = first.get(timeout=T)
    assert again.get(timeout=T) == answer
    # Two pool children take them: either may claim first; the other replays its value.
    assert answer["task_id"] in {first.id, again.id}
    assert ledger_count(ledger, uid) == 1
    # Another customer's data under the same event id is still a mismatch.
    clash = tasks.fs_event.apply_async(
        (uid, event(uid, 3, "bob@example.com"), "2024-05-01T10:02:00Z"),
        idempotency_key=key,
        queue=worker.queue,
    )
    with pytest.raises(IdempotencyKeyMismatch):
        clash.get(timeout=T)
    assert ledger_count(ledger, uid) == 1


def test_without_idem_fingerprint_the_second_delivery_is_a_mismatch(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    key = f"evt-{uid}"
    first = tasks.fs_event_strict.apply_async(
        (uid, event(uid, 1), "2024-05-01T10:00:00Z"), idempotency_key=key, queue=worker.queue
    )
    first.get(timeout=T)
    again = tasks.fs_event_strict.apply_async(
        (uid, event(uid, 2), "2024-05-01T10:01:00Z"), idempotency_key=key, queue=worker.queue
    )
    with pytest.raises(IdempotencyKeyMismatch):
        again.get(timeout=T)
    assert ledger_count(ledger, uid) == 1


def test_per_call_from_apply_async_and_from_another_producers_header(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    key = f"evt-{uid}"
    first = tasks.fs_event_strict.apply_async(
        (uid, event(uid, 1), "10:00"),
        idempotency_key=key,
        idem_fingerprint=tasks.FS_LEAVE_OUT,
        queue=worker.queue,
    )
    answer = first.get(timeout=T)
    # A producer without celery-idem puts the same list in a header.
    raw = tasks.app.send_task(
        "t.fs_event_strict",
        (uid, event(uid, 2), "10:05"),
        headers={"idempotency_key": key, "idem_fingerprint": tasks.FS_LEAVE_OUT},
        queue=worker.queue,
    )
    assert raw.get(timeout=T) == answer
    assert ledger_count(ledger, uid) == 1
    # The task's own setting (every argument) still holds for a call that says nothing.
    plain = tasks.fs_event_strict.apply_async(
        (uid, event(uid, 3), "10:05"), idempotency_key=key, queue=worker.queue
    )
    with pytest.raises(IdempotencyKeyMismatch):
        plain.get(timeout=T)
    assert ledger_count(ledger, uid) == 1


def test_derived_keys_ignore_the_left_out_fields(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    first = tasks.fs_event.apply_async((uid, event(uid, 1), "10:00"), queue=worker.queue)
    answer = first.get(timeout=T)
    again = tasks.fs_event.apply_async((uid, event(uid, 2), "10:07"), queue=worker.queue)
    assert again.get(timeout=T) == answer
    assert ledger_count(ledger, uid) == 1
    other = tasks.fs_event.apply_async(
        (uid, event(uid, 1, "bob@example.com"), "10:00"), queue=worker.queue
    )
    assert other.get(timeout=T)["email"] == "bob@example.com"
    assert ledger_count(ledger, uid) == 2


# --------------------------------------------------------------------------- idem_scope


def test_a_renamed_task_with_its_former_name_as_scope_replays_its_records(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str, celery_env: dict[str, str]
) -> None:
    key = f"welcome-{uid}"
    before = tasks.fs_send_email.apply_async((uid, 7), idempotency_key=key, queue=worker.queue)
    written = before.get(timeout=T)
    assert written["task"] == "t.fs_send_email"
    derived = tasks.fs_send_email.apply_async((uid, 8), queue=worker.queue).get(timeout=T)

    # After the "deploy": the same requests reach the task under its new name.
    after = tasks.fs_send_email_renamed.apply_async(
        (uid, 7), idempotency_key=key, queue=worker.queue
    )
    assert after.get(timeout=T) == written
    again = tasks.fs_send_email_renamed.apply_async((uid, 8), queue=worker.queue)
    assert again.get(timeout=T) == derived
    assert ledger_count(ledger, uid) == 2  # only the two runs under the old name

    # The record is the old name's: one record, under the old name's storage key.
    store = store_for_url(celery_env["IDEM_TEST_STORE"])
    record = store.read(storage_key("idem", "t.fs_send_email", key))
    assert record is not None
    assert record.task_id == before.id

    # Renamed without idem_scope, the task starts with no records: it runs again.
    fresh = tasks.fs_send_other.apply_async((uid, 7), idempotency_key=key, queue=worker.queue)
    assert fresh.get(timeout=T)["task"] == "t.fs_mail.send_other"
    assert ledger_count(ledger, uid) == 3
