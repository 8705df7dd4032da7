"""Eager-mode fixtures shared by the unit tests of the task machinery.

``env`` gives each test its own eager Celery app, run twice: against the in-process
``MemoryStore`` and against the suite's redis-server (db 5, the per-test key prefix,
deleted afterwards). Tasks are registered on that app only (``shared=False``), so no
task, setting or record leaks into another test.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from celery import Celery

from celery_idem import IdempotentTask
from celery_idem.keys import storage_key
from celery_idem.store import Store, StoredRecord, store_for_url
from celery_idem.task import invalidate_settings
from celery_idem.testing import use_memory_store
from tests.integration.conftest import with_db

STORE_DB = 5
"""The Redis database the Redis-backed variant keeps its records in."""


@dataclass
class Env:
    """One test's eager app, the store its tasks use and their key prefix."""

    app: Celery
    store: Store
    prefix: str

    def task(self, **options: Any) -> Callable[[Callable[..., Any]], Any]:
        """Register a function on this app as an IdempotentTask (never shared)."""

        def register(fn: Callable[..., Any]) -> Any:
            return self.app.task(
                fn,
                base=IdempotentTask,
                shared=False,
                name=f"{self.app.main}.{fn.__name__}",
                **options,
            )

        return register

    def storage(self, task: Any, key: str) -> str:
        """The Redis key under which ``task`` keeps ``key`` (in its ``idem_scope``)."""
        return storage_key(self.prefix, task.idem_settings().scope_of(task.name), key)

    def record(self, task: Any, key: str) -> StoredRecord | None:
        """The store's record for ``key`` of ``task``."""
        return self.store.read(self.storage(task, key))


def make_app(tag: str) -> Celery:
    app = Celery(
        f"{tag}-{uuid.uuid4().hex[:8]}",
        broker="memory://",
        backend="cache+memory://",
        set_as_current=False,
    )
    app.conf.task_always_eager = True
    return app


@pytest.fixture(params=["memory", "redis"])
def env(request: pytest.FixtureRequest, redis_url: str, key_prefix: str) -> Iterator[Env]:
    """An eager app on the MemoryStore, or on the suite's Redis (db 5)."""
    app = make_app(f"{request.module.__name__.rsplit('.', 1)[-1]}-{request.param}")
    app.conf.idem_key_prefix = key_prefix
    if request.param == "memory":
        with use_memory_store(app) as store:
            yield Env(app, store, key_prefix)
        return
    url = with_db(redis_url, STORE_DB)
    app.conf.idem_redis_url = url
    invalidate_settings()
    try:
        yield Env(app, store_for_url(url), key_prefix)
    finally:
        invalidate_settings()


class Sent:
    """Records what reached ``app.send_task``: what would have gone to the broker."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, name: str, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        self.calls.append({"name": name, "args": args, "kwargs": kwargs, **options})
        return None


@pytest.fixture
def sent(app: Celery, monkeypatch: pytest.MonkeyPatch) -> Sent:
    """``app.send_task`` recorded, not sent (the test module provides ``app``)."""
    recorder = Sent()
    monkeypatch.setattr(app, "send_task", recorder)
    return recorder
