"""``celery_idem.contrib.django``: ``manage.py migrate celery_idem`` creates the store's tables.

Django's ``call_command("migrate", "celery_idem")`` runs in a child process
(``tests/django_app/manage.py``, settings ``tests/django_app/settings.py``) on a new
database of the suite's PostgreSQL; the test process then uses a ``PostgresStore`` on
it, and migrating back (``migrate celery_idem zero``) drops the tables. The migration's
statements are the ones ``celery idem migrate`` runs: one source of DDL.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytest.importorskip("django", reason="Django is not installed")
psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed")

from celery_idem.store import ClaimRequest, CompleteRequest, RecordKind, Stored  # noqa: E402
from celery_idem.store.postgres import PostgresStore  # noqa: E402
from celery_idem.store.postgres_admin import (  # noqa: E402
    drop_statements,
    migrate,
    migration_statements,
)

ROOT = Path(__file__).resolve().parents[2]


def _django(url: str, *command: str) -> subprocess.CompletedProcess[str]:
    """``call_command`` of each ``--then``-separated group, in a Django child process."""
    env = {
        **os.environ,
        "IDEM_TEST_DATABASE_URL": url,
        "DJANGO_SETTINGS_MODULE": "tests.django_app.settings",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, "-m", "tests.django_app.manage", *command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, (command, done.stdout, done.stderr)
    return done


def _tables(url: str) -> dict[str, bool]:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT to_regclass('celery_idem_records') IS NOT NULL, "
            "to_regclass('celery_idem_schema') IS NOT NULL, "
            "(SELECT count(*) FROM pg_proc WHERE proname LIKE 'celery\\_idem\\_%%')"
        ).fetchone()
    assert row is not None
    return {"records": row[0], "schema": row[1], "functions": bool(row[2])}


def _round_trip(url: str) -> None:
    """A claim, a completion and a read through a PostgresStore on the database."""
    store = PostgresStore.from_url(url)
    try:
        store.probe(5)
        key = f"idem:django:{uuid.uuid4().hex}"
        out = store.claim(
            ClaimRequest(key, token="t", task_id="id-1", fingerprint="", lease=60, ttl=3600)
        )
        stored = Stored(RecordKind.RESULT, b'"ok"', "j")
        assert store.complete(
            CompleteRequest(key, token="t", fence=out.fence, task_id="id-1", stored=stored, ttl=60)
        )
        record = store.read(key)
        assert record is not None
        assert (record.state, record.stored) == ("C", stored)
    finally:
        store.close()


def test_the_migration_runs_the_statements_of_celery_idem_migrate() -> None:
    module = importlib.import_module("celery_idem.contrib.django.migrations.0001_initial")
    (operation,) = module.Migration.operations
    assert operation.sql == migration_statements()
    assert operation.reverse_sql == drop_statements()
    config = importlib.import_module("celery_idem.contrib.django.apps").CeleryIdemConfig
    assert (config.name, config.label) == ("celery_idem.contrib.django", "celery_idem")


def test_migrate_creates_the_tables_a_store_then_uses_and_zero_drops_them(
    fresh_pg_url: str,
) -> None:
    assert _tables(fresh_pg_url) == {"records": False, "schema": False, "functions": False}
    applied = _django(fresh_pg_url, "migrate", "celery_idem")
    assert "Applying celery_idem.0001_initial... OK" in applied.stdout
    assert _tables(fresh_pg_url) == {"records": True, "schema": True, "functions": True}
    _round_trip(fresh_pg_url)
    # The same statements: `celery idem migrate` after Django's finds the schema current.
    assert "already at version 1" in migrate(fresh_pg_url)

    reverted = _django(fresh_pg_url, "migrate", "celery_idem", "zero")
    assert "Unapplying celery_idem.0001_initial... OK" in reverted.stdout
    assert _tables(fresh_pg_url) == {"records": False, "schema": False, "functions": False}


def test_django_migrates_a_database_celery_idem_migrate_prepared(fresh_pg_url: str) -> None:
    migrate(fresh_pg_url)
    _round_trip(fresh_pg_url)
    done = _django(
        fresh_pg_url, "migrate", "celery_idem", "--then", "showmigrations", "celery_idem"
    )
    assert "[X] 0001_initial" in done.stdout
    _round_trip(fresh_pg_url)  # the records' table was kept, the functions refreshed


def test_nothing_but_the_django_app_imports_django() -> None:
    # kombu.utils.json imports django (its Promise type) when Django is installed: the
    # baseline. No module of ours may import more of it.
    code = (
        "import sys, celery, kombu.utils.json\n"
        "def django(): return {m for m in sys.modules if m.split('.')[0] == 'django'}\n"
        "before = django()\n"
        "import celery_idem, celery_idem.cli, celery_idem.contrib, celery_idem.contrib.purge\n"
        "import celery_idem.store.postgres, celery_idem.task\n"
        "print(sorted(django() - before))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout
