"""A TCP fault proxy between the workers and the store's Redis, for ``make chaos``.

The workers reach the store only through this proxy, so the nemesis can slow, cut or
silence the network without touching a worker or the server: the faults a real
deployment sees between a host and its Redis (a slow link, a reset, a partition).

It runs in the orchestrator's process, on an asyncio loop in a daemon thread: one loop
serves any number of connections without a thread each, and every control call is
handed to that loop and waited for, so when :meth:`FaultProxy.blackhole` returns the
blackhole is already in force (a test's next command cannot slip past it).

Semantics of the faults:

- latency: every chunk read in either direction is held until ``read time + latency``
  (per direction queue, so order is kept and a burst is not serialised);
- drop: every live connection, client and upstream side, is aborted at once (RST);
  new connections are accepted and served as usual;
- blackhole: nothing is read or forwarded, connections stay open, new ones are
  accepted but not connected upstream, so clients see timeouts. At its end every
  connection is aborted *before* the gate reopens: bytes held during the blackhole
  are discarded, never delivered late, and clients reconnect to a clean stream
  (a late reply could be mistaken for the answer to a later command);
- upstream down (the nemesis restarting the server): the client connection is
  closed as soon as the upstream connect fails; the proxy keeps listening.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["FaultProxy", "ProxyStats"]

T = TypeVar("T")

CHUNK = 65536
QUEUE_CHUNKS = 64
"""Chunks in flight per direction before reading pauses (backpressure under latency)."""
CONNECT_TIMEOUT = 2.0
CONTROL_TIMEOUT = 5.0
"""Longest a control call waits for the loop thread: a wedged loop fails loudly."""

_Item = tuple[float, bytes] | None  # (due on the loop clock, data), None = end of stream


@dataclass(frozen=True)
class ProxyStats:
    """A snapshot of the proxy's counters (all since :meth:`FaultProxy.start`)."""

    connections_accepted: int
    connections_live: int
    upstream_failures: int
    """Client connections closed because the upstream connect failed (server down)."""
    dropped: int
    """Connections aborted by :meth:`FaultProxy.drop_connections` or a blackhole's end."""
    bytes_to_upstream: int
    bytes_to_client: int


