"""Connect: every way to get a store for an :class:`~celery_idem.endpoint.Endpoint`.

A task's hot path gets a :class:`~celery_idem.store.base.Store` (:func:`store_for`),
``celery idem`` and the worker's start-up check a
:class:`~celery_idem.store.base.StoreAdmin` (:func:`admin_for`). Both come from one
store per process and endpoint: ``memory://NAME`` is an in-process
:class:`~celery_idem.store.memory.MemoryStore`, ``postgresql://`` a
:class:`~celery_idem.store.postgres.PostgresStore` (imported only then: psycopg is an
optional dependency), anything else a
:class:`~celery_idem.store.redis.RedisStore` whose client ``clients`` builds, kept per
pid so a prefork child never shares a socket with its parent. One store holds one
client and one set of registered scripts, whichever protocol it is used through.

While a test holds an override (:func:`override_store`, behind
``celery_idem.testing.use_memory_store`` and the ``idem_store`` fixture), every store of
the process is that one :class:`~celery_idem.store.memory.MemoryStore`, whatever the
endpoint. Every task (of any app, with its own store settings or not), the CLI and the
worker's start-up check get their store here, so none of them reaches Redis meanwhile.
"""

from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from celery_idem.config import resolve_settings
from celery_idem.endpoint import Endpoint, Topology
from celery_idem.exceptions import IdempotencyConfigError
from celery_idem.store.base import Store, StoreAdmin
from celery_idem.store.clients import client_for
from celery_idem.store.memory import MemoryStore
from celery_idem.store.redis import RedisStore

if TYPE_CHECKING:
    from celery_idem.store.postgres import PostgresStore

__all__ = [
    "admin_for",
    "client_for",
    "drop_memory_store",
    "end_store_override",
    "override_store",
    "postgres_store_for",
    "redis_store_for",
    "store_for",
    "store_for_url",
]

_memory_stores: dict[str, MemoryStore] = {}
_redis_stores: dict[tuple[int, str], RedisStore] = {}
_redis_stores_lock = threading.Lock()
_postgres_stores: dict[tuple[int, str], PostgresStore] = {}


@dataclass(frozen=True, slots=True)
class _Override:
    store: MemoryStore
    pid: int
    """The process that installed it: a forked child has only a copy of its records."""


_overrides: tuple[_Override, ...] = ()
"""Active overrides, innermost last; replaced (never mutated) under the lock, so a
reader in another thread sees one consistent tuple without taking it."""
_overrides_lock = threading.Lock()


def override_store(store: MemoryStore) -> None:
    """Until :func:`end_store_override`, every store of this process is ``store``.

    Overrides nest: the innermost wins, and ending one (in any order) uncovers the one
    below. Callers must then invalidate the tasks' cached specs
    (``celery_idem.task.invalidate_settings``): a task keeps the store it resolved.
    """
    global _overrides  # noqa: PLW0603 - process-wide by design
    with _overrides_lock:
        _overrides = (*_overrides, _Override(store, os.getpid()))


def end_store_override(store: MemoryStore) -> None:
    """Remove the override of ``store`` (nothing if it is not installed)."""
    global _overrides  # noqa: PLW0603 - process-wide by design
    with _overrides_lock:
        _overrides = tuple(o for o in _overrides if o.store is not store)


def store_for(
    endpoint: Endpoint | None, *, task_name: str | None = None, app_name: str | None = None
) -> Store:
    """The process's store for an endpoint: ``memory://NAME`` in process, else Redis.

    Under :func:`override_store`, the override's store, whatever the endpoint.

    Raises:
        IdempotencyConfigError: No store could be found in the app's configuration, or
            redis-py refused the endpoint; or an override is active in the process this
            one was forked from (its store cannot be shared with a child).
    """
    return _shared(endpoint, task_name, app_name)


