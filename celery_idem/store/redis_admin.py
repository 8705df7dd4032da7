"""RedisAdmin: the operators' side of :class:`~celery_idem.store.redis.RedisStore`.

This module owns what ``celery idem`` needs beyond the task's hot path (SCAN,
per-record summaries and memory, INFO/CONFIG facts for ``doctor``) and which redis-py
errors count as an outage. On Redis Cluster a SCAN visits each primary in turn (the
cursor carries which one), summaries go key by key (each to its own node), and the
server facts come from one primary.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import redis
from redis.exceptions import RedisClusterException

from celery_idem.exceptions import IdempotencyError, StoreUnavailable
from celery_idem.store.base import ForgetResult, RecordSummary, ServerFacts

__all__ = ["OUTAGES", "OUTAGE_CODES", "RedisAdmin", "is_outage", "outage_code", "text"]

OUTAGE_CODES: Mapping[str, tuple[str | None, str]] = MappingProxyType(
    {
        "OOM": ("OutOfMemoryError", "used memory is over maxmemory, under noeviction"),
        "LOADING": ("BusyLoadingError", "it is loading its data set after a restart"),
        "READONLY": ("ReadOnlyError", "it is a replica now: a failover demoted it"),
        "MASTERDOWN": ("MasterDownError", "it is a replica that lost its primary"),
        "NOREPLICAS": (None, "fewer good replicas than its min-replicas-to-write"),
        "BUSY": (None, "another script runs past lua-time-limit"),
        "CLUSTERDOWN": ("ClusterDownError", "the cluster does not serve every slot"),
        "TRYAGAIN": ("TryAgainError", "a slot is being migrated"),
    }
)
"""The Redis error codes that mean "not now" rather than "never": an outage.

Code -> (the redis-py class that carries it, or None where redis-py has none; what it
means). This is the one list: :func:`outage_code` reads it twice, because a code comes
in two shapes. redis-py turns a reply that starts with a code it knows into that class
and drops the code from the message (Redis 7: ``OutOfMemoryError``, also from inside a
script). Redis 6.0 and 6.2 do not pass a refusal met *inside* a script on as it is:
they wrap it into a script error, which redis-py can only make a plain
``ResponseError``::

    Error running script (call to f_<sha>): @user_script:111: @user_script: 111: -OOM command
    not allowed when used memory > 'maxmemory'.

So the code is also looked for at the start of the message and after that wrapper.
"""

_TRANSIENT: tuple[type[Exception], ...] = (
    *(
        cls
        for name in (
            "ConnectionError",  # includes BusyLoadingError (LOADING) and AuthenticationError
            "TimeoutError",
            "AskError",  # includes MovedError: a slot on the move, or a stale slot map
        )
        if isinstance(cls := getattr(redis.exceptions, name, None), type)
    ),
    RedisClusterException,  # includes SlotNotCoveredError; not a RedisError
)

_CODE_CLASSES: Mapping[type[Exception], str] = MappingProxyType(
    {
        cls: code
        for code, (name, _) in OUTAGE_CODES.items()
        if name and isinstance(cls := getattr(redis.exceptions, name, None), type)
    }
)

OUTAGES: tuple[type[Exception], ...] = (*_TRANSIENT, *_CODE_CLASSES)
"""redis-py errors that a moment later may be gone, by class alone.

