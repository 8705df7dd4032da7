"""Demo only: the counters the demo's report reads, and the points where a run can be held.

Nothing here is needed by a real project. As in the Redis flavour (``example_project.
tasks``), the task counts its executions and celery-idem's step replays in a Redis
database of their own (``DEMO_REPORT_URL``, through ``example_project.report``), and
:func:`hold` lets the demo kill the worker at an exact point of a run, with no sleeps on
the demo's side.
"""

from __future__ import annotations

import json
import os
import time

from celery.utils.log import get_task_logger
from django.conf import settings

from celery_idem import IdempotentTask
from example_project import report
from example_project.report import REPORT_TTL, count, report_client

logger = get_task_logger(__name__)
# Every idempotent task of this worker is reported: there is one, the welcome.
report.use(lambda: str(settings.DEMO_REPORT_URL))

__all__ = ["count", "hold"]


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
