"""The store contract: what a claim can answer, and the operations every store offers.

Pure: imports neither celery nor redis. ``RedisStore`` and ``MemoryStore`` implement
:class:`Store`; ``tests/contract`` runs one suite against both, so the two cannot drift.

Every write after the claim is a compare-and-set on the owner *token* (random per
attempt). The *fence* is a per-key number that grows on every claim and survives a
release, so downstream systems can refuse a stale writer with it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "ClaimOutcome",
    "ClaimState",
    "RecordKind",
    "Store",
    "Stored",
    "StoredRecord",
]


class ClaimState(enum.Enum):
    """What one atomic claim-or-read found."""

    CLAIMED = 1
    """The caller now owns the key (fresh, released, expired lease, or its parked retry)."""
    COMPLETED = 2
    """A run finished; the record holds its result (or why it has none)."""
    IN_PROGRESS = 3
    """Another live attempt owns the key."""
    MISMATCH = 4
    """The key is known with another arguments fingerprint; nothing changed."""


class RecordKind(enum.Enum):
    """How a completed record ends. The value is the one-byte tag kept in the store."""

    RESULT = "C"
    """The result is stored and is replayed to duplicates."""
    ERROR = "E"
    """A failure listed in ``idem_cache_errors`` is stored and re-raised to duplicates."""
    NO_RESULT = "X"
    """The body ran but its result could not be kept; the payload says why."""


@dataclass(frozen=True, slots=True)
class Stored:
    """A completed record's payload as the store keeps it (opaque bytes plus codec tag)."""

    kind: RecordKind
    payload: bytes
    codec: str


@dataclass(frozen=True, slots=True)
class ClaimOutcome:
    """The answer of :meth:`Store.claim`.

    Attributes:
        state: What was found.
        fence: The key's fence number (the new one when ``CLAIMED``).
        task_id: The task id of the owner, or of the run that completed the key.
        lease_left: Seconds of lease left for ``IN_PROGRESS`` (0.0 otherwise).
        stored: The completed payload for ``COMPLETED``.
        took_over: ``CLAIMED`` from an attempt whose lease ran out (not a fresh key).
    """

    state: ClaimState
    fence: int
    task_id: str = ""
    lease_left: float = 0.0
    stored: Stored | None = None
    took_over: bool = False


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """Everything a record holds, for operators (``inspect``) and tests."""

    state: str
    fence: int
    task_id: str
    fingerprint: str
    lease_left: float | None
    ttl: float | None
    stored: Stored | None


class Store(Protocol):
    """Operations on one idempotency record, each atomic.

    Times are seconds (floats); a store converts them to its own clock (Redis: ``TIME``
    on the server, so workers with skewed clocks agree).
    """

    def claim(
        self, key: str, *, token: str, task_id: str, fingerprint: str, lease: float, ttl: float
    ) -> ClaimOutcome:
        """Claim ``key`` for this attempt, or report what holds it.

        Claims when the key is absent or released, when the owner's lease has run out
        (take-over), or when the owner parked it for a retry of this same ``task_id``
        (whatever the fingerprint: a retry may change its arguments). The new fence is
        one more than the last, and at least the store's clock in ms, so it only grows,
        even after the record expired. The record lives ``ttl + lease``.
        """
        ...

    def renew(self, key: str, *, token: str, lease: float) -> bool:
        """Push the lease deadline to now + ``lease``; False when ``token`` no longer owns."""
        ...

    def complete(
        self, key: str, *, token: str, fence: int, task_id: str, stored: Stored, ttl: float
    ) -> bool:
        """Store the outcome and keep it ``ttl`` seconds; False when ``token`` no longer owns.

        Asking twice for the same attempt (a client retry after a lost reply) answers
        True again: the completed record still carries this attempt's fence and task id.
        """
        ...

    def release(self, key: str, *, token: str) -> bool:
        """Free the key for the next attempt, keeping its fence; False when not the owner."""
        ...

    def park(self, key: str, *, token: str, hold: float) -> bool:
        """Hold the key for ``hold`` seconds for a retry of the owning task id only.

        Used when the body calls ``self.retry()``: the retried message (same task id)
        may claim it, a duplicate with another task id still sees ``IN_PROGRESS``.
        """
        ...

    def peek(self, key: str, *, fingerprint: str) -> ClaimOutcome | None:
        """What holds ``key``, for a publisher deciding whether to send; never writes.

        None when nothing does (absent, released, or a lease that ran out); otherwise
        ``COMPLETED``, ``IN_PROGRESS`` or ``MISMATCH`` with the owner's task id, and no
        payload (a publisher only needs the task id to hand out its AsyncResult).
        """
        ...

    def read(self, key: str) -> StoredRecord | None:
        """The record as it stands, or None; never changes it."""
        ...

    def forget(self, key: str) -> bool:
        """Delete the record whatever its state (an operator's tool); True if it existed."""
        ...
