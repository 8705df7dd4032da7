"""Scenarios F and G of the demo: the Django flavour, its worker killed around a commit.

``example_project.django_flavour`` is the same shop as a Django project: the webhook is
a Django view, and ``shop.tasks.welcome_customer`` creates the ``Customer`` through the
ORM in a step whose transaction also stores the step (``self.step(..., atomic=True)``),
sends the welcome email in a second step, then marks the row welcomed and completes
the key in one more transaction (``self.idem_atomic()``). celery-idem's records live
in the same PostgreSQL database (``CELERY_IDEM_STORE_URL``).

:func:`django_flavour` starts a throwaway PostgreSQL (``devtools.pg_server``: the
system's binaries, else the ``pgserver`` wheel's; skipped, saying so, when there is
neither), creates the tables with ``python -m django migrate``, starts the Django
worker and the Django webhook (the demo's Redis and SMTP server), then:

F. SIGKILLs the worker right after the customer's INSERT, before its transaction
   commits: nothing was committed, and the redelivered message inserts once;
G. SIGKILLs the worker right after that commit, before the email: the redelivered
   message gets the row's id back from the step and sends the one email.

Each time, one row and one email, read from PostgreSQL and the Maildir. Its own module
only to keep ``demo.py`` short; ``demo.main`` runs it after scenario E.
"""

from __future__ import annotations

import contextlib
import importlib.util
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from devtools.processes import Process, free_port, port_is_open, wait_for
from example_project.observe import Webhook
from example_project.stack import (
    LEASE,
    PAUSE_SECONDS,
    ROOT,
    START_TIMEOUT,
    VISIBILITY_TIMEOUT,
    DemoError,
    Stack,
    Worker,
    say,
)

if TYPE_CHECKING:
    from example_project.demo import Demo, Row

SETTINGS = "example_project.django_flavour.settings"
APP = "example_project.django_flavour"
POINTS = {"F": "inserted", "G": "committed"}
"""Where each scenario's first run is held, then killed (``shop/demo_hooks.hold``)."""


def unavailable() -> str | None:
    """Why the Django scenarios cannot run here (no Django, psycopg or PostgreSQL), or None."""
    for module in ("django", "psycopg"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -r example_project/requirements.txt)"
    from devtools.pg_server import PostgresServerError, find_pg_bin  # noqa: PLC0415

    try:
        find_pg_bin()
    except PostgresServerError as exc:
        return str(exc)
    return None


@dataclass
class Customer:
    """A row of the ``shop_customer`` table, read from outside the task."""

    pk: int
    message_id: str | None
    welcomed_at: str | None


@dataclass
class DjangoStack:
    webhook: Webhook
    worker: Worker
    database_url: str

    def customers(self, provider_id: str) -> list[Customer]:
        """The committed rows for ``provider_id`` (what another connection sees)."""
        import psycopg  # noqa: PLC0415

        query = (
            "SELECT id, welcome_message_id, welcomed_at FROM shop_customer"
            " WHERE provider_id = %s ORDER BY id"
        )
        try:
            with psycopg.connect(self.database_url, autocommit=True) as conn:
                found = conn.execute(query, (provider_id,)).fetchall()
        except psycopg.Error as exc:
            raise DemoError(f"reading the customers: {exc}") from exc
        return [Customer(int(pk), m, w and w.isoformat(timespec="seconds")) for pk, m, w in found]


def migrate(env: dict[str, str]) -> list[str]:
    """``python -m django migrate``; the migrations it applied."""
    cmd = [sys.executable, "-m", "django", "migrate", "--noinput"]
    done = subprocess.run(
        cmd, check=False, env=env, cwd=ROOT, capture_output=True, text=True, timeout=START_TIMEOUT
    )
    if done.returncode != 0:
        raise DemoError(f"django migrate failed:\n{done.stdout}{done.stderr}")
    lines = done.stdout.splitlines()
    return [line.split()[1].rstrip(".") for line in lines if line.strip().startswith("Applying")]


