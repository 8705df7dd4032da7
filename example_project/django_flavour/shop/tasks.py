"""The welcome task of the Django flavour: the customer row in PostgreSQL, then the email.

The webhook view enqueues :func:`welcome_customer` with ``idempotency_key=<event id>``
for every delivery of a ``customer.created`` event. celery-idem's records live in the
shop's own PostgreSQL database (``CELERY_IDEM_STORE_URL``), which lets the task commit
its rows and its progress in one transaction:

1. step ``row``: ``Customer.objects.create`` in a transaction that also stores the step
   (``self.step(..., atomic=True)``): a worker killed before that commit leaves neither
   the row nor the step, and the next attempt inserts once; killed after it, the next
   attempt gets the row's id back from the step instead of inserting again;
2. step ``email``: the welcome email, outside any transaction (an email cannot be rolled
   back), with the step's own key as its ``Idempotency-Key``;
3. ``self.idem_atomic()``: the row marked welcomed, and the key completed with the
   Message-ID, in one more transaction.

Demo-only parts (counters and hold points) are in :mod:`.demo_hooks`.
"""

from __future__ import annotations

import smtplib
import uuid
from email.message import EmailMessage
from email.utils import formataddr

from django.conf import settings
from django.utils import timezone

from celery_idem import IdempotentTask
from example_project.django_flavour.celery import app
from example_project.django_flavour.shop.demo_hooks import count, hold
from example_project.django_flavour.shop.models import Customer

SENDER = formataddr(("Acme", "welcome@acme.example"))


# ``@app.task`` rather than Django's usual ``@shared_task``: the parent package holds the
# Redis flavour's app too, and a shared task sends through whichever app is current in
# the calling thread (a request thread of the web server may have none of its own).
@app.task(bind=True, base=IdempotentTask)
def welcome_customer(self: IdempotentTask, customer_id: str, email: str, name: str) -> str:
    """Create the customer, send the welcome email, mark it welcomed; return the Message-ID."""
    count("executions", customer_id)  # demo report only
    pk = self.step("row", create_customer, self, customer_id, email, name, atomic=True)
    hold(self, "committed")  # demo only: the row step has committed, no email yet
    message_id = self.step("email", send_welcome, self, pk, email, name)
    with self.idem_atomic() as done:
        Customer.objects.filter(pk=pk).update(
            welcome_message_id=message_id, welcomed_at=timezone.now()
        )
        done.result = message_id
    return str(done.result)


def create_customer(task: IdempotentTask, customer_id: str, email: str, name: str) -> int:
    """Step "row", inside the step's transaction: INSERT the customer, return its id."""
    customer = Customer.objects.create(provider_id=customer_id, email=email, name=name)
    hold(task, "inserted")  # demo only: the INSERT is done, the transaction still open
    return int(customer.pk)


def send_welcome(task: IdempotentTask, pk: int, email: str, name: str) -> str:
    """Step "email": send the welcome email and return its Message-ID.

    ``task.step_key`` (``<event id>/email``) is the same on every attempt: a mail system
    that de-duplicates by it sends this email once even if the step itself ran twice
    (a worker killed after sending, before the step was stored).
    """
    message = EmailMessage()
    message["From"] = SENDER
    message["To"] = formataddr((name, email))
    message["Subject"] = f"Welcome to Acme, {name}!"
    message["Message-ID"] = f"<{uuid.uuid4().hex[:16]}@acme.example>"  # random: 2 emails, 2 ids
    message["Idempotency-Key"] = str(task.step_key)
    message["X-Idempotency-Fence"] = str(task.idempotency_fence)
    message.set_content(f"Hello {name},\n\nwelcome to Acme. You are customer #{pk}.\n")
    with smtplib.SMTP(settings.SMTP_HOST, settings.SMTP_PORT, timeout=30) as smtp:
        smtp.send_message(message)
    return str(message["Message-ID"])
