"""The nemesis's fault kinds, its targets and its plan: which fault comes when.

Kept apart from ``nemesis.py`` (which injects the faults) for size only; ``nemesis``
re-exports the names its callers use. Everything random is drawn here, in plan order, before a
fault meets the processes of the run (:func:`plan_faults`): one seed, one sequence of
kinds and parameters whatever the timing.

The store's kinds depend on the store: the Redis store's server is restarted (AOF on)
and its scripts flushed (``SCRIPT FLUSH``); the PostgreSQL store's server is restarted
(fast shutdown), killed (SIGKILL of the postmaster and its backends: crash recovery at
the next start), and its workers' sessions terminated (``pg_terminate_backend``).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "ALL_KINDS",
    "EXCLUSIVE",
    "INSTANT",
    "KNOWN_KINDS",
    "MAX_GAP",
    "POSTGRES_KINDS",
    "POSTGRES_STORE_KINDS",
    "PROCESS_KINDS",
    "PROXY_KINDS",
    "STORE_KINDS",
    "NemesisTargets",
    "PlannedFault",
    "ProxyControls",
    "WorkerHandle",
    "kinds_for",
    "plan_faults",
]

PROCESS_KINDS = ("kill_child", "kill_worker", "stop_child")  # pids: the processes hit
STORE_KINDS = ("store_restart", "script_flush")  # the Redis store's; pids: []
POSTGRES_STORE_KINDS = ("store_restart", "store_kill", "terminate_backends")  # pids: []
PROXY_KINDS = ("proxy_latency", "proxy_drop", "proxy_blackhole")  # pids: []
ALL_KINDS: tuple[str, ...] = PROCESS_KINDS + STORE_KINDS + PROXY_KINDS
"""Every kind of the Redis store's soak (the default)."""
POSTGRES_KINDS: tuple[str, ...] = PROCESS_KINDS + POSTGRES_STORE_KINDS + PROXY_KINDS
"""Every kind of the PostgreSQL store's soak."""
KNOWN_KINDS: tuple[str, ...] = tuple(dict.fromkeys(ALL_KINDS + POSTGRES_KINDS))
INSTANT = frozenset({"kill_child", "script_flush", "proxy_drop", "terminate_backends"})
EXCLUSIVE = {
    "kill_worker": "workers",
    "store_restart": "store",
    "store_kill": "store",
    "script_flush": "store",  # a flush on a server being restarted would just fail
    "terminate_backends": "store",
    "proxy_latency": "latency",
    "proxy_blackhole": "blackhole",
}
MAX_GAP = 5.0  # mean gaps: a hard bound on the time a deck takes


def kinds_for(store: str) -> tuple[str, ...]:
    """Every fault kind of a soak on ``store`` (``redis`` or ``postgres``)."""
    return POSTGRES_KINDS if store == "postgres" else ALL_KINDS


class WorkerHandle(Protocol):
    """A worker of the orchestrator: its main pid, its prefork children right now,
    ``kill()`` (SIGKILL its process group) and ``restart()`` (returns once ready).
    """

    @property
    def main_pid(self) -> int: ...
    def children(self) -> list[int]: ...
    def kill(self) -> None: ...
    def restart(self) -> None: ...


class ProxyControls(Protocol):
    """The controls of :class:`tests.chaos.proxy.FaultProxy` the nemesis uses."""

    def set_latency(self, seconds: float) -> None: ...
    def drop_connections(self) -> int: ...
    def blackhole(self, seconds: float) -> None: ...
    def end_blackhole(self) -> None: ...


@dataclass(frozen=True)
class NemesisTargets:
    """What the nemesis may hit, as callbacks of the orchestrator.

    ``store_stop``/``store_start`` stop the store's server (redis-server with AOF, or
    PostgreSQL's fast shutdown) and start it again on the same port with its data;
    ``store_start`` returns once it answers. The store's own faults are optional, one
    per kind that needs it: ``script_flush`` (Redis's ``SCRIPT FLUSH``), ``store_kill``
    (SIGKILL the server: PostgreSQL recovers from its WAL at ``store_start``) and
    ``terminate_backends`` (PostgreSQL's ``pg_terminate_backend`` of the workers'
    sessions; returns how many).
    """

    workers: Callable[[], Sequence[WorkerHandle]]
    store_stop: Callable[[], object]
    store_start: Callable[[], object]
    proxy: ProxyControls
    script_flush: Callable[[], object] | None = None
    store_kill: Callable[[], object] | None = None
    terminate_backends: Callable[[], int] | None = None


@dataclass(frozen=True)
class PlannedFault:
    """One fault as drawn from the seed, before it meets the processes of the run."""

    seq: int
    gap: float  # seconds after the previous fault was launched
    kind: str
    duration: float  # SIGSTOP, store downtime, latency or blackhole; 0 for the rest
    latency: float  # the one-way delay of a proxy_latency; 0 for the rest
    picks: tuple[float, float]  # in [0, 1): which eligible worker, then which child


def plan_faults(
    rng: random.Random, kinds: Sequence[str], *, lease: float, mean_gap: float, deck: bool = True
) -> Iterator[PlannedFault]:
    """The endless fault sequence of a seed: a pure function of ``rng``'s state."""
    pending: list[str] = []
    for seq in itertools.count(1):
        if not kinds:
            return
        gap = min(rng.expovariate(1.0 / mean_gap), MAX_GAP * mean_gap)
        if deck:
            if not pending:
                pending = list(kinds)
                rng.shuffle(pending)
            kind = pending.pop()
        else:
            kind = rng.choice(list(kinds))
        picks = (rng.random(), rng.random())
        duration = latency = 0.0
        if kind == "stop_child":
            duration = rng.uniform(1.5 * lease, 2.5 * lease)
        elif kind in ("store_restart", "store_kill"):
            duration = rng.uniform(0.0, 0.5 * lease)
        elif kind == "proxy_latency":
            latency, duration = rng.uniform(0.02, 0.2), rng.uniform(1.0, 4.0)
        elif kind == "proxy_blackhole":
            duration = rng.uniform(0.5, max(0.5, 1.5 * lease))
        yield PlannedFault(seq, gap, kind, duration, latency, picks)
