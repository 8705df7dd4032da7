"""The chaos soak's publisher: a steady, seeded, mixed workload, and every answer.

Run as its own process (``python -m tests.chaos.publisher``) by the orchestrator, with
the chaos app's environment. For ``--seconds`` it sends ``--rate`` operations a second,
each drawn from :data:`MIX`, and appends one ``Call`` line (``tests.chaos.checker``) per
message to the history; then it waits for the answers, read straight from the result
backend's records, until every call has one or ``--drain`` seconds have passed, and
writes one ``Answer`` line per call. What it sends depends only on the seed and on which
earlier calls had been answered when it looked (mismatches aim at answered keys).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import redis
from celery import chain, group

from tests.chaos import app as chaos

MIX: tuple[tuple[str, float], ...] = (
    ("unique", 0.30),
    ("dup", 0.20),
    ("late", 0.08),
    ("explicit", 0.12),
    ("mismatch", 0.05),
    ("retry", 0.09),
    ("autoretry", 0.08),
    ("chain", 0.05),
    ("group", 0.03),
)
"""Kinds of operation and their shares. ``dup`` resends a recent operation as a burst of
2 to 4 back-to-back copies (concurrent); ``late`` resends one older than :data:`LATE`."""
LATE = 15.0


class Publisher:
    """Sends the workload and writes the history (one JSON line per message)."""

    def __init__(self, rng: random.Random, history: TextIO, backend: redis.Redis) -> None:
        self.rng = rng
        self.history = history
        self.backend = backend
        self.count = 0
        # Operations that may be sent again: (first sent, kind, key, resend).
        self.sent: list[tuple[float, str, str, Callable[[], None]]] = []
        self.first_ids: dict[str, str] = {}  # explicit key -> its first call's task id

    def record(
        self, kind: str, task: str, key: str, tag: str, task_id: str, sent: float,
        *, expect: str = "value",
    ) -> None:  # fmt: skip
        self.count += 1
        line = {
            "call": self.count, "kind": kind, "task": task, "key": key, "args_tag": tag,
            "task_id": task_id, "sent": sent, "expect": expect,
        }  # fmt: skip
        self.history.write(json.dumps(line) + "\n")

    def tick(self) -> None:
        kinds, weights = zip(*MIX, strict=True)
        kind = self.rng.choices(kinds, weights)[0]
        getattr(self, f"send_{kind}")()

    # -- kinds ---------------------------------------------------------------------------

    def _fresh(self, kind: str) -> str:
        return f"{kind}-{self.count + 1}-{self.rng.getrandbits(32):08x}"

    def _remember(self, kind: str, key: str, resend: Callable[[], None]) -> None:
        self.sent.append((time.time(), kind, key, resend))

    def send_unique(self) -> None:
        key, work = self._fresh("u"), round(self.rng.uniform(0, 0.3), 3)

        def send(kind: str = "unique") -> None:
            now = time.time()
            res = chaos.op.apply_async((key, "a", work))
            self.record(kind, "chaos.op", key, "a", res.id, now)

        send()
        self._remember("unique", key, lambda: send("dup"))

    def send_explicit(self) -> None:
        key, work = self._fresh("x"), round(self.rng.uniform(0, 0.3), 3)

        def send(kind: str = "explicit") -> None:
            now = time.time()
            res = chaos.op.apply_async((key, "a", work), idempotency_key=key)
            self.first_ids.setdefault(key, res.id)
            self.record(kind, "chaos.op", key, "a", res.id, now)

        send()
        self._remember("explicit", key, lambda: send("dup"))

    def send_retry(self) -> None:
        self._simple("r", chaos.retry_op, "retry")

    def send_autoretry(self) -> None:
        self._simple("ar", chaos.auto_op, "autoretry")

    def _simple(self, prefix: str, task: Any, kind: str) -> None:
        key = self._fresh(prefix)

        def send(as_kind: str = kind) -> None:
            now = time.time()
            res = task.apply_async((key, "a"))
            self.record(as_kind, task.name, key, "a", res.id, now)

        send()
        self._remember(kind, key, lambda: send("dup"))

    def send_chain(self) -> None:
        key = self._fresh("c")

        def send(kind: str = "chain") -> None:
            now = time.time()
            flow = chain(
                chaos.step.s(None, key, "s1", "a"),
                chaos.step.s(key, "s2", "a"),
                chaos.step.s(key, "s3", "a"),
            )
            res = flow.apply_async()
            self.record(kind, "chaos.step", key, "a", res.id, now)

        send()
        self._remember("chain", key, lambda: send("dup"))

    def send_group(self) -> None:
        key = self._fresh("g")

        def send(kind: str = "group") -> None:
            now = time.time()
            res = group(chaos.op.s(f"{key}.{i}", "a", 0.05) for i in range(3)).apply_async()
            ids = ",".join(r.id for r in res.results)
            self.record(kind, "chaos.op", key, "a", ids, now)

        send()
        self._remember("group", key, lambda: send("dup"))

    def send_dup(self) -> None:
        recent = [s for s in self.sent[-50:]]
        if not recent:
            return self.send_unique()
        resend = self.rng.choice(recent)[3]
        for _ in range(self.rng.randint(2, 4)):
            resend()
        return None

    def send_late(self) -> None:
        old = [s for s in self.sent if s[0] < time.time() - LATE]
        if not old:
            return self.send_dup()
        self.rng.choice(old)[3]()
        return None

    def send_mismatch(self) -> None:
        """The same explicit key with other arguments, once its first call has answered
        (before that, the mismatch could claim first and the original be refused)."""
        answered = [
            key for key, task_id in self.first_ids.items()
            if b'"SUCCESS"' in (self.backend.get(f"celery-task-meta-{task_id}") or b"")
        ][-20:]  # fmt: skip
        if not answered:
            return self.send_explicit()
        key = self.rng.choice(answered)
        tag = f"m{self.count + 1}"
        now = time.time()
        res = chaos.op.apply_async((key, tag, 0.0), idempotency_key=key)
        self.record("mismatch", "chaos.op", key, tag, res.id, now, expect="mismatch")
        return None


def _when(meta: dict[str, Any]) -> float | None:
    done = meta.get("date_done")
    return datetime.fromisoformat(done).timestamp() if isinstance(done, str) else None


def _answer(metas: list[dict[str, Any] | None]) -> tuple[str | None, Any, str | None, float | None]:
    """State, value, error and time of a call from its messages' records (a group: all)."""
    if any(m is None or m.get("status") not in ("SUCCESS", "FAILURE") for m in metas):
        return None, None, None, None
    done = max((_when(m) or 0.0) for m in metas if m is not None) or None
    failed = [m for m in metas if m is not None and m["status"] == "FAILURE"]
    if failed:
        result = failed[0].get("result") or {}
        error = f"{result.get('exc_type', '?')}: {result.get('exc_message', '')}"
        return "FAILURE", None, error, done
    values = [m["result"] for m in metas if m is not None]
    return "SUCCESS", values if len(values) > 1 else values[0], None, done


