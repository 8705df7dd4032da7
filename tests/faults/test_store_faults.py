"""Store faults: the idempotency store's Redis stops, restarts empty, forgets its scripts,
is fed hostile keys, results and forged records, or may evict records.

Every scenario runs a real worker against a Redis of its own (``store_server``, or a
persistent one made here), so stopping or poisoning it never touches the suite's Redis,
which keeps the broker, the result backend and the effect ledger.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pickle
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
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


def _refusals(results: Iterable[Any], match: str) -> list[IdempotencyError]:
    """Each delivery fails with an :class:`IdempotencyError` matching ``match``."""
    errors = []
    for res in results:
        with pytest.raises(IdempotencyError, match=match) as info:
            res.get(timeout=T)
        errors.append(info.value)
    return errors


def _report(
    fault_report: Any, results: list[Any], runs_per_key: Iterable[int], completions: int
) -> None:
    """Report a scenario's figures: deliveries and lost tasks from ``results``, executions
    from the ledger's count of each key (the runs beyond a key's first are counted)."""
    runs = list(runs_per_key)
    fault_report(
        deliveries=len(results),
        executions=sum(runs),
        completions=completions,
        lost=_lost(results),
        duplicate_effects=sum(max(n - 1, 0) for n in runs),
    )


@dataclasses.dataclass
class Scene:
    """What every store scenario works with: the store's Redis under test, the test
    tasks, the effect ledger, the test's uid and, once :meth:`start` ran, a worker whose
    idempotency store is that Redis.

    Its methods are the steps the scenarios share, each measuring from the ledger or
    from the store's own record, never from what the library says.
    """

    server: RedisServer
    tasks: ModuleType
    ledger: redis.Redis
    uid: str
    start_worker: Callable[..., Worker]
    w: Worker = dataclasses.field(init=False)

    def start(self, **kwargs: Any) -> Worker:
        """Start a worker whose idempotency store is ``server`` (``start_worker``'s
        arguments; ``extra_env`` adds to the store's)."""
        env = {**_store_env(self.server), **kwargs.pop("extra_env", {})}
        self.w = self.start_worker(extra_env=env, **kwargs)
        return self.w

    def record_is(
        self, task_name: str, key: str, state: RecordState, task_id: str, fence: int | None = None
    ) -> None:
        """The store holds a record of ``key`` in ``state``, written by ``task_id`` (and
        ``fence``, where given)."""
        record = _read(self.server, task_name, key)
        assert record is not None
        assert (record.state, record.task_id) == (state.value, task_id)
        if fence is not None:
            assert record.fence == fence

    def ran_again(self, task_name: str, key: str, first: Any, dup: Any) -> list[dict[str, Any]]:
        """The duplicate ran the body again (counted): the ledger has one run of each
        delivery, in order, and the record is now the duplicate's. Returns the runs."""
        runs = _entries(self.ledger, self.uid)
        assert [r["task_id"] for r in runs] == [first.id, dup.id]
        self.record_is(task_name, key, RecordState.RESULT, dup.id)
        return runs

    def send_records(self, keys: dict[str, str]) -> dict[str, Any]:
        """One ``t.record`` per label under its key, each writing ``ledger:<uid>-<label>``."""
        return {
            label: self.tasks.record.apply_async(
                (f"{self.uid}-{label}", label), idempotency_key=key, queue=self.w.queue
            )
            for label, key in keys.items()
        }

    def runs_per_label(self, labels: Iterable[str]) -> dict[str, int]:
        """How many times the body ran for each label (``ledger:<uid>-<label>``)."""
        return {label: ledger_count(self.ledger, f"{self.uid}-{label}") for label in labels}

    def later_task_runs(self) -> Any:
        """No crash: the worker is alive and a task sent after the others still runs."""
        later = self.tasks.record.apply_async((f"{self.uid}-later",), queue=self.w.queue)
        assert later.get(timeout=T)["name"] == f"{self.uid}-later"
        assert self.w.proc is not None
        assert self.w.proc.poll() is None
        return later


@pytest.fixture
def scene(
    start_worker: Any, store_server: RedisServer, tasks: ModuleType, ledger: redis.Redis, uid: str
) -> Scene:
    """A scene on a fresh store Redis of this test's own (``store_server``)."""
    return Scene(store_server, tasks, ledger, uid, start_worker)


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


@pytest.fixture
def persistent_scene(scene: Scene, persistent_store: RedisServer) -> Scene:
    """A scene on :func:`persistent_store` (``store_server`` stays unused)."""
    return dataclasses.replace(scene, server=persistent_store)


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


def _store_down_mid_task(scene: Scene, key: str, **env: str) -> tuple[Any, str]:
    """A worker on the scene's store runs a ``t.sf_wait_flag`` under ``key``; once its body
    runs and holds the key, the store's Redis stops. The body returns once the test sets
    ``flag:<flag>`` in the ledger.

    Returns the task's result and its flag.
    """
    w = scene.start(extra_env=env)
    flag = f"go-{scene.uid}"
    first = scene.tasks.sf_wait_flag.apply_async(
        (scene.uid, flag), idempotency_key=key, queue=w.queue
    )
    wait_for(lambda: ledger_count(scene.ledger, scene.uid) == 1, timeout=T, message="body started")
    scene.record_is("t.sf_wait_flag", key, RecordState.IN_PROGRESS, first.id)
    scene.server.stop()
    return first, flag


@pytest.mark.scenario(
    "store down mid-task",
    inject="stop the store's Redis (AOF) while the body runs; start it again during the "
    "completion retries",
    expect="completion retried and stored; the duplicate is replayed, no re-run",
)
def test_store_down_mid_task_back_within_the_completion_retries(
    persistent_scene: Scene, fault_report: Any
) -> None:
    scene = persistent_scene  # its Redis comes back with its data
    tasks, ledger, uid = scene.tasks, scene.ledger, scene.uid
    key = f"down-mid-{uid}"
    first, flag = _store_down_mid_task(scene, key)
    listener = RefusingListener(scene.server.port)
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
    scene.server.start()

    out = first.get(timeout=T)
    assert out["name"] == uid
    scene.record_is("t.sf_wait_flag", key, RecordState.RESULT, first.id, out["fence"])
    assert "could not complete" not in scene.w.log()

    dup = tasks.sf_wait_flag.apply_async((uid, flag), idempotency_key=key, queue=scene.w.queue)
    assert dup.get(timeout=T) == out
    assert ledger_count(ledger, uid) == 1
    _report(fault_report, [first, dup], [ledger_count(ledger, uid)], completions=1)


@pytest.mark.scenario(
    "store down mid-task, past the retries",
    inject="stop the store's Redis (AOF) while the body runs (lease 4 s); start it again "
    "after the completion retries gave up",
    expect="the task succeeds, an error is logged, the key stays in progress until its "
    "lease runs out, then a duplicate re-runs (counted)",
)
def test_store_down_mid_task_past_the_retries_leaves_the_key_to_its_lease(
    persistent_scene: Scene, fault_report: Any
) -> None:
    scene = persistent_scene  # its Redis comes back with its data
    key = f"down-long-{scene.uid}"
    first, flag = _store_down_mid_task(scene, key, IDEM_TEST_LEASE="4")
    scene.ledger.set(f"flag:{flag}", 1)
    # The task itself succeeds: its side effect happened, only the record is missing.
    out = first.get(timeout=T)
    assert out["name"] == scene.uid
    error = wait_for(
        lambda: next((x for x in scene.w.log().splitlines() if "could not complete" in x), None),
        timeout=T,
        message="the completion error in the worker log",
    )
    assert "ERROR" in error
    assert first.id in error
    assert key in error
    scene.server.start()

    # Back with its data: the key is still held by the first run, until its lease ends.
    scene.record_is("t.sf_wait_flag", key, RecordState.IN_PROGRESS, first.id, out["fence"])

    dup = scene.tasks.sf_wait_flag.apply_async(
        (scene.uid, flag), idempotency_key=key, queue=scene.w.queue
    )
    again = dup.get(timeout=T)
    runs = scene.ran_again("t.sf_wait_flag", key, first, dup)  # the documented re-run
    assert again["fence"] > out["fence"]
    assert "took over a key whose lease ran out" in scene.w.log()
    _report(fault_report, [first, dup], [len(runs)], completions=1)


def _record_lost_between_deliveries(
    scene: Scene, key: str, lose: Callable[[], None]
) -> tuple[list[Any], list[dict[str, Any]]]:
    """Two deliveries of ``t.record`` under ``key``; between them ``lose`` makes the store
    lose the first's completed record, so the second runs the body again (counted).

    Returns the two results and the ledger's runs.
    """

    def deliver() -> Any:
        res = scene.tasks.record.apply_async(
            (scene.uid, 1), idempotency_key=key, queue=scene.w.queue
        )
        assert res.get(timeout=T)["key"] == key
        return res

    first = deliver()
    scene.record_is("t.record", key, RecordState.RESULT, first.id)
    lose()
    dup = deliver()
    return [first, dup], scene.ran_again("t.record", key, first, dup)


@pytest.mark.scenario(
    "store restart, no persistence",
    inject="restart the store's Redis empty between two deliveries of one key",
    expect="the record is gone: the second delivery runs again (counted), with a higher fence",
)
def test_store_restart_without_persistence_reruns_the_key(scene: Scene, fault_report: Any) -> None:
    scene.start(pool="solo", concurrency=1)

    def restart_empty() -> None:
        scene.server.restart()
        client = scene.server.client()
        try:
            assert client.dbsize() == 0
        finally:
            client.close()

    results, runs = _record_lost_between_deliveries(scene, f"restart-{scene.uid}", restart_empty)
    assert runs[1]["fence"] > runs[0]["fence"]  # fences grow even across the lost record
    _report(fault_report, results, [len(runs)], completions=2)


@pytest.mark.scenario(
    "NOSCRIPT",
    inject="SCRIPT FLUSH on the store between a task and its duplicate (twice)",
    expect="scripts reload transparently; duplicates replayed, one execution per key",
)
def test_script_flush_reloads_scripts_and_still_replays(scene: Scene, fault_report: Any) -> None:
    tasks, ledger, uid = scene.tasks, scene.ledger, scene.uid
    w = scene.start(pool="solo", concurrency=1)
    client = scene.server.client()
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
    _report(fault_report, results, scene.runs_per_label("ab").values(), completions=2)


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
def test_hostile_keys(scene: Scene, celery_env: dict[str, str], fault_report: Any) -> None:
    tasks, ledger, uid = scene.tasks, scene.ledger, scene.uid
    w = scene.start()
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
    firsts = scene.send_records(VALID_KEYS)
    outs = {label: res.get(timeout=T) for label, res in firsts.items()}
    dups = scene.send_records(VALID_KEYS)
    for label, key in VALID_KEYS.items():
        assert outs[label]["key"] == key
        assert dups[label].get(timeout=T) == outs[label]

    later = scene.later_task_runs()

    client = scene.server.client()
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

    counts = scene.runs_per_label(VALID_KEYS)
    assert counts == dict.fromkeys(VALID_KEYS, 1)
    assert ledger_count(ledger, f"{uid}-bad") == 0
    assert ledger_count(ledger, f"{uid}-raw") == 0
    results = [*raw, *firsts.values(), *dups.values(), later]
    runs = [*counts.values(), ledger_count(ledger, f"{uid}-later")]
    _report(fault_report, results, runs, completions=completed)


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
def test_hostile_results(scene: Scene, fault_report: Any) -> None:
    tasks, ledger, uid = scene.tasks, scene.ledger, scene.uid
    w = scene.start()

    def send_each() -> dict[str, Any]:  # ``ledger:<uid>-<kind>``, as runs_per_label reads
        return {
            kind: tasks.sf_hostile_result.apply_async((f"{uid}-{kind}", kind), queue=w.queue)
            for kind in HOSTILE_RESULTS
        }

    firsts = send_each()
    for kind, res in firsts.items():
        if kind == "huge":
            # Celery's own Redis result backend keeps 50 MB without trouble.
            assert len(res.get(timeout=T)) == tasks.SF_HUGE_BYTES
        else:  # nor can Celery's JSON result backend encode these
            with pytest.raises(Exception, match="not JSON serializable"):
                res.get(timeout=T)
    dups = send_each()
    for kind, reason in HOSTILE_RESULTS.items():
        with pytest.raises(ResultNotStored, match=reason) as info:
            dups[kind].get(timeout=T)
        assert "will not run again" in str(info.value)

    client = scene.server.client()
    try:
        raw = [client.get(k) for k in client.scan_iter(match="idem:*")]
    finally:
        client.close()
    # One completed-without-result record per kind, its reason kept as JSON, no pickle.
    no_result = RecordState.NO_RESULT.value.encode()
    assert sorted(r[:1] for r in raw) == [no_result] * len(HOSTILE_RESULTS)
    assert all(b"1:j{" in r for r in raw)
    counts = scene.runs_per_label(HOSTILE_RESULTS)
    assert counts == dict.fromkeys(HOSTILE_RESULTS, 1)
    assert ledger_count(ledger, f"unpickled:{uid}-armed") == 0  # never unpickled
    assert "could not complete" not in w.log()
    _report(fault_report, [*firsts.values(), *dups.values()], counts.values(), len(raw))


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
    scene: Scene, tmp_path: Path, fault_report: Any
) -> None:
    tasks, ledger, uid = scene.tasks, scene.ledger, scene.uid
    scene.start(pool="solo", concurrency=1)
    # The bomb is live: loading it here has both side effects.
    pickle.loads(_bomb(tasks, f"armed-{uid}", tmp_path / "armed"))[1].close()
    assert ledger_count(ledger, f"armed-{uid}") == 1
    assert (tmp_path / "armed").exists()

    client = scene.server.client()
    keys, forged = {}, {}
    try:
        for codec in ("p", "application/x-python-serialize;binary"):
            keys[codec] = f"forged-{codec[:1]}-{uid}"
            skey = storage_key(PREFIX, "t.record", keys[codec])
            forged[skey] = _forged_record(codec, _bomb(tasks, f"forged-{uid}", tmp_path / "pwn"))
            client.set(skey, forged[skey])
            record = _read(scene.server, "t.record", keys[codec])
            assert record is not None  # the library reads it as a completed pickle record
            assert (record.state, record.stored.codec) == (RecordState.RESULT.value, codec)
        results = list(scene.send_records(keys).values())
        for error in _refusals(results, "content types"):
            assert "the body was not run" in str(error)
        assert {k: client.get(k) for k in forged} == forged  # left as it was
    finally:
        client.close()

    counts = scene.runs_per_label(keys)
    assert counts == dict.fromkeys(keys, 0)  # the body never ran
    assert ledger_count(ledger, f"forged-{uid}") == 0  # the pickle was never loaded
    assert not (tmp_path / "pwn").exists()
    scene.later_task_runs()
    _report(fault_report, results, counts.values(), completions=0)


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
def test_damaged_records_are_refused_not_run(scene: Scene, fault_report: Any) -> None:
    w = scene.start()
    client = scene.server.client()
    try:
        keys = _plant_damaged(client, scene.uid)
        before = {k: client.dump(k) for k in client.scan_iter(match="idem:*")}
        results = list(scene.send_records(keys).values())
        for error in _refusals(results, "refused record"):
            assert not isinstance(error, StoreUnavailable)
            assert "idem_key_prefix" in str(error)  # points at the likely cause
        assert {k: client.dump(k) for k in before} == before
    finally:
        client.close()
    assert "store unavailable" not in w.log()  # no deferral loop: not an outage
    counts = scene.runs_per_label(keys)
    assert counts == dict.fromkeys(keys, 0)
    scene.later_task_runs()
    _report(fault_report, results, counts.values(), completions=0)


