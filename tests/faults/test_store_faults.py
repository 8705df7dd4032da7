"""Store faults: the idempotency store's Redis stops, restarts empty, forgets its scripts,
is fed hostile keys, results and forged records, or may evict records.

Every scenario runs a real worker against a Redis of its own (``store_server``, or a
persistent one made here), so stopping or poisoning it never touches the suite's Redis,
which keeps the broker, the result backend and the effect ledger.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis

from celery_idem import (
    IdempotencyError,
    InvalidIdempotencyKey,
    ResultNotStored,
    StoreUnavailable,
)
from celery_idem.keys import storage_key
from celery_idem.store import RecordState
from celery_idem.store.redis import RedisStore
from devtools.processes import wait_for
from devtools.redis_server import RedisServer
from tests.integration.conftest import ROOT, Worker, ledger_count

pytestmark = pytest.mark.integration
T = 60
PREFIX = "idem"
STORED_KEY = re.compile(rb"idem:[A-Za-z0-9_-]{6}:[A-Za-z0-9_-]{22}")


def _store_env(server: RedisServer) -> dict[str, str]:
    return {"IDEM_TEST_STORE": server.url(0)}


def _entries(ledger: redis.Redis, name: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in ledger.lrange(f"ledger:{name}", 0, -1)]


def _lost(results: list[Any]) -> int:
    """Messages that never came to an outcome (neither a value nor an error)."""
    return sum(not r.ready() for r in results)


def _read(server: RedisServer, task_name: str, key: str) -> Any:
    store = RedisStore.from_url(server.url(0))
    try:
        return store.read(storage_key(PREFIX, task_name, key))
    finally:
        store.client.close()


@pytest.fixture
def persistent_store(tmp_path: Path) -> Iterator[RedisServer]:
    """A store Redis with AOF (fsync always) in a fixed dir: it comes back with its data."""
    server = RedisServer(
        extra_args=["--appendonly", "yes", "--appendfsync", "always", "--dir", str(tmp_path)]
    )
    server.start()
    try:
        yield server
    finally:
        server.close()


class RefusingListener:
    """Holds a stopped Redis's port: accepts each connection and closes it at once.

    To a client this is a store that is down (``Connection closed by server``), and unlike
    a closed port it lets the test count the attempts, so it can wait for a retry rather
    than sleep and hope.
    """

    def __init__(self, port: int) -> None:
        self.accepted = 0
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self._sock.listen(16)
        self._sock.settimeout(0.02)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


# --------------------------------------------------------------------------- outages


@pytest.mark.scenario(
    "store down mid-task",
    inject="stop the store's Redis (AOF) while the body runs; start it again during the "
    "completion retries",
    expect="completion retried and stored; the duplicate is replayed, no re-run",
)
def test_store_down_mid_task_back_within_the_completion_retries(
    start_worker: Any,
    persistent_store: RedisServer,
    tasks: ModuleType,
    ledger: redis.Redis,
    uid: str,
    fault_report: Any,
) -> None:
    w = start_worker(extra_env=_store_env(persistent_store))
    key, flag = f"down-mid-{uid}", f"go-{uid}"
    first = tasks.sf_wait_flag.apply_async((uid, flag), idempotency_key=key, queue=w.queue)
    wait_for(lambda: ledger_count(ledger, uid) == 1, timeout=T, message="body started")
    claimed = _read(persistent_store, "t.sf_wait_flag", key)
    assert claimed is not None
    assert (claimed.state, claimed.task_id) == (RecordState.IN_PROGRESS.value, first.id)

    persistent_store.stop()
    listener = RefusingListener(persistent_store.port)
    try:
        ledger.set(f"flag:{flag}", 1)  # the body returns while the store is down
        # One completion attempt of the library connects at most four times (redis-py's
        # one retry of the command, each with one retry of the connect; two in practice),
        # so a fifth connection is the library's own retry of the completion.
        wait_for(lambda: listener.accepted >= 5, timeout=T, message="completion retried")
        assert ledger_count(ledger, f"{uid}:returned") == 1
        assert not first.ready()  # still retrying the completion, not given up
    finally:
        listener.close()
    persistent_store.start()

    out = first.get(timeout=T)
    assert out["name"] == uid
    record = _read(persistent_store, "t.sf_wait_flag", key)
    assert record is not None
    assert (record.state, record.task_id, record.fence) == (
        RecordState.RESULT.value,
        first.id,
        out["fence"],
    )
    assert "could not complete" not in w.log()

    dup = tasks.sf_wait_flag.apply_async((uid, flag), idempotency_key=key, queue=w.queue)
    assert dup.get(timeout=T) == out
    assert ledger_count(ledger, uid) == 1
    fault_report(
        deliveries=2,
        executions=ledger_count(ledger, uid),
        completions=1,
        lost=_lost([first, dup]),
        duplicate_effects=ledger_count(ledger, uid) - 1,
    )


@pytest.mark.scenario(
    "store down mid-task, past the retries",
    inject="stop the store's Redis (AOF) while the body runs (lease 4 s); start it again "
    "after the completion retries gave up",
    expect="the task succeeds, an error is logged, the key stays in progress until its "
    "lease runs out, then a duplicate re-runs (counted)",
)
def test_store_down_mid_task_past_the_retries_leaves_the_key_to_its_lease(
    start_worker: Any,
    persistent_store: RedisServer,
    tasks: ModuleType,
    ledger: redis.Redis,
    uid: str,
    fault_report: Any,
) -> None:
    w = start_worker(extra_env={**_store_env(persistent_store), "IDEM_TEST_LEASE": "4"})
    key, flag = f"down-long-{uid}", f"go-{uid}"
    first = tasks.sf_wait_flag.apply_async((uid, flag), idempotency_key=key, queue=w.queue)
    wait_for(lambda: ledger_count(ledger, uid) == 1, timeout=T, message="body started")

    persistent_store.stop()
    ledger.set(f"flag:{flag}", 1)
    # The task itself succeeds: its side effect happened, only the record is missing.
    out = first.get(timeout=T)
    assert out["name"] == uid
    error = wait_for(
        lambda: next((x for x in w.log().splitlines() if "could not complete" in x), None),
        timeout=T,
        message="the completion error in the worker log",
    )
    assert "ERROR" in error
    assert first.id in error
    assert key in error
    persistent_store.start()

    # Back with its data: the key is still held by the first run, until its lease ends.
    held = _read(persistent_store, "t.sf_wait_flag", key)
    assert held is not None
    assert (held.state, held.task_id, held.fence) == (
        RecordState.IN_PROGRESS.value,
        first.id,
        out["fence"],
    )

    dup = tasks.sf_wait_flag.apply_async((uid, flag), idempotency_key=key, queue=w.queue)
    again = dup.get(timeout=T)
    runs = _entries(ledger, uid)
    assert len(runs) == 2  # the documented re-run
    assert runs[1]["task_id"] == dup.id
    assert again["fence"] > out["fence"]
    assert "took over a key whose lease ran out" in w.log()
    record = _read(persistent_store, "t.sf_wait_flag", key)
    assert record is not None
    assert (record.state, record.task_id) == (RecordState.RESULT.value, dup.id)
    fault_report(
        deliveries=2,
        executions=len(runs),
        completions=1,
        lost=_lost([first, dup]),
        duplicate_effects=len(runs) - 1,
    )


@pytest.mark.scenario(
    "store restart, no persistence",
    inject="restart the store's Redis empty between two deliveries of one key",
    expect="the record is gone: the second delivery runs again (counted), with a higher fence",
)
def test_store_restart_without_persistence_reruns_the_key(
    start_worker: Any,
    store_server: RedisServer,
    tasks: ModuleType,
    ledger: redis.Redis,
    uid: str,
    fault_report: Any,
) -> None:
    w = start_worker(pool="solo", concurrency=1, extra_env=_store_env(store_server))
    key = f"restart-{uid}"
    first = tasks.record.apply_async((uid, 1), idempotency_key=key, queue=w.queue)
    assert first.get(timeout=T)["key"] == key
    record = _read(store_server, "t.record", key)
    assert record is not None
    assert record.state == RecordState.RESULT.value

    store_server.restart()
    client = store_server.client()
    try:
        assert client.dbsize() == 0
    finally:
        client.close()

    dup = tasks.record.apply_async((uid, 1), idempotency_key=key, queue=w.queue)
    assert dup.get(timeout=T)["key"] == key
    runs = _entries(ledger, uid)
    assert [r["task_id"] for r in runs] == [first.id, dup.id]
    assert runs[1]["fence"] > runs[0]["fence"]  # fences grow even across the lost record
    record = _read(store_server, "t.record", key)
    assert record is not None
    assert (record.state, record.task_id) == (RecordState.RESULT.value, dup.id)
    fault_report(
        deliveries=2,
        executions=len(runs),
        completions=2,
        lost=_lost([first, dup]),
        duplicate_effects=len(runs) - 1,
    )


@pytest.mark.scenario(
    "NOSCRIPT",
    inject="SCRIPT FLUSH on the store between a task and its duplicate (twice)",
    expect="scripts reload transparently; duplicates replayed, one execution per key",
)
def test_script_flush_reloads_scripts_and_still_replays(
    start_worker: Any,
    store_server: RedisServer,
    tasks: ModuleType,
    ledger: redis.Redis,
    uid: str,
    fault_report: Any,
) -> None:
    w = start_worker(pool="solo", concurrency=1, extra_env=_store_env(store_server))
    client = store_server.client()
    results = []

    def scripts() -> int:
        return int(client.info("memory")["number_of_cached_scripts"])

    def noscript_errors() -> int:
        return int(client.info("errorstats").get("errorstat_NOSCRIPT", {}).get("count", 0))

    try:
        for i, name in enumerate((f"{uid}-a", f"{uid}-b")):
            key = f"noscript-{name}"
            if i:  # the second key's claim and completion both meet a flushed cache
                client.script_flush()
                assert scripts() == 0
            first = tasks.record.apply_async((name, i), idempotency_key=key, queue=w.queue)
            out = first.get(timeout=T)
            client.script_flush()
            assert scripts() == 0
            dup = tasks.record.apply_async((name, i), idempotency_key=key, queue=w.queue)
            assert dup.get(timeout=T) == out
            assert scripts() >= 1  # reloaded by the worker
            assert ledger_count(ledger, name) == 1
            results += [first, dup]
        assert noscript_errors() >= 3  # the worker really met NOSCRIPT, and got over it
    finally:
        client.close()
    counts = [ledger_count(ledger, f"{uid}-{s}") for s in "ab"]
    fault_report(
        deliveries=len(results),
        executions=sum(counts),
        completions=2,
        lost=_lost(results),
        duplicate_effects=sum(c - 1 for c in counts),
    )


# --------------------------------------------------------------------------- hostile input

VALID_KEYS = {
    "nul": "a\x00b\x00",
    "only-nul": "\x00",
    "braces": "{}",
    "hashtag": "{a}",
    "hashtags": "{a}x{b}:{}",
    "emoji": "\U0001f511\U0001f4a5 key \U0001f469\u200d\U0001f4bb",
    "rtl": "\u0645\u0641\u062a\u0627\u062d \u202eabc\u202c \u05e9\u05dc\u05d5\u05dd",
    "glob": "idem:*?[]\\",
    "limit": "k" * 1024,
}


@pytest.mark.scenario(
    "hostile keys",
    inject="explicit keys: 10 MB, 1025 chars, empty, bytes; NUL, {}, {a}, emoji, RTL, "
    "1024 chars; the invalid ones also as a raw header from another producer",
    expect="bounded Redis keys (idem:<6>:<22>); invalid ones refused at the call site, nothing "
    "sent (or refused by the worker, nothing run); valid ones run once and replay",
)
def test_hostile_keys(
    start_worker: Any,
    store_server: RedisServer,
    tasks: ModuleType,
    ledger: redis.Redis,
    celery_env: dict[str, str],
    uid: str,
    fault_report: Any,
) -> None:
    w = start_worker(extra_env=_store_env(store_server))
    huge = "k" * (10 * 1024 * 1024)

    # Invalid at the call site: refused before anything is published.
    nowhere = f"sf-nowhere-{uid}"
    refusals = {
        "": "must not be empty",
        huge: "over the limit of 1024",
        "k" * 1025: "over the limit of 1024",
        b"bytes-key": "must be a str",
    }
    for bad, message in refusals.items():
        with pytest.raises(InvalidIdempotencyKey, match=message):
            tasks.record.apply_async((f"{uid}-bad", 0), idempotency_key=bad, queue=nowhere)
        with pytest.raises(InvalidIdempotencyKey, match=message):
            tasks.record.s(f"{uid}-bad", 0).set(idempotency_key=bad, queue=nowhere).delay()
    broker = redis.Redis.from_url(celery_env["IDEM_TEST_BROKER"])
    try:
        assert list(broker.scan_iter(match=f"*{nowhere}*")) == []  # nothing was enqueued
    finally:
        broker.close()

    # Invalid keys from a producer that bypasses the call site: the worker refuses them.
    raw = [
        tasks.app.send_task(
            "t.record", (f"{uid}-raw", 0), queue=w.queue, headers={"idempotency_key": bad}
        )
        for bad in ("", huge)
    ]
    for res, message in zip(raw, ("must not be empty", "over the limit of 1024"), strict=True):
        with pytest.raises(InvalidIdempotencyKey, match=message):
            res.get(timeout=T)

    # Valid ones: each runs once, its duplicate replays, the key comes back intact.
    firsts = {
        label: tasks.record.apply_async((f"{uid}-{label}", label), idempotency_key=key,
                                        queue=w.queue)
        for label, key in VALID_KEYS.items()
    }  # fmt: skip
    outs = {label: res.get(timeout=T) for label, res in firsts.items()}
    dups = {
        label: tasks.record.apply_async((f"{uid}-{label}", label), idempotency_key=key,
                                        queue=w.queue)
        for label, key in VALID_KEYS.items()
    }  # fmt: skip
    for label, key in VALID_KEYS.items():
        assert outs[label]["key"] == key
        assert dups[label].get(timeout=T) == outs[label]

    # No crash: the worker is alive and a later task still runs.
    later = tasks.record.apply_async((f"{uid}-later",), queue=w.queue)
    assert later.get(timeout=T)["name"] == f"{uid}-later"
    assert w.proc.poll() is None

    client = store_server.client()
    try:
        stored = set(client.scan_iter(match="*"))
        result = RecordState.RESULT.value.encode()  # the record's state byte (record.lua)
        completed = sum(client.get(k)[:1] == result for k in stored)
    finally:
        client.close()
    assert all(STORED_KEY.fullmatch(k) for k in stored), sorted(stored, key=len)[-1][:100]
    expected = {storage_key(PREFIX, "t.record", k).encode() for k in VALID_KEYS.values()}
    assert expected <= stored
    assert len(stored) == len(VALID_KEYS) + 1  # plus the later task's derived key

    counts = {label: ledger_count(ledger, f"{uid}-{label}") for label in VALID_KEYS}
    assert counts == dict.fromkeys(VALID_KEYS, 1)
    assert ledger_count(ledger, f"{uid}-bad") == 0
    assert ledger_count(ledger, f"{uid}-raw") == 0
    executions = sum(counts.values()) + ledger_count(ledger, f"{uid}-later")
    results = [*raw, *firsts.values(), *dups.values(), later]
    fault_report(
        deliveries=len(results),
        executions=executions,
        completions=completed,
        lost=_lost(results),
        duplicate_effects=sum(c - 1 for c in counts.values()),
    )


HOSTILE_RESULTS = {  # kind -> the reason a duplicate must be given
    "object": "Object of type object is not JSON serializable",
    "set": "Object of type set is not JSON serializable",
    "armed": "Object of type SfArmed is not JSON serializable",
    "huge": r"serializes to 5242\d{4} bytes, over idem_max_result_bytes \(1048576\)",
}


@pytest.mark.scenario(
    "hostile results",
    inject="results: object(), a set, a pickle-only class instance (json serializer), "
    "a 50 MB string",
    expect="key completed without a result; duplicates get ResultNotStored naming the "
    "reason; one execution each; pickle never used",
)
def test_hostile_results(
    start_worker: Any,
    store_server: RedisServer,
    tasks: ModuleType,
    ledger: redis.Redis,
    uid: str,
    fault_report: Any,
) -> None:
    w = start_worker(extra_env=_store_env(store_server))
    names = {kind: f"{uid}-{kind}" for kind in HOSTILE_RESULTS}
    firsts = {
        kind: tasks.sf_hostile_result.apply_async((names[kind], kind), queue=w.queue)
        for kind in HOSTILE_RESULTS
    }
    for kind, res in firsts.items():
        if kind == "huge":
            # Celery's own Redis result backend keeps 50 MB without trouble.
            assert len(res.get(timeout=T)) == tasks.SF_HUGE_BYTES
        else:  # nor can Celery's JSON result backend encode these
            with pytest.raises(Exception, match="not JSON serializable"):
                res.get(timeout=T)
    dups = {
        kind: tasks.sf_hostile_result.apply_async((names[kind], kind), queue=w.queue)
        for kind in HOSTILE_RESULTS
    }
    for kind, reason in HOSTILE_RESULTS.items():
        with pytest.raises(ResultNotStored, match=reason) as info:
            dups[kind].get(timeout=T)
        assert "will not run again" in str(info.value)

    client = store_server.client()
    try:
        raw = [client.get(k) for k in client.scan_iter(match="idem:*")]
    finally:
        client.close()
    # One completed-without-result record per kind, its reason kept as JSON, no pickle.
    no_result = RecordState.NO_RESULT.value.encode()
    assert sorted(r[:1] for r in raw) == [no_result] * len(HOSTILE_RESULTS)
    assert all(b"1:j{" in r for r in raw)
    counts = {kind: ledger_count(ledger, names[kind]) for kind in HOSTILE_RESULTS}
    assert counts == dict.fromkeys(HOSTILE_RESULTS, 1)
    assert ledger_count(ledger, f"unpickled:{names['armed']}") == 0  # never unpickled
    assert "could not complete" not in w.log()
    results = [*firsts.values(), *dups.values()]
    fault_report(
        deliveries=len(results),
        executions=sum(counts.values()),
        completions=len(raw),
        lost=_lost(results),
        duplicate_effects=sum(c - 1 for c in counts.values()),
    )


class _Payload:
    """Unpickling this calls ``call(*args)``: what a forged record would smuggle in."""

    def __init__(self, call: Callable[..., Any], *args: Any) -> None:
        self.call, self.args = call, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.call, self.args)


def _bomb(tasks: ModuleType, ledger_name: str, path: Path) -> bytes:
    """A pickle that writes to the effect ledger and creates ``path`` when loaded."""
    return pickle.dumps([_Payload(tasks.effect, ledger_name), _Payload(open, str(path), "w")])


def _forged_record(codec: str, payload: bytes, task_id: str = "forged-task-id") -> bytes:
    """A completed record in the format of ``celery_idem/store/lua/record.lua``."""
    fields = b"".join(f"{len(v)}:{v}".encode() for v in ("", "", task_id, codec))
    state = RecordState.RESULT.value.encode()
    return state + f"{int(time.time() * 1000)}:0:0:".encode() + fields + payload


@pytest.mark.scenario(
    "forged record",
    inject="a completed record written by hand with a pickle payload (codec 'p', and "
    "in full) whose loading writes to the ledger and creates a file",
    expect="refused with an IdempotencyError about content types; body not run, pickle "
    "never loaded",
)
def test_forged_pickle_record_is_refused_not_loaded(
    start_worker: Any,
    store_server: RedisServer,
    tasks: ModuleType,
    ledger: redis.Redis,
    uid: str,
    tmp_path: Path,
    fault_report: Any,
) -> None:
    w = start_worker(pool="solo", concurrency=1, extra_env=_store_env(store_server))
    # The bomb is live: loading it here has both side effects.
    pickle.loads(_bomb(tasks, f"armed-{uid}", tmp_path / "armed"))[1].close()
    assert ledger_count(ledger, f"armed-{uid}") == 1
    assert (tmp_path / "armed").exists()

    client = store_server.client()
    results, forged = [], {}
    try:
        for codec in ("p", "application/x-python-serialize;binary"):
            key = f"forged-{codec[:1]}-{uid}"
            skey = storage_key(PREFIX, "t.record", key)
            forged[skey] = _forged_record(codec, _bomb(tasks, f"forged-{uid}", tmp_path / "pwn"))
            client.set(skey, forged[skey])
            record = _read(store_server, "t.record", key)
            assert record is not None  # the library reads it as a completed pickle record
            assert (record.state, record.stored.codec) == (RecordState.RESULT.value, codec)
            res = tasks.record.apply_async((uid, codec), idempotency_key=key, queue=w.queue)
            results.append(res)
            with pytest.raises(IdempotencyError, match="content types") as info:
                res.get(timeout=T)
            assert "the body was not run" in str(info.value)
        assert {k: client.get(k) for k in forged} == forged  # left as it was
    finally:
        client.close()

    assert ledger_count(ledger, uid) == 0  # the body never ran
    assert ledger_count(ledger, f"forged-{uid}") == 0  # the pickle was never loaded
    assert not (tmp_path / "pwn").exists()
    later = tasks.record.apply_async((f"{uid}-later",), queue=w.queue)
    assert later.get(timeout=T)["name"] == f"{uid}-later"
    fault_report(
        deliveries=len(results),
        executions=ledger_count(ledger, uid),
        completions=0,
        lost=_lost(results),
        duplicate_effects=0,
    )


def _plant_damaged(client: redis.Redis, uid: str) -> dict[str, str]:
    """Records that are not in the record format, under three keys of ``t.record``."""
    plant: dict[str, Callable[[str], Any]] = {
        "garbage": lambda k: client.set(k, b"garbage"),
        "empty": lambda k: client.set(k, b""),
        "hash": lambda k: client.hset(k, "s", "C"),
    }
    keys = {}
    for label, put in plant.items():
        keys[label] = f"damaged-{label}-{uid}"
        put(storage_key(PREFIX, "t.record", keys[label]))
    return keys


@pytest.mark.scenario(
    "damaged record",
    inject="under a key's record: bytes not in the record format, an empty string, a hash "
    "(another application writing under the prefix)",
    expect="refused with an IdempotencyError, not taken for an outage (no retry loop); body "
    "not run; the record left as it is",
)
def test_damaged_records_are_refused_not_run(
    start_worker: Any,
    store_server: RedisServer,
    tasks: ModuleType,
    ledger: redis.Redis,
    uid: str,
    fault_report: Any,
) -> None:
    w = start_worker(extra_env=_store_env(store_server))
    client = store_server.client()
    results = []
    try:
        keys = _plant_damaged(client, uid)
        before = {k: client.dump(k) for k in client.scan_iter(match="idem:*")}
        for label, key in keys.items():
            res = tasks.record.apply_async((f"{uid}-{label}", label), idempotency_key=key,
                                           queue=w.queue)  # fmt: skip
            results.append(res)
            with pytest.raises(IdempotencyError, match="refused record") as info:
                res.get(timeout=T)
            assert not isinstance(info.value, StoreUnavailable)
            assert "idem_key_prefix" in str(info.value)  # points at the likely cause
        assert {k: client.dump(k) for k in before} == before
    finally:
        client.close()
    assert "store unavailable" not in w.log()  # no deferral loop: not an outage
    counts = [ledger_count(ledger, f"{uid}-{label}") for label in keys]
    assert counts == [0] * len(keys)
    later = tasks.record.apply_async((f"{uid}-later",), queue=w.queue)
    assert later.get(timeout=T)["name"] == f"{uid}-later"
    fault_report(
        deliveries=len(results),
        executions=sum(counts),
        completions=0,
        lost=_lost(results),
        duplicate_effects=0,
    )


def test_damaged_record_error_names_the_task_and_key(
    start_worker: Any, store_server: RedisServer, tasks: ModuleType, uid: str
) -> None:
    w = start_worker(extra_env=_store_env(store_server))
    client = store_server.client()
    try:
        key = _plant_damaged(client, uid)["garbage"]
    finally:
        client.close()
    res = tasks.record.apply_async((uid,), idempotency_key=key, queue=w.queue)
    with pytest.raises(IdempotencyError) as info:
        res.get(timeout=T)
    assert (info.value.task_name, info.value.key) == ("t.record", key)
    assert key in str(info.value)


# --------------------------------------------------------------------------- eviction


@pytest.mark.scenario(
    "eviction policy",
    inject="store Redis with maxmemory-policy allkeys-lru; then memory pressure evicts a "
    "completed record",
    expect="a warning at worker start naming the risk; an evicted key runs again (counted)",
)
def test_evicting_store_is_warned_about_at_worker_start(
    start_worker: Any,
    store_server: RedisServer,
    tasks: ModuleType,
    ledger: redis.Redis,
    uid: str,
    fault_report: Any,
) -> None:
    client = store_server.client()
    try:
        client.config_set("maxmemory-policy", "allkeys-lru")
        w = start_worker(extra_env=_store_env(store_server))
        log = w.log()
        warning = next((x for x in log.splitlines() if "maxmemory-policy" in x), "")
        assert "'allkeys-lru'" in warning
        assert "evict" in warning
        assert "runs again" in warning
        assert "noeviction" in warning  # and the fix
        assert log.index(warning) < log.index(" ready.")  # at start, before any task

        # The risk, for real: a completed record evicted under memory pressure.
        key = f"evict-{uid}"
        first = tasks.record.apply_async((uid, 1), idempotency_key=key, queue=w.queue)
        first.get(timeout=T)
        skey = storage_key(PREFIX, "t.record", key)
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory", used + 512 * 1024)
        filler = iter(range(100_000))

        def evicted() -> bool:
            pipe = client.pipeline(transaction=False)
            for _ in range(50):
                pipe.set(f"filler:{next(filler)}", b"f" * 10_000)
            pipe.execute()
            return not client.exists(skey)

        wait_for(evicted, timeout=T, interval=0, message="the record evicted")
        dup = tasks.record.apply_async((uid, 1), idempotency_key=key, queue=w.queue)
        dup.get(timeout=T)
    finally:
        client.close()
    runs = _entries(ledger, uid)
    assert [r["task_id"] for r in runs] == [first.id, dup.id]
    record = _read(store_server, "t.record", key)
    assert record is not None
    assert (record.state, record.task_id) == (RecordState.RESULT.value, dup.id)
    fault_report(
        deliveries=2,
        executions=len(runs),
        completions=2,
        lost=_lost([first, dup]),
        duplicate_effects=len(runs) - 1,
    )


def test_eviction_warning_reaches_the_worker_logfile(
    store_server: RedisServer, celery_env: dict[str, str], tmp_path: Path
) -> None:
    client = store_server.client()
    try:
        client.config_set("maxmemory-policy", "allkeys-lru")
    finally:
        client.close()
    w = Worker(celery_env, extra_env=_store_env(store_server))
    logfile = tmp_path / "worker.log"
    cmd = [
        sys.executable, "-m", "celery", "-A", "tests.integration.tasks", "worker",
        "-P", "solo", "-Q", w.queue, "-n", f"{w.queue}@%h", "-l", "INFO",
        "--logfile", str(logfile),
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    # As ``celery multi`` runs a worker: output to /dev/null, logging to --logfile.
    w.proc = subprocess.Popen(
        cmd, cwd=ROOT, env=w.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(
            lambda: (
                (logfile.exists() and " ready." in logfile.read_text()) or w.proc.poll() is not None
            ),  # type: ignore[union-attr]
            timeout=T,
            message="worker start",
        )
        assert w.proc.poll() is None
        assert re.search(
            r"WARNING/MainProcess\] celery-idem: .*maxmemory-policy 'allkeys-lru'",
            logfile.read_text(),
        )
    finally:
        w.kill()
