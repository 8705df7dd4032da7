"""The benchmark harness behind ``make bench`` (``python -m benchmarks``).

One broker/result-backend redis-server, one dedicated store server per contender, one
prefork worker (2 processes) serving every contender's task, and a fresh publisher
process per run. Per scenario, rounds in which the contenders take turns (the order
rotates each round); in the first round, ``redis-cli monitor`` of the contender's
store counts its round trips. See ``docs/benchmarks.md`` for the method and the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.contenders import CONTENDERS, MEASURED, STORES
from devtools.processes import Process
from devtools.redis_server import RedisServer, find_redis_cli, server_version

ROOT = Path(__file__).resolve().parents[1]
BROKER_DB, BACKEND_DB, COUNTER_DB = 0, 1, 2
HANDSHAKE = {"echo", "ping", "client", "hello", "select", "auth", "info", "config", "command"}
"""Commands that open a connection or mark a run: not round trips of the protocol."""


@dataclass(frozen=True)
class Scenario:
    """One workload: ``n`` deliveries over ``keys`` keys (None: all distinct)."""

    name: str
    title: str
    n: int
    keys: int | None
    sleep_ms: float
    long: bool = False
    rounds: int = 3
    extra: tuple[str, ...] = ()
    """Contenders run in this scenario only, after the four of every scenario."""
    timeout: float = 180.0


SCENARIOS = (
    Scenario("a", "unique keys, no-op body", n=2000, keys=None, sleep_ms=0, rounds=5),
    Scenario("b", "unique keys, 5 ms body", n=1000, keys=None, sleep_ms=5),
    Scenario(
        "c",
        "webhook storm: 10 000 deliveries over 100 keys",
        n=10000,
        keys=100,
        sleep_ms=0,
        extra=("idem_pub",),
    ),
    Scenario(
        "d", "long tasks, 1.8 s body, idem_lease 3 s", n=4, keys=None, sleep_ms=1800, long=True
    ),
)
WARM_UP = (
    Scenario("warm", "warm-up", n=100, keys=None, sleep_ms=0, timeout=90),
    # A body past lease/3 loads celery-idem's renew script, so (d) runs warm too.
    Scenario("warm", "warm-up, long", n=2, keys=None, sleep_ms=1100, long=True, timeout=90),
)


class Monitor:
    """``redis-cli monitor`` of one store server, into a file (cheap: no Python parsing)."""

    _LINE = re.compile(r'^[\d.]+ \[\d+ (\S+)\] "([^"]*)"(?: "([^"]*)")?')

    def __init__(self, cli: str, server: RedisServer, path: Path) -> None:
        self.path = path
        self._out = path.open("wb")
        self.proc = subprocess.Popen(  # noqa: S603 - our own argv, no shell
            [cli, "-p", str(server.port), "monitor"], stdout=self._out,
            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        probe = server.client()
        marker = f"bench:monitor:{uuid.uuid4().hex}"
        deadline = time.monotonic() + 10
        while marker not in path.read_text(errors="replace"):  # it is listening
            probe.echo(marker)
            if time.monotonic() > deadline:
                raise RuntimeError("redis-cli monitor did not start")
            time.sleep(0.05)
        probe.close()

    def stop(self, end_marker: str) -> list[tuple[str, str, str]]:
        """Wait for ``end_marker``, stop, return (client, command, first arg) in order."""
        deadline = time.monotonic() + 30
        while end_marker not in self.path.read_text(errors="replace"):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self._out.close()
        seen = []
        for line in self.path.read_text(errors="replace").splitlines():
            match = self._LINE.match(line)
            if match:
                seen.append((match[1], match[2].lower(), match[3] or ""))
        return seen


def _script_names() -> dict[str, str]:
    """SHA1 -> name of celery-idem's Lua scripts, to tell claims from completions."""
    try:
        from celery_idem.store.redis_base import SOURCES  # noqa: PLC0415 - optional detail
    except ImportError:  # the module changed shape: keep counting, without names
        return {}
    return {hashlib.sha1(src.encode()).hexdigest(): name for name, src in SOURCES.items()}  # noqa: S324 - Redis names scripts by SHA1


