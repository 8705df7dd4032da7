"""The benchmark harness behind ``make bench`` (``python -m benchmarks``).

One broker/result-backend redis-server, one dedicated store server per contender (the
two floors share one), one worker per setup (:mod:`benchmarks.scenarios`: solo, prefork
with 2 and 4 processes, with and without a result backend) serving every contender's
task, and a fresh publisher process per run. Per scenario, rounds in which the
contenders take turns (the order rotates each round), so that every ratio is taken
within one round; in the first round of the main setup, ``redis-cli monitor`` of the
contender's store counts its round trips. Then the per-call comparison
(:mod:`benchmarks.percall`) and the PostgreSQL store beside Redis
(:mod:`benchmarks.postgres`), each in a process of its own. See ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.contenders import STORE_OF, STORES
from benchmarks.monitor import Monitor, count_round_trips
from benchmarks.scenarios import MAIN, SCENARIOS, SETUPS, WARM_UP, Scenario, Setup
from devtools.processes import Process
from devtools.redis_server import RedisServer, find_redis_cli, server_version

ROOT = Path(__file__).resolve().parents[1]
BROKER_DB, BACKEND_DB, COUNTER_DB = 0, 1, 2


def bench_env(
    broker: RedisServer, stores: Mapping[str, RedisServer], *, results: bool = True
) -> dict[str, str]:
    """The environment ``benchmarks.app`` reads (``BENCH_*``), the checkout on PYTHONPATH.

    One broker server holds the broker, the result backend and the completion counter
    (three databases); each contender's store is a server of its own. ``results=False``
    sets ``task_ignore_result`` in the worker and the publisher alike.
    """
    return {
        **os.environ,
        "BENCH_IGNORE_RESULT": "" if results else "1",
        "BENCH_BROKER": broker.url(BROKER_DB),
        "BENCH_BACKEND": broker.url(BACKEND_DB),
        "BENCH_COUNTER": broker.url(COUNTER_DB),
        **{f"BENCH_STORE_{name.upper()}": store.url(0) for name, store in stores.items()},
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }


class Bench:
    """Servers, the worker and the runs."""

    def __init__(self, workdir: Path, concurrency: int = 2, setup: Setup | None = None) -> None:
        self.workdir = workdir
        self.setup = setup or replace(MAIN, concurrency=concurrency)
        self.broker = RedisServer().start()
        self.stores = {name: RedisServer().start() for name in STORES}
        self.cli = find_redis_cli(self.broker.executable)
        self.env = bench_env(self.broker, self.stores, results=self.setup.results)
        self.worker: Process | None = None
        self.worker_log = workdir / "worker.log"

    # -- worker ---------------------------------------------------------------------

    @property
    def concurrency(self) -> int:
        """The worker's processes (1 for solo)."""
        return self.setup.concurrency

    def use(self, setup: Setup, contenders: tuple[str, ...]) -> None:
        """Restart the worker for ``setup`` (if another), warm for ``contenders``."""
        if setup == self.setup and self.worker is not None:
            return
        self.stop_worker()
        self.setup = setup
        self.env = bench_env(self.broker, self.stores, results=setup.results)
        self.start_worker()
        self.warm_up(contenders)

    def start_worker(self) -> None:
        """``celery worker``: the setup's pool and processes, the bench queue only."""
        cmd = [
            sys.executable, "-m", "celery", "-A", "benchmarks.app", "worker",
            "-P", self.setup.pool, "-c", str(self.setup.concurrency), "-Q", "bench",
            "-n", "bench@%h", "-l", "WARNING", "--without-gossip", "--without-mingle",
            "--without-heartbeat",
        ]  # fmt: skip
        self.worker = Process("the bench worker", cmd, self.worker_log, self.env, ROOT).start()

    def stop_worker(self) -> None:
        """Warm shutdown of the worker's process group; SIGKILL if it hangs."""
        worker, self.worker = self.worker, None
        if worker is not None:
            worker.stop(timeout=20)

    def warm_up(self, contenders: tuple[str, ...]) -> None:
        """Some tasks of every contender: connections, scripts, imports in every child."""
        for scenario in WARM_UP:
            if scenario.long and "idem" not in contenders:
                continue
            for contender in contenders if scenario.sleep_ms == 0 else ("idem",):
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

    def recover(self, contenders: tuple[str, ...]) -> None:
        """After a failed run: restart the worker on an empty queue."""
        self.stop_worker()
        with contextlib.closing(self.broker.client(BROKER_DB)) as client:
            client.delete("bench", "unacked", "unacked_index")
        self.start_worker()
        self.warm_up(contenders)

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
            "results": self.setup.results,
            # Duplicates of completed keys: only a contender that deduplicates has any.
            "prefill": scenario.prefill and contender.startswith("idem"),
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
        store = STORE_OF[contender]
        return self.stores[store] if store else None

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
        out.update(
            contender=contender, scenario=scenario.name, round=round_no, setup=self.setup.name
        )
        return out

    def close(self) -> None:
        """Stop the worker and every server."""
        self.stop_worker()
        for server in (self.broker, *self.stores.values()):
            server.close()


