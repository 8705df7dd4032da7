"""``doctor``'s judgement of PostgreSQL databases the suite does not set up for real.

:func:`judge_postgres` is pure; ``test_cli_postgres.py`` runs the command on real
databases (healthy, without the schema, an old version, a dropped index, the idle
timeout unset and set, unreachable). These cover the other findings: a standby, a
read-only default, missing privileges, lazy commits, a newer schema, bad indexes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from celery_idem.cli.postgres_judge import IndexFact, PostgresFacts, Schema, judge_postgres

SCHEMA = Schema(
    version=1,
    functions=frozenset({"celery_idem_claim", "celery_idem_purge"}),
    indexes={"celery_idem_records_expires_at": ("expires_at",)},
)
HEALTHY = PostgresFacts(
    url="postgresql://app@db/app",
    user="app",
    database="app",
    server_version="16.2",
    server_time=1000.0,
    local_time=1000.0,
    round_trip=0.002,
    tables=frozenset({"celery_idem_records", "celery_idem_schema"}),
    schema_version=1,
    indexes=(
        IndexFact("celery_idem_records_pkey", ("key",), True, True, True),
        IndexFact("celery_idem_records_expires_at", ("expires_at",), False, False, True),
    ),
    functions=SCHEMA.functions,
    privileges={"celery_idem_records: SELECT, INSERT, UPDATE, DELETE": True},
    settings={
        "idle_in_transaction_session_timeout": "60000ms",
        "fsync": "on",
        "synchronous_commit": "on",
        "default_transaction_read_only": "off",
    },
)


def by_check(**changes: Any) -> dict[str, tuple[str, str]]:
    facts = dataclasses.replace(HEALTHY, **changes)
    return {f.check: (f.status, f"{f.detail} | {f.fix}") for f in judge_postgres(facts, SCHEMA)}


def settings(**values: str) -> dict[str, str]:
    return {**HEALTHY.settings, **values}


def test_a_healthy_database_passes_every_check() -> None:
    found = by_check()
    assert {check: status for check, (status, _) in found.items()} == {
        "reachable": "ok",
        "schema": "ok",
        "functions": "ok",
        "indexes": "ok",
        "privileges": "ok",
        "writable": "ok",
        "idle_tx_timeout": "ok",
        "durability": "ok",
        "clock": "ok",
    }
    assert "= 1m 00s" in found["idle_tx_timeout"][1]


@pytest.mark.parametrize(
    ("changes", "check", "status", "text"),
    [
        ({"in_recovery": True}, "writable", "fail", "point idem_store_url at the primary"),
        (
            {"settings": settings(default_transaction_read_only="on")},
            "writable",
            "fail",
            "default_transaction_read_only = off",
        ),
        (
            {"privileges": {"celery_idem_records: SELECT, INSERT, UPDATE, DELETE": False}},
            "privileges",
            "fail",
            "GRANT SELECT, INSERT, UPDATE, DELETE ON celery_idem_records TO app",
        ),
        (
            {"settings": settings(synchronous_commit="off")},
            "durability",
            "warn",
            "synchronous_commit = on",
        ),
        ({"schema_version": 2}, "schema", "warn", "upgrade celery-idem on this machine"),
        ({"probe_error": "refused"}, "schema", "fail", "the store refuses the database: refused"),
        ({"functions": frozenset({"celery_idem_claim"})}, "functions", "fail", "celery_idem_purge"),
        ({"indexes": HEALTHY.indexes[1:]}, "indexes", "fail", "no primary key"),
        (
            {"indexes": (HEALTHY.indexes[0], dataclasses.replace(HEALTHY.indexes[1], valid=False))},
            "indexes",
            "warn",
            "REINDEX INDEX",
        ),
        ({"server_time": 1005.0}, "clock", "warn", "5.000 s ahead"),
        (
            {"settings": settings(idle_in_transaction_session_timeout="0ms")},
            "idle_tx_timeout",
            "warn",
            "ALTER ROLE app SET idle_in_transaction_session_timeout = '60s'",
        ),
    ],
)
def test_each_problem_gets_its_status_and_fix(
    changes: dict[str, Any], check: str, status: str, text: str
) -> None:
    got_status, got_text = by_check(**changes)[check]
    assert got_status == status, got_text
    assert text in got_text
