"""The in-memory test store standing in for PostgreSQL in ``idem_atomic()`` and atomic steps.

Users' unit tests run their tasks on celery-idem's in-memory store
(``celery_idem.testing.use_memory_store``, the ``idem_store`` fixture, or
``memory://NAME``). A task with a transactional completion (``self.idem_atomic(conn)``,
``self.step(name, fn, atomic=conn)``) runs there too, against the test's own database:
the block opens the same transaction on ``conn`` as on PostgreSQL (psycopg, SQLAlchemy,
Django on any vendor: SQLite in Django's test runner), the body writes through it, and
the record (the key's completion, or the step) goes to the memory store instead of
being one more statement of the transaction. Nothing is written to a records' table, so
the same-database check is skipped; every other rule (``atomic.py``) holds, so a test
catches the misuse production would.

The order keeps what PostgreSQL guarantees, "a stale attempt's writes are never
committed", and its converse, "a completion is never kept without its writes":

1. The body's writes are flushed (a SQLAlchemy ``Session``), still uncommitted.
2. The record is written to the memory store, fenced by the attempt's token as always
   (``MemoryStore.complete``/``step``): an attempt that lost its key (another one took
   it over) is answered False, and the block raises ``LeaseLost`` inside the
   transaction, which rolls the writes back.
3. The transaction commits. A completed key cannot be taken over, so nothing can make
   this attempt stale between 2 and 3.
4. If the commit fails (a deferred constraint, a serialization failure, SQLite's
   "database is locked"), the record written in 2 is taken back: the key returns to
   what it was just before (held by this attempt, without that completion or step),
   and the exception goes on, so the run fails and releases the key (or, for a step,
   the body may catch it and go on), as after a rolled-back commit on PostgreSQL.

A task configured with a Redis store is refused, under the memory store too: its
workers would refuse it (Redis cannot commit with the body), so its tests do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

from celery_idem.endpoint import Endpoint, Topology
from celery_idem.exceptions import IdempotencyError
from celery_idem.store import CompleteRequest, StepRequest
from celery_idem.store.memory import MemoryStore
from celery_idem.store.memory_admin import MemoryRecord
from celery_idem.task.execution import Execution
from celery_idem.task.transactions import Refusal, SessionTarget, Target

__all__ = ["StandIn", "memory_store", "stand_in", "standing", "stands_in", "stands_in_for"]

STAND_IN_TOPOLOGIES = frozenset({Topology.POSTGRES, Topology.MEMORY})
"""What a task may be configured with for the memory store to stand in: PostgreSQL (as
in production), ``memory://NAME`` (a test configuration), or no store at all."""


def memory_store(execution: Execution) -> MemoryStore | None:
    """The in-memory store the execution's records go to, if they go to one."""
    store = execution.spec.store
    return store if isinstance(store, MemoryStore) else None


def stands_in(execution: Execution) -> bool:
    """Whether the memory store stands in for PostgreSQL for this execution.

    Not for a task configured with a Redis store, even under ``use_memory_store()``:
    production would refuse its block, so the test does too.
    """
    return standing(execution.settings.endpoint, execution.spec.store)


def stands_in_for(task: Any) -> bool:
    """:func:`stands_in` for a task's plain call (no execution): its resolved store."""
    try:
        spec = task.idem_spec()
    except IdempotencyError:  # no store it could resolve: not the memory store
        return False
    return standing(spec.settings.endpoint, spec.store)


def standing(endpoint: Endpoint | None, store: Any) -> bool:
    """The store is the memory store, for a task configured with no Redis store."""
    configured = endpoint is None or endpoint.topology in STAND_IN_TOPOLOGIES
    return configured and isinstance(store, MemoryStore)


class StandIn:
    """The open transaction of a block or an atomic step, its record in the memory store.

    The same calls as :class:`~celery_idem.task.fenced.Fenced`: :meth:`pause` (the
    renewals stop before the completion), :meth:`complete`, :meth:`record_step`.
    """

    def __init__(self, execution: Execution, on: Target, store: MemoryStore) -> None:
        self.execution, self.on, self.store = execution, on, store
        self.paused = False
        self.written: tuple[str, MemoryRecord, MemoryRecord] | None = None
        """The record written in this transaction: its key, itself, and a copy before."""

    def pause(self, *, renew: bool = False) -> None:
        """Stop the renewals (a renewal after the completion would find the key completed)."""
        del renew  # no snapshot to protect: the renewals touch no row of the transaction
        if not self.paused:
            self.execution.end_lease()
            self.paused = True

    def resume(self) -> None:
        """Renew the lease again (the transaction ended and the key is still this run's)."""
        execution = self.execution
        if self.paused and not execution.lost and execution.committed is None:
            execution.hold_lease()
        self.paused = False

    def complete(self, request: CompleteRequest) -> bool:
        """The key's completion, fenced: True when written, False when the key was lost."""
        return self.write(request.key, request.token, lambda: self.store.complete(request))

    def record_step(self, request: StepRequest) -> bool:
        """A durable step, fenced: True when written, False when the key was lost."""
        return self.write(request.key, request.token, lambda: self.store.step(request))

    def write(self, key: str, token: str, write: Callable[[], bool]) -> bool:
        """Flush the body's writes, then ``write()`` if ``token`` owns ``key`` (see above)."""
        if isinstance(self.on, SessionTarget):
            self.on.handle.flush()  # a failing flush fails the block before the record
        store = self.store
        with store.lock:
            record = store.live(key, time.time())
            if record is None or record.owner != token:
                return False
            before = dataclasses.replace(record)
        if not write():
            return False
        self.written = (key, record, before)
        return True

    def take_back(self) -> None:
        """The transaction did not commit: the record written in it is taken back.

        Unless something else replaced the record meanwhile (``forget``, ``clear``).
        A key still held keeps the later of the two leases (the renewals went on).
        """
        if self.written is None:
            return
        (key, record, before), self.written = self.written, None
        store = self.store
        with store.lock:
            if store.records.get(key) is not record:
                return
            deadline, expires_at = record.deadline, record.expires_at
            for field in dataclasses.fields(MemoryRecord):
                setattr(record, field.name, getattr(before, field.name))
            if before.owner:  # held by this attempt again: its renewals went on meanwhile
                record.expires_at = max(expires_at, before.expires_at)
                if not self.paused:
                    record.deadline = max(deadline, before.deadline)


@contextlib.contextmanager
def stand_in(
    execution: Execution, on: Target, store: MemoryStore, refuse: Refusal
) -> Iterator[StandIn]:
    """The outermost transaction on ``on``, its record in ``store`` (the module's order)."""
    tx = StandIn(execution, on, store)
    try:
        with on.transaction(refuse):
            yield tx
    except BaseException:
        tx.take_back()
        tx.resume()
        raise
