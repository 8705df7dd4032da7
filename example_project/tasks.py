"""The tasks: one welcome email per new customer, one recorded order per paid order.

The webhook enqueues :func:`send_welcome_email` with ``idempotency_key=<event id>``
for every delivery of a ``customer.created`` event. The provider resends an event when
our endpoint is slow, so the same event id can arrive five times, even concurrently;
``base=IdempotentTask`` makes the body run once for that key and every other delivery
answer with the first run's result (the Message-ID of the one email).

An ``order.paid`` event enqueues :func:`record_order`, a task of three side effects (a
row in the shop's SQLite database, the confirmation email, the row marked notified).
Each is a durable step (``self.step``), so a worker killed between two of them does
not repeat the finished ones when the message is redelivered.

Some things here exist only for the demo's report and are marked so: counting
executions, replays and replayed steps in Redis, and an optional pause that lets the
demo kill the worker in the middle of sending.
"""

from __future__ import annotations

import contextlib
import json
import os
import smtplib
import sqlite3
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from email.message import EmailMessage
from email.utils import formataddr

from celery.utils.log import get_task_logger

from celery_idem import IdempotentTask
from example_project import app, report
from example_project.report import REPORT_TTL, count, report_client

logger = get_task_logger(__name__)

SMTP_HOST = os.environ.get("SMTP_HOST", "localhost")
SMTP_PORT = int(os.environ.get("SMTP_PORT", "8025"))
SENDER = formataddr(("Acme", "welcome@acme.example"))
# The shop's own database (SQLite: a file, nothing to run). The demo points it at a
# temporary directory; a real project would use its usual database here.
ORDERS_DB = os.environ.get("ORDERS_DB", "acme-orders.sqlite3")


@app.task(bind=True, base=IdempotentTask)
def send_welcome_email(self: IdempotentTask, customer_id: str, email: str, name: str) -> str:
    """Send the welcome email for a new customer and return its Message-ID.

    Runs once per idempotency key (the provider's event id). The key and the fence
    also travel to the mail server as headers: a downstream system that keeps them can
    drop a duplicate by key, or refuse a write from an older attempt (a lower fence),
    which closes the one window celery-idem cannot close alone (a worker dying after
    the email left and before the result was stored).
    """
    key, fence = self.idempotency_key, self.idempotency_fence
    count("executions", customer_id)  # demo report only
    logger.info("sending the welcome email to %s (key %s, fence %s)", email, key, fence)

    message = EmailMessage()
    message["From"] = SENDER
    message["To"] = formataddr((name, email))
    message["Subject"] = f"Welcome to Acme, {name}!"
    # A fresh, random Message-ID per email (not derived from the key): two emails would
    # have two ids, so identical answers to every delivery really mean "one email".
    message["Message-ID"] = f"<{uuid.uuid4().hex[:16]}@acme.example>"
    message["Idempotency-Key"] = str(key)
    message["X-Idempotency-Fence"] = str(fence)
    message["X-Customer-Id"] = customer_id
    message.set_content(f"Hello {name},\n\nwelcome to Acme. Your customer id is {customer_id}.\n")

    with smtplib.SMTP(SMTP_HOST, SMTP_PORT, timeout=30) as smtp:
        pause_before_send(key, fence)  # demo only: the connection is open, nothing sent
        smtp.send_message(message)
    return str(message["Message-ID"])


# -- a task of several side effects: durable steps ----------------------------------


@app.task(bind=True, base=IdempotentTask)
def record_order(
    self: IdempotentTask, order_id: str, email: str, name: str, amount_cents: int
) -> str:
    """Record a paid order, email its confirmation, mark it notified; return the Message-ID.

    Runs once per idempotency key (the provider's event id), like the welcome email;
    but a run can now die between two side effects (a deploy, the OOM killer), and the
    broker then redelivers the message. Without steps the redelivery would run the
    whole body again: a second row for the same order before its one email. Each
    ``self.step`` stores its function's return value in the key's record before the
    body goes on; the redelivery gets the finished steps back and replays them (the
    function is not called, the stored value is returned), so only the step that was
    interrupted runs again. A step must return something small and serializable (the
    row id, a Message-ID): it is what later attempts get.
    """
    count("executions", order_id)  # demo report only
    row_id = self.step("row", insert_order, order_id, email, amount_cents)
    message_id = self.step("email", send_confirmation, self, row_id, email, name, amount_cents)
    self.step("notified", mark_notified, row_id, message_id)
    return message_id


