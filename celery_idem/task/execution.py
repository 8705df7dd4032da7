"""The protocol on the worker: claim, then run, replay, wait or refuse.

A mixin of :class:`~celery_idem.task.IdempotentTask`; ``base`` dispatches on the claim's
answer to the methods here. Each step takes the execution's :class:`_Run`, so nothing
about one execution lives on the (shared) task instance.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, NoReturn

from celery.exceptions import Reject, Retry

from celery_idem import codec, signals
from celery_idem.checks import MAX_DURATION
from celery_idem.config import (
    CALL_SETTINGS,
    InProgressPolicy,
    StoreErrorPolicy,
    with_call_overrides,
)
from celery_idem.exceptions import (
    DuplicateInProgress,
    IdempotencyError,
    IdempotencyKeyMismatch,
    KeyQuarantined,
    ReplicasNotReached,
    ResultNotStored,
    StoreUnavailable,
)
from celery_idem.keys import KeySource, storage_key
from celery_idem.renewer import Lease, renewer
from celery_idem.store import ClaimOutcome, ClaimState, RecordKind, Stored
from celery_idem.task.context import (
    _COMPLETE_RETRIES,
    _DEFERRALS,
    _FIRST_DEFERRAL,
    _GROUP_INDEX,
    _RETRY_KEY,
    HANDOVER,
    HEADER,
    _deferrals,
    _Run,
    _Spec,
    message_headers,
)

logger = logging.getLogger("celery_idem")


class _Execution:
    """The worker-side steps of one execution (mixed into IdempotentTask)."""

    if TYPE_CHECKING:  # provided by celery.Task and IdempotentTask
        name: str
        request: Any

        def run(self, *args: Any, **kwargs: Any) -> Any: ...
        def signature_from_request(self, *args: Any, **kwargs: Any) -> Any: ...
        def _idem_spec(self) -> _Spec: ...

    def _idem_identify(self, request: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> _Run:
        spec = self._idem_spec()
        headers = message_headers(request)
        settings = spec.settings
        if any(name in CALL_SETTINGS for name in headers):
            settings = with_call_overrides(settings, headers, task_name=self.name)
        key, fingerprint = self._idem_key_of(request, headers, args, kwargs)
        request.idem_key = key
        return _Run(
            spec=spec,
            settings=settings,
            request=request,
            args=args,
            kwargs=kwargs,
            key=key,
            storage=storage_key(settings.key_prefix, self.name, key),
            fingerprint=fingerprint,
            token=os.urandom(9).hex(),
        )

    def _idem_key_of(
        self,
        request: Any,
        headers: Mapping[str, Any],
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
    ) -> tuple[str, str]:
        """This message's key and the fingerprint its claim checks ('' = none)."""
        retry_key = headers.get(_RETRY_KEY)
        if isinstance(retry_key, str) and retry_key:
            # The key of the execution this message retries, as it was, honoured before
            # anything is derived: the retry's arguments may differ or have no
            # canonical encoding, and its record keeps the original fingerprint.
            return retry_key, ""
        resolved = self._idem_spec().rule.resolve(args, kwargs, headers.get(HEADER))
        if resolved.source is KeySource.ARGS:
            return resolved.key, ""  # the key is the arguments: nothing else to check
        key = resolved.key
        if resolved.source is KeySource.CALL:
            index = request.group_index
            if index is None:
                index = headers.get(_GROUP_INDEX)
            if index is not None:
                # Celery copies a group's (or chord header's) options to every member,
                # so each member keeps its own record: the key plus its position and
                # its arguments (nested groups restart their positions at 0).
                key = f"{key}#{index}.{resolved.fingerprint[:8]}"
        return key, resolved.fingerprint

    def _idem_log(self, level: int, run: _Run, message: str, *args: Any) -> None:
        """Every line names task, task id and key, also as structured ``extra`` fields."""
        if logger.isEnabledFor(level):
            extra: dict[str, Any] = {
                "idem_task": self.name,
                "idem_task_id": run.task_id,
                "idem_key": run.key,
                "idem_fence": run.fence,
            }
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
                    max_takeovers=settings.max_takeovers,
                )
            except StoreUnavailable as exc:
                self._idem_store_down(run, exc)
                return None
            except IdempotencyError as exc:  # refused for good (a damaged record)
                raise IdempotencyError(
                    f"task {self.name!r} could not claim key {run.key!r}: {exc}",
                    key=run.key,
                    task_name=self.name,
                ) from exc
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
        not_durable = isinstance(cause, ReplicasNotReached)
        if policy is StoreErrorPolicy.RUN and not_durable:
            # The store is up and the user asked for durable claims: running
            # unprotected would throw away exactly what idem_min_replicas buys.
            policy = StoreErrorPolicy.RETRY
        # The store names only its hashed record; the caller needs the task and key.
        kind = ReplicasNotReached if not_durable else StoreUnavailable
        exc = kind(
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
            if outcome.continuation_pending and stored.kind is RecordKind.RESULT:
                # A redelivery of the very message that completed, whose worker died
                # before Celery sent its callbacks and chain: they go out now, with the
                # stored value, and are then marked sent (``on_success``).
                request.idem_owed = run
            else:
                # That run sent them (or had none): this one must not send them again.
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

    def _idem_quarantined(self, run: _Run, outcome: ClaimOutcome) -> NoReturn:
        """Refuse a key taken over too often: its message may be what kills workers."""
        if outcome.quarantined_now:
            self._idem_log(
                logging.ERROR, run, "quarantined after %d takeovers without completing "
                "(idem_max_takeovers=%d); the body did not run", outcome.takeovers,
                run.settings.max_takeovers,
            )  # fmt: skip
            signals.quarantined.send(
                sender=self, key=run.key, task_id=run.task_id, takeovers=outcome.takeovers,
                fence=outcome.fence,
            )  # fmt: skip
        raise KeyQuarantined(
            f"task {self.name!r} key {run.key!r} is quarantined: it was taken over "
            f"{outcome.takeovers} times without completing (idem_max_takeovers="
            f"{run.settings.max_takeovers}), so its message may be killing workers (OOM, a "
            f"crash, a hard time limit). Nothing runs for it until an operator releases it: "
            f"celery -A <app> idem forget --task {self.name} {shlex.quote(run.key)}",
            key=run.key,
            task_name=self.name,
        )

    def _idem_execute(self, run: _Run, outcome: ClaimOutcome) -> Any:
        run.fence = run.request.idem_fence = outcome.fence
        if outcome.took_over:
            self._idem_log(logging.WARNING, run, "took over a key whose lease ran out")
        lease = run.lease = renewer.add(
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
            if not run.handed_over:  # self.replace() gave the key to its replacement
                # Any other failure (Ignore and Reject included) frees the key: nothing
                # was completed, and a requeued message must be able to claim again.
                self._idem_failed(run, exc)
            raise
        renewer.remove(lease)
        retry = (
            retval if isinstance(retval, Retry) else getattr(run.request, "idem_retry_sent", None)
        )
        if isinstance(retry, Retry):
            # ``self.retry(..., throw=False)``, returned or not: the retry was sent (or,
            # returned eagerly, is applied next) under this task id, and must find the
            # key parked for it; this run's own value is not the key's outcome.
            self._idem_park(run, retry)
            return retval
        stored = self._idem_complete(run, retval)
        if run.request.is_eager and stored.kind is RecordKind.RESULT:
            # What a duplicate gets, and what a worker's caller gets through the
            # result backend: the value after the result serializer, not the raw one.
            return codec.decode_result(stored, run.spec.accept)
        return retval

    def _idem_hand_over(self, run: _Run, sig: Any) -> None:
        """Give the key to the signature replacing this run (``self.replace(sig)``).

        Celery sends ``sig`` under this task id and ends this run with ``Ignore``. The
        key stays held, for up to ``idem_ttl``, with this run's token, and the task that
        finishes ``sig`` (the one with this task id) carries it in a header: its success
        completes the key with its result, its failure releases it (``handover.py``).
        Until then duplicates wait, as for any run in progress.
        """
        leaves = [leaf for leaf in _signatures(sig) if leaf.options.get("task_id") == run.task_id]
        if not leaves or run.lost:
            return  # nothing will finish in our name: Ignore releases the key as before
        if run.lease is not None:
            renewer.remove(run.lease)
        settings = run.settings
        try:
            owned = run.spec.store.renew(
                run.storage, token=run.token, lease=min(settings.ttl + settings.lease, MAX_DURATION)
            )
        except IdempotencyError as exc:
            self._idem_store_failed(run, exc, "hand over")
            return
        if not owned:
            self._idem_report_lost(run, "hand over")
            return
        handover = {"task": self.name, "key": run.key, "token": run.token, "fence": run.fence}
        for leaf in leaves:
            leaf.options["headers"] = {**(leaf.options.get("headers") or {}), HANDOVER: handover}
        run.handed_over = True
        self._idem_log(logging.INFO, run, "replaced; the key waits for the replacement's outcome")

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
            # A countdown of years still parks: the hold is capped at what Redis holds.
            hold = min(countdown + run.settings.lease, MAX_DURATION)
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

    def idem_settle_handover(
        self, handover: Mapping[str, Any], task_id: str, *, result: Any = None, failed: bool = False
    ) -> None:
        """Complete (or, ``failed``, release) a key handed over by ``self.replace()``.

        Called in the worker that ran the task finishing the replacement (``task_id``,
        the replaced task's id), with the hand-over from its header.
        """
        spec = self._idem_spec()
        settings = spec.settings
        key, token = str(handover.get("key")), str(handover.get("token"))
        storage = storage_key(settings.key_prefix, self.name, key)
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
                storage, token=token, fence=fence, task_id=task_id, stored=stored,
                ttl=settings.ttl,
            )  # fmt: skip
        except IdempotencyError as exc:
            logger.error(
                "%s[%s] key=%r: could not settle the key after its replacement: %s",
                self.name, task_id, key, exc,
            )  # fmt: skip
            return
        if not owned:
            logger.warning(
                "%s[%s] key=%r: the replacement finished after the key was taken over or "
                "forgotten; its result is not stored", self.name, task_id, key,
            )  # fmt: skip

    def _idem_complete(self, run: _Run, retval: Any) -> Stored:
        """Store the result (or why there is none); returns what was stored."""
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
        request = run.request
        # Celery's tracer sends callbacks and the chain's next step after this returns;
        # until they are confirmed sent (``on_success``), a redelivery sends them.
        continuation = (
            stored.kind is RecordKind.RESULT
            and not request.is_eager
            and bool(request.callbacks or request.chain)
        )
        # The side effect has happened: try hard (a few short pauses) to record it.
        for pause in (*_COMPLETE_RETRIES, None):
            try:
                if self._idem_store_outcome(run, stored, continuation=continuation):
                    request.idem_owed = run if continuation else None
            except StoreUnavailable as exc:
                if pause is None:
                    self._idem_store_failed(run, exc, "complete")
                    return stored
                time.sleep(pause)
                continue
            except IdempotencyError as exc:  # refused for good: the result still stands
                self._idem_store_failed(run, exc, "complete")
            return stored
        raise AssertionError("unreachable")  # pragma: no cover

    def _idem_store_outcome(self, run: _Run, stored: Stored, *, continuation: bool = False) -> bool:
        owned = run.spec.store.complete(
            run.storage,
            token=run.token,
            fence=run.fence,
            task_id=run.task_id,
            stored=stored,
            ttl=run.settings.ttl,
            continuation=continuation,
        )
        if not owned:
            self._idem_report_lost(run, "complete")
        return owned

    def _idem_dispatched(self, run: _Run) -> None:
        """Mark the completed record: this run's callbacks and chain were sent."""
        try:
            run.spec.store.dispatched(run.storage, task_id=run.task_id)
        except IdempotencyError as exc:  # a redelivery may send them again: never lost
            self._idem_store_failed(run, exc, "mark dispatched")


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
