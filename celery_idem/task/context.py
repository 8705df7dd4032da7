"""What the two halves of IdempotentTask share: header names, per-task specs, runs.

``base`` (publishing, configuration, dispatch) and ``execution`` (the protocol on the
worker) both work on a :class:`_Spec` (computed once per task and process) and a
:class:`_Run` (one execution). Keeping them here lets each half import them without
importing the other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from celery_idem.config import IdemSettings
from celery_idem.keys import KeyRule
from celery_idem.renewer import Lease
from celery_idem.store import Store

HEADER = "idempotency_key"
"""The message header (and call-site option) that carries an explicit key."""
_DEFERRALS = "idem-deferrals"
"""Header counting store-error deferrals of one message, for the backoff."""
_FIRST_DEFERRAL = 0.5
"""Seconds before a duplicate of a running key first looks again (doubling each time)."""
_RETRY_KEY = "idem-retry-key"
"""Header carrying the effective key into a retried message (its arguments may differ)."""
_GROUP_INDEX = "idem-group-index"
"""Header with an eager group member's position (workers get ``request.group_index``)."""
HANDOVER = "idem-handover"
"""Header on the task that finishes a ``self.replace()``: the replaced run's record,
which that task's outcome completes (or releases) in the replaced run's name."""
_COMPLETE_RETRIES = (0.05, 0.25, 1.0)
"""Pauses between attempts at storing a finished run's outcome when Redis fails."""

_generation = 0
"""Bumped by :func:`invalidate_settings`; a cached spec of another generation is stale."""


def invalidate_settings() -> None:
    """Forget every task's resolved settings and store (after changing ``app.conf``)."""
    global _generation  # noqa: PLW0603 - one process-wide counter is the whole point
    _generation += 1


@dataclass(frozen=True, slots=True)
class _Spec:
    """What one task needs on every execution, computed once per process."""

    settings: IdemSettings
    rule: KeyRule
    store: Store
    serializer: str
    accept: frozenset[str]
    max_defer: float
    """Longest countdown of a deferral: under half the broker's visibility timeout, so
    the broker does not hand the waiting message out a second time."""
    pid: int
    generation: int


@dataclass(slots=True)
class _Run:
    """One execution: its task, key and identity, passed between the steps of ``__call__``."""

    spec: _Spec
    settings: IdemSettings
    request: Any
    args: Sequence[Any]
    kwargs: Mapping[str, Any]
    key: str
    storage: str
    fingerprint: str
    token: str
    fence: int = 0
    lost: bool = False
    lease: Lease | None = None
    """The renewer's entry while the body runs."""
    handed_over: bool = False
    """``self.replace()`` handed the key to the replacement: not released on ``Ignore``."""

    @property
    def task_id(self) -> str:
        return str(self.request.id)


def message_headers(request: Any) -> Mapping[str, Any]:
    """The request's custom message headers, or an empty mapping.

    Empty also when they are not a mapping: Celery accepts ``apply(...,
    headers=<anything>)``, and so must we.
    """
    headers = getattr(request, "headers", None)
    return headers if isinstance(headers, Mapping) else {}


def _deferrals(request: Any) -> int:
    """How many times celery-idem has deferred this message already (0 if unreadable)."""
    try:
        return max(0, int(message_headers(request).get(_DEFERRALS, 0)))
    except (TypeError, ValueError):
        return 0
