"""Eager mode (issue item 12): the idempotency protocol under ``.apply()`` and always-eager.

Every test runs twice through the ``env`` fixture: once against the in-process
``MemoryStore`` (``celery_idem.testing.use_memory_store``) and once against the suite's
own redis-server (db 5, a per-test key prefix that ``key_prefix`` deletes afterwards).
Each test builds its own Celery app and registers its tasks on it only (``shared=False``),
so no task, setting or record leaks into another test.
"""

from __future__ import annotations

from typing import Any

import pytest
from celery import group
from celery.result import EagerResult

from celery_idem import (
    IdempotencyConfigError,
    IdempotencyKeyMismatch,
    InvalidIdempotencyKey,
    ResultNotStored,
)
from celery_idem.config import DEFAULTS
from celery_idem.keys import MAX_KEY_LENGTH
from celery_idem.store import RecordKind
from celery_idem.task import invalidate_settings
from tests.unit.conftest import Env

_ABSENT = object()


class Declined(Exception):
    """A business failure a task caches with ``idem_cache_errors``."""


# --------------------------------------------------------------------------- running once


def test_apply_twice_with_the_same_key_runs_the_body_once(env: Env) -> None:
    runs: list[int] = []

    @env.task()
    def once(x: int) -> str:
        runs.append(x)
        return f"{x}-run{len(runs)}"  # a re-run would return another value

    first = once.apply((3,), idempotency_key="K-once")
    second = once.apply((3,), idempotency_key="K-once")

    assert first.get() == "3-run1"
    assert second.get() == first.get()
    assert runs == [3]
    assert first.id != second.id
    record = env.record(once, "K-once")
    assert record is not None
    assert record.stored is not None
    assert record.stored.kind is RecordKind.RESULT
    assert record.task_id == first.id


def test_delay_under_always_eager_runs_same_arguments_once(env: Env) -> None:
    runs: list[tuple[int, int]] = []

    @env.task()
    def by_args(x: int, y: int = 0) -> list[int]:
        runs.append((x, y))
        return [x, y, len(runs)]

    a = by_args.delay(1, y=2)
    b = by_args.delay(1, y=2)
    c = by_args.delay(1, y=3)

    assert a.get() == [1, 2, 1]
    assert b.get() == a.get()
    assert c.get() == [1, 3, 2]
    assert runs == [(1, 2), (1, 3)]


def test_plain_call_bypasses_the_protocol(env: Env) -> None:
    seen: list[tuple[str | None, int | None]] = []

    @env.task(bind=True)
    def plain(self: Any, x: int) -> int:
        seen.append((self.idempotency_key, self.idempotency_fence))
        return x * 100 + len(seen)

    first = plain(1)
    second = plain(1)

    assert not isinstance(first, EagerResult)
    assert (first, second) == (101, 102)
    assert seen == [(None, None), (None, None)]
    # The plain calls left no record: the first protocol run still runs the body ...
    applied = plain.apply((1,))
    assert applied.get() == 103
    # ... and the protocol replays from then on.
    assert plain.apply((1,)).get() == 103
    assert len(seen) == 3


def test_same_key_other_arguments_raises_mismatch_and_does_not_run(env: Env) -> None:
    runs: list[int] = []

    @env.task()
    def pay(amount: int) -> int:
        runs.append(amount)
        return amount

    first = pay.apply((10,), idempotency_key="K-pay")
    assert first.get() == 10
    second = pay.apply((99,), idempotency_key="K-pay")

    with pytest.raises(IdempotencyKeyMismatch) as info:
        second.get()
    assert info.value.key == "K-pay"
    assert info.value.task_name == pay.name
    assert first.id in str(info.value)
    assert runs == [10]
    record = env.record(pay, "K-pay")
    assert record is not None
    assert record.task_id == first.id


# --------------------------------------------------------------------------- key, fence, failures


def test_key_and_fence_are_visible_in_a_bound_body_and_the_fence_only_grows(env: Env) -> None:
    attempts: list[tuple[str | None, int | None]] = []

    @env.task(bind=True)
    def flaky(self: Any, x: int) -> int:
        attempts.append((self.idempotency_key, self.idempotency_fence))
        if len(attempts) == 1:
            raise RuntimeError("first attempt fails")
        return x

    failed = flaky.apply((5,), idempotency_key="K-fence")
    assert failed.failed()
    succeeded = flaky.apply((5,), idempotency_key="K-fence")
    assert succeeded.get() == 5
    replayed = flaky.apply((5,), idempotency_key="K-fence")
    assert replayed.get() == 5

    assert [key for key, _ in attempts] == ["K-fence", "K-fence"]
    first_fence, second_fence = (fence for _, fence in attempts)
    assert first_fence is not None
    assert second_fence is not None
    assert second_fence > first_fence
    record = env.record(flaky, "K-fence")
    assert record is not None
    assert record.fence == second_fence


