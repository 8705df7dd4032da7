"""RedisStore: celery-idem's records on Redis (one server, Sentinel or Cluster).

``RedisStore`` is the task's hot path, :class:`RedisHotPath` (this module: claim, renew,
complete, ...), plus the operators' tools, :class:`~celery_idem.store.redis_admin.RedisAdmin`,
on one client and one set of registered scripts (``redis_base``). Each transition of a
record is one Lua script in ``store/lua`` (its contract is the comment at its top); this
module turns the scripts' replies into typed outcomes (the codes are
:class:`~celery_idem.store.record.ClaimState`'s) and every redis-py error into
:class:`~celery_idem.exceptions.StoreUnavailable`, chained.

Every script reads and writes exactly one key, so on Redis Cluster each runs on the
node owning that key's slot and never meets CROSSSLOT; redis-py's cluster client
follows MOVED/ASK. With ``idem_min_replicas`` a claim or a completion is pipelined
with ``WAIT`` on the same connection: still one round trip (see
:meth:`RedisHotPath._durable`). The tasks' stores come from ``connect`` (one per
process and endpoint); :meth:`RedisStore.from_url` builds a new one.
"""

from __future__ import annotations

import contextlib
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.commands.core import Script

from celery_idem.checks import check_store_durations
from celery_idem.config import resolve_settings
from celery_idem.endpoint import Endpoint
from celery_idem.exceptions import IdempotencyError, ReplicasNotReached, StoreUnavailable
from celery_idem.store.base import (
    ClaimOutcome,
    ClaimRequest,
    CompleteRequest,
    PendingCompletion,
    ReserveRequest,
    Settled,
    StepRequest,
    Stored,
)
from celery_idem.store.clients import client_for
from celery_idem.store.record import ClaimState, RecordKind, claimed_steps
from celery_idem.store.redis_admin import RedisAdmin
from celery_idem.store.redis_base import ERRORS, RedisBase, Scripts, text
from celery_idem.store.wire import PendingReply, Wire

