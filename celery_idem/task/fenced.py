"""Fenced transactions: the body's own transaction, carrying one record statement.

What ``self.idem_atomic()`` (``atomic.py``) and ``self.step(name, fn, atomic=conn)``
(``steps.py``) share: the caller's connection, checked (:func:`target`, the PostgreSQL
store by the settings and by the store in use), its outermost transaction on the
records' database (:func:`fenced`, with the lease paused as its isolation level needs:
:class:`Fenced`), the value encoded as a result is (:func:`encoded`), and the store's
fenced statement (a completion or a step) written in it (:meth:`Fenced.write`), so the
body's writes and the record commit together or not at all. The rules these follow are
listed once, in ``atomic.py``'s docstring. On celery-idem's in-memory test store, the
record goes to that store instead, in the same order (``standin.py``).

Nothing here imports psycopg, SQLAlchemy, Django or the PostgreSQL store at import time:
each is optional, and a task that never opens a transaction needs none of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from celery_idem import codec
from celery_idem.endpoint import Topology
from celery_idem.exceptions import (
    IdempotencyConfigError,
    IdempotencyError,
    LeaseLost,
    ResultNotStored,
    StoreUnavailable,
)
from celery_idem.store import CompleteRequest, StepRequest, Stored
from celery_idem.store.memory import MemoryStore
from celery_idem.task.execution import Execution
from celery_idem.task.standin import StandIn, memory_store, stand_in, stands_in
from celery_idem.task.transactions import (
    SNAPSHOT_LEVELS,
    Refusal,
    Target,
    check_database,
    isolation_of,
    target_for,
)

__all__ = [
    "Fenced",
    "encoded",
    "fenced",
    "plain_transaction",
    "refusal",
    "require_postgres",
    "statements",
    "target",
]

Statement = tuple[str, tuple[Any, ...]]
"""SQL with ``%s`` placeholders and its parameters, as the PostgreSQL store builds it."""


def refusal(execution: Execution, what: str, kind: type[IdempotencyError]) -> Refusal:
    """Errors of ``kind`` saying ``task 'NAME' key 'KEY': WHAT <text>``."""
    prefix = f"task {execution.task.name!r} key {execution.key!r}: {what}"
    return lambda text: execution.error(kind, f"{prefix} {text}")


def require_postgres(execution: Execution, what: str) -> None:
    """Refuse ``what`` when the task's records are not in PostgreSQL (by its settings).

    Unless the in-memory test store stands in for it (``standin.py``).
    """
    endpoint = execution.settings.endpoint
    if stands_in(execution):
        return
    if endpoint is None or endpoint.topology is not Topology.POSTGRES:
        where = "none" if endpoint is None else endpoint.display
        test = (
            " (celery_idem.testing's in-memory store stands in for PostgreSQL in tests, "
            "not for a task configured with Redis)"
            if memory_store(execution) is not None
            else ""
        )
        raise refusal(execution, what, IdempotencyConfigError)(
            f"needs the idempotency records in PostgreSQL, in the database the body "
            f"writes to, and the task's store is {where}: set idem_store_url = "
            f"'postgresql://...' (that database) on the app or the task{test}"
        )


def statements(execution: Execution, what: str) -> Any:
    """The store that writes the record: PostgreSQL's, or the memory store standing in.

    Refused for another (the PostgreSQL store builds the fenced statements).
    """
    store = execution.spec.store
    if stands_in(execution):
        return store
    if not all(callable(getattr(store, name, None)) for name in ("completion_statement", "call")):
        raise refusal(execution, what, IdempotencyConfigError)(
            f"cannot write its record in the body's transaction through the store in use, "
            f"{type(store).__name__}: point idem_store_url at PostgreSQL"
        )
    return store


def target(execution: Execution, conn: Any, using: str | None, what: str) -> Target:
    """The transaction's connection, refused (:class:`IdempotencyConfigError`) if unusable."""
    refuse = refusal(execution, what, IdempotencyConfigError)
    return target_for(conn, using, refuse, any_vendor=stands_in(execution))


