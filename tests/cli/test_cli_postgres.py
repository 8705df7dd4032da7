"""``celery idem`` on the PostgreSQL store: every command, on the suite's own PostgreSQL.

The commands run in process through ``python -m celery_idem``'s click group
(``celery_idem.cli.main``, with ``-A tests.cli.pg_app``: the app is loaded as the CLI
loads it), so no interpreter starts per command; one test runs ``celery -A ... idem``
as a subprocess, through Celery's own entry point. Records are written by real claims
and completions through the store, and by eager runs of the app's tasks. The module
shares one migrated database; each test has a key prefix of its own, so listings and
counts see only its records. Tests that need an empty or damaged database take their
own (``fresh_pg_url``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed")

from celery import Celery  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from celery_idem.cli import main  # noqa: E402
from celery_idem.config import resolve_settings  # noqa: E402
from celery_idem.keys import storage_key  # noqa: E402
from celery_idem.store import ClaimRequest, CompleteRequest, RecordKind, Stored  # noqa: E402
from celery_idem.store.connect import postgres_store_for  # noqa: E402
from celery_idem.store.postgres import PostgresStore  # noqa: E402
from celery_idem.store.postgres_admin import SCHEMA_VERSION, migrate  # noqa: E402
from celery_idem.task import invalidate_settings  # noqa: E402
from devtools.processes import free_port  # noqa: E402
from tests.cli import pg_app as pg_app_module  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.cli.pg_app"
PAGE = ROOT / "docs" / "cli.md"


@dataclass
class PgCli:
    """The CLI on one database, with the app's tasks and the store writing to it."""

    url: str
    app: ModuleType
    prefix: str

    @property
    def store(self) -> PostgresStore:
        store = postgres_store_for(resolve_settings({"idem_store_url": self.url}).endpoint)
        assert isinstance(store, PostgresStore)
        return store

    def run(self, *args: str, input: str = "") -> Any:
        """One command in process; never raises on a non-zero exit (tests check it)."""
        return CliRunner().invoke(main, ["-A", APP, *args], input=input, catch_exceptions=False)

    def json(self, *args: str, code: int = 0) -> Any:
        done = self.run(*args, "--json")
        assert done.exit_code == code, (done.exit_code, done.stdout, done.stderr)
        return json.loads(done.stdout)

    def key(self, task: str, key: str) -> str:
        return storage_key(self.prefix, task, key)

    def claimed(self, task: str, key: str, *, lease: float = 60, ttl: float = 3600) -> str:
        """A record in progress, claimed through the store; its storage key."""
        stored = self.key(task, key)
        out = self.store.claim(
            ClaimRequest(
                stored,
                token=uuid.uuid4().hex,
                task_id=f"id-{key}",
                fingerprint="",
                lease=lease,
                ttl=ttl,
            )
        )
        assert out.state.name == "CLAIMED", out
        return stored

    def completed(self, task: str, key: str, payload: bytes = b"3", *, ttl: float = 3600) -> str:
        """A completed record, claimed then completed through the store; its storage key."""
        stored = self.key(task, key)
        token, task_id = uuid.uuid4().hex, f"id-{key}"
        out = self.store.claim(
            ClaimRequest(stored, token=token, task_id=task_id, fingerprint="", lease=60, ttl=ttl)
        )
        assert self.store.complete(
            CompleteRequest(
                stored,
                token=token,
                fence=out.fence,
                task_id=task_id,
                stored=Stored(RecordKind.RESULT, payload, "j"),
                ttl=ttl,
            )
        )
        return stored


def _configure(app: ModuleType, url: str, prefix: str = "idem") -> None:
    app.app.conf.idem_store_url = url
    app.app.conf.idem_key_prefix = prefix
    invalidate_settings()


@pytest.fixture(scope="module")
def module_url(pg_server: Any) -> str:
    """One migrated database for the module's tests."""
    url = str(pg_server.create_database(f"cli_{uuid.uuid4().hex[:10]}"))
    migrate(url)
    return url


