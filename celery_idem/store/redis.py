"""RedisStore: the only code that talks to Redis.

Each transition of a record is one Lua script in ``store/lua`` (its contract is the
comment at its top), run with EVALSHA through redis-py's ``Script`` objects, which
reload a script transparently after ``NOSCRIPT`` (a restart, a failover, ``SCRIPT
FLUSH``). This module turns the scripts' replies into typed outcomes and every
redis-py error into :class:`~celery_idem.exceptions.StoreUnavailable`, chained.

Every script reads and writes exactly one key, so on Redis Cluster each runs on the
node owning that key's slot and never meets CROSSSLOT; redis-py's cluster client
follows MOVED/ASK. With ``idem_min_replicas`` a claim or a completion is pipelined
with ``WAIT`` on the same connection: still one round trip (see :meth:`_durable`).
The operators' tools (SCAN, summaries, INFO) live in ``redis_admin.py``.
"""

from __future__ import annotations

import contextlib
from importlib import resources
from typing import Any

import redis
from redis.cluster import RedisCluster

from celery_idem.checks import check_store_durations
from celery_idem.endpoint import sanitize_url
from celery_idem.exceptions import IdempotencyError, ReplicasNotReached, StoreUnavailable
from celery_idem.store.base import ClaimOutcome, ClaimState, RecordKind, Stored, StoredRecord
from celery_idem.store.redis_admin import ERRORS, RedisAdmin, is_outage
from celery_idem.store.redis_admin import text as _text

__all__ = ["RedisStore"]

_SCRIPT_NAMES = (
    "claim", "renew", "complete", "dispatched", "release", "park", "peek", "read", "summary",
    "forget",
)  # fmt: skip
_COMPLETED = {kind.value: kind for kind in RecordKind}


def _load_sources() -> dict[str, str]:
    """Each script with the record codec (``record.lua``) in front of it."""
    lua = resources.files("celery_idem.store").joinpath("lua")
    prelude = lua.joinpath("record.lua").read_text("utf-8")
    return {
        name: prelude + lua.joinpath(f"{name}.lua").read_text("utf-8") for name in _SCRIPT_NAMES
    }


def _decode_record(raw: bytes) -> dict[str, Any]:
    """Parse the format documented in ``lua/record.lua`` (the Lua ``decode``, in Python)."""
    out: dict[str, Any] = {"s": raw[:1].decode()}
    pos = 1
    for name in ("f", "d", "n"):
        colon = raw.index(b":", pos)
        out[name], pos = int(raw[pos:colon]), colon + 1
    for name in ("o", "a", "i", "c"):
        colon = raw.index(b":", pos)
        start = colon + 1
        end = start + int(raw[pos:colon])
        out[name], pos = raw[start:end], end
    out["r"] = raw[pos:]
    return out


