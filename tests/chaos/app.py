"""The chaos soak's Celery app and tasks, run by real prefork workers.

Configured from environment variables that the orchestrator (``tests.chaos.run``) sets,
so the publisher process, the orchestrator and every worker build the same app. Broker,
result backend and ledger live on a server the nemesis leaves alone; the store is
reached through the fault proxy, in front of a server the nemesis restarts.

Every body appends one effect to the ledger (a Redis list the library never touches)
*before* it returns, with what the checker needs to explain a second run: the logical
key, the fence, the attempt, the process, the time. The checker reads only that ledger
and the publisher's history, never celery-idem's records.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery
from celery.signals import task_prerun

from celery_idem import IdempotentTask
from tests.worker_settings import redelivering_worker

BROKER = os.environ.get("CHAOS_BROKER_URL", "memory://")
BACKEND = os.environ.get("CHAOS_BACKEND", "cache+memory://")
STORE = os.environ.get("CHAOS_STORE", "memory://chaos")
LEDGER = os.environ.get("CHAOS_LEDGER", "")
LEASE = float(os.environ.get("CHAOS_LEASE", "2"))
VISIBILITY = 10.0
"""Seconds before the Redis broker hands a killed worker's unacked messages out again."""
LEDGER_LIST = "chaos:ledger"
DELIVERIES_LIST = "chaos:deliveries"

app = Celery("chaos", broker=BROKER, backend=BACKEND)
app.conf.update(
    idem_redis_url=STORE,
    idem_lease=LEASE,
    idem_redis_options={"socket_timeout": 1.0, "socket_connect_timeout": 1.0},
    **redelivering_worker(VISIBILITY),
    worker_hijack_root_logger=False,
    task_default_queue=os.environ.get("CHAOS_QUEUE", "chaos"),
)


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


@app.task(base=IdempotentTask, bind=True, name="chaos.op")
def op(self: IdempotentTask, key: str, tag: str, work: float = 0.0) -> dict[str, Any]:
    """One operation: the effect, some work, an answer naming the run that made it."""
    effect(self, key, tag)
    if work:
        time.sleep(work)
    return {"key": key, "tag": tag, "fence": self.idempotency_fence}


@app.task(base=IdempotentTask, bind=True, name="chaos.retry_op", max_retries=8)
def retry_op(self: IdempotentTask, key: str, tag: str) -> dict[str, Any]:
    """``self.retry()`` on its first attempt: the retry must find the key parked."""
    effect(self, key, tag, fails=self.request.retries == 0)
    if self.request.retries == 0:
        raise self.retry(countdown=0.2)
    return {"key": key, "tag": tag, "fence": self.idempotency_fence}


@app.task(
    base=IdempotentTask,
    bind=True,
    name="chaos.auto_op",
    autoretry_for=(Transient,),
    default_retry_delay=0.2,
    max_retries=8,
)
def auto_op(self: IdempotentTask, key: str, tag: str) -> dict[str, Any]:
    """``autoretry_for`` on its first attempt."""
    effect(self, key, tag, fails=self.request.retries == 0)
    if self.request.retries == 0:
        raise Transient(key)
    return {"key": key, "tag": tag, "fence": self.idempotency_fence}


@app.task(base=IdempotentTask, bind=True, name="chaos.step")
def step(self: IdempotentTask, previous: Any, key: str, name: str, tag: str) -> dict[str, Any]:
    """One step of a chain through idempotent steps; its answer carries the path so far."""
    effect(self, key, tag, step=name)
    path = [*(previous or {}).get("path", []), [name, self.idempotency_fence]]
    return {"key": key, "tag": tag, "path": path}
