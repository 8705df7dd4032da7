"""Connect: redis-py clients for an :class:`~celery_idem.endpoint.Endpoint`.

This module owns how each topology's client is built (timeouts, retries, TLS
options passed through) and the per-process cache of stores, so a prefork child
never shares a socket with its parent.

Failover is redis-py's job here: the Sentinel pool asks the Sentinels for the current
primary on every new connection (and drops one that answers READONLY), and the
Cluster client follows MOVED/ASK and refreshes its slot map. celery-idem only keeps
the timeouts short, so an outage becomes a :class:`StoreUnavailable` under
``idem_on_store_error`` quickly instead of blocking a worker.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel

from celery_idem.endpoint import Endpoint, Topology
from celery_idem.exceptions import IdempotencyConfigError, StoreUnavailable
from celery_idem.store.redis import RedisStore

__all__ = ["client_for", "redis_store_for"]

_TIMEOUTS: dict[str, Any] = {"socket_timeout": 5.0, "socket_connect_timeout": 2.0}
_SENTINEL_TIMEOUTS: dict[str, Any] = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0}


def _quick_retry() -> Retry:
    """One quick retry: hides a pooled connection that went stale across a restart.

    redis-py's default retries back off for seconds; a worker would rather fail fast
    and let ``idem_on_store_error`` decide.
    """
    return Retry(ExponentialBackoff(cap=0.2, base=0.02), 1)


def client_for(endpoint: Endpoint) -> Any:
    """A new redis-py client (``decode_responses`` off) for ``endpoint``.

    Raises:
        IdempotencyConfigError: redis-py refused the URL or an option, naming the
            setting; or the ``idem_redis_client`` factory failed or returned no client.
        StoreUnavailable: A client that connects when built (Cluster reads its slot
            map; a factory may connect) could not reach Redis.
    """
    options = endpoint.option_dict()
    try:
        if endpoint.topology is Topology.CUSTOM:
            return _from_factory(endpoint)
        if endpoint.topology is Topology.SENTINEL:
            return _checked(_sentinel_client(endpoint, options))
        url = endpoint.url or ""
        if endpoint.topology is Topology.CLUSTER:
            kwargs = {**_TIMEOUTS, **options}
            return RedisCluster.from_url(url, **kwargs)
        kwargs = {**_TIMEOUTS, "retry": _quick_retry(), **options}
        return _checked(redis.Redis.from_url(url, **kwargs))
    except (redis.RedisError, RedisClusterException) as exc:
        raise StoreUnavailable(
            f"the idempotency store at {endpoint.display} could not be reached: "
            f"{type(exc).__name__}: {exc}. Check that Redis is reachable and the store "
            f"settings are right."
        ) from exc
    except (ValueError, TypeError) as exc:
        raise IdempotencyConfigError(
            f"idem_redis_url {endpoint.display!r} with idem_redis_options "
            f"{sorted(options)} is not something redis-py can connect to: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _checked(client: redis.Redis) -> redis.Redis:
    """Build one connection object (no socket) so a misspelt option fails now.

    redis-py passes ``idem_redis_options`` to the connection class only when it first
    connects; a ``TypeError`` there would surface inside a task instead of at start.
    """
    pool = client.connection_pool
    pool.connection_class(**pool.connection_kwargs)
    return client


def _sentinel_client(endpoint: Endpoint, options: dict[str, Any]) -> redis.Redis:
    sentinel_kwargs = {**_SENTINEL_TIMEOUTS, **options.pop("sentinel_kwargs", {})}
    sentinel = Sentinel(list(endpoint.sentinels), sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    kwargs: dict[str, Any] = {**_TIMEOUTS, "retry": _quick_retry(), "db": endpoint.db}
    if endpoint.username is not None:
        kwargs["username"] = endpoint.username
    if endpoint.password is not None:
        kwargs["password"] = endpoint.password
    kwargs.update(options)
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        endpoint.service_name, redis_class=redis.Redis, **kwargs
    )
    return client


def _from_factory(endpoint: Endpoint) -> Any:
    factory = endpoint.factory
    assert factory is not None
    try:
        client = factory()
    except (redis.RedisError, RedisClusterException):
        raise  # unreachable, not misconfigured: client_for says so
    except Exception as exc:
        raise IdempotencyConfigError(
            f"idem_redis_client {endpoint.display!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(client, (redis.Redis, RedisCluster)):
        raise IdempotencyConfigError(
            f"idem_redis_client {endpoint.display!r} returned {type(client).__name__}, "
            "not a redis.Redis or redis.cluster.RedisCluster"
        )
    if client.get_encoder().decode_responses:
        raise IdempotencyConfigError(
            f"idem_redis_client {endpoint.display!r} returned a client with "
            "decode_responses=True; records are bytes: build it with decode_responses=False"
        )
    return client


_stores: dict[tuple[int, str], RedisStore] = {}
_stores_lock = threading.Lock()


def redis_store_for(endpoint: Endpoint) -> RedisStore:
    """The process's store for ``endpoint``: one client (and pool) per process.

    Keyed by pid, so a prefork child never shares a socket with its parent.
    """
    key = (os.getpid(), endpoint.cache_key)
    store = _stores.get(key)
    if store is None:
        with _stores_lock:
            store = _stores.get(key)
            if store is None:
                store = _stores[key] = RedisStore(
                    client_for(endpoint),
                    url=endpoint.display,
                    min_replicas=endpoint.min_replicas,
                    replicas_timeout=endpoint.replicas_timeout,
                )
    return store
