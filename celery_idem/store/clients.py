"""Clients: a redis-py client for an :class:`~celery_idem.endpoint.Endpoint`.

This module owns how each topology's client is built (timeouts, retries, TLS
options passed through); ``connect`` keeps one store, so one client, per process
and endpoint.

Failover is redis-py's job here: the Sentinel pool asks the Sentinels for the current
primary on every new connection (and drops one that answers READONLY), and the
Cluster client follows MOVED/ASK and refreshes its slot map. celery-idem only keeps
the timeouts short, so an outage becomes a :class:`StoreUnavailable` under
``idem_on_store_error`` quickly instead of blocking a worker.
"""

from __future__ import annotations

import inspect
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import REDIS_ALLOWED_KEYS, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel

from celery_idem.endpoint import Endpoint, Topology
from celery_idem.exceptions import IdempotencyConfigError, StoreUnavailable

__all__ = ["client_for"]

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
    timeouts = _timeouts(endpoint, options)
    try:
        if endpoint.topology is Topology.CUSTOM:
            return _from_factory(endpoint)
        if endpoint.topology is Topology.SENTINEL:
            return _checked(_sentinel_client(endpoint, {**timeouts, **options}))
        url = endpoint.url or ""
        if endpoint.topology is Topology.CLUSTER:
            _check_cluster_options(endpoint, options)
            kwargs = {**timeouts, "retry": _quick_retry(), **options}
            return RedisCluster.from_url(url, **kwargs)
        kwargs = {**timeouts, "retry": _quick_retry(), **options}
        return _checked(redis.Redis.from_url(url, **kwargs))
    except RedisClusterException as exc:
        if "cannot be connected" not in str(exc):  # refused before any connection
            raise _config_error(endpoint, options, exc) from exc
        raise _unreachable(endpoint, exc) from exc
    except redis.RedisError as exc:
        raise _unreachable(endpoint, exc) from exc
    except (ValueError, TypeError) as exc:
        raise _config_error(endpoint, options, exc) from exc


def _unreachable(endpoint: Endpoint, exc: Exception) -> StoreUnavailable:
    return StoreUnavailable(
        f"the idempotency store at {endpoint.display} could not be reached: "
        f"{type(exc).__name__}: {str(exc).rstrip('.')}. Check that Redis is reachable and "
        f"the store settings are right."
    )


def _config_error(endpoint: Endpoint, options: dict[str, Any], exc: Exception) -> Exception:
    return IdempotencyConfigError(
        f"idem_redis_url {endpoint.display!r} with idem_redis_options {sorted(options)} is "
        f"not something redis-py can connect to: {type(exc).__name__}: {exc}"
    )


def _timeouts(endpoint: Endpoint, options: dict[str, Any]) -> dict[str, Any]:
    """Socket timeouts; with ``idem_min_replicas`` the read must outlast ``WAIT``.

    A socket timeout shorter than the WAIT would turn every slow replica into a
    timeout of unknown outcome instead of a clean ``ReplicasNotReached``.
    """
    timeouts = dict(_TIMEOUTS)
    if endpoint.min_replicas:
        timeouts["socket_timeout"] = max(5.0, endpoint.replicas_timeout + 2.0)
        given = options.get("socket_timeout")
        if isinstance(given, (int, float)) and given <= endpoint.replicas_timeout:
            raise IdempotencyConfigError(
                f"idem_redis_options socket_timeout={given} is not longer than "
                f"idem_min_replicas_timeout={endpoint.replicas_timeout}: every WAIT for a "
                "slow replica would time out the connection. Raise socket_timeout."
            )
    return timeouts


def _check_cluster_options(endpoint: Endpoint, options: dict[str, Any]) -> None:
    """Refuse what redis-py's cluster client would drop silently or refuse later."""
    known = set(REDIS_ALLOWED_KEYS) | set(inspect.signature(RedisCluster.__init__).parameters)
    unknown = sorted(set(options) - known)
    if unknown:
        raise IdempotencyConfigError(
            f"idem_redis_options {unknown} are not options of redis-py's cluster client "
            f"(for {endpoint.display}); check their spelling."
        )
    if options.get("db") not in (None, 0):
        raise IdempotencyConfigError(
            f"idem_redis_options db={options['db']!r}: Redis Cluster has database 0 only; "
            "keep records apart with idem_key_prefix."
        )


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
    kwargs: dict[str, Any] = {"retry": _quick_retry(), "db": endpoint.db}  # timeouts: options
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
