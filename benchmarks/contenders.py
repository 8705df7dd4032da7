"""The contenders ``make bench`` measures: one row each, and every other table derived.

The harness, the worker's app, the figures and the chart all name contenders; they
read them from here, so adding one is one row.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BASELINE", "CONTENDERS", "LABELS", "MEASURED", "STORES", "Contender"]


@dataclass(frozen=True)
class Contender:
    """One way of running the same task."""

    name: str
    """Its task is ``bench.<name>``; every figure is keyed by it."""
    label: str
    """How the table, the page and the chart name it."""
    store: str | None
    """The store server it writes to (a variant shares its base's; plain Celery has none)."""
    color: str
    """Its bars in the chart."""
    variant: bool = False
    """An option of another contender: run only where a scenario lists it."""


ALL = (
    Contender("plain", "plain Celery", None, "#888888"),
    Contender("idem", "celery-idem", "idem", "#2f6fb0"),
    Contender("once", "celery-once", "once", "#d98b2b"),
    Contender("singleton", "celery-singleton", "singleton", "#6a9f4b"),
    Contender("idem_pub", "celery-idem + idem_dedupe_on_publish", "idem", "#8fb7e0", variant=True),
)
BASELINE = "plain"
"""What every ratio divides by."""

CONTENDERS = tuple(c.name for c in ALL)
MEASURED = tuple(c.name for c in ALL if not c.variant)
"""The contenders every scenario runs."""
STORES = tuple(dict.fromkeys(c.store for c in ALL if c.store))
"""One store server each."""
LABELS = {c.name: c.label for c in ALL}
COLORS = {c.name: c.color for c in ALL}
CHART_ORDER = tuple(sorted((c for c in ALL if c.name != BASELINE), key=lambda c: str(c.store)))
"""The chart's bars: ratios to the baseline, a variant beside its base (a stable sort by store)."""