@contextlib.contextmanager
def orders_db() -> Iterator[sqlite3.Connection]:
    """A connection to the shop's database, in one transaction (committed on success).

    The table is created on first use, so the example needs no migration step.
    """
    db = sqlite3.connect(ORDERS_DB, timeout=30)
    try:
        with db:  # commits, or rolls back on an exception
            # No UNIQUE on order_ref, on purpose: here the step alone keeps one row per
            # order, and the demo's row count shows it. A real schema would add the
            # constraint too (then a re-run fails on it instead of inserting).
            db.execute(
                "CREATE TABLE IF NOT EXISTS orders ("
                " id INTEGER PRIMARY KEY AUTOINCREMENT,"
                " order_ref TEXT NOT NULL, email TEXT NOT NULL, amount_cents INTEGER NOT NULL,"
                " message_id TEXT, notified_at TEXT)"
            )
            yield db
    finally:
        db.close()


def insert_order(order_id: str, email: str, amount_cents: int) -> int:
    """Step "row": INSERT the order and return its new row id (what a replay returns).

    A worker killed after this commit and before celery-idem stored the step (one
    Redis round trip) would insert again: the one window a step cannot close, as for
    the email. A unique constraint on ``order_ref`` closes it in a real schema.
    """
    with orders_db() as db:
        cursor = db.execute(
            "INSERT INTO orders (order_ref, email, amount_cents) VALUES (?, ?, ?)",
            (order_id, email, amount_cents),
        )
        row_id = cursor.lastrowid  # the INTEGER PRIMARY KEY SQLite gave the new row
    if row_id is None:  # never after a successful INSERT; narrows the type
        raise RuntimeError(f"no row id after inserting order {order_id}")
    logger.info("order %s recorded as row %s", order_id, row_id)
    return row_id


def send_confirmation(
    task: IdempotentTask, row_id: int, email: str, name: str, amount_cents: int
) -> str:
    """Step "email": send the order confirmation and return its Message-ID.

    ``task.step_key`` (``<event id>/email``) is this step's own idempotency key, the
    same on every attempt: it goes to the mail server as the Idempotency-Key, so a mail
    system that deduplicates by it sends this email once even if the step itself runs
    twice (a worker killed after sending, before the step was stored).
    """
    message = EmailMessage()
    message["From"] = SENDER
    message["To"] = formataddr((name, email))
    message["Subject"] = f"Your Acme order #{row_id}"
    message["Message-ID"] = f"<{uuid.uuid4().hex[:16]}@acme.example>"  # random, as above
    message["Idempotency-Key"] = str(task.step_key)
    message["X-Idempotency-Fence"] = str(task.idempotency_fence)
    message.set_content(
        f"Hello {name},\n\nwe received your payment of {amount_cents / 100:.2f} EUR for "
        f"order #{row_id}.\n"
    )
    with smtplib.SMTP(SMTP_HOST, SMTP_PORT, timeout=30) as smtp:
        # demo only: the row step is stored, the connection open, nothing sent yet
        pause_before_send(task.idempotency_key, task.idempotency_fence)
        smtp.send_message(message)
    return str(message["Message-ID"])


def mark_notified(row_id: int, message_id: str) -> None:
    """Step "notified": record on the row which email told the customer, and when."""
    with orders_db() as db:
        db.execute(
            "UPDATE orders SET message_id = ?, notified_at = ? WHERE id = ?",
            (message_id, datetime.now(timezone.utc).isoformat(timespec="seconds"), row_id),
        )


# -- the demo's report ---------------------------------------------------------------
#
# Nothing below is needed by a real project. The demo prints how often the body ran
# (counted per customer or order, above) and how often celery-idem answered from the
# store instead (counted per key, by receivers of its ``replayed`` and ``step_replayed``
# signals). The counters live in their own Redis database (``demo_report_url`` in
# celeryconfig.py).

report.use(lambda: str(app.conf.demo_report_url), {send_welcome_email.name, record_order.name})


def pause_before_send(key: str | None, fence: int | None) -> None:
    """Demo only: pause before sending when ``DEMO_PAUSE_KEY`` names this key.

    ``DEMO_PAUSE_KEY`` is a comma-separated list of keys. The demo starts a worker with
    the ids of events C (a welcome email) and E (an order, whose row step is done by
    then), waits until the task reports that it is pausing (SMTP connection open,
    email not sent), then SIGKILLs the whole worker. The restarted worker's list no
    longer has that key, so the redelivered message sends at once.
    """
    if key is None or key not in os.environ.get("DEMO_PAUSE_KEY", "").split(","):
        return
    seconds = float(os.environ.get("DEMO_PAUSE_SECONDS", "30"))
    pausing = json.dumps({"pid": os.getpid(), "fence": fence})
    report_client().set(f"demo:pausing:{key}", pausing, ex=REPORT_TTL)
    logger.warning("demo: pausing %.0f s before sending (key %s)", seconds, key)
    time.sleep(seconds)
