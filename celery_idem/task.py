"""IdempotentTask: the only code that knows Celery's task machinery.

One execution goes: find the key (``keys``), ask the store in one round trip
(``store.claim``), then run the body under a renewed lease and store its outcome (one
more round trip), or replay the stored outcome, or wait, or refuse. Settings come
from ``config`` (resolved once per task and process), Redis only from ``store``.

Celery calls a task's ``__call__`` from its tracer (worker and ``apply``/eager) with
the request already pushed and ``called_directly`` False; a plain function call
``task(x)`` has ``called_directly`` True and bypasses the protocol, as documented.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, ClassVar, NoReturn

from celery import Task
from celery.exceptions import Reject, Retry
from celery.signals import worker_init

from celery_idem import codec, signals
from celery_idem.config import (
    CALL_SETTINGS,
    IdemSettings,
    InProgressPolicy,
    StoreErrorPolicy,
    resolve_settings,
    with_call_overrides,
)
from celery_idem.exceptions import (
    DuplicateInProgress,
    IdempotencyConfigError,
    IdempotencyError,
    IdempotencyKeyMismatch,
    ResultNotStored,
    StoreUnavailable,
)
from celery_idem.keys import KeyRule, KeySource, storage_key, validate_key
from celery_idem.renewer import Lease, renewer
from celery_idem.store import ClaimOutcome, ClaimState, RecordKind, Store, Stored, store_for_url

__all__ = ["IdempotentTask", "invalidate_settings"]

logger = logging.getLogger("celery_idem")

HEADER = "idempotency_key"
"""The message header (and call-site option) that carries an explicit key."""
_DEFERRALS = "idem-deferrals"
"""Header counting store-error deferrals of one message, for the backoff."""
_FIRST_DEFERRAL = 0.5
"""Seconds before a duplicate of a running key first looks again (doubling each time)."""
_RETRY_KEY = "idem-retry-key"
"""Header carrying the effective key into a retried message (its arguments may differ)."""
_GROUP_INDEX = "idem-group-index"
"""Header with an eager group member's position (workers get ``request.group_index``)."""
_COMPLETE_RETRIES = (0.05, 0.25, 1.0)
"""Pauses between attempts at storing a finished run's outcome when Redis fails."""

_generation = 0


def invalidate_settings() -> None:
    """Forget every task's resolved settings and store (after changing ``app.conf``)."""
    global _generation  # noqa: PLW0603 - one process-wide counter is the whole point
    _generation += 1


@dataclass(frozen=True, slots=True)
class _Spec:
    """What one task needs on every execution, computed once per process."""

    settings: IdemSettings
    rule: KeyRule
    store: Store
    serializer: str
    accept: frozenset[str]
    max_defer: float
    """Longest countdown of a deferral: under half the broker's visibility timeout, so
    the broker does not hand the waiting message out a second time."""
    pid: int
    generation: int


@dataclass(slots=True)
class _Run:
    """One execution: its task, key and identity, passed between the steps of ``__call__``."""

    spec: _Spec
    settings: IdemSettings
    request: Any
    args: Sequence[Any]
    kwargs: Mapping[str, Any]
    key: str
    storage: str
    fingerprint: str
    token: str
    fence: int = 0
    lost: bool = False

    @property
    def task_id(self) -> str:
        return str(self.request.id)


_EXPECTED = (IdempotencyKeyMismatch, DuplicateInProgress, ResultNotStored)
"""Exceptions a worker logs as expected (Celery's ``Task.throws``), at INFO."""


def _task_options(cls: type) -> dict[str, Any]:
    """The ``idem_*`` options set on a task class (by the decorator or a subclass)."""
    options: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if klass is IdempotentTask or not issubclass(klass, IdempotentTask):
            continue
        options.update({k: v for k, v in vars(klass).items() if k.startswith("idem_")})
    return options


