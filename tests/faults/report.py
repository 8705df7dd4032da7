"""The reliability report: one row per fault scenario, with the figures of this run.

A scenario test measures from the effect ledger (never from what the library says),
asserts its expected outcome, then calls the ``fault_report`` fixture with its
figures. ``make faults`` sets ``IDEM_FAULTS_REPORT`` to a path, and at the end of the
session the rows are written there (``docs/reliability.md``) with the date, the
versions and the guarantees; a failed scenario is written as FAILED.
"""

from __future__ import annotations

import datetime as dt
import platform
import subprocess
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from devtools.pg_server import server_description
from devtools.redis_server import find_redis_server


@dataclass
class Row:
    """What one scenario injected and what came of it."""

    scenario: str
    inject: str
    expect: str
    deliveries: int | None = None
    executions: int | None = None
    completions: int | None = None
    lost: int | None = None
    duplicate_effects: int | None = None
    outcome: str = "passed"
    notes: str = ""
    order: int = field(default=0)


ROWS: dict[str, Row] = {}

PROPERTIES = """\
## Guarantees, as properties

For every idempotency key `K` of a task `T`, with records kept in one Redis:

1. **At most one live run.** At any moment at most one attempt holds `K` with a lease
   that has not run out; every write it makes after its claim is fenced by its token.
2. **Completion is final.** Once `K` is completed, no attempt runs the body of `T` for
   `K` again until the record expires (`idem_ttl`) or an operator forgets it; every
   duplicate gets the stored outcome.
3. **Nothing is lost.** A message is never acked without a run of its key having
   completed, being under way, or failing with the task's own exception: duplicates
   that wait are re-queued (or requeued when re-queueing fails), and a key whose holder
   died is taken over after one lease.
4. **Fences only grow.** Each claim of `K` gets a fence greater than every earlier one,
   even after the record expired (it starts from the server clock in ms).
5. **A stale run cannot win.** A run that lost its lease cannot overwrite the record of
   the run that took over; it is told (`lease_lost`, a warning).
6. **A finished step is not run again.** Within one run of `K` that has not completed, a
   durable step (`self.step`) whose value was stored is replayed, never run again, by
   every later attempt (a retry, a redelivery, a takeover); a run that lost its lease
   cannot store a step (`LeaseLost`), so the new owner's steps stand.

## Limits

- **The crash window.** A worker that dies after the body's side effect and before the
  completion write (one round trip) leaves `K` to be taken over after its lease, and the
  body runs again. The `executions beyond one per key` column counts exactly these. A
  task closes the window by passing `self.idempotency_key` or `self.idempotency_fence`
  to the downstream system.
- **Redis failover without `WAIT`.** A replica promoted before it received the last
  claim or completion forgets it; the next delivery runs again. Use persistence and, for
  Sentinel or Cluster, `idem_min_replicas` (measured in `docs/deployment.md`).
- **A Redis without persistence** that restarts forgets every record (scenario *store
  restart, no persistence*).
- **Clock jumps on the Redis host.** Leases and fences use the Redis server's clock; a
  jump forward expires leases early (a take-over while the owner still runs, fenced),
  a jump backward delays take-over and can stall fence growth.
- **Eviction.** Under any `maxmemory-policy` other than `noeviction` Redis may evict
  records; the worker warns at start.
"""


def _redis_version() -> str:
    try:
        out = subprocess.run(
            [find_redis_server(), "--version"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError, RuntimeError):
        return "unknown"
    for part in out.split():
        if part.startswith("v="):
            return part[2:]
    return out.strip()


def _cell(value: int | None) -> str:
    return "-" if value is None else str(value)


CHAOS_BEGIN = "<!-- chaos:begin"
"""Where the chaos soak's section of the report starts (``tests/chaos/run.py``)."""


def write(path: Path) -> None:
    """Write the report for the rows of this session."""
    rows = sorted(ROWS.values(), key=lambda r: r.order)
    lines = [
        "# Reliability",
        "",
        "Written by `make faults` from the run it reports; do not edit by hand.",
        "",
        f"- run: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- versions: celery-idem {version('celery-idem')}, celery {version('celery')}, "
        f"kombu {version('kombu')}, redis-py {version('redis')}, redis-server "
        f"{_redis_version()}, Python {platform.python_version()}",
        f"- PostgreSQL store: {server_description()}",
        f"- machine: {platform.machine()}, {platform.system()} {platform.release()}",
        "",
        "Executions and side effects are counted by an effect ledger that the test tasks",
        "write (a Redis list in a database the library never touches), not by the library;",
        "in the PostgreSQL rows, the side effect is a row of the task's own table, counted",
        "in the database (no unique constraint: one row per key must come from the",
        "transactional completion).",
        "",
        "| scenario | inject | expect | deliveries | executions | completions | lost tasks "
        "| executions beyond one per key | outcome |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        outcome = r.outcome + (f" ({r.notes})" if r.notes else "")
        lines.append(
            f"| {r.scenario} | {r.inject} | {r.expect} | {_cell(r.deliveries)} "
            f"| {_cell(r.executions)} | {_cell(r.completions)} | {_cell(r.lost)} "
            f"| {_cell(r.duplicate_effects)} | {outcome} |"
        )
    lines += ["", PROPERTIES]
    # The chaos soak's section (``make chaos``) is its own run's: keep it as it is.
    kept = path.read_text() if path.exists() else ""
    chaos = kept[kept.find(CHAOS_BEGIN) :] if CHAOS_BEGIN in kept else ""
    path.write_text("\n".join(lines) + ("\n\n" + chaos if chaos else ""))
