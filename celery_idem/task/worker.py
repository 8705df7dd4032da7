"""Worker start: validate settings, warn about stores that are down, evict or lack replicas.

A store that answers but refuses the records (a PostgreSQL database without the
records' table, or with an older one) stops the worker: every task would fail.

Each warning names the store and the tasks that use it. At a pool process's exit (or a
solo worker's), the answers of the completions it sent are read (:func:`settle_completions`).

Connected to Celery's ``celeryd_after_setup`` when ``celery_idem.task`` is imported:
it comes after the worker set up its logging (so the lines reach ``--logfile``) and
before the pool starts and the worker says "ready".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, NoReturn

from celery.signals import celeryd_after_setup, worker_process_shutdown, worker_shutdown

from celery_idem.exceptions import IdempotencyConfigError, StoreUnavailable
from celery_idem.renewer import renewer
from celery_idem.settings_table import StoreErrorPolicy
from celery_idem.store import StoreAdmin, admin_for
from celery_idem.store.unreachable import UnreachableStore
from celery_idem.task.base import IdempotentTask

__all__ = ["settle_completions", "validate_on_worker_start"]

logger = logging.getLogger("celery_idem")


PROBE_TIMEOUT = 1.0
"""Seconds the start-up check waits for each store's PING: enough for a live Redis."""


@dataclass
class _Users:
    """One store and the tasks that keep their records in it."""

    admin: StoreAdmin
    url: str
    min_replicas: int
    tasks: dict[str, StoreErrorPolicy] = field(default_factory=dict)

    def names(self) -> str:
        return ", ".join(sorted(self.tasks))


def validate_on_worker_start(sender: Any = None, instance: Any = None, **_: Any) -> None:
    """Fail the worker at start, naming the setting, rather than at the first task.

    Then, once per store (naming the tasks that use it), warn and keep starting when
    the store does not answer a PING within :data:`PROBE_TIMEOUT` (saying what those
    tasks' ``idem_on_store_error`` will do meanwhile), when it may evict records (an
    evicted record is a key that runs again, and every record has a TTL, so
    ``volatile-*`` policies pick them first), or when it has fewer replicas than
    ``idem_min_replicas``.
    """
    app = getattr(instance, "app", None)
    if app is None:
        return
    stores: dict[int, _Users] = {}
    for task in list(app.tasks.values()):
        if not isinstance(task, IdempotentTask):
            continue
        try:
            spec = task.idem_spec()
        except IdempotencyConfigError as exc:
            _refuse(task.name, exc)
        policy = spec.settings.on_store_error
        if isinstance(spec.store, UnreachableStore):
            logger.warning(
                "celery-idem: task %r: %s; until the store answers, its messages %s "
                "(idem_on_store_error=%s).",
                task.name, spec.store.cause, policy.consequence, policy.value,
            )  # fmt: skip
            continue
        endpoint = spec.settings.endpoint
        if endpoint is None:
            continue
        # The same store, as StoreAdmin.
        try:
            admin = admin_for(endpoint, task_name=task.name, app_name=app.main)
        except IdempotencyConfigError as exc:  # e.g. PostgreSQL without psycopg
            _refuse(task.name, exc)
        users = stores.setdefault(id(admin), _Users(admin, endpoint.display, endpoint.min_replicas))
        users.tasks[task.name] = policy
    for users in stores.values():
        try:
            unreachable = _warn_if_unreachable(users)
        except IdempotencyConfigError as exc:  # it answers, and refuses our records
            _refuse(users.names(), exc)
        if unreachable:
            continue
        _warn_if_evicting(users)
        _warn_if_replicas_short(users)


def _refuse(tasks: str, exc: IdempotencyConfigError) -> NoReturn:
    """Stop the worker before it takes a message, saying why and what to do."""
    logger.critical("celery-idem: %s", exc)
    raise SystemExit(f"celery-idem: task {tasks!r}: {exc}") from exc


def _warn_if_unreachable(users: _Users) -> bool:
    try:
        users.admin.probe(PROBE_TIMEOUT)
    except StoreUnavailable as exc:
        by_policy: dict[StoreErrorPolicy, list[str]] = {}
        for name, policy in sorted(users.tasks.items()):
            by_policy.setdefault(policy, []).append(name)
        meanwhile = "; ".join(
            f"{', '.join(names)} (idem_on_store_error={policy.value}) {policy.consequence}"
            for policy, names in by_policy.items()
        )
        logger.warning(
            "celery-idem: the store at %s did not answer within %.1f s (%s). The worker "
            "keeps starting; until the store answers, the messages of %s.",
            users.url, PROBE_TIMEOUT, exc, meanwhile,
        )  # fmt: skip
        return True
    return False


def _warn_if_evicting(users: _Users) -> None:
    policy = users.admin.eviction_policy()
    if policy is not None and policy != "noeviction":
        logger.warning(
            "celery-idem: the store at %s (tasks %s) has maxmemory-policy %r: under "
            "memory pressure Redis may evict idempotency records, and an evicted key "
            "runs again. Set maxmemory-policy noeviction on the Redis that holds "
            "idem_redis_url.",
            users.url, users.names(), policy,
        )  # fmt: skip


def _warn_if_replicas_short(users: _Users) -> None:
    wanted = users.min_replicas
    if not wanted:
        return
    count = users.admin.replica_count()
    if count is not None and count < wanted:
        logger.warning(
            "celery-idem: idem_min_replicas=%d but the primary of the store at %s "
            "(tasks %s) has %d replica(s) connected: every claim will be refused (and "
            "its task deferred) until enough replicas connect.",
            wanted, users.url, users.names(), count,
        )  # fmt: skip


celeryd_after_setup.connect(validate_on_worker_start, weak=False)


def settle_completions(**_: Any) -> None:
    """A pool process (or a solo worker) is exiting: read its completions' answers.

    They were sent before their tasks returned, so Redis runs them whether or not
    anyone reads the answer; reading them here still reports a refused or failed one.
    """
    try:
        renewer.settle_all()
    except Exception:  # never stand in the way of a shutdown
        logger.exception("celery-idem could not confirm the last completions")


worker_process_shutdown.connect(settle_completions, weak=False)
worker_shutdown.connect(settle_completions, weak=False)
