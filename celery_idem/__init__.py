"""celery-idem: idempotent Celery tasks, one atomic and fenced claim per key (Redis or PostgreSQL).

The public API is what ``__all__`` names; everything else may change.
"""

from __future__ import annotations

from celery_idem.config import IdemSettings, InProgressPolicy, StoreErrorPolicy
from celery_idem.endpoint import Endpoint, Topology
from celery_idem.exceptions import (
    DuplicateInProgress,
    IdempotencyConfigError,
    IdempotencyError,
    IdempotencyKeyMismatch,
    InvalidIdempotencyKey,
    KeyQuarantined,
    LeaseLost,
    MisplacedCallOption,
    ReplicasNotReached,
    ResultNotStored,
    StoreUnavailable,
    UnencodableArgument,
)
from celery_idem.task import IdempotentTask
from celery_idem.task.atomic import AtomicBlock

__version__ = "0.1.0"

__all__ = [
    "AtomicBlock",
    "DuplicateInProgress",
    "Endpoint",
    "IdemSettings",
    "IdempotencyConfigError",
    "IdempotencyError",
    "IdempotencyKeyMismatch",
    "IdempotentTask",
    "InProgressPolicy",
    "InvalidIdempotencyKey",
    "KeyQuarantined",
    "LeaseLost",
    "MisplacedCallOption",
    "ReplicasNotReached",
    "ResultNotStored",
    "StoreErrorPolicy",
    "StoreUnavailable",
    "Topology",
    "UnencodableArgument",
    "__version__",
]