@contextlib.contextmanager
def running(stack: Stack, holds: Sequence[str]) -> Iterator[DjangoStack]:
    """PostgreSQL, migrated; the Django worker (holding at ``holds``) and the webhook."""
    from devtools.pg_server import PostgresServer, PostgresServerError  # noqa: PLC0415

    with contextlib.ExitStack() as on_exit:
        try:
            server = on_exit.enter_context(PostgresServer())
            url = server.create_database("acme")
        except PostgresServerError as exc:
            raise DemoError(str(exc)) from exc
        say(f"PostgreSQL: throwaway {server.bin_dir}/postgres on {url} (pid {server.pid})")
        env = {**stack.env, "DATABASE_URL": url, "DJANGO_SETTINGS_MODULE": SETTINGS}
        applied = migrate(env)
        say(f"Django:  python -m django migrate: {', '.join(applied)}")
        holding = {**env, "DEMO_HOLD": ",".join(holds), "DEMO_PAUSE_SECONDS": str(PAUSE_SECONDS)}
        worker = Worker(stack.workdir / "django-worker.log", holding, app=APP, node="django")
        on_exit.callback(worker.stop)
        worker.start()
        say(f"Worker:  celery -A {APP} worker (pid {worker.pid}), queue shop")
        port = free_port()
        cmd = [sys.executable, "-m", f"{APP}.serve", "--port", str(port)]
        webhook = Process("the Django webhook", cmd, stack.workdir / "django-web.log", env, ROOT)
        on_exit.callback(webhook.stop)
        webhook.start().wait_ready(lambda: port_is_open(port), START_TIMEOUT)
        say(f"Webhook: python -m {APP}.serve (Django, wsgiref) on http://127.0.0.1:{port}")
        try:
            yield DjangoStack(Webhook(port), worker, url)
        except Exception:
            print(f"\n  last lines of {worker.name}'s log:\n{worker.tail()}", flush=True)
            print(f"\n  last lines of {webhook.name}'s log:\n{webhook.tail(skip='GET /tasks/')}")
            raise
        finally:
            say("Stopping the Django webhook, its worker and PostgreSQL.")


def django_flavour(demo: Demo, stack: Stack, rows: Sequence[Row]) -> str | None:
    """Run F and G (appending their rows to ``demo.rows``); the reason they were skipped."""
    reason = unavailable()
    say()
    if reason is not None:
        say(f"F, G (the Django flavour on PostgreSQL): SKIPPED, {reason}")
        return reason
    say("The Django flavour: the same webhook as a Django view, the customer in PostgreSQL")
    say("through the ORM, celery-idem's records in the same database.")
    holds = [f"{demo.events.id(row.label)}@{POINTS[row.label]}" for row in rows]
    with running(stack, holds) as django:
        for row in rows:
            killed_at(demo, django, row)
            demo.rows.append(row)
    return None


