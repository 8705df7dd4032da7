"""The PostgreSQL section of ``docs/benchmarks.md``, from :mod:`benchmarks.postgres`'s figures.

:func:`postgres_section` renders it (``make bench`` puts it in the page it writes);
:func:`splice` replaces that section alone in a page already written, so that
``python -m benchmarks.postgres --page docs/benchmarks.md`` refreshes it without the
whole ``make bench``.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from benchmarks.sections import table

__all__ = ["HEADING", "postgres_section", "splice"]

HEADING = "## PostgreSQL store beside Redis, per key"
BEFORE = "## Scenarios"
"""Where the section goes in a page that has none yet."""

Us = dict[str, list[float]]


def _spread(values: list[float], spec: str = ".0f", suffix: str = " us") -> str:
    if not values:
        return "n/a"
    med = statistics.median(values)
    return f"{med:{spec}}{suffix} [{min(values):{spec}}, {max(values):{spec}}]"


def _ratio(us: Us, top: str, bottom: str) -> str:
    """``top / bottom`` per round, as median [min, max]."""
    return _spread([a / b for a, b in zip(us[top], us[bottom], strict=True)], ".2f", "x")


def _minus(us: Us, top: str, bottom: str) -> str:
    """``top - bottom`` per round, as median [min, max]."""
    return _spread([a - b for a, b in zip(us[top], us[bottom], strict=True)], "+.0f")


def _sent(counts: dict[str, float] | None) -> str:
    """``2: `a` 1, `b` 1`` (statements or commands per key, then each one's)."""
    if not counts:
        return "0"
    total = sum(counts.values())
    each = ", ".join(f"`{k}` {v:g}" for k, v in counts.items())  # in the order first sent
    return f"{total:g}: {each}"


def total(counts: dict[str, Any] | None, path: str, side: str) -> float | None:
    """Statements (or commands) per key of ``path`` on ``side``, None when not counted."""
    if counts is None or path not in counts:
        return None
    return float(sum(counts[path].get(side, {}).values()))


COUNTED: list[tuple[str, str | None, str, bool]] = [
    # (what, Redis path, PostgreSQL path, the body writes a row)
    ("floor: bare `GET` / `SELECT 1`", "store_floor", "store_floor", False),
    ("store: claim of a new key", "store_claim", "store_claim", False),
    ("store: completion", "store_complete", "store_complete", False),
    ("store: claim of a completed key (a duplicate)", "store_duplicate", "store_duplicate", False),
    ("task: first run", "task_first", "idem_pg_first", False),
    ("task: duplicate", "task_duplicate", "idem_pg_duplicate", False),
    ("plain task, INSERT in its own transaction (the floor)", None, "insert_first", True),
    ("task on Redis, INSERT in its own transaction: first run", "insert_first",
     "idem_redis_insert_first", True),
    ("task on Redis, INSERT in its own transaction: duplicate", "insert_duplicate",
     "idem_redis_insert_duplicate", True),
    ("task, INSERT inside `idem_atomic(conn)`: first run", None, "idem_atomic_first", True),
    ("task, INSERT inside `idem_atomic(conn)`: duplicate", None, "idem_atomic_duplicate", True),
]  # fmt: skip
"""The Redis column of a task on Redis is its store's; its PostgreSQL columns, its row's."""


def _counts_section(counts: dict[str, Any], keys: int) -> str:
    redis, pg = counts.get("redis"), counts.get("postgres") or {}
    rows = []
    for what, redis_path, pg_path, writes in COUNTED:
        on_redis = ""
        if redis_path is not None:
            on_redis = "not counted (no redis-cli)" if redis is None else _sent(
                redis.get(redis_path, {}).get("client")
            )  # fmt: skip
        sides = pg.get(pg_path, {})
        on_store = "" if pg_path.startswith("idem_redis") else _sent(sides.get("store"))
        rows.append([what, on_redis, on_store, _sent(sides.get("body")) if writes else ""])
    checks = []
    atomic, floor = total(pg, "idem_atomic_first", "body"), total(pg, "insert_first", "body")
    added = None if atomic is None or floor is None else atomic - floor
    for text, got in (
        ("a duplicate (a claim of a completed key)", total(pg, "idem_pg_duplicate", "store")),
        ("a first run's claim, before the body", total(pg, "store_claim", "store")),
        ("what the transactional completion adds to the body's transaction", added),
    ):  # fmt: skip
        shown = "n/a" if got is None else f"{got:g} statement" + ("" if got == 1 else "s")
        checks.append(f"{text}: {shown}" + ("" if got == 1 else " (expected 1)"))
    return (
        "### Statements and round trips per key\n\n"
        "Counted by the servers, untimed, over "
        f"{keys} keys per path: on Redis, the commands clients sent "
        "(`redis-cli monitor`; what a script runs inside the server is not sent); on "
        "PostgreSQL, the statements clients sent (`log_statement = all` on the counted "
        "sessions only: one log line per statement, prepared ones included, none for "
        "the statements a PL/pgSQL function runs). psycopg sends one statement per round "
        "trip, so statements are round trips, and each is waited for (the completion too: "
        "on Redis a task's completion is written and its answer read later). The store's "
        "connections are its pool's; the body's is the task's own psycopg connection.\n\n"
        + table(
            [
                "path",
                "Redis round trips",
                "PostgreSQL statements, store's connection",
                "PostgreSQL statements, body's connection",
            ],
            rows,
        )
        + "\n\n"
        + "".join(f"- {line}\n" for line in checks)
        + "\n"
    )


def _times_section(us: Us) -> str:
    store_rows = []
    for what, key in (
        ("floor: bare `GET` / bare `SELECT 1`", "floor"),
        ("claim of a new key", "claim"),
        ("completion", "complete"),
        ("first run (claim + completion)", "first"),
        ("duplicate (claim of a completed key)", "duplicate"),
    ):
        redis, pg = f"redis_{key}", f"pg_{key}"
        store_rows.append(
            [
                what,
                _spread(us[redis]),
                _ratio(us, redis, "redis_floor") if key != "floor" else "1.00x",
                _spread(us[pg]),
                _ratio(us, pg, "pg_floor") if key != "floor" else "1.00x",
                _ratio(us, pg, redis),
            ]
        )
    task_rows = [
        ["plain task (the tracer alone)", _spread(us["plain_first"]), "", "", ""],
        ["plain task, INSERT in its own transaction (the floor of a write)",
         _spread(us["insert_first"]), "", "", ""],
    ]  # fmt: skip
    tasks: list[tuple[str, str, str, str | None]] = [
        ("IdempotentTask on Redis", "idem_redis", "plain", None),
        ("IdempotentTask on PostgreSQL", "idem_pg", "plain", "idem_redis"),
        ("IdempotentTask on Redis, INSERT in its own transaction", "idem_redis_insert", "insert",
         None),
        ("IdempotentTask on PostgreSQL, INSERT inside `idem_atomic(conn)`", "idem_atomic",
         "insert", "idem_redis_insert"),
    ]  # fmt: skip
    for what, name, floor, on_redis in tasks:
        first, duplicate = f"{name}_first", f"{name}_duplicate"
        task_rows.append(
            [
                what,
                _spread(us[first]),
                _spread(us[duplicate]),
                _minus(us, first, f"{floor}_first"),
                ""
                if on_redis is None
                else f"{_ratio(us, first, f'{on_redis}_first')}; "
                f"{_ratio(us, duplicate, f'{on_redis}_duplicate')}",
            ]
        )
    return (
        "### The stores alone (us per call, one client)\n\n"
        + table(
            [
                "call",
                "Redis",
                "Redis ÷ its floor",
                "PostgreSQL",
                "PostgreSQL ÷ its floor",
                "PostgreSQL ÷ Redis",
            ],
            store_rows,
        )
        + "\n\n### Per task, through Celery's tracer (us per task)\n\n"
        + table(
            [
                "task",
                "first run",
                "duplicate",
                "first run minus its floor (the plain task; with an INSERT, the plain task "
                "with the INSERT)",
                "PostgreSQL ÷ the same on Redis: first run; duplicate",
            ],
            task_rows,
        )
        + "\n\n"
    )


def postgres_section(out: dict[str, Any] | None) -> str:
    """The section (empty without figures)."""
    if out is None:
        return ""
    if "error" in out:
        return f"{HEADING}\n\nNot measured: {out['error']}.\n\n"
    v, rows = out["versions"], out["atomic_rows"]
    durability = ", ".join(
        f"`{name}` {value}" for name, value in out.get("pg_settings", {}).items()
    )
    if out.get("pg_settings", {}).get("fsync") == "off":
        durability += ": no commit waits for a disk"
    return (
        f"{HEADING}\n\n"
        f"`python -m benchmarks.postgres` ({out.get('date', '')}): one process, one private "
        f"PostgreSQL ({durability}) and one private redis-server (no RDB, no AOF), on "
        f"loopback; {out['calls']} calls a batch, {out['rounds']} rounds, the batches "
        "interleaved in an order that rotates every round (`benchmarks/postgres.py`). "
        "Times are median [min, max] of the per-round means; ratios and differences are "
        "taken within each round. The tasks run as in `benchmarks/percall.py` "
        "(`build_tracer`, `task_ignore_result`); a duplicate is the same keys again, "
        "completed, under new task ids. The floors: a bare `GET` on the Redis store's "
        "client, a bare `SELECT 1` on a connection the PostgreSQL store opens (psycopg "
        "3, autocommit, as its pool's), and, for a task that writes a row, a plain task "
        "whose body runs `BEGIN`, the same `INSERT`, `COMMIT` on the same connection. "
        f"Other processes' load during the rounds: {_spread(out['foreign_cores'], '.2f', '')} "
        "cores.\n\n"
        + _times_section(out["us"])
        + _counts_section(out["counts"], out["counted_keys"])
        + f"Rows the transactional task wrote: {rows['rows']} for {rows['keys']} keys (each "
        "key ran once, then again as a duplicate).\n\n"
        f"PostgreSQL {v['postgresql']}, psycopg {v['psycopg']}, redis-server "
        f"{v['redis-server']}, redis-py {v['redis']}, hiredis {v['hiredis']}, celery "
        f"{v['celery']}.\n\n"
    )


def splice(page: Path, section: str) -> None:
    """Replace the section in ``page`` (or insert it before *Scenarios*)."""
    lines = page.read_text().splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.rstrip("\n") == HEADING]
    if starts:
        start = starts[0]
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
    else:
        start = end = next(
            (i for i, line in enumerate(lines) if line.rstrip("\n") == BEFORE), len(lines)
        )
    page.write_text("".join(lines[:start]) + section + "".join(lines[end:]))
