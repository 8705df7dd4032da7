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
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from celery_idem import codec, signals
from celery_idem.exceptions import (
    IdempotencyError,
    LeaseLost,
    ResultNotStored,
    StoreUnavailable,
)
from celery_idem.store import StepRecord, StepRequest, Stored
from celery_idem.store.record import RecordKind
from celery_idem.task.execution import COMPLETE_RETRIES, Execution

__all__ = ["Steps", "step_label"]


def step_label(name: str, occurrence: int) -> str:
    """How messages and downstream keys name a step: ``name``, or ``name#n`` for n >= 2."""
    return name if occurrence == 1 else f"{name}#{occurrence}"


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
        self, name: str, fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> Any:
        """Replay step ``name`` if an earlier attempt finished it, else run and store it."""
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
        occurrence = self.occurrences[name] = self.occurrences.get(name, 0) + 1
        self.position += 1
        if self.position <= len(self.finished):
            return self.replay(self.finished[self.position - 1], name, occurrence)
        self.current_key = f"{execution.key}/{step_label(name, occurrence)}"
        try:
            value = fn(*args, **kwargs)
        finally:
            self.current_key = None
        return self.keep(name, occurrence, value)

    def replay(self, stored: StepRecord, name: str, occurrence: int) -> Any:
        """The value an earlier attempt stored for this step; ``fn`` is not called."""
        execution = self.execution
        label = step_label(name, occurrence)
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

    def keep(self, name: str, occurrence: int, value: Any) -> Any:
        """Store a finished step, fenced by this attempt's token; return its value decoded."""
        execution = self.execution
        settings, spec = execution.settings, execution.spec
        label = step_label(name, occurrence)
        reason = None
        try:
            stored = codec.encode_result(value, spec.serializer, settings.max_result_bytes)
            tag, payload = stored.codec, stored.payload
        except codec.ENCODE_ERRORS as exc:
            # Its side effect happened: the step is recorded as done, without a value.
            reason = f"{type(exc).__name__}: {exc}"
            tag, payload = "", reason.encode()
        request = StepRequest(
            execution.storage,
            token=execution.token,
            position=self.position,
            name=name,
            occurrence=occurrence,
            codec=tag,
            value=payload,
        )
        owned = self.store(request, label)
        if not owned:
            execution.report_lost("step")
            raise execution.key_error(
                LeaseLost,
                f"lost its lease before step {label!r} could be stored: another attempt "
                f"took the key over (this one stalled past idem_lease). This run stops "
                f"here and the step is not recorded; the new owner decides. Pass "
                f"self.step_key downstream so a step run twice is still applied once",
            )
        if reason is not None:
            execution.signal(signals.result_not_stored, reason=f"step {label!r}: {reason}")
            raise self.not_stored(label, reason, earlier=False)
        return codec.decode_result(stored, spec.accept)

    def store(self, request: StepRequest, label: str) -> bool:
        """Send the step to the store, trying hard (a few short pauses) when Redis fails.

        Raises:
            StoreUnavailable: Still unreachable after the pauses: the step ran but is not
                recorded, so the task fails rather than run on past an unrecorded step.
        """
        execution = self.execution
        for pause in (*COMPLETE_RETRIES, None):
            try:
                return execution.spec.store.step(request)
            except StoreUnavailable as exc:
                if pause is None:
                    raise execution.stage_error(
                        StoreUnavailable, f"record step {label!r} of", exc
                    ) from exc
                time.sleep(pause)
            except IdempotencyError as exc:  # refused for good
                raise execution.stage_error(
                    IdempotencyError, f"record step {label!r} of", exc
                ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

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