@pytest.fixture
def pg_app() -> Iterator[ModuleType]:
    """``tests.cli.pg_app``, put back on its default store afterwards."""
    try:
        yield pg_app_module
    finally:
        _configure(pg_app_module, "memory://cli-pg")


@pytest.fixture
def cli(module_url: str, pg_app: ModuleType) -> PgCli:
    """The CLI and the app on the module's database, under a key prefix of this test."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    _configure(pg_app, module_url, prefix)
    return PgCli(module_url, pg_app, prefix)


def _on(cli: PgCli, url: str) -> PgCli:
    """The same app pointed at another database."""
    _configure(cli.app, url, cli.prefix)
    return PgCli(url, cli.app, cli.prefix)


def _sql(url: str, statement: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(statement)
        return cursor.fetchall() if cursor.description else []


def _findings(report: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {f["check"]: (f["status"], f"{f['detail']} | {f['fix']}") for f in report["findings"]}


# --------------------------------------------------------------------------- migrate


def test_migrate_creates_the_schema_and_a_second_run_is_harmless(
    cli: PgCli, fresh_pg_url: str
) -> None:
    db = _on(cli, fresh_pg_url)
    first = db.run("migrate")
    assert first.exit_code == 0, first.stderr
    assert first.stdout.startswith("Created the celery-idem schema (version 1) in database")
    assert _sql(fresh_pg_url, "SELECT version FROM celery_idem_schema") == [(SCHEMA_VERSION,)]
    db.completed("pg.add", "kept")  # a record the second run must keep

    again = db.json("migrate")
    assert again["schema_version"] == SCHEMA_VERSION
    assert "already at version 1" in again["done"]
    assert again["store"] == fresh_pg_url
    assert db.json("inspect", "kept", "--task", "pg.add")["state"] == "completed"


def test_migrate_and_purge_through_celerys_own_entry_point(fresh_pg_url: str) -> None:
    env = {
        **os.environ,
        "IDEM_CLI_PG_STORE": fresh_pg_url,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", APP, "idem", "migrate"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Created the celery-idem schema" in done.stdout
    assert _sql(fresh_pg_url, "SELECT to_regclass('celery_idem_records') IS NOT NULL") == [(True,)]


def test_migrate_is_refused_on_redis_and_on_the_in_process_store(cli: PgCli) -> None:
    # Refused from the settings alone: nothing listens on this port, nothing is dialled.
    _configure(cli.app, f"redis://127.0.0.1:{free_port()}/0")
    redis = cli.run("migrate")
    assert redis.exit_code == 1
    assert "is Redis, which keeps records without a schema: there is nothing to migrate" in (
        " ".join(redis.stderr.split())
    )
    _configure(cli.app, "memory://cli-pg")
    memory = cli.run("migrate")
    assert memory.exit_code == 1
    assert "in-process store" in memory.stderr


# --------------------------------------------------------------------------- records


def test_inspect_shows_a_record_an_eager_run_completed(cli: PgCli) -> None:
    run = cli.app.add.apply((1, 2), idempotency_key="order-1")
    assert run.get() == 3
    view = cli.json("inspect", "order-1", "--task", "pg.add")
    assert view["storage_key"] == cli.key("pg.add", "order-1")
    assert (view["state"], view["substate"], view["task_id"]) == ("completed", "result", run.id)
    assert view["result"]["preview"] == "3"
    assert view["store"] == cli.url
    assert 86000 < view["expires_in"] <= 86400
    assert abs(view["fence"] / 1000 - time.time()) < 30

    table = cli.run("inspect", "order-1", "--task", "pg.add")
    assert table.exit_code == 0
    lines = dict(re.findall(r"^([a-z ]+):\s+(.*)$", table.stdout, re.M))
    assert (lines["state"], lines["preview"]) == ("completed (result)", "3")


def test_inspect_shows_a_running_claim_and_its_durable_steps_count(cli: PgCli) -> None:
    stored = cli.claimed("pg.send", "7:welcome", lease=60)
    view = cli.json("inspect", stored, "--storage-key")
    assert (view["state"], view["substate"], view["task"]) == ("in_progress", "running", "pg.send")
    assert 50 < view["lease_left"] <= 60
    cli.app.checkout.apply((8,)).get()
    done = cli.json("inspect", cli.key("pg.checkout", _derived_key(cli, 8)), "--storage-key")
    assert (done["state"], done["steps_done"]) == ("completed", 2)


def _derived_key(cli: PgCli, order: int) -> str:
    """The key ``pg.checkout(order)`` derives, as ``celery idem key`` prints it."""
    return str(cli.json("key", "pg.checkout", "--args", json.dumps([order]))["key"])


def test_inspect_and_forget_of_a_missing_record_exit_3(cli: PgCli) -> None:
    assert cli.run("inspect", "nope", "--task", "pg.add").exit_code == 3
    assert cli.run("forget", "nope", "--task", "pg.add", "--yes").exit_code == 3


def test_forget_deletes_a_completed_record_and_refuses_a_live_one(cli: PgCli) -> None:
    cli.completed("pg.add", "done")
    no = cli.run("forget", "done", "--task", "pg.add", input="n\n")
    assert no.exit_code == 1
    assert "state:" in no.stdout
    assert "Forget this record?" in no.stderr
    forgotten = cli.json("forget", "done", "--task", "pg.add", "--yes")
    assert forgotten["forgotten"] is True
    assert cli.store.read(cli.key("pg.add", "done")) is None
    # The next call runs the body again.
    assert cli.app.add.apply((2, 2), idempotency_key="done").get() == 4

    stored = cli.claimed("pg.add", "busy")
    refused = cli.run("forget", "busy", "--task", "pg.add", "--yes")
    assert refused.exit_code == 1
    assert "--force" in refused.stderr
    assert cli.store.read(stored) is not None
    assert cli.run("forget", "busy", "--task", "pg.add", "--yes", "--force").exit_code == 0
    assert cli.store.read(stored) is None


def test_list_pages_through_the_table_and_filters_by_task_and_state(cli: PgCli) -> None:
    running = {cli.claimed("pg.send", f"{i}:hi") for i in range(3)}
    done = {cli.completed("pg.add", f"k{i}") for i in range(4)}
    listing = cli.json("list", "--limit", "0", "--scan-count", "2")
    assert {r["storage_key"] for r in listing["records"]} == running | done
    assert listing["scan_calls"] >= 4  # 7 rows, 2 per page
    assert listing["truncated"] is False
    in_progress = cli.json("list", "--state", "in_progress")["records"]
    assert {r["storage_key"] for r in in_progress} == running
    assert {r["task"] for r in in_progress} == {"pg.send"}
    only_add = cli.json("list", "--task", "pg.add")["records"]
    assert {r["storage_key"] for r in only_add} == done
    limited = cli.json("list", "--limit", "2", "--scan-count", "2")
    assert (len(limited["records"]), limited["truncated"]) == (2, True)

    table = cli.run("list", "--scan-count", "2")
    assert table.exit_code == 0
    assert re.search(r"^7 record\(s\) in .* \(\d+ page\(s\)\)\.$", table.stdout, re.M), table.stdout


def test_stats_counts_by_task_and_state_and_measures_rows(cli: PgCli) -> None:
    for i in range(2):
        cli.claimed("pg.send", f"{i}:hi")
    for i in range(3):
        cli.completed("pg.add", f"k{i}", payload=b"x" * 100)
    stats = cli.json("stats")
    assert stats["records"] == 5
    assert stats["by_task"]["pg.send"]["running"] == 2
    assert stats["by_task"]["pg.add"]["result"] == 3
    assert stats["memory"]["sampled"] == 5
    assert stats["memory"]["mean_bytes"] > 100  # the row, its payload included
    assert stats["oldest_in_progress"]["task"] == "pg.send"

    table = cli.run("stats")
    assert table.exit_code == 0
    assert re.search(r"^records:\s+5 \(1 page\(s\)\)$", table.stdout, re.M), table.stdout
    assert "(pg_column_size of 5 record(s))" in table.stdout


# --------------------------------------------------------------------------- purge


def _expired(db: PgCli, count: int) -> set[str]:
    """``count`` completed records whose retention has passed (on the server's clock)."""
    keys = {db.completed("pg.add", f"old-{i}", ttl=0.05) for i in range(count)}
    time.sleep(0.3)  # ttl 50 ms after completion; fences (claim times in ms) passed too
    return keys


def test_purge_deletes_expired_rows_in_batches_and_keeps_the_rest(
    cli: PgCli, fresh_pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = _on(cli, fresh_pg_url)
    migrate(fresh_pg_url)
    live = {db.completed("pg.add", "live"), db.claimed("pg.send", "1:hi")}
    _expired(db, 5)
    batches: list[int] = []
    original = PostgresStore.call

    def counting(self: PostgresStore, key: Any, sql: str, params: Any, **kw: Any) -> Any:
        rows = original(self, key, sql, params, **kw)
        if "celery_idem_purge" in sql:
            batches.append(int(rows[0][0]))
        return rows

    monkeypatch.setattr(PostgresStore, "call", counting)
    done = db.run("purge", "--batch", "2")
    assert done.exit_code == 0, done.stderr
    assert done.stdout.strip() == f"{fresh_pg_url}: deleted 5 expired record(s) (batches of 2)."
    assert batches == [2, 2, 1]
    assert {key for (key,) in _sql(fresh_pg_url, "SELECT key FROM celery_idem_records")} == live

    again = db.json("purge")
    assert (again["deleted"], again["kind"], again["note"]) == (0, "postgres", None)


def test_purge_on_redis_says_redis_expires_records_itself(cli: PgCli) -> None:
    _configure(cli.app, f"redis://127.0.0.1:{free_port()}/0")  # nothing is dialled
    done = cli.run("purge")
    assert done.exit_code == 0, done.stderr
    assert "Redis expires records itself (their TTLs)" in done.stdout
    report = cli.json("purge")
    assert (report["kind"], report["deleted"]) == ("redis", 0)
    _configure(cli.app, "memory://cli-pg")
    assert cli.run("purge").exit_code == 1


def _beat_snippet() -> str:
    """The ``python`` block of the page's ``purge`` section: the beat schedule."""
    section = PAGE.read_text(encoding="utf-8").split("\n## purge\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```", section, re.M | re.S)
    assert len(blocks) == 1, blocks
    return str(blocks[0])


def test_the_pages_beat_schedule_runs_the_purge_task(cli: PgCli, fresh_pg_url: str) -> None:
    db = _on(cli, fresh_pg_url)
    migrate(fresh_pg_url)
    _expired(db, 3)
    live = db.completed("pg.add", "live")

    app = Celery("beat-docs", set_as_current=False)
    app.conf.update(
        task_always_eager=True, broker_url="memory://", result_backend="cache+memory://",
        idem_store_url=fresh_pg_url,
    )  # fmt: skip
    exec(compile(_beat_snippet(), f"{PAGE}:purge", "exec"), {"app": app})
    app.loader.import_default_modules()  # what a worker (and beat) does with `imports`
    (entry,) = app.conf.beat_schedule.values()
    assert entry["schedule"] == 3600.0
    task = app.tasks[entry["task"]]
    assert task.apply(kwargs=entry["kwargs"]).get() == 3
    assert {key for (key,) in _sql(fresh_pg_url, "SELECT key FROM celery_idem_records")} == {live}
    assert task.apply(kwargs=entry["kwargs"]).get() == 0

    redis_app = Celery("beat-redis", set_as_current=False)
    redis_app.conf.update(
        task_always_eager=True, idem_store_url=f"redis://127.0.0.1:{free_port()}/0"
    )
    assert redis_app.tasks[entry["task"]].apply().get() == 0  # Redis expires its own


# --------------------------------------------------------------------------- doctor


def test_doctor_passes_a_healthy_database(cli: PgCli) -> None:
    report = cli.json("doctor")
    found = _findings(report)
    assert list(found) == [
        "reachable", "schema", "functions", "indexes", "privileges", "writable",
        "idle_tx_timeout", "durability", "clock",
    ]  # fmt: skip
    for check in ("reachable", "schema", "functions", "indexes", "privileges", "writable"):
        assert found[check][0] == "ok", (check, found[check])
    assert found["clock"][0] == "ok"
    assert "schema version 1" in found["schema"][1]
    assert "celery_idem_records_pkey" in found["indexes"][1]
    assert "celery_idem_records_expires_at" in found["indexes"][1]
    # The suite's server runs with fsync off (fast, throwaway): doctor says so.
    assert found["durability"][0] == "warn"
    assert "fsync is off" in found["durability"][1]
    assert report["failures"] == 0
    assert report["ok"] is True

    table = cli.run("doctor")
    assert table.exit_code == 0
    assert re.search(
        r"^ok\s+schema\s+celery_idem_records and celery_idem_schema", table.stdout, re.M
    )
    assert cli.run("doctor", "--strict").exit_code == 1  # a warning, with --strict


def test_doctor_fails_a_database_without_the_schema(cli: PgCli, fresh_pg_url: str) -> None:
    db = _on(cli, fresh_pg_url)
    report = db.json("doctor", code=1)
    found = _findings(report)
    status, text = found["schema"]
    assert status == "fail"
    assert "no table celery_idem_records or celery_idem_schema" in text
    assert "idem migrate" in text
    assert "manage.py migrate celery_idem" in text
    assert "indexes" not in found  # nothing to look at without the table
    assert found["reachable"][0] == "ok"

    migrate(fresh_pg_url)
    _sql(fresh_pg_url, "UPDATE celery_idem_schema SET version = 0")
    _sql(fresh_pg_url, "DROP INDEX celery_idem_records_expires_at")
    found = _findings(db.json("doctor", code=1))
    assert found["schema"][0] == "fail"
    assert "schema version 0, this celery-idem needs 1" in found["schema"][1]
    assert found["indexes"][0] == "warn"
    assert "no index on expires_at (celery_idem_records_expires_at)" in found["indexes"][1]

    migrate(fresh_pg_url)  # puts both back
    found = _findings(db.json("doctor"))
    assert (found["schema"][0], found["indexes"][0]) == ("ok", "ok")


def test_doctor_warns_until_idle_in_transaction_session_timeout_is_set(
    cli: PgCli, fresh_pg_url: str
) -> None:
    db = _on(cli, fresh_pg_url)
    migrate(fresh_pg_url)
    status, text = _findings(db.json("doctor"))["idle_tx_timeout"]
    assert status == "warn"
    assert "idle_in_transaction_session_timeout is 0" in text
    assert "keeps its transaction open" in text
    database = fresh_pg_url.rsplit("/", 1)[1]
    assert "SET idle_in_transaction_session_timeout = '60s'" in text
    # A database default applies to the sessions opened after it: doctor opens its own.
    _sql(
        fresh_pg_url, f'ALTER DATABASE "{database}" SET idle_in_transaction_session_timeout = 30000'
    )
    status, text = _findings(db.json("doctor"))["idle_tx_timeout"]
    assert status == "ok", text
    assert "idle_in_transaction_session_timeout = 30.0s" in text


def test_doctor_reports_an_unreachable_database_with_a_fix(cli: PgCli) -> None:
    db = _on(cli, f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere")
    report = db.json("doctor", code=1)
    assert [(f["check"], f["status"]) for f in report["findings"]] == [("reachable", "fail")]
    assert "pg_hba.conf" in report["findings"][0]["fix"]
    listing = db.run("list")
    assert listing.exit_code == 1
    assert "Error:" in listing.stderr
