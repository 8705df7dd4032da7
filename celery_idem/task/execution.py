"""One execution of an idempotent task: claim, then run, replay, wait or refuse.

Over 400 lines on purpose: one class, whose methods are the protocol's steps in the
order a message meets them (claim; the refusals; replay; run, park, release, complete).

``IdempotentTask.__call__`` builds an :class:`Execution` for the message it was handed
and calls :meth:`Execution.perform`. The execution owns what belongs to that message
alone (its key, owner token, fence, lease), so nothing about one execution lives on
the task instance, which Celery shares between every message of the task.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from datetime import datetime, timezone
from typing import Any, NoReturn, TypeVar

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
    InvalidIdempotencyKey,
    KeyQuarantined,
    ReplicasNotReached,
    ResultNotStored,
    StoreUnavailable,
)
from celery_idem.keys import KeySource, storage_key
from celery_idem.renewer import Completion, Lease, renewer
from celery_idem.store import (
    ClaimOutcome,
    ClaimRequest,
    ClaimState,
    CompleteRequest,
    RecordKind,
    StepRecord,
    Stored,
)
from celery_idem.task.headers import (
    DEFERRALS,
    GROUP_INDEX,
    HEADER,
    HEADER_ORIGIN,
    RETRY_KEY,
    deferrals,
    message_headers,
)
from celery_idem.task.spec import IdemTask, Spec

__all__ = ["Execution", "RunLog"]

logger = logging.getLogger("celery_idem")

E = TypeVar("E", bound=IdempotencyError)
T = TypeVar("T")

FIRST_DEFERRAL = 0.5
"""Seconds before a duplicate of a running key first looks again (doubling each time)."""
LAST_DEFERRAL = 2.0
"""The longest a waiting duplicate stays away between two looks: it comes back within
this of its holder's completion, however long the holder's lease (a takeover starts a
new one). Each look is one claim round trip and one re-published message."""
DEFERRAL_NOTE = "celery-idem: the key is held by another run"
"""How a deferral's ``Retry`` starts, so :class:`QuietDeferrals` knows Celery's line of it."""
COMPLETE_RETRIES = (0.05, 0.25, 1.0)
"""Pauses between attempts at storing a finished run's outcome when Redis fails."""


class RunLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Every line names task, task id and key, and carries them as ``extra`` fields."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        """Prefix the message with ``task[task id] key=...:`` and attach the fields."""
        fields = dict(self.extra or {})
        kwargs["extra"] = {**fields, **kwargs.get("extra", {})}
        prefix = f"{fields['idem_task']}[{fields['idem_task_id']}] key={fields['idem_key']!r}: "
        return prefix + str(msg), kwargs


class Execution:
    """One message's execution under the protocol (see ``docs/protocol.md``).

    Args:
        task: The task (its ``run`` is the body).
        spec: The task's resolved settings, rule, store and codec.
        request: Celery's request of this message.
        args: The positional arguments of this message.
        kwargs: The keyword arguments of this message.
    """

    def __init__(
        self,
        task: IdemTask,
        spec: Spec,
        request: Any,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
    ) -> None:
        self.task, self.spec, self.request = task, spec, request
        self.args, self.kwargs = args, kwargs
        headers = message_headers(request)
        settings = spec.settings
        if any(name in CALL_SETTINGS for name in headers):
            settings = with_call_overrides(settings, headers, task_name=task.name)
        self.settings = settings
        self.key, self.fingerprint = self._key_of(headers)
        request.idem_key = self.key
        self.storage = storage_key(settings.key_prefix, spec.scope, self.key)
        self.token = os.urandom(9).hex()
        self.task_id = str(request.id)
        self.fence = 0
        self.lost = False
        self.lease: Lease | None = None
        self.handed_over = False
        """``self.replace()`` gave the key to the replacement: not released on ``Ignore``."""
        self.finished_steps: tuple[StepRecord, ...] | None = None
        """While the claimed body runs: the durable steps earlier attempts finished
        (``self.step`` replays them, see ``steps.py``); None when no claimed body runs."""
        self.atomic_open = False
        """An ``idem_atomic()`` block of the body is open (``atomic.py``)."""
        self.committed: Stored | None = None
        """What an ``idem_atomic()`` block committed as the key's completion, in the
        body's own transaction: the run's outcome is stored, nothing is written after."""
        self.committed_value: Any = None
        """The value (``done.result``) that ``committed`` encodes, as the body set it."""
        self.log = RunLog(
            logger,
            {"idem_task": task.name, "idem_task_id": self.task_id, "idem_key": self.key,
             "idem_fence": 0},
        )  # fmt: skip

    def _key_of(self, headers: Mapping[str, Any]) -> tuple[str, str]:
        """This message's key and the fingerprint its claim checks ('' = none)."""
        retry_key = headers.get(RETRY_KEY)
        if isinstance(retry_key, str) and retry_key:
            # The key of the execution this message retries, as it was, honoured before
            # anything is derived: the retry's arguments may differ or have no
            # canonical encoding, and its record keeps the original fingerprint.
            return retry_key, ""
        explicit = headers.get(HEADER)
        if explicit is None and self.settings.require_key:
            raise InvalidIdempotencyKey(
                f"task {self.task.name!r} requires an explicit idempotency key "
                f"(idem_require_key) and this message carries none in its {HEADER!r} header "
                f"(celery-idem's call site refuses such a call, so a producer that does not "
                f"check keys sent it, such as app.send_task): send "
                f"headers={{{HEADER!r}: K}}; nothing was run",
                None,
                self.task.name,
            )
        resolved = self.spec.rule.resolve(
            self.args, self.kwargs, explicit, self.settings.fingerprint, origin=HEADER_ORIGIN
        )
        if resolved.source is KeySource.ARGS:
            return resolved.key, ""  # the key is the arguments: nothing else to check
        key = resolved.key
        if resolved.source is KeySource.CALL:
            index = self.request.group_index
            if index is None:
                index = headers.get(GROUP_INDEX)
            if index is not None:
                # Celery copies a group's (or chord header's) options to every member,
                # so each member keeps its own record: the key plus its position and
                # its arguments (nested groups restart their positions at 0); with
                # idem_fingerprint=False, its position alone.
                key = f"{key}#{index}"
                if resolved.fingerprint:
                    key = f"{key}.{resolved.fingerprint[:8]}"
        return key, resolved.fingerprint

    # -- what every step shares --------------------------------------------------------------

    def error(self, kind: type[E], message: str) -> E:
        """An error of ``kind`` naming this execution's key and task."""
        return kind(message, key=self.key, task_name=self.task.name)

    def key_error(self, kind: type[E], what: str) -> E:
        """An error of ``kind`` saying ``task 'NAME' key 'KEY'`` and then ``what``."""
        return self.error(kind, f"task {self.task.name!r} key {self.key!r} {what}")

    def stage_error(self, kind: type[E], stage: str, cause: Exception) -> E:
        """An error of ``kind``: this execution could not ``stage`` its key (``cause``).

        ``cause`` is the store's error, which names only the hashed record.
        """
        message = f"task {self.task.name!r} could not {stage} key {self.key!r}: {cause}"
        return self.error(kind, message)

    def set_fence(self, fence: int) -> None:
        """The claim's fence, for the body (``self.idempotency_fence``) and the log lines."""
        self.fence = self.request.idem_fence = fence
        self.log.extra["idem_fence"] = fence  # type: ignore[index]

    def signal(self, signal: Any, **fields: Any) -> None:
        """Send one of ``celery_idem.signals`` for this execution."""
        signal.send(sender=self.task, key=self.key, task_id=self.task_id, **fields)

    # -- dispatch ------------------------------------------------------------------------------

    def perform(self) -> Any:
        """Run the body at most once per key; replay the stored outcome otherwise."""
        outcome = self.claim()
        if outcome is None:  # the store failed and the policy is to run anyway
            return self.task.run(*self.args, **self.kwargs)
        state = outcome.state
        if state is ClaimState.CLAIMED:
            return self.run(outcome)
        if state is ClaimState.COMPLETED:
            return self.replay(outcome)
        if state is ClaimState.MISMATCH:
            self.mismatch(outcome)
        if state is ClaimState.QUARANTINED:
            self.quarantined(outcome)
        return self.in_progress(outcome)

    def claim(self) -> ClaimOutcome | None:
        """Claim the key; under ``wait``, poll while another run holds it (up to a lease)."""
        # The answers of this thread's last completions have arrived by now: read them
        # before this claim takes a connection (see Renewer.complete_later).
        renewer.settle_sent()
        settings, deadline = self.settings, 0.0
        request = ClaimRequest(
            self.storage,
            token=self.token,
            task_id=self.task_id,
            fingerprint=self.fingerprint,
            lease=settings.lease,
            ttl=settings.ttl,
            max_takeovers=settings.max_takeovers,
        )
        while True:
            try:
                outcome = self.spec.store.claim(request)
            except StoreUnavailable as exc:
                self.store_down(exc)
                return None
            except IdempotencyError as exc:  # refused for good (a damaged record)
                raise self.stage_error(IdempotencyError, "claim", exc) from exc
            if (
                outcome.state is not ClaimState.IN_PROGRESS
                or settings.on_in_progress is not InProgressPolicy.WAIT
            ):
                return outcome
            now = time.monotonic()
            if not deadline:
                self.signal_in_progress(outcome)
                deadline = now + settings.lease
            if now >= deadline or self.request.is_eager:
                return outcome
            time.sleep(min(max(outcome.lease_left, 0.01), settings.lease / 20.0, 0.5))

    # -- when the claim could not be taken -------------------------------------------------

    def store_down(self, cause: StoreUnavailable) -> None:
        """Apply ``idem_on_store_error`` when the claim could not reach the store."""
        policy = self.settings.on_store_error
        not_durable = isinstance(cause, ReplicasNotReached)
        if policy is StoreErrorPolicy.RUN and not_durable:
            # The store is up and the user asked for durable claims: running
            # unprotected would throw away exactly what idem_min_replicas buys.
            policy = StoreErrorPolicy.RETRY
        # The store names only its hashed record; the caller needs the task and key.
        kind = ReplicasNotReached if not_durable else StoreUnavailable
        exc = self.stage_error(kind, "claim", cause)
        exc.__cause__ = cause
        self.signal(signals.store_error, exc=exc, stage="claim", policy=policy)
        if policy is StoreErrorPolicy.RUN:
            self.log.warning(
                "store unavailable, running WITHOUT idempotency (idem_on_store_error='run'): %s",
                exc,
            )
            return
        if policy is StoreErrorPolicy.RAISE or self.request.is_eager:
            raise exc
        countdown = min(2.0 ** min(deferrals(self.request), 6), 60.0, self.spec.max_defer)
        self.log.warning("store unavailable, body not run; retry in %.0f s: %s", countdown, exc)
        self.defer(countdown, exc)

    def defer(self, countdown: float, exc: BaseException, note: str = "") -> NoReturn:
        """Send this message again after ``countdown``, not counted as one of its retries.

        If the new message cannot be published, this one is rejected and requeued rather
        than acked: acking it would lose the only copy of the work.
        """
        request = self.request
        # Celery's own execution options (x-death headers filtered out for RabbitMQ).
        headers = dict(request.as_execution_options().get("headers") or {})
        headers[DEFERRALS] = deferrals(request) + 1
        sig = self.task.signature_from_request(
            request, self.args, self.kwargs, countdown=countdown, retries=request.retries,
            headers=headers,
        )  # fmt: skip
        try:
            sig.apply_async()
        except Exception as publish_error:
            self.log.error("could not re-queue this message (%s); requeuing it", publish_error)
            raise Reject(publish_error, requeue=True) from publish_error
        raise Retry(f"{note}; back in {countdown:g} s" if note else None, exc, countdown, sig=sig)

    def signal_in_progress(self, outcome: ClaimOutcome, retry_in: float | None = None) -> None:
        """Tell (log, signal) that another run holds the key.

        Logged at INFO the first time this message finds it held, at DEBUG on its later
        looks (a waiting duplicate looks every few seconds); Celery's own "retry" line
        for the deferral is left out (:class:`QuietDeferrals`), so a look is one line.
        """
        policy = self.settings.on_in_progress
        holder = (
            f"an earlier delivery of this same message (task {outcome.task_id})"
            if outcome.task_id == self.task_id
            else f"task {outcome.task_id}"
        )
        back = f"; back in {retry_in:g} s" if retry_in is not None else ""
        level = logging.INFO if not deferrals(self.request) else logging.DEBUG
        self.log.log(
            level, "held by %s for %.1f s more; policy %s%s",
            holder, outcome.lease_left, policy.value, back,
        )  # fmt: skip
        self.signal(
            signals.duplicate_in_progress,
            owner_task_id=outcome.task_id,
            lease_left=outcome.lease_left,
            policy=policy,
            retry_in=retry_in,
        )

    def in_progress(self, outcome: ClaimOutcome) -> NoReturn:
        """Another run holds the key: come back later, or raise (``raise``, eager)."""
        policy = self.settings.on_in_progress
        # The same task id (a redelivery, or a retry that overtook its own parking) is
        # this work's only message: it must come back, whatever the policy says.
        own = outcome.task_id == self.task_id
        leaves = self.request.is_eager or (policy is InProgressPolicy.RAISE and not own)
        # Come back soon, then less often, but never later than LAST_DEFERRAL, nor than
        # the holder's lease would end: by then it has completed (replay), failed (claim
        # and run) or died (take over). Backing off to the whole lease would keep the
        # duplicate's caller waiting a minute for a task that takes a second, and after
        # a takeover the holder's lease starts again.
        backoff = FIRST_DEFERRAL * 2.0 ** min(deferrals(self.request), 10)
        countdown = min(max(outcome.lease_left, 0.05), backoff, LAST_DEFERRAL, self.spec.max_defer)
        if policy is not InProgressPolicy.WAIT:  # ``wait`` signalled when it began waiting
            self.signal_in_progress(outcome, None if leaves else countdown)
        error = self.key_error(
            DuplicateInProgress,
            f"is being run by task {outcome.task_id} (lease {outcome.lease_left:.1f} s left); "
            f"this duplicate did not run the body",
        )
        if leaves:
            raise error
        self.defer(countdown, error, DEFERRAL_NOTE)

    def mismatch(self, outcome: ClaimOutcome) -> NoReturn:
        """The key was used with other arguments: refuse, run nothing."""
        self.log.warning(
            "used before by task %s with other arguments; nothing run", outcome.task_id
        )
        self.signal(signals.key_mismatch, original_task_id=outcome.task_id)
        raise self.error(
            IdempotencyKeyMismatch,
            f"idempotency key {self.key!r} of task {self.task.name!r} was used by task "
            f"{outcome.task_id} with other arguments; nothing was run. Use a new key for "
            f"a new request, or send the same arguments to get the first result.",
        )

    def quarantined(self, outcome: ClaimOutcome) -> NoReturn:
        """Refuse a key taken over too often: its message may be what kills workers."""
        cap = self.settings.max_takeovers
        if outcome.quarantined_now:
            self.log.error(
                "quarantined after %d takeovers without completing (idem_max_takeovers=%d); "
                "the body did not run", outcome.takeovers, cap,
            )  # fmt: skip
            self.signal(signals.quarantined, takeovers=outcome.takeovers, fence=outcome.fence)
        raise self.key_error(
            KeyQuarantined,
            f"is quarantined: it was taken over {outcome.takeovers} times without completing "
            f"(idem_max_takeovers={cap}), so its message may be killing workers (OOM, a "
            f"crash, a hard time limit). Nothing runs for it until an operator releases it: "
            f"celery -A <app> idem forget --task {self.task.name} {shlex.quote(self.key)}",
        )

    # -- a completed key -----------------------------------------------------------------

    def replay(self, outcome: ClaimOutcome) -> Any:
        """Answer with the stored outcome: the value, the cached error, or why there is none."""
        stored = outcome.stored
        assert stored is not None  # COMPLETED always carries it
        request = self.request
        if outcome.task_id == self.task_id:
            if outcome.continuation_pending and stored.kind is RecordKind.RESULT:
                # A redelivery of the very message that completed, whose worker died
                # before Celery sent its callbacks and chain: they go out now, with the
                # stored value, and are then marked sent (``on_success``).
                request.idem_owed = self
            else:
                # That run sent them (or had none): this one must not send them again.
                request.callbacks = None
                request.chain = None
                request.errbacks = None
        self.set_fence(outcome.fence)
        self.log.debug("replaying the outcome of task %s", outcome.task_id)
        self.signal(signals.replayed, original_task_id=outcome.task_id, fence=outcome.fence)
        return self.stored_value(stored, outcome.task_id)

    def stored_value(self, stored: Stored, ran_as: str) -> Any:
        """The stored result; or raise the cached failure, or why there is no result."""
        if stored.kind is RecordKind.RESULT:
            try:
                return codec.decode_result(stored, self.spec.accept)
            except codec.DECODE_ERRORS as exc:
                raise self.error(
                    IdempotencyError,
                    f"the stored result of task {self.task.name!r} key {self.key!r} cannot be "
                    f"decoded with the content types this app accepts ({exc}); the body was "
                    f"not run. Forget the key if the record is not yours.",
                ) from exc
        if stored.kind is RecordKind.ERROR:
            error, described = codec.decode_error(stored, self.settings.cache_errors)
            if error is not None:
                raise error
            why = "that failure is cached but its class is no longer in idem_cache_errors"
            raise self.key_error(IdempotencyError, f"failed before with {described}; {why}")
        reason = codec.no_result_reason(stored)
        raise self.key_error(
            ResultNotStored,
            f"already ran (task {ran_as}) but its result was not stored: {reason}. The body "
            f"will not run again; forget the key to run it anew.",
        )

    # -- a claimed key -------------------------------------------------------------------

    def run(self, outcome: ClaimOutcome) -> Any:
        """Run the body under a renewed lease, then complete, park or release the key."""
        self.set_fence(outcome.fence)
        if outcome.took_over:
            self.log.warning("took over a key whose lease ran out")
        self.hold_lease()
        self.finished_steps = outcome.steps
        try:
            retval = self.task.run(*self.args, **self.kwargs)
        except Retry as exc:
            self.end_lease()
            if self.committed is None:  # else completed: the retry replays the result
                self.park(exc)
            raise
        except BaseException as exc:
            self.end_lease()
            if self.committed is not None:
                self.raised_after_commit(exc)
            elif not self.handed_over:  # self.replace() gave the key to its replacement
                # Any other failure (Ignore and Reject included) frees the key: nothing
                # was completed, and a requeued message must be able to claim again.
                self.failed(exc)
            raise
        self.finished_steps = None
        if self.committed is not None:
            self.end_lease()
            return self.after_commit(retval)
        sent = getattr(self.request, "idem_retry_sent", None)
        retry = retval if isinstance(retval, Retry) else sent
        if isinstance(retry, Retry):
            # ``self.retry(..., throw=False)``, returned or not: the retry was sent (or,
            # returned eagerly, is applied next) under this task id, and must find the
            # key parked for it; this run's own value is not the key's outcome.
            self.end_lease()
            self.park(retry)
            return retval
        return self.returned(retval, self.complete(retval))

    def hold_lease(self) -> Lease:
        """Keep this attempt's claim alive from the renewal thread until :meth:`end_lease`.

        Called when the body starts, and again by an ``idem_atomic()`` block whose
        transaction failed after it stopped the renewals (see ``fenced.py``).
        """
        self.lease = renewer.add(
            Lease(
                self.spec.store,
                self.storage,
                self.token,
                self.settings.lease,
                lambda _lease: self.report_lost("renew"),
                describe=f"{self.task.name}[{self.task_id}] key={self.key!r}",
            )
        )
        return self.lease

    def end_lease(self) -> None:
        """Stop renewing this attempt's claim (its outcome is decided); safe to repeat."""
        if self.lease is not None:
            renewer.remove(self.lease)

    def returned(self, retval: Any, stored: Stored) -> Any:
        """What the run returns once ``stored`` completed the key with ``retval``.

        Eagerly, the value after the result serializer, not the raw one: what a
        duplicate gets, and what a worker's caller gets through the result backend.
        """
        if self.request.is_eager and stored.kind is RecordKind.RESULT:
            return codec.decode_result(stored, self.spec.accept)
        return retval

    def committed_in_transaction(self, stored: Stored, value: Any, continuation: bool) -> None:
        """An ``idem_atomic()`` block committed ``stored`` (``value`` encoded) for the key.

        From here the key is completed by this attempt: the body's later outcome is
        not written again, and callbacks owed by ``continuation`` are marked sent by
        ``on_success`` exactly as after a normal completion.
        """
        self.committed, self.committed_value = stored, value
        self.request.idem_owed = self if continuation else None
        self.end_lease()

    def after_commit(self, retval: Any) -> Any:
        """The body returned after its ``idem_atomic()`` block committed: ``done.result``.

        The first caller gets what every duplicate gets. A body that returns something
        else (not None) is told in the log: its value is not the key's result.
        """
        value = self.committed_value
        if retval is not None and retval is not value:
            try:
                same = bool(retval == value)
            except Exception:  # an __eq__ that cannot compare: "not the same"
                same = False
            if not same:
                self.log.warning(
                    "the body returned %.200r after its idem_atomic() block committed "
                    "done.result = %.200r: the key's result is done.result, and this run "
                    "returns it too (return done.result to silence this)", retval, value,
                )  # fmt: skip
        assert self.committed is not None
        return self.returned(value, self.committed)

    def raised_after_commit(self, exc: BaseException) -> None:
        """The body raised after its ``idem_atomic()`` block committed the key's result.

        Nothing is released or stored: the key stays completed with ``done.result``
        (its database effects are committed), and duplicates replay that. This run
        fails with ``exc`` all the same.
        """
        self.log.warning(
            "the body raised %s after its idem_atomic() block committed: the key stays "
            "completed with done.result, which duplicates get", type(exc).__name__,
        )  # fmt: skip

    def report_lost(self, stage: str) -> None:
        """Another attempt took the key over: tell once (log, signal)."""
        if self.lost:  # the renewer already told: one loss, one warning, one signal
            return
        self.lost = True
        self.log.warning(
            "lease lost (%s): another attempt took the key over; this run's outcome is not "
            "stored", stage,
        )  # fmt: skip
        self.signal(signals.lease_lost, fence=self.fence, stage=stage)

    def store_failed(self, exc: IdempotencyError, stage: str) -> None:
        """A write after the body failed: the task's own outcome wins; tell (log, signal).

        The store's error names only the hashed record; the signal's receivers get one
        of the same type naming this execution's key and task, caused by it.
        """
        self.log.error("could not %s the record: %s", stage, exc)
        error = self.stage_error(type(exc), stage, exc)
        error.__cause__ = exc
        self.signal(signals.store_error, exc=error, stage=stage, policy=None)

    def park(self, exc: Retry) -> None:
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
            hold = min(countdown + self.settings.lease, MAX_DURATION)
            self.spec.store.park(self.storage, token=self.token, hold=hold)
        except IdempotencyError as store_exc:  # the task's own retry wins
            self.store_failed(store_exc, "park")

    def failed(self, exc: BaseException) -> None:
        """Release the key, or store the failure when its type is in ``idem_cache_errors``."""
        cache = self.settings.cache_errors
        try:
            if cache and isinstance(exc, cache):
                self.store_outcome(codec.encode_error(exc))
            else:
                self.spec.store.release(self.storage, token=self.token)
        except IdempotencyError as store_exc:  # the task's own exception wins
            self.store_failed(store_exc, "release")

    def encoded(self, retval: Any) -> Stored:
        """``retval`` as a completion of this task stores it (result serializer, size cap).

        Raises:
            kombu.exceptions.EncodeError: It cannot be serialized.
            celery_idem.codec.ResultTooLarge: Over ``idem_max_result_bytes``.
        """
        return codec.encode_result(retval, self.spec.serializer, self.settings.max_result_bytes)

    def owes_continuation(self, stored: Stored) -> bool:
        """Whether completing with ``stored`` leaves callbacks or a chain to send.

        Celery's tracer sends them after the body returns; until they are confirmed sent
        (``on_success``), a redelivery sends them.
        """
        request = self.request
        return (
            stored.kind is RecordKind.RESULT
            and not request.is_eager
            and bool(request.callbacks or request.chain)
        )

    def complete(self, retval: Any) -> Stored:
        """Store the result (or why there is none); returns what was stored."""
        request = self.request
        try:
            stored = self.encoded(retval)
        except codec.ENCODE_ERRORS as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self.log.error(
                "result not stored (%s); the key is completed without it and will not run "
                "again", reason,
            )  # fmt: skip
            self.signal(signals.result_not_stored, reason=reason)
            stored = codec.encode_no_result(reason)
        continuation = self.owes_continuation(stored)
        outcome = self.complete_request(stored, continuation)
        if self.in_background(continuation) and self.send_completion(outcome):
            return stored
        self.end_lease()
        try:
            if self.trying_hard(lambda: self.store_completion(outcome)):
                request.idem_owed = self if continuation else None
        except IdempotencyError as exc:  # unreachable, or refused for good: the result stands
            self.store_failed(exc, "complete")
        return stored

    def trying_hard(self, write: Callable[[], T]) -> T:
        """``write()``, again after each pause of :data:`COMPLETE_RETRIES` while Redis fails.

        For the writes after a side effect happened (a completion, a durable step): a
        short outage must not cost a re-run. The last failure is raised.
        """
        for pause in COMPLETE_RETRIES:
            try:
                return write()
            except StoreUnavailable:
                time.sleep(pause)
        return write()

    def in_background(self, continuation: bool) -> bool:
        """Whether the completion is sent without waiting for its answer.

        Not when the answer decides something before the task returns: the run's
        callbacks and chain are marked owed by it, eager mode returns the stored value,
        ``idem_min_replicas`` counts the replicas it reached; nor with
        ``idem_blocking_completion``.
        """
        endpoint = self.settings.endpoint
        return not (
            continuation
            or self.lease is None
            or self.request.is_eager
            or self.settings.blocking_completion
            or (endpoint is not None and endpoint.min_replicas)
        )

    def send_completion(self, outcome: CompleteRequest) -> bool:
        """Send the completion and leave its answer to the renewer (``complete_later``).

        False when it could not be sent: the caller completes the blocking way, with
        its retries. The lease stays held (and renewed) until the answer is read.
        """
        lease, store = self.lease, self.spec.store
        assert lease is not None
        renewer.body_ended(lease)
        completion = Completion(
            None,
            resend=lambda: store.complete(outcome),
            on_lost=lambda: self.report_lost("complete"),
            on_failed=lambda exc: self.store_failed(exc, "complete"),
        )
        with completion.lock:
            # From here the renewal thread settles this completion instead of renewing
            # the lease (a renewal answered after it would look like a lost lease), and
            # waits for the send to finish before it reads anything.
            lease.completion = completion
            try:
                completion.pending = store.send_completion(outcome)
            except StoreUnavailable:
                lease.completion = None
                return False
            except IdempotencyError as exc:  # refused for good: the result still stands
                completion.done = True
                renewer.remove(lease)
                self.store_failed(exc, "complete")
                return True
        renewer.complete_later(lease, completion)
        return True

    def complete_request(self, stored: Stored, continuation: bool = False) -> CompleteRequest:
        """What completing the key with ``stored`` asks the store, fenced by this run."""
        return CompleteRequest(
            self.storage,
            token=self.token,
            fence=self.fence,
            task_id=self.task_id,
            stored=stored,
            ttl=self.settings.ttl,
            continuation=continuation,
        )

    def store_outcome(self, stored: Stored) -> bool:
        """Complete the key with ``stored``, waiting for the answer; False if lost."""
        return self.store_completion(self.complete_request(stored))

    def store_completion(self, outcome: CompleteRequest) -> bool:
        """Send ``outcome`` and wait for its answer; False (told) when the key was lost."""
        owned = self.spec.store.complete(outcome)
        if not owned:
            self.report_lost("complete")
        return owned

    def dispatched(self) -> None:
        """Mark the completed record: this run's callbacks and chain were sent."""
        try:
            self.spec.store.dispatched(self.storage, task_id=self.task_id)
        except IdempotencyError as exc:  # a redelivery may send them again: never lost
            self.store_failed(exc, "mark dispatched")


class QuietDeferrals(logging.Filter):
    """Leave out Celery's INFO "retry" line of a duplicate's deferral.

    :meth:`Execution.signal_in_progress` already logged that look (INFO the first
    time, DEBUG after); Celery's line would repeat it at INFO on every look. Installed
    on Celery's ``celery.app.trace`` logger when this module is imported; every other
    retry line passes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """False for the line of a deferral that :data:`DEFERRAL_NOTE` marks."""
        args = record.args
        return not (
            isinstance(args, Mapping) and str(args.get("exc", "")).startswith(DEFERRAL_NOTE)
        )


logging.getLogger("celery.app.trace").addFilter(QuietDeferrals())