class _Link:
    """One client connection and, once connected, its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.eofs = 0
        self.closed = False

    def _finish(self, close: Callable[[asyncio.StreamWriter], None]) -> None:
        self.closed = True
        for writer in (self.client, self.upstream):
            if writer is not None:
                close(writer)
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()

    def abort(self) -> None:
        """Reset both sides now, dropping anything buffered (a fault or an error)."""
        if not self.closed:
            self._finish(lambda w: w.transport.abort())

    def close(self) -> None:
        """Close both sides after flushing (both directions reached end of stream)."""
        if not self.closed:
            self._finish(lambda w: w.close())


class FaultProxy:
    """Forward ``127.0.0.1:<port>`` to ``upstream_host:upstream_port``, with faults on demand.

    Usage::

        proxy = FaultProxy("127.0.0.1", store.port).start()
        proxy.set_latency(0.05); proxy.drop_connections(); proxy.blackhole(1.0)
        proxy.stop()

    Control methods are thread-safe and return once the fault is in force.
    """

    def __init__(self, upstream_host: str, upstream_port: int, listen_port: int = 0) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self._listen_port = listen_port
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        # Set = forwarding, clear = blackhole. A new one per start(): an Event binds to the
        # first loop that waits on it.
        self._open = asyncio.Event()
        self._blackhole_end: asyncio.TimerHandle | None = None
        self._links: set[_Link] = set()
        self._latency = 0.0
        self._accepted = self._upstream_failures = self._dropped = 0
        self._to_upstream = self._to_client = 0

    # -- public API ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The listening port on 127.0.0.1 (known once started)."""
        if self._port is None:
            raise RuntimeError("FaultProxy has no port yet: call start() first")
        return self._port

    @property
    def latency(self) -> float:
        """The one-way delay currently added, in seconds."""
        return self._latency

    @property
    def blackholed(self) -> bool:
        """True while a blackhole is in force."""
        return self._thread is not None and not self._open.is_set()

    def start(self) -> FaultProxy:
        """Bind 127.0.0.1 and serve from a daemon thread; returns self once listening."""
        if self._thread is not None:
            raise RuntimeError("FaultProxy already started")
        ready = threading.Event()
        errors: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._run, args=(ready, errors), name="fault-proxy", daemon=True
        )
        self._thread.start()
        if not ready.wait(CONTROL_TIMEOUT):
            raise RuntimeError("FaultProxy did not start listening in time")
        if errors:
            self._thread.join(CONTROL_TIMEOUT)
            self._thread = None
            raise errors[0]
        return self

    def stop(self, timeout: float = CONTROL_TIMEOUT) -> None:
        """Close the listener and every connection, end the loop thread. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError, concurrent.futures.TimeoutError):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout)
        with contextlib.suppress(RuntimeError):  # loop already closed
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._thread = self._loop = None

    def set_latency(self, seconds: float) -> None:
        """Delay every chunk by ``seconds`` in each direction from now on (0 = off)."""
        if seconds < 0:
            raise ValueError(f"latency must be >= 0, not {seconds}")
        self._call(self._set_latency, seconds)

    def drop_connections(self) -> int:
        """Abort every live connection (both sides) at once; returns how many."""
        return self._call(self._abort_all)

    def blackhole(self, seconds: float) -> None:
        """Forward nothing for ``seconds`` (extends a blackhole already in force)."""
        if seconds <= 0:
            raise ValueError(f"a blackhole lasts > 0 s, not {seconds}")
        self._call(self._begin_blackhole, seconds)

    def end_blackhole(self) -> None:
        """End a blackhole now (aborting every connection); no-op when there is none."""
        self._call(self._end_blackhole)

    def stats(self) -> ProxyStats:
        """The counters, read consistently on the loop thread."""
        return self._call(self._stats)

    def __enter__(self) -> FaultProxy:
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"<FaultProxy 127.0.0.1:{self._port} -> {self.upstream_host}:{self.upstream_port}"
            f" latency={self._latency} blackholed={self.blackholed}>"
        )

    # -- loop thread -----------------------------------------------------------------------

    def _run(self, ready: threading.Event, errors: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)  # this thread's own loop
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._accept, "127.0.0.1", self._listen_port, backlog=512)
            )
        except OSError as exc:
            errors.append(exc)
            loop.close()
            ready.set()
            return
        self._open = asyncio.Event()
        self._open.set()
        self._latency = 0.0
        self._port = int(self._server.sockets[0].getsockname()[1])
        self._loop = loop
        ready.set()
        try:
            loop.run_forever()
        finally:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    def _call(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` on the loop thread and return its result."""
        loop = self._loop
        if loop is None or self._thread is None:
            raise RuntimeError("FaultProxy is not running: call start() first")
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn(*args))
            except BaseException as exc:  # handed to the caller's thread
                done.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return done.result(CONTROL_TIMEOUT)

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        if self._blackhole_end is not None:
            self._blackhole_end.cancel()
            self._blackhole_end = None
        for link in list(self._links):
            link.abort()
        self._links.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 1.0)

    def _set_latency(self, seconds: float) -> None:
        self._latency = seconds

    def _stats(self) -> ProxyStats:
        return ProxyStats(
            connections_accepted=self._accepted,
            connections_live=len(self._links),
            upstream_failures=self._upstream_failures,
            dropped=self._dropped,
            bytes_to_upstream=self._to_upstream,
            bytes_to_client=self._to_client,
        )

    def _abort_all(self) -> int:
        links = list(self._links)
        for link in links:
            link.abort()
        self._links.clear()
        self._dropped += len(links)
        return len(links)

    def _begin_blackhole(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        if self._blackhole_end is not None:
            if until <= self._blackhole_end.when():
                return
            self._blackhole_end.cancel()
        self._open.clear()
        self._blackhole_end = loop.call_at(until, self._end_blackhole)

    def _end_blackhole(self) -> None:
        if self._blackhole_end is None:
            return
        self._blackhole_end.cancel()
        self._blackhole_end = None
        self._abort_all()  # before reopening: nothing held is ever delivered late
        self._open.set()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._accepted += 1
        link = _Link(writer)
        self._links.add(link)
        self._spawn(link, self._serve(link, reader))

    def _spawn(self, link: _Link, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        link.tasks.add(task)
        task.add_done_callback(link.tasks.discard)

    async def _serve(self, link: _Link, client_reader: asyncio.StreamReader) -> None:
        await self._open.wait()  # accepted in a blackhole: held until its end aborts us
        try:
            upstream_reader, upstream = await asyncio.wait_for(
                asyncio.open_connection(self.upstream_host, self.upstream_port),
                CONNECT_TIMEOUT,
            )
        except (OSError, asyncio.TimeoutError):
            self._upstream_failures += 1
            self._forget(link)
            link.abort()
            return
        link.upstream = upstream
        if link.closed:  # dropped while connecting
            upstream.transport.abort()
            return
        self._pump(link, client_reader, upstream, to_upstream=True)
        self._pump(link, upstream_reader, link.client, to_upstream=False)

    def _pump(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        to_upstream: bool,
    ) -> None:
        queue: asyncio.Queue[_Item] = asyncio.Queue(QUEUE_CHUNKS)
        self._spawn(link, self._read(link, reader, queue))
        self._spawn(link, self._write(link, queue, writer, to_upstream=to_upstream))

    async def _read(
        self, link: _Link, reader: asyncio.StreamReader, queue: asyncio.Queue[_Item]
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._open.wait()
                data = await reader.read(CHUNK)
                if not data:
                    break
                await queue.put((loop.time() + self._latency, data))
        except OSError:
            self._forget(link)
            link.abort()
            return
        await queue.put(None)

    async def _write(
        self,
        link: _Link,
        queue: asyncio.Queue[_Item],
        writer: asyncio.StreamWriter,
        *,
        to_upstream: bool,
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while (item := await queue.get()) is not None:
                due, data = item
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self._open.wait()
                writer.write(data)
                await writer.drain()
                if to_upstream:
                    self._to_upstream += len(data)
                else:
                    self._to_client += len(data)
            # End of stream from the other side: pass the half-close on, and close the
            # link once both directions have ended (Redis answers QUIT, then closes).
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:
            self._forget(link)
            link.abort()
            return
        link.eofs += 1
        if link.eofs == 2:
            self._forget(link)
            link.close()

    def _forget(self, link: _Link) -> None:
        self._links.discard(link)