__all__ = ["RedisHotPath", "RedisStore"]


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class RedisHotPath(RedisBase):
    """A :class:`~celery_idem.store.base.Store` on Redis: the task's hot path.

    Args:
        client: A redis-py client that returns bytes (see
            :class:`~celery_idem.store.redis_base.RedisBase`, as for ``url`` and
            ``scripts``).
        url: Where the client points, for error messages only.
        min_replicas: Replicas a claim and a completion must reach before they count.
        replicas_timeout: Seconds ``WAIT`` may block for them.
        scripts: The client's scripts, if already registered.
    """

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        *,
        url: str = "",
        min_replicas: int = 0,
        replicas_timeout: float = 1.0,
        scripts: Scripts | None = None,
    ) -> None:
        super().__init__(client, url=url, scripts=scripts)
        self.min_replicas = min_replicas
        self._wait_ms = _ms(replicas_timeout)

    def _refresh_slots(self) -> None:
        """After a failed call on Cluster, re-read the slot map (best effort).

        The WAIT path talks to one node directly, bypassing the refresh redis-py's
        cluster client does after a connection error: without this, claims for a dead
        primary's slots would keep going to it after the cluster promoted a replica.
        """
        if self.cluster:
            with contextlib.suppress(Exception):
                self.client.nodes_manager.initialize()

    def _node_connection(self, key: str, asked: tuple[str, int] | None) -> Any:
        """The connection a WAIT pipeline for ``key`` must use (see :meth:`_durable`)."""
        if not self.cluster:
            return self.client
        cluster: Any = self.client
        node = cluster.get_node(host=asked[0], port=asked[1]) if asked else None
        if node is None:
            node = cluster.get_node_from_key(key)
        return cluster.get_redis_connection(node)

    def _durable(self, script: Script, key: str, args: list[Any]) -> tuple[Any, Any]:
        """Run ``script`` and ``WAIT min_replicas`` in one pipeline: one round trip.

        ``WAIT`` cannot run inside a script, and counts only the writes of its own
        connection, so both go down the same connection: the pipeline of the
        (Sentinel-found) primary, or of the Cluster node owning ``key``. After NOSCRIPT
        (a failover, a restart) the pair is sent again behind ``SCRIPT LOAD`` in the same
        pipeline (loaded through the pool, the script could reach another server); on
        Cluster, after MOVED the slot map is refreshed, and after ASK (a slot being
        migrated) the pair goes to the importing node behind ``ASKING``.

        Returns:
            The script's reply, and how many replicas acknowledged it, or ``WAIT``'s
            own error (the script may have written: the caller decides what to undo).
        """
        asked: tuple[str, int] | None = None
        load = False
        for attempt in range(4):
            try:
                conn = self._node_connection(key, asked)
                pipe = conn.pipeline(transaction=False)
                if load:  # in the same pipeline: the load reaches the server the call does
                    pipe.script_load(script.script)
                if asked:  # ASKING covers the next command only
                    pipe.execute_command("ASKING")
                pipe.evalsha(script.sha, 1, key, *args)
                pipe.execute_command("WAIT", self.min_replicas, self._wait_ms)
                *_, reply, acked = pipe.execute(raise_on_error=False)
                if attempt < 3 and isinstance(reply, redis.exceptions.NoScriptError):
                    load = True
                    continue
            except ERRORS as exc:
                self._refresh_slots()
                raise self.error_for(key, exc) from exc
            if attempt < 3 and self.cluster and isinstance(reply, redis.exceptions.AskError):
                if isinstance(reply, redis.exceptions.MovedError):
                    self._refresh_slots()
                    asked = None
                else:
                    asked = (reply.host, int(reply.port))
                continue
            if isinstance(reply, ERRORS):
                raise self.error_for(key, reply) from reply
            return reply, acked if isinstance(acked, ERRORS) else int(acked)
        raise AssertionError("unreachable")  # pragma: no cover

    def _release_quietly(self, key: str, token: str) -> None:
        """Release this attempt's claim if it holds one; a failure changes nothing."""
        with contextlib.suppress(IdempotencyError):
            self.run_script(self.scripts.release, key, [token])

    def _not_durable(self, key: str, what: str, acked: int) -> ReplicasNotReached:
        return ReplicasNotReached(
            f"the idempotency store at {self.url} wrote the {what} of record {key!r} but "
            f"only {acked} of idem_min_replicas={self.min_replicas} replica(s) confirmed it "
            f"within {self._wait_ms} ms (WAIT), so a failover could lose it. Check the "
            f"replicas' health and lag, or lower idem_min_replicas / raise "
            f"idem_min_replicas_timeout.",
            key=key,
        )

    def claim(self, request: ClaimRequest) -> ClaimOutcome:
        """See :meth:`celery_idem.store.base.Store.claim`."""
        key, token, lease = request.key, request.token, request.lease
        check_store_durations(lease=lease, ttl=request.ttl)
        args = [
            token, request.task_id, request.fingerprint, _ms(lease), _ms(request.ttl + lease),
            request.max_takeovers,
        ]  # fmt: skip
        acked: Any = 0
        if not self.min_replicas:
            reply = self.run_script(self.scripts.claim, key, args)
        else:
            try:
                reply, acked = self._durable(self.scripts.claim, key, args)
            except StoreUnavailable as exc:
                if isinstance(exc.__cause__, redis.TimeoutError):
                    self._release_quietly(key, token)  # the claim may have gone through
                raise
        state, fence = ClaimState(int(reply[0])), int(reply[1])
        if state is ClaimState.CLAIMED:
            if isinstance(acked, BaseException) or acked < self.min_replicas:
                # Not durable, so not a claim: free the key for the retry (the lease
                # would free it too, later) and do not run the body.
                self._release_quietly(key, token)
                if isinstance(acked, BaseException):
                    raise self.error_for(key, acked) from acked
                raise self._not_durable(key, "claim", acked)
            return ClaimOutcome(
                state, fence, request.task_id, took_over=bool(reply[2]),
                steps=claimed_steps(
                    reply[3], key=key, where=self.url,
                    release=lambda: self.release(key, token=token),
                ),
            )  # fmt: skip
        owner = text(reply[2])
        if state is ClaimState.COMPLETED:
            stored = Stored(RecordKind(text(reply[3])), bytes(reply[4]), text(reply[5]))
            return ClaimOutcome(
                state, fence, owner, stored=stored, continuation_pending=bool(int(reply[6]))
            )
        if state is ClaimState.IN_PROGRESS:
            return ClaimOutcome(state, fence, owner, int(reply[3]) / 1000.0)
        if state is ClaimState.QUARANTINED:
            return ClaimOutcome(
                state, fence, owner, takeovers=int(reply[3]), quarantined_now=bool(int(reply[4]))
            )
        return ClaimOutcome(state, fence, owner)  # MISMATCH

    def renew(self, key: str, *, token: str, lease: float) -> bool:
        """See :meth:`celery_idem.store.base.Store.renew`."""
        check_store_durations(lease=lease)
        # The record must outlive the lease by the retention the claim gave it; one
        # lease of slack is enough because a renewal arrives every lease/3.
        return bool(self.run_script(self.scripts.renew, key, [token, _ms(lease), _ms(2 * lease)]))

    def complete(self, request: CompleteRequest) -> bool:
        """See :meth:`celery_idem.store.base.Store.complete`."""
        key = request.key
        args = _complete_args(request)
        if not self.min_replicas:
            return bool(self.run_script(self.scripts.complete, key, args))
        reply, acked = self._durable(self.scripts.complete, key, args)
        if isinstance(acked, BaseException):
            raise self.error_for(key, acked) from acked
        if reply and acked < self.min_replicas:
            # Stored on the primary; a retry finds it there (complete.lua answers 1 to
            # the same attempt) and waits for the replicas again.
            raise self._not_durable(key, "result", acked)
        return bool(reply)

    def send_completion(self, request: CompleteRequest) -> PendingCompletion:
        """See :meth:`celery_idem.store.base.Store.send_completion` and ``wire.py``.

        With ``idem_min_replicas`` the completion must be confirmed by ``WAIT`` before
        it counts, and a Cluster client has no :attr:`wire`: both complete at once; so
        does the first completion of the process (the server may not have the script
        yet, and a ``NOSCRIPT`` read later would leave the key in progress meanwhile).
        """
        if (
            self.wire is None
            or self.min_replicas
            or self.scripts.complete.sha not in self.wire.known
        ):
            return Settled(self.complete(request))
        args = _complete_args(request)
        try:
            sent = self.wire.send(self.scripts.complete, request.key, args)
        except ERRORS as exc:
            raise self.error_for(request.key, exc) from exc
        return _SentCompletion(self, self.wire, request, sent)

    def dispatched(self, key: str, *, task_id: str) -> bool:
        """See :meth:`celery_idem.store.base.Store.dispatched`."""
        return bool(self.run_script(self.scripts.dispatched, key, [task_id]))

    def step(self, request: StepRequest) -> bool:
        """See :meth:`celery_idem.store.base.Store.step` and ``lua/step.lua``."""
        args = [
            request.token, request.position, request.name, request.occurrence, request.codec,
            request.value,
        ]  # fmt: skip
        reply = int(self.run_script(self.scripts.step, request.key, args))
        if reply < 0:
            raise IdempotencyError(
                f"record {request.key!r} holds fewer durable steps than step "
                f"{request.name!r} (position {request.position}) follows; nothing was written",
                key=request.key,
            )
        return bool(reply)

    def release(self, key: str, *, token: str) -> bool:
        """See :meth:`celery_idem.store.base.Store.release`."""
        return bool(self.run_script(self.scripts.release, key, [token]))

    def park(self, key: str, *, token: str, hold: float) -> bool:
        """See :meth:`celery_idem.store.base.Store.park`."""
        check_store_durations(hold=hold)
        return bool(self.run_script(self.scripts.park, key, [token, _ms(hold), _ms(2 * hold)]))

    def peek(self, key: str, *, fingerprint: str) -> ClaimOutcome | None:
        """See :meth:`celery_idem.store.base.Store.peek` and ``lua/peek.lua``."""
        return _looked_up(self.run_script(self.scripts.peek, key, [fingerprint]))

    def reserve(self, request: ReserveRequest) -> ClaimOutcome | None:
        """See :meth:`celery_idem.store.base.Store.reserve` and ``lua/reserve.lua``."""
        check_store_durations(hold=request.hold)
        args = [request.task_id, request.fingerprint, _ms(request.hold)]
        return _looked_up(self.run_script(self.scripts.reserve, request.key, args))

    def unreserve(self, key: str, *, task_id: str) -> bool:
        """See :meth:`celery_idem.store.base.Store.unreserve` and ``lua/unreserve.lua``."""
        return bool(self.run_script(self.scripts.unreserve, key, [task_id]))


