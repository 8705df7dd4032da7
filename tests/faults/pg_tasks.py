"""The app the PostgreSQL fault scenarios run on real prefork workers.

Its records live in PostgreSQL (``IDEM_TEST_PG_STORE``); each task writes a customer
row into the same database inside ``self.idem_atomic(conn)``, so the row and the
completion commit together. The effect ledger (Redis, as for the other scenarios) notes
each point a body reaches, with its pid, and a ``hold:<uid>:<point>`` flag there makes
the body wait at that point until the test removes it (or kills the process).

Counted from outside: rows are counted in the ``customers`` table, bodies from the
ledger.
"""

from __future__ import annotations

import os
import time
from typing import Any

import psycopg
from celery import Celery

from tests.integration.tasks import WfWatched, effect, ledger
from tests.worker_settings import redelivering_worker

BROKER = os.environ.get("IDEM_TEST_BROKER", "memory://")
BACKEND = os.environ.get("IDEM_TEST_BACKEND", "cache+memory://")
PG_STORE = os.environ.get("IDEM_TEST_PG_STORE", "")

CUSTOMERS = """
CREATE TABLE IF NOT EXISTS customers (
    id bigserial PRIMARY KEY,
    uid text NOT NULL,
    email text NOT NULL,
    fence bigint NOT NULL
)
"""
"""No unique constraint on purpose: one row per key must come from the completion's
transaction, not from the table refusing a second insert."""

app = Celery("idempg", broker=BROKER, backend=BACKEND)
app.conf.update(
    idem_store_url=PG_STORE,
    idem_lease=float(os.environ.get("IDEM_TEST_LEASE", "60")),
    **redelivering_worker(float(os.environ.get("IDEM_TEST_VISIBILITY", "3600"))),
)

_conn: tuple[int, psycopg.Connection[Any]] | None = None


def connection() -> psycopg.Connection[Any]:
    """This process's connection to the records' database (prefork children make their own)."""
    global _conn
    if _conn is None or _conn[0] != os.getpid():
        _conn = (os.getpid(), psycopg.connect(PG_STORE))
    return _conn[1]


def point(uid: str, name: str, **fields: Any) -> None:
    """Note that the body reached ``name``; wait there while ``hold:<uid>:<name>`` is set."""
    effect(f"{uid}:{name}", **fields)
    while ledger().exists(f"hold:{uid}:{name}"):
        time.sleep(0.02)


@app.task(base=WfWatched, bind=True, name="pg.signup")
def signup(self: WfWatched, uid: str, email: str) -> dict[str, Any]:
    """Insert the customer and complete the key in one transaction."""
    conn = connection()
    fence = self.idempotency_fence
    point(uid, "claimed", fence=fence, task_id=self.request.id)
    with self.idem_atomic(conn) as done:
        row = conn.execute(
            "INSERT INTO customers (uid, email, fence) VALUES (%s, %s, %s) RETURNING id",
            (uid, email, fence),
        ).fetchone()
        assert row is not None
        point(uid, "inserted", fence=fence, task_id=self.request.id)
        done.result = {"customer": row[0], "fence": fence}
    point(uid, "committed", fence=fence, task_id=self.request.id)
    return dict(done.result)
