"""The pytest plugin (entry point ``celery_idem.testing.plugin``): the ``idem_store`` fixture.

The first tests use the fixture exactly as a user would, with a ``celery_app`` fixture
defined here. Removing the store happens in the fixture's teardown, after the test that
used it, so that part runs an inner pytest session (``pytester``) whose last test
inspects the tasks once the earlier tests are torn down.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from celery import Celery

from celery_idem import IdempotentTask
from celery_idem.config import DEFAULTS
from celery_idem.keys import storage_key
from celery_idem.store import RecordKind
from celery_idem.testing import MemoryStore

pytest_plugins = ["pytester"]

UNUSED_URL = "redis://127.0.0.1:1/9"
"""The app's own store URL: never contacted while ``idem_store`` is installed."""
TASK = "plugin.double"


@pytest.fixture
def runs() -> list[int]:
    return []


@pytest.fixture
def celery_app(runs: list[int]) -> Celery:
    """An eager app with one idempotent task registered on it."""
    app = Celery(
        f"plugin-{uuid.uuid4().hex[:8]}",
        broker="memory://",
        backend="cache+memory://",
        set_as_current=False,
    )
    app.conf.task_always_eager = True
    app.conf.idem_redis_url = UNUSED_URL

    @app.task(base=IdempotentTask, shared=False, name=TASK)
    def double(x: int) -> int:
        runs.append(x)
        return x * 2 + len(runs)  # a re-run would return another value

    return app


def test_idem_store_is_a_fresh_memory_store_used_by_the_apps_tasks(
    celery_app: Celery, idem_store: MemoryStore
) -> None:
    assert isinstance(idem_store, MemoryStore)
    assert celery_app.tasks[TASK].idem_spec().store is idem_store
    assert celery_app.conf.idem_redis_url == UNUSED_URL  # the app's configuration is kept
    prefix = DEFAULTS["idem_key_prefix"]
    assert isinstance(prefix, str)
    assert idem_store.read(storage_key(prefix, TASK, "K-fresh")) is None


def test_duplicate_is_replayed_from_idem_store(
    celery_app: Celery, idem_store: MemoryStore, runs: list[int]
) -> None:
    task: Any = celery_app.tasks[TASK]

    first = task.apply((5,), idempotency_key="K-plugin")
    second = task.apply_async((5,), idempotency_key="K-plugin")  # always eager

    assert first.get() == 11
    assert second.get() == first.get()
    assert runs == [5]

    prefix = DEFAULTS["idem_key_prefix"]
    assert isinstance(prefix, str)
    record = idem_store.read(storage_key(prefix, TASK, "K-plugin"))
    assert record is not None
    assert record.task_id == first.id
    assert record.fence > 0
    assert record.stored is not None
    assert record.stored.kind is RecordKind.RESULT


def test_idem_store_clear_forgets_records(
    celery_app: Celery, idem_store: MemoryStore, runs: list[int]
) -> None:
    task: Any = celery_app.tasks[TASK]
    assert task.apply((1,), idempotency_key="K-clear").get() == 3
    idem_store.clear()
    assert task.apply((1,), idempotency_key="K-clear").get() == 4
    assert runs == [1, 1]


INNER = """
from __future__ import annotations

import pytest
from celery import Celery

from celery_idem import IdempotentTask
from celery_idem.exceptions import IdempotencyConfigError
from celery_idem.store import MemoryStore

ORIGINAL = "redis://127.0.0.1:1/7"
WITH_URL = Celery("inner-with-url", set_as_current=False)
WITH_URL.conf.idem_redis_url = ORIGINAL
WITHOUT_URL = Celery("inner-without-url", set_as_current=False)


def noop():
    return None


TASKS = {
    app.main: app.task(noop, base=IdempotentTask, shared=False, name="inner.noop")
    for app in (WITH_URL, WITHOUT_URL)
}
SEEN = []


@pytest.fixture(params=["with-url", "without-url"])
def celery_app(request):
    return WITH_URL if request.param == "with-url" else WITHOUT_URL


def test_a_installs_a_memory_store(celery_app, idem_store):
    SEEN.append(idem_store)
    assert TASKS[celery_app.main].idem_spec().store is idem_store
    assert TASKS[celery_app.main].apply().get() is None
    assert len(idem_store.scan("*")[1]) == 1, "the record is in idem_store"


def test_b_failing_test_still_restores(celery_app, idem_store):
    SEEN.append(idem_store)
    assert TASKS[celery_app.main].idem_spec().store is idem_store
    assert not idem_store.scan("*")[1], "each test starts with an empty store"
    raise RuntimeError("this test fails on purpose")


def test_c_restored_after_the_fixture():
    assert len(SEEN) == 4
    assert len({id(store) for store in SEEN}) == 4, "each test gets a fresh store"
    assert not any(store.scan("*")[1] for store in SEEN), "emptied at the end of its test"
    # The tasks are back on their own configuration: the app's URL, or none at all.
    assert not isinstance(TASKS["inner-with-url"].idem_spec().store, MemoryStore)
    with pytest.raises(IdempotencyConfigError, match="no store is configured"):
        TASKS["inner-without-url"].idem_spec()
    assert WITH_URL.conf.idem_redis_url == ORIGINAL
    assert "idem_redis_url" not in WITHOUT_URL.conf
"""


def test_idem_store_is_removed_after_each_test_even_a_failing_one(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:randomly", "-v")
    result.assert_outcomes(passed=3, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*test_a_installs_a_memory_store?with-url? PASSED*",
            "*test_a_installs_a_memory_store?without-url? PASSED*",
            "*test_b_failing_test_still_restores?with-url? FAILED*",
            "*test_b_failing_test_still_restores?without-url? FAILED*",
            "*test_c_restored_after_the_fixture PASSED*",
        ]
    )
    assert "this test fails on purpose" in result.stdout.str()