def killed_at(demo: Demo, django: DjangoStack, row: Row) -> None:
    """Deliver one event, SIGKILL the worker at the row's hold point, restart; fill ``row``."""
    label, point = row.label, POINTS[row.label]
    event = demo.customer(label, {"F": "Edsger", "G": "Barbara"}[label])
    key, customer = event["id"], event["data"]["object"]
    provider_id, to = customer["id"], customer["email"]
    observer, worker = demo.observer, django.worker
    say()
    say(f"{label}. Event {key} (customer.created for {customer['name']}) to the Django webhook.")
    if point == "inserted":
        say("   The task creates the customer through the ORM in a step whose transaction also")
        say("   records the step. The worker will be killed right after the INSERT, before")
        say("   that transaction commits.")
    else:
        say("   The worker will be killed right after the row's transaction commits, before")
        say("   the email step.")
    task_id = django.webhook.deliver(event)
    row.deliveries = 1
    say(f"   delivery 1: 202 Accepted, task {task_id}")
    holding = wait_for(lambda: observer.pausing(key), START_TIMEOUT, 0.05, f"the {point} hold")
    killed_fence = int(holding["fence"])
    before, emails_before = django.customers(provider_id), len(observer.emails(to))
    seen = "".join(f": row {c.pk}, welcomed at {c.welcomed_at}" for c in before)
    held = f"   Worker process {holding['pid']} (fence {killed_fence}) holds after the"
    if point == "inserted":
        say(f"{held} INSERT, its transaction")
        say(f"   open: another connection sees {len(before)} customer row(s){seen};")
    else:
        say(f"{held} COMMIT: the row and")
        say(f"   its step are committed ({len(before)} customer row(s){seen});")
    say(f"   no email sent yet (mailbox: {emails_before} email(s)).")
    committed = 0 if point == "inserted" else 1
    row.expect(len(before) == committed, f"at the kill {before}, expected {committed} row(s)")
    row.expect(emails_before == 0, f"{emails_before} emails before the kill, expected none")
    worker.kill()
    say(f"   SIGKILL to the whole worker (process group {worker.pid}).")
    worker.unpause(key, "DEMO_HOLD")
    worker.start()
    say(f"   Worker restarted (pid {worker.pid}); the message comes back after its")
    say(f"   visibility timeout ({VISIBILITY_TIMEOUT} s) and takes the key over after the")
    say(f"   lease ({LEASE} s) ...")
    demo.finish(row, [task_id], django.webhook)
    for line in worker.log_lines(key, "took over"):
        say(f"     worker log: {line}")
    report(demo, django, row, killed_fence, customer)


def report(
    demo: Demo, django: DjangoStack, row: Row, killed_fence: int, customer: dict[str, str]
) -> None:
    """What really happened after the restart: print it, and check one row, one email."""
    key, observer = demo.events.id(row.label), demo.observer
    provider_id, to = customer["id"], customer["email"]
    replayed = observer.step_replays(key)
    customers = django.customers(provider_id)
    emails = observer.emails(to)
    row.executions = observer.executions(provider_id)
    row.emails = len(emails)
    row.from_store = observer.replays(key)
    expected = [] if row.label == "F" else ["row"]
    if replayed:
        say(f"   Replayed from the record (step_replayed), not run again: {', '.join(replayed)}")
    else:
        say("   No step replayed: the killed run's row step had not committed, so it ran again.")
    say(f"   Customers: {len(customers)} row(s) for {provider_id} in PostgreSQL:")
    for found in customers:
        say(f"     row {found.pk}, welcomed at {found.welcomed_at}, {found.message_id}")
    if customers and customers[0].welcomed_at is not None:
        say("     (the welcomed mark and the key's completion: one idem_atomic() commit)")
    say(f"   Mailbox: {len(emails)} email(s) for {to}:")
    for email in emails:
        say(f"     {email.message_id}, Idempotency-Key: {email.key}, fence {email.fence}")
    row.expect(replayed == expected, f"replayed steps {replayed}, expected {expected}")
    row.expect(len(customers) == 1, f"{len(customers)} rows for {provider_id}, expected 1")
    row.expect(row.emails == 1, f"{row.emails} emails in the mailbox, expected exactly 1")
    row.expect(row.executions == 2, f"the body started {row.executions} times, expected 2")
    row.expect(row.from_store == 0, f"{row.from_store} answers from the store, expected none")
    if len(customers) == 1 and len(emails) == 1:
        email, answer = emails[0], row.answers[0] if row.answers else {}
        row.expect(answer.get("result") == email.message_id, f"the answer is {answer!r}")
        row.expect(customers[0].message_id == email.message_id, "the row's Message-ID differs")
        row.expect(email.key == f"{key}/email", f"the email's Idempotency-Key is {email.key!r}")
        row.expect(int(email.fence) > killed_fence, "the email's fence is not above the killed's")
