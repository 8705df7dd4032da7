"""The pytest plugin (entry point ``pytest11``): the ``idem_store`` fixture.

The fixture installs a fresh in-memory store for one test, for every idempotent task
of the process (see :func:`celery_idem.testing.use_memory_store`); it needs no other
fixture.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from celery_idem.store.memory import MemoryStore
from celery_idem.testing import use_memory_store


@pytest.fixture
def idem_store() -> Iterator[MemoryStore]:
    """A fresh in-memory idempotency store, used by every idempotent task of the process.

    Whatever app a task is bound to (the ``celery_app`` fixture's, or your project's
    own) and whatever store it is configured with, its records go to this store for
    the test, and the next test starts with an empty one.
    """
    with use_memory_store() as store:
        yield store
