"""The publisher process of one benchmark run: ``python -m benchmarks.publish SPEC``.

``SPEC`` is a JSON object (see :func:`main`). The process imports the benchmark app,
warms its connections, then times from the first publish until the completion counter
says every published message has finished (``task_postrun`` with ``SUCCESS``, counted
by the worker); it reads the worker tree's CPU time (``/proc``) at both ends. After the
clock stops it checks every delivery's result in the result backend (when results are
written at all) and prints one JSON line with the figures. With ``prefill``, every key
first runs once, untimed, so that the timed deliveries are duplicates of completed keys.
"""

from __future__ import annotations

import json
import os
import random
import resource
import sys
import time
from collections import defaultdict
from typing import Any

import redis
from celery_once import AlreadyQueued
from celery_once.helpers import import_backend

from benchmarks import procstat
from benchmarks.app import COUNTER_KEY, RETRIES_KEY, app, task_for

__all__ = ["deliveries", "main"]


def deliveries(run_id: str, n: int, keys: int | None, seed: int) -> list[str]:
    """The keys of ``n`` deliveries: all distinct, or ``n / keys`` of each key, shuffled.

    The shuffle is seeded, so every contender gets the same order in a round.
    """
    if not keys:
        return [f"{run_id}-{i}" for i in range(n)]
    order = [f"{run_id}-k{i % keys}" for i in range(n)]
    random.Random(seed).shuffle(order)  # noqa: S311 - a reproducible order, not a secret
    return order


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _warm(contender: str, store: redis.Redis | None) -> None:
    """Open every connection the timed part will use, so no handshake is timed."""
    with app.producer_or_acquire() as producer:
        producer.connection.ensure_connection(max_retries=3)
    app.backend.client.ping()
    if contender == "once":
        import_backend(app.conf.ONCE).redis.ping()
    elif contender == "singleton":
        task_for("singleton").singleton_backend.redis.ping()
    if store is not None:
        store.ping()


def _verify(order: list[str], ids: list[str | None], published: set[str]) -> dict[str, Any]:
    """What each delivery got: a SUCCESS whose value is ``"<its key>:<a run's id>"``."""
    backend = redis.Redis.from_url(os.environ["BENCH_BACKEND"])
    metas: dict[str, Any] = {}
    wanted = sorted({tid for tid in ids if tid})
    for start in range(0, len(wanted), 1000):
        chunk = wanted[start : start + 1000]
        for tid, raw in zip(
            chunk, backend.mget([f"celery-task-meta-{t}" for t in chunk]), strict=True
        ):
            metas[tid] = json.loads(raw) if raw else None
    backend.close()
    answered = wrong = missing = 0
    values_per_key: dict[str, set[str]] = defaultdict(set)
    result_bytes = []
    for key, tid in zip(order, ids, strict=True):
        if tid is None:
            continue  # refused at publish: this delivery has no result to wait for
        meta = metas.get(tid)
        if not meta or meta.get("status") != "SUCCESS":
            missing += 1
            continue
        value = meta.get("result")
        ran_in = value.rsplit(":", 1)[1] if isinstance(value, str) else ""
        if isinstance(value, str) and value.startswith(f"{key}:") and ran_in in published:
            answered += 1
            values_per_key[key].add(value)
            result_bytes.append(len(json.dumps(value)))
        else:
            wrong += 1
    return {
        "answered": answered,
        "wrong": wrong,
        "missing": missing,
        "body_runs": sum(len(v) for v in values_per_key.values()),
        "keys_with_one_value": sum(1 for v in values_per_key.values() if len(v) == 1),
        "distinct_keys": len(set(order)),
        "result_bytes": sum(result_bytes) / len(result_bytes) if result_bytes else 0,
    }


def _prefill(task: Any, order: list[str], args_tail: tuple[Any, ...], counter: Any) -> set[str]:
    """Run every key once and wait for it; the counters start again from zero after."""
    ids = {task.apply_async((key, *args_tail)).id for key in dict.fromkeys(order)}
    deadline = time.perf_counter() + 120
    while int(counter.get(COUNTER_KEY) or 0) < len(ids) and time.perf_counter() < deadline:
        time.sleep(0.01)
    counter.delete(COUNTER_KEY, RETRIES_KEY)
    return ids


