"""MemoryAdmin: ``MemoryStore``'s record table, and the operators' tools on it.

:class:`~celery_idem.store.base.StoreAdmin` in process: each tool does under the
store's lock what the Lua script of the same name does in Redis (see ``store/lua``).
The hot path (claim, renew, ...) is ``memory.py``'s, on the same table and lock.
"""

from __future__ import annotations

import math
import re
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from celery_idem.store.base import ForgetResult, RecordSummary, ServerFacts, Stored, StoredRecord
from celery_idem.store.record import RecordState, StepRecord, encode_steps

__all__ = ["MemoryAdmin", "MemoryRecord", "glob_regex"]

T = TypeVar("T")

_DEADLINED = frozenset({RecordState.IN_PROGRESS, RecordState.RESERVED})
"""States whose deadline holds the key (a lease, a reservation) until it passes."""

_TOMBSTONE_MAX_MS = 86_400_000
"""The longest a tombstone keeps a fence (as in ``lua/forget.lua``): one day."""


@dataclass
class MemoryRecord:
    """One record: the fields of ``lua/record.lua``, times in seconds (``time.time()``).

    ``owner`` is None once no attempt can own the record (completed, free, quarantined),
    ``""`` while it is parked for a retry.
    """

    state: RecordState
    fence: int
    expires_at: float
    owner: str | None = None
    deadline: float = 0.0
    fingerprint: str = ""
    task_id: str = ""
    stored: Stored | None = None
    takeovers: int = 0
    continuation: bool = False
    steps: tuple[StepRecord, ...] = ()
    """Finished durable steps (any state but completed)."""
    steps_done: int = 0
    """Completed: how many durable steps the completing run stored."""

    @property
    def parked(self) -> bool:
        """In progress with no owner: held for a retry of ``task_id``."""
        return self.state is RecordState.IN_PROGRESS and self.owner == ""

    def lease_left(self, now: float) -> float | None:
        """Seconds to the deadline of a lease or a reservation (negative once it passed)."""
        return self.deadline - now if self.state in _DEADLINED else None


