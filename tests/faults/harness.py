"""Helpers of the worker fault scenarios: more workers on one queue, a child killer,
result counting straight from the result backend, and reading the effect ledger.

Everything here measures from the outside: the ledger the test tasks write, the
result backend's records, the worker processes. Nothing asks the library.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

import redis

from tests.integration.conftest import Worker

SUCCESS = "SUCCESS"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


def amqp_url() -> str:
    """The RabbitMQ of the ``rabbitmq`` marker: ``AMQP_URL``, else the local default (as
    ``tests/conftest.py``, which pytest loads as a plugin, not as an importable module).
    """
    return os.environ.get("AMQP_URL") or DEFAULT_AMQP_URL


def entries(ledger: redis.Redis, name: str) -> list[dict[str, Any]]:
    """The ledger list ``ledger:<name>``, decoded, oldest first."""
    return [json.loads(x) for x in ledger.lrange(f"ledger:{name}", 0, -1)]


def delivery_count(ledger: redis.Redis, name: str) -> int:
    """Messages handed to a worker for ``name`` (``t.wf_*`` tasks note each one).

    A first delivery of each task id, plus every broker redelivery (the broker's
    ``redelivered`` flag); a deferred duplicate coming back with the same task id is
    the same delivery, not a new one.
    """
    seen: set[str] = set()
    redelivered = 0
    for entry in entries(ledger, f"{name}:delivered"):
        seen.add(entry["task_id"])
        redelivered += bool(entry["redelivered"])
    return len(seen) + redelivered


def redelivered_count(ledger: redis.Redis, name: str, task_id: str) -> int:
    """How many times the broker redelivered ``task_id`` (its ``redelivered`` flag)."""
    return sum(
        1
        for entry in entries(ledger, f"{name}:delivered")
        if entry["task_id"] == task_id and entry["redelivered"]
    )


class Spawner:
    """Starts workers, optionally on an existing queue (a second worker on it, or a
    restart of a killed one); :meth:`kill_all` SIGKILLs every one it started.
    """

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.started: list[Worker] = []

    def __call__(self, queue: str | None = None, **kwargs: Any) -> Worker:
        w = Worker(self.env, **kwargs)
        if queue is not None:
            w.queue = queue
        self.started.append(w)
        return w.start()

    def kill_all(self) -> None:
        for w in self.started:
            w.kill()


class ChildKiller(threading.Thread):
    """SIGKILLs a random pool child of ``workers`` every ``every`` seconds (drawn from
    the range), at most ``max_kills`` times and for at most ``max_seconds``; stops by
    itself then, or on :meth:`stop`. ``killed`` lists the pids it killed.
    """

    def __init__(
        self,
        workers: Iterable[Worker],
        *,
        every: tuple[float, float] = (2.0, 3.0),
        max_kills: int = 10,
        max_seconds: float = 120.0,
        seed: int | None = None,
    ) -> None:
        super().__init__(name="child-killer", daemon=True)
        self.workers = list(workers)
        self.every = every
        self.max_kills = max_kills
        self.max_seconds = max_seconds
        self.killed: list[int] = []
        self._random = random.Random(seed)
        self._stop_event = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while len(self.killed) < self.max_kills:
            pause = self._random.uniform(*self.every)
            if time.monotonic() + pause > deadline or self._stop_event.wait(pause):
                return
            children = [pid for w in self.workers for pid in w.children()]
            if not children:
                continue
            pid = self._random.choice(children)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.killed.append(pid)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)

    def __enter__(self) -> ChildKiller:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def backend_records(
    backend: redis.Redis, task_ids: list[str], batch: int = 500
) -> dict[str, dict[str, Any] | None]:
    """Each task id's record in Celery's Redis result backend (None if there is none)."""
    out: dict[str, dict[str, Any] | None] = {}
    for start in range(0, len(task_ids), batch):
        chunk = task_ids[start : start + batch]
        values = backend.mget([f"celery-task-meta-{tid}" for tid in chunk])
        for tid, raw in zip(chunk, values, strict=True):
            out[tid] = json.loads(raw) if raw is not None else None
    return out


def wait_for_results(
    backend: redis.Redis, task_ids: list[str], timeout: float
) -> dict[str, dict[str, Any] | None]:
    """Poll the result backend until every task id is SUCCESS or ``timeout`` passes;
    returns the last records read (the caller counts what did not succeed).
    """
    deadline = time.monotonic() + timeout
    pending = list(task_ids)
    done: dict[str, dict[str, Any] | None] = {}
    while True:
        records = backend_records(backend, pending)
        done.update(records)
        pending = [t for t, r in records.items() if r is None or r["status"] != SUCCESS]
        if not pending or time.monotonic() >= deadline:
            return done
        time.sleep(0.25)


def states(records: dict[str, dict[str, Any] | None]) -> Counter[str]:
    """How many records are in each state (``MISSING`` for no record)."""
    return Counter("MISSING" if r is None else r["status"] for r in records.values())
