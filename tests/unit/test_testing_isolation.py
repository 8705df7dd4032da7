"""``idem_store`` / ``use_memory_store`` must keep every record away from a real Redis.

Issue #14, items 2 and 13: with Celery's own pytest plugin, ``celery_app`` is a test
app, not the app the user's tasks are bound to, and a task may name its own
``idem_redis_url``; either way the records went to the user's Redis, and the next run
replayed them instead of running the body. The first test is the user's project,
run twice by pytest in a subprocess, against a private redis-server that this module
starts and that nothing may write to.
"""

from __future__ import annotations

import multiprocessing
import os
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from celery_idem import IdempotentTask
from celery_idem.store import MemoryStore, admin_for, store_for_url
from celery_idem.testing import use_memory_store
from devtools.redis_server import RedisServer

pytest_plugins = ["pytester"]


@pytest.fixture(scope="module")
def user_redis() -> Iterator[RedisServer]:
    """The user's "real" Redis: a private throwaway server, never the one on 6379."""
    with RedisServer() as server:
        yield server


def keyspace(server: RedisServer) -> dict[int, int]:
    """Keys per database of ``server`` (every database, not only the one configured)."""
    client = server.client(0)
    try:
        info: dict[str, Any] = client.info("keyspace")
    finally:
        client.close()
    return {int(name[2:]): int(db["keys"]) for name, db in info.items()}


def seed(server: RedisServer, db: int, count: int) -> None:
    """Unrelated keys the user already has, so "unchanged" is not "empty"."""
    client: redis.Redis = server.client(db)
    try:
        for i in range(count):
            client.set(f"user-data:{i}", i)
    finally:
        client.close()


USER_TASKS = """
from celery import Celery

from celery_idem import IdempotentTask

app = Celery("proj")
app.config_from_object("celeryconfig")
RUNS = []


@app.task(base=IdempotentTask, name="proj.once")
def once(x):
    RUNS.append(x)
    return x * 2


@app.task(base=IdempotentTask, name="proj.pinned", idem_redis_url={pinned_url!r})
def pinned(x):
    RUNS.append(-x)
    return -x
"""

USER_TESTS = """
from proj import RUNS, once, pinned


def test_once(celery_app, idem_store):
    assert once.apply((21,)).get() == 42
    assert once.apply((21,)).get() == 42  # a duplicate within the test replays
    assert RUNS == [21], "the body must run in every run of the suite, exactly once"


def test_pinned(celery_app, idem_store):
    assert pinned.apply((5,)).get() == -5
    assert RUNS == [21, -5]
"""


def test_celery_contrib_pytest_user_app_never_reaches_the_users_redis(
    pytester: pytest.Pytester, user_redis: RedisServer
) -> None:
    # The user's project: its own app, configured from celeryconfig.py to use the
    # Redis for everything; a second task names its own idem_redis_url (db 3).
    seed(user_redis, 1, 7)
    pytester.makepyfile(
        celeryconfig=textwrap.dedent(f"""
            broker_url = {user_redis.url(0)!r}
            result_backend = {user_redis.url(0)!r}
            idem_redis_url = {user_redis.url(1)!r}
            """),
        proj=USER_TASKS.format(pinned_url=user_redis.url(3)),
        conftest='pytest_plugins = ("celery.contrib.pytest",)\n',
        test_user=USER_TESTS,
    )
    before = keyspace(user_redis)
    assert before == {1: 7}

    runs = []
    for _ in range(2):
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
        runs.append((result.parseoutcomes(), keyspace(user_redis), result.stdout.str()))
    for run, (outcomes, after, output) in enumerate(runs, 1):
        assert outcomes == {"passed": 2}, f"run {run}:\n{output}"
        assert after == before, f"run {run} wrote to the user's Redis"


def make_app() -> Celery:
    app = Celery("isolation", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.task_always_eager = True
    return app


def test_a_task_with_its_own_store_url_uses_the_memory_store(user_redis: RedisServer) -> None:
    app = make_app()
    runs: list[int] = []

    @app.task(
        base=IdempotentTask, shared=False, name="iso.pinned", idem_redis_url=user_redis.url(4)
    )
    def pinned(x: int) -> int:
        runs.append(x)
        return x

    before = keyspace(user_redis)
    with use_memory_store(app) as store:
        assert pinned.apply((1,)).get() == 1
        assert pinned.apply((1,)).get() == 1
        assert isinstance(pinned.idem_spec().store, MemoryStore)
        assert store.scan("*")[1], "the record is in the store the helper yielded"
    assert runs == [1]
    assert keyspace(user_redis) == before

    with use_memory_store(app):  # a fresh store: the body runs again
        assert pinned.apply((1,)).get() == 1
    assert runs == [1, 1]
    assert keyspace(user_redis) == before


def test_every_way_to_a_store_leads_to_the_memory_store(user_redis: RedisServer) -> None:
    # Any endpoint, any app or none (the CLI and the worker's start-up check ask for
    # stores this way too): the one store the block installed, nested blocks included.
    with use_memory_store() as outer:
        assert store_for_url(user_redis.url(6)) is outer
        assert admin_for(None) is outer  # even an app with no store configured at all
        with use_memory_store(make_app()) as inner:
            assert inner is not outer
            assert store_for_url(user_redis.url(6)) is inner
        assert store_for_url("memory://named") is outer
    assert store_for_url(user_redis.url(6)) is not outer


def _run_in_forked_child(task: Any, answers: Any) -> None:
    try:
        answers.put(("ran", task.apply((2,)).get()))
    except Exception as exc:
        answers.put((type(exc).__name__, str(exc)))


def test_a_process_forked_under_the_store_fails_loudly_naming_the_app(
    user_redis: RedisServer,
) -> None:
    # A prefork pool child forked inside the block would get a copy of the store that
    # the test never sees; it must refuse, not fall back to the app's Redis.
    app = make_app()
    runs: list[int] = []

    @app.task(
        base=IdempotentTask, shared=False, name="iso.forked", idem_redis_url=user_redis.url(4)
    )
    def forked(x: int) -> int:
        runs.append(x)
        return x

    fork = multiprocessing.get_context("fork")
    answers = fork.SimpleQueue()
    before = keyspace(user_redis)
    with use_memory_store(app):
        child = fork.Process(target=_run_in_forked_child, args=(forked, answers))
        child.start()
        child.join(60)
        assert forked.apply((2,)).get() == 2  # the test's own process is covered
    assert child.exitcode == 0
    kind, message = answers.get()
    assert kind == "IdempotencyConfigError", message
    assert "task 'iso.forked' of app 'isolation'" in message
    assert f"lives in process {os.getpid()}" in message
    assert runs == [2]
    assert keyspace(user_redis) == before
