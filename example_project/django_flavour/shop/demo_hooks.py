"""Demo only: the counters the demo's report reads, and the points where a run can be held.

Nothing here is needed by a real project. As in the Redis flavour (``example_project.
tasks``), the task counts its executions and celery-idem's step replays in a Redis
database of their own (``DEMO_REPORT_URL``), and :func:`hold` lets the demo kill the
worker at an exact point of a run, with no sleeps on the demo's side.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery.utils.log import get_task_logger
from django.conf import settings

from celery_idem import IdempotentTask, signals

logger = get_task_logger(__name__)
REPORT_TTL = 24 * 3600  # seconds the counters are kept
_report: tuple[int, redis.Redis] | None = None


def report_client() -> redis.Redis:
    """A Redis client for the report, one per process (prefork children)."""
    global _report  # noqa: PLW0603 - one client per process
    if _report is None or _report[0] != os.getpid():
        _report = (os.getpid(), redis.Redis.from_url(settings.DEMO_REPORT_URL))
    return _report[1]


def count(what: str, name: str) -> None:
    """Add one to the report counter ``demo:<what>:<name>``."""
    counter = f"demo:{what}:{name}"
    with report_client().pipeline() as pipe:
        pipe.incr(counter)
        pipe.expire(counter, REPORT_TTL)
        pipe.execute()


def hold(task: IdempotentTask, point: str) -> None:
    """Hold the run here when ``DEMO_HOLD`` names ``<key>@<point>`` (comma-separated).

    The run reports that it is holding (``demo:pausing:<key>``: its pid, fence and
    point) and sleeps ``DEMO_PAUSE_SECONDS``; the demo SIGKILLs the worker meanwhile,
    and restarts it without that entry, so the redelivered message goes through.
    """
    key = task.idempotency_key
    if f"{key}@{point}" not in os.environ.get("DEMO_HOLD", "").split(","):
        return
    holding = {"pid": os.getpid(), "fence": task.idempotency_fence, "point": point}
    report_client().set(f"demo:pausing:{key}", json.dumps(holding), ex=REPORT_TTL)
    seconds = float(os.environ.get("DEMO_PAUSE_SECONDS", "30"))
    logger.warning("demo: holding %.0f s at %r (key %s)", seconds, point, key)
    time.sleep(seconds)


@signals.step_replayed.connect
def count_step_replay(
    sender: Any = None, key: str | None = None, step: str | None = None, **_: Any
) -> None:
    """Record the steps answered from the key's record (their function did not run)."""
    replays = f"demo:step-replays:{key}"
    with report_client().pipeline() as pipe:
        pipe.rpush(replays, str(step))
        pipe.expire(replays, REPORT_TTL)
        pipe.execute()


@signals.replayed.connect
def count_replay(
    sender: Any = None,
    key: str | None = None,
    task_id: str | None = None,
    original_task_id: str | None = None,
    **_: Any,
) -> None:
    """Record the deliveries answered from the stored result (a set of task ids)."""
    if task_id == original_task_id:  # the very message that ran, redelivered
        return
    replays = f"demo:replays:{key}"
    with report_client().pipeline() as pipe:
        pipe.sadd(replays, str(task_id))
        pipe.expire(replays, REPORT_TTL)
        pipe.execute()
