"""Helpers for users' own tests: the in-memory store, installed for the whole process.

``use_memory_store()`` points every IdempotentTask in the process, of every app, at a
fresh :class:`~celery_idem.store.memory.MemoryStore` (the same semantics as Redis, in
the process), whatever store the app or the task is configured with; it pairs with
``task_always_eager``, ``.apply()`` or a worker running in the test's process. The
pytest plugin in ``celery_idem.testing.plugin`` wraps it as the ``idem_store`` fixture.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery_idem.store.connect import end_store_override, override_store
from celery_idem.store.memory import MemoryStore
from celery_idem.task import invalidate_settings

__all__ = ["MemoryStore", "use_memory_store"]


@contextmanager
def use_memory_store(app: Any = None) -> Iterator[MemoryStore]:
    """Run every idempotent task of the process against a fresh in-memory store.

    Every task of every app uses the store while the block runs: the app given, the app
    a task was declared on (with Celery's pytest plugin, ``celery_app`` is another app
    object), and a task with its own ``idem_redis_url`` or other store options. The
    apps' configuration is not changed; nothing reaches their Redis. Blocks nest (the
    innermost store wins until its block ends). A process forked inside the block (a
    prefork pool child) refuses to run idempotent tasks, naming the task and its app,
    rather than keep a copy of the store that the test cannot see.

    Args:
        app: Accepted for compatibility with earlier versions, which covered only this
            app; it changes nothing.

    Yields:
        The store, so a test can read records (``store.read(...)``) or ``clear()`` it.
    """
    del app  # every app is covered
    store = MemoryStore()
    override_store(store)
    invalidate_settings()  # a task keeps the store it resolved: resolve again
    try:
        yield store
    finally:
        end_store_override(store)
        store.clear()
        invalidate_settings()
