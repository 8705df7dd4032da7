"""The store contract: what a claim can answer, and the two protocols stores offer.

Pure: imports neither celery nor redis. :class:`Store` is the task's hot path (claim,
renew, complete, ...); :class:`StoreAdmin` the operators' tools (``celery idem``, the
worker's start-up check, tests). ``RedisStore`` and ``MemoryStore`` implement both;
``tests/contract`` runs one suite against both, so the two cannot drift. The record
vocabulary (state letters, kinds, claim codes) lives in :mod:`celery_idem.store.record`.

Every write after the claim is a compare-and-set on the owner *token* (random per
attempt). The *fence* is a per-key number that grows on every claim and survives a
release, so downstream systems can refuse a stale writer with it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Protocol

from celery_idem.store.record import ClaimState, RecordKind, StepRecord

__all__ = [
    "NOT_A_RECORD_FENCE",
    "ClaimOutcome",
    "ClaimRequest",
    "ClaimState",
    "CompleteRequest",
    "ForgetResult",
    "PendingCompletion",
    "RecordKind",
    "RecordSummary",
    "ReserveRequest",
    "ServerFacts",
    "Settled",
    "StepRecord",
    "StepRequest",
    "Store",
    "StoreAdmin",
    "Stored",
    "StoredRecord",
]


@dataclass(frozen=True, slots=True)
class Stored:
    """A completed record's payload as the store keeps it (opaque bytes plus codec tag)."""

    kind: RecordKind
    payload: bytes
    codec: str


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """What :meth:`Store.claim` is asked: one attempt's claim of one key.

    The hot path builds it once per attempt (claiming again while it waits reuses it);
    every store reads the same fields, so a new store or a new step takes it as it is.

    Attributes:
        key: The storage key.
        token: The attempt's owner token (random per attempt); every later write of the
            attempt is a compare-and-set on it.
        task_id: The attempt's task id: the owner named to duplicates, and the one whose
            parked retry may claim the key.
        fingerprint: The arguments' fingerprint the record must match (``""``: none to
            check, as for a retry, which may change its arguments).
        lease: Seconds the claim holds the key unless renewed.
        ttl: Seconds the completed record is kept (the claimed record lives
            ``ttl + lease``).
        max_takeovers: Takeovers allowed before the key is quarantined (0: no limit).
    """

    key: str
    _: KW_ONLY
    token: str
    task_id: str
    fingerprint: str
    lease: float
    ttl: float
    max_takeovers: int = 0


@dataclass(frozen=True, slots=True)
class ReserveRequest:
    """What :meth:`Store.reserve` is asked: a publisher's reservation of one key.

    Attributes:
        key: The storage key.
        task_id: The task id the publisher will send the message under; the worker
            that gets it claims the reservation as its own.
        fingerprint: The arguments' fingerprint (``""``: none to check), kept in the
            reservation for the claims and the other publishers.
        hold: Seconds the reservation stands if no worker claims it (the task's lease,
            plus the message's countdown).
    """

    key: str
    _: KW_ONLY
    task_id: str
    fingerprint: str
    hold: float


@dataclass(frozen=True, slots=True)
class CompleteRequest:
    """What :meth:`Store.complete` is asked: store the outcome of the attempt ``token``.

    Attributes:
        key: The storage key.
        token: The owner token of the attempt that claimed the key.
        fence: The fence its claim got (a retried completion of the same attempt is
            recognised by it and ``task_id``).
        task_id: The task id of the run whose outcome this is.
        stored: The outcome.
        ttl: Seconds the completed record is kept.
        continuation: The run still has callbacks or a chain to send (see
            :meth:`Store.dispatched`).
    """

    key: str
    _: KW_ONLY
    token: str
    fence: int
    task_id: str
    stored: Stored
    ttl: float
    continuation: bool = False


