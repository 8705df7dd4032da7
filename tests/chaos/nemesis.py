"""The chaos nemesis: seeded, random, overlapping faults on workers, store and network.

Faults injected one at a time only prove recovery paths one by one; real trouble
overlaps (a worker dies while the store restarts behind a slow link). So each fault
runs in its own thread and a new one may start while others last, except within an
*exclusive* group where overlap is meaningless (two store restarts, a SCRIPT FLUSH on
a stopped server, two blackholes or latencies fighting, two worker restarts). A child
held stopped is never killed, nor its worker: our SIGCONT would hit a dead pid.

Everything random is drawn on the scheduler thread, in plan order, before the fault
runs (:func:`plan_faults`, in ``plan.py`` with each store's kinds and the targets): one
seed, one sequence of kinds and parameters whatever the timing (only the pids differ).
Kinds come from a shuffled deck (each kind once, then refilled): after
``n * len(kinds)`` faults each kind ran ``n`` times, i.e. 40 faults for 8 kinds x 5,
80 s on average at the default 2 s mean gap (a gap is capped at 5).

The log gets one JSON line per fault when it ends: ``kind``, ``start``, ``end`` (epoch;
``end == start`` for instant faults), ``pids`` ([] for store and proxy faults) and
``detail``, which starts with the plan's ``#seq``. A fault whose callback raised is
logged as "#seq failed: ..." and counted in :meth:`Nemesis.failed`; one that found no
target in time, or that stop() pre-empted, is not logged (:meth:`Nemesis.skipped`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from .plan import (
    ALL_KINDS,
    EXCLUSIVE,
    INSTANT,
    KNOWN_KINDS,
    NemesisTargets,
    PlannedFault,
    WorkerHandle,
    plan_faults,
)

__all__ = [  # with what callers import from here of plan.py
    "ALL_KINDS",
    "INSTANT",
    "Nemesis",
    "NemesisTargets",
    "PlannedFault",
    "plan_faults",
]

TARGET_WAIT = 5.0  # s a process fault waits for a target (a booting worker has no children)
SLOT_WAIT = 60.0  # s a fault waits for its exclusive group (a worker restart takes a while)
STORE_START_TRIES = 5


def _index(pick: float, n: int) -> int:
    return min(int(pick * n), n - 1)


@dataclass
class _Record:
    plan: PlannedFault
    start: float | None = None  # set when the fault hits; None = nothing was done
    pids: list[int] = field(default_factory=list)
    detail: str = ""


class Nemesis:
    """Inject seeded random faults from a background thread until :meth:`stop`."""

    def __init__(
        self,
        rng: random.Random,
        targets: NemesisTargets,
        log_path: Path,
        *,
        lease: float,
        kinds: Sequence[str] = ALL_KINDS,
        mean_gap: float = 2.0,
        deck: bool = True,
        max_faults: int | None = None,
    ) -> None:
        unknown = sorted(set(kinds) - set(KNOWN_KINDS))
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; known: {list(KNOWN_KINDS)}")
        for kind in ("script_flush", "store_kill", "terminate_backends"):
            if kind in kinds and getattr(targets, kind) is None:
                raise ValueError(f"fault kind {kind!r} needs NemesisTargets.{kind}")
        if mean_gap <= 0 or lease <= 0:
            raise ValueError("lease and mean_gap must be > 0")
        self.kinds = tuple(kinds)
        self.lease = lease
        self._targets = targets
        self._log_path = Path(log_path)
        self._plans = plan_faults(rng, self.kinds, lease=lease, mean_gap=mean_gap, deck=deck)
        self._max_faults = max_faults
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # counters, log, thread list
        self._targets_lock = threading.Lock()  # choosing a victim and marking it
        self._slots = {group: threading.Lock() for group in set(EXCLUSIVE.values())}
        self._held_stopped: set[int] = set()  # pids under our SIGSTOP
        self._busy_workers: set[int] = set()  # main pids being killed and restarted
        self._store_down = False
        self._counts: Counter[str] = Counter()
        self._failed: Counter[str] = Counter()
        self._skipped: Counter[str] = Counter()
        self._planned: list[PlannedFault] = []
        self._threads: list[threading.Thread] = []
        self._scheduler: threading.Thread | None = None
        self._log: TextIO | None = None

    # -- public API ----------------------------------------------------------------------

    def start(self) -> Nemesis:
        """Open the log (appending) and start injecting; returns self."""
        if self._scheduler is not None:
            raise RuntimeError("Nemesis already started")
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self._log_path.open("a", encoding="utf-8")
        self._scheduler = threading.Thread(target=self._schedule, name="nemesis", daemon=True)
        self._scheduler.start()
        return self

    def stop(self, timeout: float = 120.0) -> None:
        """Stop injecting, cut every fault in progress short (SIGCONT, blackhole end,
        latency 0, store started), wait for a worker restart in progress; idempotent.

        Raises:
            RuntimeError: a fault thread was still running after ``timeout`` seconds.
        """
        self._stopping.set()
        deadline = time.monotonic() + timeout
        if self._scheduler is not None:
            self._scheduler.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._restore()
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            raise RuntimeError(f"nemesis faults still running after {timeout:.0f}s: {stuck}")

    def counts(self) -> Counter[str]:
        """Faults injected (and logged) so far, by kind."""
        with self._lock:
            return Counter(self._counts)

    def failed(self) -> Counter[str]:
        """Faults whose callback raised (logged with a "failed:" detail), by kind."""
        with self._lock:
            return Counter(self._failed)

    def skipped(self) -> Counter[str]:
        """Faults not injected (no target or exclusive group free in time, or stopping)."""
        with self._lock:
            return Counter(self._skipped)

    def planned(self) -> list[PlannedFault]:
        """The faults launched so far, in plan order (the seed's sequence)."""
        with self._lock:
            return list(self._planned)

    def ensure_each(self, min_count: int, timeout: float) -> bool:
        """Wait until every kind was injected ``min_count`` times; False on timeout.

        With the deck this holds after ``min_count * len(kinds)`` faults: an orchestrator
        that must show "every kind N times" keeps its workload going until this is True.
        """
        deadline = time.monotonic() + timeout
        while True:
            counts = self.counts()
            if all(counts[kind] >= min_count for kind in self.kinds):
                return True
            if time.monotonic() >= deadline or self._stopping.wait(0.05):
                return False

    # -- scheduling ----------------------------------------------------------------------

    def _schedule(self) -> None:
        for plan in self._plans:
            if self._max_faults is not None and plan.seq > self._max_faults:
                return
            if self._stopping.wait(plan.gap):
                return
            name = f"nemesis-{plan.seq}-{plan.kind}"
            thread = threading.Thread(target=self._inject, args=(plan,), name=name, daemon=True)
            with self._lock:
                self._planned.append(plan)
                self._threads = [t for t in self._threads if t.is_alive()]
                self._threads.append(thread)
            thread.start()

    def _inject(self, plan: PlannedFault) -> None:
        slot = self._slots.get(EXCLUSIVE.get(plan.kind, ""))
        if slot is not None and not self._acquire(slot):
            self._tally(self._skipped, plan.kind)
            return
        record, counter = _Record(plan), self._counts
        try:
            if not self._stopping.is_set():
                getattr(self, f"_{plan.kind}")(record)
        except Exception as exc:
            record.detail, counter = f"failed: {type(exc).__name__}: {exc}", self._failed
            record.start = record.start or time.time()
        finally:
            if slot is not None:
                slot.release()
        if record.start is None:
            self._tally(self._skipped, plan.kind)
            return
        end = record.start if plan.kind in INSTANT and counter is self._counts else time.time()
        line = {"kind": plan.kind, "start": record.start, "end": end, "pids": record.pids}
        line["detail"] = f"#{plan.seq} {record.detail}".rstrip()
        self._tally(counter, plan.kind, json.dumps(line))

    def _acquire(self, slot: threading.Lock) -> bool:
        deadline = time.monotonic() + SLOT_WAIT
        while not self._stopping.is_set() and time.monotonic() < deadline:
            if slot.acquire(timeout=0.1):
                return True
        return False

    def _tally(self, counter: Counter[str], kind: str, line: str | None = None) -> None:
        """Count a fault and append its line to the log, flushed: a crash keeps it."""
        with self._lock:
            counter[kind] += 1
            if line is not None and self._log is not None:
                self._log.write(line + "\n")
                self._log.flush()

    def _await_target(
        self, plan: PlannedFault, hit: Callable[[int], None] | None = None
    ) -> tuple[int, WorkerHandle, int] | None:
        """:meth:`_pick` under the targets lock until it finds a target (bounded wait).

        ``hit(pid)`` runs under the lock too: a kill_child must not signal a child whose
        worker a kill_worker has just killed and reaped (its pid could be reused).
        """
        deadline = time.monotonic() + TARGET_WAIT
        while not self._stopping.is_set():
            with self._targets_lock:
                found = self._pick(plan)
                if found is not None and hit is not None:
                    hit(found[2])
            if found is not None or time.monotonic() >= deadline:
                return found
            self._stopping.wait(0.05)
        return None

    def _pick(self, plan: PlannedFault) -> tuple[int, WorkerHandle, int] | None:
        """(worker index, worker, child pid) chosen by the plan's picks; None: no target.

        Never a worker being restarted nor a child we hold stopped, and for a kill_worker
        no worker holding a stopped child. The choice is marked (child held, worker busy)
        under the targets lock, so the next pick sees it.
        """
        eligible: list[tuple[int, WorkerHandle, list[int]]] = []
        for index, worker in enumerate(self._targets.workers()):
            if worker.main_pid in self._busy_workers:
                continue
            kids = sorted(worker.children())
            free = [pid for pid in kids if pid not in self._held_stopped]
            if (free == kids) if plan.kind == "kill_worker" else free:
                eligible.append((index, worker, free))
        if not eligible:
            return None
        index, worker, free = eligible[_index(plan.picks[0], len(eligible))]
        pid = free[_index(plan.picks[1], len(free))] if free else -1
        if plan.kind == "kill_worker":
            self._busy_workers.add(worker.main_pid)
        elif plan.kind == "stop_child":
            self._held_stopped.add(pid)
        return index, worker, pid

    # -- the faults (each fills its record; ``start`` once it has hit) --------------------

    def _lasting(
        self, record: _Record, begin: Callable[[], object], end: Callable[[], object]
    ) -> str:
        """Begin, hold for the planned duration (stop() cuts it short), end: "held/planned"."""
        record.start = time.time()
        begin()
        try:
            self._stopping.wait(record.plan.duration)
        finally:
            end()
        return f"{time.time() - record.start:.2f}s of {record.plan.duration:.2f}s"

    def _kill_child(self, record: _Record) -> None:
        def kill(pid: int) -> None:
            record.start, record.pids = time.time(), [pid]
            os.kill(pid, signal.SIGKILL)

        found = self._await_target(record.plan, kill)
        if found is not None:
            record.detail = f"worker {found[0]} child {found[2]}"

    def _stop_child(self, record: _Record) -> None:
        found = self._await_target(record.plan)
        if found is None:
            return
        index, _, pid = found

        def resume() -> None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            with self._targets_lock:
                self._held_stopped.discard(pid)

        record.pids = [pid]
        try:
            held = self._lasting(record, lambda: os.kill(pid, signal.SIGSTOP), resume)
        except ProcessLookupError:  # gone before SIGSTOP: release it all the same
            resume()
            raise
        record.detail = f"worker {index} child {pid} stopped {held}"

    def _kill_worker(self, record: _Record) -> None:
        found = self._await_target(record.plan)
        if found is None:
            return
        index, worker, _ = found
        main = worker.main_pid
        try:
            record.pids = [main, *sorted(worker.children())]
            record.start = time.time()
            worker.kill()
            worker.restart()  # even when stopping: the run must end with its workers
        finally:
            with self._targets_lock:
                self._busy_workers.discard(main)
        record.detail = f"worker {index} pid {main} restarted as {worker.main_pid}"

    def _store_restart(self, record: _Record) -> None:
        def down() -> None:
            with self._lock:
                self._store_down = True  # before the call: stop() starts it if need be
            self._targets.store_stop()

        record.detail = f"down {self._lasting(record, down, self._start_store)}"

    def _start_store(self) -> None:
        """Start the store, retrying a few times (its port may linger a moment)."""
        for attempt in range(1, STORE_START_TRIES + 1):
            try:
                self._targets.store_start()
                break
            except Exception:
                if attempt == STORE_START_TRIES:
                    raise
                time.sleep(0.2 * attempt)
        with self._lock:
            self._store_down = False

    def _store_kill(self, record: _Record) -> None:
        kill = self._targets.store_kill
        assert kill is not None  # checked in __init__

        def down() -> None:
            with self._lock:
                self._store_down = True
            kill()

        record.detail = f"killed, down {self._lasting(record, down, self._start_store)}"

    def _script_flush(self, record: _Record) -> None:
        flush = self._targets.script_flush
        assert flush is not None  # checked in __init__
        record.start, record.detail = time.time(), "SCRIPT FLUSH"
        flush()

    def _terminate_backends(self, record: _Record) -> None:
        terminate = self._targets.terminate_backends
        assert terminate is not None  # checked in __init__
        record.start = time.time()
        record.detail = f"pg_terminate_backend of {terminate()} sessions"

    def _proxy_latency(self, record: _Record) -> None:
        proxy, latency = self._targets.proxy, record.plan.latency
        held = self._lasting(
            record, lambda: proxy.set_latency(latency), lambda: proxy.set_latency(0)
        )
        record.detail = f"{latency * 1000:.0f} ms for {held}"

    def _proxy_drop(self, record: _Record) -> None:
        record.start = time.time()
        record.detail = f"dropped {self._targets.proxy.drop_connections()} connections"

    def _proxy_blackhole(self, record: _Record) -> None:
        proxy = self._targets.proxy
        begin = lambda: proxy.blackhole(record.plan.duration)  # noqa: E731
        record.detail = self._lasting(record, begin, proxy.end_blackhole)

    # -- cleanup -------------------------------------------------------------------------

    def _restore(self) -> None:
        """Undo whatever a fault thread that did not finish may have left behind."""
        with self._targets_lock:
            held = list(self._held_stopped)
        for pid in held:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if self._scheduler is not None:
            with contextlib.suppress(RuntimeError):  # the proxy was stopped already
                self._targets.proxy.set_latency(0.0)
                self._targets.proxy.end_blackhole()
        with self._lock:
            down = self._store_down
        if down:
            self._start_store()
