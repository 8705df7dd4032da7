"""The store of a chaos soak, behind the TCP fault proxy: Redis, or PostgreSQL.

Each yields a :class:`ChaosStore`: the URL the workers reach it by (through the proxy,
so latency, resets and blackholes hit every store connection), the nemesis's store
callbacks, the fault kinds that apply to it, and what the orchestrator saves of it once
the run is over. Neither touches the machine's own servers (6379, 5432): each starts
its own on a free port.

- ``redis``: a redis-server with AOF (a restart keeps its records); faults: restart
  (stop, start on the same port), ``SCRIPT FLUSH``.
- ``postgres``: a private PostgreSQL (``devtools.pg_server``), one database holding the
  records (migrated) and the chaos table (``database.py``); faults: restart (fast
  shutdown, start on the same port and data), kill (SIGKILL of the postmaster and its
  backends, WAL recovery at the start), ``pg_terminate_backend`` of every session but
  the orchestrator's. At the end, the committed rows are saved as ``rows.jsonl``.

The suite's PostgreSQL once ran with ``synchronous_commit=off`` (and ``fsync=off``) for
speed. Off, a commit is acknowledged before its WAL leaves the server's memory, so a
killed server forgets the last ~0.6 s of acknowledged commits: completions whose callers
already got answers naming their rows (seen: the first soak's every "answer names
another row" came within 0.3 s before a kill, and a chain step that re-ran after its
completion was forgotten got new arguments, so a new key, and its next steps a second
row). A store that forgets acknowledged commits is outside the guarantee, as a Redis
without persistence is: the server now keeps it on, and the chaos database also sets
``synchronous_commit = on`` for its
sessions (``ALTER DATABASE``, which the command line's ``-c`` does not override).
``fsync=off`` stays: the nemesis kills processes, never the machine, and WAL written to
the kernel survives a killed process.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devtools.processes import free_port
from devtools.redis_server import RedisServer
from tests.chaos.plan import ALL_KINDS, POSTGRES_KINDS
from tests.chaos.proxy import FaultProxy

__all__ = ["DATABASE", "STORES", "ChaosStore", "open_store"]

STORES = ("redis", "postgres")
DATABASE = "chaos"
CONNECT_TIMEOUT = 2
"""libpq's connect timeout (s) for the workers: its least useful value, a blackholed
connect must fail in seconds."""


@dataclass
class ChaosStore:
    """One store of a soak, as the orchestrator and the nemesis use it."""

    name: str
    url: str
    """What the workers get (``CHAOS_STORE_URL``): the proxy's address."""
    proxy: FaultProxy
    stop: Callable[[], object]
    start: Callable[[], object]
    kinds: tuple[str, ...]
    faults: dict[str, Callable[[], Any]] = field(default_factory=dict)
    """The store's own fault callbacks, by ``NemesisTargets`` field name."""
    save: Callable[[Path], None] = lambda _workdir: None
    """Write what the checker needs of the store into the run's directory."""


@contextmanager
def redis_store(workdir: Path) -> Iterator[ChaosStore]:
    """The store's redis-server (persistent, so a restart keeps its records), proxied."""
    aof = workdir / "store-data"
    aof.mkdir(parents=True, exist_ok=True)
    store_args = ["--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(aof)]
    # The store's port is pinned: the proxy points at it across every restart.
    with RedisServer(port=free_port(), extra_args=store_args) as store:
        proxy = FaultProxy("127.0.0.1", store.port).start()
        client = store.client(0)
        try:
            yield ChaosStore(
                "redis", f"redis://127.0.0.1:{proxy.port}/0", proxy, store.stop, store.start,
                ALL_KINDS, faults={"script_flush": lambda: client.script_flush()},
            )  # fmt: skip
        finally:
            proxy.stop()


def terminate_backends(url: str) -> int:
    """``pg_terminate_backend`` every session of the chaos database but this one."""
    import psycopg  # noqa: PLC0415 - only the PostgreSQL soak needs it

    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
            (DATABASE,),
        ).fetchone()
    return int(row[0]) if row else 0


def save_rows(url: str, path: Path) -> None:
    """The chaos table's committed rows, one JSON object a line (the checker's ``Row``)."""
    import psycopg  # noqa: PLC0415

    from tests.chaos.database import COLUMNS, TABLE  # noqa: PLC0415

    with psycopg.connect(url, connect_timeout=10) as conn:
        found = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM {TABLE} ORDER BY id").fetchall()
    lines = [json.dumps(dict(zip(COLUMNS, row, strict=True))) for row in found]
    path.write_text("".join(line + "\n" for line in lines))


@contextmanager
def postgres_store(workdir: Path) -> Iterator[ChaosStore]:
    """A private PostgreSQL: the records and the chaos table in one database, proxied."""
    import psycopg  # noqa: PLC0415

    from celery_idem.store.postgres_admin import migrate  # noqa: PLC0415
    from devtools.pg_server import PostgresServer  # noqa: PLC0415
    from tests.chaos.database import CREATE  # noqa: PLC0415

    with PostgresServer() as server:
        direct = server.create_database(DATABASE)  # the orchestrator's way in, unproxied
        with psycopg.connect(direct, autocommit=True) as conn:
            conn.execute(f"ALTER DATABASE {DATABASE} SET synchronous_commit = on")
        migrate(direct)
        with psycopg.connect(direct, autocommit=True) as conn:  # a session with the setting
            conn.execute(CREATE)
            row = conn.execute("SHOW synchronous_commit").fetchone()
            if row is None or row[0] != "on":
                raise RuntimeError(f"the chaos database's synchronous_commit is {row}, not on")
        proxy = FaultProxy("127.0.0.1", server.port).start()
        url = (
            f"postgresql://postgres@127.0.0.1:{proxy.port}/{DATABASE}"
            f"?connect_timeout={CONNECT_TIMEOUT}"
        )
        faults: dict[str, Callable[[], Any]] = {
            "store_kill": server.kill,
            "terminate_backends": lambda: terminate_backends(direct),
        }
        try:
            yield ChaosStore(
                "postgres", url, proxy, server.stop, server.start, POSTGRES_KINDS,
                faults=faults, save=lambda workdir: save_rows(direct, workdir / "rows.jsonl"),
            )  # fmt: skip
        finally:
            proxy.stop()


@contextmanager
def open_store(name: str, workdir: Path) -> Iterator[ChaosStore]:
    """The store ``name`` (one of :data:`STORES`) for a run in ``workdir``."""
    if name not in STORES:
        raise ValueError(f"unknown store {name!r}: one of {list(STORES)}")
    opener = postgres_store if name == "postgres" else redis_store
    with opener(workdir) as store:
        yield store