@dataclass(frozen=True, slots=True)
class StepRequest:
    """What :meth:`Store.step` is asked: keep one finished durable step of attempt ``token``.

    Attributes:
        key: The storage key.
        token: The owner token of the attempt that claimed the key.
        position: The step's place in the run, from 1: every ``self.step()`` call counts,
            the ones replayed from the claim's reply included, so the store appends
            exactly after the steps it holds.
        name: The step's name.
        occurrence: The n-th step of that name in the run, from 1.
        codec: The value's codec tag; ``""`` when the value could not be kept.
        value: The serialized value (or, codec ``""``, why there is none).
    """

    key: str
    _: KW_ONLY
    token: str
    position: int
    name: str
    occurrence: int
    codec: str
    value: bytes


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
        continuation_pending: ``COMPLETED`` by a run whose callbacks and chain were not
            confirmed sent (see :meth:`Store.dispatched`).
        takeovers: ``QUARANTINED``: the takeovers counted.
        quarantined_now: ``QUARANTINED`` by this very claim (the first to be refused).
        steps: ``CLAIMED``: the durable steps earlier attempts of the key finished, in
            the order they ran (the attempt replays them instead of running them).
    """

    state: ClaimState
    fence: int
    task_id: str = ""
    lease_left: float = 0.0
    stored: Stored | None = None
    took_over: bool = False
    continuation_pending: bool = False
    takeovers: int = 0
    quarantined_now: bool = False
    steps: tuple[StepRecord, ...] = ()


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """Everything a record holds, for operators (``inspect``) and tests."""

    state: str
    """The state byte: a :class:`~celery_idem.store.record.RecordState` value."""
    fence: int
    task_id: str
    fingerprint: str
    lease_left: float | None
    """Seconds to the lease deadline (``P``) or the reservation's end (``R``), else None."""
    ttl: float | None
    stored: Stored | None
    parked: bool = False
    """State ``P`` with no owner: held for a retry of ``task_id`` (see :meth:`Store.park`)."""
    takeovers: int = 0
    """How many claims took the key from an attempt that stopped renewing."""
    steps: tuple[StepRecord, ...] = ()
    """The finished durable steps a record that is not completed holds, in run order."""
    steps_done: int = 0
    """A completed record: how many durable steps its run stored (they are dropped)."""


@dataclass(frozen=True, slots=True)
class RecordSummary:
    """A record without its payload, for listings (:meth:`StoreAdmin.summarize`).

    Attributes:
        key: The storage key.
        state: The state byte, a :class:`~celery_idem.store.record.RecordState` value
            (``P``, ``F``, ``C``, ``E``, ``X``, ``Q``, ``R``), or ``""`` when the key holds
            something that is not a celery-idem record (another type, unreadable).
        fence: The record's fence (0 when not a record).
        task_id: The owner's, or the completing run's, task id.
        parked: ``P`` held for a retry of ``task_id``, no attempt running.
        lease_left: Seconds to the lease deadline for ``P``, or to the end of the
            reservation for ``R`` (negative once it passed), else None.
        ttl: Seconds until the record expires, None when it never does.
        payload_bytes: Size of the stored payload: the result of a completed record, the
            finished durable steps of any other (0 when there are none).
        codec: The payload's codec tag (see ``celery_idem.codec``).
        takeovers: How many claims took the key from an attempt that stopped renewing.
    """

    key: str
    state: str
    fence: int
    task_id: str
    parked: bool
    lease_left: float | None
    ttl: float | None
    payload_bytes: int
    codec: str
    takeovers: int = 0


NOT_A_RECORD_FENCE = 0
"""The fence to pass :meth:`StoreAdmin.forget_if` for a key that was shown as not a
celery-idem record: no record has fence 0 (a claim's fence is at least the server's
clock in ms), so a forced forget deletes the key only while it still is not a record."""


class ForgetResult(enum.Enum):
    """What :meth:`StoreAdmin.forget_if` did."""

    ABSENT = 0
    """There was no record (or only a forgotten record's tombstone): nothing changed."""
    DELETED = 1
    """The record is gone for readers (a tombstone may keep its fence for some ms)."""
    HELD = 2
    """A live attempt (or a parked retry, or a publisher's live reservation) holds the key
    and ``force`` was not given: kept."""
    CHANGED = 3
    """The record's fence is not the one expected any more (another attempt took it): kept."""
    NOT_A_RECORD = 4
    """The key holds something that is not a celery-idem record and ``force`` was not given."""


@dataclass(frozen=True, slots=True)
class ServerFacts:
    """What a store reports about its server, for ``celery idem doctor`` to judge.

    Values are as the server gave them; the judging (versions, policies) is the
    caller's. A value the server refused to tell is missing from ``info`` or ``None``
    in ``config``.

    Attributes:
        kind: ``"redis"`` or ``"memory"`` (the in-process store: nothing else is set).
        topology: ``"standalone"``, ``"sentinel"`` or ``"cluster"``: how the store's
            client reaches Redis (the facts are of the primary it talks to, on Cluster
            of one primary).
        url: The store's URL without its password.
        info: ``INFO`` fields (default sections), values as text.
        info_error: Why ``INFO`` could not be read, if it could not.
        config: ``CONFIG GET`` of ``maxmemory-policy``, ``appendonly``, ``appendfsync``
            and ``save``; None where CONFIG is refused (managed services).
        server_time: The server's clock (``TIME``), in seconds since the epoch.
        local_time: This machine's clock half-way through that ``TIME`` round trip.
        round_trip: Seconds the ``TIME`` round trip took.
    """

    kind: str
    url: str
    topology: str = "standalone"
    info: Mapping[str, str] = field(default_factory=dict)
    info_error: str | None = None
    config: Mapping[str, str | None] = field(default_factory=dict)
    server_time: float | None = None
    local_time: float | None = None
    round_trip: float | None = None


