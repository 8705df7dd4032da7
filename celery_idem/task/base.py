"""IdempotentTask itself: publishing, configuration and dispatch.

Publishing moves ``idempotency_key`` and ``idem_*`` call options into message headers
(validated at the call site) and, with ``idem_dedupe_on_publish``, may return the
AsyncResult of the run that already holds the key. ``__call__`` dispatches one
execution to the steps in ``execution``.

Celery calls a task's ``__call__`` from its tracer (worker and ``apply``/eager) with
the request already pushed and ``called_directly`` False; a plain function call
``task(x)`` has ``called_directly`` True and bypasses the protocol, as documented.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from celery import Task

from celery_idem import codec
from celery_idem.config import IdemSettings, resolve_settings, with_call_overrides
from celery_idem.exceptions import (
    DuplicateInProgress,
    IdempotencyError,
    IdempotencyKeyMismatch,
    KeyQuarantined,
    ResultNotStored,
    StoreUnavailable,
)
from celery_idem.keys import KeyRule, KeySource, storage_key, validate_key
from celery_idem.store import ClaimState, Store, store_for
from celery_idem.store.unreachable import UnreachableStore
from celery_idem.task import context
from celery_idem.task.context import (
    _DEFERRALS,
    _GROUP_INDEX,
    _RETRY_KEY,
    HEADER,
    _Spec,
)
from celery_idem.task.execution import _Execution

__all__ = ["IdempotentTask"]

logger = logging.getLogger("celery_idem")

_EXPECTED = (IdempotencyKeyMismatch, DuplicateInProgress, ResultNotStored, KeyQuarantined)
"""Exceptions a worker logs as expected (Celery's ``Task.throws``), at INFO."""


def _task_options(cls: type) -> dict[str, Any]:
    """The ``idem_*`` options set on a task class (by the decorator or a subclass)."""
    options: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if klass is IdempotentTask or not issubclass(klass, IdempotentTask):
            continue
        options.update({k: v for k, v in vars(klass).items() if k.startswith("idem_")})
    return options


class IdempotentTask(_Execution, Task):  # type: ignore[misc]  # celery ships no type hints
    """A Celery task base that runs each idempotency key's body once.

    Use as ``@app.task(base=IdempotentTask)``. The task option ``idempotency_key`` (a
    ``str.format`` template or a callable over the bound arguments) sets the task's key
    rule; inside the body ``self.idempotency_key`` is the effective key of the running
    execution and ``self.idempotency_fence`` its fence number.
    """

    abstract: ClassVar[bool] = True
    _idem_key_rule: ClassVar[str | Callable[..., Any] | None] = None
    _idem_spec_cache: _Spec | None = None
    _idem_settings_cache: tuple[int, IdemSettings] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Celery's decorator turns task options into class attributes, which would hide
        # the ``idempotency_key`` property; move the rule aside and keep the property.
        super().__init_subclass__(**kwargs)
        # Refusals are outcomes, not crashes: the worker logs them without a traceback.
        cls.throws = (*cls.__dict__.get("throws", ()), *_EXPECTED)
        if "idempotency_key" in cls.__dict__:
            rule = cls.__dict__["idempotency_key"]
            if not isinstance(rule, property):
                cls._idem_key_rule = rule  # None switches an inherited rule off
                delattr(cls, "idempotency_key")

    @property
    def idempotency_key(self) -> str | None:
        """The effective key of the running execution (None outside one)."""
        return getattr(self.request, "idem_key", None)

    @property
    def idempotency_fence(self) -> int | None:
        """The fence of the running execution: it only grows for one key."""
        return getattr(self.request, "idem_fence", None)

    # -- publishing ---------------------------------------------------------------

    def _idem_headers(self, options: dict[str, Any]) -> None:
        """Move ``idempotency_key`` and ``idem_*`` call options into message headers.

        Validates them here, so a bad key fails at the call site and nothing is sent.
        Accepts ``headers`` absent, None or empty (Celery's retries pass each).
        """
        key = options.pop(HEADER, None)
        overrides = {name: options.pop(name) for name in list(options) if name[:5] == "idem_"}
        if key is None and not overrides:
            return
        given = options.get("headers")
        if given is not None and not isinstance(given, Mapping):
            raise IdempotencyError(
                f"task {self.name!r}: headers={given!r} is not a mapping, so "
                f"idempotency_key / idem_* options cannot travel with it; pass a dict",
                task_name=self.name,
            )
        headers = dict(given or {})
        if key is not None:
            headers[HEADER] = validate_key(key, task_name=self.name, source=KeySource.CALL)
        if overrides:
            with_call_overrides(self._idem_settings(), overrides, task_name=self.name)
            headers.update(overrides)
        options["headers"] = headers

    def apply_async(  # noqa: PLR0917 - mirrors celery.Task.apply_async
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> Any:
        """Send the task; ``idempotency_key=...`` and ``idem_*=...`` travel as headers.

        With ``idem_dedupe_on_publish``, a key that is completed or in progress is not
        sent again: the caller gets the AsyncResult of the task that holds it.
        """
        self._idem_headers(options)
        if (
            self._idem_settings().dedupe_on_publish
            and not self.app.conf.task_always_eager
            and not (link or link_error or options.get("chain"))
        ):
            # A message with callbacks or a chain is sent: its worker replays the stored
            # value into them, exactly as for any duplicate (they are the caller's own).
            existing = self._idem_published(args, kwargs, task_id, options)
            if existing is not None:
                return existing
        return super().apply_async(
            args, kwargs, task_id, producer, link, link_error, shadow, **options
        )

    def _idem_published(
        self,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        task_id: str | None,
        options: Any,
    ) -> Any:
        """One look-up before publishing: the AsyncResult of the run holding the key.

        None means "publish": nothing holds the key, the arguments differ (the worker
        reports the mismatch), the store is down (the worker-side claim still holds),
        the message is a re-send of our own (a retry or a deferral must go out), or
        the arguments cannot be bound here (``typing=False``: the worker decides).
        """
        headers = options.get("headers") or {}
        if _RETRY_KEY in headers or _DEFERRALS in headers or options.get("retries"):
            return None
        if options.get("group_id") or options.get("chord"):
            return None  # canvas members are keyed by their position, on the worker
        spec = self._idem_spec()
        try:
            resolved = spec.rule.resolve(args or (), kwargs or {}, headers.get(HEADER))
        except TypeError:
            if self.typing:
                raise  # Celery itself would refuse these arguments at the call site
            return None
        storage = storage_key(spec.settings.key_prefix, self.name, resolved.key)
        fingerprint = "" if resolved.source is KeySource.ARGS else resolved.fingerprint
        try:
            found = spec.store.peek(storage, fingerprint=fingerprint)
        except IdempotencyError as exc:
            logger.warning(
                "%s key=%r: could not look the key up before publishing, publishing: %s",
                self.name, resolved.key, exc,
            )  # fmt: skip
            return None
        if found is None or found.state is ClaimState.MISMATCH:
            return None
        if task_id is not None and task_id != found.task_id:
            # The caller waits on the id it chose (a frozen signature): only a message
            # under that id will ever write its result.
            return None
        logger.debug(
            "%s key=%r: held by task %s, not published", self.name, resolved.key, found.task_id
        )
        return self.AsyncResult(found.task_id)

    def apply(self, args: Sequence[Any] | None = None, kwargs: Any = None, **options: Any) -> Any:
        """Run eagerly, under the same protocol; ``idempotency_key=...`` is honoured."""
        self._idem_headers(options)
        group_id = options.get("group_id")
        headers = options.get("headers")
        if (
            group_id
            and isinstance(headers, Mapping)
            and HEADER in headers
            and _GROUP_INDEX not in headers
        ):
            # An eager group applies its members one after another without telling
            # them their position (a worker gets ``group_index``); count them here.
            options["headers"] = {**headers, _GROUP_INDEX: _eager_group_position(group_id)}
        return super().apply(args, kwargs, **options)

    def retry(self, *args: Any, **options: Any) -> Any:
        """Celery's ``retry``, keeping this execution's key for the retried message.

        A retry may change its arguments (``self.retry(args=(page + 1,))``); its key
        must not change with them, or the parked record would be abandoned and a
        duplicate of the original request would run again.
        """
        request = self.request
        key = getattr(request, "idem_key", None)
        if key is not None:
            base = options.get("headers") or request.as_execution_options().get("headers")
            base = base if isinstance(base, Mapping) else {}
            options["headers"] = {**base, _RETRY_KEY: key}
        sent = super().retry(*args, **options)
        if key is not None and not request.is_eager:
            # ``throw=False``: the retry is on its way although the body goes on and
            # returns normally; the key must still be parked for it, not completed.
            request.idem_retry_sent = sent
        return sent

    # -- configuration ------------------------------------------------------------

    def _idem_settings(self) -> IdemSettings:
        """The task's settings (app and task layers), cached; needs no store.

        A process that only publishes (no Redis of its own) can still validate call
        options against them.
        """
        cached = self._idem_settings_cache
        if cached is not None and cached[0] == context._generation:
            return cached[1]
        settings = resolve_settings(self.app.conf, _task_options(type(self)), task_name=self.name)
        self._idem_settings_cache = (context._generation, settings)
        return settings

    def _idem_spec(self) -> _Spec:
        spec = self._idem_spec_cache
        if spec is not None and spec.pid == os.getpid() and spec.generation == context._generation:
            return spec
        conf = self.app.conf
        settings = self._idem_settings()
        accept = conf.result_accept_content or conf.accept_content
        visibility = (conf.broker_transport_options or {}).get("visibility_timeout")
        store: Store
        try:
            store = store_for(settings.endpoint, task_name=self.name)
        except StoreUnavailable as exc:
            # No client at all (a Cluster with no node answering): each operation is an
            # outage under idem_on_store_error, and the next message tries again.
            store = UnreachableStore(exc)
        spec = _Spec(
            max_defer=float(visibility) / 2 if visibility else float("inf"),
            settings=settings,
            rule=KeyRule(self.name, self.run, type(self)._idem_key_rule),
            store=store,
            serializer=conf.result_serializer,
            accept=codec.accepted_content_types(accept),
            pid=os.getpid(),
            generation=context._generation,
        )
        if not isinstance(store, UnreachableStore):
            self._idem_spec_cache = spec
        return spec

    # -- executing ----------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the body at most once per key; replay the stored outcome otherwise."""
        request = self.request
        if request.called_directly or getattr(request, "idem_active", False):
            return super().__call__(*args, **kwargs)
        request.idem_active = True
        run = request.idem_run = self._idem_identify(request, args, kwargs)
        outcome = self._idem_claim(run)
        if outcome is None:  # the store failed and the policy is to run anyway
            return self.run(*args, **kwargs)
        if outcome.state is ClaimState.CLAIMED:
            return self._idem_execute(run, outcome)
        if outcome.state is ClaimState.COMPLETED:
            return self._idem_replay(run, outcome)
        if outcome.state is ClaimState.MISMATCH:
            self._idem_mismatch(run, outcome)
        if outcome.state is ClaimState.QUARANTINED:
            self._idem_quarantined(run, outcome)
        return self._idem_in_progress(run, outcome)

    def on_replace(self, sig: Any) -> Any:
        """Hand the key to the replacement before Celery sends it (see ``_idem_hand_over``)."""
        request = self.request
        run = getattr(request, "idem_run", None)
        if run is not None and not request.is_eager:
            self._idem_hand_over(run, sig)
        return super().on_replace(sig)

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        """Celery has sent this run's callbacks and chain: mark the record so.

        Subclasses that override ``on_success`` must call ``super().on_success(...)``;
        without it, a worker killed later would have them sent a second time by the
        redelivery (never lost, but twice).
        """
        run = getattr(self.request, "idem_owed", None)
        if run is not None:
            self.request.idem_owed = None
            self._idem_dispatched(run)
        super().on_success(retval, task_id, args, kwargs)


_eager_groups: threading.local = threading.local()


def _eager_group_position(group_id: str) -> int:
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