class Fenced:
    """The open transaction of a block or an atomic step, and the lease while it is open.

    Under READ COMMITTED the renewal thread goes on renewing the lease while the body
    runs (a long transaction keeps its key); a renewal that comes while the fenced
    statement holds the record's row lock waits for the commit. Under REPEATABLE READ
    or SERIALIZABLE a renewal committed after the transaction's snapshot would make the
    fenced statement fail (40001), so the renewals stop for the transaction: one
    renewal first, before its first statement, gives it a whole lease.
    """

    def __init__(self, execution: Execution, on: Target, store: Any) -> None:
        self.execution, self.on, self.store = execution, on, store
        self.paused = False

    def pause(self, *, renew: bool = False) -> None:
        """Stop the renewals (``renew``: after one more, in this thread, for a full lease).

        Raises:
            LeaseLost: That renewal found the key another attempt's.
        """
        execution = self.execution
        if self.paused:
            return
        execution.end_lease()
        self.paused = True
        if not renew:
            return
        try:
            owned = self.store.renew(
                execution.storage, token=execution.token, lease=execution.settings.lease
            )
        except StoreUnavailable:
            return  # unknown: the fenced statement decides
        if not owned:
            execution.report_lost("renew")
            raise execution.key_error(
                LeaseLost,
                "lost its lease before its transaction began: another attempt took the "
                "key over (this one stalled past idem_lease); nothing was run in it",
            )

    def resume(self) -> None:
        """Renew the lease again (the transaction ended and the key is still this run's)."""
        execution = self.execution
        if self.paused and not execution.lost and execution.committed is None:
            execution.hold_lease()
        self.paused = False

    def write(self, statement: Statement) -> bool:
        """Run one of the store's fenced statements: True when written, False when lost.

        The caller raises inside the transaction on False, which rolls it back.
        """
        rows = self.on.rows(*statement)
        if len(rows) != 1 or len(rows[0]) != 1 or not isinstance(rows[0][0], bool):
            raise self.execution.key_error(
                IdempotencyError,
                f"got {rows!r} from the store's fenced statement, not one boolean: the "
                f"records' schema is not the one this celery-idem writes (run celery "
                f"idem migrate); nothing was committed",
            )
        return rows[0][0]

    def complete(self, request: CompleteRequest) -> bool:
        """The key's completion, in the transaction: True when written, False when lost."""
        return self.write(self.store.completion_statement(request))

    def record_step(self, request: StepRequest) -> bool:
        """A durable step's record, in the transaction: True when written, False when lost."""
        return self.write(self.store.step_statement(request))


@contextlib.contextmanager
def fenced(
    execution: Execution, on: Target, what: str, *, completes: bool = False
) -> Iterator[Fenced | StandIn]:
    """The outermost transaction on ``on``, checked to be on the records' database.

    ``completes``: the transaction completes the key, so the lease is not renewed
    again once it commits (:meth:`Execution.committed_in_transaction` ends it). On the
    in-memory test store, its stand-in (``standin.py``).
    """
    store = statements(execution, what)
    refuse = refusal(execution, what, IdempotencyConfigError)
    if isinstance(store, MemoryStore):
        with stand_in(execution, on, store, refuse) as standing_in:
            yield standing_in
        return
    tx = Fenced(execution, on, store)
    try:
        with on.transaction(refuse):
            known = isolation_of(on)
            if known in SNAPSHOT_LEVELS:
                tx.pause(renew=True)  # before the first statement takes the snapshot
            default = check_database(on, store, refuse)
            if known is None and default in SNAPSHOT_LEVELS:
                tx.pause()  # learnt from the first statement: too late to renew first
            yield tx
    except BaseException:
        tx.resume()
        raise
    if not completes:
        tx.resume()


@contextlib.contextmanager
def plain_transaction(on: Target, refuse: Refusal) -> Iterator[Any]:
    """A transaction with no record to write: the body runs unprotected, or is no task's."""
    with on.transaction(refuse):
        yield on.handle


def encoded(execution: Execution, value: Any, what: str) -> Stored:
    """``value`` as the store keeps it; an unencodable one fails the transaction.

    The writes are not committed yet, so nothing needs to be recorded as done without
    a value (as a completion after the fact must): it all rolls back instead.
    """
    try:
        return execution.encoded(value)
    except codec.ENCODE_ERRORS as exc:
        raise execution.key_error(
            ResultNotStored,
            f"could not store {what} ({type(exc).__name__}: {exc}), so the transaction "
            f"was rolled back and nothing was committed. Make it something small that "
            f"the result serializer can encode (an id)",
        ) from exc
