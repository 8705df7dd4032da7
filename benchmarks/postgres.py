"""Per key, in one process: the PostgreSQL store beside the Redis store.

``python -m benchmarks.postgres`` (``make bench`` runs it too, with ``--json``;
``--page docs/benchmarks.md`` rewrites only its section of that page). One private
PostgreSQL (``devtools/pg_server.py``: ``fsync`` off) and one private redis-server (no
RDB, no AOF), so that nothing waits for a disk, one process, timed:

- the stores alone: a first run (``claim`` of a new key, then ``complete``) and a
  duplicate (a ``claim`` of a completed key) on ``RedisStore`` and ``PostgresStore``,
  beside the physical floors: a bare ``GET`` on the Redis store's own client, a bare
  ``SELECT 1`` on a connection the PostgreSQL store opens (``PostgresStore.connect``:
  psycopg 3, autocommit, as its pool's);
- per task, through Celery's tracer as :mod:`benchmarks.percall` runs it
  (``build_tracer``, ``task_ignore_result``): an ``IdempotentTask`` on Redis, one on
  PostgreSQL, and one on PostgreSQL whose body inserts a row inside
  ``self.idem_atomic(conn)`` (the transactional completion), beside a plain task that
  inserts the same row in its own transaction (``with conn.transaction()``: the floor of
  a database write) and a plain task (the tracer alone); first runs, then duplicates
  (the same keys again under new task ids).

The blocks take turns in an order that rotates every round; the report gives the median
[min, max] over the rounds of the per-round means, and every ratio is taken within a
round. Then, untimed, the statements and round trips of each path, counted by the
servers (:mod:`benchmarks.pgcount`), and a check that every key of the transactional
task has exactly one row.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.percall import timed, tracer
from benchmarks.pgcount import Counts, PgCounter, RedisCounter, logged
from benchmarks.procstat import cpu_seconds, descendants, machine_busy_seconds
from devtools.pg_server import PostgresServer, PostgresServerError
from devtools.redis_server import RedisServer, server_version

__all__ = ["BLOCKS", "main", "measure"]

ROUNDS = 30
CALLS = 200
COUNTED_KEYS = 20
TTL = 86400
RESULT = b'"' + b"x" * 48 + b'"'
FIRST, LATER = "t", "u"  # owner tokens of the first run and of its duplicate
TABLE = "CREATE TABLE bench_rows (id bigserial PRIMARY KEY, key text NOT NULL, task text NOT NULL)"
INSERT = "INSERT INTO bench_rows (key, task) VALUES (%s, %s)"
SETTINGS = ("fsync", "synchronous_commit", "full_page_writes")
"""The private PostgreSQL's durability settings (``devtools/pg_server.py`` chooses them)."""
BLOCKS = (
    "redis_store", "pg_store", "plain", "insert", "idem_redis", "idem_pg", "idem_redis_insert",
    "idem_atomic",
)  # fmt: skip
"""What takes turns in a round: the stores alone, then one task each."""


def _stores(redis_url: str, pg_url: str) -> dict[str, dict[str, Callable[[str], Any]]]:
    """Each store's calls alone: the floor, claim, complete, a duplicate's claim."""
    from celery_idem.store import ClaimRequest, CompleteRequest, RecordKind, Stored  # noqa: PLC0415
    from celery_idem.store.postgres import PostgresStore  # noqa: PLC0415
    from celery_idem.store.redis import RedisStore  # noqa: PLC0415

    result = Stored(RecordKind.RESULT, RESULT, "j")
    out: dict[str, dict[str, Callable[[str], Any]]] = {}
    redis_store = RedisStore.from_url(redis_url)
    pg_store = PostgresStore.from_url(pg_url)
    floor_conn = pg_store.connect()

    def select_1(_key: str) -> None:
        floor_conn.execute("SELECT 1").fetchall()

    for name, store, floor in (
        ("redis", redis_store, redis_store.client.get),
        ("pg", pg_store, select_1),
    ):
        fences: dict[str, int] = {}

        def claim(key: str, store: Any = store, fences: dict[str, int] = fences) -> None:
            request = ClaimRequest(key, token=FIRST, task_id="i", fingerprint="", lease=60, ttl=TTL)
            fences[key] = store.claim(request).fence

        def complete(key: str, store: Any = store, fences: dict[str, int] = fences) -> None:
            fence = fences.pop(key)
            store.complete(
                CompleteRequest(key, token=FIRST, fence=fence, task_id="i", stored=result, ttl=TTL)
            )

        def duplicate(key: str, store: Any = store) -> None:
            request = ClaimRequest(key, token=LATER, task_id="j", fingerprint="", lease=60, ttl=TTL)
            if store.claim(request).stored is None:
                raise RuntimeError(f"{key!r} was not completed: not a duplicate")

        out[name] = {"floor": floor, "claim": claim, "complete": complete, "duplicate": duplicate}
    return out