_SOURCES = _load_sources()


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class RedisStore(RedisAdmin):
    """A :class:`~celery_idem.store.base.Store` on Redis: one server, Sentinel or Cluster.

    Args:
        client: A redis-py client that returns bytes (``decode_responses=False``):
            ``redis.Redis`` (standalone, or a Sentinel ``master_for`` client) or
            ``redis.cluster.RedisCluster``.
        url: Where the client points, for error messages only (a password is masked).
        min_replicas: Replicas a claim and a completion must reach before they count.
        replicas_timeout: Seconds ``WAIT`` may block for them.
    """

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        *,
        url: str = "",
        min_replicas: int = 0,
        replicas_timeout: float = 1.0,
    ) -> None:
        self.client = client
        self.url = sanitize_url(url) if url else "Redis"  # never log a password
        self.cluster = isinstance(client, RedisCluster)
        self.min_replicas = min_replicas
        self._wait_ms = _ms(replicas_timeout)
        self._claim = client.register_script(_SOURCES["claim"])
        self._renew = client.register_script(_SOURCES["renew"])
        self._complete = client.register_script(_SOURCES["complete"])
        self._dispatched = client.register_script(_SOURCES["dispatched"])
        self._release = client.register_script(_SOURCES["release"])
        self._park = client.register_script(_SOURCES["park"])
        self._peek = client.register_script(_SOURCES["peek"])
        self._read = client.register_script(_SOURCES["read"])
        self._summary = client.register_script(_SOURCES["summary"])
        self._forget = client.register_script(_SOURCES["forget"])

    @classmethod
    def from_url(cls, url: str, *, min_replicas: int = 0) -> RedisStore:
        """A new store for any ``idem_redis_url`` form (not cached, unlike the tasks' own).

        Raises:
            IdempotencyConfigError: The URL is malformed or names no Redis.
        """
        from celery_idem.config import resolve_settings  # noqa: PLC0415 - config is pure
        from celery_idem.store.connect import client_for  # noqa: PLC0415 - imports this module

        conf = {"idem_redis_url": url, "idem_min_replicas": min_replicas}
        endpoint = resolve_settings(conf).endpoint
        assert endpoint is not None
        return cls(
            client_for(endpoint),
            url=endpoint.display,
            min_replicas=endpoint.min_replicas,
            replicas_timeout=endpoint.replicas_timeout,
        )

    def _error(self, key: str, exc: BaseException) -> IdempotencyError:
        """An outage becomes StoreUnavailable; any other refusal a permanent error.

        ``is_outage`` reads the reply's code, not only redis-py's class: Redis 6.2 wraps
        an ``OOM`` met inside a script into a plain script error, which is an outage too.
        """
        if is_outage(exc) or not isinstance(exc, redis.ResponseError):
            return self._unavailable(key, exc)
        # Not an outage: retrying would fail the same way (a key of another type
        # under our prefix, a damaged record, a script error).
        return IdempotencyError(
            f"the idempotency store at {self.url} refused record {key!r}: "
            f"{type(exc).__name__}: {exc}. Is another application writing under "
            f"idem_key_prefix?",
            key=key,
        )

    def _call(self, script: Any, key: str, args: list[Any]) -> Any:
        try:
            return script(keys=[key], args=args)
        except ERRORS as exc:
            raise self._error(key, exc) from exc

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

    def _durable(self, script: Any, key: str, args: list[Any]) -> tuple[Any, Any]:
        """Run ``script`` and ``WAIT min_replicas`` in one pipeline: one round trip.

        ``WAIT`` cannot run inside a script, and counts only the writes of its own
        connection, so both go down the same connection: the pipeline of the
        (Sentinel-found) primary, or of the Cluster node owning ``key``. After NOSCRIPT
        (a failover, a restart) the script is loaded and the pair sent again; on
        Cluster, after MOVED the slot map is refreshed, and after ASK (a slot being
        migrated) the pair goes to the importing node behind ``ASKING``.

        Returns:
            The script's reply, and how many replicas acknowledged it, or ``WAIT``'s
            own error (the script may have written: the caller decides what to undo).
        """
        asked: tuple[str, int] | None = None
        for attempt in range(4):
            try:
                conn = self._node_connection(key, asked)
                pipe = conn.pipeline(transaction=False)
                if asked:
                    pipe.execute_command("ASKING")
                pipe.evalsha(script.sha, 1, key, *args)
                pipe.execute_command("WAIT", self.min_replicas, self._wait_ms)
                *_, reply, acked = pipe.execute(raise_on_error=False)
                if attempt < 3 and isinstance(reply, redis.exceptions.NoScriptError):
                    script.sha = conn.script_load(script.script)
                    continue
            except ERRORS as exc:
                self._refresh_slots()
                raise self._error(key, exc) from exc
            if attempt < 3 and self.cluster and isinstance(reply, redis.exceptions.AskError):
                if isinstance(reply, redis.exceptions.MovedError):
                    self._refresh_slots()
                    asked = None
                else:
                    asked = (reply.host, int(reply.port))
                continue
            if isinstance(reply, ERRORS):
                raise self._error(key, reply) from reply
            return reply, acked if isinstance(acked, ERRORS) else int(acked)
        raise AssertionError("unreachable")  # pragma: no cover

    def _release_quietly(self, key: str, token: str) -> None:
        """Release this attempt's claim if it holds one; a failure changes nothing."""
        with contextlib.suppress(IdempotencyError):
            self._call(self._release, key, [token])

    def _not_durable(self, key: str, what: str, acked: int) -> ReplicasNotReached:
        return ReplicasNotReached(
            f"the idempotency store at {self.url} wrote the {what} of record {key!r} but "
            f"only {acked} of idem_min_replicas={self.min_replicas} replica(s) confirmed it "
            f"within {self._wait_ms} ms (WAIT), so a failover could lose it. Check the "
            f"replicas' health and lag, or lower idem_min_replicas / raise "
            f"idem_min_replicas_timeout.",
            key=key,
        )

    def claim(
        self,
        key: str,
        *,
        token: str,
        task_id: str,
        fingerprint: str,
        lease: float,
        ttl: float,
        max_takeovers: int = 0,
    ) -> ClaimOutcome:
        """See :meth:`celery_idem.store.base.Store.claim`."""
        check_store_durations(lease=lease, ttl=ttl)
        args = [token, task_id, fingerprint, _ms(lease), _ms(ttl + lease), max_takeovers]
        acked: Any = 0
        if not self.min_replicas:
            reply = self._call(self._claim, key, args)
        else:
            try:
                reply, acked = self._durable(self._claim, key, args)
            except StoreUnavailable as exc:
                if isinstance(exc.__cause__, redis.TimeoutError):
                    self._release_quietly(key, token)  # the claim may have gone through
                raise
        code, fence = int(reply[0]), int(reply[1])
        if code == 1:
            if isinstance(acked, BaseException) or acked < self.min_replicas:
                # Not durable, so not a claim: free the key for the retry (the lease
                # would free it too, later) and do not run the body.
                self._release_quietly(key, token)
                if isinstance(acked, BaseException):
                    raise self._error(key, acked) from acked
                raise self._not_durable(key, "claim", acked)
            return ClaimOutcome(ClaimState.CLAIMED, fence, task_id, took_over=bool(reply[2]))
        owner = _text(reply[2])
        if code == 2:
            stored = Stored(_COMPLETED[_text(reply[3])], bytes(reply[4]), _text(reply[5]))
            return ClaimOutcome(
                ClaimState.COMPLETED, fence, owner, stored=stored,
                continuation_pending=bool(int(reply[6])),
            )  # fmt: skip
        if code == 3:
            return ClaimOutcome(ClaimState.IN_PROGRESS, fence, owner, int(reply[3]) / 1000.0)
        if code == 5:
            return ClaimOutcome(
                ClaimState.QUARANTINED, fence, owner, takeovers=int(reply[3]),
                quarantined_now=bool(int(reply[4])),
            )  # fmt: skip
        return ClaimOutcome(ClaimState.MISMATCH, fence, owner)

    def renew(self, key: str, *, token: str, lease: float) -> bool:
        """See :meth:`celery_idem.store.base.Store.renew`."""
        check_store_durations(lease=lease)
        # The record must outlive the lease by the retention the claim gave it; one
        # lease of slack is enough because a renewal arrives every lease/3.
        return bool(self._call(self._renew, key, [token, _ms(lease), _ms(2 * lease)]))

    def complete(
        self,
        key: str,
        *,
        token: str,
        fence: int,
        task_id: str,
        stored: Stored,
        ttl: float,
        continuation: bool = False,
    ) -> bool:
        """See :meth:`celery_idem.store.base.Store.complete`."""
        check_store_durations(ttl=ttl)
        args = [
            token, fence, stored.kind.value, stored.payload, stored.codec, _ms(ttl), task_id,
            "+" if continuation else "",
        ]  # fmt: skip
        if not self.min_replicas:
            return bool(self._call(self._complete, key, args))
        reply, acked = self._durable(self._complete, key, args)
        if isinstance(acked, BaseException):
            raise self._error(key, acked) from acked
        if reply and acked < self.min_replicas:
            # Stored on the primary; a retry finds it there (complete.lua answers 1 to
            # the same attempt) and waits for the replicas again.
            raise self._not_durable(key, "result", acked)
        return bool(reply)

    def dispatched(self, key: str, *, task_id: str) -> bool:
        """See :meth:`celery_idem.store.base.Store.dispatched`."""
        return bool(self._call(self._dispatched, key, [task_id]))

    def release(self, key: str, *, token: str) -> bool:
        """See :meth:`celery_idem.store.base.Store.release`."""
        return bool(self._call(self._release, key, [token]))

    def park(self, key: str, *, token: str, hold: float) -> bool:
        """See :meth:`celery_idem.store.base.Store.park`."""
        check_store_durations(hold=hold)
        return bool(self._call(self._park, key, [token, _ms(hold), _ms(2 * hold)]))

    def peek(self, key: str, *, fingerprint: str) -> ClaimOutcome | None:
        """See :meth:`celery_idem.store.base.Store.peek`."""
        reply = self._call(self._peek, key, [fingerprint])
        code = int(reply[0])
        if code == 0:
            return None
        state = {2: ClaimState.COMPLETED, 3: ClaimState.IN_PROGRESS, 4: ClaimState.MISMATCH}
        left = int(reply[3]) / 1000.0 if code == 3 else 0.0
        return ClaimOutcome(state[code], int(reply[1]), _text(reply[2]), left)

    def read(self, key: str) -> StoredRecord | None:
        """See :meth:`celery_idem.store.base.Store.read`."""
        now, pttl, raw = self._call(self._read, key, [])
        if not raw:
            return None
        r = _decode_record(bytes(raw))
        state = r["s"]
        stored = None
        if state in _COMPLETED:
            stored = Stored(_COMPLETED[state], bytes(r["r"]), _text(r["c"]))
        return StoredRecord(
            state=state,
            fence=r["f"],
            task_id=_text(r["i"]),
            fingerprint=_text(r["a"]),
            lease_left=(r["d"] - int(now)) / 1000.0 if state == "P" else None,
            ttl=int(pttl) / 1000.0 if int(pttl) >= 0 else None,
            stored=stored,
            parked=state == "P" and r["o"] == b"",
            takeovers=r["n"],
        )
