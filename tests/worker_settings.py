"""Celery settings shared by the apps that the test suites run on real workers."""

from __future__ import annotations

from typing import Any


def redelivering_worker(visibility: float) -> dict[str, Any]:
    """The Celery settings under which a crash redelivers instead of losing a message.

    Late acks, requeue on a lost worker, one message reserved per process, extended
    results (the tests read them), and a Redis broker that restores a dead worker's
    unacked messages after ``visibility`` seconds, checking every second.
    """
    return {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "result_extended": True,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            "visibility_timeout": visibility,
            "unacked_restore_throttle": 1,
            "unacked_restore_interval": 1,
            # A restore sweep holds kombu's "unacked_mutex" (one key per broker database)
            # for milliseconds; a worker SIGKILLed while holding it (a test's teardown kills
            # whole workers) would leave it for its default 300 s, and no worker on the
            # broker would redeliver anything meanwhile. Seen: both visibility-timeout
            # tests timing out one after the other in one CI run.
            "unacked_mutex_expire": 5,
        },
        "result_backend_transport_options": {"visibility_timeout": visibility},
    }
