"""The two ends the demo watches: the provider's HTTP side and what really happened.

:class:`Webhook` posts events and polls answers like the payment provider does;
:class:`Observer` reads the mailbox, the shop's database and the tasks' own counters,
so the demo's verdict never rests on what celery-idem says about itself.
"""

from __future__ import annotations

import contextlib
import json
import mailbox
import sqlite3
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from devtools.processes import wait_for
from example_project.stack import DemoError

ANSWER_TIMEOUT = 45.0  # how long any delivery may take to get its final answer


class Webhook:
    """The provider's side: POST events, GET answers, over real HTTP."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def deliver(self, event: dict[str, Any], *, header: bool = True) -> str:
        """POST one delivery; returns the task id from the 202 answer."""
        headers = {"Content-Type": "application/json"}
        if header:
            headers["Idempotency-Key"] = event["id"]
        request = urllib.request.Request(
            f"{self.base}/webhooks/payments",
            data=json.dumps(event).encode(),
            headers=headers,
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            if response.status != 202:
                raise DemoError(f"webhook answered {response.status} to event {event['id']}")
            return str(json.load(response)["task_id"])

    def task(self, task_id: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.base}/tasks/{task_id}", timeout=10) as response:
            return dict(json.load(response))

    def answer(self, task_id: str, timeout: float = ANSWER_TIMEOUT) -> dict[str, Any]:
        """GET /tasks/<id> until the task has finished (SUCCESS or FAILURE)."""

        def finished() -> dict[str, Any] | None:
            answer = self.task(task_id)
            return answer if answer["state"] in {"SUCCESS", "FAILURE"} else None

        return wait_for(finished, timeout, 0.05, f"the answer of task {task_id}")


@dataclass
class Email:
    to: str
    message_id: str
    key: str
    fence: str


@dataclass
class Order:
    """A row of the shop's ``orders`` table, as the task left it."""

    row_id: int
    message_id: str | None
    notified_at: str | None


class Observer:
    """Reads what really happened: the mailbox, the orders table, the tasks' counters.

    Emails are found by recipient (every event has its own customer), orders by the
    provider's order id, and executions are counted per customer or order id, so none
    of them depends on the key celery-idem computed.
    """

    def __init__(self, maildir: Path, orders_db: Path, report_url: str) -> None:
        self.maildir, self.orders_db = maildir, orders_db
        self.report = redis.Redis.from_url(report_url, socket_timeout=5)

    def emails(self, to: str) -> list[Email]:
        return [
            Email(
                to=str(message["To"]),
                message_id=str(message["Message-ID"]),
                key=str(message["Idempotency-Key"]),
                fence=str(message["X-Idempotency-Fence"]),
            )
            for message in mailbox.Maildir(self.maildir, create=False)
            if f"<{to}>" in str(message["To"])
        ]

    def orders(self, order_ref: str) -> list[Order]:
        """Every row the tasks inserted for this order (none before the first order)."""
        if not self.orders_db.exists():
            return []
        # Read-only, so that looking never creates the file or takes a write lock.
        uri = f"{self.orders_db.as_uri()}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
            rows = db.execute(
                "SELECT id, message_id, notified_at FROM orders WHERE order_ref = ? ORDER BY id",
                (order_ref,),
            ).fetchall()
        return [Order(int(i), m, n) for i, m, n in rows]

    def executions(self, name: str) -> int:
        """How many times the task body started for this customer (or order) id."""
        return int(self.report.get(f"demo:executions:{name}") or 0)

    def step_replays(self, key: str) -> list[str]:
        """The names of the durable steps of ``key`` answered from its record, in order."""
        names = self.report.lrange(f"demo:step-replays:{key}", 0, -1)
        return [name.decode() if isinstance(name, bytes) else name for name in names]

    def replays(self, key: str) -> int:
        """How many deliveries (task ids) of this key were answered from the store."""
        return int(self.report.scard(f"demo:replays:{key}"))

    def pausing(self, key: str) -> dict[str, Any] | None:
        """``{"pid", "fence"}`` once the run of ``key`` pauses before sending (demo only)."""
        raw: bytes | str | None = self.report.get(f"demo:pausing:{key}")
        return dict(json.loads(raw)) if raw else None

    def close(self) -> None:
        self.report.close()
