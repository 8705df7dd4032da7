"""Real deployments beyond one plain server: TLS, unix sockets, Sentinel failover, Cluster.

The worker fixtures come from the integration harness; the store under test is passed
to each worker explicitly (``IDEM_TEST_STORE``), so these run once, not per topology.
"""

from __future__ import annotations

import pytest

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
