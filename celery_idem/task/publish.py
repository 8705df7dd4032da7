"""The publishing side: the call site's checks, call options into headers, a look-up.

Run in whatever process calls ``apply_async``/``apply`` (a web request, a worker sending
a chain's next step), which may have no Redis of its own: only the look-up of
``idem_dedupe_on_publish`` talks to the store, and a failure there publishes anyway.
Everything else is checked here without a store, before anything is sent.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from celery_idem.config import CALL_OPTIONS, check_call_names, with_call_overrides
from celery_idem.exceptions import IdempotencyError, InvalidIdempotencyKey, MisplacedCallOption
from celery_idem.keys import KeyRule, KeySource, storage_key, validate_key
from celery_idem.store import ClaimState
from celery_idem.task.headers import DEFERRALS, GROUP_INDEX, HEADER, RETRY_KEY
from celery_idem.task.spec import IdemTask

__all__ = [
    "check_task_kwargs",
    "eager_group_position",
    "move_call_options",
    "prepare_call",
    "published",
    "require_key",
    "with_eager_group_position",
]

logger = logging.getLogger("celery_idem")


def prepare_call(task: IdemTask, kwargs: Any, options: dict[str, Any]) -> None:
    """Check a call and move its celery-idem options into headers, before anything is sent.

    ``apply_async`` and ``apply`` call it first. In order: option names that look like
    ours but are not (a misspelt key would be ignored), the task's key rule (checked on
    the first publish in this process, cached), our options passed as the task's own
    keyword arguments (``delay(x, idempotency_key=K)``), the key and ``idem_*`` options
    (into headers), then ``idem_require_key``.
    """
    check_call_names(options, task_name=task.name)
    check_task_kwargs(task, task.idem_key_rule(), kwargs)
    move_call_options(task, options)
    require_key(task, options)


def check_task_kwargs(task: IdemTask, rule: KeyRule, kwargs: Any) -> None:
    """Refuse ``idempotency_key`` / ``idem_*`` call options given as task keyword arguments.

    ``delay(*args, **kwargs)`` and ``.s(...)`` pass every keyword to the task itself, so
    ``delay(x, idempotency_key=K)`` used to fail with Celery's "unexpected keyword
    argument" and no word on where the key goes. A task that takes such a parameter
    (by name or through ``**kwargs``) gets it as an argument, as before.

    Raises:
        MisplacedCallOption: A ``TypeError`` too, as the same mistake always raised.
    """
    if not kwargs or not isinstance(kwargs, Mapping):
        return
    params = rule.signature.parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    for name in CALL_OPTIONS:
        if name not in kwargs:
            continue
        param = params.get(name)
        if param is not None and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            continue
        value = kwargs[name]
        raise MisplacedCallOption(
            f"task {task.name!r} takes no keyword argument {name!r}: delay(), .s() and "
            f"the kwargs of apply_async() pass keyword arguments to the task itself. Give "
            f"it as a call option instead: apply_async(args, kwargs, {name}=...) or "
            f".s(...).set({name}=...).delay(); nothing was sent",
            key=value if name == HEADER and isinstance(value, str) else None,
            task_name=task.name,
        )


def require_key(task: IdemTask, options: Mapping[str, Any]) -> None:
    """``idem_require_key``: refuse a call that carries no explicit key.

    After :func:`move_call_options`, an explicit key is in the headers: given as
    ``idempotency_key=``, ``.set(idempotency_key=)`` or ``headers={"idempotency_key":
    ...}``. A retry carries its execution's key (``RETRY_KEY``) and is let through.
    """
    if not task.idem_settings().require_key:
        return
    headers = options.get("headers")
    headers = headers if isinstance(headers, Mapping) else {}
    if headers.get(HEADER) is not None or headers.get(RETRY_KEY):
        return
    raise InvalidIdempotencyKey(
        f"task {task.name!r} requires an explicit idempotency key (idem_require_key) and "
        f"this call gives none (idempotency_key absent or None): pass "
        f"apply_async(..., idempotency_key=K) or .set(idempotency_key=K), with K the "
        f"request's own identity (a webhook's event id, an Idempotency-Key header); "
        f"nothing was sent",
        None,
        task.name,
    )


def move_call_options(task: IdemTask, options: dict[str, Any]) -> None:
    """Move ``idempotency_key`` and ``idem_*`` call options into message headers.

    Validates them here, so a bad key fails at the call site and nothing is sent; a key
    given as ``headers={"idempotency_key": K}`` is checked alike, and so is a per-call
    ``idem_fingerprint`` path that names no parameter of the task. Accepts ``headers``
    absent, None or empty (Celery's retries pass each).
    """
    key = options.pop(HEADER, None)
    overrides = {name: options.pop(name) for name in list(options) if name[:5] == "idem_"}
    given = options.get("headers")
    if key is None and isinstance(given, Mapping) and given.get(HEADER) is not None:
        validate_key(given[HEADER], task_name=task.name, source=KeySource.CALL)
    if key is None and not overrides:
        return
    if given is not None and not isinstance(given, Mapping):
        raise IdempotencyError(
            f"task {task.name!r}: headers={given!r} is not a mapping, so idempotency_key / "
            f"idem_* options cannot travel with it; pass a dict",
            key=key,
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
