"""The task: send a customer their welcome email, once per payment-provider event.

The webhook enqueues :func:`send_welcome_email` with ``idempotency_key=<event id>``
for every delivery of a ``customer.created`` event. The provider resends an event when
our endpoint is slow, so the same event id can arrive five times, even concurrently;
``base=IdempotentTask`` makes the body run once for that key and every other delivery
answer with the first run's result (the Message-ID of the one email).

Two things here exist only for the demo's report and are marked so: counting
executions and replays in Redis, and an optional pause that lets the demo kill the
worker in the middle of sending.
"""

from __future__ import annotations

import json
import os
import smtplib
import time
import uuid
from email.message import EmailMessage
from email.utils import formataddr
from typing import Any

import redis
from celery.utils.log import get_task_logger

from celery_idem import IdempotentTask, signals
from example_project import app

logger = get_task_logger(__name__)

SMTP_HOST = os.environ.get("SMTP_HOST", "localhost")
SMTP_PORT = int(os.environ.get("SMTP_PORT", "8025"))
SENDER = formataddr(("Acme", "welcome@acme.example"))


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


# -- the demo's report ---------------------------------------------------------------
#
# Nothing below is needed by a real project. The demo prints how often the body ran
# (counted per customer, above) and how often celery-idem answered from the store
# instead (counted per key, by a receiver of its ``replayed`` signal). The counters
# live in their own Redis database (``demo_report_url`` in celeryconfig.py).

REPORT_TTL = 24 * 3600  # seconds the demo's counters are kept
_report: tuple[int, redis.Redis] | None = None


def report_client() -> redis.Redis:
    """A Redis client for the report counters, one per process (prefork children)."""
    global _report  # noqa: PLW0603 - one client per process
    if _report is None or _report[0] != os.getpid():
        _report = (os.getpid(), redis.Redis.from_url(app.conf.demo_report_url))
    return _report[1]


def count(what: str, name: str | None) -> None:
    """Add one to the report counter ``demo:<what>:<name>`` (kept for a day)."""
    counter = f"demo:{what}:{name}"
    with report_client().pipeline() as pipe:
        pipe.incr(counter)
        pipe.expire(counter, REPORT_TTL)
        pipe.execute()


@signals.replayed.connect
def count_replay(
    sender: Any = None,
    key: str | None = None,
    task_id: str | None = None,
    original_task_id: str | None = None,
    **_: Any,
) -> None:
    """Record the deliveries answered from the stored result (the body did not run).

    A set of task ids, not a counter: a delivery's message can itself be delivered
    twice by the broker (visibility timeout), and that is still one delivery. A replay
    to the very message that ran (``original_task_id``) is such a redelivery too.
    """
    if getattr(sender, "name", None) != send_welcome_email.name or task_id == original_task_id:
        return
    replays = f"demo:replays:{key}"
    with report_client().pipeline() as pipe:
        pipe.sadd(replays, str(task_id))
        pipe.expire(replays, REPORT_TTL)
        pipe.execute()


def pause_before_send(key: str | None, fence: int | None) -> None:
    """Demo only: pause before sending when ``DEMO_PAUSE_KEY`` names this key.

    The demo starts a worker with ``DEMO_PAUSE_KEY=<event C's id>``, waits until the
    task reports that it is pausing (SMTP connection open, email not sent), then
    SIGKILLs the whole worker. The restarted worker has no ``DEMO_PAUSE_KEY``, so the
    redelivered message sends at once.
    """
    if key is None or key != os.environ.get("DEMO_PAUSE_KEY"):
        return
    seconds = float(os.environ.get("DEMO_PAUSE_SECONDS", "30"))
    pausing = json.dumps({"pid": os.getpid(), "fence": fence})
    report_client().set(f"demo:pausing:{key}", pausing, ex=REPORT_TTL)
    logger.warning("demo: pausing %.0f s before sending (key %s)", seconds, key)
    time.sleep(seconds)
