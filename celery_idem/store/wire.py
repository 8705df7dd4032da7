"""A script call on one pooled connection, without redis-py's per-command layers.

Each hot-path operation is one ``EVALSHA``. Through ``redis.Redis.execute_command``
it pays for redis-py's general machinery (option parsing, the retry wrapper, the
response callbacks, observability hooks, command packing through the encoder): on the
project's machine a ``GET`` through the client costs about 125 µs where the same
``GET`` sent and read on a pooled connection costs about 40 µs, against a network round
trip of about 30 µs on loopback. :class:`Wire` takes connections from the client's own
pool once and keeps them on a stack of its own (redis-py 8's pool check-out and
check-in dispatch events and record metrics each time: about a fifth of a call), writes
the command packed here (a script's head, with its SHA, is packed once), reads the one
reply and puts the connection back: the same connections, timeouts, TLS and RESP
parsing (``hiredis`` when installed) as the client, and nothing else. The stack holds as
many connections as calls were ever in flight at once in the process (one per thread
of a prefork child or a solo worker); a fork starts it empty.

It also splits a call in two for the completion that is not waited for
(:meth:`Wire.send` and :class:`PendingReply`): the bytes leave the process in the
task's thread, the reply is read later, off the task's path.

Only for a client with one connection pool (standalone, Sentinel); Cluster clients
route per slot and keep redis-py's path. Any failure here closes the connection; the
caller decides what to do (``RedisBase.run_script`` retries once through redis-py, whose
retry policy and Sentinel/failover handling then apply: every script is safe to run
again for the same attempt).
"""

from __future__ import annotations

import inspect
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.commands.core import Script

__all__ = ["PendingReply", "Wire", "pack"]

_LARGE = 6000
"""Bytes above which a value is sent as its own chunk rather than copied into one buffer
(redis-py's own cut-off for the same reason)."""


def _data(value: Any) -> bytes:
    """A command argument as bytes, as redis-py encodes it (str as UTF-8)."""
    kind = type(value)
    if kind is bytes:
        data: bytes = value
    elif kind is str:
        data = value.encode("utf-8")
    elif kind is int:
        data = b"%d" % value
    elif kind is float:
        data = repr(value).encode()
    else:  # a subclass, memoryview, bytearray
        data = bytes(str(value), "utf-8") if isinstance(value, str | int | float) else bytes(value)
    return data


def pack(head: bytes, count: int, args: Sequence[Any]) -> list[bytes]:
    """``head`` (the command's first ``count`` words, packed) followed by ``args``, in RESP.

    Returns the chunks to write: small values share one buffer, a large one (a result)
    is its own chunk so it is not copied again.
    """
    chunks: list[bytes] = []
    buffer = [b"*%d\r\n" % (count + len(args)), head]
    for value in args:
        data = _data(value)
        if len(data) > _LARGE:
            buffer.append(b"$%d\r\n" % len(data))
            chunks.append(b"".join(buffer))
            chunks.append(data)
            buffer = [b"\r\n"]
        else:
            buffer.append(b"$%d\r\n%s\r\n" % (len(data), data))
    chunks.append(b"".join(buffer))
    return chunks


def _read_reply(connection: Any) -> Any:
    return connection.read_response()


class PendingReply:
    """A command written on a connection that is held until its one reply is read.

    :meth:`read` may be called from any thread, once; the connection goes back to the
    pool then (or is closed, on a failure).
    """

    def __init__(self, wire: Wire, connection: Any) -> None:
        self._wire = wire
        self._connection: Any = connection
        self._lock = threading.Lock()

    def read(self) -> Any:
        """The reply (blocking until it arrives); redis-py's error for a failed one.

        Raises:
            redis.RedisError: The reply is an error, or the connection failed (then the
                command may or may not have run).
            RuntimeError: Read twice.
        """
        with self._lock:
            connection, self._connection = self._connection, None
            if connection is None:
                raise RuntimeError("the reply was already read")
            return self._wire.settle(connection, _read_reply)


