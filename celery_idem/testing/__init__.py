"""Helpers for users' own tests: the in-memory store, installed on an app.

``use_memory_store(app)`` points every IdempotentTask of ``app`` at a fresh
:class:`~celery_idem.store.memory.MemoryStore` (the same semantics as Redis, in the
process), which pairs with ``task_always_eager`` or ``.apply()``. The pytest plugin in
``celery_idem.testing.plugin`` wraps it as the ``idem_store`` fixture.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery_idem.store import drop_memory_store, store_for_url
from celery_idem.store.memory import MemoryStore
from celery_idem.task import invalidate_settings

__all__ = ["MemoryStore", "use_memory_store"]

_names = itertools.count(1)


@contextmanager
def use_memory_store(app: Any) -> Iterator[MemoryStore]:
    """Run ``app``'s idempotent tasks against a fresh in-memory store, then restore.

    Args:
        app: The Celery app whose ``idem_redis_url`` is replaced for the duration.

    Yields:
        The store, so a test can read records (``store.read(...)``) or ``clear()`` it.
    """
    url = f"memory://celery-idem-test-{next(_names)}"
    had = "idem_redis_url" in app.conf
    previous = app.conf.get("idem_redis_url")
    app.conf.idem_redis_url = url
    invalidate_settings()
    store = store_for_url(url)
    assert isinstance(store, MemoryStore)
    try:
        yield store
    finally:
        store.clear()
        drop_memory_store(url)
        if had:
            app.conf.idem_redis_url = previous
        else:
            app.conf.pop("idem_redis_url", None)
        invalidate_settings()
