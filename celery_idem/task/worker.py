"""Worker start: validate every task's settings, warn about evicting or under-replicated stores.

Connected to Celery's ``celeryd_after_setup`` when ``celery_idem.task`` is imported:
it comes after the worker set up its logging (so the lines reach ``--logfile``) and
before the pool starts and the worker says "ready".
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import celeryd_after_setup

from celery_idem.exceptions import IdempotencyConfigError
from celery_idem.store import StoreAdmin, admin_for
from celery_idem.store.unreachable import UnreachableStore
from celery_idem.task.base import IdempotentTask

__all__ = ["validate_on_worker_start"]

logger = logging.getLogger("celery_idem")


def validate_on_worker_start(sender: Any = None, instance: Any = None, **_: Any) -> None:
    """Fail the worker at start, naming the setting, rather than at the first task.

    Also warns when the store may evict records: an evicted record is a key that runs
    again, and every celery-idem record has a TTL, so ``volatile-*`` policies pick them
    first.
    """
    app = getattr(instance, "app", None)
    if app is None:
        return
    checked: set[int] = set()
    for task in list(app.tasks.values()):
        if not isinstance(task, IdempotentTask):
            continue
        try:
            spec = task.idem_spec()
        except IdempotencyConfigError as exc:
            logger.critical("celery-idem: %s", exc)
            raise SystemExit(f"celery-idem: task {task.name!r}: {exc}") from exc
        if isinstance(spec.store, UnreachableStore):
            logger.warning(
                "celery-idem: task %r: %s; its messages follow idem_on_store_error until "
                "the store answers.",
                task.name,
                spec.store.cause,
            )
            continue
        endpoint = spec.settings.endpoint
        # The same store, as StoreAdmin.
        admin = admin_for(endpoint, task_name=task.name, app_name=app.main)
        if endpoint is not None and id(admin) not in checked:
            checked.add(id(admin))
            _warn_if_evicting(admin, endpoint.display)
            _warn_if_replicas_short(admin, endpoint.min_replicas, endpoint.display)


def _warn_if_evicting(admin: StoreAdmin, url: str) -> None:
    policy = admin.eviction_policy()
    if policy is not None and policy != "noeviction":
        logger.warning(
            "celery-idem: the store at %s has maxmemory-policy %r: under memory pressure "
            "Redis may evict idempotency records, and an evicted key runs again. Set "
            "maxmemory-policy noeviction on the Redis that holds idem_redis_url.",
            url,
            policy,
        )


def _warn_if_replicas_short(admin: StoreAdmin, wanted: int, url: str) -> None:
    if not wanted:
        return
    count = admin.replica_count()
    if count is not None and count < wanted:
        logger.warning(
            "celery-idem: idem_min_replicas=%d but the primary of the store at %s has %d "
            "replica(s) connected: every claim will be refused (and its task deferred) "
            "until enough replicas connect.",
            wanted,
            url,
            count,
        )


celeryd_after_setup.connect(validate_on_worker_start, weak=False)