def admin_for(
    endpoint: Endpoint | None, *, task_name: str | None = None, app_name: str | None = None
) -> StoreAdmin:
    """The operators' tools on the process's store for an endpoint (see :func:`store_for`).

    Raises:
        IdempotencyConfigError: As :func:`store_for`.
    """
    return _shared(endpoint, task_name, app_name)


def store_for_url(url: str | None, *, task_name: str | None = None) -> Store:
    """The process's store for an ``idem_store_url`` (any of its forms).

    Raises:
        IdempotencyConfigError: No URL, or one that names no store.
    """
    conf = {"idem_store_url": url} if url else {}
    return store_for(resolve_settings(conf, task_name=task_name).endpoint, task_name=task_name)


def drop_memory_store(url: str) -> None:
    """Forget the in-process store of a ``memory://`` URL (after a test)."""
    _memory_stores.pop(url, None)


def redis_store_for(endpoint: Endpoint) -> RedisStore:
    """The process's store for ``endpoint``: one client (and pool) per process.

    Keyed by pid, so a prefork child never shares a socket with its parent.
    """
    key = (os.getpid(), endpoint.cache_key)
    store = _redis_stores.get(key)
    if store is None:
        with _redis_stores_lock:
            store = _redis_stores.get(key)
            if store is None:
                store = _redis_stores[key] = RedisStore.for_endpoint(endpoint)
    return store


def postgres_store_for(endpoint: Endpoint, *, task_name: str | None = None) -> PostgresStore:
    """The process's PostgreSQL store for ``endpoint``: one pool per process.

    Raises:
        IdempotencyConfigError: psycopg is not installed.
    """
    key = (os.getpid(), endpoint.cache_key)
    store = _postgres_stores.get(key)
    if store is None:
        try:
            postgres = importlib.import_module("celery_idem.store.postgres")
        except ImportError as exc:
            raise IdempotencyConfigError(
                f"the idempotency store {endpoint.display!r} is PostgreSQL, which needs "
                f"psycopg 3 ({exc}): pip install 'celery-idem[postgres]' (or "
                "psycopg[binary]).",
                task_name=task_name,
            ) from exc
        with _redis_stores_lock:
            store = _postgres_stores.get(key)
            if store is None:
                store = _postgres_stores[key] = postgres.PostgresStore.from_url(endpoint.url or "")
    return store


def _overridden(task_name: str | None, app_name: str | None) -> MemoryStore | None:
    """The override's store, if one is active; refused in a child forked under it."""
    overrides = _overrides
    if not overrides:
        return None
    override = overrides[-1]
    if override.pid != os.getpid():
        whose = f"task {task_name!r}" if task_name else "the store"
        if app_name:
            whose += f" of app {app_name!r}"
        raise IdempotencyConfigError(
            f"celery_idem.testing's in-memory store (use_memory_store / the idem_store "
            f"fixture) cannot cover {whose} in process {os.getpid()}: the store lives in "
            f"process {override.pid}, which this one was forked from (a prefork pool "
            f"child?), and a copy would not share its records. Run the task in the "
            f"test's process: eagerly, or on a worker with the solo or threads pool.",
            task_name=task_name,
        )
    return override.store


def _shared(
    endpoint: Endpoint | None, task_name: str | None, app_name: str | None = None
) -> MemoryStore | RedisStore | PostgresStore:
    """The one store of this process for ``endpoint``: both protocols, one client."""
    overridden = _overridden(task_name, app_name)
    if overridden is not None:
        return overridden
    if endpoint is None:
        raise IdempotencyConfigError(
            "no store is configured for the idempotency records: set idem_store_url "
            "(e.g. 'redis://localhost:6379/1' or 'postgresql://user@host/db'), or use a "
            "Redis result_backend or broker_url.",
            task_name=task_name,
        )
    if endpoint.topology is Topology.MEMORY:
        url = endpoint.url or "memory://"
        return _memory_stores.setdefault(url, MemoryStore())
    if endpoint.topology is Topology.POSTGRES:
        return postgres_store_for(endpoint, task_name=task_name)
    return redis_store_for(endpoint)
