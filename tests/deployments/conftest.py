"""Real deployments beyond one plain server: TLS, unix sockets, Sentinel failover, Cluster.

The worker fixtures come from the integration harness; the store under test is passed
to each worker explicitly (``IDEM_TEST_STORE``), so these run once, not per topology.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from redis.connection import AbstractConnection

from tests.integration.conftest import (  # noqa: F401 - fixtures re-exported for pytest
    celery_env,
    ledger,
    start_worker,
    tasks,
    uid,
)


@pytest.fixture(scope="session")
def store_topology() -> str:
    """The publisher's store: the suite's server (each test picks the worker's own)."""
    return "standalone"


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """A function returning how many round trips were made since it was last called.

    A round trip is one request written to a socket and answered: redis-py writes a
    command, or a whole pipeline, with one ``send_packed_command``; counting those
    calls on every connection class counts round trips (a Sentinel lookup too).
    """
    sent: list[int] = []
    original = AbstractConnection.send_packed_command

    def counting(self: Any, command: Any, check_health: bool = True) -> Any:
        sent.append(1)
        return original(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)

    def taken() -> int:
        count = len(sent)
        sent.clear()
        return count

    return taken