def _build(redis_url: str, pg_url: str) -> dict[str, Any]:
    """The stores' calls, and the tasks' tracers on ``redis_url`` and ``pg_url``."""
    import psycopg  # noqa: PLC0415
    from celery import Celery  # noqa: PLC0415

    from celery_idem import IdempotentTask  # noqa: PLC0415

    apps = {}
    for name, url in (("redis", redis_url), ("pg", pg_url)):
        apps[name] = app = Celery(f"pgbench_{name}", set_as_current=False)
        app.conf.update(
            broker_url="memory://", result_backend="cache+memory://", task_ignore_result=True,
            idem_store_url=url,
        )  # fmt: skip
    body = psycopg.connect(pg_url, autocommit=True)  # the body's own connection

    def echo(self: Any, key: str) -> str:
        return f"{key}:{self.request.id}"

    def insert(self: Any, key: str) -> str:
        with body.transaction():
            body.execute(INSERT, (key, self.request.id))
        return f"{key}:{self.request.id}"

    def atomic(self: Any, key: str) -> str:
        with self.idem_atomic(body) as done:
            body.execute(INSERT, (key, self.request.id))
            done.result = f"{key}:{self.request.id}"
        return str(done.result)

    tasks = {}
    for name, store, fn, base in (
        ("plain", "pg", echo, None),
        ("insert", "pg", insert, None),
        ("idem_redis", "redis", echo, IdempotentTask),
        ("idem_pg", "pg", echo, IdempotentTask),
        ("idem_redis_insert", "redis", insert, IdempotentTask),
        ("idem_atomic", "pg", atomic, IdempotentTask),
    ):
        options = {"base": base} if base else {}
        task = apps[store].task(bind=True, name=f"pgbench.{name}", **options)(fn)
        tasks[name] = tracer(apps[store], task)
    return {"stores": _stores(redis_url, pg_url), "tasks": tasks, "body": body}


def _block(name: str, parts: dict[str, Any], calls: int, tag: str) -> dict[str, float]:
    """One block's turn in a round: its first runs, then their duplicates."""
    keys = [f"{tag}:{name}:{i}" for i in range(calls)]
    if name.endswith("_store"):
        store = name.removesuffix("_store")
        calls_of = parts["stores"][store]
        return {f"{store}_{what}": timed(calls_of[what], keys) for what in calls_of}
    call = parts["tasks"][name]
    if name in ("plain", "insert"):  # nothing to deduplicate: a second run is a first one
        return {f"{name}_first": timed(call, keys)}
    return {f"{name}_first": timed(call, keys), f"{name}_duplicate": timed(call, keys)}


def _each(fn: Callable[[str], Any], keys: list[str]) -> None:
    for key in keys:
        fn(key)


def _count(counted: dict[str, Any], redis: RedisServer, pg: PostgresServer, url: str) -> Any:
    """Statements (PostgreSQL) and round trips (Redis) per key of every path."""
    n = COUNTED_KEYS
    for name in BLOCKS:  # schema check, scripts, the body connection's first check
        _block(name, counted, 5, "count-warm")
    body = {counted["body"].info.backend_pid: "body"}
    pg_paths: dict[str, Counts] = {}
    pg_counter = PgCounter(pg.log_path, url)
    tmp = tempfile.TemporaryDirectory(prefix="idem-pgbench-")
    redis_counter = RedisCounter(redis, Path(tmp.name))
    try:
        for store, calls in counted["stores"].items():
            keys = [f"count:{store}:{i}" for i in range(n)]
            for what, fn in calls.items():
                run = functools.partial(_each, fn, keys)
                if store == "redis":
                    redis_counter.count(f"store_{what}", run, n)
                else:
                    pg_paths[f"store_{what}"] = pg_counter.count(run, n, body)
        for name, call in counted["tasks"].items():
            keys = [f"count:{name}:{i}" for i in range(n)]
            paths = ("first",) if name in ("plain", "insert") else ("first", "duplicate")
            for path in paths:
                run = functools.partial(_each, call, keys)
                if name == "idem_redis":
                    redis_counter.count(f"task_{path}", run, n)
                elif name == "idem_redis_insert":  # both servers: the Redis store, the row
                    count_pg = functools.partial(pg_counter.count, run, n, body)
                    pg_paths[f"{name}_{path}"] = redis_counter.count(f"insert_{path}", count_pg, n)
                elif name != "plain":
                    pg_paths[f"{name}_{path}"] = pg_counter.count(run, n, body)
    finally:
        pg_counter.close()
        redis_paths = redis_counter.finish()
        tmp.cleanup()
    return {"postgres": pg_paths, "redis": redis_paths}


