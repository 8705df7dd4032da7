"""Demo only: the counters the demo's report reads, written by either flavour's workers.

Nothing here is needed by a real project. A task counts its real executions
(:func:`count`), and receivers of celery-idem's ``replayed`` and ``step_replayed``
signals count the deliveries and steps answered from the store instead, per key, in a
Redis database of the demo's own. Each flavour says where that database is and whose
replays count with :func:`use` (the Redis flavour in ``example_project.tasks``, the
Django one in ``django_flavour/shop/demo_hooks.py``); a worker imports one of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import redis

from celery_idem import signals

__all__ = ["REPORT_TTL", "count", "report_client", "use"]

REPORT_TTL = 24 * 3600  # seconds the demo's counters are kept

_url_of: Callable[[], str] | None = None
_reported: frozenset[str] | None = None
_report: tuple[int, redis.Redis] | None = None


def use(url_of: Callable[[], str], tasks: Iterable[str] | None = None) -> None:
    """Report to the Redis URL ``url_of()`` gives (read at first use), the replays of
    ``tasks`` only (None: of every task of the process)."""
    global _url_of, _reported
    _url_of, _reported = url_of, None if tasks is None else frozenset(tasks)


def report_client() -> redis.Redis:
    """A Redis client for the report counters, one per process (prefork children)."""
    global _report  # noqa: PLW0603 - one client per process
    if _report is None or _report[0] != os.getpid():
        if _url_of is None:
            raise RuntimeError("example_project.report.use() was not called in this process")
        _report = (os.getpid(), redis.Redis.from_url(_url_of()))
    return _report[1]


def count(what: str, name: str | None) -> None:
    """Add one to the report counter ``demo:<what>:<name>`` (kept for a day)."""
    counter = f"demo:{what}:{name}"
    with report_client().pipeline() as pipe:
        pipe.incr(counter)
        pipe.expire(counter, REPORT_TTL)
        pipe.execute()


def _reports(sender: Any) -> bool:
    return _url_of is not None and (_reported is None or getattr(sender, "name", None) in _reported)


@signals.replayed.connect
def count_replay(
    sender: Any = None,
    key: str | None = None,
    task_id: str | None = None,
    original_task_id: str | None = None,
    **_: Any,
) -> None:
    """Record the deliveries answered from the stored result (the body did not run).

    A set of task ids, not a counter: a delivery's message can itself be delivered
    twice by the broker (visibility timeout), and that is still one delivery. A replay
    to the very message that ran (``original_task_id``) is such a redelivery too.
    """
    if not _reports(sender) or task_id == original_task_id:
        return
    replays = f"demo:replays:{key}"
    with report_client().pipeline() as pipe:
        pipe.sadd(replays, str(task_id))
        pipe.expire(replays, REPORT_TTL)
        pipe.execute()


@signals.step_replayed.connect
def count_step_replay(
    sender: Any = None, key: str | None = None, step: str | None = None, **_: Any
) -> None:
    """Record the durable steps answered from the key's record (their function did not run).

    A list of step names per key, in replay order: the demo checks which steps a
    redelivered message replayed.
    """
    if not _reports(sender):
        return
    replays = f"demo:step-replays:{key}"
    with report_client().pipeline() as pipe:
        pipe.rpush(replays, str(step))
        pipe.expire(replays, REPORT_TTL)
        pipe.execute()
