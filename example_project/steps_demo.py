"""Scenario E of the demo: a worker SIGKILLed between two durable steps of one task.

``record_order`` (``example_project.tasks``) has three side effects, each a durable
step: a row in the shop's SQLite database, the confirmation email, the row marked
notified. The worker is killed after the row step is stored and before the email
leaves; the broker redelivers the message to the restarted worker, which takes the key
over, gets the ``row`` step back from the key's record instead of inserting again, and
sends the one email. Checked from what really happened: the rows in the database, the
emails in the Maildir, and a receiver of celery-idem's ``step_replayed`` signal.

Its own module only to keep ``demo.py`` short; ``demo.Demo.scenario_e`` runs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from devtools.processes import wait_for
from example_project.stack import LEASE, START_TIMEOUT, VISIBILITY_TIMEOUT, say

if TYPE_CHECKING:
    from example_project.demo import Demo, Row

AMOUNT_CENTS = 4200


def order_paid(event_id: str, order_id: str, email: str, name: str) -> dict[str, Any]:
    """A provider's ``order.paid`` event, shaped like ``customer.created``."""
    return {
        "id": event_id,
        "type": "order.paid",
        "data": {"object": {"id": order_id, "email": email, "name": name, "amount": AMOUNT_CENTS}},
    }


def killed_between_steps(demo: Demo, row: Row) -> Row:
    """Deliver one order, SIGKILL the worker after its row step, restart it; fill ``row``."""
    run = demo.events.run
    key = demo.events.id("E")
    order_id, to = f"ord_{run}_E", f"alan.{run}@customers.example"
    observer, worker = demo.observer, demo.worker
    say()
    say(f"E. Event {key}: order {order_id} is paid ({AMOUNT_CENTS / 100:.2f} EUR). The")
    say("   task has three durable steps: the row in SQLite, the email, the notified mark.")
    say("   The worker will be killed after the row and before the email.")
    task_id = demo.webhook.deliver(order_paid(key, order_id, to, "Alan"))
    row.deliveries = 1
    say(f"   delivery 1: 202 Accepted, task {task_id}")
    pausing = wait_for(lambda: observer.pausing(key), START_TIMEOUT, 0.05, "the email step")
    killed_fence = int(pausing["fence"])
    before = observer.orders(order_id)
    emails_before = len(observer.emails(to))
    rows_now = ", ".join(f"row {o.row_id}, notified at {o.notified_at}" for o in before)
    say(f"   Worker process {pausing['pid']} (fence {killed_fence}) has stored step row")
    say(f"   (orders: {len(before)} row(s): {rows_now}) and holds the SMTP connection open in")
    say(f"   step email: nothing sent yet (mailbox: {emails_before} email(s)).")
    row.expect(
        len(before) == 1 and before[0].notified_at is None,
        f"at the kill the database held {before}, expected one row, not yet notified",
    )
    row.expect(emails_before == 0, f"{emails_before} emails before the kill, expected none")
    worker.kill()
    say(f"   SIGKILL to the whole worker (process group {worker.pid}).")
    worker.unpause(key)
    worker.start()
    say(f"   Worker restarted (pid {worker.pid}); the message comes back after its")
    say(f"   visibility timeout ({VISIBILITY_TIMEOUT} s), takes the key over after the lease")
    say(f"   ({LEASE} s) and gets the finished row step back with its claim ...")
    demo.finish(row, [task_id])
    for line in worker.log_lines(key, "took over"):
        say(f"     worker log: {line}")

    replayed = observer.step_replays(key)
    orders = observer.orders(order_id)
    emails = observer.emails(to)
    row.executions = observer.executions(order_id)
    row.emails = len(emails)
    row.from_store = observer.replays(key)
    say(f"   Replayed from the record (step_replayed), not run again: {', '.join(replayed)}")
    say(f"   Orders: {len(orders)} row(s) for {order_id} in the database:")
    for order in orders:
        say(f"     row {order.row_id}, notified at {order.notified_at}, {order.message_id}")
    say(f"   Mailbox: {len(emails)} email(s) for the order:")
    for email in emails:
        say(f"     {email.message_id}, Idempotency-Key: {email.key} (the step's key),")
        say(f"     X-Idempotency-Fence: {email.fence} (the killed run had {killed_fence})")

    row.expect(replayed == ["row"], f"replayed steps {replayed}, expected exactly ['row']")
    row.expect(len(orders) == 1, f"{len(orders)} rows for {order_id}, expected exactly 1")
    row.expect(row.emails == 1, f"{row.emails} emails in the mailbox, expected exactly 1")
    row.expect(
        row.executions == 2,
        f"the body started {row.executions} times, expected 2 (killed, then redelivered)",
    )
    row.expect(row.from_store == 0, f"{row.from_store} answers from the store, expected none")
    if len(orders) == 1 and len(emails) == 1:
        order, email = orders[0], emails[0]
        row.expect(bool(before) and order.row_id == before[0].row_id, "the row id changed")
        row.expect(order.notified_at is not None, "the row is not marked notified")
        row.expect(
            order.message_id == email.message_id,
            f"the row's Message-ID {order.message_id} is not the email's {email.message_id}",
        )
        row.expect(email.key == f"{key}/email", f"the email's Idempotency-Key is {email.key!r}")
        row.expect(
            int(email.fence) > killed_fence, "the email's fence is not above the killed run's"
        )
        answer = row.answers[0] if row.answers else {}
        row.expect(
            answer.get("result") == email.message_id,
            f"the answer is {answer!r}, not the email's Message-ID",
        )
    return row
