"""RedisStore: the only code that talks to Redis.

Each transition of a record is one Lua script in ``store/lua`` (its contract is the
comment at its top), run with EVALSHA through redis-py's ``Script`` objects, which
reload a script transparently after ``NOSCRIPT`` (a restart, a failover, ``SCRIPT
FLUSH``). This module turns the scripts' replies into typed outcomes and every
redis-py error into :class:`~celery_idem.exceptions.StoreUnavailable`, chained.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis
from kombu.utils.url import maybe_sanitize_url
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from celery_idem.exceptions import IdempotencyConfigError, IdempotencyError, StoreUnavailable
from celery_idem.store.base import (
    ClaimOutcome,
    ClaimState,
    ForgetResult,
    RecordKind,
    RecordSummary,
    ServerFacts,
    Stored,
    StoredRecord,
)

__all__ = ["RedisStore", "redis_store_for_url"]

_SCRIPT_NAMES = (
    "claim", "renew", "complete", "release", "park", "peek", "read", "summary", "forget",
)  # fmt: skip
_CONFIG_FACTS = ("maxmemory-policy", "appendonly", "appendfsync", "save")
_COMPLETED = {kind.value: kind for kind in RecordKind}
_OUTAGES: tuple[type[redis.RedisError], ...] = tuple(
    cls
    for name in (
        "ConnectionError",  # includes BusyLoadingError (LOADING) and AuthenticationError
        "TimeoutError",
        "ReadOnlyError",  # a demoted primary during a failover
        "OutOfMemoryError",  # maxmemory reached under noeviction
        "MasterDownError",
        "TryAgainError",
        "ClusterDownError",
    )
    if isinstance(cls := getattr(redis.exceptions, name, None), type)
)
"""redis-py errors that a moment later may be gone: an outage, under idem_on_store_error."""


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
    for name in ("f", "d"):
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


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class RedisStore:
    """A :class:`~celery_idem.store.base.Store` on one Redis server (or proxy).

    Args:
        client: A redis-py client that returns bytes (``decode_responses=False``).
        url: The URL the client was made from, for error messages only.
    """

    def __init__(self, client: redis.Redis, *, url: str = "") -> None:
        self.client = client
        self.url = maybe_sanitize_url(url) if url else "Redis"  # never log a password
        self._claim = client.register_script(_SOURCES["claim"])
        self._renew = client.register_script(_SOURCES["renew"])
        self._complete = client.register_script(_SOURCES["complete"])
        self._release = client.register_script(_SOURCES["release"])
        self._park = client.register_script(_SOURCES["park"])
        self._peek = client.register_script(_SOURCES["peek"])
        self._read = client.register_script(_SOURCES["read"])
        self._summary = client.register_script(_SOURCES["summary"])
        self._forget = client.register_script(_SOURCES["forget"])

    @classmethod
    def from_url(cls, url: str) -> RedisStore:
        """Build a store for ``url`` with timeouts fit for a task's hot path.

        redis-py's default retries back off for seconds; a worker would rather fail
        fast and let the ``idem_on_store_error`` policy decide. One quick retry still
        hides a pooled connection that went stale across a Redis restart.
        """
        try:
            client = redis.Redis.from_url(
                url,
                socket_timeout=5.0,
                socket_connect_timeout=2.0,
                retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1),
            )
        except ValueError as exc:
            raise IdempotencyConfigError(
                f"idem_redis_url {maybe_sanitize_url(url)!r} is not a Redis URL celery-idem "
                f"can use: {exc}"
            ) from exc
        return cls(client, url=url)

    def _unavailable(self, key: str, exc: redis.RedisError) -> StoreUnavailable:
        return StoreUnavailable(
            f"the idempotency store at {self.url} failed on record {key!r}: "
            f"{type(exc).__name__}: {exc}. Check that Redis is reachable and "
            f"idem_redis_url is right.",
            key=key,
        )

    def _call(self, script: Any, key: str, args: list[Any]) -> Any:
        try:
            return script(keys=[key], args=args)
        except _OUTAGES as exc:
            raise self._unavailable(key, exc) from exc
        except redis.ResponseError as exc:
            # Not an outage: retrying would fail the same way (a key of another type
            # under our prefix, a damaged record, a script error).
            raise IdempotencyError(
                f"the idempotency store at {self.url} refused record {key!r}: "
                f"{type(exc).__name__}: {exc}. Is another application writing under "
                f"idem_key_prefix?",
                key=key,
            ) from exc
        except redis.RedisError as exc:
            raise self._unavailable(key, exc) from exc

    def claim(
        self, key: str, *, token: str, task_id: str, fingerprint: str, lease: float, ttl: float
    ) -> ClaimOutcome:
        """See :meth:`celery_idem.store.base.Store.claim`."""
        reply = self._call(
            self._claim, key, [token, task_id, fingerprint, _ms(lease), _ms(ttl + lease)]
        )
        code, fence = int(reply[0]), int(reply[1])
        if code == 1:
            return ClaimOutcome(ClaimState.CLAIMED, fence, task_id, took_over=bool(reply[2]))
        owner = _text(reply[2])
        if code == 2:
            stored = Stored(_COMPLETED[_text(reply[3])], bytes(reply[4]), _text(reply[5]))
            return ClaimOutcome(ClaimState.COMPLETED, fence, owner, stored=stored)
        if code == 3:
            return ClaimOutcome(ClaimState.IN_PROGRESS, fence, owner, int(reply[3]) / 1000.0)
        return ClaimOutcome(ClaimState.MISMATCH, fence, owner)

    def renew(self, key: str, *, token: str, lease: float) -> bool:
        """See :meth:`celery_idem.store.base.Store.renew`."""
        # The record must outlive the lease by the retention the claim gave it; one
        # lease of slack is enough because a renewal arrives every lease/3.
        return bool(self._call(self._renew, key, [token, _ms(lease), _ms(2 * lease)]))

    def complete(
        self, key: str, *, token: str, fence: int, task_id: str, stored: Stored, ttl: float
    ) -> bool:
        """See :meth:`celery_idem.store.base.Store.complete`."""
        args = [token, fence, stored.kind.value, stored.payload, stored.codec, _ms(ttl), task_id]
        return bool(self._call(self._complete, key, args))

    def release(self, key: str, *, token: str) -> bool:
        """See :meth:`celery_idem.store.base.Store.release`."""
        return bool(self._call(self._release, key, [token]))

    def park(self, key: str, *, token: str, hold: float) -> bool:
        """See :meth:`celery_idem.store.base.Store.park`."""
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
        )

    def eviction_policy(self) -> str | None:
        """The server's ``maxmemory-policy``, or None where CONFIG is not allowed.

        Managed Redis services often refuse CONFIG; not knowing is not an error.
        """
        try:
            reply: dict[Any, Any] = self.client.config_get("maxmemory-policy")
        except redis.RedisError:
            return None
        for name, value in reply.items():
            if _text(name) == "maxmemory-policy":
                return _text(value)
        return None

    def forget(self, key: str) -> bool:
        """See :meth:`celery_idem.store.base.Store.forget`."""
        try:
            return bool(self.client.delete(key))
        except redis.RedisError as exc:
            raise self._unavailable(key, exc) from exc

    # -- operators' tools ---------------------------------------------------------------

    def forget_if(self, key: str, *, fence: int | None = None, force: bool = False) -> ForgetResult:
        """See :meth:`celery_idem.store.base.Store.forget_if` and ``lua/forget.lua``."""
        args = ["" if fence is None else fence, "1" if force else "0"]
        reply = self._call(self._forget, key, args)
        return ForgetResult(int(reply[0]))

    def scan(self, match: str, *, cursor: int = 0, count: int = 500) -> tuple[int, list[str]]:
        """See :meth:`celery_idem.store.base.Store.scan` (one ``SCAN``, never ``KEYS``)."""
        try:
            next_cursor, keys = self.client.scan(cursor=cursor, match=match, count=count)
        except redis.RedisError as exc:
            raise self._unavailable(match, exc) from exc
        return int(next_cursor), [_text(k) for k in keys]

    def _pipelined(self, keys: Sequence[str], add: Any) -> list[Any]:
        """Run ``add(pipeline, key)`` for each key in one round trip; errors as values."""
        if not keys:
            return []
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            add(pipe, key)
        try:
            replies: list[Any] = pipe.execute(raise_on_error=False)
        except redis.RedisError as exc:
            raise self._unavailable(keys[0], exc) from exc
        for key, reply in zip(keys, replies, strict=True):
            if isinstance(reply, _OUTAGES):
                raise self._unavailable(key, reply)
        return replies

    def summarize(self, keys: Sequence[str]) -> list[RecordSummary | None]:
        """See :meth:`celery_idem.store.base.Store.summarize` and ``lua/summary.lua``."""
        replies = self._pipelined(keys, lambda pipe, key: self._summary(keys=[key], client=pipe))
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
            state = _text(reply[2])
            if not state:
                out.append(RecordSummary(key, "", 0, "", False, None, ttl, 0, ""))
                continue
            fence, deadline, parked = int(reply[3]), int(reply[4]), bool(int(reply[5]))
            out.append(
                RecordSummary(
                    key=key,
                    state=state,
                    fence=fence,
                    task_id=_text(reply[6]),
                    parked=parked,
                    lease_left=(deadline - now) / 1000.0 if state == "P" else None,
                    ttl=ttl,
                    payload_bytes=int(reply[8]),
                    codec=_text(reply[7]),
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
        client = self.client
        try:
            before = time.time()
            seconds, micros = client.time()
            after = time.time()
        except redis.RedisError as exc:
            raise self._unavailable("TIME", exc) from exc
        info: dict[str, str] = {}
        info_error = None
        try:
            info = {str(k): _text(v) for k, v in client.info().items()}
        except _OUTAGES as exc:
            raise self._unavailable("INFO", exc) from exc
        except redis.RedisError as exc:
            info_error = f"{type(exc).__name__}: {exc}"
        config: dict[str, str | None] = {}
        for name in _CONFIG_FACTS:
            try:
                reply: dict[Any, Any] = client.config_get(name)
            except _OUTAGES as exc:
                raise self._unavailable("CONFIG", exc) from exc
            except redis.RedisError:
                config[name] = None
                continue
            values = {_text(k): _text(v) for k, v in reply.items()}
            config[name] = values.get(name)
        return ServerFacts(
            kind="redis",
            url=self.url,
            info=info,
            info_error=info_error,
            config=config,
            server_time=int(seconds) + int(micros) / 1e6,
            local_time=(before + after) / 2,
            round_trip=after - before,
        )


_stores: dict[tuple[int, str], RedisStore] = {}
_stores_lock = threading.Lock()


def redis_store_for_url(url: str) -> RedisStore:
    """The process's store for ``url``: one client (and pool) per process and URL.

    Keyed by pid, so a prefork child never shares a socket with its parent.
    """
    key = (os.getpid(), url)
    store = _stores.get(key)
    if store is None:
        with _stores_lock:
            store = _stores.get(key)
            if store is None:
                store = _stores[key] = RedisStore.from_url(url)
    return store