def _complete_args(request: CompleteRequest) -> list[Any]:
    """``complete.lua``'s ARGV for ``request`` (checked: a TTL Redis can hold)."""
    stored = request.stored
    check_store_durations(ttl=request.ttl)
    return [
        request.token, request.fence, stored.kind.value, stored.payload, stored.codec,
        _ms(request.ttl), request.task_id, "+" if request.continuation else "",
    ]  # fmt: skip


class _SentCompletion:
    """``complete.lua`` written on a held connection; its reply is read by :meth:`result`."""

    def __init__(
        self, store: RedisHotPath, wire: Wire, request: CompleteRequest, sent: PendingReply
    ) -> None:
        self.store, self.wire, self.request, self.sent = store, wire, request, sent

    def result(self) -> bool:
        """See :meth:`celery_idem.store.base.PendingCompletion.result`."""
        try:
            return bool(self.sent.read())
        except redis.exceptions.NoScriptError:
            # The server lost its scripts (a restart): complete() loads it and sends
            # again, and until the scripts answer again, completions are waited for.
            self.wire.scripts_lost()
        except redis.ResponseError as exc:
            raise self.store.error_for(self.request.key, exc) from exc
        except ERRORS:
            # The reply was lost with its connection: ask again (safe to repeat).
            self.wire.scripts_lost()
        return self.store.complete(self.request)


