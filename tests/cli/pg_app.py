"""A small Celery app on the PostgreSQL store, for ``test_cli_postgres.py``.

``IDEM_CLI_PG_STORE`` is its ``idem_store_url`` (a subprocess run of ``celery -A
tests.cli.pg_app idem ...`` reads it); the in-process tests set ``app.conf`` instead.
Tasks run eagerly, so the test process writes real records by calling them.
"""

from __future__ import annotations

import os

from celery import Celery

from celery_idem import IdempotentTask

app = Celery(
    "tests.cli.pg_app",
    broker="memory://",
    backend="cache+memory://",
    set_as_current=False,
)
app.conf.update(
    task_always_eager=True,
    idem_store_url=os.environ.get("IDEM_CLI_PG_STORE", "memory://cli-pg"),
    accept_content=["json"],
    result_serializer="json",
)


@app.task(base=IdempotentTask, name="pg.add")
def add(x: int, y: int) -> int:
    """Key derived from the arguments (or given with ``idempotency_key=``)."""
    return x + y


@app.task(base=IdempotentTask, name="pg.send", idempotency_key="{user}:{template}")
def send(user: int, template: str) -> str:
    """Key from a template over the arguments."""
    return f"sent {template} to {user}"


@app.task(base=IdempotentTask, bind=True, name="pg.checkout")
def checkout(self: IdempotentTask, order: int) -> str:
    """Two durable steps, so a completed record counts them (``steps_done``)."""
    row = self.step("reserve", lambda: {"order": order})
    charge = self.step("charge", lambda: f"ch_{row['order']}")
    return f"paid {charge}"