def test_exception_releases_the_key_for_the_next_run(env: Env) -> None:
    runs: list[int] = []

    @env.task()
    def fails_once(x: int) -> int:
        runs.append(x)
        if len(runs) == 1:
            raise ConnectionError("downstream flaked")
        return x * 2

    first = fails_once.apply((4,), idempotency_key="K-release")
    with pytest.raises(ConnectionError, match="downstream flaked"):
        first.get()
    released = env.record(fails_once, "K-release")
    assert released is not None
    assert released.stored is None
    assert released.fence > 0  # released, but the fence is kept

    second = fails_once.apply((4,), idempotency_key="K-release")
    assert second.get() == 8
    completed = env.record(fails_once, "K-release")
    assert completed is not None
    assert completed.fence > released.fence
    assert runs == [4, 4]


def test_cached_error_type_is_re_raised_to_a_duplicate_without_running(env: Env) -> None:
    runs: list[int] = []

    @env.task(idem_cache_errors=(Declined,))
    def charge(card: int) -> None:
        runs.append(card)
        raise Declined(f"card {card} declined")

    first = charge.apply((7,), idempotency_key="K-declined")
    with pytest.raises(Declined, match="card 7 declined"):
        first.get()
    duplicate = charge.apply((7,), idempotency_key="K-declined")
    with pytest.raises(Declined, match="card 7 declined"):
        duplicate.get()

    assert runs == [7]
    record = env.record(charge, "K-declined")
    assert record is not None
    assert record.stored is not None
    assert record.stored.kind is RecordKind.ERROR


def test_self_retry_runs_eagerly_then_a_duplicate_replays(env: Env) -> None:
    runs: list[tuple[int, int | None]] = []

    @env.task(bind=True, max_retries=3, default_retry_delay=0)
    def retried(self: Any, x: int) -> int:
        runs.append((self.request.retries, self.idempotency_fence))
        if len(runs) == 1:
            raise self.retry(countdown=0)
        return x * 10

    result = retried.apply((4,), idempotency_key="K-retry")
    assert result.get() == 40
    assert [retries for retries, _ in runs] == [0, 1]
    first_fence, retry_fence = runs[0][1], runs[1][1]
    assert first_fence is not None
    assert retry_fence is not None
    assert retry_fence > first_fence

    duplicate = retried.apply((4,), idempotency_key="K-retry")
    assert duplicate.get() == 40
    assert len(runs) == 2


# --------------------------------------------------------------------------- results not kept


def test_unserializable_result_is_returned_once_then_duplicates_get_result_not_stored(
    env: Env,
) -> None:
    made: list[object] = []

    @env.task()
    def unserializable(x: int) -> object:
        made.append(object())
        return made[-1]

    assert env.app.conf.result_serializer == "json"
    first = unserializable.apply((1,), idempotency_key="K-obj")
    assert first.get() is made[0]

    duplicate = unserializable.apply((1,), idempotency_key="K-obj")
    with pytest.raises(ResultNotStored) as info:
        duplicate.get()
    assert info.value.key == "K-obj"
    assert len(made) == 1
    record = env.record(unserializable, "K-obj")
    assert record is not None
    assert record.stored is not None
    assert record.stored.kind is RecordKind.NO_RESULT


def test_result_over_max_bytes_is_returned_once_then_duplicates_get_result_not_stored(
    env: Env,
) -> None:
    runs: list[int] = []

    @env.task(idem_max_result_bytes=16)
    def big(n: int) -> str:
        runs.append(n)
        return "x" * n

    assert big.apply((100,), idempotency_key="K-big").get() == "x" * 100
    with pytest.raises(ResultNotStored, match="idem_max_result_bytes"):
        big.apply((100,), idempotency_key="K-big").get()
    assert runs == [100]


# --------------------------------------------------------------------------- call site


@pytest.mark.parametrize(
    "headers",
    [_ABSENT, None, {}, {"x-trace": "t-1"}],
    ids=["absent", "none", "empty", "other-header"],
)
def test_apply_async_accepts_headers_absent_none_or_empty_with_a_key(
    env: Env, headers: Any
) -> None:
    seen: list[tuple[str | None, Any]] = []

    @env.task(bind=True)
    def hdr(self: Any, x: int) -> int:
        seen.append((self.idempotency_key, (self.request.headers or {}).get("x-trace")))
        return x + len(seen)

    options: dict[str, Any] = {} if headers is _ABSENT else {"headers": headers}
    before = dict(headers) if isinstance(headers, dict) else headers

    first = hdr.apply_async((2,), idempotency_key="K-hdr", **options)
    second = hdr.apply_async((2,), idempotency_key="K-hdr", **options)

    assert first.get() == 3
    assert second.get() == 3
    trace = headers.get("x-trace") if isinstance(headers, dict) else None
    assert seen == [("K-hdr", trace)]
    assert headers == before  # the caller's headers dict is not modified


