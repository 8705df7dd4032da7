"""Prometheus counters for celery-idem's signals.

Copy this file into your project (it needs ``prometheus_client``) and connect the
counters once in every process that runs tasks::

    counters = IdemCounters().connect()  # registered in the default registry

Each signal becomes a counter ``celery_idem_<signal>_total`` labelled by task name
(never by key, which would give every idempotency key its own time series), plus
``policy`` for ``duplicate_in_progress`` and ``stage`` for ``lease_lost`` and
``store_error``.

Part of celery-idem's documentation, run by its test suite
(``tests/docs/test_prometheus_example.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery.utils.dispatch import Signal
from prometheus_client import REGISTRY, CollectorRegistry, Counter

from celery_idem import signals

__all__ = ["IdemCounters"]


def _task(sender: Any) -> str:
    """The task name of a signal's sender (the task instance)."""
    return str(getattr(sender, "name", None) or "unknown")


def _label(value: Any) -> str:
    """A policy or stage as a label value: an enum's value, else its text ("none")."""
    return str(getattr(value, "value", value)).lower()


class IdemCounters:
    """One Prometheus counter per celery-idem signal.

    Args:
        registry: Where the counters are registered; Prometheus' default registry
            unless given (tests pass a fresh ``CollectorRegistry``).
        namespace: The metric name prefix.
    """

    def __init__(
        self, registry: CollectorRegistry = REGISTRY, namespace: str = "celery_idem"
    ) -> None:
        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(name, doc, ["task", *labels], namespace=namespace, registry=registry)

        self.replayed = counter(
            "replayed", "Duplicates answered from the stored outcome; the body did not run."
        )
        self.key_mismatch = counter(
            "key_mismatch", "Keys reused with other arguments; nothing ran."
        )
        self.duplicate_in_progress = counter(
            "duplicate_in_progress",
            "Duplicates that found another run holding their key (by in-progress policy).",
            "policy",
        )
        self.lease_lost = counter(
            "lease_lost",
            "Runs whose key was taken over after their lease ran out; outcome not stored.",
            "stage",
        )
        self.store_error = counter(
            "store_error", "Failed round trips to the idempotency store.", "stage"
        )
        self.result_not_stored = counter(
            "result_not_stored",
            "Runs whose result could not be kept (too big or unserializable).",
        )
        self.quarantined = counter(
            "quarantined",
            "Keys quarantined after too many takeovers without completing (poison messages).",
        )
        self.step_replayed = counter(
            "step_replayed",
            "Durable steps answered from the record; their function did not run again.",
        )
        self._receivers: list[tuple[Signal, Callable[..., None]]] = [
            (signals.replayed, self._on_replayed),
            (signals.key_mismatch, self._on_key_mismatch),
            (signals.duplicate_in_progress, self._on_duplicate_in_progress),
            (signals.lease_lost, self._on_lease_lost),
            (signals.store_error, self._on_store_error),
            (signals.result_not_stored, self._on_result_not_stored),
            (signals.quarantined, self._on_quarantined),
            (signals.step_replayed, self._on_step_replayed),
        ]

    def connect(self) -> IdemCounters:
        """Start counting: connect a receiver to each signal. Returns ``self``."""
        for signal, receiver in self._receivers:
            signal.connect(receiver, weak=False)
        return self

    def disconnect(self) -> None:
        """Stop counting (the counters keep their values)."""
        for signal, receiver in self._receivers:
            signal.disconnect(receiver)

    def _on_replayed(self, sender: Any = None, **_: Any) -> None:
        self.replayed.labels(task=_task(sender)).inc()

    def _on_key_mismatch(self, sender: Any = None, **_: Any) -> None:
        self.key_mismatch.labels(task=_task(sender)).inc()

    def _on_duplicate_in_progress(self, sender: Any = None, policy: Any = None, **_: Any) -> None:
        self.duplicate_in_progress.labels(task=_task(sender), policy=_label(policy)).inc()

    def _on_lease_lost(self, sender: Any = None, stage: Any = None, **_: Any) -> None:
        self.lease_lost.labels(task=_task(sender), stage=_label(stage)).inc()

    def _on_store_error(self, sender: Any = None, stage: Any = None, **_: Any) -> None:
        self.store_error.labels(task=_task(sender), stage=_label(stage)).inc()

    def _on_result_not_stored(self, sender: Any = None, **_: Any) -> None:
        self.result_not_stored.labels(task=_task(sender)).inc()

    def _on_quarantined(self, sender: Any = None, **_: Any) -> None:
        self.quarantined.labels(task=_task(sender)).inc()

    def _on_step_replayed(self, sender: Any = None, **_: Any) -> None:
        self.step_replayed.labels(task=_task(sender)).inc()
