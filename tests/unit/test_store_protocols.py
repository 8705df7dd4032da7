"""One store per process and endpoint, used through two protocols.

The tasks get it as a ``Store`` (``store_for``), ``celery idem`` and the worker's
start-up check as a ``StoreAdmin`` (``admin_for``): one client, one set of scripts.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery

from celery_idem import IdempotentTask
from celery_idem.config import resolve_settings
from celery_idem.store import MemoryStore, admin_for, store_for
from celery_idem.store.redis import RedisStore
from celery_idem.task import invalidate_settings
from celery_idem.task.worker import validate_on_worker_start
from devtools.processes import free_port
from devtools.redis_server import RedisServer


def endpoint_of(url: str, **conf: Any) -> Any:
    return resolve_settings({"idem_redis_url": url, **conf}).endpoint


def test_the_hot_path_and_the_admin_are_one_redis_store(redis_url: str) -> None:
    endpoint = endpoint_of(redis_url)
    store, admin = store_for(endpoint), admin_for(endpoint)
    assert store is admin
    assert isinstance(store, RedisStore)
    assert store_for(endpoint) is store  # cached: one client (and its scripts) per process


def test_the_hot_path_and_the_admin_are_one_memory_store() -> None:
    endpoint = endpoint_of("memory://protocols-test")
    store = store_for(endpoint)
    assert isinstance(store, MemoryStore)
    assert admin_for(endpoint) is store
    assert (store.eviction_policy(), store.replica_count()) == (None, None)


def a_worker_app(url: str, **conf: Any) -> Celery:
    app = Celery("protocols", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.idem_redis_url = url
    app.conf.update(conf)

    def body(x: int) -> int:
        return x

    app.task(body, base=IdempotentTask, shared=False, name="protocols.body")
    # A task another test module declared with @app.task (shared=True, Celery's default)
    # joins every app finalized after that import, and the start-up check would name it
    # too: keep only this app's own tasks (and Celery's), whatever ran before.
    for name in [n for n in app.tasks if not n.startswith(("protocols.", "celery."))]:
        del app.tasks[name]
    invalidate_settings()
    return app


def set_policy(server: RedisServer, policy: str) -> None:
    client = server.client()
    try:
        client.config_set("maxmemory-policy", policy)
    finally:
        client.close()


def test_the_worker_start_warns_of_an_evicting_store_and_missing_replicas(
    store_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    set_policy(store_server, "allkeys-lru")
    app = a_worker_app(store_server.url(0), idem_min_replicas=1)
    with caplog.at_level(logging.WARNING, logger="celery_idem"):
        validate_on_worker_start(instance=SimpleNamespace(app=app))
    where = f"the store at {store_server.url(0)} (tasks protocols.body)"
    assert f"{where} has maxmemory-policy 'allkeys-lru'" in caplog.text
    assert f"idem_min_replicas=1 but the primary of {where} has 0 replica(s)" in caplog.text


def test_the_worker_start_warns_of_a_store_that_does_not_answer_and_keeps_starting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    app = a_worker_app(url, idem_on_store_error="run")
    with caplog.at_level(logging.WARNING, logger="celery_idem"):
        validate_on_worker_start(instance=SimpleNamespace(app=app))  # no SystemExit
    (line,) = [r.getMessage() for r in caplog.records]
    assert f"the store at {url} did not answer within" in line
    assert "failed on PING" in line
    assert "protocols.body (idem_on_store_error=run) run their bodies without protection" in line
    assert "maxmemory-policy" not in caplog.text  # nothing more asked of a store that is down


def test_one_warning_per_store_names_every_task_that_uses_it(
    store_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    set_policy(store_server, "allkeys-lru")
    app = a_worker_app(store_server.url(0))

    def other() -> int:
        return 1

    app.task(other, base=IdempotentTask, shared=False, name="protocols.other")
    invalidate_settings()
    with caplog.at_level(logging.WARNING, logger="celery_idem"):
        validate_on_worker_start(instance=SimpleNamespace(app=app))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "(tasks protocols.body, protocols.other)" in lines[0]


def test_the_worker_start_says_nothing_of_a_fit_store(
    store_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    set_policy(store_server, "noeviction")
    for app in (a_worker_app(store_server.url(0)), a_worker_app("memory://protocols-worker")):
        with caplog.at_level(logging.WARNING, logger="celery_idem"):
            validate_on_worker_start(instance=SimpleNamespace(app=app))
    assert caplog.text == ""
