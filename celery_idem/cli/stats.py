"""``celery idem stats``: records by task and state, memory, the oldest claim in progress.

Counting needs every record: the command walks them all with ``SCAN`` (one pipelined
read of each step's keys; on PostgreSQL, pages of the primary key), which never blocks
the store but takes a while on millions of records. Memory is measured on a sample
and extrapolated, with what the store offers (:mod:`.traits`: Redis' ``MEMORY
USAGE``, PostgreSQL's ``pg_column_size`` of the row).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import click

from celery_idem.cli import render
from celery_idem.cli.context import store_errors
from celery_idem.cli.walk import Walk, count_option, scan_command

__all__ = ["stats_command"]

COLUMNS = (
    ("running", "RUNNING"),
    ("parked", "PARKED"),
    ("lease_expired", "LEASE EXPIRED"),
    ("reserved", "QUEUED"),
    ("reservation_expired", "QUEUE EXPIRED"),
    ("free", "FREE"),
    ("result", "RESULT"),
    ("error", "ERROR"),
    ("no_result", "NO RESULT"),
    ("quarantined", "QUARANTINED"),
    ("not_a_record", "OTHER"),
)
"""Counted sub-states, and their column headers."""


def _bucket(view: dict[str, Any]) -> str:
    return str(view["substate"] or view["state"])


def count_table(by_task: dict[str, Counter[str]]) -> str:
    """The per-task counts as a table, with a total row."""
    shown = [(name, title) for name, title in COLUMNS if any(c[name] for c in by_task.values())]
    shown = shown or list(COLUMNS[:5])
    total: Counter[str] = Counter()
    rows = []
    for task, counts in sorted(by_task.items()):
        total.update(counts)
        rows.append([task, *(str(counts[n]) for n, _ in shown), str(counts.total())])
    rows.append(["(all)", *(str(total[n]) for n, _ in shown), str(total.total())])
    return render.table(["TASK", *(t for _, t in shown), "TOTAL"], rows)


def _oldest_text(oldest: dict[str, Any]) -> str:
    claimed = oldest["claimed_at"] or "at an unknown time"
    ago = f" ({render.duration(oldest['claimed_ago'])} ago)" if oldest["claimed_ago"] else ""
    return (
        f"{oldest['storage_key']} ({oldest['task']}, task id {oldest['task_id'] or '-'}, "
        f"{oldest['substate']}): claimed {claimed}{ago}, "
        f"lease left {render.duration(oldest['lease_left'])}"
    )


@scan_command(
    "stats",
    short_help="Count records by task and state; memory; oldest claim.",
    scan_count=1000,
    options=(
        count_option(
            "--sample",
            default=200,
            help_text="How many records to measure (MEMORY USAGE on Redis, the row's "
            "pg_column_size on PostgreSQL; 0: do not measure).",
        ),
    ),
)
def stats_command(
    ctx: click.Context, *, task_name: str | None, sample: int, scan_count: int, as_json: bool
) -> None:
    """Count records by task and state; estimate their memory; show the oldest claim.

    \b
    - Counts by task and state: RUNNING, PARKED (held for a retry), LEASE EXPIRED
      (its worker is gone; the next claim takes over), QUEUED (reserved by a
      publisher for a message no worker has claimed yet), QUEUE EXPIRED (no worker
      claimed it in time), FREE (released after a failure), RESULT, ERROR (a cached
      failure), NO RESULT (ran, result not kept), OTHER (a key under the prefix that
      is not a record). A task is named from the tag in the storage key; a tag none
      of the app's tasks has shows as ?TAG.
    - Memory: MEMORY USAGE of the first --sample records met (SCAN order is the
      hash order, so a fair sample), and their mean times the record count; on
      PostgreSQL each row's size (pg_column_size, its out-of-line payload
      included), the first rows in key order (the storage key's hash order).
    - The oldest claim in progress (running, parked or lease expired), by claim time:
      a stuck key shows here first.

    Walks every record with SCAN (never KEYS; on PostgreSQL, pages of the primary
    key); without --task, the app's prefix. It keeps no list of the keys it saw, so its
    memory stays small on any store, and a key SCAN returns twice (while Redis resizes
    its table) counts twice: on a busy store the counts are a snapshot, not exact.

    --json prints an object: store, prefix, task, records, scan_calls, by_task (task
    -> running, parked, lease_expired, reserved, reservation_expired, free, result,
    error, no_result, not_a_record, total), memory (null, or sampled, sampled_bytes,
    mean_bytes, estimated_total_bytes), oldest_in_progress (null, or a record as in `list
    --json`, plus claimed_ago), other_stores (tasks whose records live elsewhere).
    """  # noqa: D301 - \b is click's no-rewrap marker
    walk = Walk(ctx, task_name, scan_count)
    by_task: dict[str, Counter[str]] = {}
    sampled: list[str] = []
    oldest: dict[str, Any] | None = None
    with store_errors():
        for step in walk.steps():
            for view in step:
                by_task.setdefault(view["task"], Counter())[_bucket(view)] += 1
                if len(sampled) < sample:
                    sampled.append(view["storage_key"])
                if view["state"] == "in_progress" and (
                    oldest is None or (view["fence"] or 0) < (oldest["fence"] or 0)
                ):
                    oldest = view
        sizes = [n for n in walk.target.store.memory_usage(sampled) if n is not None]
    records = sum(c.total() for c in by_task.values())
    memory: dict[str, Any] | None = None
    if sizes:
        mean = sum(sizes) / len(sizes)
        memory = {
            "sampled": len(sizes),
            "sampled_bytes": sum(sizes),
            "mean_bytes": round(mean, 1),
            "estimated_total_bytes": round(mean * records),
        }
    if oldest is not None:
        claimed = render.claimed_at(oldest["fence"] or 0)
        oldest = {**oldest, "claimed_ago": time.time() - claimed if claimed else None}
    if as_json:
        click.echo(
            render.to_json(
                {
                    **walk.json_head(),
                    "records": records,
                    "scan_calls": walk.calls,
                    "by_task": {
                        t: {n: c[n] for n, _ in COLUMNS} | {"total": c.total()}
                        for t, c in sorted(by_task.items())
                    },
                    "memory": memory,
                    "oldest_in_progress": oldest,
                    "other_stores": list(walk.target.elsewhere) if task_name is None else [],
                }
            )
        )
        return
    traits = walk.target.traits
    lines = [count_table(by_task), ""]
    pairs = [
        ("store", f"{walk.target.url} under {walk.pattern!r}"),
        ("records", f"{records} ({traits.steps(walk.calls)})"),
    ]
    if memory is not None:
        pairs.append(
            (
                "memory",
                (
                    f"~{render.size(memory['estimated_total_bytes'])} in all, "
                    f"{render.size(round(memory['mean_bytes']))} per record "
                    f"({traits.measure} of {memory['sampled']} record(s))"
                ),
            )
        )
    else:
        pairs.append(("memory", "not measured" if records else "no records"))
    pairs.append(("oldest in progress", _oldest_text(oldest) if oldest else "none"))
    lines.append(render.fields(pairs))
    click.echo("\n".join(lines))
    walk.note_elsewhere()
