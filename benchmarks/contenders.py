"""The contenders ``make bench`` measures: one row each, and every other table derived.

The harness, the worker's app, the figures and the chart all name contenders; they
read them from here, so adding one is one row.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BASELINE",
    "CONTENDERS",
    "CORE",
    "FLOORS",
    "LABELS",
    "MEASURED",
    "STORES",
    "STORE_OF",
    "Contender",
]


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
    peer: bool = False
    """Another library: run only in the scenarios that compare peers (not the pool matrix)."""
    floor: bool = False
    """Plain Celery plus raw round trips: a ratio's other denominator, not a product."""


ALL = (
    Contender("plain", "plain Celery", None, "#888888"),
    # The floors of any claim-then-complete design: the no-op body plus raw redis-py
    # commands on a store server of the same kind as celery-idem's (its own, so they
    # can be counted): one SET NX, or a SET NX before and a SET after.
    Contender("plain_rt1", "plain + 1 raw round trip", "floor", "#b5b5b5", floor=True),
    Contender("plain_rt2", "plain + 2 raw round trips", "floor", "#d6d6d6", floor=True),
    Contender("idem", "celery-idem", "idem", "#2f6fb0"),
    Contender("once", "celery-once", "once", "#d98b2b", peer=True),
    Contender("singleton", "celery-singleton", "singleton", "#6a9f4b", peer=True),
    Contender("idem_pub", "celery-idem + idem_dedupe_on_publish", "idem", "#8fb7e0", variant=True),
    # The completion waited for, as earlier versions did: what not waiting saves.
    Contender(
        "idem_wait", "celery-idem + idem_blocking_completion", "idem", "#1d4a78", variant=True
    ),
)
BASELINE = "plain"
"""What every "vs plain" ratio divides by."""
FLOORS = tuple(c.name for c in ALL if c.floor)
"""The other denominators: every ratio is also given against each floor."""

CONTENDERS = tuple(c.name for c in ALL)
MEASURED = tuple(c.name for c in ALL if not c.variant)
"""The contenders every peer-comparing scenario runs."""
CORE = tuple(c.name for c in ALL if not (c.variant or c.peer))
"""The contenders every scenario runs: plain Celery, the floors, celery-idem."""
STORES = tuple(dict.fromkeys(c.store for c in ALL if c.store))
"""One store server each."""
STORE_OF = {c.name: c.store for c in ALL}
LABELS = {c.name: c.label for c in ALL}
COLORS = {c.name: c.color for c in ALL}
CHART_ORDER = tuple(sorted((c for c in ALL if c.name != BASELINE), key=lambda c: str(c.store)))
"""The chart's bars: ratios to the baseline, a variant beside its base (a stable sort by store)."""
