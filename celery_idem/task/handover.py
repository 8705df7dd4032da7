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
from collections.abc import Iterator, Mapping
from typing import Any

from celery import signals as celery_signals

from celery_idem import codec
from celery_idem.checks import MAX_DURATION
from celery_idem.exceptions import IdempotencyError
from celery_idem.keys import storage_key
from celery_idem.renewer import renewer
from celery_idem.store import CompleteRequest
from celery_idem.task.execution import Execution
from celery_idem.task.headers import HANDOVER, message_headers
from celery_idem.task.spec import IdemTask

__all__ = ["hand_over", "pending_handover", "settle_handover"]

logger = logging.getLogger("celery_idem")


def hand_over(execution: Execution, sig: Any) -> None:
    """Give the key to the signature replacing this run (``self.replace(sig)``).

    Celery sends ``sig`` under this task id and ends this run with ``Ignore``. The
    key stays held, for up to ``idem_ttl``, with this run's token, and the task that
    finishes ``sig`` (the one with this task id) carries it in a header: its success
    completes the key with its result, its failure releases it (below).
    Until then duplicates wait, as for any run in progress.
    """
    leaves = [leaf for leaf in _signatures(sig) if leaf.options.get("task_id") == execution.task_id]
    if not leaves or execution.lost:
        return  # nothing will finish in our name: Ignore releases the key as before
    if execution.lease is not None:
        renewer.remove(execution.lease)
    hold = min(execution.settings.ttl + execution.settings.lease, MAX_DURATION)
    try:
        owned = execution.spec.store.renew(execution.storage, token=execution.token, lease=hold)
    except IdempotencyError as exc:
        execution.store_failed(exc, "hand over")
        return
    if not owned:
        execution.report_lost("hand over")
        return
    handover = {
        "task": execution.task.name,
        "key": execution.key,
        "token": execution.token,
        "fence": execution.fence,
    }
    for leaf in leaves:
        leaf.options["headers"] = {**(leaf.options.get("headers") or {}), HANDOVER: handover}
    execution.handed_over = True
    execution.log.info("replaced; the key waits for the replacement's outcome")


def settle_handover(
    task: IdemTask,
    handover: Mapping[str, Any],
    task_id: str,
    *,
    result: Any = None,
    failed: bool = False,
) -> None:
    """Complete (or, ``failed``, release) a key that ``task`` handed over on replace.

    Called in the worker that ran the task finishing the replacement (``task_id``,
    the replaced task's id), with the hand-over from its header.
    """
    spec = task.idem_spec()
    settings = spec.settings
    key, token = str(handover.get("key")), str(handover.get("token"))
    storage = storage_key(settings.key_prefix, spec.scope, key)
    try:
        if failed:
            spec.store.release(storage, token=token)
            return
        try:
            stored = codec.encode_result(result, spec.serializer, settings.max_result_bytes)
        except codec.ENCODE_ERRORS as exc:
            stored = codec.encode_no_result(f"{type(exc).__name__}: {exc}")
        fence = int(handover.get("fence") or 0)
        owned = spec.store.complete(
            CompleteRequest(
                storage, token=token, fence=fence, task_id=task_id, stored=stored, ttl=settings.ttl
            )
        )
    except IdempotencyError as exc:
        logger.error(
            "%s[%s] key=%r: could not settle the key after its replacement: %s",
            task.name, task_id, key, exc,
        )  # fmt: skip
        return
    if not owned:
        logger.warning(
            "%s[%s] key=%r: the replacement finished after the key was taken over or "
            "forgotten; its result is not stored", task.name, task_id, key,
        )  # fmt: skip


def _signatures(sig: Any) -> Iterator[Any]:
    """``sig`` and every signature nested in it (chain steps, group members, chord body)."""
    yield sig
    for attr in ("tasks", "body"):
        nested = getattr(sig, attr, None)
        if nested is None or isinstance(nested, str):
            continue
        for inner in [nested] if hasattr(nested, "options") else list(nested):
            if hasattr(inner, "options"):
                yield from _signatures(inner)


def pending_handover(task: Any) -> tuple[IdemTask, Mapping[str, Any]] | None:
    """The replaced task and its hand-over, if ``task`` finishes a replacement."""
    request = getattr(task, "request", None)
    if request is None:
        return None
    handover = message_headers(request).get(HANDOVER)
    if not isinstance(handover, Mapping):
        return None
    replaced = task.app.tasks.get(handover.get("task"))
    if not callable(getattr(replaced, "idem_spec", None)):  # not an IdempotentTask
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
        settle_handover(replaced, handover, sender.request.id, result=result)


def _replacement_failed(sender: Any = None, **_: Any) -> None:
    found = pending_handover(sender)
    if found is not None:
        replaced, handover = found
        settle_handover(replaced, handover, sender.request.id, failed=True)


celery_signals.task_success.connect(_replacement_succeeded, weak=False)
celery_signals.task_failure.connect(_replacement_failed, weak=False)
