"""Statements and round trips per key of each path, counted by the servers themselves.

For :mod:`benchmarks.postgres`, untimed. PostgreSQL: the counted connections carry
``log_statement = all`` as a session setting in their URL (``options=-c ...``), so the
server logs one line per statement a client sends (``statement:`` for the simple
protocol, ``execute <name>:`` for the extended one, a prepared statement too), prefixed
with the backend's pid; statements run inside a PL/pgSQL function are not logged, as
they are not sent. A marker statement on a connection of its own brackets each path.
psycopg 3 sends one statement per round trip (no pipeline mode here), so the statements
are the round trips. Redis: ``redis-cli monitor`` between two ``ECHO`` markers
(:mod:`benchmarks.monitor`), the commands that scripts run left out.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from benchmarks.monitor import Monitor, count_round_trips
from devtools.redis_server import RedisServer, find_redis_cli

__all__ = ["PgCounter", "RedisCounter", "label", "logged"]

T = TypeVar("T")
Counts = dict[str, dict[str, float]]
"""Per side (``store``, ``body``; Redis: ``client``), statement label -> count per key."""

_LINE = re.compile(r"\[(\d+)\][^\n]*? LOG:  (?:statement|execute [^:]*): (.*)$")
_FUNCTION = re.compile(r"\bcelery_idem_\w+")


def logged(url: str) -> str:
    """``url`` whose sessions log every statement they run (superuser: the private server's)."""
    return url + ("&" if "?" in url else "?") + "options=-c%20log_statement%3Dall"


def label(sql: str) -> str:
    """How a statement is shown: celery-idem's function, a short statement, or its verb."""
    found = _FUNCTION.search(sql)
    if found:
        return found[0]
    words = sql.split()
    return " ".join(words) if len(words) <= 2 else words[0].upper()


def _wait_for(path: Path, marker: str, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text(errors="replace").splitlines()
        if any(marker in line for line in lines):
            return lines
        if time.monotonic() > deadline:
            raise RuntimeError(f"the marker {marker!r} never reached {path}")
        time.sleep(0.02)


class PgCounter:
    """Counts the statements clients send, from the private server's log."""

    def __init__(self, log_path: Path, url: str) -> None:
        import psycopg  # noqa: PLC0415 - optional dependency

        self.log_path = log_path
        self.marker = psycopg.connect(logged(url), autocommit=True)
        self.pid = self.marker.info.backend_pid

    def close(self) -> None:
        """Close the marker connection."""
        self.marker.close()

    def count(self, run: Callable[[], Any], keys: int, sides: Mapping[int, str]) -> Counts:
        """Statements per key that ``run`` made clients send, by side (pid in ``sides``).

        A pid not in ``sides`` is the store's (its pool's connections).
        """
        tag = uuid.uuid4().hex
        start, end = f"idem-bench:start:{tag}", f"idem-bench:end:{tag}"
        self.marker.execute(f"SELECT '{start}'")
        run()
        self.marker.execute(f"SELECT '{end}'")
        counts: dict[str, Counter[str]] = {}
        inside = False
        for line in _wait_for(self.log_path, end):
            if start in line or end in line:
                inside = start in line
                continue
            found = _LINE.search(line)
            if not inside or found is None or int(found[1]) == self.pid:
                continue
            side = sides.get(int(found[1]), "store")
            counts.setdefault(side, Counter())[label(found[2])] += 1
        return {side: {k: v / keys for k, v in c.items()} for side, c in counts.items()}


class RedisCounter:
    """Counts the commands clients send to a redis-server (``redis-cli monitor``)."""

    def __init__(self, server: RedisServer, workdir: Path) -> None:
        cli = find_redis_cli(server.executable)
        self.monitor = Monitor(cli, server, workdir / "monitor.txt") if cli else None
        self.probe = server.client()
        self.runs: list[tuple[str, str, int]] = []

    def count(self, name: str, run: Callable[[], T], keys: int) -> T:
        """Run ``run`` between two markers (its value); :meth:`finish` counts it as ``name``."""
        tag = uuid.uuid4().hex
        self.probe.echo(f"bench:start:{tag}")
        value = run()
        self.probe.echo(f"bench:end:{tag}")
        self.runs.append((name, tag, keys))
        return value

    def finish(self) -> dict[str, Counts] | None:
        """Stop the monitor; each counted path's commands per key (None: no redis-cli)."""
        self.probe.close()
        if self.monitor is None or not self.runs:
            return None
        seen = self.monitor.stop(f"bench:end:{self.runs[-1][1]}")
        out: dict[str, Counts] = {}
        for name, tag, keys in self.runs:
            sent = count_round_trips(seen, tag, set())["worker"]
            out[name] = {"client": {k: v / keys for k, v in sent.items()}}
        return out
