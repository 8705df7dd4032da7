"""MemoryStore: the Redis protocol's semantics in one process, for users' unit tests.

Each method does under one lock what the Lua script of the same name does in Redis
(see ``store/lua``), so a test suite using it sees the same claims, fences, take-overs
and mismatches a worker sees in production. The contract suite in ``tests/contract``
runs against both stores to keep it that way. Time is ``time.time()``, so freezegun
can move it: a test can let a lease run out without sleeping.

Not for production: records live in the process, so two workers do not share them.
"""

from __future__ import annotations

import math
import re
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from celery_idem.checks import check_store_durations
from celery_idem.store.base import (
    ClaimOutcome,
    ClaimState,
    ForgetResult,
    RecordKind,
    RecordSummary,
    ServerFacts,
    Stored,
    StoredRecord,
)

__all__ = ["MemoryStore"]

_FREE = "F"
_IN_PROGRESS = "P"
_QUARANTINED = "Q"
_TOMBSTONE_MAX_MS = 86_400_000
"""The longest a tombstone keeps a fence (as in ``lua/forget.lua``): one day."""


@dataclass
class _Record:
    state: str
    fence: int
    expires_at: float
    owner: str | None = None
    deadline: float = 0.0
    fingerprint: str = ""
    task_id: str = ""
    stored: Stored | None = None
    takeovers: int = 0
    continuation: bool = False