Not enough on its own: a Redis 6.2 script error can carry an outage code too. Decide
with :func:`is_outage`.
"""

_CODED_REPLY = re.compile(
    # Redis 6.0/6.2's wrapper of an error met inside a script; its "@user_script:N: "
    # position markers come once or twice depending on the version, and the wrapped
    # reply keeps its leading "-".
    r"(?:Error running script \(call to [^)]*\): (?:@?[\w.]+: ?\d+: )*-?)?"
    rf"({'|'.join(OUTAGE_CODES)})(?: |$)"
)

ERRORS: tuple[type[Exception], ...] = (redis.RedisError, RedisClusterException)
"""Everything redis-py raises for a failed call (Cluster's own errors are no RedisError)."""


def outage_code(exc: BaseException) -> str | None:
    """The :data:`OUTAGE_CODES` code ``exc`` carries, on every supported Redis, or None."""
    for cls, code in _CODE_CLASSES.items():
        if isinstance(exc, cls):
            return code
    if isinstance(exc, redis.ResponseError):
        match = _CODED_REPLY.match(str(exc))
        if match:
            return match.group(1)
    return None


def is_outage(exc: BaseException) -> bool:
    """True for an error that a moment later may be gone: under ``idem_on_store_error``.

    A connection that failed or timed out, a Cluster slot on the move, or a reply whose
    code is in :data:`OUTAGE_CODES`, whichever way the server version words it.
    Anything else Redis refuses (a key of another type, a damaged record, a script
    error) would fail the same way again.
    """
    return isinstance(exc, _TRANSIENT) or outage_code(exc) is not None


_CONFIG_FACTS = ("maxmemory-policy", "appendonly", "appendfsync", "save")


def text(value: Any) -> str:
    """A reply as text (replies are bytes: the clients do not decode)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class RedisAdmin:
    """Operator tools shared by every topology; mixed into ``RedisStore``."""

    client: Any
    url: str
    cluster: bool
    _summary: Any
    _forget: Any

    def _call(self, script: Any, key: str, args: list[Any]) -> Any:  # pragma: no cover
        raise NotImplementedError

    @property
    def topology(self) -> str:
        """``cluster``, ``sentinel`` or ``standalone``: what the client talks to."""
        if self.cluster:
            return "cluster"
        pool = getattr(self.client, "connection_pool", None)
        if type(pool).__name__ == "SentinelConnectionPool":
            return "sentinel"
        return "standalone"

    def _server(self) -> Any:
        """A client for one data node: the primary, or on Cluster one primary."""
        if self.cluster:
            return self.client.get_redis_connection(self.client.get_default_node())
        return self.client

    def _primaries(self) -> list[Any]:
        """The Cluster's primaries in a stable order (by ``host:port``)."""
        return sorted(self.client.get_primaries(), key=lambda node: node.name)

    def _unavailable(self, key: str, exc: BaseException) -> StoreUnavailable:
        code = outage_code(exc)
        if code is not None:  # the server answered: reachability is not the question
            return StoreUnavailable(
                f"the idempotency store at {self.url} failed on record {key!r}: Redis "
                f"answered {code} ({OUTAGE_CODES[code][1]}): {type(exc).__name__}: "
                f"{str(exc).rstrip('.')}. "
                f"Treated as an outage: tasks follow idem_on_store_error until it passes.",
                key=key,
            )
        return StoreUnavailable(
            f"the idempotency store at {self.url} failed on record {key!r}: "
            f"{type(exc).__name__}: {exc}. Check that Redis is reachable and "
            f"idem_redis_url is right.",
            key=key,
        )

    def eviction_policy(self) -> str | None:
        """The server's ``maxmemory-policy``, or None where CONFIG is not allowed.

        Managed Redis services often refuse CONFIG; not knowing is not an error.
        """
        try:
            reply: dict[Any, Any] = self._server().config_get("maxmemory-policy")
        except ERRORS:
            return None
        for name, value in reply.items():
            if text(name) == "maxmemory-policy":
                return text(value)
        return None

    def replica_count(self) -> int | None:
        """Replicas connected to the primary (on Cluster: to one primary), or None.

        For the worker's start-up check against ``idem_min_replicas``; not knowing
        (INFO refused, the store down) is not an error there.
        """
        try:
            info: dict[str, Any] = self._server().info("replication")
        except ERRORS:
            return None
        count = info.get("connected_slaves")
        return int(count) if count is not None else None

    def forget(self, key: str) -> bool:
        """See :meth:`celery_idem.store.base.Store.forget`.

        The forced ``forget.lua``, not a plain ``DEL``: a record whose fence is ahead of
        the clock must leave a tombstone, or the next claim's fence would not be higher.
        """
        return self.forget_if(key, force=True) is ForgetResult.DELETED

    # -- operators' tools ---------------------------------------------------------------

    def forget_if(self, key: str, *, fence: int | None = None, force: bool = False) -> ForgetResult:
        """See :meth:`celery_idem.store.base.Store.forget_if` and ``lua/forget.lua``."""
        args = ["" if fence is None else fence, "1" if force else "0"]
        reply = self._call(self._forget, key, args)
        return ForgetResult(int(reply[0]))

    def scan(self, match: str, *, cursor: int = 0, count: int = 500) -> tuple[int, list[str]]:
        """See :meth:`celery_idem.store.base.Store.scan` (one ``SCAN``, never ``KEYS``).

        On Cluster the cursor is ``node_cursor * primaries + node_index``: each call
        scans one primary, and a node's cursor 0 moves on to the next primary.
        """
        server, nodes, index = self.client, 1, 0
        if self.cluster:
            primaries = self._primaries()
            nodes = len(primaries)
            if not nodes:
                return 0, []
            cursor, index = divmod(cursor, nodes)
            server = self.client.get_redis_connection(primaries[index])
        try:
            next_cursor, keys = server.scan(cursor=cursor, match=match, count=count)
        except ERRORS as exc:
            raise self._unavailable(match, exc) from exc
        next_cursor = int(next_cursor)
        if nodes > 1:
            if next_cursor:
                next_cursor = next_cursor * nodes + index
            elif index + 1 < nodes:
                next_cursor = index + 1
        return next_cursor, [text(k) for k in keys]

    def _pipelined(self, keys: Sequence[str], add: Any) -> list[Any]:
        """Run ``add(pipeline, key)`` for each key in one round trip; errors as values.

        On Cluster, redis-py's cluster pipeline sends one batch per node.
        """
        if not keys:
            return []
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            add(pipe, key)
        try:
            replies: list[Any] = pipe.execute(raise_on_error=False)
        except ERRORS as exc:
            raise self._unavailable(keys[0], exc) from exc
        for key, reply in zip(keys, replies, strict=True):
            if isinstance(reply, BaseException) and is_outage(reply):
                raise self._unavailable(key, reply)
        return replies

    def summarize(self, keys: Sequence[str]) -> list[RecordSummary | None]:
        """See :meth:`celery_idem.store.base.Store.summarize` and ``lua/summary.lua``."""
        replies: list[Any]
        if self.cluster:
            # One script call per key, each on its node (NOSCRIPT reloads there).
            replies = []
            for key in keys:
                try:
                    replies.append(self._call(self._summary, key, []))
                except StoreUnavailable:
                    raise
                except IdempotencyError as exc:
                    replies.append(exc)
        else:
            replies = self._pipelined(
                keys, lambda pipe, key: self._summary(keys=[key], client=pipe)
            )
        out: list[RecordSummary | None] = []
        for key, reply in zip(keys, replies, strict=True):
            if isinstance(reply, Exception):
                raise IdempotencyError(
                    f"the idempotency store at {self.url} refused to summarize {key!r}: "
                    f"{type(reply).__name__}: {reply}",
                    key=key,
                )
            now, pttl = int(reply[0]), int(reply[1])
            if pttl == -2:
                out.append(None)
                continue
            ttl = pttl / 1000.0 if pttl >= 0 else None
            state = text(reply[2])
            if not state:
                out.append(RecordSummary(key, "", 0, "", False, None, ttl, 0, ""))
                continue
            fence, deadline, parked = int(reply[3]), int(reply[4]), bool(int(reply[5]))
            out.append(
                RecordSummary(
                    key=key,
                    state=state,
                    fence=fence,
                    task_id=text(reply[6]),
                    parked=parked,
                    lease_left=(deadline - now) / 1000.0 if state == "P" else None,
                    ttl=ttl,
                    payload_bytes=int(reply[8]),
                    codec=text(reply[7]),
                    takeovers=int(reply[9]),
                )
            )
        return out

    def memory_usage(self, keys: Sequence[str]) -> list[int | None]:
        """See :meth:`celery_idem.store.base.Store.memory_usage` (``SAMPLES 0``: exact)."""
        replies = self._pipelined(
            keys, lambda pipe, key: pipe.execute_command("MEMORY USAGE", key, "SAMPLES", 0)
        )
        return [int(r) if isinstance(r, int) else None for r in replies]

    def server_facts(self) -> ServerFacts:
        """See :meth:`celery_idem.store.base.Store.server_facts`."""
        client = self._server()
        try:
            before = time.time()
            seconds, micros = client.time()
            after = time.time()
        except ERRORS as exc:
            raise self._unavailable("TIME", exc) from exc
        info: dict[str, str] = {}
        info_error = None
        try:
            info = {str(k): text(v) for k, v in client.info().items()}
        except ERRORS as exc:
            if is_outage(exc):
                raise self._unavailable("INFO", exc) from exc
            info_error = f"{type(exc).__name__}: {exc}"
        config: dict[str, str | None] = {}
        for name in _CONFIG_FACTS:
            try:
                reply: dict[Any, Any] = client.config_get(name)
            except ERRORS as exc:
                if is_outage(exc):
                    raise self._unavailable("CONFIG", exc) from exc
                config[name] = None
                continue
            values = {text(k): text(v) for k, v in reply.items()}
            config[name] = values.get(name)
        return ServerFacts(
            kind="redis",
            topology=self.topology,
            url=self.url,
            info=info,
            info_error=info_error,
            config=config,
            server_time=int(seconds) + int(micros) / 1e6,
            local_time=(before + after) / 2,
            round_trip=after - before,
        )
