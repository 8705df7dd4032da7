"""The example of docs/keys.md ("Explicit keys", ``docs/examples/webhook_events.py``) holds.

The page says two deliveries of one event that differ in a delivery counter and a
timestamp are one request. Here the file runs as a user would run it: a real worker
(``celery -A webhook_events worker``) and the file's own ``__main__`` sending the two
deliveries, which asserts that the resend answers with the first email's message id (a
second run would mint another). Then the same task is shown to refuse another
customer's data under the same event id, and to refuse the resend without
``idem_fingerprint``.

The example names ``redis://localhost:6379``; Celery's environment variables
``CELERY_BROKER_URL`` and ``CELERY_RESULT_BACKEND`` override it with the suite's own
redis-server (checked before anything starts), never a Redis on 6379.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis

from celery_idem import IdempotencyKeyMismatch
from celery_idem.config import resolve_settings
from celery_idem.keys import storage_key
from celery_idem.task import invalidate_settings
from tests.integration.conftest import Worker, with_db

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples"
EXAMPLE = EXAMPLES / "webhook_events.py"
PAGE = ROOT / "docs" / "keys.md"
BROKER_DB, BACKEND_DB = 7, 8
"""Databases of the suite's redis-server no other test uses: the example's queue is
Celery's default one, ``celery``, and its records are under the default prefix."""
T = 30


def test_the_page_shows_this_file() -> None:
    assert '--8<-- "docs/examples/webhook_events.py"' in PAGE.read_text(encoding="utf-8")


@pytest.fixture
def example_env(redis_url: str) -> Iterator[dict[str, str]]:
    env = {
        "CELERY_BROKER_URL": with_db(redis_url, BROKER_DB),
        "CELERY_RESULT_BACKEND": with_db(redis_url, BACKEND_DB),
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    invalidate_settings()
    try:
        yield env
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        invalidate_settings()


@pytest.fixture
def example(example_env: dict[str, str]) -> ModuleType:
    """The example module, loaded as the worker loads it, pointing at the suite's Redis."""
    spec = importlib.util.spec_from_file_location("webhook_events", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    conf = module.app.conf
    store = resolve_settings(conf).redis_url
    assert (conf.broker_url, store) == (
        example_env["CELERY_BROKER_URL"],
        example_env["CELERY_RESULT_BACKEND"],
    ), "the example must not reach the Redis it names on localhost:6379"
    return module


@pytest.fixture
def example_worker(example_env: dict[str, str], example: ModuleType) -> Iterator[Worker]:
    # A previous run against the same REDIS_URL server left evt_123 completed: start
    # from nothing, so the run below proves something.
    backend = redis.Redis.from_url(example_env["CELERY_RESULT_BACKEND"])
    try:
        backend.delete(storage_key("idem", "shop.on_customer_created", "evt_123"))
    finally:
        backend.close()
    worker = Worker(
        example_env, app="webhook_events", queue="celery", extra_env={"PYTHONPATH": str(EXAMPLES)}
    ).start()
    yield worker
    worker.stop()


def _delivery(attempt: int, email: str = "ada@example.com") -> dict[str, Any]:
    customer = {"object": {"id": "cus_1", "email": email}}
    return {"id": "evt_123", "delivery_attempt": attempt, "data": customer}


def test_the_resend_of_an_event_gets_the_first_emails_message_id(
    example_env: dict[str, str], example: ModuleType, example_worker: Worker
) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        cwd=EXAMPLES,
        env={**os.environ, **example_env},
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, (done.stdout, done.stderr, example_worker.log()[-3000:])
    message_id = done.stdout.strip()
    assert message_id.endswith("@shop.example>")

    # A third delivery, sent from here: the same message id, still one email.
    third = example.receive(_delivery(3), "10:09:00")
    assert third.get(timeout=T) == message_id
    # What a resend does not change is still the request: another customer is refused.
    clash = example.receive(_delivery(4, "bob@example.com"), "10:10:00")
    with pytest.raises(IdempotencyKeyMismatch):
        clash.get(timeout=T)

    # Without idem_fingerprint (every argument is the request) the resend is refused: the
    # page's promise needs the setting. Per call, False turns the check off and
    # True puts every argument back in it.
    strict = example.on_customer_created.apply_async(
        (_delivery(5), "10:11:00"), idempotency_key="evt_123", idem_fingerprint=True
    )
    with pytest.raises(IdempotencyKeyMismatch):
        strict.get(timeout=T)
