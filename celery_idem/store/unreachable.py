"""UnreachableStore: stands in for a store whose client could not even be built.

A Redis Cluster client reads the slot map when it is created, so with no node
answering there is no client at all. Rather than failing the task before its claim,
the task gets this store: every record operation raises
:class:`~celery_idem.exceptions.StoreUnavailable` naming the key, so
``idem_on_store_error`` applies exactly as for an outage in the middle of a run, and
the task builds the real store again on its next message.
"""

from __future__ import annotations

from typing import NoReturn

from celery_idem.exceptions import StoreUnavailable
from celery_idem.store.base import (
    ClaimOutcome,
    ClaimRequest,
    CompleteRequest,
    ReserveRequest,
    Settled,
    StepRequest,
)

__all__ = ["UnreachableStore"]


class UnreachableStore:
    """A :class:`~celery_idem.store.base.Store` whose every operation is an outage.

    Only the hot path: operators' tools (``StoreAdmin``) build the real store or fail.
    The worker's start-up check recognises it and logs its ``cause``.

    Args:
        cause: Why the real store could not be built.
    """

    def __init__(self, cause: StoreUnavailable) -> None:
        self.cause = cause

    def _fail(self, key: str) -> NoReturn:
        raise StoreUnavailable(f"{self.cause} (record {key!r})", key=key) from self.cause

    def claim(self, request: ClaimRequest) -> ClaimOutcome:
        """Always an outage."""
        self._fail(request.key)

    def renew(self, key: str, *, token: str, lease: float) -> bool:
        """Always an outage."""
        self._fail(key)

    def complete(self, request: CompleteRequest) -> bool:
        """Always an outage."""
        self._fail(request.key)

    def send_completion(self, request: CompleteRequest) -> Settled:
        """Always an outage."""
        self._fail(request.key)

    def dispatched(self, key: str, *, task_id: str) -> bool:
        """Always an outage."""
        self._fail(key)

    def release(self, key: str, *, token: str) -> bool:
        """Always an outage."""
        self._fail(key)

    def step(self, request: StepRequest) -> bool:
        """Always an outage."""
        self._fail(request.key)

    def park(self, key: str, *, token: str, hold: float) -> bool:
        """Always an outage."""
        self._fail(key)

    def peek(self, key: str, *, fingerprint: str) -> ClaimOutcome | None:
        """Always an outage."""
        self._fail(key)

    def reserve(self, request: ReserveRequest) -> ClaimOutcome | None:
        """Always an outage."""
        self._fail(request.key)

    def unreserve(self, key: str, *, task_id: str) -> bool:
        """Always an outage."""
        self._fail(key)
