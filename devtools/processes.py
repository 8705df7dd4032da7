"""Waiting with a deadline, free ports, and a subprocess kept in its own process group.

The bottom of ``devtools``: no Redis here. Everything the suite, the benchmarks and the
demo start (redis-server, Celery workers, the demo's webhook server) is a child in its
own session, so a Ctrl-C in the terminal reaches only the driver, which then stops its
children in order instead of leaving them half-dead.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

__all__ = ["Process", "StartError", "TimedOut", "free_port", "port_is_open", "wait_for"]

T = TypeVar("T")


class TimedOut(AssertionError):
    """A condition waited for with :func:`wait_for` did not come true in time.

    An ``AssertionError``: in a test, a deadline passed is a failed expectation.
    """


class StartError(RuntimeError):
    """A process exited while starting, or did not become ready in time."""


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float,
    interval: float = 0.02,
    message: str = "",
) -> T:
    """Poll ``predicate`` until it returns something truthy and return that value.

    Exceptions raised by ``predicate`` propagate immediately (wrap it if a
    transient error should count as "not yet").

    Raises:
        TimedOut: ``timeout`` seconds elapsed without a truthy result.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f": {message}" if message else ""
            raise TimedOut(
                f"condition not met within {timeout:.2f}s{detail} (last value: {value!r})"
            )
        time.sleep(interval)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_open(port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
    """Return True if something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class Process:
    """A subprocess in its own process group (session), its output appended to a log file.

    ``stop()`` and ``kill()`` signal the whole group, so a Celery worker's pool children
    go with their parent.
    """

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        log: Path,
        env: dict[str, str],
        cwd: Path | None = None,
    ) -> None:
        self.name, self.cmd, self.log, self.env, self.cwd = name, list(cmd), log, env, cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        """Launch it (not waiting for anything); returns self."""
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the driver only; it stops us
            )
        return self

    @property
    def pid(self) -> int:
        """The process id (started processes only)."""
        if self.proc is None:
            raise StartError(f"{self.name} has not been started")
        return self.proc.pid

    def alive(self) -> bool:
        """True while the main process runs."""
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        """Everything it wrote so far ('' before it wrote anything)."""
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 25, skip: str = "\0") -> str:
        """The last ``lines`` lines of its output without those containing ``skip``, indented."""
        kept = [line for line in self.output().splitlines() if skip not in line]
        return "\n".join(f"    | {line}" for line in kept[-lines:])

    def wait_ready(self, ready: Callable[[], bool], timeout: float) -> None:
        """Wait until ``ready()``; StartError if it exits first or ``timeout`` passes."""
        try:
            wait_for(lambda: ready() or not self.alive(), timeout, 0.05, f"{self.name} to start")
        except TimedOut as exc:
            raise StartError(f"{exc}; its log:\n{self.tail()}") from None
        if not self.alive():
            raise StartError(f"{self.name} exited at start; its log:\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL the whole process group: the main process and all its children."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL if it is still there after ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        # Pool children may outlive their parent for a moment: leave none behind.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
