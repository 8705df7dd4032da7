"""The chaos tasks' database effect, when the store is PostgreSQL (``--store postgres``).

Each body run that completes its key inserts one row into :data:`TABLE`, in the records'
own database, inside ``self.idem_atomic(conn)``: the row and the key's completion commit
together or not at all, fenced by the attempt's token. The table has no unique
constraint, on purpose: one row per key must come from the transactional completion,
never from the table refusing a second insert. The checker (``db_checks.py``) reads the
committed rows; every answer must name its key's one row.

The body reaches the database through the same fault proxy as the store, on one
autocommit psycopg connection per process (prefork children open their own), so
latency, resets, blackholes, restarts and terminated sessions hit its transactions too.
A connection that broke is replaced at the next run; an error of the connection inside
the block (:data:`RETRIED`) fails the attempt, nothing committed (or, when the commit
itself was cut, committed with the key's completion), and the task retries it as a
real one would (``autoretry_for``): the retry finds the key parked, or completed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import psycopg

from celery_idem import IdempotentTask
from celery_idem.exceptions import StoreUnavailable

TABLE = "chaos_effects"
CREATE = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    id bigserial PRIMARY KEY,
    key text NOT NULL,
    step text,
    task_id text NOT NULL,
    fence bigint NOT NULL,
    attempt integer NOT NULL,
    args_tag text NOT NULL,
    pid integer NOT NULL,
    t double precision NOT NULL
)
"""
"""No unique constraint on purpose (see the module docstring)."""
COLUMNS = ("id", "key", "step", "task_id", "fence", "attempt", "args_tag", "pid", "t")
INSERT = (
    f"INSERT INTO {TABLE} (key, step, task_id, fence, attempt, args_tag, pid, t) "
    f"VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id"
)
RETRIED: tuple[type[Exception], ...] = (psycopg.OperationalError, StoreUnavailable)
"""What a chaos task retries: its connection broke (a reset, a restart, a terminated
session), or the store could not be asked which database holds the records."""

_conn: tuple[int, psycopg.Connection[Any]] | None = None


def connection(url: str) -> psycopg.Connection[Any]:
    """This process's connection, opened again when the last one broke."""
    global _conn
    if _conn is not None and _conn[0] == os.getpid():
        conn = _conn[1]
        if not conn.closed and not conn.broken:
            return conn
        conn.close()
    _conn = (os.getpid(), psycopg.connect(url, autocommit=True))
    return _conn[1]


def commit_row(
    task: IdempotentTask,
    url: str,
    key: str,
    tag: str,
    answer: Callable[[int], dict[str, Any]],
    *,
    step: str | None = None,
    work: float = 0.0,
) -> dict[str, Any]:
    """Insert this run's row and complete the key with ``answer(row id)``, in one commit.

    ``work`` seconds pass between the INSERT and the completion, inside the transaction:
    a fault in that window must leave no row.
    """
    conn = connection(url)
    with task.idem_atomic(conn) as done:
        params = (
            key, step, task.request.id, task.idempotency_fence, task.request.retries, tag,
            os.getpid(), time.time(),
        )  # fmt: skip
        row = conn.execute(INSERT, params).fetchone()
        assert row is not None
        if work:
            time.sleep(work)
        done.result = answer(int(row[0]))
    return dict(done.result)
