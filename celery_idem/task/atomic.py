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
- **In users' tests.** On celery-idem's in-memory store (``use_memory_store()``, the
  ``idem_store`` fixture, ``memory://``) the block and the atomic steps run as a
  stand-in: the same transaction on the test's database (any vendor), the completion
  or the step written to the memory store just before the commit (a lost key rolls
  back with ``LeaseLost``; a failed commit takes the record back): ``standin.py``.
- **No key to complete.** A plain call ``task(x)`` is refused; a body run without a
  claim under ``idem_on_store_error='run'`` gets a plain transaction (nothing recorded),
  as ``step()`` just calls its function there.

The transaction itself, with its checks and the lease, is ``fenced.py``'s, shared with
the atomic steps. Nothing here imports psycopg, SQLAlchemy, Django or the PostgreSQL
store at import time: each is optional, and a task that never opens a block needs none
of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from celery_idem.exceptions import IdempotencyConfigError, IdempotencyError, LeaseLost
from celery_idem.task.execution import Execution
from celery_idem.task.fenced import (
    encoded,
    fenced,
    plain_transaction,
    refusal,
    require_postgres,
    statements,
    target,
)

__all__ = ["AtomicBlock", "atomic_block"]


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
    statements(execution, what)
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
            # No renewal from here: one waiting on this transaction's row lock would
            # find the key completed after the commit, and tell a lease lost.
            tx.pause()
            if not tx.complete(request):
                raise lost(
                    execution,
                    "before its idem_atomic() block committed: the transaction was rolled "
                    "back, so none of this attempt's writes in it were committed",
                )
        execution.committed_in_transaction(stored, block.value, continuation)
    finally:
        block.open = False
        execution.atomic_open = False


def lost(execution: Execution, what: str) -> LeaseLost:
    """The attempt's key is another attempt's: its idem_atomic() block is not committed."""
    execution.report_lost("complete")
    return execution.key_error(
        LeaseLost,
        f"lost its lease {what}. Another attempt took the key over (this one stalled "
        f"past idem_lease); the new owner's outcome is the key's",
    )
