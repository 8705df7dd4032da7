"""The message headers celery-idem reads and writes, and how it reads them.

A key, a retry's key, an eager group member's position, a hand-over and a deferral count
travel with the message as custom headers (Celery's ``apply_async(headers=...)``), so a
message carries its own identity to whichever worker takes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from celery_idem.config import KEY_OPTION

__all__ = [
    "DEFERRALS",
    "GROUP_INDEX",
    "HANDOVER",
    "HEADER",
    "HEADER_ORIGIN",
    "RETRY_KEY",
    "deferrals",
    "message_headers",
]

HEADER = KEY_OPTION
"""The message header (and call-site option) that carries an explicit key."""
HEADER_ORIGIN = (
    f"from the message header {HEADER!r} of a producer that does not check keys, such as "
    "app.send_task(..., headers=...)"
)
"""Where a worker says a bad explicit key came from: celery-idem's own call site
(``apply_async``, ``.set()``, ``apply``) refuses one before sending, so a bad key that
reaches a worker was put in the header by another producer."""
DEFERRALS = "idem-deferrals"
"""Counts the deferrals of one message (store outages, running duplicates), for backoff."""
RETRY_KEY = "idem-retry-key"
"""Carries the effective key into a retried message (its arguments may differ)."""
GROUP_INDEX = "idem-group-index"
"""An eager group member's position (workers get ``request.group_index``)."""
HANDOVER = "idem-handover"
"""On the task that finishes a ``self.replace()``: the replaced run's record, which that
task's outcome completes (or releases) in the replaced run's name."""


def message_headers(request: Any) -> Mapping[str, Any]:
    """The request's custom message headers, or an empty mapping.

    Empty also when they are not a mapping: Celery accepts ``apply(...,
    headers=<anything>)``, and so must we.
    """
    headers = getattr(request, "headers", None)
    return headers if isinstance(headers, Mapping) else {}


def deferrals(request: Any) -> int:
    """How many times celery-idem has deferred this message already (0 if unreadable)."""
    try:
        return max(0, int(message_headers(request).get(DEFERRALS, 0)))
    except (TypeError, ValueError):
        return 0
