"""The chaos soak's Celery app and tasks, run by real prefork workers.

Configured from environment variables that the orchestrator (``tests.chaos.run``) sets,
so the publisher process, the orchestrator and every worker build the same app. Broker,
result backend and ledger live on a server the nemesis leaves alone; the store is
reached through the fault proxy, in front of a server the nemesis restarts.

Every body appends one effect to the ledger (a Redis list the library never touches)
*before* it returns, with what the checker needs to explain a second run: the logical
key, the fence, the attempt, the process, the time. The checker reads only that ledger
and the publisher's history, never celery-idem's records.

With the store in PostgreSQL (``CHAOS_STORE_URL=postgresql://...``), every body that
completes its key also inserts a row in the same database inside ``idem_atomic()``
(``database.py``), and its answer names that row: the checker reads the committed rows.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery
from celery.signals import task_prerun

from celery_idem import IdempotentTask
from tests.worker_settings import redelivering_worker

BROKER = os.environ.get("CHAOS_BROKER_URL", "memory://")
BACKEND = os.environ.get("CHAOS_BACKEND", "cache+memory://")
STORE = os.environ.get("CHAOS_STORE_URL", "memory://chaos")
POSTGRES = STORE.startswith(("postgresql://", "postgres://"))
LEDGER = os.environ.get("CHAOS_LEDGER", "")
LEASE = float(os.environ.get("CHAOS_LEASE", "2"))
VISIBILITY = 10.0
"""Seconds before the Redis broker hands a killed worker's unacked messages out again."""
LEDGER_LIST = "chaos:ledger"
DELIVERIES_LIST = "chaos:deliveries"

app = Celery("chaos", broker=BROKER, backend=BACKEND)
app.conf.update(
    idem_lease=LEASE,
    **redelivering_worker(VISIBILITY),
    worker_hijack_root_logger=False,
    task_default_queue=os.environ.get("CHAOS_QUEUE", "chaos"),
)
if POSTGRES:  # libpq's connect timeout is in the URL
    app.conf.update(idem_store_url=STORE)
else:
    app.conf.update(
        idem_redis_url=STORE,
        idem_redis_options={"socket_timeout": 1.0, "socket_connect_timeout": 1.0},
    )

if POSTGRES:
    from tests.chaos import database

    RETRIED: tuple[type[Exception], ...] = database.RETRIED
    #: A broken connection is retried with backoff (1, 2, 4, 4 ... s): outages last seconds.
    RETRYING: dict[str, Any] = {
        "retry_backoff": True, "retry_backoff_max": 4, "retry_jitter": False, "max_retries": 20,
    }  # fmt: skip
else:
    RETRIED, RETRYING = (), {}


def _break_the_claim() -> None:
    """``CHAOS_BROKEN=claim``: a deliberately broken build, for the checker's own test.

    Every claim that finds the key held or completed is answered CLAIMED anyway, as a
    claim that skipped the fence check would: duplicates run the body. The checker must
    catch it. Never set outside that test.
    """
    from celery_idem.store import ClaimOutcome, ClaimRequest, ClaimState  # noqa: PLC0415
    from celery_idem.store.redis import RedisStore  # noqa: PLC0415

    honest = RedisStore.claim

    def claim(self: RedisStore, request: ClaimRequest) -> ClaimOutcome:
        outcome = honest(self, request)
        if outcome.state in (ClaimState.IN_PROGRESS, ClaimState.COMPLETED):
            return ClaimOutcome(ClaimState.CLAIMED, outcome.fence, request.task_id)
        return outcome

    RedisStore.claim = claim  # type: ignore[method-assign]


if os.environ.get("CHAOS_BROKEN") == "claim":
    _break_the_claim()

_ledger: redis.Redis | None = None


def ledger() -> redis.Redis:
    """One client per process (prefork children make their own)."""
    global _ledger
    if _ledger is None or getattr(_ledger, "_pid", None) != os.getpid():
        _ledger = redis.Redis.from_url(LEDGER, socket_timeout=5.0)
        _ledger._pid = os.getpid()  # type: ignore[attr-defined]
    return _ledger