def _looked_up(reply: Any) -> ClaimOutcome | None:
    """A publisher's look-up (``peek.lua``, ``reserve.lua``): None when code 0."""
    code = int(reply[0])
    if code == 0:  # nothing holds the key (or: publish anyway)
        return None
    state = ClaimState(code)
    left = int(reply[3]) / 1000.0 if state is ClaimState.IN_PROGRESS else 0.0
    return ClaimOutcome(state, int(reply[1]), text(reply[2]), left)


class RedisStore(RedisHotPath, RedisAdmin):
    """A :class:`~celery_idem.store.base.Store` and :class:`~celery_idem.store.base.StoreAdmin`.

    The hot path and the operators' tools on one client, sharing its scripts; see
    :class:`RedisHotPath` for the arguments. The tasks' stores are cached per process
    and endpoint by ``celery_idem.store.connect``.
    """

    @classmethod
    def from_url(cls, url: str, *, min_replicas: int = 0) -> RedisStore:
        """A new store for any ``idem_redis_url`` form (not cached, unlike the tasks' own).

        Raises:
            IdempotencyConfigError: The URL is malformed or names no Redis.
        """
        conf = {"idem_redis_url": url, "idem_min_replicas": min_replicas}
        endpoint = resolve_settings(conf).endpoint
        assert endpoint is not None
        return cls.for_endpoint(endpoint)

    @classmethod
    def for_endpoint(cls, endpoint: Endpoint) -> RedisStore:
        """A new store, with a new client, for ``endpoint``.

        Raises:
            IdempotencyConfigError: redis-py refused the endpoint (see ``client_for``).
            StoreUnavailable: A client that connects when built could not reach Redis.
        """
        return cls(
            client_for(endpoint),
            url=endpoint.display,
            min_replicas=endpoint.min_replicas,
            replicas_timeout=endpoint.replicas_timeout,
        )
