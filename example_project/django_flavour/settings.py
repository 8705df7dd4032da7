"""Django settings of the example project's Django flavour (``DJANGO_SETTINGS_MODULE``).

Two environment variables, as in the Redis flavour's ``celeryconfig.py``:

``DATABASE_URL``
    The shop's PostgreSQL database (default ``postgresql://localhost:5432/acme``). The
    customers live there, and so do celery-idem's records (``CELERY_IDEM_STORE_URL``
    is the same URL): that is what lets a task commit its rows and its progress in one
    transaction. ``python -m django migrate`` creates both the ``shop`` tables and
    celery-idem's (the ``celery_idem.contrib.django`` app).
``REDIS_URL``
    The broker (database N) and the result backend (N+1), as in the Redis flavour;
    the tasks go to their own queue, ``shop``, so both flavours may share them.

The demo (``python -m example_project.demo``, scenarios F and G) also shortens
``IDEM_LEASE`` and ``VISIBILITY_TIMEOUT``, as for the Redis flavour.
"""

from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit, urlunsplit

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://localhost:5432/acme")
_REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")


def _database(url: str) -> dict[str, object]:
    """A ``DATABASES`` entry for a ``postgresql://user:password@host:port/name`` URL."""
    parts = urlsplit(url)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(parts.path.lstrip("/")),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
    }


def _redis_db(offset: int) -> str:
    """``REDIS_URL`` with its database number (default 0) moved up by ``offset``."""
    parts = urlsplit(_REDIS_URL)
    path = parts.path.strip("/")
    base = int(path) if path.isdigit() else 0
    return urlunsplit((parts.scheme, parts.netloc, f"/{base + offset}", parts.query, ""))


# -- Django ---------------------------------------------------------------------------

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-a-secret")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "example_project.django_flavour.urls"
INSTALLED_APPS = [
    "celery_idem.contrib.django",  # celery-idem's tables: `migrate celery_idem`
    "example_project.django_flavour.shop",
]
DATABASES = {"default": _database(DATABASE_URL)}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"

# -- Celery (read by celery.py, prefix CELERY_ stripped) -------------------------------

CELERY_BROKER_URL = _redis_db(0)
CELERY_RESULT_BACKEND = _redis_db(1)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_DEFAULT_QUEUE = "shop"
# At-least-once delivery, as in the Redis flavour (see celeryconfig.py for the why):
# ack after the task, hand the message back when its worker process dies, and reserve
# one message per process.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
_VISIBILITY_TIMEOUT = float(os.environ.get("VISIBILITY_TIMEOUT", "3600"))
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": _VISIBILITY_TIMEOUT,
    "unacked_restore_interval": max(1, min(10, int(_VISIBILITY_TIMEOUT // 5))),
    "unacked_restore_throttle": 1,
}

# -- celery-idem -----------------------------------------------------------------------

# The records in the shop's own database: a task's rows and its progress (a durable
# step, the completion) then commit in one transaction. `migrate` created the table.
CELERY_IDEM_STORE_URL = DATABASE_URL
CELERY_IDEM_TTL = 4 * 24 * 3600  # longer than the provider's resend window
CELERY_IDEM_LEASE = float(os.environ.get("IDEM_LEASE", "60"))
CELERY_IDEM_ON_IN_PROGRESS = "retry"
CELERY_IDEM_ON_STORE_ERROR = "retry"

# -- the shop ----------------------------------------------------------------------------

SMTP_HOST = os.environ.get("SMTP_HOST", "localhost")  # where the welcome emails go
SMTP_PORT = int(os.environ.get("SMTP_PORT", "8025"))

# Where the task counts its executions and replays for the demo's report (Redis
# database N+3, as in the Redis flavour). A real project does not need this.
DEMO_REPORT_URL = _redis_db(3)