class MemoryAdmin:
    """A :class:`~celery_idem.store.base.StoreAdmin` on an in-process record table.

    ``MemoryStore`` is one, with the hot path on the same table and lock.
    """

    def __init__(self) -> None:
        self.records: dict[str, MemoryRecord] = {}
        """The record table, by storage key; read and written under :attr:`lock` only."""
        self.lock = threading.Lock()
        """Held for each operation, as a Lua script runs alone in Redis."""

    def live(self, key: str, now: float) -> MemoryRecord | None:
        """The record of ``key``, or None once it expired (then it is dropped); hold the lock."""
        record = self.records.get(key)
        if record is not None and record.expires_at <= now:
            del self.records[key]
            return None
        return record

    def _visible(self, key: str, now: float) -> MemoryRecord | None:
        """The record as operators see it: a tombstone (see :meth:`forget_if`) is absent."""
        record = self.live(key, now)
        return None if record is None or _forgotten(record) else record

    def read(self, key: str) -> StoredRecord | None:
        """See ``lua/read.lua``."""
        with self.lock:
            now = time.time()
            record = self._visible(key, now)
            return None if record is None else _stored_record(record, now)

    def forget(self, key: str) -> bool:
        """Forget the record whatever its state (:meth:`forget_if`, forced)."""
        return self.forget_if(key, force=True) is ForgetResult.DELETED

    def forget_if(self, key: str, *, fence: int | None = None, force: bool = False) -> ForgetResult:
        """See ``lua/forget.lua``.

        A record whose fence the clock has not passed is replaced by a tombstone (free,
        same fence, ``deadline`` = now) until it has, so the next claim still gets a
        higher fence; readers treat the tombstone as absent.
        """
        with self.lock:
            now = time.time()
            record = self._visible(key, now)
            if record is None:
                return ForgetResult.ABSENT
            if fence is not None and record.fence != fence:
                return ForgetResult.CHANGED
            if record.state in _DEADLINED and record.deadline > now and not force:
                return ForgetResult.HELD
            now_ms = int(now * 1000)
            if record.fence < now_ms:
                del self.records[key]
            else:
                keep_ms = min(record.fence - now_ms + 2, _TOMBSTONE_MAX_MS)
                self.records[key] = MemoryRecord(
                    state=RecordState.FREE,
                    fence=record.fence,
                    expires_at=now + keep_ms / 1000,
                    deadline=now,
                )
            return ForgetResult.DELETED

    def scan(self, match: str, *, cursor: int = 0, count: int = 500) -> tuple[int, list[str]]:
        """SCAN's guarantee, in process: a key present throughout is returned.

        Keys are visited in the order of a hash of their name and the cursor is the
        next hash to visit, so records added or deleted meanwhile move no other key.
        """
        pattern = glob_regex(match)
        with self.lock:
            now = time.time()
            for key in [k for k, r in self.records.items() if r.expires_at <= now]:
                del self.records[key]
            ordered = sorted((_scan_hash(k), k) for k in self.records if pattern.fullmatch(k))
        page = [(h, k) for h, k in ordered if h >= cursor]
        if len(page) <= count:
            return 0, [k for _, k in page]
        last = page[count - 1][0]
        keys = [k for h, k in page if h <= last]  # a hash is never split across steps
        return last + 1, keys

    def summarize(self, keys: Sequence[str]) -> list[RecordSummary | None]:
        """See ``lua/summary.lua``."""
        return self._each(keys, self._visible, _summary)

    def memory_usage(self, keys: Sequence[str]) -> list[int | None]:
        """An estimate of what Redis would take: key, record fields and ~70 bytes overhead."""
        return self._each(keys, self.live, _estimated_size)

    def _each(
        self,
        keys: Sequence[str],
        find: Callable[[str, float], MemoryRecord | None],
        describe: Callable[[str, MemoryRecord, float], T],
    ) -> list[T | None]:
        """``describe`` each key's record that ``find`` finds (None where it finds none).

        Under the lock, at one reading of the clock, as one pipelined round trip is.
        """
        with self.lock:
            now = time.time()
            found = ((key, find(key, now)) for key in keys)
            return [None if record is None else describe(key, record, now) for key, record in found]

    def server_facts(self) -> ServerFacts:
        """Nothing to tell: the records live in this process."""
        return ServerFacts(kind="memory", url="memory://")

    def probe(self, timeout: float) -> None:
        """Nothing to reach: the records live in this process."""

    def eviction_policy(self) -> str | None:
        """None: the records live in this process, nothing evicts them."""
        return None

    def replica_count(self) -> int | None:
        """None: the in-process store has no replicas to count."""
        return None


def _forgotten(record: MemoryRecord) -> bool:
    """A tombstone: free, with the time of the forget as its deadline (a release sets 0)."""
    return record.state is RecordState.FREE and record.deadline > 0


def _stored_record(record: MemoryRecord, now: float) -> StoredRecord:
    return StoredRecord(
        state=record.state.value,
        fence=record.fence,
        task_id=record.task_id,
        fingerprint=record.fingerprint,
        lease_left=record.lease_left(now),
        ttl=_ttl(record, now),
        stored=record.stored,
        parked=record.parked,
        takeovers=record.takeovers,
        steps=record.steps,
        steps_done=record.steps_done,
    )


def _summary(key: str, record: MemoryRecord, now: float) -> RecordSummary:
    """What :meth:`MemoryAdmin.read` tells of the record, without its payload."""
    full = _stored_record(record, now)
    stored = full.stored
    return RecordSummary(
        key, full.state, full.fence, full.task_id, full.parked, full.lease_left, full.ttl,
        payload_bytes=len(stored.payload) if stored else len(encode_steps(full.steps)),
        codec=stored.codec if stored else "",
        takeovers=full.takeovers,
    )  # fmt: skip


def _estimated_size(key: str, record: MemoryRecord, _now: float) -> int:
    stored = record.stored
    fields = len(record.fingerprint) + len(record.task_id) + 40
    body = len(stored.payload) + len(stored.codec) if stored else len(encode_steps(record.steps))
    return len(key.encode("utf-8", "surrogatepass")) + fields + body + 70


def _ttl(record: MemoryRecord, now: float) -> float | None:
    """Seconds until the record expires; None for one kept until forgotten (Redis: -1)."""
    return None if math.isinf(record.expires_at) else record.expires_at - now


def _scan_hash(key: str) -> int:
    """Where ``key`` comes in a scan: 1 to 2**32 (0 is the start and end cursor)."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) + 1


def glob_regex(pattern: str) -> re.Pattern[str]:
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
