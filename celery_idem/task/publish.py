"""The publishing side: call options into headers, the optional look-up before sending.

Run in whatever process calls ``apply_async``/``apply`` (a web request, a worker sending
a chain's next step), which may have no Redis of its own: only the look-up of
``idem_dedupe_on_publish`` talks to the store, and a failure there publishes anyway.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from celery_idem.config import with_call_overrides
from celery_idem.exceptions import IdempotencyError
from celery_idem.keys import KeyRule, KeySource, storage_key, validate_key
from celery_idem.store import ClaimState
from celery_idem.task.headers import DEFERRALS, GROUP_INDEX, HEADER, RETRY_KEY
from celery_idem.task.spec import IdemTask

__all__ = ["eager_group_position", "move_call_options", "published", "with_eager_group_position"]

logger = logging.getLogger("celery_idem")


def move_call_options(task: IdemTask, options: dict[str, Any]) -> None:
    """Move ``idempotency_key`` and ``idem_*`` call options into message headers.

    Validates them here, so a bad key fails at the call site and nothing is sent;
    so does a per-call ``idem_fingerprint`` path that names no parameter of the task.
    Accepts ``headers`` absent, None or empty (Celery's retries pass each).
    """
    key = options.pop(HEADER, None)
    overrides = {name: options.pop(name) for name in list(options) if name[:5] == "idem_"}
    if key is None and not overrides:
        return
    given = options.get("headers")
    if given is not None and not isinstance(given, Mapping):
        raise IdempotencyError(
            f"task {task.name!r}: headers={given!r} is not a mapping, so idempotency_key / "
            f"idem_* options cannot travel with it; pass a dict",
            task_name=task.name,
        )
    headers = dict(given or {})
    if key is not None:
        headers[HEADER] = validate_key(key, task_name=task.name, source=KeySource.CALL)
    if overrides:
        base = task.idem_settings()
        settings = with_call_overrides(base, overrides, task_name=task.name)
        if settings.fingerprint is not base.fingerprint:
            # Its paths against the signature (the worker checks them again); a
            # KeyRule of its own, so a publisher needs no store for it.
            KeyRule(task.name, task.run, None).coverage_for(settings.fingerprint)
        headers.update(overrides)
    options["headers"] = headers


def published(
    task: IdemTask,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    task_id: str | None,
    options: Mapping[str, Any],
) -> Any:
    """One look-up before publishing: the AsyncResult of the run holding the key.

    None means "publish": nothing holds the key, the arguments differ (the worker
    reports the mismatch), the store is down (the worker-side claim still holds), the
    message is a re-send of our own (a retry or a deferral must go out), or the
    arguments cannot be bound here (``typing=False``: the worker decides).
    """
    headers = options.get("headers") or {}
    if RETRY_KEY in headers or DEFERRALS in headers or options.get("retries"):
        return None
    if options.get("group_id") or options.get("chord"):
        return None  # canvas members are keyed by their position, on the worker
    spec = task.idem_spec()
    # Validated by move_call_options already; the worker applies the same per-call values.
    settings = with_call_overrides(spec.settings, headers, task_name=task.name)
    try:
        resolved = spec.rule.resolve(
            args or (), kwargs or {}, headers.get(HEADER), settings.fingerprint
        )
    except TypeError:
        if task.typing:
            raise  # Celery itself would refuse these arguments at the call site
        return None
    storage = storage_key(settings.key_prefix, spec.scope, resolved.key)
    fingerprint = "" if resolved.source is KeySource.ARGS else resolved.fingerprint
    try:
        found = spec.store.peek(storage, fingerprint=fingerprint)
    except IdempotencyError as exc:
        logger.warning(
            "%s key=%r: could not look the key up before publishing, publishing: %s",
            task.name, resolved.key, exc,
        )  # fmt: skip
        return None
    if found is None or found.state is ClaimState.MISMATCH:
        return None
    if task_id is not None and task_id != found.task_id:
        # The caller waits on the id it chose (a frozen signature): only a message
        # under that id will ever write its result.
        return None
    logger.debug(
        "%s key=%r: held by task %s, not published", task.name, resolved.key, found.task_id
    )
    return task.AsyncResult(found.task_id)


def with_eager_group_position(options: dict[str, Any]) -> None:
    """Number an eagerly applied group's members (a worker gets ``group_index``)."""
    group_id = options.get("group_id")
    headers = options.get("headers")
    if (
        group_id
        and isinstance(headers, Mapping)
        and HEADER in headers
        and GROUP_INDEX not in headers
    ):
        options["headers"] = {**headers, GROUP_INDEX: eager_group_position(group_id)}


_eager_groups: threading.local = threading.local()


def eager_group_position(group_id: str) -> int:
    """The next member position of an eagerly applied group, per thread.

    Only the last few groups are remembered: an eager group's members are applied
    back to back, so a group id never comes back after a few others.
    """
    positions: OrderedDict[str, int] = getattr(_eager_groups, "positions", None) or OrderedDict()
    _eager_groups.positions = positions
    position = positions.pop(group_id, -1) + 1
    positions[group_id] = position
    while len(positions) > 16:
        positions.popitem(last=False)
    return position
