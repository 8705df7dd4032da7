"""Real worker processes for the integration tests.

``Worker`` runs ``celery -A tests.integration.tasks worker`` as a subprocess in its own
process group, on its own queue, against the suite's redis-server (broker, result
backend, store and effect ledger in separate databases). The test process builds the
same app from the same environment to send tasks and read results.

Every test here runs once per store topology (``store_topology``): the suite's
redis-server, a Redis Cluster (marker ``cluster``) and a Sentinel deployment (marker
``sentinel``, with ``idem_min_replicas=1``). Only the idempotency store moves; broker,
backend and ledger stay on the suite's redis-server.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from celery_idem.task import invalidate_settings
from devtools.processes import wait_for

ROOT = Path(__file__).resolve().parents[2]
BROKER_DB, BACKEND_DB, STORE_DB, LEDGER_DB = 1, 2, 3, 4


def ledger_count(client: redis.Redis, name: str) -> int:
    """How many times a body really ran for ``name`` (see ``tasks.effect``)."""
    return int(client.llen(f"ledger:{name}"))


def with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, ""))


class Worker:
    """One celery worker subprocess consuming its own queue."""

    def __init__(
        self,
        env: dict[str, str],
        *,
        pool: str = "prefork",
        concurrency: int = 2,
        extra_env: dict[str, str] | None = None,
        app: str = "tests.integration.tasks",
        queue: str | None = None,
    ) -> None:
        self.app = app
        self.queue = queue or f"q-{uuid.uuid4().hex[:10]}"
        self.env = {**os.environ, **env, **(extra_env or {})}
        self.env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(ROOT), self.env.get("PYTHONPATH")])
        )
        self.pool = pool
        self.concurrency = concurrency
        self.proc: subprocess.Popen[bytes] | None = None
        self._logdir = tempfile.mkdtemp(prefix="idem-worker-")
        self.logfile = Path(self._logdir) / "worker.log"

    def start(self) -> Worker:
        cmd = [
            sys.executable, "-m", "celery", "-A", self.app, "worker",
            "-P", self.pool, "-c", str(self.concurrency), "-Q", self.queue,
            "-n", f"{self.queue}-{uuid.uuid4().hex[:6]}@%h", "-l", "INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        wait_for(
            lambda: "ready." in self.log() or self.proc.poll() is not None,  # type: ignore[union-attr]
            timeout=60,
            message=f"worker start; log:\n{self.log()[-3000:]}",
        )
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited at start:\n{self.log()[-3000:]}")
        return self

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def children(self) -> list[int]:
        assert self.proc is not None
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [int(p) for p in path.read_text().split()]
        except FileNotFoundError:
            return []

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and children)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


STORE_TOPOLOGIES = [
    "standalone",
    pytest.param("cluster", marks=pytest.mark.cluster),
    pytest.param("sentinel", marks=pytest.mark.sentinel),
]


@pytest.fixture(scope="session", params=STORE_TOPOLOGIES)
def store_topology(request: pytest.FixtureRequest) -> str:
    """Where the idempotency store lives for this run of the integration tests."""
    return str(request.param)


def standalone_only(store_topology: str, why: str) -> None:
    """Skip the Cluster and Sentinel runs of a test whose subject is not the store."""
    if store_topology != "standalone":
        pytest.skip(f"{why}: the standalone run is enough")


@pytest.fixture(scope="session")
def celery_env(
    redis_url: str, store_topology: str, request: pytest.FixtureRequest
) -> dict[str, str]:
    """Environment shared by the test process's app and every worker."""
    store = with_db(redis_url, STORE_DB)
    if store_topology == "cluster":
        store = request.getfixturevalue("cluster_store_url")
    elif store_topology == "sentinel":
        # With idem_min_replicas=1: every claim and completion WAITs for the replica.
        store = request.getfixturevalue("sentinel_store_url")
    env = {
        "IDEM_TEST_MIN_REPLICAS": "1" if store_topology == "sentinel" else "0",
        "IDEM_TEST_BROKER": with_db(redis_url, BROKER_DB),
        "IDEM_TEST_BACKEND": with_db(redis_url, BACKEND_DB),
        "IDEM_TEST_STORE": store,
        "IDEM_TEST_LEDGER": with_db(redis_url, LEDGER_DB),
    }
    os.environ.update(env)
    return env


@pytest.fixture(scope="session")
def tasks(celery_env: dict[str, str]) -> ModuleType:
    """``tests.integration.tasks``, imported after the environment is set.

    Imported once; on each topology its app is pointed at that topology's store.
    """
    module = importlib.import_module("tests.integration.tasks")
    module.app.conf.idem_redis_url = celery_env["IDEM_TEST_STORE"]
    module.app.conf.idem_min_replicas = int(celery_env["IDEM_TEST_MIN_REPLICAS"])
    invalidate_settings()
    return module


@pytest.fixture(scope="session")
def worker(celery_env: dict[str, str], tasks: ModuleType) -> Iterator[Worker]:
    """A prefork worker (2 children) shared by the tests that need no special setup."""
    w = Worker(celery_env).start()
    yield w
    w.stop()


@pytest.fixture
def start_worker(celery_env: dict[str, str], tasks: ModuleType) -> Iterator[Any]:
    """Factory for workers with their own settings; all are stopped after the test."""
    started: list[Worker] = []

    def start(**kwargs: Any) -> Worker:
        w = Worker(celery_env, **kwargs).start()
        started.append(w)
        return w

    yield start
    for w in started:
        w.kill()


@pytest.fixture
def ledger(celery_env: dict[str, str]) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(celery_env["IDEM_TEST_LEDGER"])
    yield client
    client.close()


@pytest.fixture
def uid() -> str:
    """A fresh name per test, so records and ledgers never collide across tests."""
    return uuid.uuid4().hex[:12]
