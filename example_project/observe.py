"""The two ends the demo watches: the provider's HTTP side and what really happened.

:class:`Webhook` posts events and polls answers like the payment provider does;
:class:`Observer` reads the mailbox and the tasks' own counters, so the demo's verdict
never rests on what celery-idem says about itself.
"""

from __future__ import annotations

import json
import mailbox
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


class Observer:
    """Reads what really happened: the mailbox, and the tasks' counters in Redis.

    Emails are found by recipient (every event has its own customer) and executions
    are counted per customer id, so neither depends on the key celery-idem computed.
    """

    def __init__(self, maildir: Path, report_url: str) -> None:
        self.maildir = maildir
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

    def executions(self, customer_id: str) -> int:
        """How many times the task body started for this customer."""
        return int(self.report.get(f"demo:executions:{customer_id}") or 0)

    def replays(self, key: str) -> int:
        """How many deliveries (task ids) of this key were answered from the store."""
        return int(self.report.scard(f"demo:replays:{key}"))

    def pausing(self, key: str) -> dict[str, Any] | None:
        """``{"pid", "fence"}`` once the run of ``key`` pauses before sending (demo only)."""
        raw: bytes | str | None = self.report.get(f"demo:pausing:{key}")
        return dict(json.loads(raw)) if raw else None

    def close(self) -> None:
        self.report.close()