class PendingCompletion(Protocol):
    """A completion that was sent (:meth:`Store.send_completion`) and not yet confirmed."""

    def result(self) -> bool:
        """What :meth:`Store.complete` would have answered; blocks until it is known.

        Called once, from any thread. A reply lost with its connection is asked again
        (a completion is safe to send twice for the same attempt).

        Raises:
            StoreUnavailable: Still unreachable: the completion may or may not be stored.
            IdempotencyError: Refused for good (a damaged record).
        """
        ...


@dataclass(frozen=True, slots=True)
class Settled:
    """A :class:`PendingCompletion` already answered (a store that completes at once)."""

    owned: bool

    def result(self) -> bool:
        """The answer :meth:`Store.complete` gave."""
        return self.owned


class Store(Protocol):
    """The task's hot path: operations on one idempotency record, each atomic.

    Times are seconds (floats); a store converts them to its own clock (Redis: ``TIME``
    on the server, so workers with skewed clocks agree).
    """

    def claim(self, request: ClaimRequest) -> ClaimOutcome:
        """Claim ``request.key`` for the attempt ``request.token``, or report what holds it.

        Claims when the key is absent or released, when the owner's lease has run out
        (take-over), or when the owner parked it for a retry of this same ``task_id``
        (a retry sends ``fingerprint=""``, as it may change its arguments; a new request
        reusing the task id with other arguments is a ``MISMATCH``). The new fence is
        ``max(last fence + 1, the store's clock in ms)``, so it only grows, even after the
        record expired; in practice it is the clock, thousands above the last one (a
        take-over comes a lease later), and only claims within one millisecond get
        exactly one more. The record lives ``ttl + lease``.

        A takeover from an owner that stopped renewing is counted in the record; with
        ``max_takeovers`` > 0, the claim that would be takeover number
        ``max_takeovers + 1`` quarantines the key instead (``QUARANTINED``, kept with no
        expiry until an operator forgets it).
        """
        ...

    def renew(self, key: str, *, token: str, lease: float) -> bool:
        """Push the lease deadline to now + ``lease``; False when ``token`` no longer owns.

        Never moves the deadline back: a long renewal (a hand-over to a replacement)
        is not undone by an ordinary one still in flight.
        """
        ...

    def complete(self, request: CompleteRequest) -> bool:
        """Store the outcome and keep it ``ttl`` seconds; False when ``token`` no longer owns.

        Asking twice for the same attempt (a client retry after a lost reply) answers
        True again: the completed record still carries this attempt's fence and task id.
        ``continuation``: the run still has callbacks or a chain to send; a claim by the
        same task id reports ``continuation_pending`` until :meth:`dispatched`.
        """
        ...

    def send_completion(self, request: CompleteRequest) -> PendingCompletion:
        """:meth:`complete`, sent without waiting for its answer (``result()`` gives it).

        The command has left the process when this returns, so a worker that dies
        right after still completes the key; the answer is read later, off the task's
        path. A store that cannot split the two (the in-process store, a Cluster, one
        that waits for replicas) completes at once and returns :class:`Settled`.

        Raises:
            StoreUnavailable: It could not be sent (nothing, or not all of it, left).
        """
        ...

    def dispatched(self, key: str, *, task_id: str) -> bool:
        """Note that the run of ``task_id`` that completed ``key`` sent its continuation.

        False (nothing changed) when the record is not that run's completion.
        """
        ...

    def step(self, request: StepRequest) -> bool:
        """Append one finished durable step to the record ``request.token`` owns.

        The steps stay in the record until it completes (then only their number is
        kept) or expires: a release, a park, a takeover and a reservation keep them,
        and the next claim returns them (:attr:`ClaimOutcome.steps`). Asking again for
        a position already stored (a client retry after a lost reply) answers True.
        False (nothing written) when ``token`` no longer owns the key.

        Raises:
            IdempotencyError: The record holds fewer steps than ``position`` needs.
        """
        ...

    def release(self, key: str, *, token: str) -> bool:
        """Free the key for the next attempt, keeping its fence; False when not the owner.

        Finished durable steps stay, with the fingerprint and task id of the request
        that ran them (a claim with other arguments is then a ``MISMATCH``).
        """
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
        A live reservation (:meth:`reserve`) is ``IN_PROGRESS`` by its task id.
        """
        ...

    def reserve(self, request: ReserveRequest) -> ClaimOutcome | None:
        """What holds ``key`` for a publisher, reserving it when nothing does; atomic.

        ``RESERVED`` (with ``request.task_id``) when the key was absent, free, or held by
        a reservation that ran out (or already this task id's): the record is now state
        ``R`` with the publisher's fingerprint, kept ``hold`` seconds (the fence and the
        takeover count it found are kept, a new record's fence is the store's clock in
        ms: no fence is handed out, the next claim's is still higher). ``COMPLETED``,
        ``IN_PROGRESS`` (a live attempt, a parked retry, or another task id's live
        reservation) and ``MISMATCH`` as :meth:`peek` answers them, changing nothing.
        None (nothing reserved, publish anyway) for a lease that ran out (the message's
        claim takes it over and counts it) or a quarantined key.

        A claim by ``request.task_id`` takes the reservation as its own (no takeover,
        no wait); a claim by another task id is ``IN_PROGRESS`` until ``hold`` passed,
        then finds the key free (not a takeover: nobody ran).
        """
        ...

    def unreserve(self, key: str, *, task_id: str) -> bool:
        """Withdraw ``task_id``'s reservation of ``key``: its message was not published.

        The record is free again (fence and takeover count kept), so the next send
        publishes at once. False (nothing changed) when the record is not that
        reservation any more (a worker claimed it, or it ran out and was replaced).
        """
        ...


class StoreAdmin(Protocol):
    """Operators' tools: ``celery idem``, the worker's start-up check, tests.

    Never on a task's hot path (that is :class:`Store`). Only the forgets write.
    """

    def read(self, key: str) -> StoredRecord | None:
        """The record as it stands, or None (also for a tombstone); never changes it."""
        ...

    def forget(self, key: str) -> bool:
        """Forget the record whatever its state (:meth:`forget_if`, forced); True if it existed."""
        ...

    def forget_if(self, key: str, *, fence: int | None = None, force: bool = False) -> ForgetResult:
        """Delete the record unless a live attempt holds it, atomically.

        The fence only grows, forget included: a record whose fence the store's clock
        has not passed yet (fences run ahead of the clock when several claims come
        within one millisecond) is replaced by a *tombstone*, a free record with the
        same fence that expires once the clock has passed it (at most a day). The next
        claim gets that fence + 1; :meth:`read`, :meth:`summarize` and forget itself
        treat the tombstone as absent. Any other record is deleted.

        Args:
            key: The storage key.
            fence: Delete only while the record still has this fence (what the operator
                saw and confirmed); None does not compare. :data:`NOT_A_RECORD_FENCE`
                when what was shown is not a record: any record is then kept.
            force: Delete even while a live attempt or a parked retry holds the key, or
                when the key is not a celery-idem record (whatever ``fence``).
        """
        ...

    def scan(self, match: str, *, cursor: int = 0, count: int = 500) -> tuple[int, list[str]]:
        """One ``SCAN`` step over the keys matching the glob ``match``.

        Start with cursor 0 and pass back the returned cursor until it is 0 again. As
        with Redis, a key present for the whole iteration is returned at least once (a
        key may come twice); a step may return fewer or more keys than ``count``.
        """
        ...

    def summarize(self, keys: Sequence[str]) -> list[RecordSummary | None]:
        """Each key's record without its payload (None when absent, or a tombstone).

        One round trip for all of them.
        """
        ...

    def memory_usage(self, keys: Sequence[str]) -> list[int | None]:
        """Bytes each key takes in the store (Redis: ``MEMORY USAGE``), None when unknown.

        ``MemoryStore`` gives an estimate of what Redis would hold.
        """
        ...

    def server_facts(self) -> ServerFacts:
        """Facts about the server for ``doctor``: clock, ``INFO``, ``CONFIG``."""
        ...

    def probe(self, timeout: float) -> None:
        """Answer one ``PING`` within ``timeout`` seconds, on a connection of its own.

        For the worker's start-up check: a store that is down at start is said at start,
        not at the first task, and a short timeout keeps the worker from hanging on it
        (the client's own timeouts and retries are for tasks).

        Raises:
            StoreUnavailable: No answer in time (the message names the store and why).
        """
        ...

    def eviction_policy(self) -> str | None:
        """The server's ``maxmemory-policy``, or None where it cannot be known.

        Managed Redis services often refuse CONFIG; not knowing is not an error (the
        in-process store has none: None).
        """
        ...

    def replica_count(self) -> int | None:
        """Replicas connected to the primary (on Cluster: to one primary), or None.

        For the worker's start-up check against ``idem_min_replicas``; not knowing
        (INFO refused, the store down, the in-process store) is not an error there.
        """
        ...