def collect(history: Path, answers: Path, backend: redis.Redis, drain: float) -> int:
    """Wait for every call's answer (up to ``drain`` seconds); returns how many are lost."""
    calls = [json.loads(line) for line in history.read_text().splitlines() if line]
    pending = {c["call"]: c["task_id"].split(",") for c in calls}
    found: dict[int, tuple[str | None, Any, str | None, float | None]] = {}
    deadline = time.monotonic() + drain
    while pending and time.monotonic() < deadline:
        for number, ids in list(pending.items())[:2000]:
            raw = backend.mget([f"celery-task-meta-{i}" for i in ids])
            metas = [json.loads(r) if r else None for r in raw]
            state, value, error, done = _answer(metas)
            if state is not None:
                found[number] = (state, value, error, done)
                del pending[number]
        if pending:
            time.sleep(0.5)
    with answers.open("w") as out:
        for c in calls:
            state, value, error, done = found.get(c["call"], (None, None, None, None))
            line = {"call": c["call"], "state": state, "value": value, "error": error}
            out.write(json.dumps({**line, "done": done}) + "\n")
    return len(pending)


def _ticks(seconds: float, rate: float) -> Iterator[None]:
    """A steady pace: tick n at start + n/rate, never bunching up after a slow tick."""
    start = time.monotonic()
    n = 0
    while (now := time.monotonic()) < start + seconds:
        due = start + n / rate
        if due > now:
            time.sleep(due - now)
        yield
        n = max(n + 1, int((time.monotonic() - start) * rate))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--history", type=Path, required=True)
    parser.add_argument("--answers", type=Path, required=True)
    parser.add_argument("--drain", type=float, default=120.0)
    parser.add_argument(
        "--sent-flag", type=Path, required=True, help="created when the send phase ends"
    )
    args = parser.parse_args(argv)
    backend = redis.Redis.from_url(chaos.BACKEND)
    with args.history.open("w", buffering=1) as history:
        publisher = Publisher(random.Random(args.seed), history, backend)
        for _ in _ticks(args.seconds, args.rate):
            publisher.tick()
    args.sent_flag.touch()
    lost = collect(args.history, args.answers, backend, args.drain)
    print(f"publisher: {publisher.count} calls sent, {lost} without an answer", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
