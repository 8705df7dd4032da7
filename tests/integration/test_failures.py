"""Items 8, 9 and 11: exceptions, retries and results that cannot be kept."""

from __future__ import annotations

import json
import sys
from types import ModuleType

import pytest
import redis

from celery_idem import IdempotencyConfigError, ResultNotStored
from celery_idem.checks import MAX_DURATION
from devtools.processes import wait_for
from tests.integration.conftest import Worker, ledger_count

pytestmark = pytest.mark.integration
T = 30


def test_exception_releases_the_key_so_the_next_delivery_runs(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    with pytest.raises(ValueError, match="transient"):
        tasks.fail_first.apply_async((uid,), queue=worker.queue).get(timeout=T)
    assert tasks.fail_first.apply_async((uid,), queue=worker.queue).get(timeout=T) == f"{uid} ok"
    assert ledger_count(ledger, uid) == 2
    # ...and once it succeeded, it is not run again.
    assert tasks.fail_first.apply_async((uid,), queue=worker.queue).get(timeout=T) == f"{uid} ok"
    assert ledger_count(ledger, uid) == 2


def test_error_listed_in_idem_cache_errors_is_stored_and_reraised(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    for _ in range(3):
        with pytest.raises(tasks.PaymentDeclined, match=f"card declined for {uid}"):
            tasks.declined.apply_async((uid,), queue=worker.queue).get(timeout=T)
    assert ledger_count(ledger, uid) == 1


def test_self_retry_reclaims_and_a_duplicate_between_attempts_does_not_run(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    key = f"retry-{uid}"
    first = tasks.retry_once.apply_async((uid, 3.0), idempotency_key=key, queue=worker.queue)
    # Wait until the first attempt has run and asked for its retry (3 s away).
    wait_for(lambda: ledger_count(ledger, uid) == 1, timeout=T, message="first attempt")
    wait_for(lambda: first.state == "RETRY", timeout=T, message="retry state")
    dup = tasks.retry_once.apply_async((uid, 3.0), idempotency_key=key, queue=worker.queue)
    out = first.get(timeout=T)
    assert out["retries"] == 1
    first_fence = json.loads(ledger.lindex(f"ledger:{uid}", 0))["fence"]
    assert out["fence"] > first_fence  # the retry re-claimed the key: the fence grew
    assert dup.get(timeout=T) == out
    assert ledger_count(ledger, uid) == 2  # attempt 1 and its retry; the duplicate ran nothing


def test_autoretry_for_reclaims_the_key(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    res = tasks.autoretry.apply_async((uid,), queue=worker.queue)
    assert res.get(timeout=T) == f"{uid} after 1 retries"
    assert ledger_count(ledger, uid) == 2
    again = tasks.autoretry.apply_async((uid,), queue=worker.queue)
    assert again.get(timeout=T) == f"{uid} after 1 retries"
    assert ledger_count(ledger, uid) == 2


def test_unserializable_result_completes_without_result_and_never_reruns(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    first = tasks.unserializable.apply_async((uid,), queue=worker.queue)
    with pytest.raises(Exception):  # noqa: B017,PT011 - Celery's own backend cannot encode it either
        first.get(timeout=T)
    dup = tasks.unserializable.apply_async((uid,), queue=worker.queue)
    with pytest.raises(ResultNotStored, match="was not stored") as info:
        dup.get(timeout=T)
    assert "will not run again" in str(info.value)
    assert ledger_count(ledger, uid) == 1


def test_oversized_result_completes_without_result(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    assert tasks.big.apply_async((uid, 5000), queue=worker.queue).get(timeout=T) == "x" * 5000
    dup = tasks.big.apply_async((uid, 5000), queue=worker.queue)
    with pytest.raises(ResultNotStored, match="idem_max_result_bytes"):
        dup.get(timeout=T)
    assert ledger_count(ledger, uid) == 1


def test_a_call_option_redis_cannot_hold_is_refused_by_name_and_runs_nothing(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> None:
    # From another producer, as a raw header (apply_async would refuse it at the call
    # site). It used to reach Redis, fail there as "value is not an integer or out of
    # range" and be blamed on another application writing under idem_key_prefix.
    res = tasks.app.send_task(
        "t.record", (uid, 0), queue=worker.queue, headers={"idem_ttl": sys.maxsize}
    )
    with pytest.raises(
        IdempotencyConfigError, match=rf"idem_ttl from call option .*<= {MAX_DURATION}"
    ):
        res.get(timeout=T)
    assert ledger_count(ledger, uid) == 0
