"""Stores: where idempotency records live. Only this package talks to Redis.

``record`` owns the record vocabulary (state letters, kinds, claim codes) and ``base``
the two protocols (pure): :class:`Store`, a task's hot path, and :class:`StoreAdmin`,
the operators' tools. ``redis`` is the production store, ``memory`` the in-process
store for users' tests; each implements both. ``connect`` keeps one store per process
and endpoint and hands it out as either: ``store_for`` and ``admin_for``.
"""

from __future__ import annotations

from celery_idem.store.base import (
    ClaimOutcome,
    ClaimRequest,
    CompleteRequest,
    ReserveRequest,
    StepRecord,
    StepRequest,
    Store,
    StoreAdmin,
    Stored,
    StoredRecord,
)
from celery_idem.store.connect import admin_for, drop_memory_store, store_for, store_for_url
from celery_idem.store.memory import MemoryStore
from celery_idem.store.record import ClaimState, RecordKind, RecordState

__all__ = [
    "ClaimOutcome",
    "ClaimRequest",
    "ClaimState",
    "CompleteRequest",
    "MemoryStore",
    "RecordKind",
    "RecordState",
    "ReserveRequest",
    "StepRecord",
    "StepRequest",
    "Store",
    "StoreAdmin",
    "Stored",
    "StoredRecord",
    "admin_for",
    "drop_memory_store",
    "store_for",
    "store_for_url",
]
