"""``docs/benchmarks.md``: the prose around the figures of one ``make bench`` run."""

from __future__ import annotations

from typing import Any

from benchmarks.contenders import LABELS
from benchmarks.postgres_page import postgres_section
from benchmarks.scenarios import MAIN
from benchmarks.sections import floors_section, percall_section
from benchmarks.sections import table as _table

__all__ = ["render"]


def _n(value: float | None, spec: str = ".0f") -> str:
    return "n/a" if value is None else format(value, spec)


def _duplicates(result: dict[str, Any]) -> str:
    """What each contender gives a duplicate delivery in the storm."""
    sc = result["scenarios"].get("c")
    if sc is None:
        return ""
    n = sc["n"]
    rows = []
    for contender, s in sc["contenders"].items():
        if contender == "plain":
            gives = "no deduplication: every delivery is a message of its own and runs the body"
        elif contender == "idem":
            gives = (
                "every delivery is queued and gets the first run's result; the body runs once "
                f"per key ({_n(s['keys_with_one_value'])}/{s['distinct_keys']} keys had exactly "
                f"one value across their deliveries; {_n(s['retries'])} deliveries arrived while "
                "their key's first run held it and were deferred, then replayed)"
            )
        elif contender == "once":
            gives = (
                f"`AlreadyQueued` at publish for {_n(s['refused'])} deliveries (no task, no "
                "result); a delivery after the previous run released the lock runs the body again"
            )
        elif contender in ("plain_rt1", "plain_rt2"):
            gives = "no deduplication (a floor): every delivery runs the body"
        elif contender == "idem_pub":
            gives = (
                f"{_n(s['given_existing'])} deliveries were not published: the publisher's "
                "reservation found the key completed, in progress or reserved by an earlier "
                "send, and `apply_async` returned that task's `AsyncResult` "
                "(its result is the first run's); the rest were published and answered by the "
                "worker-side claim as above; the body runs once per key"
            )
        else:
            gives = (
                f"{_n(s['given_existing'])} deliveries got the `AsyncResult` of the task already "
                "queued or running for the key (so they do get its result); a delivery after that "
                "run finished (lock released) queues a new task and runs the body again"
            )
        rows.append(
            [
                LABELS[contender],
                f"{_n(s['answered_min'])}/{n}",
                _n(s["body_runs"]),
                gives,
            ]
        )
    return (
        "### What a duplicate gets in the storm (c)\n\n"
        + _table(
            [
                "contender",
                "deliveries answered with their key's result (worst run)",
                "body runs (median)",
                "what a duplicate delivery gets",
            ],
            rows,
        )
        + "\n\n"
    )


def _round_trips(result: dict[str, Any]) -> str:
    rows = []
    for name, sc in result["scenarios"].items():
        for contender, s in sc["contenders"].items():
            detail = s.get("rt_detail")
            if not detail:
                continue
            for side in ("worker", "publisher"):
                if detail[side]:
                    rows.append(
                        [
                            f"({name})",
                            LABELS[contender],
                            side,
                            ", ".join(f"`{k}` {v:.3f}" for k, v in detail[side].items()),
                        ]
                    )
    return (
        "### Store round trips by command (per delivery, median of the runs)\n\n"
        + _table(["scenario", "contender", "sent by", "commands"], rows)
        + "\n\n"
    )


def _noise(result: dict[str, Any]) -> str:
    rows = []
    for name, sc in result["scenarios"].items():
        loads = [s["foreign_cores"] for s in sc["contenders"].values() if s["foreign_cores"]]
        peaks = [
            s["foreign_cores_max"] for s in sc["contenders"].values() if s["foreign_cores_max"]
        ]
        mon = [s["monitor_cpu_us"] for s in sc["contenders"].values() if s["monitor_cpu_us"]]
        rows.append(
            [
                f"({name})",
                _n(max(loads), ".2f") if loads else "0",
                _n(max(peaks), ".2f") if peaks else "0",
                _n(max(mon), ".1f") if mon else "n/a",
            ]
        )
    return _table(
        [
            "scenario",
            "other processes' load, median of runs (cores)",
            "worst run (cores)",
            "redis-cli monitor CPU in the counted runs (us/task, worst contender)",
        ],
        rows,
    )


