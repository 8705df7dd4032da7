"""RedisAdmin: the operators' side of :class:`~celery_idem.store.redis.RedisStore`.

This module owns what ``celery idem`` and the worker's start-up check need beyond the
task's hot path (a record as it stands, forgetting it, SCAN, per-record summaries and
memory, INFO/CONFIG facts for ``doctor``): the
:class:`~celery_idem.store.base.StoreAdmin` protocol on Redis. On Redis Cluster a SCAN
visits each primary in turn (the cursor carries which one), summaries go key by key
(each to its own node), and the server facts come from one primary. Which redis-py
errors count as an outage is ``redis_base``'s (:data:`OUTAGE_CODES` stays importable
from here).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from redis.backoff import NoBackoff
from redis.retry import Retry

from celery_idem.exceptions import IdempotencyError, StoreUnavailable
from celery_idem.store.base import ForgetResult, RecordSummary, ServerFacts, Stored, StoredRecord
from celery_idem.store.record import RecordState, decode_record, decode_steps
from celery_idem.store.redis_base import (
    ERRORS,
    OUTAGE_CODES,
    OUTAGES,
    RedisBase,
    is_outage,
    outage_code,
    text,
)

__all__ = ["OUTAGES", "OUTAGE_CODES", "RedisAdmin", "is_outage", "outage_code", "text"]

_CONFIG_FACTS = ("maxmemory-policy", "appendonly", "appendfsync", "save")


class RedisAdmin(RedisBase):
    """A :class:`~celery_idem.store.base.StoreAdmin` on Redis, for every topology.

    ``RedisStore`` is one, on the same client and scripts as its hot path; see
    :class:`~celery_idem.store.redis_base.RedisBase` for the arguments.
    """

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

    def probe(self, timeout: float) -> None:
        """See :meth:`celery_idem.store.base.StoreAdmin.probe`.

        A new connection from the data node's pool settings (the Sentinel-managed one
        asks the Sentinels first), with ``timeout`` for connecting and reading and no
        retries; the pool's own connections keep their settings.
        """
        pool = self._server().connection_pool
        kwargs = {
            **pool.connection_kwargs,
            "socket_connect_timeout": timeout,
            "socket_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
        }
        connection = pool.connection_class(**kwargs)
        try:
            connection.connect()
            connection.send_command("PING")
            connection.read_response()
        except ERRORS as exc:
            raise self.unavailable(None, exc, command="PING") from exc
        finally:
            connection.disconnect()

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

    def read(self, key: str) -> StoredRecord | None:
        """See :meth:`celery_idem.store.base.StoreAdmin.read` and ``lua/read.lua``."""
        now, pttl, raw = self.run_script(self.scripts.read, key, [])
        if not raw:
            return None
        r = decode_record(bytes(raw))
        state = RecordState.of(r.state)
        kind = state.kind if state else None
        stored = Stored(kind, r.payload, text(r.codec)) if kind else None
        in_progress = state is RecordState.IN_PROGRESS
        deadlined = in_progress or state is RecordState.RESERVED
        completed = kind is not None
        return StoredRecord(
            state=r.state,
            fence=r.fence,
            task_id=text(r.task_id),
            fingerprint=text(r.fingerprint),
            lease_left=(r.deadline - int(now)) / 1000.0 if deadlined else None,
            ttl=int(pttl) / 1000.0 if int(pttl) >= 0 else None,
            stored=stored,
            parked=in_progress and r.owner == b"",
            takeovers=r.takeovers,
            steps=() if completed else decode_steps(r.payload),
            steps_done=r.deadline if completed else 0,
        )

    def forget(self, key: str) -> bool:
        """See :meth:`celery_idem.store.base.StoreAdmin.forget`.

        The forced ``forget.lua``, not a plain ``DEL``: a record whose fence is ahead of
        the clock must leave a tombstone, or the next claim's fence would not be higher.
        """
        return self.forget_if(key, force=True) is ForgetResult.DELETED

    def forget_if(self, key: str, *, fence: int | None = None, force: bool = False) -> ForgetResult:
        """See :meth:`celery_idem.store.base.StoreAdmin.forget_if` and ``lua/forget.lua``."""
        args = ["" if fence is None else fence, "1" if force else "0"]
        reply = self.run_script(self.scripts.forget, key, args)
        return ForgetResult(int(reply[0]))

    def scan(self, match: str, *, cursor: int = 0, count: int = 500) -> tuple[int, list[str]]:
        """See :meth:`celery_idem.store.base.StoreAdmin.scan` (one ``SCAN``, never ``KEYS``).

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
            raise self.unavailable(None, exc, command=f"SCAN MATCH {match}") from exc
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
            raise self.unavailable(keys[0], exc) from exc
        for key, reply in zip(keys, replies, strict=True):
            if isinstance(reply, BaseException) and is_outage(reply):
                raise self.unavailable(key, reply)
        return replies

    def summarize(self, keys: Sequence[str]) -> list[RecordSummary | None]:
        """See :meth:`celery_idem.store.base.StoreAdmin.summarize` and ``lua/summary.lua``."""
        replies: list[Any]
        if self.cluster:
            # One script call per key, each on its node (NOSCRIPT reloads there).
            replies = []
            for key in keys:
                try:
                    replies.append(self.run_script(self.scripts.summary, key, []))
                except StoreUnavailable:
                    raise
                except IdempotencyError as exc:
                    replies.append(exc)
        else:
            replies = self._pipelined(
                keys, lambda pipe, key: self.scripts.summary(keys=[key], client=pipe)
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
            deadlined = state in (RecordState.IN_PROGRESS.value, RecordState.RESERVED.value)
            out.append(
                RecordSummary(
                    key=key,
                    state=state,
                    fence=fence,
                    task_id=text(reply[6]),
                    parked=parked,
                    lease_left=(deadline - now) / 1000.0 if deadlined else None,
                    ttl=ttl,
                    payload_bytes=int(reply[8]),
                    codec=text(reply[7]),
                    takeovers=int(reply[9]),
                )
            )
        return out

    def memory_usage(self, keys: Sequence[str]) -> list[int | None]:
        """See :meth:`celery_idem.store.base.StoreAdmin.memory_usage` (``SAMPLES 0``: exact)."""
        replies = self._pipelined(
            keys, lambda pipe, key: pipe.execute_command("MEMORY USAGE", key, "SAMPLES", 0)
        )
        return [int(r) if isinstance(r, int) else None for r in replies]

    def server_facts(self) -> ServerFacts:
        """See :meth:`celery_idem.store.base.StoreAdmin.server_facts`."""
        client = self._server()
        try:
            before = time.time()
            seconds, micros = client.time()
            after = time.time()
        except ERRORS as exc:
            raise self.unavailable(None, exc, command="TIME") from exc
        info: dict[str, str] = {}
        info_error = None
        try:
            info = {str(k): text(v) for k, v in client.info().items()}
        except ERRORS as exc:
            if is_outage(exc):
                raise self.unavailable(None, exc, command="INFO") from exc
            info_error = f"{type(exc).__name__}: {exc}"
        config: dict[str, str | None] = {}
        for name in _CONFIG_FACTS:
            try:
                reply: dict[Any, Any] = client.config_get(name)
            except ERRORS as exc:
                if is_outage(exc):
                    raise self.unavailable(None, exc, command="CONFIG") from exc
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
