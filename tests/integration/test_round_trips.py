"""Round trips and footprint, counted on a Redis that only the worker's store talks to.

The worker runs with the solo pool so one process owns one store connection; the
broker and result backend live on the suite's other server. Redis 7 counts the
commands a script runs in ``INFO commandstats`` too, so round trips are read from
``MONITOR`` instead, keeping the commands that came over the network (a script's own
commands show there with the client type ``lua``).
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from celery import Celery

from celery_idem import IdempotentTask
from devtools.processes import wait_for
from devtools.redis_server import RedisServer
from tests.integration.conftest import standalone_only

pytestmark = pytest.mark.integration
T = 30
DEPLOYMENT_PAGE = Path(__file__).resolve().parents[2] / "docs" / "deployment.md"
MEMORY_COLUMNS = [
    "Redis",
    "keys",
    "result",
    "`MEMORY USAGE` per record",
    "`used_memory` growth per record",
]
# used_memory moves with the hash tables' resizing and the server's own buffers.
GROWTH_SLACK = 8
COPIES = 10_000


@pytest.fixture(autouse=True)
def _once(store_topology: str) -> None:
    """These tests bring their own private store server: one run is enough."""
    standalone_only(store_topology, "counted on a private standalone server")


class Monitor:
    """The commands that reach the server over the network (the test sends only markers)."""

    def __init__(self, server: RedisServer) -> None:
        self.client = server.client(0)
        self._monitor = self.client.monitor()
        self._conn = self._monitor.__enter__()
        self.seen: list[tuple[str, str]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                cmd = self._conn.next_command()
            except Exception:  # the connection is closed by close()
                return
            if cmd.get("client_type") != "lua":
                client = f"{cmd['client_address']}:{cmd.get('client_port')}"
                self.seen.append((client, cmd["command"]))

    def sync(self) -> list[str]:
        """Everything the server processed until now (a marker ECHO closes the batch)."""
        return [command for _, command in self.sync_by_client()]

    def sync_by_client(self) -> list[tuple[str, str]]:
        """As :meth:`sync`, each command with the address of the client that sent it."""
        marker = uuid.uuid4().hex
        self.client.echo(marker)
        wait_for(lambda: any(marker in c for _, c in self.seen), timeout=10, message="monitor")
        batch = [(a, c) for a, c in self.seen if marker not in c and "ECHO" not in c.upper()[:7]]
        self.seen.clear()
        return [(a, c.split()[0].strip('"').lower()) for a, c in batch]

    def close(self) -> None:
        self.client.close()
        self._monitor.connection.disconnect()


def test_one_round_trip_per_duplicate_two_per_first_run_and_small_records(
    start_worker: Any, store_server: RedisServer, tasks: ModuleType, uid: str
) -> None:
    w = start_worker(pool="solo", concurrency=1, extra_env={"IDEM_TEST_STORE": store_server.url(0)})
    monitor = Monitor(store_server)
    try:
        # Warm up: connect and load the scripts (EVALSHA -> NOSCRIPT -> SCRIPT LOAD) once.
        tasks.record.apply_async((f"warm-{uid}",), queue=w.queue).get(timeout=T)
        monitor.sync()

        payload = "x" * 98
        first = tasks.record.apply_async((uid, payload), queue=w.queue).get(timeout=T)
        assert monitor.sync() == ["evalsha", "evalsha"]  # claim + complete, no renewal

        again = tasks.record.apply_async((uid, payload), queue=w.queue).get(timeout=T)
        assert again == first
        assert monitor.sync() == ["evalsha"]  # one claim-or-read answers a duplicate
    finally:
        monitor.close()


def test_a_run_with_a_callback_adds_one_round_trip_after_celery_sent_it(
    start_worker: Any, store_server: RedisServer, tasks: ModuleType, uid: str
) -> None:
    # The continuation mark: claim, complete (marked), then ``dispatched`` from
    # on_success once Celery sent the callback. Only runs with callbacks or a chain pay.
    w = start_worker(pool="solo", concurrency=1, extra_env={"IDEM_TEST_STORE": store_server.url(0)})
    monitor = Monitor(store_server)
    link = tasks.plain_collect.s(f"{uid}:cb").set(queue=w.queue)

    def run(name: str) -> None:
        # Celery stores the result before on_success: wait for the worker's own
        # "succeeded" line, which it logs after on_success returned.
        res = tasks.record.apply_async((name,), link=link, queue=w.queue)
        res.get(timeout=T)
        wait_for(lambda: f"[{res.id}] succeeded" in w.log(), timeout=T, message="on_success")

    try:
        run(f"warm-{uid}")  # loads the three scripts (claim, complete, dispatched) once
        monitor.sync()
        run(uid)
        assert monitor.sync() == ["evalsha", "evalsha", "evalsha"]
        run(uid)
        assert monitor.sync() == ["evalsha"]  # a duplicate's own callback costs nothing more
    finally:
        monitor.close()


def test_dedupe_on_publish_reserves_in_the_one_round_trip_of_its_look_up(
    start_worker: Any, store_server: RedisServer, tasks: ModuleType, uid: str
) -> None:
    # The publisher's reservation replaces its peek: still one EVALSHA on the publisher,
    # and the worker's claim of its own reservation is its one blocking round trip.
    w = start_worker(pool="solo", concurrency=1, extra_env={"IDEM_TEST_STORE": store_server.url(0)})
    app = Celery("counted-publisher", broker=tasks.app.conf.broker_url,
                 backend=tasks.app.conf.result_backend, set_as_current=False)  # fmt: skip
    app.conf.idem_redis_url = store_server.url(0)
    deduped = app.task(
        tasks.deduped.run, base=IdempotentTask, bind=True, shared=False, name="t.deduped",
        idem_dedupe_on_publish=True,
    )  # fmt: skip
    monitor = Monitor(store_server)
    try:
        deduped.apply_async((f"warm-{uid}",), queue=w.queue).get(timeout=T)  # load scripts
        monitor.sync()
        first = deduped.apply_async((uid,), queue=w.queue)
        first.get(timeout=T)
        seen = monitor.sync_by_client()
        # reserve (publisher), claim and complete (worker)
        assert [c for _, c in seen] == ["evalsha", "evalsha", "evalsha"]
        publisher_addr = seen[0][0]
        assert [a for a, _ in seen].count(publisher_addr) == 1
        again = deduped.apply_async((uid,), queue=w.queue)
        assert again.id == first.id
        assert monitor.sync_by_client() == [(publisher_addr, "evalsha")]  # nothing sent
    finally:
        monitor.close()


def _memory_table() -> dict[tuple[str, str, int], tuple[int, int]]:
    """docs/deployment.md's measured sizes: (Redis, keys, result bytes) -> (usage, growth)."""
    text = DEPLOYMENT_PAGE.read_text(encoding="utf-8")
    chapter = text[text.index("\n## Memory sizing\n") :]
    chapter = chapter[: chapter.index("\n## ", 1)]
    table_text = chapter[chapter.index("\n| Redis |") + 1 :].split("\n\n", 1)[0]
    header, rule, *rows = table_text.splitlines()
    assert [c.strip() for c in header.strip("|").split("|")] == MEMORY_COLUMNS, header
    assert set(rule) <= set("|-: "), rule
    table: dict[tuple[str, str, int], tuple[int, int]] = {}
    for line in rows:
        version, keys, result, usage, growth = (c.strip() for c in line.strip("|").split("|"))
        size = int(result.removesuffix(" bytes"))
        table[version, keys.split()[0], size] = (
            int(usage.removesuffix(" B")),
            int(growth.removeprefix("about ").removesuffix(" B")),
        )
    return table


