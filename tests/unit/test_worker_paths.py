"""Worker-only paths run in process: a request is pushed as the worker's tracer would,
so deferral, requeueing and same-task-id handling can be checked without a broker."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery
from celery.canvas import Signature
from celery.exceptions import Reject, Retry
from kombu.exceptions import OperationalError

from celery_idem import IdempotencyConfigError, IdempotentTask, StoreUnavailable
from celery_idem.keys import storage_key
from celery_idem.store import ClaimRequest, ClaimState, MemoryStore
from celery_idem.store.redis import RedisStore
from celery_idem.task.publish import move_call_options
from celery_idem.testing import use_memory_store
from devtools.processes import free_port
from devtools.redis_server import RedisServer


@pytest.fixture
def app() -> Celery:
    return Celery(
        "worker-paths", broker="memory://", backend="cache+memory://", set_as_current=False
    )


def make_task(app: Celery, **options: Any) -> Any:
    def body(self: Any, x: int) -> int:
        return x

    return app.task(body, base=IdempotentTask, bind=True, shared=False, name="wp.body", **options)


def run_as_worker(task: Any, args: tuple[Any, ...], task_id: str, **headers: Any) -> Any:
    """Call the task the way the worker's tracer does: a pushed, non-direct request."""
    task.push_request(
        id=task_id,
        called_directly=False,
        is_eager=False,
        retries=0,
        args=args,
        kwargs={},
        headers=headers or None,
        delivery_info={"exchange": "", "routing_key": "celery"},
    )
    try:
        return task(*args)
    finally:
        task.pop_request()


def hold(store: MemoryStore, task: Any, key: str, task_id: str) -> None:
    out = store.claim(
        ClaimRequest(
            storage_key("idem", task.name, key),
            token="holder",
            task_id=task_id,
            fingerprint="",
            lease=60,
            ttl=60,
        )
    )
    assert out.state is ClaimState.CLAIMED


def test_a_duplicate_that_cannot_be_requeued_is_rejected_not_acked(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = make_task(app)
    with use_memory_store(app) as store:
        hold(store, task, "K", "other-task")

        def broker_down(self: Signature, *a: Any, **kw: Any) -> None:
            raise OperationalError("broker unreachable")

        monkeypatch.setattr(Signature, "apply_async", broker_down)
        with pytest.raises(Reject) as info:
            run_as_worker(task, (1,), "dup-task", idempotency_key="K")
    assert info.value.requeue is True


def test_a_long_deferred_duplicate_backs_off_without_overflowing(app: Celery) -> None:
    task = make_task(app)
    with use_memory_store(app) as store:
        hold(store, task, "K", "other-task")
        with pytest.raises(Retry) as info:
            run_as_worker(task, (1,), "dup-task", idempotency_key="K", **{"idem-deferrals": 5000})
    assert 0 < float(info.value.when) <= 60.0  # capped by the holder's remaining lease


def test_own_redelivery_is_deferred_even_under_the_raise_policy(app: Celery) -> None:
    # A redelivery (same task id) of a message whose run still holds the key must come
    # back later: raising would fail, and ack, the only message of that work.
    task = make_task(app, idem_on_in_progress="raise")
    with use_memory_store(app) as store:
        hold(store, task, "K", "same-task")
        with pytest.raises(Retry):
            run_as_worker(task, (1,), "same-task", idempotency_key="K")


def test_publisher_without_redis_can_still_validate_call_options(app: Celery) -> None:
    app.conf.broker_url = "amqp://guest@127.0.0.1:1//"  # no Redis anywhere
    task = make_task(app)
    options: dict[str, Any] = {"idem_ttl": 60, "idempotency_key": "K"}
    move_call_options(task, options)
    assert options["headers"] == {"idem_ttl": 60, "idempotency_key": "K"}
    with pytest.raises(IdempotencyConfigError, match="idem_ttl"):
        move_call_options(task, {"idem_ttl": -1})


def test_store_errors_never_show_the_redis_password() -> None:
    store = RedisStore.from_url(f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0")
    with pytest.raises(StoreUnavailable) as info:
        store.claim(ClaimRequest("k", token="t", task_id="i", fingerprint="", lease=1, ttl=1))
    assert "s3cret-pw" not in str(info.value)
    assert "127.0.0.1" in str(info.value)


def test_idempotency_key_none_as_an_option_keeps_the_property(app: Celery) -> None:
    app.conf.task_always_eager = True

    def body(self: Any, x: int) -> str | None:
        return self.idempotency_key  # type: ignore[no-any-return]

    task = app.task(
        body, base=IdempotentTask, bind=True, shared=False, name="wp.none", idempotency_key=None
    )
    with use_memory_store(app):
        assert task.apply((1,), idempotency_key="explicit").get() == "explicit"
        derived = task.apply((2,)).get()
    assert isinstance(derived, str)
    assert len(derived) == 32  # the derived key: 32 hex characters


def test_redis_out_of_memory_is_an_outage_not_a_refusal(server_per_version: RedisServer) -> None:
    # Under the recommended maxmemory-policy noeviction, a full Redis answers OOM: the
    # idem_on_store_error policy must apply (retry later), not a permanent failure. Redis
    # 7 answers OOM as it is; 6.2 wraps it into "Error running script ...: -OOM ...".
    client = server_per_version.client(0)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)
    store = RedisStore.from_url(server_per_version.url(0))
    with pytest.raises(StoreUnavailable, match="Redis answered OOM"):
        store.claim(ClaimRequest("k", token="t", task_id="i", fingerprint="", lease=1, ttl=1))


@pytest.mark.parametrize(
    "key_options",
    [{"idempotency_key": "crawl-1"}, {}],
    ids=["explicit key", "derived key"],
)
def test_a_retry_with_new_arguments_keeps_its_key(app: Celery, key_options: dict[str, str]) -> None:
    # self.retry(args=...) must not move the work to another key: the original
    # request's duplicates replay, and no page runs twice.
    app.conf.task_always_eager = True
    pages: list[int] = []

    def crawl(self: Any, page: int) -> list[int]:
        pages.append(page)
        if page < 3:
            raise self.retry(args=(page + 1,), countdown=0)
        return pages

    task = app.task(crawl, base=IdempotentTask, bind=True, shared=False, name="wp.crawl")
    with use_memory_store(app):
        assert task.apply((1,), **key_options).get() == [1, 2, 3]
        assert task.apply((1,), **key_options).get() == [1, 2, 3]  # the original replays
    assert pages == [1, 2, 3]
