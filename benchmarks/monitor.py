"""Store round trips of one run: ``redis-cli monitor`` of the contender's store server.

MONITOR shows every command a client sends, outside scripts as ``lua`` lines, so the
round trips of the protocol can be counted exactly; ``INFO commandstats`` cannot tell
(Redis 7 counts the commands a script runs). Split from the harness to keep it short.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path

from devtools.redis_server import RedisServer

__all__ = ["HANDSHAKE", "Monitor", "count_round_trips"]

HANDSHAKE = {"echo", "ping", "client", "hello", "select", "auth", "info", "config", "command"}
"""Commands that open a connection or mark a run: not round trips of the protocol."""


class Monitor:
    """``redis-cli monitor`` of one store server, into a file (cheap: no Python parsing)."""

    _LINE = re.compile(r'^[\d.]+ \[\d+ (\S+)\] "([^"]*)"(?: "([^"]*)")?')

    def __init__(self, cli: str, server: RedisServer, path: Path) -> None:
        self.path = path
        self._out = path.open("wb")
        self.proc = subprocess.Popen(  # noqa: S603 - our own argv, no shell
            [cli, "-p", str(server.port), "monitor"], stdout=self._out,
            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        probe = server.client()
        marker = f"bench:monitor:{uuid.uuid4().hex}"
        deadline = time.monotonic() + 10
        while marker not in path.read_text(errors="replace"):  # it is listening
            probe.echo(marker)
            if time.monotonic() > deadline:
                raise RuntimeError("redis-cli monitor did not start")
            time.sleep(0.05)
        probe.close()

    def stop(self, end_marker: str) -> list[tuple[str, str, str]]:
        """Wait for ``end_marker``, stop, return (client, command, first arg) in order."""
        deadline = time.monotonic() + 30
        while end_marker not in self.path.read_text(errors="replace"):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self._out.close()
        seen = []
        for line in self.path.read_text(errors="replace").splitlines():
            match = self._LINE.match(line)
            if match:
                seen.append((match[1], match[2].lower(), match[3] or ""))
        return seen


def _script_names() -> dict[str, str]:
    """SHA1 -> name of celery-idem's Lua scripts, to tell claims from completions."""
    try:
        from celery_idem.store.redis_base import SOURCES  # noqa: PLC0415 - optional detail
    except ImportError:  # the module changed shape: keep counting, without names
        return {}
    return {hashlib.sha1(src.encode()).hexdigest(): name for name, src in SOURCES.items()}  # noqa: S324 - Redis names scripts by SHA1


def count_round_trips(
    seen: list[tuple[str, str, str]], run_id: str, publisher_ports: set[int]
) -> dict[str, dict[str, int]]:
    """Network commands between the run's markers, by side (publisher, worker)."""
    scripts = _script_names()
    start, end = f"bench:start:{run_id}", f"bench:end:{run_id}"
    inside = False
    counts: dict[str, Counter[str]] = {"publisher": Counter(), "worker": Counter()}
    for client, command, arg in seen:
        if command == "echo" and arg in (start, end):
            inside = arg == start
            continue
        if not inside or client == "lua" or command in HANDSHAKE:
            continue
        port = int(client.rsplit(":", 1)[1]) if ":" in client else -1
        side = "publisher" if port in publisher_ports else "worker"
        label = command
        if command in ("evalsha", "eval"):
            label = f"{command}:{scripts.get(arg, arg[:8])}"
        counts[side][label] += 1
    return {side: dict(c) for side, c in counts.items()}
