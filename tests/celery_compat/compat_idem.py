"""The task base that ``compat_plugin`` makes every Celery app's default (idempotent run).

A module of its own so that Celery imports it, by name, only in the idempotent run:
the plain run never imports celery-idem.
"""

from __future__ import annotations

from compat_plugin import STORE_URL

from celery_idem import IdempotentTask


class CompatTask(IdempotentTask):
    """IdempotentTask on the in-process store (a task-level setting: it wins over the app's)."""

    idem_redis_url = STORE_URL