def _rows_per_key(conn: Any, pattern: str) -> dict[str, int]:
    """Rows and distinct keys of ``bench_rows`` whose key is LIKE ``pattern``."""
    rows, keys = conn.execute(
        "SELECT count(*), count(DISTINCT key) FROM bench_rows WHERE key LIKE %s", (pattern,)
    ).fetchone()
    return {"rows": int(rows), "keys": int(keys)}


@contextmanager
def _servers() -> Iterator[tuple[RedisServer, PostgresServer, str]]:
    """A redis-server, a PostgreSQL with a migrated database ``bench`` (its URL)."""
    import psycopg  # noqa: PLC0415

    from celery_idem.store.postgres_admin import migrate  # noqa: PLC0415

    with RedisServer() as redis, PostgresServer() as pg:
        url = pg.create_database("bench")
        migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(TABLE)
        yield redis, pg, url


def measure(rounds: int, calls: int) -> dict[str, Any]:
    """Start the servers, warm up, time every block in every round (rotated), count."""
    with _servers() as (redis, pg, url):
        parts = _build(redis.url(0), url)
        counted = _build(redis.url(0), logged(url))
        for name in BLOCKS:  # connections, scripts, prepared statements, imports
            _block(name, parts, min(200, calls), "warm")
        ours = [os.getpid(), *(p for p in (redis.pid,) if p)]
        per_round: list[dict[str, float]] = []
        foreign: list[float] = []
        for round_no in range(rounds):
            shift = round_no % len(BLOCKS)
            pids = ours + (descendants(pg.pid) if pg.pid else [])
            busy, own, wall = machine_busy_seconds(), cpu_seconds(pids), time.monotonic()
            row: dict[str, float] = {}
            for name in BLOCKS[shift:] + BLOCKS[:shift]:
                row.update(_block(name, parts, calls, f"r{round_no}"))
            wall = time.monotonic() - wall
            others = machine_busy_seconds() - busy - (cpu_seconds(pids) - own)
            foreign.append(max(0.0, others / wall))
            for store in ("redis", "pg"):
                row[f"{store}_first"] = row[f"{store}_claim"] + row[f"{store}_complete"]
            per_round.append(row)
        counts = _count(counted, redis, pg, url)
        body = parts["body"]
        atomic_rows = _rows_per_key(body, "%:idem_atomic:%")
        pg_version = str(body.execute("SHOW server_version").fetchone()[0])
        settings = {name: str(body.execute(f"SHOW {name}").fetchone()[0]) for name in SETTINGS}
        redis_version = server_version(redis.executable)
    versions = {"postgresql": pg_version, "redis-server": redis_version}
    for package in ("psycopg", "redis", "hiredis", "celery"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    import psycopg  # noqa: PLC0415

    versions["psycopg"] += f" ({psycopg.pq.__impl__})"
    return {
        "rounds": rounds,
        "calls": calls,
        "us": {k: [r[k] for r in per_round] for k in per_round[0]},
        "foreign_cores": foreign,
        "counts": counts,
        "counted_keys": COUNTED_KEYS,
        "atomic_rows": atomic_rows,
        "versions": versions,
        "pg_settings": settings,
    }


def main(argv: list[str] | None = None) -> int:
    """Measure; print the tables (or one JSON line with ``--json``); ``--page``: splice."""
    from benchmarks.postgres_page import postgres_section, splice  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m benchmarks.postgres", description=__doc__)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--calls", type=int, default=CALLS, help="calls per batch")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply --calls")
    parser.add_argument("--json", action="store_true", help="one JSON line on stdout")
    parser.add_argument("--save", metavar="JSON", help="also write the figures there")
    parser.add_argument("--from-json", metavar="JSON", help="no run: the figures saved there")
    parser.add_argument(
        "--page", metavar="MD", help="rewrite only this section of a page (docs/benchmarks.md)"
    )
    args = parser.parse_args(argv)
    if args.from_json:
        out = json.loads(Path(args.from_json).read_text())
    else:
        started = time.monotonic()
        try:
            out = measure(args.rounds, max(20, round(args.calls * args.scale)))
        except (ImportError, PostgresServerError) as exc:  # psycopg or PostgreSQL missing
            out = {"error": f"{type(exc).__name__}: {exc}"}
        out["runtime_seconds"] = time.monotonic() - started
        out["date"] = time.strftime("%Y-%m-%d %H:%M %Z")
    if args.save:
        Path(args.save).write_text(json.dumps(out, indent=1) + "\n")
    if args.json:
        sys.stdout.write(json.dumps(out) + "\n")
        return 0
    section = postgres_section(out)
    if args.page:
        splice(Path(args.page), section)
        print(f"wrote its section of {args.page}", file=sys.stderr)
    print(section)
    return 1 if "error" in out else 0


if __name__ == "__main__":
    sys.exit(main())
