"""PostgresStore: celery-idem's records in one PostgreSQL table.

``PostgresStore`` is the task's hot path, :class:`PostgresHotPath` (this module: claim,
renew, complete, ...), plus the operators' tools,
:class:`~celery_idem.store.postgres_admin.PostgresAdmin`, on one pool of autocommit
connections (``postgres_base``). Each transition is one PL/pgSQL function of
``sql/schema.sql`` (its contract is the comment above it), run as one statement in its
own transaction: one round trip, as one Lua script is on Redis. This module turns the
functions' rows into typed outcomes (the codes are
:class:`~celery_idem.store.record.ClaimState`'s) and psycopg's errors into
:class:`~celery_idem.exceptions.StoreUnavailable` (an outage) or
:class:`~celery_idem.exceptions.IdempotencyError`, chained.

What Redis cannot do: :meth:`PostgresStore.completion_statement` hands out the
completion as SQL for the caller's own transaction, so a task's database writes and its
idempotency record commit (or roll back) together.
"""

from __future__ import annotations

from typing import Any

from celery_idem.checks import check_store_durations
from celery_idem.exceptions import IdempotencyError
from celery_idem.store.base import (
    ClaimOutcome,
    ClaimRequest,
    CompleteRequest,
    ReserveRequest,
    Settled,
    StepRequest,
    Stored,
)
from celery_idem.store.postgres_admin import PostgresAdmin
from celery_idem.store.postgres_base import STEP_GAP_SQLSTATE, PostgresBase, sqlstate_of
from celery_idem.store.record import ClaimState, RecordKind, claimed_steps

__all__ = ["PostgresHotPath", "PostgresStore"]

_CLAIM = (
    "SELECT * FROM celery_idem_claim(%s::text, %s::text, %s::text, %s::text, %s::bigint, "
    "%s::bigint, %s::integer)"
)
_COMPLETE = (
    "SELECT celery_idem_complete(%s::text, %s::text, %s::bigint, %s::text, %s::bytea, "
    "%s::text, %s::bigint, %s::text, %s::boolean)"
)
_STEP = (
    "SELECT celery_idem_step(%s::text, %s::text, %s::integer, %s::text, %s::integer, "
    "%s::text, %s::bytea)"
)
_RENEW = "SELECT celery_idem_renew(%s::text, %s::text, %s::bigint, %s::bigint)"
_PARK = "SELECT celery_idem_park(%s::text, %s::text, %s::bigint, %s::bigint)"
_RELEASE = "SELECT celery_idem_release(%s::text, %s::text)"
_DISPATCHED = "SELECT celery_idem_dispatched(%s::text, %s::text)"
_PEEK = "SELECT * FROM celery_idem_peek(%s::text, %s::text)"
_RESERVE = "SELECT * FROM celery_idem_reserve(%s::text, %s::text, %s::text, %s::bigint)"
_UNRESERVE = "SELECT celery_idem_unreserve(%s::text, %s::text)"


def _ms(seconds: float) -> int:
    """Whole milliseconds, at least 1 (as the Redis store sends them)."""
    return max(1, int(seconds * 1000))


def completion_statement(request: CompleteRequest) -> tuple[str, tuple[Any, ...]]:
    """See :meth:`PostgresStore.completion_statement`."""
    stored = request.stored
    check_store_durations(ttl=request.ttl)
    params = (
        request.key, request.token, request.fence, stored.kind.value, stored.payload,
        stored.codec, _ms(request.ttl), request.task_id, request.continuation,
    )  # fmt: skip
    return _COMPLETE, params


def step_statement(request: StepRequest) -> tuple[str, tuple[Any, ...]]:
    """See :meth:`PostgresStore.step_statement`."""
    params = (
        request.key, request.token, request.position, request.name, request.occurrence,
        request.codec, request.value,
    )  # fmt: skip
    return _STEP, params


