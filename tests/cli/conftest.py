"""The CLI under test, run as a subprocess against a private redis-server per test.

``cli.run(...)`` runs ``python -m celery_idem -A tests.cli.app ...`` (or, with
``via="celery"``, ``python -m celery -A tests.cli.app idem ...``) with the test's store
in ``IDEM_CLI_STORE``; ``app`` is ``tests.cli.app`` configured for the same store in
this process, so its tasks (eager) and ``cli.store`` fill the records the CLI reads.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from celery_idem.keys import storage_key
from celery_idem.store import ClaimRequest, CompleteRequest, RecordKind, Stored
from celery_idem.store.redis import RedisStore
from celery_idem.task import invalidate_settings
from devtools.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 60


@dataclass
class Cli:
    """One test's store and a way to run the CLI against it."""

    server: RedisServer
    store: RedisStore
    url: str

    def run(
        self,
        *args: str,
        via: str = "module",
        input: str | None = None,
        env: dict[str, str] | None = None,
        app: str | None = "tests.cli.app",
    ) -> subprocess.CompletedProcess[str]:
        """Run one command; never raises on a non-zero exit (tests check the code)."""
        app_option = ["-A", app] if app else []
        if via == "module":
            cmd = [sys.executable, "-m", "celery_idem", *app_option, *args]
        else:
            cmd = [sys.executable, "-m", "celery", *app_option, "idem", *args]
        full_env = {
            **os.environ,
            "IDEM_CLI_STORE": self.url,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            **(env or {}),
        }
        return subprocess.run(
            cmd,
            cwd=ROOT,
            env=full_env,
            input=input if input is not None else "",
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )

    def json(self, *args: str, via: str = "module", code: int = 0, **kw: Any) -> Any:
        """Run with ``--json``, check the exit status, and parse stdout."""
        done = self.run(*args, "--json", via=via, **kw)
        assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
        return json.loads(done.stdout)

    def key(self, task: str, key: str, prefix: str = "idem") -> str:
        """The storage key of ``key`` of ``task``."""
        return storage_key(prefix, task, key)

    def completed(self, task: str, key: str, payload: bytes = b"3", codec: str = "j") -> str:
        """A completed record written straight through the store; returns its storage key."""
        stored = self.key(task, key)
        token = uuid.uuid4().hex
        task_id = f"id-{key}"
        out = self.store.claim(
            ClaimRequest(stored, token=token, task_id=task_id, fingerprint="", lease=60, ttl=3600)
        )
        result = Stored(RecordKind.RESULT, payload, codec)
        assert self.store.complete(
            CompleteRequest(
                stored, token=token, fence=out.fence, task_id=task_id, stored=result, ttl=3600
            )
        )
        return stored

    def running(self, task: str, key: str, lease: float = 60, token: str | None = None) -> str:
        """A record in progress (a live lease of ``lease`` seconds); returns its storage key.

        ``token`` names the attempt, for a test that then stores its durable steps.
        """
        stored = self.key(task, key)
        self.store.claim(
            ClaimRequest(
                stored,
                token=token or uuid.uuid4().hex,
                task_id=f"id-{key}",
                fingerprint="",
                lease=lease,
                ttl=3600,
            )
        )
        return stored


@pytest.fixture
def cli(store_server: RedisServer) -> Iterator[Cli]:
    url = store_server.url(0)
    store = RedisStore.from_url(url)
    try:
        yield Cli(store_server, store, url)
    finally:
        store.client.close()


@pytest.fixture
def cli_app(cli: Cli) -> Iterator[ModuleType]:
    """``tests.cli.app`` with its tasks on the test's store (eager)."""
    module = importlib.import_module("tests.cli.app")
    module.app.conf.idem_redis_url = cli.url
    invalidate_settings()
    try:
        yield module
    finally:
        module.app.conf.idem_redis_url = "memory://cli-tests"
        invalidate_settings()
