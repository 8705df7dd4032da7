"""Stores: where idempotency records live. Only this package talks to Redis.

``base`` holds the contract (pure), ``redis`` the production store, ``memory`` the
in-process store for users' tests. ``store_for`` picks one for an endpoint (``connect``
builds its client).
"""

from __future__ import annotations

from celery_idem.config import resolve_settings
from celery_idem.endpoint import Endpoint, Topology
from celery_idem.exceptions import IdempotencyConfigError
from celery_idem.store.base import ClaimOutcome, ClaimState, RecordKind, Store, Stored, StoredRecord
from celery_idem.store.memory import MemoryStore

__all__ = [
    "ClaimOutcome",
    "ClaimState",
    "MemoryStore",
    "RecordKind",
    "Store",
    "Stored",
    "StoredRecord",
    "drop_memory_store",
    "store_for",
    "store_for_url",
]

_memory_stores: dict[str, MemoryStore] = {}


def store_for(endpoint: Endpoint | None, *, task_name: str | None = None) -> Store:
    """The process's store for an endpoint: ``memory://NAME`` in process, else Redis.

    Raises:
        IdempotencyConfigError: No store could be found in the app's configuration, or
            redis-py refused the endpoint.
    """
    if endpoint is None:
        raise IdempotencyConfigError(
            "celery-idem found no Redis to keep its records in: set idem_redis_url "
            "(e.g. 'redis://localhost:6379/1'), or use a Redis result_backend or broker_url.",
            task_name=task_name,
        )
    if endpoint.topology is Topology.MEMORY:
        url = endpoint.url or "memory://"
        return _memory_stores.setdefault(url, MemoryStore())
    from celery_idem.store.connect import redis_store_for  # noqa: PLC0415 - keeps redis optional for memory://

    return redis_store_for(endpoint)


def store_for_url(url: str | None, *, task_name: str | None = None) -> Store:
    """The process's store for an ``idem_redis_url`` (any of its forms).

    Raises:
        IdempotencyConfigError: No URL, or one that names no store.
    """
    conf = {"idem_redis_url": url} if url else {}
    return store_for(resolve_settings(conf, task_name=task_name).endpoint, task_name=task_name)


def drop_memory_store(url: str) -> None:
    """Forget the in-process store of a ``memory://`` URL (after a test)."""
    _memory_stores.pop(url, None)
