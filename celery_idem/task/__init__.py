"""IdempotentTask: the only code that knows Celery's task machinery.

One execution goes: find the key (``keys``), ask the store in one round trip
(``store.claim``), then run the body under a renewed lease and store its outcome (one
more round trip), or replay the stored outcome, or wait, or refuse. Settings come
from ``config`` (resolved once per task and process), Redis only from ``store``.

``base`` holds the class and its hooks into Celery, ``publish`` the publishing side,
``execution`` one message's execution on the worker, ``spec`` what a task computes once
per process, ``headers`` the message headers, ``worker`` the start-up checks,
``handover`` the end of a ``self.replace()``, ``atomic`` the transactional completion
(``self.idem_atomic()``, ``step(atomic=...)``) on the connections ``transactions`` knows.
"""

from __future__ import annotations

from celery_idem.task import worker as _worker  # noqa: F401 - connects worker_init
from celery_idem.task.base import IdempotentTask
from celery_idem.task.headers import HEADER
from celery_idem.task.spec import invalidate_settings

__all__ = ["HEADER", "IdempotentTask", "invalidate_settings"]
