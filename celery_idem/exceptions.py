"""The exception hierarchy: one root, every error names its key and task.

Celery's result backend rebuilds a task's exception on the client from ``exc.args``
(``exception_to_python``), so each class keeps ``(message, key, task_name)`` as its
positional args and prints only the message. That way a caller of
``AsyncResult.get()`` receives the same type, with the same text, that the worker raised.

``.key`` is the user's key as given (a key refused as invalid is kept as it was passed,
whatever its type), or the execution's effective key on a worker; ``None`` where there is
no key. Only the store's own methods (``Store``, ``StoreAdmin``), which know records and
not keys, name the record's storage name instead; a task wraps their errors before they
reach its caller or a signal. ``repr()`` shows the message and a bounded form of the key,
so a log line stays short even when the key was a payload.
"""

from __future__ import annotations

__all__ = [
    "DuplicateInProgress",
    "IdempotencyConfigError",
    "IdempotencyError",
    "IdempotencyKeyMismatch",
    "InvalidIdempotencyKey",
    "KeyQuarantined",
    "LeaseLost",
    "MisplacedCallOption",
    "ReplicasNotReached",
    "ResultNotStored",
    "StoreUnavailable",
    "UnencodableArgument",
]


_REPR_LIMIT = 80


class IdempotencyError(Exception):
    """Root of every error celery-idem raises.

    Args:
        message: What happened and what to do about it.
        key: The idempotency key concerned, as the user gave it (``None`` where no key
            exists yet, as for a configuration error).
        task_name: The Celery task concerned, when known.
    """

    key: str | None

    def __init__(self, message: str, key: str | None = None, task_name: str | None = None) -> None:
        super().__init__(message, key, task_name)
        self.message = message
        self.key = key
        self.task_name = task_name

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        # Celery logs a failure with repr(exc): a 10 MB key refused as too long must
        # not become a 10 MB log line.
        key = repr(self.key)
        if len(key) > _REPR_LIMIT:
            key = key[:_REPR_LIMIT] + "..."
        return f"{type(self).__name__}({self.message!r}, key={key}, task_name={self.task_name!r})"


class IdempotencyConfigError(IdempotencyError):
    """A setting has an invalid value; the message names the setting."""


class InvalidIdempotencyKey(IdempotencyError, ValueError):
    """The key is empty, not a string, or longer than the limit.

    ``.key`` is the value as it was given (``''``, ``5``, the over-long string), or
    ``None`` when there was none.
    """

    key: object  # type: ignore[assignment]  # what was given, which may be no str at all

    def __init__(self, message: str, key: object = None, task_name: str | None = None) -> None:
        super().__init__(message, None, task_name)
        self.key = key
        self.args = (message, key, task_name)


class UnencodableArgument(InvalidIdempotencyKey, TypeError):
    """An argument has no canonical encoding, so no key can be derived from it."""


class MisplacedCallOption(IdempotencyError, TypeError):
    """A call option (``idempotency_key``, ``idem_ttl``, ...) was given as a task argument.

    ``task.delay(x, idempotency_key=K)`` passes ``idempotency_key`` to the task itself;
    on a task without such a parameter that was Celery's "unexpected keyword argument"
    ``TypeError``. This is a ``TypeError`` still, so ``except TypeError`` keeps working,
    and it says where the option goes: ``apply_async(..., idempotency_key=K)`` or
    ``.set(idempotency_key=K)``. Raised before anything is sent.
    """


class IdempotencyKeyMismatch(IdempotencyError):
    """The key was used before with other arguments; nothing was run."""


class DuplicateInProgress(IdempotencyError):
    """Another run holds the key right now (policy ``raise``)."""


class StoreUnavailable(IdempotencyError):
    """The idempotency store could not be reached."""


class ReplicasNotReached(StoreUnavailable):
    """``idem_min_replicas`` replicas did not confirm a claim or a completion in time.

    The primary has the write but a failover could lose it, so it does not count: a
    claim is released and its body not run; a completion is retried and reported.
    """


class LeaseLost(IdempotencyError):
    """This attempt no longer owns its key: its lease ran out and another attempt took over.

    Raised by ``self.step()`` when the step's value cannot be stored because the key
    was taken over (the worker stalled past its lease: a long GC pause, a stopped
    process, a partition). The new owner's steps win; this attempt stops at its step
    boundary instead of running on beside it. Nothing of this attempt's step is kept.

    Raised by ``self.idem_atomic()`` (and ``step(..., atomic=...)``) when the completion
    (the step) written in the body's transaction matched no row: the whole transaction
    was rolled back, so none of that attempt's writes in it were committed.
    """


class ResultNotStored(IdempotencyError):
    """The key completed, but its result could not be kept (too big or unserializable).

    The body is not run again, because its side effect already happened.
    """


class KeyQuarantined(IdempotencyError):
    """The key was taken over ``idem_max_takeovers`` times without ever completing.

    Each takeover means the attempt holding the key stopped renewing its lease: its
    worker died (OOM, a segfault, a hard time limit) or stalled. A message that kills
    every worker it reaches would do so forever; quarantine stops it. Nothing runs for
    the key until an operator releases it with ``celery idem forget``.
    """
