"""What ``make bench`` runs: the worker setups and the scenarios on each.

A *setup* is one worker (pool, processes) and one result setting; a *scenario* is one
workload on one setup. The main setup (prefork, 2 processes, results written) runs
every workload and the peers, as the report always did; the others run the workloads
the targets are judged on, unique tasks and duplicates of completed keys, with plain
Celery, the floors and celery-idem, so that a ratio is always taken on the same worker
in the same round.

Quick mode for development: ``BENCH_ROUNDS`` (rounds of every scenario) and
``BENCH_SCALE`` (multiplies every N), or ``--rounds`` / ``--scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.contenders import CORE, FLOORS, MEASURED

__all__ = ["MAIN", "SCENARIOS", "SETUPS", "WARM_UP", "Scenario", "Setup"]


@dataclass(frozen=True)
class Setup:
    """One worker configuration: the pool, its processes, whether results are written."""

    name: str
    pool: str
    concurrency: int
    results: bool

    @property
    def label(self) -> str:
        """As the tables name it."""
        pool = "solo" if self.pool == "solo" else f"prefork -c {self.concurrency}"
        return f"{pool}, " + ("result backend" if self.results else "task_ignore_result")


SETUPS = (
    Setup("p2", "prefork", 2, results=True),
    Setup("p2i", "prefork", 2, results=False),
    Setup("solo", "solo", 1, results=True),
    Setup("soloi", "solo", 1, results=False),
    Setup("p4", "prefork", 4, results=True),
    Setup("p4i", "prefork", 4, results=False),
)
MAIN = SETUPS[0]
"""The setup of every workload and of the peers (the report's original one)."""


@dataclass(frozen=True)
class Scenario:
    """One workload on one setup: ``n`` deliveries over ``keys`` keys (None: all distinct)."""

    name: str
    """``a`` .. ``e`` on the main setup, ``<workload>.<setup>`` elsewhere."""
    title: str
    n: int
    keys: int | None
    sleep_ms: float
    long: bool = False
    rounds: int = 5
    contenders: tuple[str, ...] = CORE
    """Who runs, in this order in the first round (rotated after)."""
    prefill: bool = False
    """Duplicates of completed keys: every key runs once, untimed, before the timed run."""
    timeout: float = 180.0
    setup: str = MAIN.name
    workload: str = ""
    """The letter shared by a workload's scenarios on every setup."""


def _workloads(setup: Setup) -> list[Scenario]:
    main = setup == MAIN
    suffix = "" if main else f".{setup.name}"
    here = setup.name
    out = [
        Scenario(
            "a" + suffix, "unique keys, no-op body", n=2000 if main else 1500, keys=None,
            sleep_ms=0, contenders=(*MEASURED, "idem_wait") if main else CORE, workload="a",
            setup=here,
        ),
        Scenario(
            "e" + suffix, "duplicates of completed keys, no-op body", n=1500, keys=None,
            sleep_ms=0, prefill=True, workload="e", setup=here,
        ),
    ]  # fmt: skip
    if main:
        out[1:1] = [
            Scenario(
                "b", "unique keys, 5 ms body", n=1000, keys=None, sleep_ms=5,
                contenders=MEASURED, workload="b", setup=here,
            ),
            # The floors do not deduplicate: in the storm they would be plain Celery again.
            Scenario(
                "c", "webhook storm: 10 000 deliveries over 100 keys", n=10000, keys=100,
                sleep_ms=0, workload="c", setup=here,
                contenders=(*(c for c in MEASURED if c not in FLOORS), "idem_pub"),
            ),
            # Four 1.8 s tasks: a ratio is meaningless; the round trips are the point.
            Scenario(
                "d", "long tasks, 1.8 s body, idem_lease 3 s", n=4, keys=None, sleep_ms=1800,
                long=True, rounds=3, workload="d", setup=here,
                contenders=tuple(c for c in MEASURED if c not in FLOORS),
            ),
        ]  # fmt: skip
    return out


SCENARIOS = tuple(s for setup in SETUPS for s in _workloads(setup))
WARM_UP = (
    Scenario("warm", "warm-up", n=100, keys=None, sleep_ms=0, timeout=90),
    # A body past lease/3 loads celery-idem's renew script, so (d) runs warm too.
    Scenario("warm", "warm-up, long", n=2, keys=None, sleep_ms=1100, long=True, timeout=90),
)
