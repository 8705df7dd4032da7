"""The pytest plugin (entry point ``pytest11``): the ``idem_store`` fixture.

It needs a fixture named ``celery_app`` (Celery's own pytest plugin provides one, or
define your own) and installs a fresh in-memory store on it for one test.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from celery_idem.store.memory import MemoryStore
from celery_idem.testing import use_memory_store


@pytest.fixture
def idem_store(request: pytest.FixtureRequest) -> Iterator[MemoryStore]:
    """A fresh in-memory idempotency store installed on the ``celery_app`` fixture."""
    app: Any = request.getfixturevalue("celery_app")
    with use_memory_store(app) as store:
        yield store
