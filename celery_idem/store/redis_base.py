"""What RedisStore's two halves share: one client, its scripts, what an error means.

``RedisStore`` is its hot path (``redis.py``: claim, renew, complete, ...) plus its
operators' tools (``redis_admin.py``: read, SCAN, summaries, INFO): both are a
:class:`RedisBase` on the same client, running the same :class:`Scripts`, registered
once per client. Each script is ``lua/record.lua`` (the record format) followed by its
own file in ``store/lua``; its contract is the comment at its top. This module also
owns which redis-py errors count as an outage (:func:`is_outage`): an outage becomes
:class:`~celery_idem.exceptions.StoreUnavailable`, anything else Redis refuses a
permanent :class:`~celery_idem.exceptions.IdempotencyError`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from importlib import resources
from types import MappingProxyType
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.commands.core import Script
from redis.exceptions import RedisClusterException

from celery_idem.endpoint import sanitize_url
from celery_idem.exceptions import IdempotencyError, StoreUnavailable
from celery_idem.store.wire import Wire

__all__ = [
    "ERRORS",
    "OUTAGES",
    "OUTAGE_CODES",
    "SOURCES",
    "RedisBase",
    "Scripts",
    "is_outage",
    "outage_code",
    "text",
]

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


def text(value: Any) -> str:
    """A reply as text (replies are bytes: the clients do not decode)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _load_sources(names: Iterable[str]) -> Mapping[str, str]:
    """Each script with the record codec (``record.lua``) in front of it."""
    lua = resources.files("celery_idem.store").joinpath("lua")
    prelude = lua.joinpath("record.lua").read_text("utf-8")
    return MappingProxyType(
        {name: prelude + lua.joinpath(f"{name}.lua").read_text("utf-8") for name in names}
    )


class Scripts:
    """The Lua scripts, registered on one client: redis-py ``Script`` objects.

    A ``Script`` runs with EVALSHA and loads itself again after ``NOSCRIPT`` (a restart,
    a failover, ``SCRIPT FLUSH``). Built once per client and shared by everything that
    runs them on it.
    """

    claim: Script
    renew: Script
    complete: Script
    dispatched: Script
    release: Script
    step: Script
    park: Script
    peek: Script
    reserve: Script
    unreserve: Script
    read: Script
    summary: Script
    forget: Script

    def __init__(self, client: redis.Redis | RedisCluster) -> None:
        # The attributes declared above, one per file of lua/ (the list of scripts).
        for name, source in SOURCES.items():
            setattr(self, name, client.register_script(source))


SOURCES = _load_sources(Scripts.__annotations__)
"""Script name -> its full source, as sent to Redis (Redis names it by its SHA1)."""


class RedisBase:
    """One client, its :class:`Scripts`, and how a failed call becomes an error.

    Args:
        client: A redis-py client that returns bytes (``decode_responses=False``):
            ``redis.Redis`` (standalone, or a Sentinel ``master_for`` client) or
            ``redis.cluster.RedisCluster``.
        url: Where the client points, for error messages only (a password is masked).
        scripts: The client's scripts when another object on it registered them
            already; None registers them.
    """

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        *,
        url: str = "",
        scripts: Scripts | None = None,
    ) -> None:
        self.client: Any = client
        self.url = sanitize_url(url) if url else "Redis"  # never log a password
        self.cluster = isinstance(client, RedisCluster)
        self.scripts = scripts if scripts is not None else Scripts(client)
        self.wire = Wire(client) if isinstance(client, redis.Redis) else None
        """The lean path for one pool's clients (``wire.py``); None on Cluster."""

    def run_script(self, script: Script, key: str, args: list[Any]) -> Any:
        """``script`` on ``key`` with ``args``: its reply, or :meth:`error_for` its failure.

        On the :attr:`wire` first; after a failed connection or a server that lost the
        script, once more through redis-py (its retries, Sentinel's failover handling,
        ``SCRIPT LOAD``). Every script is safe to run again for the same attempt.
        """
        wire = self.wire
        if wire is not None:
            try:
                try:
                    reply = wire.call(script, key, args)
                except redis.exceptions.NoScriptError:  # a restart, a failover, SCRIPT FLUSH
                    wire.scripts_lost()  # every script, not only this one
                    reply = wire.load_and_call(script, key, args)
            except redis.ResponseError as exc:  # Redis refused it: no retry
                raise self.error_for(key, exc) from exc
            except ERRORS:
                # The connection failed: once more through redis-py, below. The server
                # may have restarted without its scripts: none counts as known until
                # it answers again.
                wire.scripts_lost()
            else:
                wire.known.add(script.sha)
                return reply
        try:
            reply = script(keys=[key], args=args)
        except ERRORS as exc:
            raise self.error_for(key, exc) from exc
        if wire is not None:
            wire.known.add(script.sha)
        return reply

    def error_for(self, key: str, exc: BaseException) -> IdempotencyError:
        """An outage becomes StoreUnavailable; any other refusal a permanent error.

        ``is_outage`` reads the reply's code, not only redis-py's class: Redis 6.2 wraps
        an ``OOM`` met inside a script into a plain script error, which is an outage too.
        """
        if is_outage(exc) or not isinstance(exc, redis.ResponseError):
            return self.unavailable(key, exc)
        # Not an outage: retrying would fail the same way (a key of another type
        # under our prefix, a damaged record, a script error).
        return IdempotencyError(
            f"the idempotency store at {self.url} refused record {key!r}: "
            f"{type(exc).__name__}: {str(exc).rstrip('.')}. Is another application writing under "
            f"idem_key_prefix?",
            key=key,
        )

    def unavailable(
        self, key: str | None, exc: BaseException, *, command: str = ""
    ) -> StoreUnavailable:
        """The outage ``exc``, met on record ``key`` or on ``command``, as StoreUnavailable."""
        where = f"record {key!r}" if key is not None else f"{command or 'a command'}"
        cause = f"{type(exc).__name__}: {str(exc).rstrip('.')}"
        code = outage_code(exc)
        if code is not None:  # the server answered: reachability is not the question
            return StoreUnavailable(
                f"the idempotency store at {self.url} failed on {where}: Redis "
                f"answered {code} ({OUTAGE_CODES[code][1]}): {cause}. "
                f"Treated as an outage: tasks follow idem_on_store_error until it passes.",
                key=key,
            )
        return StoreUnavailable(
            f"the idempotency store at {self.url} failed on {where}: {cause}. Check that "
            f"Redis is reachable and idem_redis_url is right.",
            key=key,
        )