def main(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement.

    ``spec`` keys: ``contender``, ``run_id``, ``n``, ``keys`` (None: all distinct),
    ``sleep_ms``, ``long``, ``seed``, ``worker_pid``, ``store_port`` (None for plain
    Celery), ``server_pids`` (our redis-servers), ``monitor_pid`` (redis-cli monitor or
    None), ``timeout`` (seconds), ``results`` (False: ``task_ignore_result``, nothing to
    verify), ``prefill`` (run every key once before the clock starts).
    """
    contender = spec["contender"]
    task = task_for(contender, long=spec["long"])
    order = deliveries(spec["run_id"], spec["n"], spec["keys"], spec["seed"])
    counter = redis.Redis.from_url(os.environ["BENCH_COUNTER"])
    store_port = spec["store_port"]
    store = redis.Redis(host="127.0.0.1", port=store_port) if store_port else None
    _warm(contender, store)
    counter.ping()
    args_tail = (spec["sleep_ms"],)
    prefilled = _prefill(task, order, args_tail, counter) if spec.get("prefill") else set()
    if store is not None:  # MONITOR counts only what happens between the markers
        store.echo(f"bench:start:{spec['run_id']}")
    ids: list[str | None] = []
    published: set[str] = set()
    refused = existing = 0

    worker = procstat.descendants(spec["worker_pid"])
    servers, monitor = spec["server_pids"], [p for p in [spec.get("monitor_pid")] if p]
    busy0, servers_cpu0 = procstat.machine_busy_seconds(), procstat.cpu_seconds(servers)
    monitor_cpu0 = procstat.cpu_seconds(monitor)
    worker_cpu0, own_cpu0 = procstat.cpu_seconds(worker), _own_cpu()
    t0 = time.perf_counter()
    for key in order:
        # No task id of our own: a caller that names one waits on it, so celery-idem
        # publishes such a call even with idem_dedupe_on_publish. A new id is a publish;
        # an id handed out before is a duplicate answered at publish (celery-singleton's
        # queued task, celery-idem's reserved, running or completed one).
        try:
            result = task.apply_async((key, *args_tail))
        except AlreadyQueued:  # celery-once refuses a duplicate while its lock is held
            ids.append(None)
            refused += 1
            continue
        ids.append(result.id)
        if result.id in published:
            existing += 1
        else:
            published.add(result.id)
    t_published = time.perf_counter()
    own_cpu_publish = _own_cpu() - own_cpu0
    expected = len(published)
    deadline = t0 + spec["timeout"]
    done = 0
    while True:
        done = int(counter.get(COUNTER_KEY) or 0)
        if done >= expected or time.perf_counter() > deadline:
            break
        time.sleep(0.005)
    t1 = time.perf_counter()
    worker_cpu1 = procstat.cpu_seconds(procstat.descendants(spec["worker_pid"]))
    own_cpu1, busy1 = _own_cpu(), procstat.machine_busy_seconds()
    servers_cpu = procstat.cpu_seconds(servers) - servers_cpu0
    monitor_cpu = procstat.cpu_seconds(monitor) - monitor_cpu0
    ours = worker_cpu1 - worker_cpu0 + own_cpu1 - own_cpu0 + servers_cpu + monitor_cpu

    out: dict[str, Any] = {
        "elapsed": t1 - t0,
        "publish_seconds": t_published - t0,
        "deliveries": len(order),
        "messages": expected,
        "completed": done,
        "timeout": done < expected,
        "retries": int(counter.get(RETRIES_KEY) or 0),
        "refused_at_publish": refused,
        "given_existing_result": existing,
        "worker_cpu": worker_cpu1 - worker_cpu0,
        "publisher_cpu": own_cpu_publish,
        "worker_pids": len(worker),
        "redis_servers_cpu": servers_cpu,
        "monitor_cpu": monitor_cpu,
        # Cores kept busy by processes that are not this benchmark's, on average.
        "foreign_cores": max(0.0, (busy1 - busy0) - ours) / (t1 - t0),
        "prefilled": len(prefilled),
    }
    if store is not None:
        out["publisher_ports"] = sorted(procstat.local_ports_to(os.getpid(), store_port))
        store.echo(f"bench:end:{spec['run_id']}")
        store.close()
    if spec.get("results", True):
        out.update(_verify(order, ids, published | prefilled))
    counter.close()
    return out


if __name__ == "__main__":
    result = main(json.loads(sys.argv[1]))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    # Skip interpreter teardown: the result consumer may hold thousands of
    # subscriptions, and unsubscribing them is no part of the measurement.
    os._exit(0)