def render(
    result: dict[str, Any], chart_name: str, header: list[str], rows: list[list[str]]
) -> str:
    """The whole page."""
    meta = result["meta"]
    v = meta["versions"]
    sc = result["scenarios"]
    status = {True: "met", False: "**not met**"}
    targets = _table(
        ["target (celery-idem)", "measured", "status"],
        [[t["target"], t["measured"], status[t["met"]]] for t in result["targets"]],
    )
    setups = result["setups"]
    scenario_rows = [
        [
            f"({name})",
            s["title"],
            setups.get(s["setup"], {}).get("label", s["setup"]),
            ", ".join(LABELS[c] for c in s["contenders"]),
            str(s["n"]),
            str(s["keys"] or s["n"]),
            f"{s['sleep_ms']:g} ms",
            str(s["rounds"]),
        ]
        for name, s in sc.items()
    ]
    extra_sections = (
        _duplicates(result) + _round_trips(result) + floors_section(result)
        + percall_section(result) + postgres_section(meta.get("postgres"))
    )  # fmt: skip
    header_scenarios = [
        "scenario", "workload", "worker", "contenders", "N deliveries", "keys", "body", "rounds",
    ]  # fmt: skip
    return f"""# Benchmarks

Generated by `make bench` on {meta["date"]} (wall time {meta["runtime_seconds"]:.0f} s);
do not edit by hand: rerun `make bench`. Raw figures of every run:
`benchmarks/results.json`.

celery-idem against plain Celery (no deduplication), celery-once (`QueueOnce`) and
celery-singleton (`Singleton`), on real worker processes, a Redis broker and
`acks_late`, with the same task body for every contender. Beside them, two floors:
plain Celery whose body also sends one raw round trip, or two, to a store server of
the same kind (see *Against the floors*). celery-idem runs with its defaults
everywhere; in the storm (c) it also runs a second time with `idem_dedupe_on_publish=True`
(a reservation before publishing, off by default), the setting that matches how the
two peers work: they deduplicate at publish. Every workload runs on the main worker
setup ({MAIN.label}); unique tasks (a) and duplicates of completed keys (e) also run
on a solo worker and on prefork with 4 processes, each with and without a result
backend. Then, per call in one process, celery-idem against AWS Lambda Powertools'
Redis `idempotent_function`, and its store's calls beside a bare `GET`; and the
PostgreSQL store beside the Redis one, per key, with its transactional completion.

![Ratios to plain Celery]({chart_name})

## Targets

{targets}

## Results (main setup: {MAIN.label})

Medians over the rounds. "vs plain" is the ratio of tasks/s to plain Celery computed in
each round (same round, same machine state), as median [min, max] of those per-round
ratios; the next column is the same against "{LABELS["plain_rt1"]}". Round trips are
commands on the contender's own store server: sent by the worker + sent by the
publisher, per delivery. Store bytes/record is `MEMORY USAGE` per key left on the
store after a run, in brackets what remains after subtracting the result's own bytes,
then the store's `used_memory` growth per key (see *Method*). celery-once and
celery-singleton delete their lock when the task ends and keep nothing; plain Celery
has no store. Deliveries answered: deliveries whose `AsyncResult` succeeded with a
value for their key (worst run).

{_table(header, rows)}

{extra_sections}## Scenarios

{_table(header_scenarios, scenario_rows)}

- (a), (b): every delivery has its own key; nothing to deduplicate, so this is the
  cost of the protocol itself.
- (c): 10 000 deliveries of 100 keys (100 each), in one seeded random order shared by
  all contenders, published as fast as one process can; the body is the no-op one.
  The peers refuse (celery-once) or short-circuit (celery-singleton) duplicates at
  publish, so most deliveries never reach their worker, while celery-idem by default
  queues every delivery and answers it on the worker; its `idem_dedupe_on_publish`
  variant answers most of them at publish too. The targets are judged on the defaults;
  the variant gets its own line.
- (d): few tasks whose body (1.8 s) outlives lease/3 (1 s, celery-idem's `idem_lease` is
  3 s on this task): one renewal each. Per-task CPU here is below the 10 ms clock-tick
  resolution of `/proc/<pid>/stat` over {sc["d"]["n"] if "d" in sc else "few"} tasks, so
  it is noise; the figure of interest is the round trips.
- (e): every key first runs once, untimed (celery-idem only: the floors and plain
  Celery have nothing to deduplicate, so for them (e) is (a) again); then N new
  deliveries of the same keys are timed: for celery-idem, duplicates of completed keys
  (one claim round trip, the first result replayed, the body not run).
- `<workload>.<setup>`: the same workload on another worker: `solo` (one process,
  `-P solo`), `p4` (prefork, 4 processes on 2 cores), `p2` (prefork, 2); a trailing `i`:
  `task_ignore_result=True`, no result backend writes (and so no result to check:
  "deliveries answered" is n/a there). The main setup's runs have no suffix.

## Method

- **Processes.** One redis-server for the broker (db 0), the result backend (db 1) and
  the completion counter (db 2); one dedicated redis-server per contender's store
  (celery-idem records, celery-once locks, celery-singleton locks), so that everything
  a contender sends to its store can be counted (the two floors share one). One
  `celery worker` per setup (`--without-gossip --without-mingle --without-heartbeat`,
  log level WARNING, prefetch multiplier 4, Celery's default) serves every contender's
  task in that setup's scenarios, the same worker for all; the main setup is
  `-P prefork -c {meta["concurrency"]}`, two processes for two cores. A fresh publisher
  process per run.
- **The body** (`benchmarks/app.py`) sleeps the scenario's time and returns
  `"<key>:<task id>"`, so a delivery answered with another run's result is
  recognisable and the distinct values count the body runs. Every contender keys on
  the task's arguments (celery-idem's default derived key, celery-once's and
  celery-singleton's argument keys).
- **tasks/s** = deliveries / (first publish → every published message completed).
  Completion is a counter: a `task_postrun` handler in the worker (state SUCCESS, after
  the contender's own after-run work such as releasing a lock) does one `INCR` per
  message, the same for all contenders; the publisher polls it every 5 ms. That is
  cheaper than waiting on thousands of `AsyncResult`s (a result-backend read per
  message, or thousands of pub/sub messages in the publisher). The result backend is
  read only after the clock stops, to check every delivery's value. For celery-once a
  delivery refused at publish counts as delivered (nothing to wait for); for
  celery-singleton a duplicate that got an existing `AsyncResult` completes with that
  task.
- **Worker CPU** = utime + stime from `/proc/<pid>/stat` of the worker and its
  children (every thread), before the first publish and at completion, per delivery.
  Publisher CPU is the publisher's own `getrusage` over its publish loop: celery-once
  and celery-singleton do their store round trips there.
- **Round trips** = `redis-cli monitor` of the contender's store server during the runs
  of the first {meta.get("monitor_rounds", 1)} round(s) of each scenario on the main
  setup (MONITOR and
  redis-cli cost the store contenders some CPU that plain Celery does not pay, listed
  under *Noise*; the other rounds run without it), counting only what the publisher
  and the worker sent between two markers the publisher writes around the run;
  commands run inside Lua scripts (client `lua`) and connection handshakes (`HELLO`,
  `CLIENT SETINFO`, `PING`, `SELECT`) are not round trips. `INFO commandstats` would
  not do: Redis 7 counts the commands a script runs. Sides are told apart by the
  client port (the publisher reports its sockets from `/proc`).
- **Memory** = `MEMORY USAGE key SAMPLES 0` of every key on the contender's store after
  the run, divided by the number of keys; "beyond the result" subtracts the result's
  JSON bytes ("<key>:<uuid>" is about 50). `MEMORY USAGE` leaves out the key's entries
  in the keyspace and expiry hash tables (every record has a TTL), so the table also
  gives the store's `used_memory` growth per record (measured with no monitor or
  publisher connected before and after; the hash tables grow in powers of two, so this
  per-record figure depends on the number of keys; given only for runs that leave at
  least 1 000 records, as fixed overheads swamp it below that).
- **Rounds.** The contenders take turns, A B C D, then B C D A, and so on (the order
  rotates so that none always runs first or right after the heaviest); every ratio is
  taken between runs of the same round on the same worker, and reported as the median
  [min, max] of the rounds. Before a setup's rounds, a warm-up (100 tasks per contender,
  and on the main setup two long celery-idem tasks) opens every connection and loads
  every script. Results and stores are flushed between runs.

## Noise

The machine is shared: other processes' CPU during each run is measured as the
machine's busy time (`/proc/stat`) minus this benchmark's own processes (worker,
publisher, redis-servers, redis-cli). On a 2-core machine anything above ~0.2 cores
moves the figures; the per-round ratios absorb some of it, not all. Rerun
`make bench` on a quiet machine before reading much into a difference under ~10%.

{_noise(result)}

## Machine and versions

- {meta["cores"]} cores, {meta["cpu_model"]}, {meta["memory_gib"]} GiB memory, Linux
  {meta["kernel"]}
- Python {v["python"]}, celery {v["celery"]}, kombu {v["kombu"]}, redis-py {v["redis"]},
  redis-server {v["redis-server"]}
- celery-idem {v["celery-idem"]}, celery-once {v["celery-once"]}, celery-singleton
  {v["celery-singleton"]}, aws-lambda-powertools {v.get("aws-lambda-powertools", "n/a")},
  hiredis {v.get("hiredis", "n/a")} (the peers are installed by `make bench` from
  `benchmarks/requirements.txt`, not project dependencies)

## Reproduce and profile

```
make bench                      # about 25 minutes; rewrites this page and the chart
BENCH_ROUNDS=2 BENCH_SCALE=0.2 make bench              # quick mode (development)
.venv/bin/python -m benchmarks --only a,e --rounds 5   # some workloads (or setups: solo,p4i)
.venv/bin/python -m benchmarks.percall                 # the per-call comparison alone
.venv/bin/python -m benchmarks.postgres --page docs/benchmarks.md  # its section alone
.venv/bin/python -m benchmarks.profile                 # where celery-idem's per-task time goes
```
"""