def _order(scenario: Scenario, round_no: int) -> list[str]:
    """The contenders' turn order in a round: rotated, so none always goes first."""
    everyone = scenario.contenders
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
    answered = (
        f"answered {run['answered']}/{run['deliveries']}  body runs {run['body_runs']}"
        if "answered" in run
        else "no results to check"
    )
    return f"{rate:8.0f}/s  worker {cpu:6.0f} us/task  {answered}{extra}" + (
        " TIMEOUT" if run.get("timeout") else ""
    )


def _env_number(name: str) -> float | None:
    value = os.environ.get(name, "")
    return float(value) if value else None


def _scenarios(args: argparse.Namespace) -> list[Scenario]:
    """The scenarios to run, scaled: ``--only`` matches a name or a setup's name."""
    wanted = set(args.only.split(",")) if args.only else None
    out = []
    for s in SCENARIOS:
        if wanted and not ({s.name, s.setup, s.workload} & wanted):
            continue
        out.append(replace(s, n=max(2, round(s.n * args.scale)), rounds=args.rounds or s.rounds))
    return out


def _in_process(module: str, env: dict[str, str], args: Any) -> dict[str, Any] | None:
    """A per-call benchmark (``benchmarks.percall``, ``benchmarks.postgres``), its own process."""
    cmd = [sys.executable, "-m", module, "--json", "--scale", str(args.scale)]
    if args.rounds:
        cmd += ["--rounds", str(max(args.rounds, 3))]
    done = subprocess.run(  # noqa: S603 - our own argv, no shell
        cmd, cwd=ROOT, env=env, capture_output=True, timeout=900, check=False
    )
    if done.returncode != 0:
        print(f"{module} failed:\n{done.stderr.decode()[-3000:]}", file=sys.stderr)
        return None
    out: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return out


def main(argv: list[str] | None = None) -> int:
    """Run every scenario and the per-call bench, print, write docs/benchmarks.{md,png}."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    env_rounds, env_scale = _env_number("BENCH_ROUNDS"), _env_number("BENCH_SCALE")
    parser.add_argument(
        "--rounds",
        type=int,
        default=int(env_rounds) if env_rounds else None,
        help="rounds per scenario (default: BENCH_ROUNDS, else 5; 3 for (d))",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=env_scale or 1.0,
        help="multiply every N (default: BENCH_SCALE, else 1; smoke runs)",
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated scenarios, workloads or setups, e.g. 'a,c' or 'solo,p4i'",
    )
    parser.add_argument("--no-percall", action="store_true", help="skip the per-call bench")
    parser.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL bench")
    parser.add_argument(
        "--monitor-rounds",
        type=int,
        default=1,
        help="rounds (from the first) of the main setup counting store round trips (MONITOR)",
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
    scenarios = _scenarios(args)
    setups = [u for u in SETUPS if any(s.setup == u.name for s in scenarios)]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="idem-bench-") as tmp:
        bench = Bench(Path(tmp), setup=setups[0] if setups else MAIN)
        try:
            if bench.cli is None:
                print("no redis-cli found: round trips are not counted", file=sys.stderr)
            for setup in setups:
                mine = [s for s in scenarios if s.setup == setup.name]
                everyone = tuple(dict.fromkeys(c for s in mine for c in s.contenders))
                print(f"\n#### worker: {setup.label}", flush=True)
                bench.use(setup, everyone)
                for scenario in mine:
                    print(f"\n== scenario ({scenario.name}) {scenario.title}; N={scenario.n}")
                    for round_no in range(1, scenario.rounds + 1):
                        for contender in _order(scenario, round_no):
                            monitor = setup == MAIN and round_no <= args.monitor_rounds
                            run = bench.run(contender, scenario, round_no, monitor=monitor)
                            runs.append(run)
                            print(f"  round {round_no} {contender:9s} {_describe(run)}", flush=True)
                            if "error" in run or run.get("timeout"):
                                bench.recover(everyone)
            version = server_version(bench.broker.executable)
            meta = report.environment(version, MAIN.concurrency)
        finally:
            bench.close()
    if not args.no_percall:
        print("\n== per call, one process, Celery's tracer", flush=True)
        meta["percall"] = _in_process("benchmarks.percall", dict(os.environ), args)
    if not args.no_postgres:
        print("\n== the PostgreSQL store beside Redis, per key", flush=True)
        meta["postgres"] = _in_process("benchmarks.postgres", dict(os.environ), args)
    meta["runtime_seconds"] = time.monotonic() - started
    meta["scenarios"] = [asdict(s) for s in scenarios]
    meta["setups"] = [asdict(u) for u in setups]
    meta["monitor_rounds"] = args.monitor_rounds
    if not args.no_docs:
        Path(args.results).write_text(json.dumps({"meta": meta, "runs": runs}, indent=1) + "\n")
    _publish(meta, runs, args)
    return 0


def _publish(meta: dict[str, Any], runs: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Print the table; unless ``--no-docs``, write the page and the chart."""
    scenarios = [Scenario(**{**s, "contenders": tuple(s["contenders"])}) for s in meta["scenarios"]]
    result = report.build(runs, scenarios, meta)
    print()
    print(report.stdout_table(result))
    if not args.no_docs:
        docs = Path(args.docs)
        report.write_page(result, docs / "benchmarks.md", docs / "benchmarks.png")
        print(f"\nwrote {docs / 'benchmarks.md'} and {docs / 'benchmarks.png'}")
    print(f"benchmark wall time: {meta['runtime_seconds']:.0f} s")
