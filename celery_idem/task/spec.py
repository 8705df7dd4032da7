"""What one task needs on every execution, computed once per task and process.

``IdempotentTask`` builds a :class:`Spec` (settings, key rule, store, codec) the first
time it runs in a process and keeps it until the process forks or the settings are
invalidated; every :class:`~celery_idem.task.execution.Execution` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from celery_idem.config import IdemSettings
from celery_idem.keys import KeyRule
from celery_idem.store import Store

__all__ = ["IdemTask", "Spec", "generation", "invalidate_settings"]

_generation = 0


def generation() -> int:
    """The settings generation: a cached spec of another one is stale."""
    return _generation


def invalidate_settings() -> None:
    """Forget every task's resolved settings and store (after changing ``app.conf``)."""
    global _generation  # noqa: PLW0603 - one process-wide counter is the whole point
    _generation += 1


@dataclass(frozen=True, slots=True)
class Spec:
    """One task's resolved settings, key rule, key space, store and result codec."""

    settings: IdemSettings
    rule: KeyRule
    scope: str
    """The task's key space in storage keys: ``idem_scope``, else the task's name."""
    store: Store
    serializer: str
    accept: frozenset[str]
    max_defer: float
    """Longest countdown of a deferral: under half the broker's visibility timeout, so
    the broker does not hand the waiting message out a second time."""
    pid: int
    generation: int


class IdemTask(Protocol):
    """What the execution, publishing and hand-over code needs of ``IdempotentTask``.

    A protocol, so that those modules sit below ``base`` and never import it back.
    """

    name: str
    typing: bool
    app: Any

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """The task's body."""

    def signature_from_request(self, *args: Any, **kwargs: Any) -> Any:
        """Celery's signature of this request (to send it again)."""

    def idem_settings(self) -> IdemSettings:
        """The task's resolved settings."""

    def idem_key_rule(self) -> KeyRule:
        """The task's key rule, checked against its signature (cached)."""

    def idem_spec(self) -> Spec:
        """The task's :class:`Spec` in this process."""

    def AsyncResult(self, task_id: str, **kwargs: Any) -> Any:
        """Celery's result handle for ``task_id``."""
