"""Per call, in one process: celery-idem against Powertools' Redis ``idempotent_function``.

``python -m benchmarks.percall`` (``make bench`` runs it too, with ``--json``). The
throughput scenarios measure whole workers, where the broker and Celery's consumer
dominate; this measures the cost a task's call itself adds, where the two designs
differ: one private redis-server, one process, every call through Celery's tracer
(``celery.app.trace.build_tracer``, the function a worker runs per message, with
``task_ignore_result`` so no backend write is timed):

- ``celery-idem``: an ``IdempotentTask`` (its claim, the body, its completion);
- ``Powertools``: a plain task whose body calls a function decorated with AWS Lambda
  Powertools' ``idempotent_function`` on ``RedisCachePersistenceLayer`` (same server);
- ``plain tracer``: a plain task, the tracer's own cost, for scale.

Each is timed on a *first run* (a key never seen) and a *duplicate* (the same keys
again, each completed: new task ids), ``calls`` calls a batch. Beside them, on celery-idem's
own store client: a bare ``GET``, and the store's ``claim`` and ``complete`` alone
(``RedisStore`` with ``ClaimRequest`` / ``CompleteRequest``), and a duplicate's claim
alone. The blocks take turns in an order that rotates every round; every ratio is
taken within a round, and the report gives median [min, max] over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
import warnings
from collections.abc import Callable
from importlib import metadata
from typing import Any

from devtools.redis_server import RedisServer

__all__ = ["main", "measure", "timed", "tracer"]

ROUNDS = 7
CALLS = 1000
TTL = 86400
RESULT_CODEC = "j"


def tracer(app: Any, task: Any) -> Callable[[str], Any]:
    """One call of ``task`` as a worker runs it: the tracer with a fresh task id."""
    from celery.app.trace import build_tracer  # noqa: PLC0415 - after the app's config

    trace = build_tracer(task.name, task, app=app, eager=False, hostname="percall@local")

    def call(key: str) -> Any:
        tid = str(uuid.uuid4())
        request = {
            "id": tid, "task": task.name, "hostname": "percall@local", "retries": 0,
            "delivery_info": {"exchange": "", "routing_key": "bench", "redelivered": False},
            "is_eager": False, "ignore_result": True, "args": (key,), "kwargs": {},
        }  # fmt: skip
        out = trace(tid, (key,), {}, request)
        if out.info is not None or not str(out.retval).startswith(f"{key}:"):
            raise RuntimeError(f"{task.name}({key!r}) failed: {out.info!r} {out.retval!r}")
        return out.retval

    return call


def _build(url: str) -> dict[str, Any]:
    """The app, the three tasks' tracers and the raw store calls, all on ``url``."""
    import redis  # noqa: PLC0415
    from aws_lambda_powertools.utilities.idempotency import (  # noqa: PLC0415
        IdempotencyConfig,
        idempotent_function,
    )
    from aws_lambda_powertools.utilities.idempotency.persistence.cache import (  # noqa: PLC0415
        CachePersistenceLayer,
    )
    from celery import Celery, Task  # noqa: PLC0415

    from celery_idem import IdempotentTask  # noqa: PLC0415
    from celery_idem.store import ClaimRequest, CompleteRequest, RecordKind, Stored  # noqa: PLC0415
    from celery_idem.store.redis import RedisStore  # noqa: PLC0415

    app = Celery("percall", set_as_current=False)
    app.conf.update(
        broker_url="memory://", result_backend="cache+memory://", task_ignore_result=True,
        idem_redis_url=url,
    )  # fmt: skip
    port = int(url.rsplit(":", 1)[1].split("/", maxsplit=1)[0])
    # Its Redis layer (RedisCachePersistenceLayer, renamed CachePersistenceLayer in 3.x).
    client = redis.Redis(host="127.0.0.1", port=port)
    # Its RedisClientProtocol narrows redis-py's signatures: a redis.Redis is what it takes.
    persistence = CachePersistenceLayer(client=client)  # type: ignore[arg-type]
    config = IdempotencyConfig(expires_after_seconds=TTL)

    @idempotent_function(data_keyword_argument="key", persistence_store=persistence, config=config)
    def handle(key: str, task_id: str) -> str:
        return f"{key}:{task_id}"

    @app.task(bind=True, base=IdempotentTask, name="percall.idem")
    def idem(self: Task, key: str) -> str:
        return f"{key}:{self.request.id}"

    @app.task(bind=True, name="percall.powertools")
    def powertools(self: Task, key: str) -> str:
        return str(handle(key=key, task_id=self.request.id))

    @app.task(bind=True, name="percall.plain")
    def plain(self: Task, key: str) -> str:
        return f"{key}:{self.request.id}"

    store = RedisStore.from_url(url)
    result = Stored(RecordKind.RESULT, b'"' + b"x" * 48 + b'"', RESULT_CODEC)
    fences: dict[str, int] = {}

    first, later = "t", "u"  # owner tokens of the first run and of its duplicate

    def claim(key: str) -> None:
        request = ClaimRequest(key, token=first, task_id="i", fingerprint="", lease=60, ttl=TTL)
        fences[key] = store.claim(request).fence

    def complete(key: str) -> None:
        fence = fences.pop(key)
        store.complete(
            CompleteRequest(key, token=first, fence=fence, task_id="i", stored=result, ttl=TTL)
        )

    def duplicate_claim(key: str) -> None:
        store.claim(ClaimRequest(key, token=later, task_id="j", fingerprint="", lease=60, ttl=TTL))

    return {
        "tasks": {
            "idem": tracer(app, idem),
            "powertools": tracer(app, powertools),
            "plain": tracer(app, plain),
        },
        "raw": {
            "get": store.client.get,
            "claim": claim,
            "complete": complete,
            "duplicate_claim": duplicate_claim,
        },
    }


