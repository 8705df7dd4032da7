"""The payment provider's webhook as Django views (the same API as ``example_project.webhook``).

    POST /webhooks/payments   a provider event; answers 202 {"task_id": ...}
    GET  /tasks/<task id>     {"task_id", "state"} plus "result" or "error" {type, message}

The provider's event id (the ``Idempotency-Key`` header, else the JSON body's ``id``) is
the idempotency key of the task a ``customer.created`` event enqueues; other event
types are acknowledged and ignored.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from celery.result import AsyncResult
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from example_project.django_flavour.celery import app
from example_project.django_flavour.shop.tasks import welcome_customer


@csrf_exempt  # a server-to-server call: the provider signs its requests instead
@require_POST
def payment_webhook(request: HttpRequest) -> JsonResponse:
    """Enqueue one task per delivery; the event id makes them one request to celery-idem."""
    try:
        event: dict[str, Any] = json.loads(request.body)
        event_id = request.headers.get("Idempotency-Key") or event["id"]
        if event.get("type") != "customer.created":
            return JsonResponse({"ignored": event.get("type")})
        customer = event["data"]["object"]
        kwargs = {
            "customer_id": str(customer["id"]),
            "email": str(customer["email"]),
            "name": str(customer.get("name") or ""),
        }
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return JsonResponse(
            {"error": f"not a provider event: {exc!r}"}, status=HTTPStatus.BAD_REQUEST
        )
    result = welcome_customer.apply_async(kwargs=kwargs, idempotency_key=str(event_id))
    return JsonResponse({"task_id": result.id}, status=HTTPStatus.ACCEPTED)


@require_GET
def task_answer(request: HttpRequest, task_id: str) -> JsonResponse:
    """The task's state, and its result or its error."""
    result = AsyncResult(task_id, app=app)
    answer: dict[str, Any] = {"task_id": task_id, "state": result.state}
    outcome = result.result
    if isinstance(outcome, BaseException):  # FAILURE, or the reason of a RETRY
        answer["error"] = {"type": type(outcome).__name__, "message": str(outcome)}
    elif result.state == "SUCCESS":
        answer["result"] = outcome
    return JsonResponse(answer)