@pytest.mark.parametrize("headers", [_ABSENT, None, {}], ids=["absent", "none", "empty"])
def test_apply_async_accepts_headers_absent_none_or_empty_without_a_key(
    env: Env, headers: Any
) -> None:
    runs: list[int] = []

    @env.task()
    def nokey(x: int) -> int:
        runs.append(x)
        return x

    options: dict[str, Any] = {} if headers is _ABSENT else {"headers": headers}
    assert nokey.apply_async((6,), **options).get() == 6
    assert nokey.apply_async((6,), **options).get() == 6
    assert runs == [6]


@pytest.mark.parametrize("call", ["apply", "apply_async"])
@pytest.mark.parametrize(
    "bad", ["", "k" * (MAX_KEY_LENGTH + 1), 42], ids=["empty", "too-long", "int"]
)
def test_invalid_explicit_key_raises_at_the_call_site_before_running(
    env: Env, call: str, bad: object
) -> None:
    runs: list[int] = []

    @env.task()
    def guarded(x: int) -> int:
        runs.append(x)
        return x

    with pytest.raises(InvalidIdempotencyKey) as info:
        getattr(guarded, call)((1,), idempotency_key=bad)
    assert info.value.task_name == guarded.name
    assert info.value.key == bad  # as given, not its repr
    assert "(from the call site)" in str(info.value)
    assert runs == []


def test_key_of_exactly_max_length_is_accepted(env: Env) -> None:
    runs: list[int] = []

    @env.task()
    def longest(x: int) -> int:
        runs.append(x)
        return x

    key = "k" * MAX_KEY_LENGTH
    assert longest.apply((1,), idempotency_key=key).get() == 1
    assert longest.apply((1,), idempotency_key=key).get() == 1
    assert runs == [1]


# --------------------------------------------------------------------------- configuration


def test_task_option_typo_fails_at_first_use_naming_it(env: Env) -> None:
    runs: list[int] = []

    @env.task(idem_tll=5)
    def typo(x: int) -> int:
        runs.append(x)
        return x

    with pytest.raises(IdempotencyConfigError) as info:  # at the call, as apply_async does
        typo.apply((1,), idempotency_key="K-typo")
    assert "idem_tll" in str(info.value)
    assert "idem_ttl" in str(info.value)  # the suggestion
    assert info.value.task_name == typo.name
    assert runs == []


@pytest.mark.parametrize(
    ("app_ttl", "task_ttl", "call_ttl"),
    [
        (None, None, None),
        (3600, None, None),
        (3600, 600, None),
        (3600, 600, 30),
        (None, None, 30),
    ],
    ids=["default", "app", "task-over-app", "call-over-task", "call-over-default"],
)
def test_ttl_precedence_call_over_task_over_app_over_default(
    env: Env, app_ttl: int | None, task_ttl: int | None, call_ttl: int | None
) -> None:
    if app_ttl is not None:
        env.app.conf.idem_ttl = app_ttl
        invalidate_settings()
    task_options = {} if task_ttl is None else {"idem_ttl": task_ttl}
    call_options = {} if call_ttl is None else {"idem_ttl": call_ttl}

    @env.task(**task_options)
    def kept(x: int) -> int:
        return x

    assert kept.apply((1,), idempotency_key="K-ttl", **call_options).get() == 1

    default_ttl = DEFAULTS["idem_ttl"]
    assert isinstance(default_ttl, int)
    resolved_without_call = next(t for t in (task_ttl, app_ttl, default_ttl) if t is not None)
    assert kept.idem_spec().settings.ttl == resolved_without_call
    expected = call_ttl if call_ttl is not None else resolved_without_call
    record = env.record(kept, "K-ttl")
    assert record is not None
    assert record.ttl is not None
    assert expected - 5 < record.ttl <= expected


