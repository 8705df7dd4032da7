"""The call site (issue #14): what ``apply_async``, ``delay``, ``.set()`` and ``apply``
refuse before anything is sent, and what they must leave alone.

Tasks live on a non-eager app whose ``send_task`` is replaced by a recorder, so "nothing
was sent" is observed rather than assumed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from celery_idem import IdempotencyConfigError, IdempotentTask
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