class MemoryStore:
    """An in-process :class:`~celery_idem.store.base.Store`; thread-safe."""

    def __init__(self) -> None:
        self._records: dict[str, _Record] = {}
        self._lock = threading.Lock()

    def _live(self, key: str, now: float) -> _Record | None:
        record = self._records.get(key)
        if record is not None and record.expires_at <= now:
            del self._records[key]
            return None
        return record

    def _owned(self, key: str, token: str, now: float) -> _Record | None:
        record = self._live(key, now)
        if record is None or record.owner != token:
            return None
        return record

    def _visible(self, key: str, now: float) -> _Record | None:
        """The record as operators see it: a tombstone (see :meth:`forget_if`) is absent."""
        record = self._live(key, now)
        return None if record is None or _forgotten(record) else record

    def claim(
        self,
        key: str,
        *,
        token: str,
        task_id: str,
        fingerprint: str,
        lease: float,
        ttl: float,
        max_takeovers: int = 0,
    ) -> ClaimOutcome:
        """See :meth:`celery_idem.store.base.Store.claim` and ``lua/claim.lua``."""
        check_store_durations(lease=lease, ttl=ttl)
        with self._lock:
            now = time.time()
            record = self._live(key, now)
            fence = record.fence if record else 0
            takeovers = record.takeovers if record else 0
            took_over = False
            if record is not None:
                if record.state == _IN_PROGRESS and record.owner == token:
                    return ClaimOutcome(ClaimState.CLAIMED, fence, task_id)
                if record.state == _QUARANTINED:
                    return ClaimOutcome(
                        ClaimState.QUARANTINED, fence, record.task_id, takeovers=takeovers
                    )
                if (
                    record.state != _FREE
                    and fingerprint
                    and record.fingerprint
                    and record.fingerprint != fingerprint
                ):
                    return ClaimOutcome(ClaimState.MISMATCH, fence, record.task_id)
                if record.stored is not None:
                    return ClaimOutcome(
                        ClaimState.COMPLETED, fence, record.task_id, stored=record.stored,
                        continuation_pending=record.continuation,
                    )  # fmt: skip
                if record.state == _IN_PROGRESS:
                    if record.owner == "" and record.task_id == task_id:
                        fingerprint = record.fingerprint  # the parked retry keeps it
                    elif record.deadline > now:
                        left = record.deadline - now
                        return ClaimOutcome(ClaimState.IN_PROGRESS, fence, record.task_id, left)
                    else:
                        took_over = True
                        if record.owner:
                            takeovers += 1
                            if 0 < max_takeovers < takeovers:
                                record.state, record.takeovers = _QUARANTINED, takeovers
                                record.owner, record.deadline = None, 0.0
                                record.expires_at = math.inf
                                return ClaimOutcome(
                                    ClaimState.QUARANTINED, fence, record.task_id,
                                    takeovers=takeovers, quarantined_now=True,
                                )  # fmt: skip
            fence = max(fence + 1, int(now * 1000))
            self._records[key] = _Record(
                state=_IN_PROGRESS,
                fence=fence,
                expires_at=now + ttl + lease,
                owner=token,
                deadline=now + lease,
                fingerprint=fingerprint,
                task_id=task_id,
                takeovers=takeovers,
            )
            return ClaimOutcome(ClaimState.CLAIMED, fence, task_id, took_over=took_over)

    def peek(self, key: str, *, fingerprint: str) -> ClaimOutcome | None:
        """See ``lua/peek.lua``."""
        with self._lock:
            now = time.time()
            record = self._live(key, now)
            if record is None or record.state in (_FREE, _QUARANTINED):
                return None
            fence, owner = record.fence, record.task_id
            if fingerprint and record.fingerprint and record.fingerprint != fingerprint:
                return ClaimOutcome(ClaimState.MISMATCH, fence, owner)
            if record.stored is not None:
                return ClaimOutcome(ClaimState.COMPLETED, fence, owner)
            if record.deadline <= now:
                return None
            return ClaimOutcome(ClaimState.IN_PROGRESS, fence, owner, record.deadline - now)

    def renew(self, key: str, *, token: str, lease: float) -> bool:
        """See ``lua/renew.lua``."""
        check_store_durations(lease=lease)
        with self._lock:
            now = time.time()
            record = self._owned(key, token, now)
            if record is None:
                return False
            record.deadline = max(record.deadline, now + lease)
            record.expires_at = max(record.expires_at, now + 2 * lease)
            return True

    def complete(
        self,
        key: str,
        *,
        token: str,
        fence: int,
        task_id: str,
        stored: Stored,
        ttl: float,
        continuation: bool = False,
    ) -> bool:
        """See ``lua/complete.lua``."""
        check_store_durations(ttl=ttl)
        with self._lock:
            now = time.time()
            record = self._live(key, now)
            if record is None or record.owner != token:
                return bool(
                    record
                    and record.stored is not None
                    and record.fence == fence
                    and record.task_id == task_id
                )
            record.state = stored.kind.value
            record.stored = stored
            record.owner = None
            record.continuation = continuation
            record.deadline = 0.0
            record.expires_at = now + ttl
            return True

    def dispatched(self, key: str, *, task_id: str) -> bool:
        """See ``lua/dispatched.lua``."""
        with self._lock:
            record = self._live(key, time.time())
            if record is None or record.stored is None or record.task_id != task_id:
                return False
            record.continuation = False
            return True

    def release(self, key: str, *, token: str) -> bool:
        """See ``lua/release.lua``."""
        with self._lock:
            record = self._owned(key, token, time.time())
            if record is None:
                return False
            record.state = _FREE
            record.owner = None
            record.deadline = 0.0
            record.fingerprint = ""
            record.task_id = ""
            return True

    def park(self, key: str, *, token: str, hold: float) -> bool:
        """See ``lua/park.lua``."""
        check_store_durations(hold=hold)
        with self._lock:
            now = time.time()
            record = self._owned(key, token, now)
            if record is None:
                return False
            record.owner = ""
            record.deadline = now + hold
            record.expires_at = max(record.expires_at, now + 2 * hold)
            return True

    def read(self, key: str) -> StoredRecord | None:
        """See ``lua/read.lua``."""
        with self._lock:
            now = time.time()
            record = self._visible(key, now)
            if record is None:
                return None
            return StoredRecord(
                state=record.state,
                fence=record.fence,
                task_id=record.task_id,
                fingerprint=record.fingerprint,
                lease_left=record.deadline - now if record.state == _IN_PROGRESS else None,
                ttl=_ttl(record, now),
                stored=record.stored,
                parked=record.state == _IN_PROGRESS and record.owner == "",
                takeovers=record.takeovers,
            )

    def forget(self, key: str) -> bool:
        """Forget the record whatever its state (:meth:`forget_if`, forced)."""
        return self.forget_if(key, force=True) is ForgetResult.DELETED

    # -- operators' tools ---------------------------------------------------------------

    def forget_if(self, key: str, *, fence: int | None = None, force: bool = False) -> ForgetResult:
        """See ``lua/forget.lua``.

        A record whose fence the clock has not passed is replaced by a tombstone (free,
        same fence, ``deadline`` = now) until it has, so the next claim still gets a
        higher fence; readers treat the tombstone as absent.
        """
        with self._lock:
            now = time.time()
            record = self._visible(key, now)
            if record is None:
                return ForgetResult.ABSENT
            if fence is not None and record.fence != fence:
                return ForgetResult.CHANGED
            if record.state == _IN_PROGRESS and record.deadline > now and not force:
                return ForgetResult.HELD
            now_ms = int(now * 1000)
            if record.fence < now_ms:
                del self._records[key]
            else:
                keep_ms = min(record.fence - now_ms + 2, _TOMBSTONE_MAX_MS)
                self._records[key] = _Record(
                    state=_FREE, fence=record.fence, expires_at=now + keep_ms / 1000, deadline=now
                )
            return ForgetResult.DELETED

    def scan(self, match: str, *, cursor: int = 0, count: int = 500) -> tuple[int, list[str]]:
        """SCAN's guarantee, in process: a key present throughout is returned.

        Keys are visited in the order of a hash of their name and the cursor is the
        next hash to visit, so records added or deleted meanwhile move no other key.
        """
        pattern = _glob_regex(match)
        with self._lock:
            now = time.time()
            for key in [k for k, r in self._records.items() if r.expires_at <= now]:
                del self._records[key]
            ordered = sorted((_scan_hash(k), k) for k in self._records if pattern.fullmatch(k))
        page = [(h, k) for h, k in ordered if h >= cursor]
        if len(page) <= count:
            return 0, [k for _, k in page]
        last = page[count - 1][0]
        keys = [k for h, k in page if h <= last]  # a hash is never split across steps
        return last + 1, keys

    def summarize(self, keys: Sequence[str]) -> list[RecordSummary | None]:
        """See ``lua/summary.lua``."""
        out: list[RecordSummary | None] = []
        with self._lock:
            now = time.time()
            for key in keys:
                record = self._visible(key, now)
                if record is None:
                    out.append(None)
                    continue
                stored = record.stored
                out.append(
                    RecordSummary(
                        key=key,
                        state=record.state,
                        fence=record.fence,
                        task_id=record.task_id,
                        parked=record.state == _IN_PROGRESS and record.owner == "",
                        lease_left=record.deadline - now if record.state == _IN_PROGRESS else None,
                        ttl=_ttl(record, now),
                        payload_bytes=len(stored.payload) if stored else 0,
                        codec=stored.codec if stored else "",
                        takeovers=record.takeovers,
                    )
                )
        return out

    def memory_usage(self, keys: Sequence[str]) -> list[int | None]:
        """An estimate of what Redis would take: key, record fields and ~70 bytes overhead."""
        out: list[int | None] = []
        with self._lock:
            now = time.time()
            for key in keys:
                record = self._live(key, now)
                if record is None:
                    out.append(None)
                    continue
                stored = record.stored
                fields = len(record.fingerprint) + len(record.task_id) + 40
                body = len(stored.payload) + len(stored.codec) if stored else 0
                out.append(len(key.encode("utf-8", "surrogatepass")) + fields + body + 70)
        return out

    def server_facts(self) -> ServerFacts:
        """Nothing to tell: the records live in this process."""
        return ServerFacts(kind="memory", url="memory://")

    def clear(self) -> None:
        """Drop every record (between users' tests)."""
        with self._lock:
            self._records.clear()


def _forgotten(record: _Record) -> bool:
    """A tombstone: free, with the time of the forget as its deadline (a release sets 0)."""
    return record.state == _FREE and record.deadline > 0


def _ttl(record: _Record, now: float) -> float | None:
    """Seconds until the record expires; None for one kept until forgotten (Redis: -1)."""
    return None if math.isinf(record.expires_at) else record.expires_at - now


def _scan_hash(key: str) -> int:
    """Where ``key`` comes in a scan: 1 to 2**32 (0 is the start and end cursor)."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) + 1


def _glob_regex(pattern: str) -> re.Pattern[str]:
    r"""Redis' glob (``*``, ``?``, ``[...]``, ``[^...]``, ``\`` escapes) as a regex."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if ch == "*":
            out.append(".*")
        elif ch == "?":
            out.append(".")
        elif ch == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end]
            negate = body.startswith("^")
            body = body[1:] if negate else body
            out.append(("[^" if negate else "[") + body.replace("\\", "\\\\") + "]")
            i = end + 1
            continue
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out), re.DOTALL)


# Kinds a completed record may have, for readers that test ``state``.
COMPLETED_STATES = frozenset(kind.value for kind in RecordKind)
