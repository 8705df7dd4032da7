"""The benchmark's Celery app: one task per contender, all on the same body.

Imported by the worker (``celery -A benchmarks.app worker``) and by the publisher
process; both read the servers from the environment (``BENCH_*``, set by the harness):

- ``BENCH_BROKER``, ``BENCH_BACKEND``, ``BENCH_COUNTER``: three databases of one
  redis-server (broker, result backend, the completion counter);
- ``BENCH_STORE_IDEM``, ``BENCH_STORE_ONCE``, ``BENCH_STORE_SINGLETON``,
  ``BENCH_STORE_FLOOR``: one dedicated redis-server each, so that every command a
  contender sends to its store can be counted (celery-idem's ``idem_dedupe_on_publish``
  variant uses celery-idem's, the two floors share one; runs never overlap);
- ``BENCH_IGNORE_RESULT``: ``1`` sets ``task_ignore_result`` (no result backend writes),
  the setting of the issue's side-by-side figures; unset, every task writes its result.

Every contender's task calls :func:`body`, which sleeps ``sleep_ms`` and returns
``"<key>:<task id of the message whose body ran>"``: a duplicate that is answered with
the first run's result is recognisable, and the distinct values per key count the body
runs. Completion is counted by a ``task_postrun`` handler (state ``SUCCESS``, after the
contender's own after-run work such as releasing its lock), one ``INCR`` per delivery,
the same for every contender. A ``task_retry`` handler counts re-queued executions
(celery-idem's deferred duplicates), also one ``INCR`` each.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery, Task
from celery.signals import task_postrun, task_retry
from celery_once import QueueOnce
from celery_singleton import Singleton

from celery_idem import IdempotentTask

__all__ = ["COUNTER_KEY", "QUEUE", "RETRIES_KEY", "app", "body", "task_for"]

QUEUE = "bench"
COUNTER_KEY = "bench:done"
RETRIES_KEY = "bench:retries"
LONG_LEASE = 3.0
"""``idem_lease`` of the long-task scenario: a 1.8 s body passes lease/3 once."""

_env = os.environ.get
app = Celery("bench")
app.conf.update(
    broker_url=_env("BENCH_BROKER", "memory://"),
    result_backend=_env("BENCH_BACKEND", "cache+memory://"),
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    # celery-idem: its own store, default TTL (24 h) and lease (60 s).
    idem_redis_url=_env("BENCH_STORE_IDEM", "memory://bench"),
    # celery-once: locks on its own server; the default timeout (1 h) as documented.
    ONCE={
        "backend": "celery_once.backends.Redis",
        "settings": {"url": _env("BENCH_STORE_ONCE", ""), "default_timeout": 3600},
    },
    # celery-singleton: its own server; no lock expiry (its default).
    singleton_backend_url=_env("BENCH_STORE_SINGLETON", ""),
    task_ignore_result=_env("BENCH_IGNORE_RESULT", "") == "1",
)
FLOOR_TTL = 86400
"""The floors' keys expire like celery-idem's records (its default TTL, 24 h)."""


def body(task: Task, key: str, sleep_ms: float = 0) -> str:
    """The one task body of every contender (and scenario)."""
    if sleep_ms:
        time.sleep(sleep_ms / 1000.0)
    return f"{key}:{task.request.id}"


@app.task(bind=True, name="bench.plain")
def plain(self: Task, key: str, sleep_ms: float = 0) -> str:
    """Plain Celery: no deduplication at all."""
    return body(self, key, sleep_ms)


@app.task(bind=True, name="bench.plain_rt1")
def plain_rt1(self: Task, key: str, sleep_ms: float = 0) -> str:
    """Plain Celery + 1 raw round trip: a SET NX per task, the floor of a one-command claim."""
    _floor().set(f"floor:{key}", self.request.id, nx=True, ex=FLOOR_TTL)
    return body(self, key, sleep_ms)


@app.task(bind=True, name="bench.plain_rt2")
def plain_rt2(self: Task, key: str, sleep_ms: float = 0) -> str:
    """Plain Celery + 2 raw round trips: SET NX before, SET of the result after.

    The floor of any claim-then-complete design, whatever its scripts do.
    """
    client = _floor()
    client.set(f"floor:{key}", self.request.id, nx=True, ex=FLOOR_TTL)
    out = body(self, key, sleep_ms)
    client.set(f"floor:{key}", out, ex=FLOOR_TTL)
    return out


@app.task(bind=True, base=IdempotentTask, name="bench.idem")
def idem(self: Task, key: str, sleep_ms: float = 0) -> str:
    """celery-idem, key derived from the arguments (the default)."""
    return body(self, key, sleep_ms)


@app.task(bind=True, base=IdempotentTask, name="bench.idem_long", idem_lease=LONG_LEASE)
def idem_long(self: Task, key: str, sleep_ms: float = 0) -> str:
    """celery-idem with a short lease, so that long bodies renew it."""
    return body(self, key, sleep_ms)


@app.task(bind=True, base=IdempotentTask, name="bench.idem_pub", idem_dedupe_on_publish=True)
def idem_pub(self: Task, key: str, sleep_ms: float = 0) -> str:
    """celery-idem with ``idem_dedupe_on_publish``: a reservation before publishing."""
    return body(self, key, sleep_ms)


@app.task(bind=True, base=IdempotentTask, name="bench.idem_wait", idem_blocking_completion=True)
def idem_wait(self: Task, key: str, sleep_ms: float = 0) -> str:
    """celery-idem waiting for each completion's answer in the task's thread."""
    return body(self, key, sleep_ms)


@app.task(bind=True, base=QueueOnce, name="bench.once")
def once(self: Task, key: str, sleep_ms: float = 0) -> str:
    """celery-once: a lock taken at publish (AlreadyQueued), released after the run."""
    return body(self, key, sleep_ms)


@app.task(bind=True, base=Singleton, name="bench.singleton")
def singleton(self: Task, key: str, sleep_ms: float = 0) -> str:
    """celery-singleton: a lock at publish; a duplicate gets the queued task's result."""
    return body(self, key, sleep_ms)


def task_for(contender: str, *, long: bool = False) -> Task:
    """The task of ``contender`` (celery-idem's long variant when ``long``)."""
    if contender == "idem" and long:
        return idem_long
    return app.tasks[f"bench.{contender}"]


_clients: dict[tuple[int, str], redis.Redis] = {}


def _client(variable: str) -> redis.Redis:
    key = (os.getpid(), variable)  # one client per prefork child, never shared across fork()
    client = _clients.get(key)
    if client is None:
        client = _clients[key] = redis.Redis.from_url(_env(variable, ""))
    return client


def _counter() -> redis.Redis:
    return _client("BENCH_COUNTER")


def _floor() -> redis.Redis:
    """The floors' store: a redis-server of the same kind as celery-idem's."""
    return _client("BENCH_STORE_FLOOR")


@task_postrun.connect(weak=False)
def _count_completion(sender: Task | None = None, state: str | None = None, **_: Any) -> None:
    if state == "SUCCESS" and sender is not None and sender.name.startswith("bench."):
        _counter().incr(COUNTER_KEY)


@task_retry.connect(weak=False)
def _count_retry(sender: Task | None = None, **_: Any) -> None:
    if sender is not None and sender.name.startswith("bench."):
        _counter().incr(RETRIES_KEY)
