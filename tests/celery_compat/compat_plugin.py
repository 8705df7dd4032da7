"""pytest plugin for Celery's own unit tests, loaded by ``run.py`` (``-p compat_plugin``).

Two jobs:

* Unless ``COMPAT_PLAIN=1``: make ``CompatTask`` (IdempotentTask on the in-process store
  ``memory://compat``) the default task base of every Celery app. ``Celery.__init__``
  does ``self.task_cls = task_cls or self.task_cls``, so setting the class attribute
  reaches every app however it is made: Celery's ``celery_app`` fixture
  (``celery.contrib.testing.app.TestApp``), the tests' ``self.Celery(...)`` and
  ``Celery(...)``, subclasses of Celery. An app given an explicit ``task_cls=`` keeps it
  (the tests of that option). The store is cleared before and after each test: two
  tests calling a task of the same name with the same arguments must not replay each
  other.
* In both runs, record each test's outcome (and, for a failure, a short traceback and
  the captured log) as JSON in ``$COMPAT_RESULTS``, which ``run.py`` compares with
  ``expected.txt``. The idempotent run also counts the records its tests wrote: none
  at all would mean the base was not injected.

The plain run imports nothing of celery-idem. Not collected by the project's own
suite: the file name does not match ``test_*.py``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

STORE_URL = "memory://compat"
PLAIN = os.environ.get("COMPAT_PLAIN") == "1"
TASK_CLS = "compat_idem:CompatTask"
"""The base, by name: Celery imports it when the first app makes its ``Task``."""

_outcomes: dict[str, str] = {}
"""Node id -> passed, failed, skipped or xfailed; any failed phase or subtest wins."""
_failures: dict[str, list[str]] = {}
_records = {"written": 0, "tests": 0}


def pytest_configure(config: pytest.Config) -> None:
    """Install the base before any fixture or test module makes an app."""
    if PLAIN:
        return
    from celery import Celery  # noqa: PLC0415 - only the idempotent run touches it

    Celery.task_cls = TASK_CLS


def pytest_sessionstart(session: pytest.Session) -> None:
    """Start celery-idem's renewal thread before Celery's conftest counts the threads.

    celery-idem keeps one daemon thread per process that renews the leases of running
    claims; it starts at the first claim and lives as long as the process (see
    ``celery_idem/renewer.py``). Celery's ``threads_not_lingering`` fixture fails every
    test after which a thread is alive that was not there when the session started, so
    the first idempotent execution would fail its test, and every later test too.
    Starting the thread here (one lease added and removed at once: nothing is renewed)
    makes it one of the threads the session starts with.
    """
    if PLAIN:
        return
    from celery_idem.renewer import Lease, renewer  # noqa: PLC0415

    lease = Lease(store=_store(), key="compat", token="compat", lease=60.0, on_lost=print)
    renewer.remove(renewer.add(lease))


def pytest_report_header() -> str:
    """Say in the output which run this is."""
    base = "plain celery.app.task:Task" if PLAIN else f"{TASK_CLS} (IdempotentTask, {STORE_URL})"
    return f"celery-idem compat: default task base = {base}"


def _store() -> Any:
    from celery_idem.store import store_for_url  # noqa: PLC0415

    return store_for_url(STORE_URL)


def _count_records(store: Any) -> int:
    cursor, seen = 0, set()
    while True:
        cursor, keys = store.scan("*", cursor=cursor, count=1000)
        seen.update(keys)
        if not cursor:
            return len(seen)


@pytest.fixture(autouse=True)
def _compat_fresh_store() -> Iterator[None]:
    """No record survives a test: the same task and arguments in two tests run twice."""
    if PLAIN:
        yield
        return
    store = _store()
    store.clear()
    yield
    written = _count_records(store)
    _records["written"] += written
    _records["tests"] += bool(written)
    store.clear()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep a short traceback of a failure (the terminal shows none: ``--tb=no``)."""
    report = yield
    if report.failed and call.excinfo is not None:
        excinfo = pytest.ExceptionInfo.from_exception(call.excinfo.value)
        excinfo.traceback = excinfo.traceback.cut(path=item.path)  # from the test on
        trace = str(excinfo.getrepr(style="short", chain=True))
        logs = "\n".join(
            f"--- {name} ---\n{text}" for name, text in report.sections if "log" in name
        )
        _failures.setdefault(report.nodeid, []).append(f"[{call.when}]\n{trace}\n{logs}")
    return report


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Fold the setup, call, teardown (and subtest) reports into one outcome per test."""
    nodeid = report.nodeid
    context = getattr(report, "context", None)  # only a subtest's report has one
    if report.failed:
        _outcomes[nodeid] = "failed"
        if context is not None:
            label = f"[subtest {getattr(context, 'msg', None)!r} {getattr(context, 'kwargs', {})}]"
            _failures.setdefault(nodeid, []).append(f"{label}\n{report.longreprtext}")
        return
    if _outcomes.get(nodeid) == "failed" or context is not None:
        return  # a failed test stays failed; a passing or skipped subtest says nothing
    if report.skipped:
        _outcomes[nodeid] = "xfailed" if hasattr(report, "wasxfail") else "skipped"
    elif report.when == "call":
        _outcomes[nodeid] = "passed"


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Write the outcomes for ``run.py``."""
    target = os.environ.get("COMPAT_RESULTS")
    if not target:
        return
    import celery  # noqa: PLC0415 - only to say which Celery ran

    data: dict[str, Any] = {
        "plain": PLAIN,
        "celery_file": celery.__file__,
        "task_cls": None if PLAIN else TASK_CLS,
        "celery_idem_imported": "celery_idem" in sys.modules,
        "records": _records,
        "outcomes": _outcomes,
        "failures": {nodeid: "\n".join(parts) for nodeid, parts in _failures.items()},
    }
    Path(target).write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
