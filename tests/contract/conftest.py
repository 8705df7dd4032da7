"""The store contract suite's stores and helpers: every test runs on each ``backend``.

``backend`` is ``MemoryStore`` (time moved with freezegun), ``RedisStore`` on every
topology the suite starts itself (see ``test_store_contract.py``'s docstring) and
``PostgresStore`` on the suite's private PostgreSQL (schema migrated once per session;
skipped without psycopg); the contract's test modules share it from here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from freezegun import freeze_time

from celery_idem.store import ClaimRequest, CompleteRequest, MemoryStore, RecordKind, Store, Stored
from celery_idem.store.postgres import PostgresStore
from celery_idem.store.postgres_admin import migrate
from celery_idem.store.redis import RedisStore
from devtools.processes import wait_for

LEASE = 0.3
TTL = 30.0
RESULT = Stored(RecordKind.RESULT, b'{"ok": 1}', "j")


@dataclass
class Backend:
    store: Store
    prefix: str
    advance: Callable[[str, float], None]
    """Let ``seconds`` pass for the record ``key`` (freezegun, or a deadline wait)."""
    clock_ms: Callable[[], int]
    """The store's clock in ms: what a claim's fence starts from (Redis: ``TIME``)."""

    def key(self, name: str) -> str:
        return f"{self.prefix}:{name}"


REDIS_TOPOLOGIES = [
    "redis",
    pytest.param("cluster", marks=pytest.mark.cluster),
    pytest.param("sentinel", marks=pytest.mark.sentinel),
    pytest.param("sentinel-wait", marks=pytest.mark.sentinel),
]


@pytest.fixture(params=REDIS_TOPOLOGIES)
def redis_store(request: pytest.FixtureRequest) -> RedisStore:
    """A RedisStore on one of the suite's own deployments (keys isolated by prefix)."""
    return store_on(request, request.param)


def store_on(request: pytest.FixtureRequest, topology: str) -> RedisStore:
    if topology == "redis":
        return RedisStore.from_url(request.getfixturevalue("redis_url"))
    if topology == "cluster":
        return RedisStore.from_url(request.getfixturevalue("cluster_store_url"))
    url = request.getfixturevalue("sentinel_store_url")
    return RedisStore.from_url(url, min_replicas=1 if topology == "sentinel-wait" else 0)


@pytest.fixture(scope="session")
def pg_store_url(pg_url: str) -> str:
    """The session's PostgreSQL database, with the schema migrated (once)."""
    migrate(pg_url)
    return pg_url


@pytest.fixture(
    params=["memory", *REDIS_TOPOLOGIES, pytest.param("postgres", marks=pytest.mark.postgres)]
)
def backend(request: pytest.FixtureRequest, key_prefix: str) -> Iterator[Backend]:
    if request.param == "postgres":
        yield from postgres_backend(request.getfixturevalue("pg_store_url"), key_prefix)
        return
    if request.param == "memory":
        with freeze_time("2026-01-01 00:00:00") as frozen:

            def tick(_key: str, seconds: float) -> None:
                frozen.tick(seconds)

            def frozen_ms() -> int:
                return int(time.time() * 1000)

            yield Backend(MemoryStore(), key_prefix, tick, frozen_ms)
        return
    store = store_on(request, request.param)

    def server_ms() -> int:
        seconds, micros = store.client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def wait(_key: str, seconds: float) -> None:
        # The server's clock decides leases: wait until it has moved on, not a guess.
        target = server_ms() + int(seconds * 1000)
        wait_for(lambda: server_ms() >= target, timeout=seconds + 5, message="server clock")

    yield Backend(store, key_prefix, wait, server_ms)


def postgres_backend(url: str, key_prefix: str) -> Iterator[Backend]:
    """A PostgresStore; time passes on the server's clock, as for Redis."""
    psycopg = pytest.importorskip("psycopg")
    store = PostgresStore.from_url(url)
    clock = psycopg.connect(url, autocommit=True)

    def server_ms() -> int:
        row = clock.execute("SELECT celery_idem_ms(clock_timestamp())").fetchone()
        assert row is not None
        return int(row[0])

    def wait(_key: str, seconds: float) -> None:
        target = server_ms() + int(seconds * 1000)
        wait_for(lambda: server_ms() >= target, timeout=seconds + 5, message="server clock")

    try:
        yield Backend(store, key_prefix, wait, server_ms)
    finally:
        store.close()
        clock.close()


def complete(backend: Backend, key: str, *, token: str, stored: Stored, ttl: float) -> bool:
    """Complete as the attempt ``token``, with the fence and task id the record holds."""
    rec = backend.store.read(key)
    fence, task_id = (rec.fence, rec.task_id) if rec else (0, "")
    return backend.store.complete(
        CompleteRequest(key, token=token, fence=fence, task_id=task_id, stored=stored, ttl=ttl)
    )


def claim(backend: Backend, key: str, token: str = "t1", task_id: str = "id-1", **kw: Any) -> Any:
    kw.setdefault("fingerprint", "fp")
    kw.setdefault("lease", LEASE)
    kw.setdefault("ttl", TTL)
    return backend.store.claim(ClaimRequest(backend.key(key), token=token, task_id=task_id, **kw))
