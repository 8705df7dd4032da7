"""Stores: where idempotency records live. Only this package talks to Redis.

``base`` holds the contract (pure), ``redis`` the production store, ``memory`` the
in-process store for users' tests. ``store_for_url`` picks one from a URL.
"""

from __future__ import annotations

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
    "store_for_url",
]

_memory_stores: dict[str, MemoryStore] = {}


def store_for_url(url: str | None, *, task_name: str | None = None) -> Store:
    """The store a URL names: ``memory://NAME`` in process, anything else Redis.

    Raises:
        IdempotencyConfigError: No URL could be found in the app's configuration.
    """
    if not url:
        raise IdempotencyConfigError(
            "celery-idem found no Redis to keep its records in: set idem_redis_url "
            "(e.g. 'redis://localhost:6379/1'), or use a Redis result_backend or broker_url.",
            task_name=task_name,
        )
    if url.startswith("memory://"):
        return _memory_stores.setdefault(url, MemoryStore())
    from celery_idem.store.redis import redis_store_for_url  # noqa: PLC0415 - keeps redis optional for memory://

    return redis_store_for_url(url)


def drop_memory_store(url: str) -> None:
    """Forget the in-process store of a ``memory://`` URL (after a test)."""
    _memory_stores.pop(url, None)
