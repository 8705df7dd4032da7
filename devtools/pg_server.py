"""Throwaway PostgreSQL servers for the test suite, the benchmarks and the demo.

Importable without pytest. Like :mod:`devtools.redis_server`, nothing here talks to a
server it did not start: :class:`PostgresServer` runs ``initdb`` into a private temp
dir and starts ``postgres`` on a free port bound to 127.0.0.1 (and a Unix socket in the
same dir), ``fsync`` off (a test kills processes, never the machine; ``synchronous_commit``
stays on, so a killed server keeps every commit it acknowledged: see
``tests/chaos/stores.py`` for what it forgets otherwise), trust authentication for the
``postgres`` role, and removes it all at the end. The machine's own PostgreSQL (port
5432) is never used.

Binary lookup (:func:`find_pg_bin`): ``$IDEM_TEST_PG_SERVER`` when set (``wheel``: the
``pgserver`` wheel's binaries even when the system has its own; any other value is the
directory holding ``initdb``, ``pg_ctl`` and ``postgres``), else the system's (on
``$PATH``, then ``/usr/lib/postgresql/<newest>/bin``), else the ``pgserver`` wheel's
(``pip install pgserver``: PostgreSQL 16 built for manylinux/macOS), so the suite needs
no server installed.

PostgreSQL refuses to run as root: under root the server runs as the ``postgres`` user
when it exists, else ``nobody``, and the temp dir (and, for the wheel, a copy of its
binaries, which may sit in a venv that user cannot read) is handed to that user.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from devtools.processes import free_port, port_is_open, wait_for

__all__ = ["PG_SERVER_ENV", "PostgresServer", "PostgresServerError", "find_pg_bin"]

PG_SERVER_ENV = "IDEM_TEST_PG_SERVER"
"""Which PostgreSQL the suite starts: ``wheel`` (pgserver's), a bin directory, or unset."""

START_TIMEOUT = 60.0
_TOOLS = ("initdb", "pg_ctl", "postgres")


class PostgresServerError(RuntimeError):
    """No PostgreSQL binaries, or the server failed to start or stop."""


def _has_tools(directory: str | os.PathLike[str]) -> bool:
    return all(os.access(Path(directory, tool), os.X_OK) for tool in _TOOLS)


def wheel_bin() -> str | None:
    """The ``pgserver`` wheel's bin directory, or None when the wheel is not installed."""
    try:
        spec = importlib.util.find_spec("pgserver")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    directory = Path(next(iter(spec.submodule_search_locations)), "pginstall", "bin")
    return str(directory) if _has_tools(directory) else None


def system_bin() -> str | None:
    """The system's PostgreSQL bin directory (``$PATH`` first), or None."""
    on_path = shutil.which("pg_ctl")
    if on_path and _has_tools(Path(on_path).parent):
        return str(Path(on_path).parent)
    for directory in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if _has_tools(directory):
            return directory
    return None


@functools.cache
def find_pg_bin() -> str:
    """The directory of ``initdb``/``pg_ctl``/``postgres`` to use (see the module docstring)."""
    wanted = os.environ.get(PG_SERVER_ENV, "")
    if wanted == "wheel":
        found = wheel_bin()
        if found is None:
            raise PostgresServerError(f"{PG_SERVER_ENV}=wheel but pgserver is not installed")
        return found
    if wanted:
        if not _has_tools(wanted):
            raise PostgresServerError(f"{PG_SERVER_ENV}={wanted!r} holds no initdb/pg_ctl/postgres")
        return wanted
    found = system_bin() or wheel_bin()
    if found is None:
        raise PostgresServerError(
            "no PostgreSQL binaries: install PostgreSQL or `pip install pgserver`"
        )
    return found


def server_description() -> str:
    """What the suite runs, for pytest's header."""
    try:
        directory = find_pg_bin()
    except PostgresServerError as exc:
        return f"postgres: none ({exc})"
    version = subprocess.run(
        [str(Path(directory, "postgres")), "--version"], check=False, capture_output=True, text=True
    ).stdout.strip()
    return f"postgres: {version} ({directory})"


def _run_as() -> pwd.struct_passwd | None:
    """The unprivileged user to run the server as when we are root, else None."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise PostgresServerError("running as root and neither 'postgres' nor 'nobody' exists")


class PostgresServer:
    """A private PostgreSQL server (one cluster, fsync off), stopped and removed at exit.

    Usage::

        with PostgresServer() as server:
            url = server.create_database("t")  # postgresql://postgres@127.0.0.1:PORT/t
    """

    def __init__(self, *, bin_dir: str | None = None) -> None:
        self.bin_dir = bin_dir or find_pg_bin()
        self.port = 0
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._user = _run_as()

    # -- where --------------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        """The private temp dir: data, log and socket."""
        if self._tmp is None:
            raise PostgresServerError("PostgresServer not started")
        return Path(self._tmp.name)

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory."""
        return self.directory / "data"

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        return self.directory / "postgres.log"

    def url(self, database: str = "postgres") -> str:
        """``postgresql://postgres@127.0.0.1:PORT/DATABASE`` (trust authentication)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def pid(self) -> int | None:
        """The postmaster's pid, or None when not running."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the postmaster is alive."""
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the log ('' when there is none)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, PostgresServerError):
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def _uid(self) -> int | None:
        return None if self._user is None else self._user.pw_uid

    @property
    def _gid(self) -> int | None:
        return None if self._user is None else self._user.pw_gid

    def _tool(self, name: str) -> str:
        return str(Path(self.bin_dir, name))

    def start(self, timeout: float = START_TIMEOUT) -> PostgresServer:
        """Run initdb (first time) and start; returns self once it accepts connections."""
        if self.running:
            raise PostgresServerError(f"postgres already running (pid {self.pid})")
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="celery-idem-pg-")
            self._prepare()
        self.port = self.port or free_port()
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        try:
            self._proc = subprocess.Popen(
                [
                    self._tool("postgres"),
                    "-D",
                    str(self.data_dir),
                    "-p",
                    str(self.port),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    f"unix_socket_directories={self.directory}",
                    "-c",
                    "fsync=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=200",
                    "-c",
                    "shared_buffers=32MB",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=self._uid,
                group=self._gid,
            )
        finally:
            log.close()
        try:
            wait_for(self._ready, timeout, message="postgres accepts connections")
        except Exception as exc:
            self.stop()
            raise PostgresServerError(f"postgres did not start:\n{self.log_tail()}") from exc
        return self

    def _ready(self) -> bool:
        if not self.running:
            raise PostgresServerError(f"postgres exited:\n{self.log_tail()}")
        if not port_is_open(self.port):
            return False
        import psycopg  # noqa: PLC0415 - optional: only the PostgreSQL tests need it

        try:
            psycopg.connect(self.url(), connect_timeout=2).close()
        except psycopg.OperationalError:
            return False  # "the database system is starting up"
        return True

    def _prepare(self) -> None:
        """Run initdb into the temp dir, owned by the user the server runs as."""
        directory = self.directory
        user = self._user
        if user is not None:
            os.chown(directory, user.pw_uid, user.pw_gid)
            if not os.access(self.bin_dir, os.R_OK):  # pragma: no cover - unusual
                raise PostgresServerError(f"{self.bin_dir} is not readable by {user.pw_name}")
            self._reachable_bin(user)
        subprocess.run(
            [
                self._tool("initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--locale=C",
            ],
            check=True,
            capture_output=True,
            cwd=directory,
            user=self._uid,
            group=self._gid,
        )

    def _reachable_bin(self, user: pwd.struct_passwd) -> None:
        """Copy the binaries (and their lib/share) where ``user`` can reach them.

        A venv under /root is not searchable by ``nobody``: the wheel's install tree is
        copied into the temp dir (about 30 MB, once per server).
        """
        probe = subprocess.run(
            [self._tool("postgres"), "--version"],
            check=False,
            capture_output=True,
            user=self._uid,
            group=self._gid,
        )
        if probe.returncode == 0:
            return
        tree = Path(self.bin_dir).parent
        copy = self.directory / "pginstall"
        shutil.copytree(tree, copy, symlinks=True)
        for path in [copy, *copy.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid, follow_symlinks=False)
        self.bin_dir = str(copy / "bin")

    def stop(self, timeout: float = 20.0) -> None:
        """Fast shutdown (SIGINT: disconnect clients, then exit); SIGKILL if it hangs."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends (a crash: recovery on the next start)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def restart(self) -> None:
        """Stop and start on the same port and data: the data stays."""
        self.stop()
        deadline = time.monotonic() + 10
        while port_is_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.start()

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- databases ----------------------------------------------------------------------

    def create_database(self, name: str) -> str:
        """Create database ``name`` (dropped first if it exists); returns its URL."""
        import psycopg  # noqa: PLC0415 - optional: only the PostgreSQL tests need it

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def __repr__(self) -> str:
        return f"<PostgresServer port={self.port} pid={self.pid} bin={self.bin_dir}>"
