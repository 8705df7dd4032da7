"""Durable steps: ``self.step(name, fn, ...)`` runs each finished step of a key once.

A claimed :class:`~celery_idem.task.execution.Execution` gets, in its claim's reply, the
steps earlier attempts of its key finished (a retry, a redelivery, a takeover) and
keeps a :class:`Steps` on Celery's request for the body. The body's n-th ``step()``
call either replays the n-th stored step (same name and occurrence, or the code
changed under a live key: refused), or runs ``fn`` and stores its value with one
fenced script (``lua/step.lua``) before returning it. So a crash re-runs at most the
one step that was running, never a finished one.

A step's value is serialized as a result is (the app's ``result_serializer``, under
``idem_max_result_bytes``) and the body gets back the decoded value on its first run as
on a replay, so code after a step sees the same thing either way.

``step(name, fn, atomic=conn)`` (the PostgreSQL store) runs ``fn`` in a transaction on
``conn`` and writes the step's record in that same transaction (``fenced.py``): the
step's database writes and its stored value commit together, with no window between.
On celery-idem's in-memory test store, the record goes to that store just before the
commit instead (``standin.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from celery_idem import codec, signals
from celery_idem.exceptions import (
    IdempotencyConfigError,
    IdempotencyError,
    LeaseLost,
    ResultNotStored,
    StoreUnavailable,
)
from celery_idem.renewer import renewer
from celery_idem.store import StepRecord, StepRequest, Stored
from celery_idem.store.record import RecordKind, step_label
from celery_idem.task.execution import Execution
from celery_idem.task.fenced import (
    encoded,
    fenced,
    plain_transaction,
    require_postgres,
    statements,
    target,
)
from celery_idem.task.standin import stands_in_for
from celery_idem.task.transactions import Target, target_for

__all__ = ["AtomicTarget", "Steps", "step_connection", "unrecorded_step"]

T = TypeVar("T")

AtomicTarget = Any
"""What ``step(..., atomic=...)`` takes: ``True`` (Django's default database), a Django
alias, or a psycopg 3 ``Connection`` or SQLAlchemy ``Connection``/``Session``."""


def step_connection(atomic: AtomicTarget) -> tuple[Any, str | None]:
    """``step(atomic=...)`` as ``(conn, using)`` for :func:`~celery_idem.task.fenced.target`.

    ``True`` is Django's default database, a str one of its aliases, anything else a
    connection.
    """
    if atomic is True:
        return None, "default"
    if isinstance(atomic, str):
        return None, atomic
    return atomic, None


def unrecorded_step(task: Any, atomic: AtomicTarget, call: Callable[[], T]) -> T:
    """``step(atomic=...)`` where no claimed execution runs: ``fn`` in a transaction.

    A plain call ``task(x)``, or a store down under ``idem_on_store_error='run'``: there
    is no record to write (``step()`` just calls ``fn`` there), but ``fn``'s writes
    still commit together, as the caller asked.
    """

    def refuse(text: str) -> IdempotencyError:
        return IdempotencyConfigError(
            f"task {task.name!r}: self.step(..., atomic=...) {text}", None, task.name
        )

    conn, using = step_connection(atomic)
    on = target_for(conn, using, refuse, any_vendor=stands_in_for(task))  # a test's SQLite
    with plain_transaction(on, refuse):
        return call()


class Steps:
    """The durable steps of one claimed execution, kept on its request for ``self.step``.

    Args:
        execution: The execution that claimed the key.
        finished: The steps earlier attempts of the key finished, in run order (the
            claim's :attr:`~celery_idem.store.ClaimOutcome.steps`).
    """

    def __init__(self, execution: Execution, finished: tuple[StepRecord, ...]) -> None:
        self.execution = execution
        self.finished = finished
        self.position = 0
        """``step()`` calls so far in this run, replayed ones included."""
        self.occurrences: dict[str, int] = {}
        self.current_key: str | None = None
        """The running step's downstream key (``self.step_key``), None between steps."""

    def run(
        self,
        name: str,
        fn: Callable[..., Any],
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        atomic: AtomicTarget = None,
    ) -> Any:
        """Replay step ``name`` if an earlier attempt finished it, else run and store it.

        With ``atomic`` (not None or False), ``fn`` runs in a transaction on that
        connection and the step is recorded in the same transaction (``atomic.py``).
        """
        execution = self.execution
        if not isinstance(name, str) or not name:
            raise execution.key_error(
                IdempotencyError,
                f"called self.step() with the name {name!r}: a step needs a non-empty str "
                f"name, the same on every attempt (it is how a retry finds the step)",
            )
        if not callable(fn):
            raise execution.key_error(
                IdempotencyError, f"called self.step({name!r}, ...) with {fn!r}, not a callable"
            )
        if self.current_key is not None:
            raise execution.key_error(
                IdempotencyError,
                f"called self.step({name!r}, ...) inside step {self.current_key!r}: steps "
                f"do not nest (an inner step would be stored before the outer one "
                f"finished); make them consecutive steps of the task",
            )
        self.check_place(name)
        on = None if atomic is None or atomic is False else self.atomic_target(name, atomic)
        occurrence = self.occurrences[name] = self.occurrences.get(name, 0) + 1
        self.position += 1
        label = step_label(name, occurrence)
        if self.position <= len(self.finished):
            return self.replay(self.finished[self.position - 1], name, occurrence, label)
        self.check_lease(label)
        self.current_key = f"{execution.key}/{label}"
        try:
            if on is not None:
                return self.run_atomic(on, name, occurrence, label, lambda: fn(*args, **kwargs))
            value = fn(*args, **kwargs)
        except BaseException:
            # Nothing is stored, so the step takes no place: a body that catches this
            # and goes on stores its next step where this one would have been.
            self.position -= 1
            self.occurrences[name] = occurrence - 1
            raise
        finally:
            self.current_key = None
        return self.keep(name, occurrence, label, value)

    def check_place(self, name: str) -> None:
        """Refuse a step where its record could not stand: in or after ``idem_atomic()``."""
        execution = self.execution
        if execution.atomic_open:
            raise execution.key_error(
                IdempotencyError,
                f"called self.step({name!r}, ...) inside an idem_atomic() block: a step's "
                f"record commits on its own and the block's writes may still roll back, "
                f"so a retry would replay a step whose writes are gone. Call steps before "
                f"the block, or make this work part of the block",
            )
        if execution.committed is not None:
            raise execution.key_error(
                IdempotencyError,
                f"called self.step({name!r}, ...) after its idem_atomic() block committed "
                f"the key's completion: a completed key records no more steps. Call steps "
                f"before the block",
            )

    def atomic_target(self, name: str, atomic: AtomicTarget) -> Target:
        """The connection of ``step(name, fn, atomic=...)``, checked before anything runs."""
        execution, what = self.execution, f"self.step({name!r}, atomic=...)"
        require_postgres(execution, what)
        statements(execution, what)
        conn, using = step_connection(atomic)
        return target(execution, conn, using, what)

    def run_atomic(
        self, on: Target, name: str, occurrence: int, label: str, call: Callable[[], Any]
    ) -> Any:
        """Run a step's function and record its value in one transaction on ``on``.

        A lost lease rolls the function's writes back with the record; a value that
        cannot be encoded rolls them back too (nothing is recorded as done).
        """
        execution = self.execution
        what = f"self.step({name!r}, atomic=...)"
        with fenced(execution, on, what) as tx:
            value = call()
            stored = encoded(execution, value, f"the value of step {label!r}")
            request = self.step_request(name, occurrence, stored.codec, stored.payload)
            if not tx.record_step(request):
                raise self.lost(label, "be stored", rolled_back=True)
        return codec.decode_result(stored, execution.spec.accept)

    def replay(self, stored: StepRecord, name: str, occurrence: int, label: str) -> Any:
        """The value an earlier attempt stored for this step; ``fn`` is not called."""
        execution = self.execution
        if stored.name != name or stored.occurrence != occurrence:
            raise execution.key_error(
                IdempotencyError,
                f"asked for step {label!r} as step {self.position} of the run, but an "
                f"earlier attempt of this key finished step {stored.label!r} there: the "
                f"task's steps changed under a live key (steps are matched by name and "
                f"order). Nothing was run. Forget the key (celery -A <app> idem forget "
                f"--task {execution.task.name} KEY) or let it expire (idem_ttl)",
            )
        if not stored.kept:
            raise self.not_stored(label, stored.value.decode("utf-8", "replace"), earlier=True)
        try:
            value = codec.decode_result(
                Stored(RecordKind.RESULT, stored.value, stored.codec), execution.spec.accept
            )
        except codec.DECODE_ERRORS as exc:
            raise execution.key_error(
                IdempotencyError,
                f"has a stored value for step {label!r} that cannot be decoded with the "
                f"content types this app accepts ({exc}); the step was not run again. Forget "
                f"the key if the record is not yours",
            ) from exc
        execution.log.debug("step %r replayed (stored by an earlier attempt)", label)
        execution.signal(
            signals.step_replayed, step=name, occurrence=occurrence, fence=execution.fence
        )
        return value

    def check_lease(self, label: str) -> None:
        """Before a step's side effect: stop here if this attempt lost its key.

        Free while the renewals keep up (a local check). When a whole lease passed
        without one (this process was paused, or its renewal thread starved), the key
        may be another attempt's by now: one renewal, in the body's thread, settles it.
        """
        execution, lease = self.execution, self.execution.lease
        if lease is None or not renewer.may_have_lapsed(lease):
            return
        owned = not lease.lost
        if owned:
            started = renewer.clock()
            try:
                owned = execution.spec.store.renew(
                    execution.storage, token=execution.token, lease=execution.settings.lease
                )
            except StoreUnavailable:
                return  # unknown: storing the step decides (and retries)
            if owned:
                renewer.confirm(lease, started)
                return
        raise self.lost(label, "run")

    def lost(self, label: str, what: str, *, rolled_back: bool = False) -> LeaseLost:
        """This attempt no longer owns its key: tell once, and stop the body here."""
        execution = self.execution
        execution.report_lost("step")
        after = (
            "Its transaction was rolled back, the step's writes with it"
            if rolled_back
            else "Pass self.step_key downstream so a step run twice is still applied once"
        )
        return execution.key_error(
            LeaseLost,
            f"lost its lease before step {label!r} could {what}: another attempt took the "
            f"key over (this one stalled past idem_lease). This run stops here and the step "
            f"is not recorded; the new owner decides. {after}",
        )

    def keep(self, name: str, occurrence: int, label: str, value: Any) -> Any:
        """Store a finished step, fenced by this attempt's token; return its value decoded."""
        execution = self.execution
        settings, spec = execution.settings, execution.spec
        reason = None
        try:
            stored = codec.encode_result(value, spec.serializer, settings.max_result_bytes)
            tag, payload = stored.codec, stored.payload
        except codec.ENCODE_ERRORS as exc:
            # Its side effect happened: the step is recorded as done, without a value.
            reason = f"{type(exc).__name__}: {exc}"
            tag, payload = "", reason.encode()
        owned = self.store(self.step_request(name, occurrence, tag, payload), label)
        if not owned:
            raise self.lost(label, "be stored")
        if reason is not None:
            execution.signal(signals.result_not_stored, reason=f"step {label!r}: {reason}")
            raise self.not_stored(label, reason, earlier=False)
        return codec.decode_result(stored, spec.accept)

    def step_request(self, name: str, occurrence: int, tag: str, payload: bytes) -> StepRequest:
        """What recording the running step asks the store, fenced by this attempt."""
        execution = self.execution
        return StepRequest(
            execution.storage,
            token=execution.token,
            position=self.position,
            name=name,
            occurrence=occurrence,
            codec=tag,
            value=payload,
        )

    def store(self, request: StepRequest, label: str) -> bool:
        """Send the step to the store, trying hard (a few short pauses) when Redis fails.

        Raises:
            StoreUnavailable: Still unreachable after the pauses: the step ran but is not
                recorded, so the task fails rather than run on past an unrecorded step.
        """
        execution = self.execution
        stage = f"record step {label!r} of"
        try:
            return execution.trying_hard(lambda: execution.spec.store.step(request))
        except StoreUnavailable as exc:
            # The step ran and is not recorded: a later attempt runs it again.
            error = execution.stage_error(StoreUnavailable, stage, exc)
            execution.log.error("step %r ran but is not recorded: %s", label, error)
            execution.signal(signals.store_error, exc=error, stage="step", policy=None)
            raise error from exc
        except IdempotencyError as exc:  # refused for good
            raise execution.stage_error(IdempotencyError, stage, exc) from exc

    def not_stored(self, label: str, reason: str, *, earlier: bool) -> ResultNotStored:
        """The step ran, but its value could not be kept: the task fails, now and later."""
        who = "an earlier attempt ran it" if earlier else "it ran"
        return self.execution.key_error(
            ResultNotStored,
            f"step {label!r}: {who} but its value could not be stored ({reason}). The step "
            f"will not run again, so the task cannot go past it; make the step return "
            f"something small and serializable (an id), then forget the key to run the "
            f"task anew",
        )
