"""A small, real webhook endpoint for the payment provider (standard library only).

    POST /webhooks/payments   a provider event; answers 202 {"task_id": ...}
    GET  /tasks/<task id>     {"task_id", "state"} plus "result" or "error" {type, message}

The provider's event id is the idempotency key: the ``Idempotency-Key`` header when the
provider sends one, else the JSON body's ``id``. Every delivery enqueues a task (the
endpoint stays fast and stateless): ``send_welcome_email`` for ``customer.created``,
``record_order`` for ``order.paid``; other event types are acknowledged and ignored.
celery-idem makes the deliveries of one event run the task once and share one answer.

Run it with ``python -m example_project.webhook [--host H] [--port P]`` (defaults from
``WEBHOOK_HOST`` / ``WEBHOOK_PORT``, else 127.0.0.1:8000), next to a worker
(``celery -A example_project worker -l info``) and the same ``REDIS_URL``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from celery import Task
from celery.result import AsyncResult

from example_project import app
from example_project.tasks import record_order, send_welcome_email

WEBHOOK_PATH = "/webhooks/payments"
TASKS_PATH = "/tasks/"
MAX_BODY = 64 * 1024


def task_call(event: dict[str, Any]) -> tuple[Task, dict[str, Any]] | None:
    """The task an event enqueues and its arguments; None for a type we ignore.

    Raises:
        KeyError, TypeError, ValueError, AttributeError: Not shaped like the event type.
    """
    kind = event.get("type")
    if kind == "customer.created":
        customer = event["data"]["object"]
        return send_welcome_email, {
            "customer_id": str(customer["id"]),
            "email": str(customer["email"]),
            "name": str(customer.get("name") or ""),
        }
    if kind == "order.paid":
        order = event["data"]["object"]
        return record_order, {
            "order_id": str(order["id"]),
            "email": str(order["email"]),
            "name": str(order.get("name") or ""),
            "amount_cents": int(order["amount"]),
        }
    return None


class WebhookHandler(BaseHTTPRequestHandler):
    """One request; ``ThreadingHTTPServer`` runs each in its own thread."""

    server_version = "celery-idem-example/1"

    def do_POST(self) -> None:
        if self.path != WEBHOOK_PATH:
            self._answer(HTTPStatus.NOT_FOUND, {"error": "not found"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY:
            self._answer(HTTPStatus.BAD_REQUEST, {"error": "a JSON body is required"})
            return
        try:
            event = json.loads(self.rfile.read(length))
            event_id = self.headers.get("Idempotency-Key") or event["id"]
            call = task_call(event)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self._answer(HTTPStatus.BAD_REQUEST, {"error": f"not a provider event: {exc!r}"})
            return
        if call is None:
            self._answer(HTTPStatus.OK, {"ignored": event.get("type")})
            return
        task, kwargs = call
        # The event id is the idempotency key: every delivery of this event is one
        # request as far as the task is concerned.
        result = task.apply_async(kwargs=kwargs, idempotency_key=str(event_id))
        self._answer(HTTPStatus.ACCEPTED, {"task_id": result.id})

    def do_GET(self) -> None:
        task_id = self.path[len(TASKS_PATH) :] if self.path.startswith(TASKS_PATH) else ""
        if not task_id or "/" in task_id:
            self._answer(HTTPStatus.NOT_FOUND, {"error": "not found"})
            return
        result = AsyncResult(task_id, app=app)
        answer: dict[str, Any] = {"task_id": task_id, "state": result.state}
        outcome = result.result
        if isinstance(outcome, BaseException):  # FAILURE, or the reason of a RETRY
            answer["error"] = {"type": type(outcome).__name__, "message": str(outcome)}
        elif result.state == "SUCCESS":
            answer["result"] = outcome
        self._answer(HTTPStatus.OK, answer)

    def _answer(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        print(f"webhook: {self.address_string()} {format % args}", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Serve until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("WEBHOOK_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("WEBHOOK_PORT", "8000")))
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer((args.host, args.port), WebhookHandler)
    print(f"webhook: listening on http://{args.host}:{args.port}{WEBHOOK_PATH}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
