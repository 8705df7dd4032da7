"""Celery and celery-idem configuration of the example project.

Everything comes from one environment variable, ``REDIS_URL`` (default
``redis://localhost:6379/0``). Its database number N is the first of four consecutive
databases, so nothing the example writes shares a keyspace:

    N     the broker (queues, unacked messages)
    N+1   the result backend (what ``GET /tasks/<id>`` reads)
    N+2   celery-idem's records (one key per idempotency key)
    N+3   the demo's report counters (not part of a real project)

The demo (``python -m example_project.demo``) shortens two durations through the
environment, ``IDEM_LEASE`` and ``VISIBILITY_TIMEOUT``, so that a killed worker is
recovered from in seconds rather than an hour.

Celery reads every lowercase name of this module; helpers start with ``_``.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

_REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")


def _with_db(url: str, offset: int) -> str:
    """``url`` with its database number (default 0) moved up by ``offset``."""
    parts = urlsplit(url)
    path = parts.path.strip("/")
    base = int(path) if path.isdigit() else 0
    return urlunsplit((parts.scheme, parts.netloc, f"/{base + offset}", parts.query, ""))


# -- Celery ---------------------------------------------------------------------------

broker_url = _with_db(_REDIS_URL, 0)
result_backend = _with_db(_REDIS_URL, 1)
broker_connection_retry_on_startup = True

# Acknowledge a message only once its task has finished, and give it back to the queue
# if the worker process running it dies. Together they turn "a crash loses the email"
# into "a crash sends the email later": at-least-once delivery. celery-idem turns that
# at-least-once delivery back into exactly one email.
task_acks_late = True
task_reject_on_worker_lost = True
# Reserve one message per worker process, so a crash hands back at most that one.
worker_prefetch_multiplier = 1

# The Redis broker has no real acknowledgements: a delivered message waits in an
# "unacked" set and is delivered again once it has been there ``visibility_timeout``
# seconds, whether its worker died or is merely still busy. Without celery-idem that
# timeout must exceed your longest task, or a slow task runs twice; so people set it
# to hours and a crashed worker's message then waits hours. With celery-idem a
# redelivered message whose first run is still going does not run the body again
# (it waits for that run and answers with its result), so a short timeout is safe and
# recovery is fast. The demo uses 5 s. celery-idem reads this value: a duplicate that
# waits for a running key is re-queued with a countdown of at most half of it, so the
# broker never hands the waiting message out a second time.
_VISIBILITY_TIMEOUT = float(os.environ.get("VISIBILITY_TIMEOUT", "3600"))
broker_transport_options = {
    "visibility_timeout": _VISIBILITY_TIMEOUT,
    # How often each worker looks for messages past their visibility timeout (seconds;
    # kombu's default scan period is 10 x 10 s). A fifth of the timeout, 1 to 10 s:
    # one cheap ZRANGE per worker per interval.
    "unacked_restore_interval": max(1, min(10, int(_VISIBILITY_TIMEOUT // 5))),
    "unacked_restore_throttle": 1,
}

# -- celery-idem ----------------------------------------------------------------------

# Where the idempotency records live: a database of their own, so a FLUSHDB of the
# broker or the result backend never forgets which emails were sent.
idem_redis_url = _with_db(_REDIS_URL, 2)

# How long a completed key remembers its result (seconds). Payment providers resend an
# undelivered webhook for up to three days; keep results longer than the longest resend
# window, or a resend on day four would send a second email.
idem_ttl = 4 * 24 * 3600

# How long a claim survives without renewal (seconds). A running task renews its claim
# every lease/3, so the lease does not limit how long a task may take; it is how long a
# key stays blocked after its worker died mid-task, before the redelivered message may
# take it over. 60 s by default; the demo sets IDEM_LEASE=5.
idem_lease = float(os.environ.get("IDEM_LEASE", "60"))

# A duplicate arriving while the first delivery is still sending: re-queue it with a
# short, growing countdown ("retry") rather than block a worker process ("wait"), and
# rather than fail it ("raise"): the provider's third concurrent resend then gets the
# same answer as the first, a moment later, without holding a worker slot.
idem_on_in_progress = "retry"

# Redis unreachable when a task tries to claim its key: retry with backoff and send
# nothing meanwhile (fail closed). A welcome email an hour late beats two emails;
# "run" would choose availability over exactly-once.
idem_on_store_error = "retry"

# -- the demo's report (not a Celery setting) ------------------------------------------

# Where the tasks count their executions and replays so that the demo can print them.
# A real project does not need this.
demo_report_url = _with_db(_REDIS_URL, 3)
