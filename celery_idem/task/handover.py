"""The other end of ``self.replace()``: the replacement's outcome settles the key.

``IdempotentTask.on_replace`` keeps the replaced run's key held and puts a header
(``HANDOVER``) on the task that finishes the replacement: Celery gives that task the
replaced task's id, so its result is the one every caller of that id waits for. When
it succeeds, the key is completed with its result, so duplicates of the replaced call
get the replacement's value; when it fails, the key is released, as any failure does.

The finishing task may be any Celery task (a plain one, a chain's last step, a chord's
body), so this listens to Celery's own ``task_success`` and ``task_failure`` signals
rather than to a method of ``IdempotentTask``. A task without the header costs one
dictionary look-up.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from celery import signals as celery_signals

from celery_idem.task.base import IdempotentTask
from celery_idem.task.context import HANDOVER, message_headers

__all__ = ["pending_handover"]

logger = logging.getLogger("celery_idem")


def pending_handover(task: Any) -> tuple[IdempotentTask, Mapping[str, Any]] | None:
    """The replaced task and its hand-over, if ``task`` finishes a replacement."""
    request = getattr(task, "request", None)
    if request is None:
        return None
    handover = message_headers(request).get(HANDOVER)
    if not isinstance(handover, Mapping):
        return None
    replaced = task.app.tasks.get(handover.get("task"))
    if not isinstance(replaced, IdempotentTask):
        logger.warning(
            "task %s[%s] finishes a replacement of %r, which is not an IdempotentTask "
            "in this worker; its key is left to expire",
            task.name, request.id, handover.get("task"),
        )  # fmt: skip
        return None
    return replaced, handover


def _replacement_succeeded(sender: Any = None, result: Any = None, **_: Any) -> None:
    found = pending_handover(sender)
    if found is not None:
        replaced, handover = found
        replaced.idem_settle_handover(handover, sender.request.id, result=result)


def _replacement_failed(sender: Any = None, **_: Any) -> None:
    found = pending_handover(sender)
    if found is not None:
        replaced, handover = found
        replaced.idem_settle_handover(handover, sender.request.id, failed=True)


celery_signals.task_success.connect(_replacement_succeeded, weak=False)
celery_signals.task_failure.connect(_replacement_failed, weak=False)