def timed(fn: Callable[[str], Any], keys: list[str]) -> float:
    """Microseconds per call of ``fn`` over ``keys``."""
    start = time.perf_counter()
    for key in keys:
        fn(key)
    return 1e6 * (time.perf_counter() - start) / len(keys)


def _block(name: str, parts: dict[str, Any], calls: int, tag: str) -> dict[str, float]:
    """One contender's turn in a round: its first runs, then their duplicates."""
    keys = [f"idem:percall:{tag}:{name}:{i}" for i in range(calls)]
    if name == "raw":
        raw = parts["raw"]
        return {
            "get": timed(raw["get"], keys),
            "claim": timed(raw["claim"], keys),
            "complete": timed(raw["complete"], keys),
            "duplicate_claim": timed(raw["duplicate_claim"], keys),
        }
    call = parts["tasks"][name]
    return {f"{name}_first": timed(call, keys), f"{name}_duplicate": timed(call, keys)}


def measure(url: str, rounds: int, calls: int) -> dict[str, Any]:
    """Every block in every round (rotated), then the per-round ratios."""
    parts = _build(url)
    blocks = ["idem", "powertools", "plain", "raw"]
    for name in blocks:  # connections, scripts, imports, first-use caches
        _block(name, parts, 200, "warm")
    per_round: list[dict[str, float]] = []
    for round_no in range(rounds):
        shift = round_no % len(blocks)
        row: dict[str, float] = {}
        for name in blocks[shift:] + blocks[:shift]:
            row.update(_block(name, parts, calls, f"r{round_no}"))
        per_round.append(row)
    us = {k: [r[k] for r in per_round] for k in per_round[0]}
    ratios = {
        "first": [r["idem_first"] / r["powertools_first"] for r in per_round],
        "duplicate": [r["idem_duplicate"] / r["powertools_duplicate"] for r in per_round],
        "claim_over_get": [r["claim"] / r["get"] for r in per_round],
        "complete_over_get": [r["complete"] / r["get"] for r in per_round],
        "duplicate_claim_over_get": [r["duplicate_claim"] / r["get"] for r in per_round],
    }
    versions = {}
    for package in ("aws-lambda-powertools", "redis", "hiredis", "celery"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {"rounds": rounds, "calls": calls, "us": us, "ratios": ratios, "versions": versions}


def main(argv: list[str] | None = None) -> int:
    """Start a redis-server, measure, print a table (or one JSON line with ``--json``)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.percall", description=__doc__)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--calls", type=int, default=CALLS, help="calls per batch")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply --calls")
    parser.add_argument("--json", action="store_true", help="one JSON line on stdout")
    args = parser.parse_args(argv)
    os.environ.pop("POWERTOOLS_IDEMPOTENCY_DISABLED", None)
    # Outside Lambda, Powertools warns at every call that it has no Lambda context (no
    # remaining time to bound the in-progress record by): said once here, not timed.
    warnings.filterwarnings("ignore", message="Couldn't determine the remaining time")
    try:
        import aws_lambda_powertools  # noqa: F401, PLC0415
    except ImportError as exc:
        out: dict[str, Any] = {"error": f"aws-lambda-powertools is not importable: {exc}"}
    else:
        with RedisServer() as server:
            calls = max(50, round(args.calls * args.scale))
            out = measure(server.url(0), args.rounds, calls)
    if args.json:
        sys.stdout.write(json.dumps(out) + "\n")
        return 0
    if "error" in out:
        print(out["error"])
        return 1
    for name, values in out["us"].items():
        print(f"{name:22s} {statistics.median(values):8.1f} us  [{min(values):.1f}, "
              f"{max(values):.1f}]")  # fmt: skip
    for name, values in out["ratios"].items():
        print(f"{name:22s} {statistics.median(values):8.2f} x   [{min(values):.2f}, "
              f"{max(values):.2f}]")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
