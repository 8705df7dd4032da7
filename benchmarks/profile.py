"""Profile celery-idem's worker-side per-task path: ``python -m benchmarks.profile``.

Scenario (a) (unique keys, no-op body) on one solo worker, so every task runs in the
worker's main process. The profiler is switched on at ``task_prerun`` and off at
``task_postrun`` of each measured task (after a warm-up), so what it sees is the
tracer's path for one task: celery-idem's ``__call__`` (key, claim, body, complete),
the result backend's write and Celery's own bookkeeping, not the consumer loop.

Default: cProfile, printed as calls and microseconds *per task* for celery_idem's
functions (by cumulative time), then the code outside celery_idem that those call
into. ``--pyinstrument`` prints pyinstrument's call tree of the same path instead.
``--contender plain`` profiles plain Celery's path, for comparison.

Options: ``-n`` measured tasks (default 3000), ``--top`` lines per section (15).
"""

from __future__ import annotations

import argparse
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import bench_env
from devtools.processes import Process
from devtools.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]
WARM = 200
"""Tasks run before profiling starts: connections, script loads, first-use caches."""


# -- the worker side (a child process) ---------------------------------------------


def _worker(out: Path, contender: str, measured: int, use_pyinstrument: bool) -> None:
    """Run a solo worker that profiles tasks WARM+1 .. WARM+measured of ``contender``."""
    from celery.signals import task_postrun, task_prerun  # noqa: PLC0415

    from benchmarks.app import app  # noqa: PLC0415 - after the environment is set

    name = f"bench.{contender}"
    seen = {"n": 0}
    if use_pyinstrument:
        from pyinstrument import Profiler  # noqa: PLC0415

        profiler: Any = Profiler(interval=0.0001)
        start, stop = profiler.start, profiler.stop
    else:
        import cProfile  # noqa: PLC0415

        profiler = cProfile.Profile()
        start, stop = profiler.enable, profiler.disable

    def on_prerun(sender: Any = None, **_: Any) -> None:
        if sender is not None and sender.name == name and WARM <= seen["n"] < WARM + measured:
            start()

    def on_postrun(sender: Any = None, **_: Any) -> None:
        if sender is None or sender.name != name:
            return
        if WARM <= seen["n"] < WARM + measured:
            stop()
        seen["n"] += 1
        if seen["n"] == WARM + measured:
            if use_pyinstrument:
                text = profiler.output_text(unicode=False, color=False, show_all=False)
                out.write_text(text)
            else:
                profiler.dump_stats(str(out))
            out.with_suffix(".done").write_text("ok")

    task_prerun.connect(on_prerun, weak=False)
    task_postrun.connect(on_postrun, weak=False)
    app.worker_main(
        ["worker", "-P", "solo", "-Q", "bench", "-n", "bench-profile@%h", "-l", "WARNING",
         "--without-gossip", "--without-mingle", "--without-heartbeat"]
    )  # fmt: skip


# -- the driver ---------------------------------------------------------------------


def _per_task_table(stats_path: Path, measured: int, top: int) -> str:
    stats = pstats.Stats(str(stats_path))
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]  # pstats' documented data
    total = sum(tt for (_cc, _nc, tt, _ct, _callers) in raw.values())  # all profiled time

    def where(func: tuple[str, int, str]) -> str:
        path, line, fn = func
        short = path.split("site-packages/")[-1].split("/work/main/")[-1]
        return f"{fn} ({short}:{line})"

    def ours(func: tuple[str, int, str]) -> bool:
        return "celery_idem" in func[0]

    lines = [
        f"{measured} tasks profiled; tracer path total {1e6 * total / measured:.0f} us/task "
        "under cProfile (which inflates pure-Python code several-fold; compare shares).",
        "",
        "celery_idem frames, by cumulative time:",
        f"{'calls/task':>10} {'own us/task':>12} {'cum us/task':>12}  function",
    ]
    idem = sorted(((f, v) for f, v in raw.items() if ours(f)), key=lambda kv: -kv[1][3])
    for func, (_cc, nc, tt, ct, _callers) in idem[:top]:
        lines.append(
            f"{nc / measured:10.2f} {1e6 * tt / measured:12.1f} {1e6 * ct / measured:12.1f}  "
            f"{where(func)}"
        )
    # Where celery_idem's time leaves the package: callees outside it, per task.
    outside: dict[Any, list[float]] = {}
    for func, (_cc, _nc, _tt, _ct, callers) in raw.items():
        if ours(func):
            continue
        for caller, (_c, n, _t, cum) in callers.items():
            if ours(caller):
                entry = outside.setdefault(func, [0.0, 0.0])
                entry[0] += n
                entry[1] += cum
    lines += ["", "called from celery_idem into other code, by cumulative time:"]
    lines.append(f"{'calls/task':>10} {'':>12} {'cum us/task':>12}  function")
    for func, (n, cum) in sorted(outside.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"{n / measured:10.2f} {'':>12} {1e6 * cum / measured:12.1f}  {where(func)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Start the servers and a profiled solo worker, send scenario (a), print the profile."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    parser.add_argument("-n", type=int, default=3000, help="profiled tasks")
    parser.add_argument("--top", type=int, default=15, help="lines per section")
    parser.add_argument("--contender", default="idem", choices=("idem", "plain"))
    parser.add_argument("--pyinstrument", action="store_true", help="pyinstrument call tree")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(Path(args.worker), args.contender, args.n, args.pyinstrument)
        return 0

    broker, store = RedisServer().start(), RedisServer().start()
    env = bench_env(broker, {"idem": store})
    os.environ.update(env)
    with tempfile.TemporaryDirectory(prefix="idem-profile-") as tmp:
        out = Path(tmp) / ("profile.txt" if args.pyinstrument else "profile.pstats")
        cmd = [
            sys.executable, "-m", "benchmarks.profile", "--worker", str(out),
            "--contender", args.contender, "-n", str(args.n),
        ] + (["--pyinstrument"] if args.pyinstrument else [])  # fmt: skip
        worker = Process("the profiled worker", cmd, Path(tmp) / "worker.log", env, ROOT)
        worker.start()
        try:
            from benchmarks.app import task_for  # noqa: PLC0415 - after the environment

            task = task_for(args.contender)
            started = time.monotonic()
            for i in range(WARM + args.n):
                task.apply_async((f"profile-{i}", 0), ignore_result=False)
            done = out.with_suffix(".done")
            while not done.exists():
                if not worker.alive() or time.monotonic() - started > 600:
                    print(worker.output()[-3000:], file=sys.stderr)
                    return 1
                time.sleep(0.1)
            header = (
                f"python -m benchmarks.profile: scenario (a), {args.contender}, solo worker, "
                f"{args.n} tasks after {WARM} warm-up"
            )
            print(header)
            print("=" * len(header))
            if args.pyinstrument:
                print(out.read_text())
            else:
                print(_per_task_table(out, args.n, args.top))
        finally:
            worker.stop(timeout=15)
            broker.close()
            store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