class PostgresHotPath(PostgresBase):
    """A :class:`~celery_idem.store.base.Store` on PostgreSQL: the task's hot path.

    See :class:`~celery_idem.store.postgres_base.PostgresBase` for the arguments.
    """

    def _flag(self, key: str, sql: str, params: tuple[Any, ...]) -> bool:
        """A function answering one boolean (true: written)."""
        ((answer,),) = self.call(key, sql, params)
        return bool(answer)

    def claim(self, request: ClaimRequest) -> ClaimOutcome:
        """See :meth:`celery_idem.store.base.Store.claim` and ``celery_idem_claim``."""
        key, lease = request.key, request.lease
        check_store_durations(lease=lease, ttl=request.ttl)
        params = (
            key, request.token, request.task_id, request.fingerprint, _ms(lease),
            _ms(request.ttl + lease), request.max_takeovers,
        )  # fmt: skip
        ((code, fence, owner, took_over, ms_left, kind, payload, codec, pending, takeovers,
          quarantined_now, steps),) = self.call(key, _CLAIM, params)  # fmt: skip
        state, fence = ClaimState(int(code)), int(fence)
        if state is ClaimState.CLAIMED:
            return ClaimOutcome(
                state, fence, request.task_id, took_over=bool(took_over),
                steps=claimed_steps(
                    steps, key=key, where=self.url,
                    release=lambda: self.release(key, token=request.token),
                ),
            )  # fmt: skip
        if state is ClaimState.COMPLETED:
            stored = Stored(RecordKind(kind), bytes(payload), codec)
            return ClaimOutcome(state, fence, owner, stored=stored, continuation_pending=pending)
        if state is ClaimState.IN_PROGRESS:
            return ClaimOutcome(state, fence, owner, int(ms_left) / 1000.0)
        if state is ClaimState.QUARANTINED:
            return ClaimOutcome(
                state, fence, owner, takeovers=int(takeovers),
                quarantined_now=bool(quarantined_now),
            )  # fmt: skip
        return ClaimOutcome(state, fence, owner)  # MISMATCH

    def renew(self, key: str, *, token: str, lease: float) -> bool:
        """See :meth:`celery_idem.store.base.Store.renew` and ``celery_idem_renew``."""
        check_store_durations(lease=lease)
        # The row must outlive the lease; one lease of slack, as a renewal comes every lease/3.
        return self._flag(key, _RENEW, (key, token, _ms(lease), _ms(2 * lease)))

    def complete(self, request: CompleteRequest) -> bool:
        """See :meth:`celery_idem.store.base.Store.complete`: :meth:`completion_statement`."""
        sql, params = completion_statement(request)
        return self._flag(request.key, sql, params)

    def send_completion(self, request: CompleteRequest) -> Settled:
        """Completes at once: there is no reply to read later on a pooled connection."""
        return Settled(self.complete(request))

    def dispatched(self, key: str, *, task_id: str) -> bool:
        """See :meth:`celery_idem.store.base.Store.dispatched` and ``celery_idem_dispatched``."""
        return self._flag(key, _DISPATCHED, (key, task_id))

    def step(self, request: StepRequest) -> bool:
        """See :meth:`celery_idem.store.base.Store.step`: :meth:`step_statement`."""
        sql, params = step_statement(request)
        try:
            return self._flag(request.key, sql, params)
        except IdempotencyError as exc:
            if sqlstate_of(exc.__cause__ or exc) != STEP_GAP_SQLSTATE:
                raise
            raise IdempotencyError(
                f"record {request.key!r} holds fewer durable steps than step "
                f"{request.name!r} (position {request.position}) follows; nothing was written",
                key=request.key,
            ) from exc.__cause__

    def release(self, key: str, *, token: str) -> bool:
        """See :meth:`celery_idem.store.base.Store.release` and ``celery_idem_release``."""
        return self._flag(key, _RELEASE, (key, token))

    def park(self, key: str, *, token: str, hold: float) -> bool:
        """See :meth:`celery_idem.store.base.Store.park` and ``celery_idem_park``."""
        check_store_durations(hold=hold)
        return self._flag(key, _PARK, (key, token, _ms(hold), _ms(2 * hold)))

    def peek(self, key: str, *, fingerprint: str) -> ClaimOutcome | None:
        """See :meth:`celery_idem.store.base.Store.peek` and ``celery_idem_peek``."""
        return _looked_up(self.call(key, _PEEK, (key, fingerprint))[0])

    def reserve(self, request: ReserveRequest) -> ClaimOutcome | None:
        """See :meth:`celery_idem.store.base.Store.reserve` and ``celery_idem_reserve``."""
        check_store_durations(hold=request.hold)
        params = (request.key, request.task_id, request.fingerprint, _ms(request.hold))
        return _looked_up(self.call(request.key, _RESERVE, params)[0])

    def unreserve(self, key: str, *, task_id: str) -> bool:
        """See :meth:`celery_idem.store.base.Store.unreserve` and ``celery_idem_unreserve``."""
        return self._flag(key, _UNRESERVE, (key, task_id))


def _looked_up(row: tuple[Any, ...]) -> ClaimOutcome | None:
    """A publisher's look-up (peek, reserve): None when code 0."""
    code, fence, task_id, ms_left = row
    if int(code) == 0:  # nothing holds the key (or: publish anyway)
        return None
    state = ClaimState(int(code))
    left = int(ms_left) / 1000.0 if state is ClaimState.IN_PROGRESS else 0.0
    return ClaimOutcome(state, int(fence), task_id, left)


class PostgresStore(PostgresHotPath, PostgresAdmin):
    """A :class:`~celery_idem.store.base.Store` and :class:`~celery_idem.store.base.StoreAdmin`.

    The hot path and the operators' tools on one pool; see
    :class:`~celery_idem.store.postgres_base.PostgresBase` for the arguments. The schema
    must be migrated first (``celery -A proj idem migrate``); the first statement of a
    store checks it.
    """

    @classmethod
    def from_url(cls, url: str) -> PostgresStore:
        """A new store (its own pool) for a ``postgresql://`` or ``postgres://`` URL.

        Raises:
            IdempotencyConfigError: Not a PostgreSQL URL, one libpq cannot parse, or
                psycopg is not installed. Nothing is connected yet.
        """
        return cls(url)

    @staticmethod
    def completion_statement(request: CompleteRequest) -> tuple[str, tuple[Any, ...]]:
        """The completion as one SQL statement for the caller's own transaction.

        Run it on any connection of the store's database (psycopg, a Django cursor,
        SQLAlchemy's ``exec_driver_sql``: ``%s`` placeholders, every one cast) inside the
        transaction that holds the task's own writes. It returns one row with one
        boolean: true when written (it commits with the transaction, and the record's
        row stays locked until then), false when ``request.token`` no longer owns the
        key (another attempt took it over): roll the whole transaction back. The same
        statement :meth:`complete` runs on its own.

        Raises:
            IdempotencyConfigError: ``request.ttl`` is longer than any store holds.
        """
        return completion_statement(request)

    @staticmethod
    def step_statement(request: StepRequest) -> tuple[str, tuple[Any, ...]]:
        """A durable step's record as one SQL statement for the caller's transaction.

        As :meth:`completion_statement`: one row, one boolean (false: the token no longer
        owns the key; roll back). A position that skips a step never stored raises
        SQLSTATE ``IDM01`` in the caller's transaction. The statement :meth:`step` runs.
        """
        return step_statement(request)
