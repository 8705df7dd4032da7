"""``python -m benchmarks.postgres`` runs end to end (a smoke test: no timing is judged).

One round of a few calls on its own private PostgreSQL and redis-server, in a
subprocess, as ``make bench`` runs it; about 5 s. The figures go to the docs only; what
is checked here is that every block was timed, every path counted, and that the
transactional task wrote one row per key though each key also ran as a duplicate.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.postgres_page import HEADING, postgres_section
from devtools.pg_server import PostgresServerError, find_pg_bin

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.postgres


def test_one_round_runs_and_renders() -> None:
    pytest.importorskip("psycopg", reason="psycopg is not installed")
    try:
        find_pg_bin()
    except PostgresServerError as exc:
        pytest.skip(f"no PostgreSQL to start: {exc}")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.postgres", "--rounds", "1", "--calls", "20", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert "error" not in out, out["error"]
    assert {"idem_atomic_first", "idem_atomic_duplicate", "insert_first", "pg_floor"} <= set(
        out["us"]
    )
    assert all(len(values) == 1 for values in out["us"].values())
    pg = out["counts"]["postgres"]
    assert pg["idem_atomic_first"]["body"]
    assert pg["insert_first"]["body"]
    assert out["atomic_rows"]["rows"] == out["atomic_rows"]["keys"] > 0
    assert postgres_section(out).startswith(HEADING)