def test_record_sizes_are_the_ones_docs_deployment_quotes(
    start_worker: Any, store_server: RedisServer, tasks: ModuleType, uid: str
) -> None:
    """Completed records, written by a worker, measured on this Redis against the page.

    ``MEMORY USAGE`` of one record (exact: allocator size classes make it move in
    16-byte steps), then ``used_memory`` growth per record over ``COPIES`` copies of
    it (same key length, value and expiry), which adds what ``MEMORY USAGE`` leaves out:
    the keyspace and expiry hash-table entries. A Redis version the page has no rows
    for must not exceed the largest figure the page gives, so its sizing advice holds.
    """
    w = start_worker(pool="solo", concurrency=1, extra_env={"IDEM_TEST_STORE": store_server.url(0)})
    client = store_server.client(0)
    version = ".".join(client.info("server")["redis_version"].split(".")[:2])
    measured: dict[tuple[str, int], tuple[int, float]] = {}
    for keys in ("derived", "explicit"):
        for size in (50, 100):
            name = f"{uid}-{keys}-{size}"
            opts = {"idempotency_key": f"key-{name}"} if keys == "explicit" else {}
            before = set(client.scan_iter("idem:*"))
            # t.big returns "x" * n; JSON adds two quotes: a result of exactly `size` bytes.
            assert tasks.big.apply_async((name, size - 2), queue=w.queue, **opts).get(
                timeout=T
            ) == "x" * (size - 2)
            (key,) = set(client.scan_iter("idem:*")) - before
            raw = client.get(key)
            assert raw.endswith(b'"' + b"x" * (size - 2) + b'"')  # stored as it is
            assert raw.startswith(b"C")  # completed
            # An explicit key keeps the 16-character arguments fingerprint.
            assert (b":16:" in raw) == (keys == "explicit"), raw
            usage = client.memory_usage(key, samples=0)
            assert usage is not None
            db = 5 + len(measured)  # an empty database for each record's copies
            measured[keys, size] = (usage, _growth_per_copy(store_server, db, key, raw, usage))

    table = _memory_table()
    report = {k: (u, round(g)) for k, (u, g) in measured.items()}
    for (keys, size), (usage, growth) in measured.items():
        if (version, keys, size) in table:
            want_usage, want_growth = table[version, keys, size]
            assert usage == want_usage, (version, report)
            assert abs(growth - want_growth) <= GROWTH_SLACK, (version, report)
        else:
            worst = [v for (_, k, s), v in table.items() if (k, s) == (keys, size)]
            assert worst, (keys, size)
            assert usage <= max(u for u, _ in worst), (version, report)
            assert growth <= max(g for _, g in worst) + GROWTH_SLACK, (version, report)


def _growth_per_copy(server: RedisServer, db: int, key: bytes, raw: bytes, usage: int) -> float:
    """``used_memory`` growth per record over ``COPIES`` copies of ``raw`` in database ``db``.

    The server is this test's own (``store_server``), stopped afterwards: nothing to clean.
    """
    client = server.client(db)
    try:
        assert client.dbsize() == 0
        names = [key[:-8] + b"%08d" % i for i in range(COPIES)]  # same length as ``key``
        base = int(client.info("memory")["used_memory"])
        for start in range(0, COPIES, 1000):
            pipe = client.pipeline(transaction=False)
            for name in names[start : start + 1000]:
                pipe.set(name, raw, px=86_400_000)  # idem_ttl
            pipe.execute()
        grown = int(client.info("memory")["used_memory"]) - base
        assert client.memory_usage(names[0], samples=0) == usage  # a copy is the same size
        return grown / COPIES
    finally:
        client.close()
