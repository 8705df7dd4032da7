"""A small Celery app for the CLI tests, configured from the environment.

``IDEM_CLI_STORE`` is its ``idem_redis_url`` (default ``memory://cli-tests``) and
``IDEM_CLI_ACCEPT`` its comma-separated ``accept_content`` (default ``json``). Tasks run
eagerly, so the test process fills the store by calling them; the CLI subprocesses load
this same module with ``-A tests.cli.app``. Each test has a Redis of its own, so the
key prefixes are the defaults. ``IDEM_CLI_BROKER`` (default ``memory://``) lets a real
worker of this app consume messages another process sends (``app.send_task``).
"""

from __future__ import annotations

import os

from celery import Celery

from celery_idem import IdempotentTask

app = Celery(
    "tests.cli.app",
    broker=os.environ.get("IDEM_CLI_BROKER", "memory://"),
    backend="cache+memory://",
    set_as_current=False,
)
app.conf.update(
    task_always_eager=True,
    idem_redis_url=os.environ.get("IDEM_CLI_STORE", "memory://cli-tests"),
    accept_content=os.environ.get("IDEM_CLI_ACCEPT", "json").split(","),
    result_serializer="json",
)

ARCHIVE_PREFIX = "idem-archive"


@app.task(base=IdempotentTask, name="cli.add")
def add(x: int, y: int) -> int:
    """Key derived from the arguments (or given with ``idempotency_key=``)."""
    return x + y


@app.task(base=IdempotentTask, name="cli.send", idempotency_key="{user}:{template}")
def send(user: int, template: str) -> str:
    """Key from a template over the arguments."""
    return f"sent {template} to {user}"


def welcome_key(user: int, **_: object) -> str:
    """The key rule of ``cli.welcome``: one welcome per user, whatever the rest."""
    return f"welcome:{user}"


@app.task(base=IdempotentTask, name="cli.welcome", idempotency_key=welcome_key)
def welcome(user: int, locale: str = "en") -> str:
    """Key from a callable over the arguments."""
    return f"welcome {user} ({locale})"


@app.task(
    base=IdempotentTask,
    name="cli.archive",
    idem_key_prefix=ARCHIVE_PREFIX,
)
def archive(name: str) -> str:
    """Records under another prefix: seen with ``--task cli.archive`` only."""
    return name


@app.task(base=IdempotentTask, name="cli.mail.send_email", idem_scope="cli.send_email")
def send_email(user: int) -> str:
    """Renamed from ``cli.send_email`` (no longer registered): keeps that name's records."""
    return f"mail to {user}"


@app.task(base=IdempotentTask, name="cli.refund", idem_require_key=True)
def refund(order: int) -> int:
    """Every call must name its own key (``idem_require_key``)."""
    return order


@app.task(base=IdempotentTask, bind=True, name="cli.checkout")
def checkout(self: IdempotentTask, order: int) -> str:
    """Two durable steps, so a completed record counts them (``steps_done``)."""
    row = self.step("reserve", lambda: {"order": order})
    charge = self.step("charge", lambda: f"ch_{row['order']}")
    return f"paid {charge}"


@app.task(name="cli.plain")
def plain() -> None:
    """Not idempotent: keeps no records."""