def count_round_trips(
    seen: list[tuple[str, str, str]], run_id: str, publisher_ports: set[int]
) -> dict[str, dict[str, int]]:
    """Network commands between the run's markers, by side (publisher, worker)."""
    scripts = _script_names()
    start, end = f"bench:start:{run_id}", f"bench:end:{run_id}"
    inside = False
    counts: dict[str, Counter[str]] = {"publisher": Counter(), "worker": Counter()}
    for client, command, arg in seen:
        if command == "echo" and arg in (start, end):
            inside = arg == start
            continue
        if not inside or client == "lua" or command in HANDSHAKE:
            continue
        port = int(client.rsplit(":", 1)[1]) if ":" in client else -1
        side = "publisher" if port in publisher_ports else "worker"
        label = command
        if command in ("evalsha", "eval"):
            label = f"{command}:{scripts.get(arg, arg[:8])}"
        counts[side][label] += 1
    return {side: dict(c) for side, c in counts.items()}


def bench_env(broker: RedisServer, stores: Mapping[str, RedisServer]) -> dict[str, str]:
    """The environment ``benchmarks.app`` reads (``BENCH_*``), the checkout on PYTHONPATH.

    One broker server holds the broker, the result backend and the completion counter
    (three databases); each contender's store is a server of its own.
    """
    return {
        **os.environ,
        "BENCH_BROKER": broker.url(BROKER_DB),
        "BENCH_BACKEND": broker.url(BACKEND_DB),
        "BENCH_COUNTER": broker.url(COUNTER_DB),
        **{f"BENCH_STORE_{name.upper()}": store.url(0) for name, store in stores.items()},
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }


class Bench:
    """Servers, the worker and the runs."""

    def __init__(self, workdir: Path, concurrency: int) -> None:
        self.workdir = workdir
        self.concurrency = concurrency
        self.broker = RedisServer().start()
        self.stores = {name: RedisServer().start() for name in STORES}
        self.cli = find_redis_cli(self.broker.executable)
        self.env = bench_env(self.broker, self.stores)
        self.worker: Process | None = None
        self.worker_log = workdir / "worker.log"

    # -- worker ---------------------------------------------------------------------

    def start_worker(self) -> None:
        """``celery worker``: prefork, ``concurrency`` processes, the bench queue only."""
        cmd = [
            sys.executable, "-m", "celery", "-A", "benchmarks.app", "worker",
            "-P", "prefork", "-c", str(self.concurrency), "-Q", "bench", "-n", "bench@%h",
            "-l", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        self.worker = Process("the bench worker", cmd, self.worker_log, self.env, ROOT).start()

    def stop_worker(self) -> None:
        """Warm shutdown of the worker's process group; SIGKILL if it hangs."""
        worker, self.worker = self.worker, None
        if worker is not None:
            worker.stop(timeout=20)

    def warm_up(self) -> None:
        """Some tasks of every contender: connections, scripts, imports in both children."""
        for scenario in WARM_UP:
            for contender in CONTENDERS if scenario.sleep_ms == 0 else ("idem",):
                out = self.publish(contender, scenario)
                if out.get("timeout") or out.get("error"):
                    raise RuntimeError(
                        f"warm-up of {contender} failed: {out}\n{self._worker_log_tail()}"
                    )

    def _worker_log_tail(self) -> str:
        try:
            return self.worker_log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def recover(self) -> None:
        """After a failed run: restart the worker on an empty queue."""
        self.stop_worker()
        with contextlib.closing(self.broker.client(BROKER_DB)) as client:
            client.delete("bench", "unacked", "unacked_index")
        self.start_worker()
        self.warm_up()

    # -- one run --------------------------------------------------------------------

    def _reset(self) -> None:
        with contextlib.closing(self.broker.client(COUNTER_DB)) as client:
            client.flushdb()
        with contextlib.closing(self.broker.client(BACKEND_DB)) as client:
            client.flushdb()
        for server in self.stores.values():
            with contextlib.closing(server.client()) as client:
                client.flushall()

    def publish(
        self,
        contender: str,
        scenario: Scenario,
        seed: int = 0,
        monitor: Monitor | None = None,
        *,
        reset: bool = True,
    ) -> dict[str, Any]:
        """Run the publisher process for one (contender, scenario); its JSON figures."""
        assert self.worker is not None
        run_id = uuid.uuid4().hex[:8]
        store = self.store_of(contender)
        servers = [s.pid for s in (self.broker, *self.stores.values()) if s.pid]
        spec = {
            "contender": contender, "run_id": run_id, "n": scenario.n, "keys": scenario.keys,
            "sleep_ms": scenario.sleep_ms, "long": scenario.long, "seed": seed,
            "worker_pid": self.worker.pid, "store_port": store.port if store else None,
            "timeout": scenario.timeout, "server_pids": servers,
            "monitor_pid": monitor.proc.pid if monitor else None,
        }  # fmt: skip
        if reset:
            self._reset()  # counter, results and stores empty: nothing left from before
        try:
            done = subprocess.run(  # noqa: S603 - our own argv, no shell
                [sys.executable, "-m", "benchmarks.publish", json.dumps(spec)],
                cwd=ROOT, env=self.env, capture_output=True, timeout=scenario.timeout + 120,
                check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return {"error": "publisher timed out", "run_id": run_id}
        if done.returncode != 0:
            return {"error": done.stderr.decode(errors="replace")[-3000:], "run_id": run_id}
        out: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
        out["run_id"] = run_id
        return out

    def store_of(self, contender: str) -> RedisServer | None:
        """The contender's store server (celery-idem's variant shares celery-idem's)."""
        return self.stores.get("idem" if contender.startswith("idem") else contender)

    def used_memory(self, contender: str) -> int:
        """``used_memory`` of the contender's store (0 without a store)."""
        server = self.store_of(contender)
        if server is None:
            return 0
        with contextlib.closing(server.client()) as client:
            return int(client.info("memory")["used_memory"])

    def store_memory(self, contender: str) -> tuple[int, int]:
        """(keys, total ``MEMORY USAGE`` bytes) on the contender's store after a run."""
        server = self.store_of(contender)
        if server is None:
            return 0, 0
        with contextlib.closing(server.client()) as client:
            keys = list(client.scan_iter(count=1000))
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.memory_usage(key, samples=0)
            sizes = pipe.execute() if keys else []
        return len(keys), sum(int(s or 0) for s in sizes)

    def run(
        self, contender: str, scenario: Scenario, round_no: int, *, monitor: bool
    ) -> dict[str, Any]:
        """One measured run; under ``monitor``, the store's round trips counted too."""
        store = self.store_of(contender)
        self._reset()
        # Measured with neither the monitor nor the publisher connected, before and after.
        baseline = self.used_memory(contender)
        mon = None
        if monitor and store is not None and self.cli:
            mon = Monitor(self.cli, store, self.workdir / f"monitor-{scenario.name}-{contender}")
        out = self.publish(contender, scenario, seed=round_no, monitor=mon, reset=False)
        if mon is not None:
            seen = mon.stop(f"bench:end:{out['run_id']}")
            if "error" not in out:
                ports = set(out.get("publisher_ports", []))
                out["round_trips"] = count_round_trips(seen, out["run_id"], ports)
        if "error" not in out:
            out["store_used_memory"] = self.used_memory(contender) - baseline
            out["store_keys"], out["store_bytes"] = self.store_memory(contender)
        out.update(contender=contender, scenario=scenario.name, round=round_no)
        return out

    def close(self) -> None:
        """Stop the worker and every server."""
        self.stop_worker()
        for server in (self.broker, *self.stores.values()):
            server.close()


def _order(scenario: Scenario, round_no: int) -> list[str]:
    """The contenders' turn order in a round: rotated, so none always goes first."""
    everyone = MEASURED + scenario.extra
    shift = (round_no - 1) % len(everyone)
    return list(everyone[shift:] + everyone[:shift])


def _describe(run: dict[str, Any]) -> str:
    if "error" in run:
        return f"ERROR {run['error'][-300:]}"
    rate = run["deliveries"] / run["elapsed"]
    cpu = 1e6 * run["worker_cpu"] / run["deliveries"]
    extra = ""
    if run.get("round_trips"):
        per = {s: sum(c.values()) / run["deliveries"] for s, c in run["round_trips"].items()}
        extra = f"  round trips/task worker {per['worker']:.2f} publisher {per['publisher']:.2f}"
    extra += f"  other load {run['foreign_cores']:.2f} cores"
    return (
        f"{rate:8.0f}/s  worker {cpu:6.0f} us/task  answered {run['answered']}/"
        f"{run['deliveries']}  body runs {run['body_runs']}{extra}"
        + (" TIMEOUT" if run.get("timeout") else "")
    )


def main(argv: list[str] | None = None) -> int:
    """Run every scenario, print the table, write docs/benchmarks.{md,png}."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--rounds", type=int, help="rounds per scenario (default: 5 for (a), 3 else)"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every N (smoke runs)")
    parser.add_argument("--only", default="abcd", help="scenarios to run, e.g. 'ac'")
    parser.add_argument("--concurrency", type=int, default=2, help="worker processes")
    parser.add_argument(
        "--monitor-rounds",
        type=int,
        default=1,
        help="rounds (from the first) whose runs count store round trips with MONITOR",
    )
    parser.add_argument("--docs", default=str(ROOT / "docs"), help="where the page goes")
    parser.add_argument("--no-docs", action="store_true", help="print only")
    parser.add_argument(
        "--results", default=str(ROOT / "benchmarks" / "results.json"), help="raw figures"
    )
    parser.add_argument(
        "--from-results", metavar="JSON", help="rebuild the table and page from saved figures"
    )
    args = parser.parse_args(argv)
    if args.from_results:
        saved = json.loads(Path(args.from_results).read_text())
        _publish(saved["meta"], saved["runs"], args)
        return 0

    started = time.monotonic()
    scenarios = [
        Scenario(
            **{
                **asdict(s),
                "extra": tuple(s.extra),
                "n": max(2, round(s.n * args.scale)),
                "rounds": args.rounds or s.rounds,
            }
        )
        for s in SCENARIOS
        if s.name in args.only
    ]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="idem-bench-") as tmp:
        bench = Bench(Path(tmp), args.concurrency)
        try:
            if bench.cli is None:
                print("no redis-cli found: round trips are not counted", file=sys.stderr)
            bench.start_worker()
            bench.warm_up()
            for scenario in scenarios:
                print(f"\n== scenario ({scenario.name}) {scenario.title}; N={scenario.n}")
                for round_no in range(1, scenario.rounds + 1):
                    for contender in _order(scenario, round_no):
                        monitor = round_no <= args.monitor_rounds
                        run = bench.run(contender, scenario, round_no, monitor=monitor)
                        runs.append(run)
                        print(f"  round {round_no} {contender:9s} {_describe(run)}", flush=True)
                        if "error" in run or run.get("timeout"):
                            bench.recover()
            meta = report.environment(server_version(bench.broker.executable), args.concurrency)
        finally:
            bench.close()
    meta["runtime_seconds"] = time.monotonic() - started
    meta["scenarios"] = [asdict(s) for s in scenarios]
    meta["monitor_rounds"] = args.monitor_rounds
    if not args.no_docs:
        Path(args.results).write_text(json.dumps({"meta": meta, "runs": runs}, indent=1) + "\n")
    _publish(meta, runs, args)
    return 0


def _publish(meta: dict[str, Any], runs: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Print the table; unless ``--no-docs``, write the page and the chart."""
    scenarios = [Scenario(**{**s, "extra": tuple(s["extra"])}) for s in meta["scenarios"]]
    result = report.build(runs, scenarios, meta)
    print()
    print(report.stdout_table(result))
    if not args.no_docs:
        docs = Path(args.docs)
        report.write_page(result, docs / "benchmarks.md", docs / "benchmarks.png")
        print(f"\nwrote {docs / 'benchmarks.md'} and {docs / 'benchmarks.png'}")
    print(f"benchmark wall time: {meta['runtime_seconds']:.0f} s")
