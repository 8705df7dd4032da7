"""The chaos fault proxy, against a real throwaway redis-server.

Each fault is checked from the client's side, the way a worker would meet it: a slower
round trip, a connection that ends, a command that times out, a server that goes away
and comes back.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from devtools.processes import wait_for
from devtools.redis_server import RedisServer
from tests.chaos.proxy import FaultProxy

PING = b"*1\r\n$4\r\nPING\r\n"
PONG = b"+PONG\r\n"


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as srv:
        yield srv


@pytest.fixture
def proxy(server: RedisServer) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", server.port) as prx:
        yield prx


@pytest.fixture
def client(proxy: FaultProxy) -> Iterator[Callable[..., redis.Redis]]:
    """Clients through the proxy, without retries (a retry would hide the fault)."""
    made: list[redis.Redis] = []

    def make(socket_timeout: float = 2.0) -> redis.Redis:
        r = redis.Redis(
            host="127.0.0.1",
            port=proxy.port,
            socket_timeout=socket_timeout,
            socket_connect_timeout=1.0,
            retry=Retry(NoBackoff(), 0),
        )
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def pings(r: redis.Redis) -> bool:
    """True when a PING gets through; a failure counts as "not yet" for wait_for."""
    try:
        return bool(r.ping())
    except (redis.ConnectionError, redis.TimeoutError):
        return False


def raw_ping(port: int) -> socket.socket:
    """A raw connection through the proxy that has seen one PONG (caller closes it)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=2.0)
    sock.sendall(PING)
    assert sock.recv(64) == PONG
    return sock


def test_ping_through_the_proxy_is_counted(
    proxy: FaultProxy, client: Callable[..., redis.Redis]
) -> None:
    assert client().ping() is True
    stats = proxy.stats()
    assert stats.connections_accepted == 1
    assert stats.connections_live == 1
    assert stats.bytes_to_upstream >= len(PING)
    assert stats.bytes_to_client >= len(PONG)


def test_latency_is_added_to_a_round_trip(
    proxy: FaultProxy, client: Callable[..., redis.Redis]
) -> None:
    r = client()
    assert r.ping()  # connected before the delay: measure the command, not the handshake
    delay = 0.1
    proxy.set_latency(delay)
    assert proxy.latency == delay
    began = time.monotonic()
    assert r.ping()
    assert time.monotonic() - began >= delay
    proxy.set_latency(0)
    assert proxy.latency == 0


def test_drop_connections_ends_live_connections_and_new_ones_work(
    proxy: FaultProxy, client: Callable[..., redis.Redis]
) -> None:
    r = client()
    assert r.ping()
    sock = raw_ping(proxy.port)
    try:
        assert proxy.drop_connections() == 2
        try:
            ended = sock.recv(64) == b""  # FIN
        except ConnectionResetError:  # RST: what drop_connections sends
            ended = True
        assert ended
    finally:
        sock.close()
    # The pooled connection is dead: redis-py either notices before sending, or gets the
    # RST as this command's answer and drops that connection. Either way the next
    # command goes through a new connection, as an application's retry would.
    try:
        assert r.ping()
    except redis.ConnectionError:
        assert r.ping()
    assert client().ping()
    stats = proxy.stats()
    assert stats.connections_accepted == 4
    assert stats.dropped == 2


def test_blackhole_times_commands_out_then_ends(
    proxy: FaultProxy, client: Callable[..., redis.Redis]
) -> None:
    r = client(socket_timeout=0.3)
    assert r.ping()
    proxy.blackhole(1.0)
    assert proxy.blackholed
    with pytest.raises(redis.TimeoutError):
        r.ping()  # the existing connection
    with pytest.raises(redis.TimeoutError):
        client(socket_timeout=0.3).ping()  # a new one is accepted, then silence
    wait_for(lambda: not proxy.blackholed, timeout=5.0, message="the blackhole's end")
    wait_for(lambda: pings(r), timeout=5.0, message="a PING after the blackhole")


def test_end_blackhole_discards_what_was_held(
    proxy: FaultProxy, client: Callable[..., redis.Redis]
) -> None:
    sock = raw_ping(proxy.port)
    try:
        proxy.blackhole(30.0)
        sock.sendall(PING)  # held, then thrown away: never answered late
        proxy.end_blackhole()
        assert not proxy.blackholed
        try:
            got = sock.recv(64)
        except ConnectionResetError:
            got = b""
        assert got == b""
    finally:
        sock.close()
    assert client().ping()


def test_upstream_down_then_back(
    server: RedisServer, proxy: FaultProxy, client: Callable[..., redis.Redis]
) -> None:
    r = client()
    assert r.ping()
    server.stop()
    with pytest.raises(redis.ConnectionError):
        r.ping()  # the live connection ends with its server
    with pytest.raises(redis.ConnectionError):
        client().ping()  # a new one is accepted, then closed: the connect upstream failed
    assert proxy.stats().upstream_failures >= 1
    server.start()
    wait_for(lambda: pings(client()), timeout=5.0, message="a PING once the server is back")


def test_stop_closes_the_listener(server: RedisServer) -> None:
    prx = FaultProxy("127.0.0.1", server.port).start()
    port = prx.port
    raw_ping(port).close()
    prx.stop()
    prx.stop()  # idempotent
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
    with pytest.raises(RuntimeError):
        prx.set_latency(0.1)
