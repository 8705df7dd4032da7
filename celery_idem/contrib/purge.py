"""``celery_idem.purge``: a task for ``beat_schedule`` that deletes expired records.

The PostgreSQL store has no background service of ours: a claim reuses an expired row
of its own key, and the rest wait for a purge, ``celery idem purge`` from cron or this
task from Celery beat. Importing this module registers the task on every Celery app
(a shared task), so name the module in the app's ``imports`` and schedule the task::

    app.conf.imports = [*app.conf.imports, "celery_idem.contrib.purge"]
    app.conf.beat_schedule = {
        "celery-idem-purge": {
            "task": "celery_idem.purge",
            "schedule": 3600.0,  # every hour; celery.schedules.crontab(minute=0) too
            "kwargs": {"batch": 1000},
        },
    }

(Django: ``CELERY_IMPORTS = ["celery_idem.contrib.purge"]`` and ``CELERY_BEAT_SCHEDULE``.)
It purges the store of the app's settings, or with ``kwargs={"task": NAME}`` that
task's (for a task whose own ``idem_store_url`` names another database). It returns
how many records it deleted. On Redis, which expires records itself, it does nothing
and returns 0, so the schedule can stay when a project moves from one store to the
other. :func:`purge_expired_records` does the same without Celery's task machinery.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

from celery_idem.cli.maintenance import DEFAULT_BATCH, Purged, purge_expired
from celery_idem.config import IdemSettings, resolve_settings
from celery_idem.store import admin_for
from celery_idem.task import IdempotentTask

__all__ = ["PURGE_TASK", "purge", "purge_expired_records"]

PURGE_TASK = "celery_idem.purge"
"""The task's name, as ``beat_schedule`` names it."""

logger = logging.getLogger(__name__)


def _settings(app: Any, task_name: str | None) -> IdemSettings:
    """The app's celery-idem settings, or the idempotent task ``task_name``'s."""
    if task_name is None:
        return resolve_settings(app.conf)
    task = app.tasks.get(task_name)
    if not isinstance(task, IdempotentTask):
        raise ValueError(f"{task_name!r} is not an idempotent task of app {app.main!r}")
    return task.idem_settings()


def purge_expired_records(
    app: Any, *, batch: int = DEFAULT_BATCH, task_name: str | None = None
) -> Purged:
    """Delete the expired records of ``app``'s store (or ``task_name``'s), in batches.

    Args:
        app: The Celery app whose settings name the store.
        batch: Rows deleted per transaction.
        task_name: Purge this idempotent task's store instead of the app's.

    Raises:
        IdempotencyError: The store is unreachable, or refused.
        ValueError: ``task_name`` is not an idempotent task of ``app``.
    """
    settings = _settings(app, task_name)
    store = admin_for(settings.endpoint, task_name=task_name, app_name=app.main)
    return purge_expired(settings, store, batch=batch)


def _purge(self: Any, batch: int = DEFAULT_BATCH, task: str | None = None) -> int:
    """Delete the expired records of this app's store (``task``: that task's); the count."""
    purged = purge_expired_records(self.app, batch=batch, task_name=task)
    if purged.note is not None:
        logger.info("celery-idem purge: %s: %s", purged.store, purged.note)
    else:
        logger.info(
            "celery-idem purge: %s: deleted %d expired record(s)", purged.store, purged.deleted
        )
    return purged.deleted


purge = shared_task(bind=True, name=PURGE_TASK)(_purge)
"""The task ``celery_idem.purge`` (``batch``, ``task`` keyword arguments): the count deleted."""