def test_call_level_key_prefix_is_rejected(env: Env) -> None:
    runs: list[int] = []

    @env.task()
    def prefixed(x: int) -> int:
        runs.append(x)
        return x

    with pytest.raises(IdempotencyConfigError, match="idem_key_prefix"):
        prefixed.apply((1,), idempotency_key="K-prefix", idem_key_prefix="other")
    with pytest.raises(IdempotencyConfigError, match="idem_key_prefix"):
        prefixed.apply_async((1,), idempotency_key="K-prefix", idem_key_prefix="other")
    assert runs == []
    assert env.record(prefixed, "K-prefix") is None


def test_call_level_option_typo_is_rejected_at_the_call_site(env: Env) -> None:
    runs: list[int] = []

    @env.task()
    def typo_call(x: int) -> int:
        runs.append(x)
        return x

    with pytest.raises(IdempotencyConfigError, match="idem_tll"):
        typo_call.apply((1,), idempotency_key="K-typo-call", idem_tll=5)
    assert runs == []


# --------------------------------------------------------------------------- canvas


def test_group_with_a_call_key_gives_each_member_its_own_record(env: Env) -> None:
    runs: list[tuple[int, str | None]] = []

    @env.task(bind=True)
    def member(self: Any, x: int) -> int:
        runs.append((x, self.idempotency_key))
        return x * 10

    result = group(member.s(1), member.s(2)).apply_async(idempotency_key="K-group")

    assert result.get() == [10, 20]
    assert sorted(x for x, _ in runs) == [1, 2]
    keys = [key for _, key in runs]
    assert None not in keys
    assert len(set(keys)) == 2
    for key in keys:
        assert key is not None
        record = env.record(member, key)
        assert record is not None
        assert record.stored is not None
        assert record.stored.kind is RecordKind.RESULT


def test_group_run_again_with_the_same_key_replays_every_member(env: Env) -> None:
    runs: list[int] = []

    @env.task()
    def member(x: int) -> list[int]:
        runs.append(x)
        return [x, len(runs)]

    first = group(member.s(1), member.s(2)).apply_async(idempotency_key="K-group-again")
    first_values = first.get()
    again = group(member.s(1), member.s(2)).apply_async(idempotency_key="K-group-again")

    assert again.get() == first_values
    assert sorted(runs) == [1, 2]


# --------------------------------------------------------------------------- composition


def test_first_call_and_duplicates_get_the_same_value_after_the_result_serializer(
    env: Env,
) -> None:
    # On a worker both go through the result backend; eagerly they must agree too.
    @env.task()
    def shaped(x: int) -> Any:
        return (x, {1: "one"})

    first = shaped.apply((1,)).get()
    again = shaped.apply((1,)).get()
    assert first == again == [1, {"1": "one"}]


def test_retry_without_throw_eagerly_retries_under_the_parked_key(env: Env) -> None:
    # Celery's own test_retry_without_throw_eager, with IdempotentTask.
    attempts: list[int] = []

    @env.task(bind=True, max_retries=3)
    def flaky(self: Any, n: int) -> Any:
        attempts.append(self.request.retries)
        if self.request.retries < 3:
            return self.retry(exc=ValueError("not yet"), countdown=0, throw=False)
        return 42

    assert flaky.apply((1,)).get() == 42
    assert attempts == [0, 1, 2, 3]
    assert flaky.apply((1,)).get() == 42  # a duplicate replays; nothing runs again
    assert attempts == [0, 1, 2, 3]


def test_apply_accepts_headers_that_are_not_a_mapping_as_celery_does(env: Env) -> None:
    @env.task()
    def plain(x: int) -> int:
        return x + 1

    assert plain.apply((1,), headers=[("a", 1)]).get() == 2
    assert plain.apply((2,), headers="not headers").get() == 3


def test_a_retry_with_arguments_that_have_no_canonical_encoding_keeps_its_key(
    env: Env,
) -> None:
    seen: list[Any] = []

    @env.task(bind=True, max_retries=2)
    def paged(self: Any, page: Any) -> str:
        seen.append(page)
        if len(seen) == 1:
            raise self.retry(args=(object(),), countdown=0)  # no canonical encoding
        return "done"

    assert paged.apply((1,)).get() == "done"
    assert len(seen) == 2
    assert paged.apply((1,)).get() == "done"  # the original request's key holds the result
    assert len(seen) == 2


def test_replace_eagerly_completes_the_key_with_the_replacements_value(env: Env) -> None:
    runs: list[str] = []

    @env.task()
    def target(n: int) -> int:
        runs.append("target")
        return n * 10

    @env.task(bind=True)
    def replaced(self: Any, n: int) -> Any:
        runs.append("replaced")
        return self.replace(target.s(n))

    assert replaced.apply((4,), idempotency_key="R").get() == 40
    assert replaced.apply((4,), idempotency_key="R").get() == 40
    assert runs == ["replaced", "target"]
