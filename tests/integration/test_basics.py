"""Items 1-4 of the foundation issue on a real prefork worker and a real Redis."""

from __future__ import annotations

from types import ModuleType

import pytest
import redis

from celery_idem import IdempotencyKeyMismatch
from tests.integration.conftest import Worker, ledger_count

pytestmark = pytest.mark.integration
T = 30  # seconds any one result may take


def test_duplicate_of_completed_key_replays_without_running(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    first = tasks.record.apply_async((uid, 1), queue=worker.queue).get(timeout=T)
    dup = tasks.record.apply_async((uid, 1), queue=worker.queue)
    assert dup.get(timeout=T) == first
    assert dup.state == "SUCCESS"
    assert ledger_count(ledger, uid) == 1


def test_positional_and_keyword_calls_share_one_key(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    a = tasks.record.apply_async((uid, 5), queue=worker.queue).get(timeout=T)
    b = tasks.record.apply_async(kwargs={"value": 5, "name": uid, "pause": 0.0}, queue=worker.queue)
    assert b.get(timeout=T) == a
    assert ledger_count(ledger, uid) == 1


def test_explicit_key_beats_derivation_and_same_key_other_args_is_a_mismatch(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    key = f"evt-{uid}"
    first = tasks.record.apply_async((uid, 1), idempotency_key=key, queue=worker.queue)
    assert first.get(timeout=T)["key"] == key
    clash = tasks.record.apply_async((uid, 2), idempotency_key=key, queue=worker.queue)
    with pytest.raises(IdempotencyKeyMismatch) as info:
        clash.get(timeout=T)
    assert key in str(info.value)
    assert ledger_count(ledger, uid) == 1
    # The record is untouched: the same arguments still replay the first result.
    again = tasks.record.apply_async((uid, 1), idempotency_key=key, queue=worker.queue)
    assert again.get(timeout=T) == first.get(timeout=T)


def test_signature_set_and_send_task_header_carry_the_key(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    key = f"evt-{uid}"
    via_set = tasks.send_email.s(7, uid).set(idempotency_key=key, queue=worker.queue).delay()
    text = via_set.get(timeout=T)
    assert key in text
    via_header = tasks.app.send_task(
        "t.send_email", (7, uid), headers={"idempotency_key": key}, queue=worker.queue
    )
    assert via_header.get(timeout=T) == text
    assert ledger_count(ledger, f"email:7:{uid}") == 1


def test_template_rule_and_callable_rule(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    one = tasks.send_email.apply_async((8, uid), {"body": "a"}, queue=worker.queue)
    assert f"8:{uid}" in one.get(timeout=T)
    # The template ignores `body`, but the arguments fingerprint does not: a mismatch.
    two = tasks.send_email.apply_async((8, uid), {"body": "b"}, queue=worker.queue)
    with pytest.raises(IdempotencyKeyMismatch):
        two.get(timeout=T)
    name = f"welcome-{uid}"
    w1 = tasks.welcome.apply_async((uid, name), queue=worker.queue).get(timeout=T)
    w2 = tasks.welcome.apply_async(kwargs={"user_id": uid, "ledger_name": name}, queue=worker.queue)
    assert w2.get(timeout=T) == w1
    assert ledger_count(ledger, name) == 1
    assert ledger_count(ledger, f"email:8:{uid}") == 1


def test_same_key_on_two_tasks_does_not_collide(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    key = f"shared-{uid}"
    r = tasks.record.apply_async((uid,), idempotency_key=key, queue=worker.queue)
    f = tasks.fail_first.apply_async((uid + "-f",), idempotency_key=key, queue=worker.queue)
    assert r.get(timeout=T)["name"] == uid
    with pytest.raises(ValueError, match="transient"):
        f.get(timeout=T)
    assert ledger_count(ledger, uid) == 1
    assert ledger_count(ledger, uid + "-f") == 1
