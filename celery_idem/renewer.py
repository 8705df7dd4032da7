"""Lease renewal: one background thread per process keeps every running claim alive.

A thread per task would cost a thread start on every execution. Instead each running
claim is one entry in a dict, and a single daemon thread wakes when the earliest entry
is due (lease/3 after its claim or last renewal), renews what is due, and sleeps again.
Adding and removing an entry is a dict operation under a lock: a task shorter than
lease/3 is removed before it is due, costs no round trip, and does not wake the thread.
The thread never sleeps longer than the shortest lease/3 it has seen, so a new entry is
never due before the thread's planned wake-up; only a lease shorter than any before it
wakes the thread (once). Waking it on every add cost a GIL hand-off per task, which
measured as a fifth of a short task's throughput.

After a fork (prefork pool) the child gets a fresh lock, dict and thread: threads do
not survive ``fork()``, and a lock held by the parent's thread at that moment would
stay held in the child forever.

Under gevent or eventlet (``threading`` monkeypatched) the thread is a greenlet. It
renews whenever the task bodies yield to the event loop (I/O, ``time.sleep``), as the
I/O-bound tasks those pools are for do; a body that computes without yielding starves
it, and :meth:`Renewer.remove` warns when the body ends (see there).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from celery_idem.config import renewal_period, resolve_settings
from celery_idem.exceptions import StoreUnavailable
from celery_idem.store.base import Store

__all__ = ["Lease", "Renewer", "next_due", "renewer"]

logger = logging.getLogger("celery_idem.renewer")

_FIRST_PERIOD = resolve_settings({}).renew_every
"""The thread's idle period before any lease was seen: that of the default lease (20 s)."""


def next_due(now: float, lease: float, *, failed: bool = False) -> float:
    """When the next renewal of a lease is due.

    Every :func:`~celery_idem.config.renewal_period` (lease/3) normally, so two renewals
    can fail before the lease runs out; after a store error sooner (lease/10), to win
    back the time lost.
    """
    return now + (lease / 10.0 if failed else renewal_period(lease))


@dataclass(eq=False)
class Lease:
    """One running claim that the renewer keeps alive.

    ``describe`` names the task, task id and key for log lines (the store key alone is
    a hash nobody can read).
    """

    store: Store
    key: str
    token: str
    lease: float
    on_lost: Callable[[Lease], None]
    describe: str = ""
    lost: bool = False
    cancelled: bool = False
    renewals: int = field(default=0)
    due: float = 0.0
    confirmed: float = 0.0
    """When (renewer clock) the store last confirmed the lease: the claim, or the start
    of the last successful renewal (the server's deadline runs from a moment later)."""


