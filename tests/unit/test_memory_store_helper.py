"""``use_memory_store`` must win over every store setting, in either spelling."""

from __future__ import annotations

from celery import Celery

from celery_idem import IdempotentTask
from celery_idem.store import MemoryStore
from celery_idem.testing import use_memory_store

calls: list[str] = []


def make_client() -> None:
    """A factory that must never be called while the memory store is in use."""
    calls.append("called")


def test_django_spelled_store_settings_do_not_leak_into_the_memory_store() -> None:
    app = Celery("django-spelled", broker="memory://", backend="cache+memory://",
                 set_as_current=False)  # fmt: skip
    app.conf.update(
        task_always_eager=True,
        CELERY_IDEM_REDIS_CLIENT=f"{__name__}.make_client",
        CELERY_IDEM_MIN_REPLICAS=1,
    )

    @app.task(base=IdempotentTask, shared=False, name="django.add")
    def add(x: int) -> int:
        return x

    with use_memory_store(app) as store:
        assert add.apply((2,)).get() == 2
        assert isinstance(add.idem_spec().store, MemoryStore)
        assert store.read(add.idem_spec().store.scan("*")[1][0]) is not None
    assert calls == []
    assert f"{__name__}.make_client" == app.conf.CELERY_IDEM_REDIS_CLIENT  # restored
