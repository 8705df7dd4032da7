"""The call site (issue #14 items 4, 5 and 14): what ``apply_async``, ``delay``, ``.set()``
and ``apply`` refuse before anything is sent, and what they must leave alone.

Tasks live on a non-eager app whose ``send_task`` is replaced by a recorder, so "nothing
was sent" is observed rather than assumed; the eager variants run on the ``env`` apps of
``tests/unit/conftest.py`` (memory store and the suite's Redis). The worker side of
``idem_require_key`` is run in process the way the worker's tracer calls a task.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from celery_idem import (
    IdempotencyConfigError,
    IdempotentTask,
    InvalidIdempotencyKey,
    MisplacedCallOption,
)
from celery_idem.config import CALL_OPTIONS, check_call_names
from celery_idem.task import invalidate_settings
from celery_idem.testing import use_memory_store
from tests.unit.conftest import Env, Sent
from tests.unit.test_worker_paths import run_as_worker


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery("call-site", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.idem_redis_url = "memory://call-site"
    invalidate_settings()
    yield app
    invalidate_settings()


def make_task(app: Celery, name: str = "cs.task", **options: Any) -> Any:
    def body(x: int, y: int = 0) -> int:
        return x + y

    return app.task(body, base=IdempotentTask, shared=False, name=name, **options)


# --------------------------------------------------------------------------- item 14: the rule


def test_a_broken_key_rule_fails_the_first_publish_and_nothing_is_sent(
    app: Celery, sent: Sent
) -> None:
    broken = make_task(app, idempotency_key="{nope}")
    for call in (
        lambda: broken.delay(1),
        lambda: broken.apply_async((1,)),
        lambda: broken.s(1).delay(),
        lambda: broken.apply_async((1,), idempotency_key="K"),  # a key does not excuse it
    ):
        with pytest.raises(IdempotencyConfigError, match=r"\{nope\}.*not a parameter") as info:
            call()
        assert info.value.task_name == broken.name
    assert sent.calls == []


def test_the_key_rule_is_checked_once_per_process_and_shared_with_the_spec(
    app: Celery, sent: Sent
) -> None:
    task = make_task(app, idempotency_key="{x}")
    task.delay(1)
    rule = task.idem_key_rule()
    task.delay(2)
    assert task.idem_key_rule() is rule  # built once, at the first publish
    assert task.idem_spec().rule is rule
    invalidate_settings()
    assert task.idem_key_rule() is not rule  # rebuilt after the settings are invalidated
    assert len(sent.calls) == 2


# --------------------------------------------------------------------------- item 5: names


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("idempotancy_key", "idempotency_key"),
        ("Idempotency_Key", "idempotency_key"),
        ("indempotency_key", "idempotency_key"),
        ("idempotencykey", "idempotency_key"),
        ("idem_key", "idempotency_key"),
        ("idem_tll", "idem_ttl"),
        ("idm_ttl", "idem_ttl"),
        ("idem_lesae", "idem_lease"),
    ],
)
@pytest.mark.parametrize("how", ["apply_async", "set", "apply"])
def test_a_misspelt_call_option_is_refused_with_a_suggestion_and_nothing_is_sent(
    app: Celery, sent: Sent, name: str, suggestion: str, how: str
) -> None:
    task = make_task(app)
    calls = {
        "apply_async": lambda: task.apply_async((1,), **{name: "k1"}),
        "set": lambda: task.s(1).set(**{name: "k1"}).delay(),
        "apply": lambda: task.apply((1,), **{name: "k1"}),
    }
    with pytest.raises(IdempotencyConfigError) as info:
        calls[how]()
    message = str(info.value)
    assert message.startswith(f"{name} from call option is not a celery-idem call option")
    assert f"did you mean {suggestion!r}?" in message
    assert info.value.task_name == task.name
    assert sent.calls == []


def test_a_setting_that_is_not_per_call_is_refused_naming_it(app: Celery, sent: Sent) -> None:
    task = make_task(app)
    with pytest.raises(IdempotencyConfigError, match="idem_key_prefix cannot be set per call"):
        task.apply_async((1,), idem_key_prefix="other")
    with pytest.raises(IdempotencyConfigError, match=r"did you mean 'idem_key_prefix'\? \(set on"):
        task.apply_async((1,), idem_key_prefx="other")
    assert sent.calls == []


CELERY_OPTIONS = {
    "countdown": 5,
    "eta": None,
    "expires": 60,
    "retry": True,
    "retry_policy": {"max_retries": 1},
    "queue": "q-1",
    "exchange": "ex",
    "routing_key": "rk",
    "priority": 3,
    "serializer": "json",
    "compression": None,
    "add_to_parent": False,
    "time_limit": 10,
    "soft_time_limit": 5,
    "ignore_result": True,
    "reply_to": "r",
    "stamped_headers": None,
    "replaced_task_nesting": 0,
    "delivery_mode": 2,
    "mandatory": False,
    "content_type": "application/json",
    "content_encoding": "utf-8",
    "argsrepr": "(1,)",
    "kwargsrepr": "{}",
    "origin": "web-1",
    "expiration": 30,
    "correlation_id": "c",
    "tenant": "acme",  # a user's own routing or custom option
    "lease_name": "x",
    "identity": "u-1",
    "idx": 1,
}


def test_celerys_own_options_and_a_users_custom_ones_are_left_alone(
    app: Celery, sent: Sent
) -> None:
    check_call_names(CELERY_OPTIONS, task_name="t")
    task = make_task(app)
    task.apply_async((1,), idempotency_key="K", idem_ttl=30, **CELERY_OPTIONS)
    (call,) = sent.calls
    for name, value in CELERY_OPTIONS.items():
        assert call[name] == value, name
    assert call["headers"] == {"idempotency_key": "K", "idem_ttl": 30}


# --------------------------------------------------------------------------- item 5: delay()


@pytest.mark.parametrize("option", CALL_OPTIONS)
def test_a_call_option_given_to_delay_is_a_type_error_that_says_where_it_goes(
    app: Celery, sent: Sent, option: str
) -> None:
    task = make_task(app)
    value = "K" if option == "idempotency_key" else 60
    for call in (
        lambda: task.delay(1, **{option: value}),
        lambda: task.s(1, **{option: value}).delay(),
        lambda: task.apply_async((1,), {option: value}),
        lambda: task.apply((1,), {option: value}),
    ):
        with pytest.raises(TypeError) as info:  # what `except TypeError` always caught
            call()
        assert isinstance(info.value, MisplacedCallOption)
        message = str(info.value)
        assert f"takes no keyword argument {option!r}" in message
        assert f"apply_async(args, kwargs, {option}=...)" in message
        assert f".set({option}=...)" in message
        assert info.value.task_name == task.name
        assert info.value.key == (value if option == "idempotency_key" else None)
    assert sent.calls == []


def test_a_task_that_takes_the_name_as_an_argument_gets_it_as_before(
    app: Celery, sent: Sent
) -> None:
    def named(x: int, idempotency_key: str = "") -> str:
        return idempotency_key

    def flexible(x: int, **extra: Any) -> Any:
        return extra

    for fn in (named, flexible):
        task = app.task(fn, base=IdempotentTask, shared=False, name=f"cs.{fn.__name__}")
        task.delay(1, idempotency_key="an argument")
    assert [call["kwargs"] for call in sent.calls] == [{"idempotency_key": "an argument"}] * 2
    assert all("headers" not in call or not call["headers"] for call in sent.calls)


# --------------------------------------------------------------------------- item 4: require


@pytest.mark.parametrize(
    "call",
    [
        lambda t: t.delay(1),
        lambda t: t.apply_async((1,)),
        lambda t: t.apply_async((1,), idempotency_key=None),
        lambda t: t.s(1).set(idempotency_key=None).delay(),
        lambda t: t.apply_async((1,), headers={"idempotency_key": None}),
        lambda t: t.apply((1,)),
    ],
    ids=["delay", "apply_async", "key-None", "set-None", "header-None", "apply"],
)
def test_require_key_refuses_a_call_without_a_key_before_sending(
    app: Celery, sent: Sent, call: Any
) -> None:
    task = make_task(app, idem_require_key=True)
    with pytest.raises(InvalidIdempotencyKey, match="requires an explicit idempotency") as info:
        call(task)
    assert "idem_require_key" in str(info.value)
    assert info.value.key is None
    assert info.value.task_name == task.name
    assert sent.calls == []


def test_require_key_is_not_a_per_call_setting(app: Celery, sent: Sent) -> None:
    task = make_task(app)
    with pytest.raises(IdempotencyConfigError, match="idem_require_key cannot be set per call"):
        task.apply_async((1,), idempotency_key="K", idem_require_key=True)
    assert sent.calls == []


def test_require_key_lets_every_way_of_giving_a_key_through(app: Celery, sent: Sent) -> None:
    task = make_task(app, idem_require_key=True)
    task.apply_async((1,), idempotency_key="K1")
    task.s(1).set(idempotency_key="K2").delay()
    task.apply_async((1,), headers={"idempotency_key": "K3"})
    assert [call["headers"]["idempotency_key"] for call in sent.calls] == ["K1", "K2", "K3"]


def test_require_key_per_app_and_per_task(app: Celery, sent: Sent) -> None:
    app.conf.idem_require_key = True
    invalidate_settings()
    strict = make_task(app, name="cs.strict")
    lenient = make_task(app, name="cs.lenient", idem_require_key=False)  # task over app
    with pytest.raises(InvalidIdempotencyKey, match=r"cs\.strict"):
        strict.delay(1)
    lenient.delay(1)
    assert len(sent.calls) == 1


def test_a_key_given_in_headers_at_the_call_site_is_checked_there(app: Celery, sent: Sent) -> None:
    task = make_task(app)
    with pytest.raises(InvalidIdempotencyKey, match=r"\(from the call site\) must not be empty"):
        task.apply_async((1,), headers={"idempotency_key": ""})
    assert sent.calls == []


def test_without_require_key_none_means_no_explicit_key(env: Env) -> None:
    runs: list[int] = []

    @env.task(bind=True)
    def derived(self: Any, x: int) -> str:
        runs.append(x)
        return str(self.idempotency_key)

    first = derived.apply((4,), idempotency_key=None).get()
    again = derived.delay(4).get()
    assert again == first  # the key derived from the arguments, both times
    assert len(first) == 32
    assert runs == [4]


def test_require_key_eagerly_runs_with_a_key_and_its_retry_keeps_it(env: Env) -> None:
    runs: list[tuple[str | None, int]] = []

    @env.task(bind=True, idem_require_key=True, max_retries=2)
    def strict(self: Any, x: int) -> int:
        runs.append((self.idempotency_key, self.request.retries))
        if self.request.retries == 0:
            raise self.retry(countdown=0)
        return x

    assert strict.apply((3,), idempotency_key="K-strict").get() == 3
    assert runs == [("K-strict", 0), ("K-strict", 1)]
    with pytest.raises(InvalidIdempotencyKey):
        strict.apply((3,))


def test_require_key_on_the_worker_refuses_a_message_without_the_header(app: Celery) -> None:
    runs: list[int] = []

    def body(x: int) -> int:
        runs.append(x)
        return x

    task = app.task(body, base=IdempotentTask, shared=False, name="cs.w", idem_require_key=True)
    with use_memory_store():
        for headers in ({}, {"idempotency_key": None}):
            with pytest.raises(InvalidIdempotencyKey) as info:
                run_as_worker(task, (1,), "tid-1", **headers)
            message = str(info.value)
            assert "requires an explicit idempotency key (idem_require_key)" in message
            assert "this message carries none in its 'idempotency_key' header" in message
            assert "nothing was run" in message
            assert info.value.key is None
            assert info.value.task_name == "cs.w"
        assert run_as_worker(task, (1,), "tid-2", idempotency_key="K") == 1
        # A retried message carries its execution's key (idem-retry-key).
        assert run_as_worker(task, (2,), "tid-3", **{"idem-retry-key": "K-retry"}) == 2
    assert runs == [1, 2]
