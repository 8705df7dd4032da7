"""Every Python example of README.md and docs/ runs, so the pages cannot drift from the code.

Each page's ``python`` blocks run in order in one namespace per page, as a reader copies
them: on an eager Celery app and celery-idem's in-memory store (``use_memory_store``
covers every app, so an example's ``redis://localhost`` URLs are never dialled, and
eager calls publish nothing). The namespace starts with what the examples take as
given: ``app``, ``IdempotentTask``, a ``key`` and an ``event_id``. A block that defines a module
(``# tasks.py``, ``# shop/idem_redis.py``) becomes importable under that name for the
blocks after it. A test function an example defines without parameters is called too
(one taking pytest fixtures is left to pytest: ``docs/examples`` has those).

A block that cannot run on one machine says why in an HTML comment just above it
(``<!-- example: not run: <reason> -->``, invisible on the site); it must still parse.
Blocks included from ``docs/examples/`` (``--8<--``) are run by their own tests.
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
import textwrap
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from redis.connection import AbstractConnection

from celery_idem import IdempotentTask
from celery_idem.task import invalidate_settings
from celery_idem.testing import use_memory_store

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(
    r"(?P<note><!-- example: not run: (?P<why>[^>]+?) -->\s*\n)?"
    r"^(?P<indent>[ \t]*)```python[^\n]*\n(?P<code>.*?)^(?P=indent)```",
    re.S | re.M,
)
MODULE_HEADER = re.compile(r"^# ([\w/]+)\.py\b")


@dataclass
class Block:
    page: Path
    line: int
    code: str
    not_run: str | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    found = []
    for match in BLOCK.finditer(text):
        code = textwrap.dedent(match["code"])
        if code.lstrip().startswith("--8<--"):
            continue
        line = text.count("\n", 0, match.start("indent")) + 1
        found.append(Block(page, line, code, match["why"]))
    return found


ALL = [block for page in PAGES for block in blocks_of(page)]


@pytest.mark.parametrize("block", ALL, ids=[b.where for b in ALL])
def test_every_example_parses(block: Block) -> None:
    ast.parse(block.code, filename=block.where)


@pytest.fixture
def eager_everywhere(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every Celery app made meanwhile runs its tasks eagerly, on the memory store."""
    original = Celery.__init__

    def eager_init(self: Celery, *args: Any, **kwargs: Any) -> None:
        kwargs["set_as_current"] = False
        original(self, *args, **kwargs)
        self.conf.task_always_eager = True
        self.conf.task_eager_propagates = True
        # An example's own URLs are never dialled (send_task publishes even when eager).
        self.conf.broker_url = "memory://"
        self.conf.result_backend = "cache+memory://"

    def no_redis(connection: Any, *args: Any, **kwargs: Any) -> None:
        raise AssertionError(
            f"a docs example reached for a real Redis ({connection.host}:{connection.port})"
        )

    monkeypatch.setattr(Celery, "__init__", eager_init)
    monkeypatch.setattr(AbstractConnection, "connect", no_redis)
    with use_memory_store():
        yield
    invalidate_settings()


def run_page(page: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Run the page's blocks in order; return the places of those that ran."""
    app = Celery(f"docs-{page.stem}")
    namespace: dict[str, Any] = {
        "__name__": f"docs_{page.stem}",
        "app": app,
        "IdempotentTask": IdempotentTask,
        "key": "order-42",
        "event_id": "evt_1",
    }
    ran = []
    for block in blocks_of(page):
        if block.not_run:
            continue
        header = MODULE_HEADER.match(block.code)
        if header and header[1] not in {"celeryconfig"}:
            # A module of the reader's project: its own namespace, importable after.
            name = header[1].replace("/", ".")
            module = types.ModuleType(name)
            module.__dict__["__name__"] = name
            exec(compile(block.code, block.where, "exec"), module.__dict__)
            monkeypatch.setitem(sys.modules, name, module)
            namespace.update({k: v for k, v in module.__dict__.items() if not k.startswith("__")})
        else:
            exec(compile(block.code, block.where, "exec"), namespace)
        for name, value in list(namespace.items()):
            if name.startswith("test_") and callable(value):
                namespace.pop(name)
                if not inspect.signature(value).parameters:  # fixtures' tests: pytest's job
                    value()
        ran.append(block.where)
    return ran


PAGES_WITH_BLOCKS = [page for page in PAGES if blocks_of(page)]


@pytest.mark.parametrize(
    "page", PAGES_WITH_BLOCKS, ids=[str(p.relative_to(ROOT)) for p in PAGES_WITH_BLOCKS]
)
def test_every_example_runs_or_says_why_not(
    page: Path, eager_everywhere: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran = run_page(page, monkeypatch)
    expected = [b.where for b in blocks_of(page) if not b.not_run]
    assert ran == expected
