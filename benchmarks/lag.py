"""How long a waiting duplicate's caller waits after the answer exists: ``make bench-lag``.

A duplicate that finds its key held is re-queued and looks again later (0.5 s, then
doubling, never more than 2 s apart). The lag is the time from the holder's
completion to the duplicate's own completion (both ``date_done`` in the result
backend, written by the same worker host). Two cases, each over several rounds:

* **live holder**: a 5 s first run, duplicates sent 0.1 s after it;
* **after a takeover**: a holder that died with 20 s of lease left (planted in the
  store, as a killed worker leaves it); the duplicates wait it out, one of them takes
  the key over and runs 2 s, the others wait for that run.

The servers and the prefork worker (2 processes) of ``make bench`` (``Bench``): a Redis
broker and result backend, celery-idem's default lease (60 s). Prints a Markdown table;
lag is noisy at the scale of the polling interval, so the table gives median and max
over every duplicate of every round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.harness import Bench
from celery_idem.keys import storage_key
from celery_idem.store import ClaimRequest
from celery_idem.store.redis import RedisStore
from devtools.processes import wait_for

DUPLICATES = 5
TIMEOUT = 120.0


def _done(result: Any) -> datetime:
    done = result.date_done
    return done if isinstance(done, datetime) else datetime.fromisoformat(str(done))


def live_holder(task: Any, store: RedisStore) -> list[float]:
    """Lags of duplicates sent while a 5 s first run holds the key."""
    key = uuid.uuid4().hex
    first = task.apply_async((key, 5000), idempotency_key=key)
    time.sleep(0.1)
    duplicates = [task.apply_async((key, 5000), idempotency_key=key) for _ in range(DUPLICATES)]
    for result in (first, *duplicates):
        result.get(timeout=TIMEOUT)
    return [(_done(d) - _done(first)).total_seconds() for d in duplicates]


def after_takeover(task: Any, store: RedisStore) -> list[float]:
    """Lags of duplicates that waited out a dead holder's lease, then its taker's run."""
    key = uuid.uuid4().hex
    store.claim(
        ClaimRequest(
            storage_key("idem", task.name, key),
            token="dead-worker", task_id="dead-task", fingerprint="", lease=20, ttl=60,  # noqa: S106
        )
    )  # fmt: skip
    results = [task.apply_async((key, 2000), idempotency_key=key) for _ in range(DUPLICATES)]
    for result in results:
        result.get(timeout=TIMEOUT)
    runner = min(results, key=_done)  # the one that took the key over and ran
    return [(_done(r) - _done(runner)).total_seconds() for r in results if r is not runner]


CASES: list[tuple[str, Callable[[Any, RedisStore], list[float]]]] = [
    ("live holder (5 s run)", live_holder),
    ("after a takeover (20 s dead lease, 2 s run)", after_takeover),
]


def main(argv: list[str] | None = None) -> int:
    """Start the servers and a worker, run the cases, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="idem-lag-") as tmp:
        bench = Bench(Path(tmp), concurrency=2)  # the servers and worker of `make bench`
        try:
            os.environ.update({k: v for k, v in bench.env.items() if k.startswith("BENCH_")})
            from benchmarks.app import app, task_for  # noqa: PLC0415 - reads BENCH_* at import

            bench.start_worker()
            task = task_for("idem")
            wait_for(lambda: task.apply_async(("warm", 0)).get(timeout=30), 60, 0.1, "warm-up")
            store = RedisStore.from_url(bench.stores["idem"].url(0))
            lags: dict[str, list[float]] = {name: [] for name, _ in CASES}
            for round_no in range(1, args.rounds + 1):
                for name, case in CASES:
                    got = case(task, store)
                    lags[name] += got
                    print(f"round {round_no} {name}: " + ", ".join(f"{x:.2f}" for x in got))
            app.close()
        finally:
            bench.close()
    print("\n| waiting duplicates | duplicates | lag median | lag max |")
    print("|---|---|---|---|")
    for name, values in lags.items():
        print(
            f"| {name} | {len(values)} | {statistics.median(values):.2f} s | {max(values):.2f} s |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
