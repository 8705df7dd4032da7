"""Lease renewal: one background thread per process keeps every running claim alive.

A thread per task would cost a thread start on every execution; instead each claim is
an entry in one heap, renewed every lease/3 by a single daemon thread that sleeps until
the next entry is due. A task shorter than lease/3 never reaches the thread and so costs
no round trip. Removing an entry is O(1) (it is marked and skipped when popped).

After a fork (prefork pool) the child starts its own thread lazily: threads do not
survive ``fork()``, so the process id is checked on every add.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from celery_idem.exceptions import StoreUnavailable
from celery_idem.store.base import Store

__all__ = ["Lease", "Renewer", "next_due", "renewer"]

logger = logging.getLogger("celery_idem.renewer")


def next_due(now: float, lease: float, *, failed: bool = False) -> float:
    """When the next renewal of a lease is due.

    Every lease/3 normally, so two renewals can fail before the lease runs out; after a
    store error sooner (lease/10), to win back the time lost.
    """
    return now + (lease / 10.0 if failed else lease / 3.0)


@dataclass(eq=False)
class Lease:
    """One running claim that the renewer keeps alive."""

    store: Store
    key: str
    token: str
    lease: float
    on_lost: Callable[[Lease], None]
    lost: bool = False
    cancelled: bool = False
    renewals: int = field(default=0)


class Renewer:
    """The process's renewal thread and its schedule."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, Lease]] = []
        self._counter = itertools.count()
        self._cond = threading.Condition()
        self._pid = 0
        self._thread: threading.Thread | None = None

    def add(self, lease: Lease) -> Lease:
        """Schedule ``lease`` for renewal every lease/3 until :meth:`remove`."""
        with self._cond:
            if self._pid != os.getpid():
                self._start()
            due = next_due(self._clock(), lease.lease)
            heapq.heappush(self._heap, (due, next(self._counter), lease))
            if self._heap[0][2] is lease:
                self._cond.notify()
        return lease

    @staticmethod
    def remove(lease: Lease) -> None:
        """Stop renewing ``lease`` (the body finished); no lock, no wake-up needed."""
        lease.cancelled = True

    def _start(self) -> None:
        self._pid = os.getpid()
        self._heap = []
        self._thread = threading.Thread(target=self._run, name="celery-idem-renewer", daemon=True)
        self._thread.start()

    def _next(self) -> Lease:
        with self._cond:
            while True:
                while self._heap and self._heap[0][2].cancelled:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                due = self._heap[0][0]
                wait = due - self._clock()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                return heapq.heappop(self._heap)[2]

    def _reschedule(self, lease: Lease, *, failed: bool) -> None:
        with self._cond:
            due = next_due(self._clock(), lease.lease, failed=failed)
            heapq.heappush(self._heap, (due, next(self._counter), lease))

    def _run(self) -> None:
        while True:
            lease = self._next()
            try:
                owned = lease.store.renew(lease.key, token=lease.token, lease=lease.lease)
            except StoreUnavailable as exc:
                logger.warning("celery-idem could not renew the lease on %s: %s", lease.key, exc)
                if not lease.cancelled:
                    self._reschedule(lease, failed=True)
                continue
            except Exception:  # the thread must outlive any one bad renewal
                logger.exception("celery-idem renewal of %s failed", lease.key)
                if not lease.cancelled:  # keep trying: giving up would lose the lease
                    self._reschedule(lease, failed=True)
                continue
            if lease.cancelled:
                continue
            if not owned:
                lease.lost = True
                try:
                    lease.on_lost(lease)
                except Exception:  # a signal receiver must not kill renewals
                    logger.exception("celery-idem lease_lost handler failed for %s", lease.key)
                continue
            lease.renewals += 1
            self._reschedule(lease, failed=False)


renewer = Renewer()
"""The process-wide renewer that :class:`~celery_idem.IdempotentTask` uses."""
