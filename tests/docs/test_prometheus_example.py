"""The Prometheus example of the docs (``docs/examples/prometheus_counters.py``) counts.

The example is loaded from its file, as a user would copy it, with a fresh
``CollectorRegistry`` per test. Tasks run eagerly against the in-memory store
(``celery_idem.testing.use_memory_store``) and trigger the signals for real; the
counters are read back from the registry.
"""

from __future__ import annotations

import importlib.util
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from celery import Celery
from freezegun import freeze_time
from prometheus_client import CollectorRegistry, generate_latest

from celery_idem import (
    DuplicateInProgress,
    IdempotencyKeyMismatch,
    IdempotentTask,
    InProgressPolicy,
    KeyQuarantined,
    ResultNotStored,
)
from celery_idem.config import DEFAULTS
from celery_idem.keys import storage_key
from celery_idem.store import ClaimRequest
from celery_idem.store.memory import MemoryStore
from celery_idem.testing import use_memory_store

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "prometheus_counters.py"


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("prometheus_counters_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load_example()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def counters(registry: CollectorRegistry) -> Iterator[Any]:
    connected = example.IdemCounters(registry).connect()
    try:
        yield connected
    finally:
        connected.disconnect()


@pytest.fixture
def app() -> Celery:
    app = Celery(f"docs-{uuid.uuid4().hex[:8]}", set_as_current=False)
    app.conf.task_always_eager = True
    app.conf.result_serializer = "json"
    return app


@pytest.fixture
def store(app: Celery) -> Iterator[MemoryStore]:
    with use_memory_store(app) as memory:
        yield memory


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A counter's current value (0.0 when the labelled series was never created)."""
    found = registry.get_sample_value(f"celery_idem_{name}_total", labels)
    return 0.0 if found is None else found


def record_key(task: Any, key: str) -> str:
    prefix = DEFAULTS["idem_key_prefix"]
    assert isinstance(prefix, str)
    return storage_key(prefix, task.name, key)


def test_replayed_key_mismatch_and_result_not_stored_are_counted(
    app: Celery, store: MemoryStore, registry: CollectorRegistry, counters: Any
) -> None:
    runs: list[str] = []

    @app.task(base=IdempotentTask, shared=False, name="docs.charge")
    def charge(order_id: int, amount: int) -> dict[str, int]:
        runs.append("charge")
        return {"order_id": order_id, "amount": amount}

    @app.task(base=IdempotentTask, shared=False, name="docs.export")
    def export(report: str) -> object:
        runs.append("export")
        return object()  # the json result serializer cannot store it

    # One run, two duplicates answered from the store.
    first = charge.apply_async((1, 100), idempotency_key="order-1").get()
    assert charge.apply_async((1, 100), idempotency_key="order-1").get() == first
    assert charge.apply_async((1, 100), idempotency_key="order-1").get() == first

    # The same key with other arguments: refused, nothing runs.
    with pytest.raises(IdempotencyKeyMismatch):
        charge.apply_async((1, 999), idempotency_key="order-1").get()

    # A result the serializer refuses: completed without it; a duplicate is told so.
    export.apply_async(("monthly",), idempotency_key="report-1").get()
    with pytest.raises(ResultNotStored):
        export.apply_async(("monthly",), idempotency_key="report-1").get()

    assert runs == ["charge", "export"]
    assert value(registry, "replayed", task="docs.charge") == 2
    assert value(registry, "replayed", task="docs.export") == 1  # the ResultNotStored reply
    assert value(registry, "key_mismatch", task="docs.charge") == 1
    assert value(registry, "key_mismatch", task="docs.export") == 0
    assert value(registry, "result_not_stored", task="docs.export") == 1
    assert value(registry, "result_not_stored", task="docs.charge") == 0
    assert value(registry, "lease_lost", task="docs.charge", stage="complete") == 0

    # The exposition a scraper reads: labelled by task, never by key.
    text = generate_latest(registry).decode()
    assert 'celery_idem_replayed_total{task="docs.charge"} 2.0' in text
    assert 'celery_idem_key_mismatch_total{task="docs.charge"} 1.0' in text
    assert 'celery_idem_result_not_stored_total{task="docs.export"} 1.0' in text
    assert "order-1" not in text
    assert "key=" not in text


def test_duplicate_in_progress_and_lease_lost_are_counted(
    app: Celery, store: MemoryStore, registry: CollectorRegistry, counters: Any
) -> None:
    @app.task(base=IdempotentTask, shared=False, name="docs.send")
    def send(user_id: int) -> str:
        return f"sent:{user_id}"

    @app.task(base=IdempotentTask, shared=False, name="docs.slow")
    def slow(user_id: int) -> str:
        # An operator forgets the record while the body runs: the completion is
        # refused, as for a run whose key was taken over.
        store.forget(record_key(slow, "slow-1"))
        return f"slow:{user_id}"

    # Another attempt holds the key: an eager duplicate cannot wait, it raises.
    store.claim(
        ClaimRequest(
            record_key(send, "welcome-7"),
            token="other-attempt",
            task_id="other-task-id",
            fingerprint="",
            lease=60,
            ttl=60,
        )
    )
    with pytest.raises(DuplicateInProgress):
        send.apply_async((7,), idempotency_key="welcome-7").get()

    assert slow.apply_async((1,), idempotency_key="slow-1").get() == "slow:1"

    policy = InProgressPolicy.RETRY.value
    assert value(registry, "duplicate_in_progress", task="docs.send", policy=policy) == 1
    assert value(registry, "lease_lost", task="docs.slow", stage="complete") == 1
    assert value(registry, "replayed", task="docs.send") == 0


def test_replayed_durable_steps_are_counted(
    app: Celery, store: MemoryStore, registry: CollectorRegistry, counters: Any
) -> None:
    runs: list[str] = []

    @app.task(base=IdempotentTask, bind=True, shared=False, name="docs.checkout")
    def checkout(self: Any, order_id: int) -> str:
        self.step("order", runs.append, "order")
        self.step("charge", runs.append, "charge")
        if runs.count("charge") == 1 and "failed" not in runs:
            runs.append("failed")
            raise TimeoutError("the mail server did not answer")
        return "sent"

    with pytest.raises(TimeoutError):
        checkout.apply_async((1,), idempotency_key="order-1").get()
    assert checkout.apply_async((1,), idempotency_key="order-1").get() == "sent"

    assert runs == ["order", "charge", "failed"]  # the second attempt replayed both steps
    assert value(registry, "step_replayed", task="docs.checkout") == 2
    assert "order-1" not in generate_latest(registry).decode()


def test_a_quarantine_is_counted_once(
    app: Celery, store: MemoryStore, registry: CollectorRegistry, counters: Any
) -> None:
    @app.task(base=IdempotentTask, shared=False, name="docs.poison", idem_max_takeovers=1)
    def poison() -> str:
        return "never"

    key = record_key(poison, "poison-1")
    with freeze_time("2026-01-01") as frozen:
        # Two attempts that died holding the key (their leases ran out): one takeover.
        store.claim(ClaimRequest(key, token="a", task_id="t-a", fingerprint="", lease=1, ttl=60))
        frozen.tick(2)
        claimed = store.claim(
            ClaimRequest(
                key, token="b", task_id="t-b", fingerprint="", lease=1, ttl=60, max_takeovers=1
            )
        )
        assert claimed.took_over
        frozen.tick(2)
        for _ in range(2):  # the second takeover quarantines; the next call is refused too
            with pytest.raises(KeyQuarantined):
                poison.apply_async(idempotency_key="poison-1").get()

    assert value(registry, "quarantined", task="docs.poison") == 1


def test_disconnect_stops_counting(
    app: Celery, store: MemoryStore, registry: CollectorRegistry
) -> None:
    counters = example.IdemCounters(registry).connect()

    @app.task(base=IdempotentTask, shared=False, name="docs.ping")
    def ping() -> str:
        return "pong"

    ping.apply_async(idempotency_key="p").get()
    ping.apply_async(idempotency_key="p").get()
    counters.disconnect()
    ping.apply_async(idempotency_key="p").get()

    assert value(registry, "replayed", task="docs.ping") == 1
