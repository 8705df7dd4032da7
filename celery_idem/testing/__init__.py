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

from celery_idem.settings_table import TABLE
from celery_idem.store import drop_memory_store, store_for_url
from celery_idem.store.memory import MemoryStore
from celery_idem.task import invalidate_settings

__all__ = ["MemoryStore", "use_memory_store"]

_names = itertools.count(1)
_STORE_ROWS = tuple(r for r in TABLE if r.name.startswith("idem_redis") or "replicas" in r.name)
# Django's spellings too (CELERY_IDEM_REDIS_CLIENT, ...): either would still apply.
_STORE_SETTINGS = (*(r.name for r in _STORE_ROWS), *(r.django for r in _STORE_ROWS))


@contextmanager
def use_memory_store(app: Any) -> Iterator[MemoryStore]:
    """Run ``app``'s idempotent tasks against a fresh in-memory store, then restore.

    Args:
        app: The Celery app whose ``idem_redis_url`` is replaced for the duration.

    Yields:
        The store, so a test can read records (``store.read(...)``) or ``clear()`` it.
    """
    url = f"memory://celery-idem-test-{next(_names)}"
    # The other store settings would contradict the memory URL (Sentinels, Cluster,
    # a client factory): unset them for the duration too.
    saved = {name: (name in app.conf, app.conf.get(name)) for name in _STORE_SETTINGS}
    for name in _STORE_SETTINGS:
        app.conf[name] = None
    app.conf.idem_redis_url = url
    invalidate_settings()
    store = store_for_url(url)
    assert isinstance(store, MemoryStore)
    try:
        yield store
    finally:
        store.clear()
        drop_memory_store(url)
        for name, (had, previous) in saved.items():
            if had:
                app.conf[name] = previous
            else:
                app.conf.pop(name, None)
        invalidate_settings()