class IdempotentTask(Task):  # type: ignore[misc]  # celery ships no type hints
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
        headers = dict(options.get("headers") or {})
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
        if self._idem_settings().dedupe_on_publish and not self.app.conf.task_always_eager:
            existing = self._idem_published(args, kwargs, options)
            if existing is not None:
                return existing
        return super().apply_async(
            args, kwargs, task_id, producer, link, link_error, shadow, **options
        )

    def _idem_published(
        self, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None, options: Any
    ) -> Any:
        """One look-up before publishing: the AsyncResult of the run holding the key.

        None means "publish": nothing holds the key, the arguments differ (the worker
        reports the mismatch), the store is down (the worker-side claim still holds),
        or the message is a re-send of our own (a retry or a deferral must go out).
        """
        headers = options.get("headers") or {}
        if _RETRY_KEY in headers or _DEFERRALS in headers or options.get("retries"):
            return None
        if options.get("group_id") or options.get("chord"):
            return None  # canvas members are keyed by their position, on the worker
        spec = self._idem_spec()
        resolved = spec.rule.resolve(args or (), kwargs or {}, headers.get(HEADER))
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
        logger.debug(
            "%s key=%r: held by task %s, not published", self.name, resolved.key, found.task_id
        )
        return self.AsyncResult(found.task_id)

    def apply(self, args: Sequence[Any] | None = None, kwargs: Any = None, **options: Any) -> Any:
        """Run eagerly, under the same protocol; ``idempotency_key=...`` is honoured."""
        self._idem_headers(options)
        group_id = options.get("group_id")
        headers = options.get("headers")
        if group_id and headers and HEADER in headers and _GROUP_INDEX not in headers:
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
        key = getattr(self.request, "idem_key", None)
        if key is not None:
            base = options.get("headers") or self.request.as_execution_options().get("headers")
            options["headers"] = {**(base or {}), _RETRY_KEY: key}
        return super().retry(*args, **options)

    # -- configuration ------------------------------------------------------------

    def _idem_settings(self) -> IdemSettings:
        """The task's settings (app and task layers), cached; needs no store.

        A process that only publishes (no Redis of its own) can still validate call
        options against them.
        """
        cached = self._idem_settings_cache
        if cached is not None and cached[0] == _generation:
            return cached[1]
        settings = resolve_settings(self.app.conf, _task_options(type(self)), task_name=self.name)
        self._idem_settings_cache = (_generation, settings)
        return settings

    def _idem_spec(self) -> _Spec:
        spec = self._idem_spec_cache
        if spec is not None and spec.pid == os.getpid() and spec.generation == _generation:
            return spec
        conf = self.app.conf
        settings = self._idem_settings()
        accept = conf.result_accept_content or conf.accept_content
        visibility = (conf.broker_transport_options or {}).get("visibility_timeout")
        spec = _Spec(
            max_defer=float(visibility) / 2 if visibility else float("inf"),
            settings=settings,
            rule=KeyRule(self.name, self.run, type(self)._idem_key_rule),
            store=store_for_url(settings.redis_url, task_name=self.name),
            serializer=conf.result_serializer,
            accept=codec.accepted_content_types(accept),
            pid=os.getpid(),
            generation=_generation,
        )
        self._idem_spec_cache = spec
        return spec

    # -- executing ----------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the body at most once per key; replay the stored outcome otherwise."""
        request = self.request
        if request.called_directly or getattr(request, "idem_active", False):
            return super().__call__(*args, **kwargs)
        request.idem_active = True
        run = self._idem_identify(request, args, kwargs)
        outcome = self._idem_claim(run)
        if outcome is None:  # the store failed and the policy is to run anyway
            return self.run(*args, **kwargs)
        if outcome.state is ClaimState.CLAIMED:
            return self._idem_execute(run, outcome)
        if outcome.state is ClaimState.COMPLETED:
            return self._idem_replay(run, outcome)
        if outcome.state is ClaimState.MISMATCH:
            self._idem_mismatch(run, outcome)
        return self._idem_in_progress(run, outcome)

    def _idem_identify(self, request: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> _Run:
        spec = self._idem_spec()
        headers = request.headers or {}
        settings = spec.settings
        if any(name in CALL_SETTINGS for name in headers):
            settings = with_call_overrides(settings, headers, task_name=self.name)
        retry_key = headers.get(_RETRY_KEY)
        resolved = spec.rule.resolve(args, kwargs, headers.get(HEADER))
        key = resolved.key
        if isinstance(retry_key, str) and retry_key:
            key = retry_key  # the key of the execution this message retries, as it was
        elif resolved.source is KeySource.CALL:
            index = request.group_index
            if index is None:
                index = headers.get(_GROUP_INDEX)
            if index is not None:
                # Celery copies a group's (or chord header's) options to every member,
                # so each member keeps its own record: the key plus its position and
                # its arguments (nested groups restart their positions at 0).
                key = f"{key}#{index}.{resolved.fingerprint[:8]}"
        request.idem_key = key
        return _Run(
            spec=spec,
            settings=settings,
            request=request,
            args=args,
            kwargs=kwargs,
            key=key,
            storage=storage_key(settings.key_prefix, self.name, key),
            # A retry's record keeps the original request's fingerprint (claim.lua).
            fingerprint=""
            if resolved.source is KeySource.ARGS or retry_key
            else resolved.fingerprint,
            token=os.urandom(9).hex(),
        )

    def _idem_log(self, level: int, run: _Run, message: str, *args: Any) -> None:
        """Every line names task, task id and key, also as structured ``extra`` fields."""
        if logger.isEnabledFor(level):
            extra = {"idem_task": self.name, "idem_task_id": run.task_id, "idem_key": run.key}
            extra["idem_fence"] = run.fence
            logger.log(
                level, "%s[%s] key=%r: " + message, self.name, run.task_id, run.key, *args,
                extra=extra,
            )  # fmt: skip

    def _idem_claim(self, run: _Run) -> ClaimOutcome | None:
        """Claim the key; under ``wait``, poll while another run holds it (up to a lease)."""
        settings, deadline = run.settings, 0.0
        while True:
            try:
                outcome = run.spec.store.claim(
                    run.storage,
                    token=run.token,
                    task_id=run.task_id,
                    fingerprint=run.fingerprint,
                    lease=settings.lease,
                    ttl=settings.ttl,
                )
            except StoreUnavailable as exc:
                self._idem_store_down(run, exc)
                return None
            if (
                outcome.state is not ClaimState.IN_PROGRESS
                or settings.on_in_progress is not InProgressPolicy.WAIT
            ):
                return outcome
            now = time.monotonic()
            if not deadline:
                self._idem_signal_in_progress(run, outcome)
                deadline = now + settings.lease
            if now >= deadline or run.request.is_eager:
                return outcome
            time.sleep(min(max(outcome.lease_left, 0.01), settings.lease / 20.0, 0.5))

    def _idem_store_down(self, run: _Run, cause: StoreUnavailable) -> None:
        """Apply ``idem_on_store_error`` when the claim could not reach the store."""
        policy = run.settings.on_store_error
        # The store names only its hashed record; the caller needs the task and key.
        exc = StoreUnavailable(
            f"task {self.name!r} could not claim key {run.key!r}: {cause}",
            key=run.key,
            task_name=self.name,
        )
        exc.__cause__ = cause
        signals.store_error.send(
            sender=self, key=run.key, task_id=run.task_id, exc=exc, stage="claim", policy=policy
        )
        if policy is StoreErrorPolicy.RUN:
            self._idem_log(
                logging.WARNING,
                run,
                "store unavailable, running WITHOUT idempotency (idem_on_store_error='run'): %s",
                exc,
            )
            return
        if policy is StoreErrorPolicy.RAISE or run.request.is_eager:
            raise exc
        countdown = min(2.0 ** min(_deferrals(run.request), 6), 60.0, run.spec.max_defer)
        self._idem_log(
            logging.WARNING, run, "store unavailable, body not run; retry in %.0f s: %s",
            countdown, exc,
        )  # fmt: skip
        self._idem_defer(run, countdown, exc)

    def _idem_defer(self, run: _Run, countdown: float, exc: BaseException) -> NoReturn:
        """Send this message again after ``countdown``, not counted as one of its retries.

        If the new message cannot be published, this one is rejected and requeued rather
        than acked: acking it would lose the only copy of the work.
        """
        request = run.request
        # Celery's own execution options (x-death headers filtered out for RabbitMQ).
        headers = dict(request.as_execution_options().get("headers") or {})
        headers[_DEFERRALS] = _deferrals(request) + 1
        sig = self.signature_from_request(
            request, run.args, run.kwargs, countdown=countdown, retries=request.retries,
            headers=headers,
        )  # fmt: skip
        try:
            sig.apply_async()
        except Exception as publish_error:
            self._idem_log(
                logging.ERROR, run, "could not re-queue this message (%s); requeuing it",
                publish_error,
            )  # fmt: skip
            raise Reject(publish_error, requeue=True) from publish_error
        raise Retry(exc=exc, when=countdown, sig=sig)

    def _idem_signal_in_progress(self, run: _Run, outcome: ClaimOutcome) -> None:
        policy = run.settings.on_in_progress
        self._idem_log(
            logging.INFO, run, "held by %s for %.1f s more; policy %s",
            outcome.task_id, outcome.lease_left, policy.value,
        )  # fmt: skip
        signals.duplicate_in_progress.send(
            sender=self,
            key=run.key,
            task_id=run.task_id,
            owner_task_id=outcome.task_id,
            lease_left=outcome.lease_left,
            policy=policy,
        )

    def _idem_in_progress(self, run: _Run, outcome: ClaimOutcome) -> NoReturn:
        policy = run.settings.on_in_progress
        if policy is not InProgressPolicy.WAIT:  # ``wait`` signalled when it began waiting
            self._idem_signal_in_progress(run, outcome)
        error = DuplicateInProgress(
            f"task {self.name!r} key {run.key!r} is being run by task {outcome.task_id} "
            f"(lease {outcome.lease_left:.1f} s left); this duplicate did not run the body",
            key=run.key,
            task_name=self.name,
        )
        # The same task id (a redelivery, or a retry that overtook its own parking) is
        # this work's only message: it must come back, whatever the policy says.
        own = outcome.task_id == run.task_id
        if run.request.is_eager or (policy is InProgressPolicy.RAISE and not own):
            raise error
        # Come back soon, then less and less often, but never later than the holder's
        # lease would end: by then it has completed (replay), failed (claim and run) or
        # died (take over). Waiting the whole lease at once would keep the duplicate's
        # caller waiting a minute for a task that takes a second.
        backoff = _FIRST_DEFERRAL * 2.0 ** min(_deferrals(run.request), 10)
        countdown = min(max(outcome.lease_left, 0.05), backoff, run.spec.max_defer)
        self._idem_defer(run, countdown, error)

    def _idem_mismatch(self, run: _Run, outcome: ClaimOutcome) -> NoReturn:
        self._idem_log(
            logging.WARNING, run, "used before by task %s with other arguments; nothing run",
            outcome.task_id,
        )  # fmt: skip
        signals.key_mismatch.send(
            sender=self, key=run.key, task_id=run.task_id, original_task_id=outcome.task_id
        )
        raise IdempotencyKeyMismatch(
            f"idempotency key {run.key!r} of task {self.name!r} was used by task "
            f"{outcome.task_id} with other arguments; nothing was run. Use a new key for "
            f"a new request, or send the same arguments to get the first result.",
            key=run.key,
            task_name=self.name,
        )

    def _idem_replay(self, run: _Run, outcome: ClaimOutcome) -> Any:
        stored = outcome.stored
        assert stored is not None  # COMPLETED always carries it
        request = run.request
        if outcome.task_id == run.task_id:
            # A redelivery of the very message that completed: its callbacks, chain and
            # errbacks were dispatched by that run, so this one must not send them again.
            request.callbacks = None
            request.chain = None
            request.errbacks = None
        run.fence = request.idem_fence = outcome.fence
        self._idem_log(logging.DEBUG, run, "replaying the outcome of task %s", outcome.task_id)
        signals.replayed.send(
            sender=self,
            key=run.key,
            task_id=run.task_id,
            original_task_id=outcome.task_id,
            fence=outcome.fence,
        )
        if stored.kind is RecordKind.RESULT:
            try:
                return codec.decode_result(stored, run.spec.accept)
            except codec.DECODE_ERRORS as exc:
                raise IdempotencyError(
                    f"the stored result of task {self.name!r} key {run.key!r} cannot be "
                    f"decoded with the content types this app accepts ({exc}); the body "
                    f"was not run. Forget the key if the record is not yours.",
                    key=run.key,
                    task_name=self.name,
                ) from exc
        if stored.kind is RecordKind.ERROR:
            error, described = codec.decode_error(stored, run.settings.cache_errors)
            if error is not None:
                raise error
            raise IdempotencyError(
                f"task {self.name!r} key {run.key!r} failed before with {described}; that "
                f"failure is cached but its class is no longer in idem_cache_errors",
                key=run.key,
                task_name=self.name,
            )
        raise ResultNotStored(
            f"task {self.name!r} key {run.key!r} already ran (task {outcome.task_id}) but "
            f"its result was not stored: {codec.no_result_reason(stored)}. The body will "
            f"not run again; forget the key to run it anew.",
            key=run.key,
            task_name=self.name,
        )

    def _idem_execute(self, run: _Run, outcome: ClaimOutcome) -> Any:
        run.fence = run.request.idem_fence = outcome.fence
        if outcome.took_over:
            self._idem_log(logging.WARNING, run, "took over a key whose lease ran out")
        lease = renewer.add(
            Lease(
                run.spec.store,
                run.storage,
                run.token,
                run.settings.lease,
                self._idem_lost(run),
                describe=f"{self.name}[{run.task_id}] key={run.key!r}",
            )
        )
        try:
            retval = self.run(*run.args, **run.kwargs)
        except Retry as exc:
            renewer.remove(lease)
            self._idem_park(run, exc)
            raise
        except BaseException as exc:
            renewer.remove(lease)
            self._idem_failed(run, exc)
            raise
        renewer.remove(lease)
        self._idem_complete(run, retval)
        return retval

    def _idem_lost(self, run: _Run) -> Callable[[Lease], None]:
        return lambda _lease: self._idem_report_lost(run, "renew")

    def _idem_report_lost(self, run: _Run, stage: str) -> None:
        if run.lost:  # the renewer already told: one loss, one warning, one signal
            return
        run.lost = True
        self._idem_log(
            logging.WARNING, run, "lease lost (%s): another attempt took the key over; this "
            "run's outcome is not stored", stage,
        )  # fmt: skip
        signals.lease_lost.send(
            sender=self, key=run.key, task_id=run.task_id, fence=run.fence, stage=stage
        )

    def _idem_store_failed(self, run: _Run, exc: IdempotencyError, stage: str) -> None:
        self._idem_log(logging.ERROR, run, "could not %s the record: %s", stage, exc)
        signals.store_error.send(
            sender=self, key=run.key, task_id=run.task_id, exc=exc, stage=stage, policy=None
        )

    def _idem_park(self, run: _Run, exc: Retry) -> None:
        """Hold the key for this task id's own retry (``self.retry()``/``autoretry_for``)."""
        when = exc.when
        if isinstance(when, int | float):
            countdown = float(when)
        elif isinstance(when, datetime):
            if when.tzinfo is None:  # Celery reads a naive eta as UTC
                when = when.replace(tzinfo=timezone.utc)
            countdown = max(0.0, when.timestamp() - time.time())
        else:
            countdown = 0.0
        try:
            hold = countdown + run.settings.lease
            run.spec.store.park(run.storage, token=run.token, hold=hold)
        except IdempotencyError as store_exc:  # the task's own retry wins
            self._idem_store_failed(run, store_exc, "park")

    def _idem_failed(self, run: _Run, exc: BaseException) -> None:
        """Release the key, or store the failure when its type is in ``idem_cache_errors``."""
        cache = run.settings.cache_errors
        try:
            if cache and isinstance(exc, cache):
                self._idem_store_outcome(run, codec.encode_error(exc))
            else:
                run.spec.store.release(run.storage, token=run.token)
        except IdempotencyError as store_exc:  # the task's own exception wins
            self._idem_store_failed(run, store_exc, "release")

    def _idem_complete(self, run: _Run, retval: Any) -> None:
        settings = run.settings
        try:
            stored = codec.encode_result(retval, run.spec.serializer, settings.max_result_bytes)
        except codec.ENCODE_ERRORS as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self._idem_log(
                logging.ERROR, run, "result not stored (%s); the key is completed without "
                "it and will not run again", reason,
            )  # fmt: skip
            signals.result_not_stored.send(
                sender=self, key=run.key, task_id=run.task_id, reason=reason
            )
            stored = codec.encode_no_result(reason)
        # The side effect has happened: try hard (a few short pauses) to record it.
        for pause in (*_COMPLETE_RETRIES, None):
            try:
                self._idem_store_outcome(run, stored)
            except StoreUnavailable as exc:
                if pause is None:
                    self._idem_store_failed(run, exc, "complete")
                    return
                time.sleep(pause)
                continue
            except IdempotencyError as exc:  # refused for good: the result still stands
                self._idem_store_failed(run, exc, "complete")
            return

    def _idem_store_outcome(self, run: _Run, stored: Stored) -> None:
        owned = run.spec.store.complete(
            run.storage,
            token=run.token,
            fence=run.fence,
            task_id=run.task_id,
            stored=stored,
            ttl=run.settings.ttl,
        )
        if not owned:
            self._idem_report_lost(run, "complete")


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


def _deferrals(request: Any) -> int:
    """How many times celery-idem has deferred this message already (0 if unreadable)."""
    try:
        return max(0, int((request.headers or {}).get(_DEFERRALS, 0)))
    except (TypeError, ValueError):
        return 0


def _validate_on_worker_start(sender: Any = None, **_: Any) -> None:
    """Fail the worker at start, naming the setting, rather than at the first task.

    Also warns when the store may evict records: an evicted record is a key that runs
    again, and every celery-idem record has a TTL, so ``volatile-*`` policies pick them
    first.
    """
    app = getattr(sender, "app", None)
    if app is None:
        return
    checked: set[int] = set()
    for task in list(app.tasks.values()):
        if not isinstance(task, IdempotentTask):
            continue
        try:
            store = task._idem_spec().store
        except IdempotencyConfigError as exc:
            logger.critical("celery-idem: %s", exc)
            raise SystemExit(f"celery-idem: task {task.name!r}: {exc}") from exc
        if id(store) not in checked:
            checked.add(id(store))
            _warn_if_evicting(store)


def _warn_if_evicting(store: Store) -> None:
    policy_of = getattr(store, "eviction_policy", None)
    policy = policy_of() if policy_of is not None else None
    if policy is not None and policy != "noeviction":
        logger.warning(
            "celery-idem: the store at %s has maxmemory-policy %r: under memory pressure "
            "Redis may evict idempotency records, and an evicted key runs again. Set "
            "maxmemory-policy noeviction on the Redis that holds idem_redis_url.",
            getattr(store, "url", "?"),
            policy,
        )


worker_init.connect(_validate_on_worker_start, weak=False)