class Wire:
    """``EVALSHA`` on the connections of ``client``'s pool (see the module docstring).

    Args:
        client: A standalone or Sentinel ``redis.Redis`` (one connection pool).
    """

    def __init__(self, client: redis.Redis) -> None:
        self.pool: Any = client.connection_pool
        self._heads: dict[str, bytes] = {}
        self._idle: list[Any] = []
        self._pid = os.getpid()
        self.known: set[str] = set()
        """SHAs of the scripts the server answered (not ``NOSCRIPT``) in this process: one
        whose answer is not waited for must be known, or a ``NOSCRIPT`` would leave its
        work undone until someone reads it."""
        # redis-py before 5.3 wants a command name; later versions deprecate passing one.
        wants_name = (
            inspect.signature(self.pool.get_connection).parameters["command_name"].default
            is inspect.Parameter.empty
        )
        self._checkout: tuple[str, ...] = ("EVALSHA",) if wants_name else ()

    def check_out(self) -> Any:
        """A connection for one call: from the stack, else a new one from the pool."""
        if self._pid != os.getpid():  # forked: the parent's sockets are not ours
            self._idle, self._pid = [], os.getpid()
        try:
            return self._idle.pop()  # atomic under the GIL: no lock needed
        except IndexError:
            return self.pool.get_connection(*self._checkout)

    def check_in(self, connection: Any) -> None:
        """Back on the stack (a failed one was disconnected: it reconnects when next used)."""
        self._idle.append(connection)

    def settle(self, connection: Any, exchange: Callable[[Any], Any]) -> Any:
        """``exchange(connection)``'s reply, the connection checked in whatever happens.

        An error reply (``redis.ResponseError``) was read whole, so the connection is
        still in step and is reused as it is; any other failure may leave part of a reply
        unread on it, so it is disconnected first (it reconnects when next used).
        """
        try:
            return exchange(connection)
        except redis.ResponseError:
            raise
        except BaseException:
            connection.disconnect()
            raise
        finally:
            self.check_in(connection)

    def scripts_lost(self) -> None:
        """The server may have lost its scripts (a ``NOSCRIPT``, a reconnect): none is known."""
        self.known.clear()

    def _head(self, script: Script) -> bytes:
        """``EVALSHA <sha> 1`` packed, once per script (the SHA changes after a reload)."""
        head = self._heads.get(script.sha)
        if head is None:
            head = self._heads[script.sha] = b"".join(
                b"$%d\r\n%s\r\n" % (len(word), word)
                for word in (b"EVALSHA", script.sha.encode(), b"1")
            )
        return head

    def send(self, script: Script, key: str, args: Sequence[Any]) -> PendingReply:
        """Write ``script`` on ``key`` with ``args``; the reply is the caller's to read.

        Raises:
            redis.RedisError: The command could not be written (the connection is closed
                and back in the pool; nothing reached Redis, or part of it did).
        """
        chunks = pack(self._head(script), 3, [key, *args])
        connection = self.check_out()
        try:
            connection.send_packed_command(chunks)
        except BaseException:
            connection.disconnect()
            self.check_in(connection)
            raise
        return PendingReply(self, connection)

    def load_and_call(self, script: Script, key: str, args: Sequence[Any]) -> Any:
        """``SCRIPT LOAD`` then the call, pipelined on one connection: one round trip.

        After a ``NOSCRIPT`` the load must reach the server the call reaches: loaded
        through the client's pool, it may land on another connection that still points
        at the previous primary (after a Sentinel failover, a restarted old primary is
        a replica that accepts ``SCRIPT LOAD``), and the call would meet ``NOSCRIPT``
        again.

        Raises:
            redis.RedisError: As :meth:`call`.
        """
        source = script.script.encode("utf-8") if isinstance(script.script, str) else script.script
        load = pack(b"$6\r\nSCRIPT\r\n$4\r\nLOAD\r\n", 2, [source])
        chunks = [*load, *pack(self._head(script), 3, [key, *args])]

        def exchange(connection: Any) -> Any:
            connection.send_packed_command(chunks)
            try:
                connection.read_response()  # the SHA: the script's own, by definition
            except redis.ResponseError:
                connection.read_response()  # keep the connection in step, then report
                raise
            return connection.read_response()

        return self.settle(self.check_out(), exchange)

    def call(self, script: Script, key: str, args: Sequence[Any]) -> Any:
        """Write ``script`` on ``key`` with ``args`` and read its reply.

        Raises:
            redis.RedisError: As redis-py would: an error reply (``NoScriptError`` when
                the server lost the script), or a failed connection.
        """
        return self.send(script, key, args).read()
