"""The fault suite: the integration harness (real workers, ledger, store) plus a report.

Each scenario test is marked ``@pytest.mark.scenario(name, inject=..., expect=...)``
and reports its figures through the ``fault_report`` fixture; with
``IDEM_FAULTS_REPORT=<path>`` (``make faults``) the rows are written to that path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.faults import report
from tests.faults.harness import Spawner
from tests.integration.conftest import (  # noqa: F401 - fixtures re-exported for pytest
    celery_env,
    ledger,
    start_worker,
    tasks,
    uid,
    worker,
)


@pytest.fixture(scope="session")
def store_topology() -> str:
    """The fault scenarios restart and block the store's own server: standalone only.

    (Failover on Sentinel has its own tests in ``tests/topologies``.)
    """
    return "standalone"


@pytest.fixture
def spawn(celery_env: dict[str, str], tasks: ModuleType) -> Iterator[Spawner]:  # noqa: F811
    """Start workers (``spawn(queue=..., concurrency=..., extra_env=...)``); killed after."""
    spawner = Spawner(celery_env)
    yield spawner
    spawner.kill_all()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "scenario(name, inject, expect): a fault scenario of the reliability report"
    )


def _row_for(item: pytest.Item) -> report.Row | None:
    marker = item.get_closest_marker("scenario")
    if marker is None:
        return None
    name = marker.args[0]
    row = report.ROWS.get(name)
    if row is None:
        row = report.ROWS[name] = report.Row(
            scenario=name,
            inject=marker.kwargs.get("inject", ""),
            expect=marker.kwargs.get("expect", ""),
            order=len(report.ROWS),
        )
    return row


@pytest.fixture
def fault_report(request: pytest.FixtureRequest) -> Callable[..., None]:
    """Record this scenario's figures (call it after the asserts)."""

    def record(**figures: Any) -> None:
        row = _row_for(request.node)
        assert row is not None, "a test using fault_report needs @pytest.mark.scenario"
        for name, value in figures.items():
            setattr(row, name, value)

    return record


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    rep = yield
    row = _row_for(item)
    if row is not None and rep.when == "call":
        row.outcome = "passed" if rep.passed else ("skipped" if rep.skipped else "FAILED")
        if rep.skipped and isinstance(rep.longrepr, tuple):
            row.notes = str(rep.longrepr[2])
    return rep


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("IDEM_FAULTS_REPORT")
    if path and report.ROWS:
        report.write(Path(path))