class Renewer:
    """The process's renewal thread and the claims it keeps alive."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._reset()
        ref = weakref.ref(self)

        def after_fork_in_child() -> None:
            live = ref()
            if live is not None:
                live._reset()

        os.register_at_fork(after_in_child=after_fork_in_child)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._live: dict[int, Lease] = {}
        self._planned = float("inf")
        self._period = _FIRST_PERIOD
        self._pid = os.getpid()
        self._thread: threading.Thread | None = None

    def add(self, lease: Lease) -> Lease:
        """Renew ``lease`` every lease/3 until :meth:`remove`."""
        lease.confirmed = self._clock()
        lease.due = next_due(lease.confirmed, lease.lease)
        with self._lock:
            if self._pid != os.getpid():  # forked without the at-fork hook (e.g. os.fork)
                self._reset()
            self._live[id(lease)] = lease
            period = renewal_period(lease.lease)
            shorter = period < self._period
            if shorter:
                self._period = period
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="celery-idem-renewer", daemon=True
                )
                self._thread.start()
            elif shorter:  # the thread may sleep longer than this lease can wait
                self._wake.set()
        return lease

    def remove(self, lease: Lease) -> None:
        """Stop renewing ``lease`` (its body finished); never wakes the thread.

        Warns when the lease's renewal was overdue by a whole renewal period (lease/3):
        no renewal ran for that long, so the lease may have run out and the key been
        taken over while the body still ran. The thread schedules every renewal on time,
        so the process did not let it run: under gevent or eventlet it is a greenlet,
        held up by a body that computes without yielding to the event loop (measured: no
        renewal at all in a 6 s body under a 2 s lease). Elsewhere it takes a C
        extension holding the GIL, a paused process, or store calls that slow. The
        ``lease_lost`` that may follow cannot name that cause; this warning does.
        """
        first, lease.cancelled = not lease.cancelled, True
        with self._lock:
            self._live.pop(id(lease), None)
        overdue = self._clock() - lease.due
        period = renewal_period(lease.lease)
        if first and lease.due and overdue > period:
            logger.warning(
                "celery-idem's renewal of the lease of %s was %.1f s overdue when it stopped "
                "(renewals are due every %.1f s): the renewal thread did not get to run, or "
                "its store calls were that slow. Under gevent or eventlet the thread is a "
                "greenlet: a task body that computes without yielding to the event loop "
                "(I/O, time.sleep) holds it up, and a lease that runs out meanwhile lets "
                "another worker take the key over. Run such tasks on the prefork or threads "
                "pool, or yield at least every lease/3.",
                lease.describe or lease.key,
                overdue,
                period,
            )

    def may_have_lapsed(self, lease: Lease) -> bool:
        """A whole lease passed since the store last confirmed ``lease`` (or it is lost).

        The renewal thread did not get to run for that long (a paused process, a long
        GC or GIL hold): the key may have been taken over meanwhile. The body asks before
        a durable step, so a stalled attempt learns it before running the step's side
        effect, not only when storing it.
        """
        return lease.lost or self._clock() - lease.confirmed >= lease.lease

    def confirm(self, lease: Lease, since: float) -> None:
        """The store confirmed ``lease`` by a renewal that started at ``since``."""
        lease.confirmed = max(lease.confirmed, since)

    def clock(self) -> float:
        """The clock leases are timed on (monotonic)."""
        return self._clock()

    def _due_now(self) -> list[Lease]:
        now = self._clock()
        with self._lock:
            return [lease for lease in self._live.values() if lease.due <= now]

    def _plan(self) -> float:
        """Seconds until the earliest entry is due; :meth:`add` wakes us if one comes sooner."""
        now = self._clock()
        with self._lock:
            self._planned = min(
                (lease.due for lease in self._live.values()), default=now + self._period
            )
            self._planned = min(self._planned, now + self._period)
            self._wake.clear()
            return max(0.0, self._planned - now)

    def _run(self) -> None:
        while True:
            for lease in self._due_now():
                self._renew(lease)
            self._wake.wait(self._plan())

    def _renew(self, lease: Lease) -> None:
        failed, started = False, self._clock()
        try:
            owned = lease.store.renew(lease.key, token=lease.token, lease=lease.lease)
        except StoreUnavailable as exc:
            logger.warning("celery-idem could not renew the lease of %s: %s", lease.describe, exc)
            owned, failed = True, True
        except Exception:  # the thread must outlive any one bad renewal; keep trying
            logger.exception("celery-idem renewal of %s failed", lease.describe)
            owned, failed = True, True
        if lease.cancelled:
            return
        if not owned:
            lease.lost = True
            self.remove(lease)
            try:
                lease.on_lost(lease)
            except Exception:  # a signal receiver must not kill renewals
                logger.exception("celery-idem lease_lost handler failed for %s", lease.describe)
            return
        if not failed:
            lease.renewals += 1
            self.confirm(lease, started)
        lease.due = next_due(self._clock(), lease.lease, failed=failed)


renewer = Renewer()
"""The process-wide renewer that :class:`~celery_idem.IdempotentTask` uses."""
