"""A script call on one pooled connection, without redis-py's per-command layers.

Each hot-path operation is one ``EVALSHA``. Through ``redis.Redis.execute_command``
it pays for redis-py's general machinery (option parsing, the retry wrapper, the
response callbacks, observability hooks, command packing through the encoder): on the
project's machine a ``GET`` through the client costs about 125 µs where the same
``GET`` sent and read on a pooled connection costs about 40 µs, against a network round
trip of about 30 µs on loopback. :class:`Wire` takes a connection from the client's own
pool, writes the command packed here (a script's head, with its SHA, is packed once),
reads the one reply and gives the connection back: the same connection, pool, timeouts,
TLS and RESP parsing (``hiredis`` when installed) as the client, and nothing else.

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
import threading
from collections.abc import Sequence
from typing import Any

import redis
from redis.commands.core import Script

__all__ = ["PendingReply", "Wire", "pack"]

_LARGE = 6000
"""Bytes above which a value is sent as its own chunk rather than copied into one buffer
(redis-py's own cut-off for the same reason)."""


def _bulk(value: Any) -> bytes:
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str):
        data = value.encode("utf-8")
    elif isinstance(value, int):
        data = b"%d" % value
    elif isinstance(value, float):
        data = repr(value).encode()
    else:  # memoryview, bytearray
        data = bytes(value)
    return b"$%d\r\n%s\r\n" % (len(data), data)


def pack(head: bytes, count: int, args: Sequence[Any]) -> list[bytes]:
    """``head`` (the command's first ``count`` words, packed) followed by ``args``, in RESP.

    Returns the chunks to write: small values share one buffer, a large one (a result)
    is its own chunk so it is not copied again.
    """
    chunks: list[bytes] = []
    buffer = [b"*%d\r\n" % (count + len(args)), head]
    for value in args:
        if isinstance(value, bytes) and len(value) > _LARGE:
            buffer.append(b"$%d\r\n" % len(value))
            chunks.append(b"".join(buffer))
            chunks.append(value)
            buffer = [b"\r\n"]
        else:
            buffer.append(_bulk(value))
    chunks.append(b"".join(buffer))
    return chunks


class PendingReply:
    """A command written on a connection that is held until its one reply is read.

    :meth:`read` may be called from any thread, once; the connection goes back to the
    pool then (or is closed, on a failure).
    """

    def __init__(self, pool: Any, connection: Any) -> None:
        self._pool = pool
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
            try:
                return connection.read_response()
            except redis.ResponseError:
                raise  # an error reply: the connection is still in step
            except BaseException:
                connection.disconnect()
                raise
            finally:
                self._pool.release(connection)


class Wire:
    """``EVALSHA`` on the connections of ``client``'s pool (see the module docstring).

    Args:
        client: A standalone or Sentinel ``redis.Redis`` (one connection pool).
    """

    def __init__(self, client: redis.Redis) -> None:
        self.pool: Any = client.connection_pool
        self._heads: dict[str, bytes] = {}
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

    def _head(self, script: Script) -> bytes:
        """``EVALSHA <sha> 1`` packed, once per script (the SHA changes after a reload)."""
        head = self._heads.get(script.sha)
        if head is None:
            head = self._heads[script.sha] = b"".join(
                _bulk(word) for word in (b"EVALSHA", script.sha, 1)
            )
        return head

    def send(self, script: Script, key: str, args: Sequence[Any]) -> PendingReply:
        """Write ``script`` on ``key`` with ``args``; the reply is the caller's to read.

        Raises:
            redis.RedisError: The command could not be written (the connection is closed
                and back in the pool; nothing reached Redis, or part of it did).
        """
        chunks = pack(self._head(script), 3, [key, *args])
        connection = self.pool.get_connection(*self._checkout)
        try:
            connection.send_packed_command(chunks)
        except BaseException:
            connection.disconnect()
            self.pool.release(connection)
            raise
        return PendingReply(self.pool, connection)

    def call(self, script: Script, key: str, args: Sequence[Any]) -> Any:
        """Write ``script`` on ``key`` with ``args`` and read its reply.

        Raises:
            redis.RedisError: As redis-py would: an error reply (``NoScriptError`` when
                the server lost the script), or a failed connection.
        """
        return self.send(script, key, args).read()
