"""Celery-style signals that celery-idem sends, so users can count and alert.

Every signal is sent with ``sender`` the task instance and these keyword arguments:

- ``replayed``: ``key``, ``task_id``, ``original_task_id``, ``fence`` — a duplicate was
  answered from the stored outcome; the body did not run.
- ``key_mismatch``: ``key``, ``task_id``, ``original_task_id`` — the key was used before
  with other arguments; nothing ran.
- ``duplicate_in_progress``: ``key``, ``task_id``, ``owner_task_id``, ``lease_left``,
  ``retry_in`` (seconds until this message looks again; None when it does not come back),
  ``policy`` — another run holds the key; this message waits, retries or raises.
- ``lease_lost``: ``key``, ``task_id``, ``fence``, ``stage`` (``"renew"``, ``"step"``,
  ``"complete"``, ...) — another attempt took the key over; this run's outcome is not
  stored (at ``"step"``, the run stops there with :class:`~celery_idem.LeaseLost`).
- ``step_replayed``: ``key``, ``task_id``, ``step`` (its name), ``occurrence``, ``fence``
  — a durable step (``self.step``) that an earlier attempt of the key finished was
  answered from the record; its function did not run.
- ``store_error``: ``key``, ``task_id``, ``exc``, ``stage``, ``policy`` — the store failed
  (``stage`` ``"claim"``, ``"complete"``, ``"release"``, ``"park"``, ``"step"``, ...);
  ``exc`` names the task and the key (``.key``, ``.task_name``), the store's own error
  is its ``__cause__``.
- ``result_not_stored``: ``key``, ``task_id``, ``reason`` — the body ran but its result
  could not be kept; duplicates will get :class:`~celery_idem.ResultNotStored`.
- ``quarantined``: ``key``, ``task_id``, ``takeovers``, ``fence`` — the key was taken
  over more than ``idem_max_takeovers`` times without completing (a poison message)
  and is now quarantined; sent once, by the claim that quarantined it.
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = [
    "duplicate_in_progress",
    "key_mismatch",
    "lease_lost",
    "quarantined",
    "replayed",
    "result_not_stored",
    "step_replayed",
    "store_error",
]

replayed = Signal(
    name="idem_replayed", providing_args={"key", "task_id", "original_task_id", "fence"}
)
key_mismatch = Signal(
    name="idem_key_mismatch", providing_args={"key", "task_id", "original_task_id"}
)
duplicate_in_progress = Signal(
    name="idem_duplicate_in_progress",
    providing_args={"key", "task_id", "owner_task_id", "lease_left", "retry_in", "policy"},
)
lease_lost = Signal(name="idem_lease_lost", providing_args={"key", "task_id", "fence", "stage"})
store_error = Signal(
    name="idem_store_error", providing_args={"key", "task_id", "exc", "stage", "policy"}
)
result_not_stored = Signal(
    name="idem_result_not_stored", providing_args={"key", "task_id", "reason"}
)
step_replayed = Signal(
    name="idem_step_replayed", providing_args={"key", "task_id", "step", "occurrence", "fence"}
)
quarantined = Signal(
    name="idem_quarantined", providing_args={"key", "task_id", "takeovers", "fence"}
)
