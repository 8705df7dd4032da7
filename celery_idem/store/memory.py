"""MemoryStore: the Redis protocol's semantics in one process, for users' unit tests.

Each method does under one lock what the Lua script of the same name does in Redis
(see ``store/lua``), so a test suite using it sees the same claims, fences, take-overs
and mismatches a worker sees in production. The contract suite in ``tests/contract``
runs against both stores to keep it that way. Time is ``time.time()``, so freezegun
can move it: a test can let a lease run out without sleeping. The hot path is here; the
record table and the operators' tools are ``memory_admin.py``'s.

Not for production: records live in the process, so two workers do not share them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from celery_idem.checks import check_store_durations
from celery_idem.exceptions import IdempotencyError
from celery_idem.store.base import (
    ClaimOutcome,
    ClaimRequest,
    CompleteRequest,
    ReserveRequest,
    Settled,
    StepRequest,
)
from celery_idem.store.memory_admin import MemoryAdmin, MemoryRecord
from celery_idem.store.record import ClaimState, RecordKind, RecordState, StepRecord

__all__ = ["MemoryStore"]


class MemoryStore(MemoryAdmin):
    """An in-process store; thread-safe.

    Both a :class:`~celery_idem.store.base.Store` and a
    :class:`~celery_idem.store.base.StoreAdmin`.
    """

    def _change_owned(
        self, key: str, token: str, change: Callable[[MemoryRecord, float], None]
    ) -> bool:
        """Under the lock, ``change(record, now)`` if ``token`` owns ``key``; else False.

        What renew, release, park and step share (as their scripts share the owner check).
        """
        with self.lock:
            now = time.time()
            record = self.live(key, now)
            if record is None or record.owner != token:
                return False
            change(record, now)
            return True

    def claim(self, request: ClaimRequest) -> ClaimOutcome:
        """See :meth:`celery_idem.store.base.Store.claim` and ``lua/claim.lua``."""
        key, token, task_id = request.key, request.token, request.task_id
        fingerprint, lease, ttl = request.fingerprint, request.lease, request.ttl
        check_store_durations(lease=lease, ttl=ttl)
        with self.lock:
            now = time.time()
            record = self.live(key, now)
            fence = record.fence if record else 0
            takeovers = record.takeovers if record else 0
            steps = record.steps if record else ()  # they pass to the new claim
            took_over = False
            if record is not None and _lapsed_reservation(record, now, task_id):
                # Holds nothing: as a free record (fence, count and steps kept).
                if steps and _other_arguments(record, fingerprint):
                    return ClaimOutcome(ClaimState.MISMATCH, fence, record.task_id)
                fingerprint = fingerprint or (record.fingerprint if steps else "")
                record = None
            if record is not None:
                if record.state is RecordState.IN_PROGRESS and record.owner == token:
                    return ClaimOutcome(ClaimState.CLAIMED, fence, task_id, steps=steps)
                if record.state is RecordState.QUARANTINED:
                    return ClaimOutcome(
                        ClaimState.QUARANTINED, fence, record.task_id, takeovers=takeovers
                    )
                if (record.state is not RecordState.FREE or steps) and _other_arguments(
                    record, fingerprint
                ):
                    return ClaimOutcome(ClaimState.MISMATCH, fence, record.task_id)
                if record.stored is not None:
                    return ClaimOutcome(
                        ClaimState.COMPLETED, fence, record.task_id, stored=record.stored,
                        continuation_pending=record.continuation,
                    )  # fmt: skip
                if steps and not fingerprint and record.state is not RecordState.IN_PROGRESS:
                    fingerprint = record.fingerprint  # resumed steps keep their request's
                if record.state is RecordState.RESERVED:
                    if record.task_id != task_id:  # another message's, still queued
                        left = record.deadline - now
                        return ClaimOutcome(ClaimState.IN_PROGRESS, fence, record.task_id, left)
                    fingerprint = fingerprint or record.fingerprint  # its own: no takeover
                if record.state is RecordState.IN_PROGRESS:
                    if record.owner == "" and record.task_id == task_id:
                        fingerprint = record.fingerprint  # the parked retry keeps it
                    elif record.deadline > now:
                        left = record.deadline - now
                        return ClaimOutcome(ClaimState.IN_PROGRESS, fence, record.task_id, left)
                    else:
                        took_over = True
                        # A retry taking over (its park failed) keeps the request's.
                        fingerprint = fingerprint or record.fingerprint
                        if record.owner:
                            takeovers += 1
                            if 0 < request.max_takeovers < takeovers:
                                record.state, record.takeovers = RecordState.QUARANTINED, takeovers
                                record.owner, record.deadline = None, 0.0
                                record.expires_at = math.inf
                                return ClaimOutcome(
                                    ClaimState.QUARANTINED, fence, record.task_id,
                                    takeovers=takeovers, quarantined_now=True,
                                )  # fmt: skip
            fence = max(fence + 1, int(now * 1000))
            self.records[key] = MemoryRecord(
                state=RecordState.IN_PROGRESS,
                fence=fence,
                expires_at=now + ttl + lease,
                owner=token,
                deadline=now + lease,
                fingerprint=fingerprint,
                task_id=task_id,
                takeovers=takeovers,
                steps=steps,
            )
            return ClaimOutcome(
                ClaimState.CLAIMED, fence, task_id, took_over=took_over, steps=steps
            )

    def peek(self, key: str, *, fingerprint: str) -> ClaimOutcome | None:
        """See ``lua/peek.lua``."""
        with self.lock:
            return self._look_up(key, fingerprint, time.time())

    def _look_up(self, key: str, fingerprint: str, now: float) -> ClaimOutcome | None:
        """What ``peek.lua`` answers; hold the lock."""
        record = self.live(key, now)
        if record is None or record.state in (RecordState.FREE, RecordState.QUARANTINED):
            return None
        if _lapsed_reservation(record, now, None):
            return None
        fence, owner = record.fence, record.task_id
        if fingerprint and record.fingerprint and record.fingerprint != fingerprint:
            return ClaimOutcome(ClaimState.MISMATCH, fence, owner)
        if record.stored is not None:
            return ClaimOutcome(ClaimState.COMPLETED, fence, owner)
        if record.deadline <= now:
            return None
        return ClaimOutcome(ClaimState.IN_PROGRESS, fence, owner, record.deadline - now)

    def reserve(self, request: ReserveRequest) -> ClaimOutcome | None:
        """See ``lua/reserve.lua``."""
        hold, task_id = request.hold, request.task_id
        check_store_durations(hold=hold)
        with self.lock:
            now = time.time()
            record = self.live(request.key, now)
            if record is not None and _lapsed_reservation(record, now, None):
                record.state = RecordState.FREE  # as the script reads it; rewritten below
            steps = record.steps if record else ()
            if (
                record is not None
                and record.state is RecordState.FREE
                and steps
                and _other_arguments(record, request.fingerprint)
            ):
                return ClaimOutcome(ClaimState.MISMATCH, record.fence, record.task_id)
            if record is not None and record.state is not RecordState.FREE:
                found = self._look_up(request.key, request.fingerprint, now)
                if found is None or found.state is not ClaimState.IN_PROGRESS:
                    return found  # quarantined or a lapsed lease: publish anyway
                if record.state is RecordState.RESERVED and record.task_id == task_id:
                    return ClaimOutcome(ClaimState.RESERVED, record.fence, task_id)
                return found
            fence = record.fence if record else int(now * 1000)  # as reserve.lua: never 0
            self.records[request.key] = MemoryRecord(
                state=RecordState.RESERVED,
                fence=fence,
                expires_at=max(record.expires_at if record else 0.0, now + hold),
                deadline=now + hold,
                fingerprint=request.fingerprint or (record.fingerprint if record and steps else ""),
                task_id=task_id,
                takeovers=record.takeovers if record else 0,
                steps=steps,  # kept for the reserved message to resume
            )
            return ClaimOutcome(ClaimState.RESERVED, fence, task_id)

    def unreserve(self, key: str, *, task_id: str) -> bool:
        """See ``lua/unreserve.lua``."""
        with self.lock:
            now = time.time()
            record = self.live(key, now)
            if (
                record is None
                or record.state is not RecordState.RESERVED
                or record.task_id != task_id
            ):
                return False
            if record.takeovers == 0 and record.fence < int(now * 1000) and not record.steps:
                del self.records[key]
                return True
            record.state, record.task_id = RecordState.FREE, ""
            if record.steps:  # kept, as a release keeps them: free, not a tombstone
                record.deadline = 0.0
                return True
            record.fingerprint = ""
            record.deadline = now if record.takeovers == 0 else 0.0  # a tombstone, or free
            return True

    def renew(self, key: str, *, token: str, lease: float) -> bool:
        """See ``lua/renew.lua``."""
        check_store_durations(lease=lease)

        def push(record: MemoryRecord, now: float) -> None:
            record.deadline = max(record.deadline, now + lease)
            record.expires_at = max(record.expires_at, now + 2 * lease)

        return self._change_owned(key, token, push)

    def complete(self, request: CompleteRequest) -> bool:
        """See ``lua/complete.lua``."""
        check_store_durations(ttl=request.ttl)
        with self.lock:
            now = time.time()
            record = self.live(request.key, now)
            if record is None or record.owner != request.token:
                return bool(
                    record
                    and record.stored is not None
                    and record.fence == request.fence
                    and record.task_id == request.task_id
                )
            record.state = request.stored.kind.state
            record.stored = request.stored
            record.steps_done, record.steps = len(record.steps), ()
            record.owner = None
            record.continuation = request.continuation
            record.deadline = 0.0
            record.expires_at = now + request.ttl
            return True

    def send_completion(self, request: CompleteRequest) -> Settled:
        """Completes at once: in process there is no round trip to save."""
        return Settled(self.complete(request))

    def dispatched(self, key: str, *, task_id: str) -> bool:
        """See ``lua/dispatched.lua``."""
        with self.lock:
            record = self.live(key, time.time())
            if record is None or record.stored is None or record.task_id != task_id:
                return False
            record.continuation = False
            return True

    def release(self, key: str, *, token: str) -> bool:
        """See ``lua/release.lua``."""

        def free(record: MemoryRecord, _now: float) -> None:
            record.state = RecordState.FREE
            record.owner = None
            record.deadline = 0.0
            if not record.steps:  # steps keep the request that ran them
                record.fingerprint = ""
                record.task_id = ""

        return self._change_owned(key, token, free)

    def step(self, request: StepRequest) -> bool:
        """See ``lua/step.lua``."""

        def append(record: MemoryRecord, now: float) -> None:
            count = len(record.steps)
            if request.position <= count:
                return  # this attempt stored it already
            if request.position != count + 1:
                raise IdempotencyError(
                    f"record {request.key!r} holds fewer durable steps than step "
                    f"{request.name!r} (position {request.position}) follows; nothing "
                    f"was written",
                    key=request.key,
                )
            step = StepRecord(
                request.name, request.occurrence, int(now * 1000) / 1000.0, request.codec,
                request.value,
            )  # fmt: skip
            record.steps = (*record.steps, step)

        return self._change_owned(request.key, request.token, append)

    def park(self, key: str, *, token: str, hold: float) -> bool:
        """See ``lua/park.lua``."""
        check_store_durations(hold=hold)

        def hold_for_retry(record: MemoryRecord, now: float) -> None:
            record.owner = ""
            record.deadline = now + hold
            record.expires_at = max(record.expires_at, now + 2 * hold)

        return self._change_owned(key, token, hold_for_retry)

    def clear(self) -> None:
        """Drop every record (between users' tests)."""
        with self.lock:
            self.records.clear()


def _other_arguments(record: MemoryRecord, fingerprint: str) -> bool:
    """Both fingerprints are known and differ (``''`` on either side is not checked)."""
    return bool(fingerprint and record.fingerprint and record.fingerprint != fingerprint)


def _lapsed_reservation(record: MemoryRecord, now: float, task_id: str | None) -> bool:
    """A reservation whose deadline passed, not ``task_id``'s: it holds nothing."""
    return (
        record.state is RecordState.RESERVED
        and record.deadline <= now
        and record.task_id != task_id
    )


# Kinds a completed record may have, for readers that test ``state``.
COMPLETED_STATES = frozenset(kind.value for kind in RecordKind)
