"""The chaos nemesis against fake targets: callbacks that record, and ``sleep`` processes.

No worker or server runs here: the orchestrator's callbacks are fakes, and the
processes the nemesis signals are throwaway ``sleep 60`` children of the test, all
killed at the end. What is checked is the nemesis' own contract: every kind injected
(deck), a well-formed log, nothing left stopped or degraded by stop(), and seeding.
"""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from devtools.processes import wait_for
from tests.chaos.nemesis import (
    ALL_KINDS,
    INSTANT,
    Nemesis,
    NemesisTargets,
    PlannedFault,
    plan_faults,
)
from tests.chaos.plan import POSTGRES_KINDS

KEYS = {"kind", "start", "end", "pids", "detail"}


class Sleeps:
    """Every ``sleep 60`` a test starts, so that all are killed and reaped after it."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def new(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["sleep", "60"])
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()  # SIGKILL also ends a stopped process
            proc.wait(timeout=10)


def state(pid: int) -> str:
    """The process state letter of /proc/<pid>/stat ('T' = stopped), '' once reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return ""
    return stat.rsplit(")", 1)[1].split()[0]


class FakeWorker:
    """A "worker": a main sleep and two child sleeps, replaced when killed (as prefork)."""

    def __init__(self, sleeps: Sleeps) -> None:
        self.sleeps = sleeps
        self.lock = threading.Lock()
        self.kills = self.restarts = 0
        self.main = sleeps.new()
        self.kids = [sleeps.new(), sleeps.new()]

    @property
    def main_pid(self) -> int:
        return self.main.pid

    def children(self) -> list[int]:
        with self.lock:
            self.kids = [k if k.poll() is None else self.sleeps.new() for k in self.kids]
            return [k.pid for k in self.kids]

    def kill(self) -> None:
        with self.lock:
            self.kills += 1
            for proc in (self.main, *self.kids):
                proc.kill()
                proc.wait(timeout=10)

    def restart(self) -> None:
        with self.lock:
            self.restarts += 1
            self.main = self.sleeps.new()
            self.kids = [self.sleeps.new(), self.sleeps.new()]


class FakeProxy:
    """Records the proxy controls; a blackhole lasts until end_blackhole()."""

    def __init__(self) -> None:
        self.latency = 0.0
        self.blackholed = False
        self.calls: list[str] = []

    def set_latency(self, seconds: float) -> None:
        self.calls.append(f"latency {seconds}")
        self.latency = seconds

    def drop_connections(self) -> int:
        self.calls.append("drop")
        return 0

    def blackhole(self, seconds: float) -> None:
        self.calls.append(f"blackhole {seconds}")
        self.blackholed = True

    def end_blackhole(self) -> None:
        self.calls.append("end_blackhole")
        self.blackholed = False


class Fakes:
    """The orchestrator's side: two fake workers, a fake store, a fake proxy."""

    def __init__(self, sleeps: Sleeps) -> None:
        self.sleeps = sleeps
        self.workers = [FakeWorker(sleeps), FakeWorker(sleeps)]
        self.proxy = FakeProxy()
        self.store_running = True
        self.flushes = 0

    def store_stop(self) -> None:
        assert self.store_running
        self.store_running = False

    def store_start(self) -> None:
        self.store_running = True

    def script_flush(self) -> None:
        self.flushes += 1

    def targets(self) -> NemesisTargets:
        return NemesisTargets(
            workers=lambda: list(self.workers),
            store_stop=self.store_stop,
            store_start=self.store_start,
            script_flush=self.script_flush,
            proxy=self.proxy,
        )

    def stopped(self) -> list[int]:
        return [p.pid for p in self.sleeps.procs if state(p.pid) == "T"]


@pytest.fixture
def fakes() -> Iterator[Fakes]:
    sleeps = Sleeps()
    try:
        yield Fakes(sleeps)
    finally:
        sleeps.close()


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def seq(line: dict[str, Any]) -> int:
    """The plan's sequence number, which the detail starts with ("#12 ...")."""
    detail = line["detail"]
    assert isinstance(detail, str)
    assert detail.startswith("#")
    return int(detail[1:].split()[0])


def test_every_kind_is_injected_and_logged(fakes: Fakes, tmp_path: Path) -> None:
    log = tmp_path / "faults.jsonl"
    nemesis = Nemesis(random.Random(1), fakes.targets(), log, lease=0.2, mean_gap=0.1).start()
    try:
        assert nemesis.ensure_each(1, timeout=30.0), nemesis.counts()
    finally:
        nemesis.stop()
    assert not nemesis.failed()
    lines = read_log(log)
    assert len(lines) == sum(nemesis.counts().values())
    for line in lines:
        assert set(line) == KEYS
        kind, start, end, pids = line["kind"], line["start"], line["end"], line["pids"]
        assert kind in ALL_KINDS
        assert isinstance(start, float)
        assert isinstance(end, float)
        assert end >= start
        if kind in INSTANT:
            assert end == start
        assert isinstance(pids, list)
        assert all(isinstance(pid, int) for pid in pids)
        if kind in {"kill_child", "stop_child"}:
            assert len(pids) == 1
        elif kind == "kill_worker":
            assert len(pids) == 3  # main and its two children at kill time
        else:
            assert pids == []
        seq(line)
    # What each kind did, seen from the targets.
    assert sum(w.kills for w in fakes.workers) == nemesis.counts()["kill_worker"]
    assert sum(w.restarts for w in fakes.workers) == nemesis.counts()["kill_worker"]
    assert fakes.flushes == nemesis.counts()["script_flush"]
    assert fakes.proxy.calls.count("drop") == nemesis.counts()["proxy_drop"]
    assert fakes.store_running
    assert fakes.proxy.latency == 0
    assert not fakes.proxy.blackholed
    assert fakes.stopped() == []


