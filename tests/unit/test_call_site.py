"""The call site (issue #14): what ``apply_async``, ``delay``, ``.set()``
and ``apply`` refuse before anything is sent, and what they must leave alone.

Tasks live on a non-eager app whose ``send_task`` is replaced by a recorder, so "nothing
was sent" is observed rather than assumed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from celery_idem import IdempotencyConfigError, IdempotentTask, MisplacedCallOption
from celery_idem.config import CALL_OPTIONS, check_call_names
from celery_idem.task import invalidate_settings


class Sent:
    """Records what reached ``app.send_task``: what would have gone to the broker."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, name: str, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        self.calls.append({"name": name, "args": args, "kwargs": kwargs, **options})
        return None


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery("call-site", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.idem_redis_url = "memory://call-site"
    invalidate_settings()
    yield app
    invalidate_settings()


@pytest.fixture
def sent(app: Celery, monkeypatch: pytest.MonkeyPatch) -> Sent:
    recorder = Sent()
    monkeypatch.setattr(app, "send_task", recorder)
    return recorder


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
