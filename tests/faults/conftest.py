"""The fault tests reuse the integration harness (real workers, ledger, store)."""

from tests.integration.conftest import (  # noqa: F401 - fixtures re-exported for pytest
    celery_env,
    ledger,
    start_worker,
    store_client,
    tasks,
    uid,
    worker,
)