def test_stop_ends_the_faults_in_progress(fakes: Fakes, tmp_path: Path) -> None:
    """A long lease: stop() must cut every fault short, not wait them out.

    Kills run too: a child held stopped must come out of it alive, never killed.
    """
    log = tmp_path / "faults.jsonl"
    kinds = (*[k for k in ALL_KINDS if k not in INSTANT], "kill_child")
    nemesis = Nemesis(
        random.Random(2), fakes.targets(), log, lease=20.0, kinds=kinds, mean_gap=0.05
    ).start()
    try:
        wait_for(
            lambda: fakes.stopped() and fakes.proxy.blackholed and fakes.proxy.latency > 0,
            timeout=10.0,
            message="a child stopped, a blackhole and latency, all at once",
        )
        held = fakes.stopped()
    finally:
        nemesis.stop(timeout=20.0)
    assert fakes.stopped() == []
    assert all(state(pid) not in {"T", ""} for pid in held)  # running again, not killed
    assert fakes.proxy.latency == 0
    assert not fakes.proxy.blackholed
    assert fakes.store_running
    lines = read_log(log)
    assert {line["kind"] for line in lines} >= {"stop_child", "proxy_blackhole", "proxy_latency"}
    stop_lines = [line for line in lines if line["kind"] == "stop_child"]
    assert set(held) <= {pid for line in stop_lines for pid in line["pids"]}


def test_the_plan_is_a_function_of_the_seed() -> None:
    def plan(seed: int, *, deck: bool = True) -> list[PlannedFault]:
        faults = plan_faults(random.Random(seed), ALL_KINDS, lease=2.0, mean_gap=2.0, deck=deck)
        return list(itertools.islice(faults, 80))

    assert plan(7) == plan(7)
    assert plan(7) != plan(8)
    assert plan(7, deck=False) == plan(7, deck=False)
    # The deck: every run of len(kinds) faults holds each kind once.
    kinds = [fault.kind for fault in plan(7)]
    for deck in range(0, len(kinds), len(ALL_KINDS)):
        assert sorted(kinds[deck : deck + len(ALL_KINDS)]) == sorted(ALL_KINDS)


def logged(nemesis: Nemesis) -> int:
    return sum(nemesis.counts().values()) + sum(nemesis.failed().values())


def test_same_seed_same_kinds_in_the_log(tmp_path: Path) -> None:
    """Two runs of one seed, at once: the logged kinds, in plan order, are the same."""
    kinds = tuple(k for k in ALL_KINDS if k != "proxy_latency")  # 1 to 4 s each: too slow
    runs: list[tuple[Nemesis, Path, Sleeps]] = []
    try:
        for run in range(2):
            sleeps = Sleeps()
            log = tmp_path / f"faults-{run}.jsonl"
            nemesis = Nemesis(
                random.Random(42),
                Fakes(sleeps).targets(),
                log,
                lease=0.05,
                kinds=kinds,
                mean_gap=0.02,
                max_faults=14,
            )
            runs.append((nemesis, log, sleeps))
        for nemesis, _, _ in runs:
            nemesis.start()
        wait_for(
            lambda: all(logged(nemesis) == 14 for nemesis, _, _ in runs),
            timeout=20.0,
            message="14 faults logged by each run",
        )
    finally:
        for nemesis, _, sleeps in runs:
            nemesis.stop()
            sleeps.close()
    sequences = [[line["kind"] for line in sorted(read_log(log), key=seq)] for _, log, _ in runs]
    assert sequences[0] == sequences[1]
    assert sequences[0] == [fault.kind for fault in runs[0][0].planned()]
    assert runs[0][0].planned() == runs[1][0].planned()


def test_unknown_kind_is_refused(fakes: Fakes, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown fault kinds"):
        Nemesis(random.Random(0), fakes.targets(), tmp_path / "f", lease=1.0, kinds=["nap"])


def test_the_postgres_stores_faults_need_their_callbacks(fakes: Fakes, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"needs NemesisTargets\.store_kill"):
        Nemesis(random.Random(0), fakes.targets(), tmp_path / "f", lease=1.0,
                kinds=POSTGRES_KINDS)  # fmt: skip


def test_every_postgres_kind_is_injected(fakes: Fakes, tmp_path: Path) -> None:
    """The PostgreSQL store's kinds: a kill is a stop (the store is started again after
    it), terminated sessions are counted in the detail; no SCRIPT FLUSH."""
    kills, terminated = [], []

    def kill() -> None:
        kills.append(1)
        fakes.store_stop()

    def terminate() -> int:
        terminated.append(1)
        return 7

    targets = replace(fakes.targets(), script_flush=None, store_kill=kill,
                      terminate_backends=terminate)  # fmt: skip
    log = tmp_path / "faults.jsonl"
    nemesis = Nemesis(
        random.Random(3), targets, log, lease=0.2, kinds=POSTGRES_KINDS, mean_gap=0.1
    ).start()
    try:
        assert nemesis.ensure_each(1, timeout=30.0), nemesis.counts()
    finally:
        nemesis.stop()
    assert not nemesis.failed()
    counts = nemesis.counts()
    assert set(counts) == set(POSTGRES_KINDS)
    assert len(kills) == counts["store_kill"]
    assert len(terminated) == counts["terminate_backends"]
    assert fakes.flushes == 0
    assert fakes.store_running
    lines = read_log(log)
    for line in lines:
        if line["kind"] == "terminate_backends":
            assert line["end"] == line["start"]
            assert line["detail"].endswith("pg_terminate_backend of 7 sessions")
        if line["kind"] == "store_kill":
            assert "killed, down" in line["detail"]