def test_damaged_record_error_names_the_task_and_key(scene: Scene) -> None:
    w = scene.start()
    client = scene.server.client()
    try:
        key = _plant_damaged(client, scene.uid)["garbage"]
    finally:
        client.close()
    res = scene.tasks.record.apply_async((scene.uid,), idempotency_key=key, queue=w.queue)
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
def test_evicting_store_is_warned_about_at_worker_start(scene: Scene, fault_report: Any) -> None:
    client = scene.server.client()
    try:
        client.config_set("maxmemory-policy", "allkeys-lru")
        w = scene.start()
        log = w.log()
        warning = next((x for x in log.splitlines() if "maxmemory-policy" in x), "")
        assert "'allkeys-lru'" in warning
        assert "evict" in warning
        assert "runs again" in warning
        assert "noeviction" in warning  # and the fix
        assert log.index(warning) < log.index(" ready.")  # at start, before any task

        # The risk, for real: a completed record evicted under memory pressure.
        key = f"evict-{scene.uid}"
        skey = storage_key(PREFIX, "t.record", key)
        filler = iter(range(100_000))

        def evicted() -> bool:
            pipe = client.pipeline(transaction=False)
            for _ in range(50):
                pipe.set(f"filler:{next(filler)}", b"f" * 10_000)
            pipe.execute()
            return not client.exists(skey)

        def evict() -> None:
            used = int(client.info("memory")["used_memory"])
            client.config_set("maxmemory", used + 512 * 1024)
            wait_for(evicted, timeout=T, interval=0, message="the record evicted")

        results, runs = _record_lost_between_deliveries(scene, key, evict)
    finally:
        client.close()
    _report(fault_report, results, [len(runs)], completions=2)


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
