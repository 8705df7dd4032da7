"""``self.idem_atomic()``: the body's database writes and the key's completion, one commit.

With the records in Redis, a body that writes rows has a crash window: the rows are
committed, the worker dies before the completion reaches the store, the key is taken
over after its lease and the rows are written again. With the records in the same
PostgreSQL database (the PostgreSQL store), the completion can be one more statement of
the body's own transaction, fenced by the attempt's owner token
(``PostgresStore.completion_statement``): both commit or neither does. An attempt that
lost its lease meanwhile matches no row, and the whole transaction is rolled back.

``with self.idem_atomic(conn) as done:`` opens the outermost transaction on ``conn``
(``transactions.target_for``: psycopg 3, SQLAlchemy, or Django's alias ``using``); the
body writes through it (``done.connection``) and sets ``done.result``; leaving the
block encodes ``done.result`` as a completion of the task always is
(``Execution.encoded``), writes it in the transaction, and commits.
``self.step(name, fn, atomic=conn)`` does the same for one durable step: ``fn`` runs in
a transaction on ``conn`` and the step's record (``PostgresStore.step_statement``) is
written in it (see ``steps.py``).

What the issue left open, decided here:

- **The result.** ``done.result`` (None unless set, inside the block: setting it after
  the block raises) is the key's result: what the completion stores, what duplicates
  replay, and what the task returns, whatever the body returns after the block (a
  different value, not None, is logged as a warning). Eagerly, as any completion, the
  value after the result serializer. A value that cannot be encoded (or is over
  ``idem_max_result_bytes``) rolls the transaction back and raises ``ResultNotStored``:
  nothing was committed, so nothing needs recording as done without a value.
- **After the block.** The key is completed: no completion is written again, a
  ``self.step()`` or a second block is refused, and an exception the body raises later
  fails this run but leaves the key completed (its writes are committed). A block that
  rolled back (an exception inside it) may be opened again in the same run, as a loop
  that retries serialization failures does.
- **Outermost only.** The block begins and commits its transaction: a connection
  already in one is refused (Django: ``atomic(durable=True)``, which still allows the
  transaction a ``TestCase`` wraps each test in). Blocks do not nest, a block inside a
  step's function and a step inside a block are refused (the step's record would
  commit on its own while the block's writes may still roll back).
- **The right database.** A connection's first block checks, with one more statement,
  that it reaches the records' database (name and server start time against the
  store's own connection); each driver connection is checked once in its life.
- **The lease.** Under READ COMMITTED the renewals go on while the block runs (a long
  transaction keeps its key); they stop just before the completion statement (a renewal
  waiting on its row lock would find the key completed). Under REPEATABLE READ or
  SERIALIZABLE (set on the driver connection, or the server's default) a renewal
  committed after the snapshot would make the fenced statement fail with 40001, so
  the renewals stop for the whole transaction, after one renewal before its first
  statement: such a transaction must fit in ``idem_lease``.
- **No key to complete.** A plain call ``task(x)`` is refused; a body run without a
  claim under ``idem_on_store_error='run'`` gets a plain transaction (nothing recorded),
  as ``step()`` just calls its function there.

Nothing here imports psycopg, SQLAlchemy, Django or the PostgreSQL store at import time:
each is optional, and a task that never opens a block needs none of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from celery_idem import codec
from celery_idem.endpoint import Topology
from celery_idem.exceptions import (
    IdempotencyConfigError,
    IdempotencyError,
    LeaseLost,
    ResultNotStored,
    StoreUnavailable,
)
from celery_idem.store import Stored
from celery_idem.task.execution import Execution
from celery_idem.task.transactions import (
    SNAPSHOT_LEVELS,
    Refusal,
    Target,
    check_database,
    isolation_of,
    target_for,
)

__all__ = [
    "AtomicBlock",
    "AtomicTarget",
    "Fenced",
    "atomic_block",
    "encoded",
    "fenced",
    "plain_transaction",
    "require_postgres",
    "statements",
    "step_connection",
    "target",
    "unrecorded_step",
]

T = TypeVar("T")

AtomicTarget = Any
"""What ``step(..., atomic=...)`` takes: ``True`` (Django's default database), a Django
alias, or a psycopg 3 ``Connection`` or SQLAlchemy ``Connection``/``Session``."""

Statement = tuple[str, tuple[Any, ...]]
"""SQL with ``%s`` placeholders and its parameters, as the PostgreSQL store builds it."""


class AtomicBlock:
    """What ``with self.idem_atomic(...) as done:`` gives the body.

    Attributes:
        connection: What to write through: the connection or session passed, or, with
            Django, ``django.db.connections[using]`` (the ORM uses it by itself).
    """

    def __init__(self, connection: Any, too_late: Callable[[], IdempotencyError]) -> None:
        self.connection = connection
        self.open = True
        """The block has not ended yet: ``result`` may still be set."""
        self.value: Any = None
        self.too_late = too_late

    @property
    def result(self) -> Any:
        """The key's result: what the completion stores, duplicates get and the task returns.

        Set it inside the block (None when it is not set): the completion is written
        when the block ends, with the value set by then, encoded with the app's result
        serializer under ``idem_max_result_bytes`` as every result is.
        """
        return self.value

    @result.setter
    def result(self, value: Any) -> None:
        if not self.open:
            raise self.too_late()
        self.value = value


def refusal(execution: Execution, what: str, kind: type[IdempotencyError]) -> Refusal:
    """Errors of ``kind`` saying ``task 'NAME' key 'KEY': WHAT <text>``."""
    prefix = f"task {execution.task.name!r} key {execution.key!r}: {what}"
    return lambda text: execution.error(kind, f"{prefix} {text}")


def running(task: Any, what: str) -> Execution:
    """The execution whose body calls ``what``; refused outside one."""
    request = task.request
    execution = None if request.called_directly else getattr(request, "idem_run", None)
    if not isinstance(execution, Execution):
        raise IdempotencyError(
            f"{what} was called outside a running execution of the idempotent task "
            f"{task.name!r}: it belongs in the body of a task run by a worker or by "
            f"apply()/apply_async() (eager mode included); a plain call task(...) "
            f"bypasses celery-idem, so there is no key to complete",
            None,
            task.name,
        )
    return execution


def require_postgres(execution: Execution, what: str) -> None:
    """Refuse ``what`` when the task's records are not in PostgreSQL (by its settings)."""
    endpoint = execution.settings.endpoint
    if endpoint is None or endpoint.topology is not Topology.POSTGRES:
        where = "none" if endpoint is None else endpoint.display
        raise refusal(execution, what, IdempotencyConfigError)(
            f"needs the idempotency records in PostgreSQL, in the database the body "
            f"writes to, and the task's store is {where}: set idem_store_url = "
            f"'postgresql://...' (that database) on the app or the task"
        )


def statements(execution: Execution, what: str) -> Any:
    """The PostgreSQL store, which builds the fenced statements; refused for another."""
    store = execution.spec.store
    if not all(callable(getattr(store, name, None)) for name in ("completion_statement", "call")):
        raise refusal(execution, what, IdempotencyConfigError)(
            f"cannot write its record in the body's transaction through the store in use, "
            f"{type(store).__name__} (celery_idem.testing's in-memory store replaces "
            f"every store while a test holds it): run such tests against PostgreSQL"
        )
    return store


def target(execution: Execution, conn: Any, using: str | None, what: str) -> Target:
    """The transaction's connection, refused (:class:`IdempotencyConfigError`) if unusable."""
    return target_for(conn, using, refusal(execution, what, IdempotencyConfigError))


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


@contextlib.contextmanager
def fenced(
    execution: Execution, on: Target, what: str, *, completes: bool = False
) -> Iterator[Fenced]:
    """The outermost transaction on ``on``, checked to be on the records' database.

    ``completes``: the transaction completes the key, so the lease is not renewed
    again once it commits (:meth:`Execution.committed_in_transaction` ends it).
    """
    store = statements(execution, what)
    refuse = refusal(execution, what, IdempotencyConfigError)
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


@contextlib.contextmanager
def atomic_block(task: Any, conn: Any, using: str | None) -> Iterator[AtomicBlock]:
    """``self.idem_atomic(conn, using=...)``: see the module's docstring.

    Raises:
        LeaseLost: The attempt lost its key: its completion matched no row and the
            transaction was rolled back, the body's writes with it.
        ResultNotStored: ``done.result`` cannot be encoded: rolled back, key not completed.
        IdempotencyConfigError: Not a PostgreSQL store, or not a usable connection to
            the records' database.
        IdempotencyError: Outside a running execution, nested in a block or a step, or
            a second block after one committed.
    """
    what = "self.idem_atomic()"
    execution = running(task, what)
    require_postgres(execution, what)
    misuse = refusal(execution, what, IdempotencyError)
    block = AtomicBlock(None, lambda: misuse(
        "found done.result set after its block ended: the completion is written when "
        "the block ends, with the value set by then; set it inside the block"
    ))  # fmt: skip
    if execution.finished_steps is None:
        # The claim failed and idem_on_store_error='run': no key to complete, as the
        # user chose; the block is still one transaction for the body's writes.
        on = target(execution, conn, using, what)
        block.connection = on.handle
        with plain_transaction(on, refusal(execution, what, IdempotencyConfigError)):
            yield block
        block.open = False
        return
    store = statements(execution, what)
    if execution.committed is not None:
        raise misuse(
            "was called a second time in one run: the first block committed the key's "
            "completion. Do every write of the run in one block (a block that rolled "
            "back may be opened again)"
        )
    if execution.atomic_open:
        raise misuse("was called inside an idem_atomic() block: blocks do not nest")
    steps = getattr(execution.request, "idem_steps", None)
    if steps is not None and steps.current_key is not None:
        raise misuse(
            f"was called inside step {steps.current_key!r}: the block would complete "
            f"the key before the step is recorded; open it in the body, after the step"
        )
    on = target(execution, conn, using, what)
    block.connection = on.handle
    if execution.lost:
        raise lost(execution, "before its idem_atomic() block opened: nothing was run in it")
    execution.atomic_open = True
    try:
        with fenced(execution, on, what, completes=True) as tx:
            yield block
            block.open = False
            stored = encoded(execution, block.value, "done.result")
            continuation = execution.owes_continuation(stored)
            request = execution.complete_request(stored, continuation)
            statement = store.completion_statement(request)
            # No renewal from here: one waiting on this transaction's row lock would
            # find the key completed after the commit, and tell a lease lost.
            tx.pause()
            if not tx.write(statement):
                raise lost(
                    execution,
                    "before its idem_atomic() block committed: the transaction was rolled "
                    "back, so none of this attempt's writes in it were committed",
                )
        execution.committed_in_transaction(stored, block.value, continuation)
    finally:
        block.open = False
        execution.atomic_open = False


def step_connection(atomic: AtomicTarget) -> tuple[Any, str | None]:
    """``step(atomic=...)`` as ``(conn, using)`` for :func:`target`.

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
    with plain_transaction(target_for(conn, using, refuse), refuse):
        return call()


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


def lost(execution: Execution, what: str) -> LeaseLost:
    """The attempt's key is another attempt's: its idem_atomic() block is not committed."""
    execution.report_lost("complete")
    return execution.key_error(
        LeaseLost,
        f"lost its lease {what}. Another attempt took the key over (this one stalled "
        f"past idem_lease); the new owner's outcome is the key's",
    )