def effect(
    task: IdempotentTask, key: str, tag: str, step: str | None = None, *, fails: bool = False
) -> None:
    """Append this run's effect to the ledger (the checker's ``Effect``).

    ``fails``: the body raises after this effect by design (a retry task's first
    attempt), so the key is not completed by this run.
    """
    entry = {
        "key": key,
        "task": task.name,
        "task_id": task.request.id,
        "fence": task.idempotency_fence,
        "attempt": task.request.retries,
        "step": step,
        "args_tag": tag,
        "pid": os.getpid(),
        "t": time.time(),
        "fails": fails,
    }
    ledger().rpush(LEDGER_LIST, json.dumps(entry))


@task_prerun.connect
def _delivered(task_id: str | None = None, **_: Any) -> None:
    """Note every message a worker process hands to a task (the checker's ``Delivery``):
    a call whose message never shows up here was lost before any task saw it."""
    entry = {"task_id": task_id, "t": time.time(), "pid": os.getpid()}
    ledger().rpush(DELIVERIES_LIST, json.dumps(entry))


class Transient(Exception):
    """A failure that ``autoretry_for`` retries."""


def finish(
    task: IdempotentTask,
    key: str,
    tag: str,
    answer: Callable[[int | None], dict[str, Any]],
    *,
    step: str | None = None,
    work: float = 0.0,
) -> dict[str, Any]:
    """The run's answer; with PostgreSQL, after its row and the completion commit.

    ``answer(row)`` builds it: ``row`` is the id of the row committed with the key's
    completion (None without PostgreSQL, where the body only sleeps its ``work``).
    """
    if POSTGRES:
        return database.commit_row(task, STORE, key, tag, answer, step=step, work=work)
    if work:
        time.sleep(work)
    return answer(None)


def named(answer: dict[str, Any], row: int | None) -> dict[str, Any]:
    """``answer`` naming its committed row (``row``), when there is one."""
    return answer if row is None else {**answer, "row": row}


@app.task(base=IdempotentTask, bind=True, name="chaos.op", autoretry_for=RETRIED, **RETRYING)
def op(self: IdempotentTask, key: str, tag: str, work: float = 0.0) -> dict[str, Any]:
    """One operation: the effect, some work, an answer naming the run that made it."""
    effect(self, key, tag)
    fence = self.idempotency_fence
    return finish(self, key, tag, lambda row: named({"key": key, "tag": tag, "fence": fence}, row),
                  work=work)  # fmt: skip


@app.task(
    base=IdempotentTask, bind=True, name="chaos.retry_op", autoretry_for=RETRIED,
    **{"max_retries": 8, **RETRYING},
)  # fmt: skip
def retry_op(self: IdempotentTask, key: str, tag: str) -> dict[str, Any]:
    """``self.retry()`` on its first attempt: the retry must find the key parked."""
    effect(self, key, tag, fails=self.request.retries == 0)
    if self.request.retries == 0:
        raise self.retry(countdown=0.2)
    fence = self.idempotency_fence
    return finish(self, key, tag, lambda row: named({"key": key, "tag": tag, "fence": fence}, row))


@app.task(
    base=IdempotentTask,
    bind=True,
    name="chaos.auto_op",
    autoretry_for=(Transient, *RETRIED),
    **{"default_retry_delay": 0.2, "max_retries": 8, **RETRYING},
)
def auto_op(self: IdempotentTask, key: str, tag: str) -> dict[str, Any]:
    """``autoretry_for`` on its first attempt."""
    effect(self, key, tag, fails=self.request.retries == 0)
    if self.request.retries == 0:
        raise Transient(key)
    fence = self.idempotency_fence
    return finish(self, key, tag, lambda row: named({"key": key, "tag": tag, "fence": fence}, row))


@app.task(base=IdempotentTask, bind=True, name="chaos.step", autoretry_for=RETRIED, **RETRYING)
def step(self: IdempotentTask, previous: Any, key: str, name: str, tag: str) -> dict[str, Any]:
    """One step of a chain through idempotent steps; its answer carries the path so far
    (each step's ``[name, fence]``, and with PostgreSQL its committed row)."""
    effect(self, key, tag, step=name)
    fence = self.idempotency_fence

    def answer(row: int | None) -> dict[str, Any]:
        here = [name, fence] if row is None else [name, fence, row]
        return {"key": key, "tag": tag, "path": [*(previous or {}).get("path", []), here]}

    return finish(self, key, tag, answer, step=name)
