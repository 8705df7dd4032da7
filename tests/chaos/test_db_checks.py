"""Check 7 of the chaos checker (duplicate database effects, the PostgreSQL store's runs)
on synthetic histories, and how a run's saved rows reach it. Pure and fast: no server.

Kept apart from ``test_checker.py`` for size; its builders are shared.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from tests.chaos import run as chaos_run
from tests.chaos.checker import HistoryError, Report, Row, render_markdown
from tests.chaos.test_checker import T, call, checks_failed, eff, failed, fault, judge, ok


def row(n: int, key: str, t: float = 0.5, *, step: str | None = None, tag: str = "a",
        task_id: str = "id-1", fence: int = 1, pid: int = 100) -> Row:  # fmt: skip
    return Row.from_json({
        "id": n, "key": key, "step": step, "task_id": task_id, "fence": fence, "attempt": 0,
        "args_tag": tag, "pid": pid, "t": T + t,
    })  # fmt: skip


def answer(key: str, n: int, fence: int = 1) -> dict[str, Any]:
    """What chaos.op answers with PostgreSQL: its key, tag, fence and committed row."""
    return {"key": key, "tag": "a", "fence": fence, "row": n}


def db_failures(report: Report) -> list[str]:
    return [name for check, name in checks_failed(report) if check == 7]


def test_a_clean_history_has_no_duplicate_database_effect() -> None:
    calls = [
        call(1, "u"), call(2, "u", kind="dup", sent=0.1),
        call(3, "c", kind="chain", sent=0.2), call(4, "g", kind="group", sent=0.3),
        call(5, "u", kind="mismatch", tag="m5", sent=2.0, expect="mismatch"),
        call(6, "s", sent=0.4), call(7, "s", kind="dup", sent=0.5),
    ]  # fmt: skip
    path = [["s1", 3, 3], ["s2", 4, 4], ["s3", 5, 5]]
    answers = [
        ok(1, answer("u", 1)), ok(2, answer("u", 1)),
        ok(3, {"key": "c", "tag": "a", "path": path}),
        ok(4, [answer("g.0", 6), answer("g.1", 7)]),
        failed(5, "IdempotencyKeyMismatch: other arguments"),
        # A stale attempt of s, paused past its lease: its transaction rolled back.
        failed(6, "celery_idem.exceptions.LeaseLost: lost its lease"), ok(7, answer("s", 8, 9)),
    ]  # fmt: skip
    effects = [
        eff("u", "id-1", 1, 0.5), eff("c", "x1", 3, 0.6, step="s1"),
        eff("c", "x2", 4, 0.7, step="s2"), eff("c", "x3", 5, 0.8, step="s3"),
        eff("g.0", "m0", 6, 0.6), eff("g.1", "m1", 7, 0.6),
        eff("s", "id-6", 8, 0.5, pid=300), eff("s", "id-7", 9, 4.0, pid=200),
    ]  # fmt: skip
    rows = [
        row(1, "u"), row(3, "c", step="s1"), row(4, "c", step="s2"), row(5, "c", step="s3"),
        row(6, "g.0"), row(7, "g.1"), row(8, "s", 4.1, task_id="id-7", fence=9),
    ]  # fmt: skip
    stop = fault("stop_child", 1.0, 6.0, pids=(300,))
    report = judge(calls, answers, effects, [stop], rows=rows)
    assert report.ok, report.first_anomaly
    database = report.database
    assert database is not None
    assert (database.rows, database.units, database.duplicate_effects) == (7, 7, 0)
    assert (database.answers_checked, database.answers_not_naming) == (5, 0)
    assert (database.lease_lost, database.lease_lost_unexplained, database.refused_rows) == (
        1, 0, 0,
    )  # fmt: skip
    text = render_markdown(report, seed=1, title="Chaos soak, PostgreSQL store")
    assert "**duplicate database effects: 0**" in text
    assert "| duplicate database effects (committed rows beyond one per key and step) | 0 |" in (
        text
    )


def test_without_rows_there_is_no_check_7_and_lease_lost_is_not_documented() -> None:
    calls = [call(1, "k"), call(2, "k", sent=0.1)]
    answers = [failed(1, "LeaseLost: lost its lease"), ok(2, answer("k", 1))]
    report = judge(calls, answers, [eff("k", "id-1", 1, 0.5)])
    assert report.database is None
    assert checks_failed(report) == [(1, "wrong answer")]
    assert "duplicate database effects" not in render_markdown(report, seed=1, title="t")


def test_two_committed_rows_for_one_key_are_an_anomaly_whatever_the_faults() -> None:
    # The ledger's second run is explained (the first run's child was killed), the
    # second committed row never is: the transactional completion forbids it.
    calls = [call(1, "k"), call(2, "k", kind="dup", sent=0.5)]
    effects = [eff("k", "id-1", 10, 1.0, pid=100), eff("k", "id-2", 20, 5.0, pid=200)]
    rows = [row(1, "k", 1.1, fence=10), row(2, "k", 5.1, task_id="id-2", fence=20, pid=200)]
    kill = fault("kill_child", 2.0, pids=(100,))
    answers = [ok(1, answer("k", 1, 10)), ok(2, answer("k", 2, 20))]
    report = judge(calls, answers, effects, [kill], rows=rows)
    assert report.extra_unexplained == 0  # checks 1 to 6 are content: a fault explains it
    assert db_failures(report) == ["duplicate database effect"]
    assert report.database is not None
    assert report.database.duplicate_effects == 1
    anomaly = next(a for a in report.anomalies if a.check == 7)
    assert anomaly.key == "k"
    assert "2 committed rows for 'k'" in anomaly.description
    assert "row 1 of 'k'" in anomaly.description
    assert "row 2 of 'k'" in anomaly.description
    text = render_markdown(report, seed=1, title="t")
    assert "**duplicate database effects: 1**" in text
    assert "7 (duplicate database effect): 1" in text


def test_a_chain_step_with_two_rows_is_a_duplicate_but_steps_are_apart() -> None:
    calls = [call(1, "c", kind="chain")]
    path = [["s1", 1, 1], ["s2", 2, 2]]
    rows = [row(1, "c", step="s1"), row(2, "c", step="s2"), row(3, "c", 0.9, step="s2")]
    report = judge(calls, [ok(1, {"key": "c", "path": path})], [], rows=rows)
    assert db_failures(report) == ["duplicate database effect"]
    assert "'c' step s2" in report.anomalies[0].description


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (answer("k", 9), "names row 9 of 'k', whose committed rows are [1]"),
        ({"key": "k", "tag": "a", "fence": 1}, "names no row of 'k', whose committed rows are [1]"),
        ([answer("k", 1), answer("other", 5)], "names row 5 of 'other', another key's"),
    ],
    ids=["rolled-back-row", "no-row", "another-key"],
)
def test_an_answer_must_name_its_keys_committed_row(value: Any, why: str) -> None:
    calls = [call(1, "k"), call(2, "k", kind="dup", sent=0.1), call(3, "other", sent=0.2)]
    answers = [ok(1, answer("k", 1)), ok(2, value), ok(3, answer("other", 5))]
    rows = [row(1, "k"), row(5, "other")]
    report = judge(calls, answers, [eff("k", "id-1", 1, 0.5)], rows=rows)
    assert "answer names another row" in db_failures(report)
    anomaly = next(a for a in report.anomalies if a.name == "answer names another row")
    assert anomaly.key == "k"
    assert "call 2 " in anomaly.description
    assert why in anomaly.description
    assert report.database is not None
    assert report.database.answers_not_naming == 1


def test_an_answer_naming_a_row_never_committed_is_an_anomaly() -> None:
    # The key's only run rolled back (no row), yet its call answered a row: the answer
    # came from a transaction that did not commit.
    report = judge([call(1, "k")], [ok(1, answer("k", 4))], [eff("k", "id-1", 1, 0.5)], rows=[])
    assert db_failures(report) == ["answer names another row"]
    assert "names row 4 of 'k', which has no committed row" in report.anomalies[0].description


def test_a_chain_answer_naming_another_steps_row_is_an_anomaly() -> None:
    calls = [call(1, "c", kind="chain")]
    rows = [row(1, "c", step="s1"), row(2, "c", step="s2")]
    path = [["s1", 1, 1], ["s2", 2, 3]]
    report = judge(calls, [ok(1, {"key": "c", "path": path})], [], rows=rows)
    assert db_failures(report) == ["answer names another row"]
    assert "names row 3 of 'c' step s2, whose committed rows are [2]" in str(report.anomalies[0])


def test_a_row_with_a_refused_calls_arguments_is_an_anomaly() -> None:
    calls = [call(1, "k"), call(2, "k", tag="m2", sent=1.0, expect="mismatch")]
    answers = [ok(1, answer("k", 1)), failed(2, "IdempotencyKeyMismatch: m")]
    rows = [row(1, "k"), row(2, "k", 1.2, tag="m2", task_id="id-2")]
    report = judge(calls, answers, [eff("k", "id-1", 1, 0.5)], rows=rows)
    assert db_failures(report) == ["row of a refused call"]
    assert report.database is not None
    assert (report.database.refused_rows, report.database.duplicate_effects) == (1, 0)


def test_lease_lost_needs_a_row_committed_by_another_attempt() -> None:
    calls = [call(1, "k")]
    report = judge(calls, [failed(1, "LeaseLost: lost its lease")], [], rows=[])
    assert db_failures(report) == ["lease lost, nothing committed"]
    assert report.database is not None
    assert report.database.lease_lost_unexplained == 1


def test_a_malformed_row_is_refused() -> None:
    with pytest.raises(HistoryError, match="row field 'fence'"):
        Row.from_json({"id": 1, "key": "k", "step": None, "task_id": "t", "fence": "1",
                       "attempt": 0, "args_tag": "a", "pid": 1, "t": 1.0})  # fmt: skip


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_a_saved_run_with_rows_is_judged_with_check_7(tmp_path: Path) -> None:
    history = [{"call": 1, "kind": "unique", "task": "chaos.op", "key": "k", "args_tag": "a",
                "task_id": "id-1", "sent": T, "expect": "value"}]  # fmt: skip
    write_jsonl(tmp_path / "history.jsonl", history)
    value = answer("k", 1)
    write_jsonl(tmp_path / "answers.jsonl", [{"call": 1, "state": "SUCCESS", "value": value,
                                              "error": None, "done": T + 1}])  # fmt: skip
    rows = [{"id": n, "key": "k", "step": None, "task_id": "id-1", "fence": 1, "attempt": 0,
             "args_tag": "a", "pid": 1, "t": T + 0.5} for n in (1, 2)]  # fmt: skip
    write_jsonl(tmp_path / "rows.jsonl", rows)
    report = chaos_run.judge(tmp_path)
    assert report.database is not None
    assert report.database.duplicate_effects == 1
    (tmp_path / "rows.jsonl").unlink()  # a Redis store's run: no rows, no check 7
    assert chaos_run.judge(tmp_path).database is None


def test_the_postgres_section_has_its_own_marker(tmp_path: Path) -> None:
    args = argparse.Namespace(store="postgres", broker="redis")
    assert chaos_run.section_id(args) == "postgres"
    assert chaos_run.section_title(args) == "Chaos soak, PostgreSQL store (Redis broker)"
    assert chaos_run.section_id(argparse.Namespace(store="redis", broker="rabbitmq")) == (
        "rabbitmq"
    )
    doc = tmp_path / "reliability.md"
    doc.write_text("# R\n\n<!-- chaos:begin redis -->\nredis\n<!-- chaos:end redis -->\n")
    chaos_run.write_section(doc, "## pg one", "postgres")
    chaos_run.write_section(doc, "## pg two", "postgres")
    text = doc.read_text()
    assert "<!-- chaos:begin redis -->\nredis\n<!-- chaos:end redis -->" in text
    assert text.count("<!-- chaos:begin postgres -->") == 1
    assert "## pg two" in text
    assert "## pg one" not in text
