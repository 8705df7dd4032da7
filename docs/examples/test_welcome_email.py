"""Testing an idempotent task with celery-idem's in-memory store.

In a project this module would import its app and task (``from shop.tasks import
send_welcome``); here they are defined inline so the file runs on its own. celery-idem's
test suite runs it (``tests/docs/test_testing_example.py``).
"""

from __future__ import annotations

import datetime as dt

import pytest
from celery import Celery
from freezegun import freeze_time

from celery_idem import IdempotencyKeyMismatch, IdempotentTask
from celery_idem.keys import storage_key
from celery_idem.store import ClaimRequest
from celery_idem.testing import MemoryStore, use_memory_store

app = Celery("shop", set_as_current=False)
outbox: list[tuple[int, str, str | None]] = []


@app.task(base=IdempotentTask, bind=True, name="shop.send_welcome")
def send_welcome(self, user_id: int, email: str) -> str:
    """Send one welcome email; returns its message id."""
    outbox.append((user_id, email, self.idempotency_key))
    return f"<msg-{len(outbox)}@shop.example>"


@pytest.fixture
def celery_app() -> Celery:
    """The app under test, eager: ``delay()`` runs the task in the test's process."""
    app.conf.task_always_eager = True
    outbox.clear()
    return app


def test_one_email_per_event(celery_app: Celery, idem_store: MemoryStore) -> None:
    """``idem_store`` (celery-idem's pytest plugin): a fresh store for every task, one test."""
    first = send_welcome.apply_async((7, "ada@example.com"), idempotency_key="evt_1")
    again = send_welcome.apply_async((7, "ada@example.com"), idempotency_key="evt_1")

    assert again.get() == first.get()  # the duplicate got the first run's result
    assert outbox == [(7, "ada@example.com", "evt_1")]  # and the body ran once


def test_a_reused_event_id_is_refused(celery_app: Celery, idem_store: MemoryStore) -> None:
    """The same key with other arguments runs nothing."""
    send_welcome.apply_async((7, "ada@example.com"), idempotency_key="evt_2").get()

    with pytest.raises(IdempotencyKeyMismatch):
        send_welcome.apply_async((8, "eve@example.com"), idempotency_key="evt_2").get()
    assert len(outbox) == 1


def test_without_the_fixture(celery_app: Celery) -> None:
    """The context manager does the same, in any test framework."""
    with use_memory_store() as store:
        send_welcome.delay(7, "ada@example.com")
        send_welcome.delay(7, "ada@example.com")  # derived key: same arguments, same key
        store.clear()  # forget every record, as if idem_ttl had passed
        send_welcome.delay(7, "ada@example.com")
    assert len(outbox) == 2


def test_a_crashed_run_is_taken_over_after_its_lease(
    celery_app: Celery, idem_store: MemoryStore
) -> None:
    """The store follows freezegun: a test lets a lease run out without sleeping."""
    record = storage_key("idem", send_welcome.name, "evt_3")
    dead_worker = "owner-token-of-a-dead-worker"
    with freeze_time("2030-01-01 12:00:00") as clock:
        # A worker claims the key and dies before completing it.
        crashed = idem_store.claim(
            ClaimRequest(
                record, token=dead_worker, task_id="t-1", fingerprint="", lease=60, ttl=86400
            )
        )
        clock.tick(dt.timedelta(seconds=61))  # its lease runs out

        result = send_welcome.apply_async((7, "ada@example.com"), idempotency_key="evt_3")

    assert result.get() == "<msg-1@shop.example>"
    stored = idem_store.read(record)
    assert stored is not None
    assert stored.fence > crashed.fence  # the take-over got a higher fence
