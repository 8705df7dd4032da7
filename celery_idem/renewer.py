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

A run's completion is sent without waiting for its answer (``Execution.complete``);
its lease stays here until the answer is read (:meth:`Renewer.complete_later`): by the
same thread before its next claim, by the renewal thread when the lease is due (which
sends it again after a failure, until the lease would run out), or, past
:data:`MAX_UNREAD` unread ones, by the thread sending the next.

Under gevent or eventlet (``threading`` monkeypatched) the thread is a greenlet. It
renews whenever the task bodies yield to the event loop (I/O, ``time.sleep``), as the
I/O-bound tasks those pools are for do; a body that computes without yielding starves
it, and :meth:`Renewer.remove` warns when the body ends (see there).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from celery_idem.config import renewal_period, resolve_settings
from celery_idem.exceptions import IdempotencyError, StoreUnavailable
from celery_idem.store.base import PendingCompletion, Store

__all__ = ["Completion", "Lease", "Renewer", "next_due", "renewer"]

logger = logging.getLogger("celery_idem.renewer")

MAX_UNREAD = 16
"""Completions a process leaves unread at most (each holds a connection). A pool whose
threads do not come back for their next task (gevent and eventlet start a greenlet per
task) never reads its own: the 17th sent reads the oldest, whose answer is long in."""

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
class Completion:
    """A run's completion, sent and not yet confirmed (:meth:`Renewer.complete_later`).

    Attributes:
        pending: Its answer to read (None once read, or when it must be sent again).
        resend: Completes again, waiting for the answer (safe: same attempt, same fence).
        on_lost: The store answered that another attempt owns the key.
        on_failed: It could not be confirmed before the lease would end, or was refused
            for good.
    """

    pending: PendingCompletion | None
    resend: Callable[[], bool]
    on_lost: Callable[[], None]
    on_failed: Callable[[IdempotencyError], None]
    done: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


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
    completion: Completion | None = None
    """The run's completion, sent and not yet confirmed: the lease is kept until it is."""
    overdue_told: bool = False


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
        self._local = threading.local()
        self._unread: collections.deque[Lease] = collections.deque()

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

    def complete_later(self, lease: Lease, completion: Completion) -> None:
        """Keep ``lease`` alive until ``completion`` is confirmed, off the task's path.

        The run's body has ended (:meth:`body_ended` was told). The answer is read by
        this thread's next :meth:`settle_sent` (before its next claim, when the answer
        has long arrived) or, if that does not come first, by the renewal thread when
        the lease is due: instead of renewing it, it reads the answer, and sends the
        completion again after a failure, until the lease would have run out.
        """
        lease.completion = completion
        sent = getattr(self._local, "sent", None)
        if sent is None:
            sent = self._local.sent = []
        sent.append(lease)
        unread = self._unread
        unread.append(lease)
        while len(unread) > MAX_UNREAD:
            oldest = unread.popleft()
            if oldest.completion is not None and not oldest.completion.done:
                self._settle_or_hand_over(oldest)

    def settle_sent(self) -> None:
        """Read the answers of the completions this thread sent (see :meth:`complete_later`).

        Free when there are none. A completion whose answer cannot be read (the store
        failed) is left to the renewal thread, woken for it.
        """
        sent = getattr(self._local, "sent", None)
        if not sent:
            return
        self._local.sent = []
        for lease in sent:
            self._settle_or_hand_over(lease)

    def _settle_or_hand_over(self, lease: Lease) -> None:
        """Read the answer in this thread; if there is none, the renewal thread resends."""
        try:
            settled = self._settle(lease, resend=False)
        except StoreUnavailable:
            settled = False
        if not settled:
            lease.due = self._clock()
            self._wake.set()

    def settle_all(self) -> None:
        """Before the process exits: confirm every completion it sent, waiting for each."""
        with self._lock:
            leases = [lease for lease in self._live.values() if lease.completion is not None]
        for lease in leases:
            try:
                self._settle(lease, resend=True)
            except StoreUnavailable as exc:
                self._give_up(lease, exc)

    def _settle(self, lease: Lease, *, resend: bool) -> bool:
        """Read (or, with ``resend``, get again) the answer of ``lease``'s completion.

        Returns:
            False when there is no answer to read (it was lost, the completion waits to be
            sent again) and ``resend`` is off; True once it is settled (by anyone).

        Raises:
            StoreUnavailable: No answer: the completion must be sent again.
        """
        completion = lease.completion
        assert completion is not None
        owned, failure = True, None
        with completion.lock:
            if completion.done:
                return True
            try:
                if completion.pending is not None:
                    pending, completion.pending = completion.pending, None
                    owned = pending.result()
                elif resend:
                    owned = completion.resend()
                else:
                    return False
            except StoreUnavailable:
                raise
            except IdempotencyError as exc:  # refused for good: the task's outcome stands
                failure = exc
            completion.done = True
        self._drop(lease)
        if failure is not None:
            completion.on_failed(failure)
        elif not owned:
            completion.on_lost()
        return True

    def _give_up(self, lease: Lease, exc: IdempotencyError) -> None:
        """The completion could not be confirmed while the lease lasted: report it."""
        completion = lease.completion
        assert completion is not None
        with completion.lock:
            if completion.done:
                return
            completion.done = True
        self._drop(lease)
        completion.on_failed(exc)

    def _drop(self, lease: Lease) -> None:
        lease.cancelled = True
        with self._lock:
            self._live.pop(id(lease), None)

    def body_ended(self, lease: Lease) -> None:
        """The run's body returned; its lease is kept for a completion not yet confirmed.

        Warns as :meth:`remove` does when the renewal was overdue while the body ran.
        """
        self._warn_if_overdue(lease)

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
        if first:
            self._warn_if_overdue(lease)

    def _warn_if_overdue(self, lease: Lease) -> None:
        overdue = self._clock() - lease.due
        period = renewal_period(lease.lease)
        if lease.due and overdue > period and not lease.overdue_told:
            lease.overdue_told = True
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
        if lease.completion is not None:
            self._settle_due(lease)
            return
        failed, started = False, self._clock()
        try:
            owned = lease.store.renew(lease.key, token=lease.token, lease=lease.lease)
        except StoreUnavailable as exc:
            logger.warning("celery-idem could not renew the lease of %s: %s", lease.describe, exc)
            owned, failed = True, True
        except Exception:  # the thread must outlive any one bad renewal; keep trying
            logger.exception("celery-idem renewal of %s failed", lease.describe)
            owned, failed = True, True
        if lease.cancelled or lease.completion is not None:
            return  # the run ended meanwhile: this renewal's answer no longer counts
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

    def _settle_due(self, lease: Lease) -> None:
        """The renewal thread's turn at a completion not yet confirmed (instead of a renewal)."""
        try:
            self._settle(lease, resend=True)
        except StoreUnavailable as exc:
            if self._clock() - lease.confirmed >= lease.lease:
                logger.warning(
                    "celery-idem could not confirm the completion of %s before its lease "
                    "ran out", lease.describe,
                )  # fmt: skip
                self._give_up(lease, exc)
            else:
                lease.due = next_due(self._clock(), lease.lease, failed=True)
        except Exception:  # the thread must outlive any one bad completion
            logger.exception("celery-idem could not confirm the completion of %s", lease.describe)
            lease.due = next_due(self._clock(), lease.lease, failed=True)


renewer = Renewer()
"""The process-wide renewer that :class:`~celery_idem.IdempotentTask` uses."""
