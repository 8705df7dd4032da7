"""Two deliveries of one webhook event are one request.

A payment provider resends an event it believes was lost: the same event id, its
``delivery_attempt`` counted up, received at another time. The event id is the key;
``idem_fingerprint`` leaves out what a resend changes, so the check of the rest still
holds (another customer's data under a reused event id is refused). celery-idem's test
suite runs this file on a real worker (``tests/docs/test_keys_example.py``).
"""

from __future__ import annotations

import uuid
from typing import Any

from celery import Celery

from celery_idem import IdempotentTask

app = Celery("shop", broker="redis://localhost:6379/0", backend="redis://localhost:6379/1")


def send_welcome_email(address: str) -> str:
    """Stands in for the email provider's API: each email sent gets a new message id."""
    return f"<{uuid.uuid4().hex}@shop.example>"


@app.task(
    base=IdempotentTask,
    name="shop.on_customer_created",
    idem_fingerprint=["event.delivery_attempt", "received_at"],
)
def on_customer_created(event: dict[str, Any], received_at: str) -> str:
    """Welcomes the new customer: one email per event id, resends included."""
    return send_welcome_email(event["data"]["object"]["email"])


def receive(event: dict[str, Any], received_at: str) -> Any:
    """What the webhook endpoint does with each delivery: the event id is the key."""
    return on_customer_created.apply_async((event, received_at), idempotency_key=event["id"])


if __name__ == "__main__":
    customer = {"object": {"id": "cus_1", "email": "ada@example.com"}}
    first = receive({"id": "evt_123", "delivery_attempt": 1, "data": customer}, "10:00:00")
    resend = receive({"id": "evt_123", "delivery_attempt": 2, "data": customer}, "10:05:00")
    message_id = first.get(timeout=30)
    assert resend.get(timeout=30) == message_id  # one email: the resend gets its id
    print(message_id)
