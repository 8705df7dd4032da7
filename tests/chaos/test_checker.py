"""The chaos checker on synthetic histories: each check passes a clean run and fails its own
violation, and fault explanations hold exactly within their windows. Pure and fast."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.checker import (
    Answer,
    Call,
    Delivery,
    Effect,
    Fault,
    HistoryError,
    Report,
    check,
    load_jsonl,
    render_markdown,
)

T = 1_700_000_000.0  # an epoch: the checker must not care where time starts
LEASE = 2.0


def call(n: int, key: str, *, kind: str = "unique", tag: str = "a", sent: float = 0.0,
         expect: str = "value", task_id: str | None = None) -> Call:  # fmt: skip
    return Call.from_json({
        "call": n, "kind": kind, "task": "chaos.op", "key": key, "args_tag": tag,
        "task_id": task_id or f"id-{n}", "sent": T + sent, "expect": expect,
    })  # fmt: skip


def ok(n: int, value: Any = "v", done: float = 1.0) -> Answer:
    return Answer.from_json({"call": n, "state": "SUCCESS", "value": value, "done": T + done})


def failed(n: int, error: str, done: float = 1.0) -> Answer:
    return Answer(call=n, state="FAILURE", value=None, error=error, done=T + done)


def lost(n: int) -> Answer:
    return Answer.from_json({"call": n, "state": None})


def eff(key: str, task_id: str, fence: int, t: float, pid: int = 100, *, attempt: int = 0,
        step: str | None = None, tag: str = "a") -> Effect:  # fmt: skip
    return Effect.from_json({
        "key": key, "task": "chaos.op", "task_id": task_id, "fence": fence, "attempt": attempt,
        "step": step, "args_tag": tag, "pid": pid, "t": T + t,
    })  # fmt: skip


def fault(kind: str, start: float, end: float | None = None, pids: tuple[int, ...] = ()) -> Fault:
    record = {"kind": kind, "start": T + start, "pids": list(pids), "detail": "test"}
    return Fault.from_json(record if end is None else {**record, "end": T + end})


def judge(calls: list[Call], answers: list[Answer], effects: list[Effect],
          faults: Sequence[Fault] = (), **kwargs: Any) -> Report:  # fmt: skip
    return check(calls, answers, effects, faults, lease=LEASE, **kwargs)


def checks_failed(report: Report) -> list[tuple[int, str]]:
    return [(a.check, a.name) for a in report.anomalies]


def rerun(faults: list[Fault]) -> Report:
    """Key k ran twice: pid 100 at +1 s, then pid 200 at +5 s (another task id)."""
    calls = [call(1, "k"), call(2, "k", kind="dup", sent=0.5)]
    effects = [eff("k", "id-1", 10, 1.0, pid=100), eff("k", "id-2", 20, 5.0, pid=200)]
    return judge(calls, [ok(1, done=6.0), ok(2, done=6.0)], effects, faults)


# --------------------------------------------------------------------------- clean


def test_a_clean_history_with_every_kind_passes() -> None:
    calls = [
        call(1, "u"), call(2, "u", kind="dup", sent=0.1),
        call(3, "r", kind="retry", sent=0.2),
        call(4, "c", kind="chain", sent=0.3), call(5, "g", kind="group", sent=0.4),
        call(6, "u", kind="mismatch", tag="m6", sent=2.0, expect="mismatch"),
        call(7, "q", sent=0.5), call(8, "s", sent=0.6),
    ]  # fmt: skip
    answers = [
        ok(1, {"fence": 1}), ok(2, {"fence": 1.0}), ok(3), ok(4), ok(5),
        failed(6, "IdempotencyKeyMismatch: other arguments"),
        failed(7, "celery_idem.exceptions.KeyQuarantined: taken over 6 times"),
        failed(8, "StoreUnavailable: an allowed error type"),
    ]  # fmt: skip
    effects = [
        eff("u", "id-1", 1, 0.5),
        eff("r", "id-3", 5, 0.6), eff("r", "id-3", 6, 0.9, attempt=1),
        eff("c", "s1", 7, 0.7, step="s1"), eff("c", "s2", 8, 0.8, step="s2"),
        eff("g.0", "m0", 9, 0.7), eff("g.1", "m1", 10, 0.7),
    ]  # fmt: skip
    faults = [fault("script_flush", 0.2), fault("proxy_latency", 3.0, 4.0)]
    allowed = frozenset({"KeyQuarantined", "StoreUnavailable"})
    report = judge(calls, answers, effects, faults, allowed_errors=allowed)
    assert report.anomalies == []
    assert report.ok
    assert report.first_anomaly is None
    assert (report.calls, report.keys, report.duplicates) == (8, 6, 2)
    assert (report.answers, report.lost, report.wrong, report.effects) == (8, 0, 0, 7)
    assert report.extra_explained == report.extra_unexplained == report.disagreeing_keys == 0
    assert report.faults == {"script_flush": 1, "proxy_latency": 1}
    assert report.duration == pytest.approx(1.0)


# --------------------------------------------------------------------------- check 1, 6


def test_a_lost_call_is_an_anomaly_even_when_its_key_answered() -> None:
    report = judge([call(1, "k"), call(2, "k", sent=0.1), call(3, "k", sent=0.2)],
                   [ok(1), lost(2)], [eff("k", "id-1", 1, 0.5)])  # fmt: skip
    assert checks_failed(report) == [(1, "lost call"), (1, "lost call")]
    assert (report.lost, report.wrong, report.answers) == (2, 0, 1)
    assert "call 2 (unique chaos.op" in str(report.anomalies[0])
    assert "no answer before the drain deadline" in report.anomalies[0].description
    assert "no answer record at all" in report.anomalies[1].description


@pytest.mark.parametrize(
    ("expect", "answer", "allowed"),
    [
        ("mismatch", ok(1), None),
        ("value", failed(1, "ValueError: boom"), None),
        ("value", failed(1, "IdempotencyKeyMismatch: other arguments"), None),
        ("value", failed(1, "KeyQuarantined: taken over 6 times"), frozenset()),
        ("value", Answer(call=1, state="REVOKED", value=None, error=None, done=T + 1), None),
    ],
    ids=["mismatch-succeeded", "undocumented", "mismatch-on-own-args", "not-allowed", "state"],
)
def test_an_undocumented_answer_is_wrong(expect: str, answer: Answer, allowed: Any) -> None:
    kwargs = {} if allowed is None else {"allowed_errors": allowed}
    first = call(0, "k")
    report = judge([first, call(1, "k", tag="b", expect=expect)], [ok(0), answer], [], **kwargs)
    assert checks_failed(report) == [(1, "wrong answer")]
    assert (report.lost, report.wrong) == (0, 1)


def test_a_key_whose_every_call_is_lost_is_stuck() -> None:
    calls = [call(1, "k"), call(2, "k", sent=0.1), call(3, "other", sent=0.2)]
    report = judge(calls, [lost(1), ok(3)], [eff("k", "id-1", 1, 0.5)])
    assert checks_failed(report) == [(1, "lost call"), (6, "stuck key"), (1, "lost call")]
    stuck = next(a for a in report.anomalies if a.check == 6)
    assert stuck.key == "k"
    assert "every call of the key is lost" in stuck.description
    assert "1 effects of the key" in stuck.description
    # A mismatch's refusal shows the key's record exists, not that its own work answered.
    calls = [call(1, "k"), call(2, "k", tag="m", expect="mismatch", sent=0.1)]
    report = judge(calls, [failed(1, "ValueError: x"), failed(2, "IdempotencyKeyMismatch: m")], [])
    assert checks_failed(report) == [(1, "wrong answer"), (6, "stuck key")]
    assert "no call got an accepted answer" in report.anomalies[1].description


# --------------------------------------------------------------------------- check 2


def test_two_disagreeing_answers_are_an_anomaly() -> None:
    calls = [call(1, "k"), call(2, "k", sent=0.1), call(3, "k", sent=0.2)]
    answers = [ok(1, {"n": 1}), ok(2, {"n": 1.0}), ok(3, {"n": True})]  # JSON: true is not 1
    report = judge(calls, answers, [eff("k", "id-1", 1, 0.5)])
    assert checks_failed(report) == [(2, "disagreeing answers")]
    assert report.disagreeing_keys == 1
    assert "from calls [1, 2]" in report.anomalies[0].description
    assert "from calls [3]" in report.anomalies[0].description


def test_an_explained_rerun_may_answer_its_own_value_but_not_two() -> None:
    kill = fault("kill_child", 2.0, pids=(100,))
    calls = [call(1, "k"), call(2, "k", sent=0.5), call(3, "k", sent=0.6)]
    effects = [eff("k", "id-1", 10, 1.0, pid=100), eff("k", "id-2", 20, 5.0, pid=200)]
    two = judge(calls, [ok(1, 10), ok(2, 20), ok(3, 20)], effects, [kill])
    assert two.ok
    assert (two.disagreeing_keys, two.disagreeing_unexplained) == (1, 0)
    three = judge(calls, [ok(1, 10), ok(2, 20), ok(3, 30)], effects, [kill])
    assert checks_failed(three) == [(2, "disagreeing answers")]


def test_a_group_member_rerun_counts_for_the_group_key() -> None:
    # A group's members write their effects under K.0, K.1 ...; its answer is for K.
    calls = [call(1, "g", kind="group"), call(2, "g", kind="dup", sent=0.5)]
    effects = [eff("g.1", "m1", 10, 1.0, pid=100), eff("g.1", "m1", 20, 5.0, pid=200)]
    report = judge(calls, [ok(1, [1]), ok(2, [2])], effects, [fault("kill_child", 2, pids=(100,))])
    assert report.ok, report.first_anomaly
    unrelated = [eff("gx.1", "m1", 10, 1.0, pid=100), eff("gx.1", "m1", 20, 5.0, pid=200)]
    other = judge(calls, [ok(1, [1]), ok(2, [2])], unrelated, [fault("kill_child", 2, pids=(100,))])
    assert checks_failed(other) == [(2, "disagreeing answers")]


# --------------------------------------------------------------------------- check 3


def test_an_extra_effect_with_no_fault_is_unexplained() -> None:
    report = rerun([])
    assert checks_failed(report) == [(3, "unexplained extra effect")]
    assert report.extra_unexplained == 1
    text = report.anomalies[0].description
    assert "task id id-2, the key's first run was id-1" in text
    assert "pid 200) at +5.000s follows" in text


@pytest.mark.parametrize(
    "cause",
    [
        fault("kill_child", 2.0, pids=(100,)),
        fault("kill_worker", 4.9, pids=(90, 100, 101)),
        fault("stop_child", 1.5, 6.0, pids=(100,)),
        fault("kill_child", 0.98, pids=(100,)),  # logged just before it hit (slack)
        fault("proxy_blackhole", 2.0, 3.0),
        fault("store_restart", 0.1, 0.5),  # the effect is within one lease of its end
        fault("proxy_drop", 4.0),
    ],
    ids=["kill", "kill-worker", "stop", "slack", "blackhole", "restart", "drop"],
)
def test_an_extra_effect_is_explained_by_a_fault_in_its_window(cause: Fault) -> None:
    report = rerun([cause])
    assert report.ok, report.first_anomaly
    assert report.explained_extra == [(eff("k", "id-2", 20, 5.0, pid=200), cause)]
    assert (report.extra_explained, report.extra_unexplained) == (1, 0)


@pytest.mark.parametrize(
    "miss",
    [
        fault("kill_child", 0.5, pids=(100,)),  # before the first effect
        fault("kill_child", 2.0, pids=(101,)),  # another process
        fault("kill_child", 5.5, pids=(100,)),  # after the rerun
        fault("stop_child", 2.0, 6.0, pids=(300,)),
        fault("proxy_blackhole", -5.0, -2.5),  # over more than a lease before
        fault("script_flush", 2.0),  # loses nothing
    ],
    ids=["kill-before", "other-pid", "kill-after", "stop-other", "blackhole-long-before", "flush"],
)
def test_a_fault_outside_the_window_explains_nothing(miss: Fault) -> None:
    report = rerun([miss])
    assert checks_failed(report) == [(3, "unexplained extra effect")]
    assert report.explained_extra == []


def test_retry_attempts_of_one_task_id_are_runs_but_a_repeated_attempt_is_extra() -> None:
    calls = [call(1, "r", kind="retry"), call(2, "r", kind="dup", sent=0.1)]
    attempts = [eff("r", "id-1", 10, 1.0), eff("r", "id-1", 11, 2.0, attempt=1)]
    assert judge(calls, [ok(1), ok(2)], attempts).ok
    again = judge(calls, [ok(1), ok(2)], [*attempts, eff("r", "id-1", 12, 3.0, attempt=1)])
    assert checks_failed(again) == [(3, "unexplained extra effect")]
    assert "a second run of task id id-1 attempt 1" in again.anomalies[0].description
    other = judge(calls, [ok(1), ok(2)], [*attempts, eff("r", "id-2", 12, 3.0)])
    assert checks_failed(other) == [(3, "unexplained extra effect")]


def test_each_step_of_a_chain_runs_once() -> None:
    steps = [eff("c", "s1", 1, 1.0, step="s1"), eff("c", "s2", 2, 1.1, step="s2")]
    assert judge([call(1, "c", kind="chain")], [ok(1)], steps).ok
    twice = judge(
        [call(1, "c", kind="chain")], [ok(1)], [*steps, eff("c", "s2", 3, 1.2, step="s2")]
    )
    assert checks_failed(twice) == [(3, "unexplained extra effect")]


# --------------------------------------------------------------------------- check 4


def test_an_equal_fence_is_two_runs_under_one_claim_even_with_a_fault() -> None:
    effects = [eff("k", "id-1", 10, 1.0, pid=100), eff("k", "id-1", 10, 5.0, pid=200)]
    kill = fault("kill_child", 2.0, pids=(100,))
    report = judge([call(1, "k")], [ok(1)], effects, [kill])
    assert checks_failed(report) == [(4, "fence reused")]
    assert report.extra_explained == 1  # the rerun itself is explained; its claim is not


def test_a_stale_run_resumed_after_a_pause_is_explained() -> None:
    # pid 100 claimed (fence 10), was stopped at +0.5 s past its lease; pid 200 took over
    # (fence 20, effect at +3 s); pid 100 resumed at +4 s and finished its body at +4.2 s.
    calls = [call(1, "k"), call(2, "k", sent=0.1)]
    effects = [eff("k", "id-2", 20, 3.0, pid=200), eff("k", "id-1", 10, 4.2, pid=100)]
    stop = fault("stop_child", 0.5, 4.0, pids=(100,))
    report = judge(calls, [ok(1, 10), ok(2, 20)], effects, [stop])
    assert report.ok, report.first_anomaly
    assert report.stale_writes == [(effects[1], stop)]
    assert report.explained_extra == [(effects[1], stop)]
    # The resumed run may also write first: the taker's effect is then the extra one.
    first = [eff("k", "id-1", 10, 4.2, pid=100), eff("k", "id-2", 20, 4.5, pid=200)]
    report = judge(calls, [ok(1, 10), ok(2, 20)], first, [stop])
    assert report.explained_extra == [(first[1], stop)]
    assert report.ok, report.first_anomaly
    # Fences must exceed the highest one so far, not only the stale run's.
    below_top = eff("k", "id-3", 15, 5.0, pid=300)
    kill = fault("kill_child", 4.5, pids=(100,))  # explains the third run, not its fence
    report = judge(calls, [ok(1, 10), ok(2, 20)], [*effects, below_top], [stop, kill])
    assert checks_failed(report) == [(4, "fence went down")]
    assert "fence 15" in report.anomalies[0].description


@pytest.mark.parametrize(
    "cause",
    [
        fault("stop_child", 3.5, 4.0, pids=(100,)),  # began after the takeover's effect
        fault("stop_child", 0.2, 0.5, pids=(100,)),  # over a lease before the takeover
        fault("stop_child", 0.5, 5.0, pids=(100,)),  # still stopped when it "wrote"
        fault("stop_child", 0.5, 4.0, pids=(200,)),  # the taker's pid, not the stale one
        fault("kill_child", 3.5, pids=(200,)),  # explains a rerun, not a lower fence
    ],
    ids=["late", "long-before", "still-stopped", "other-pid", "kill"],
)
def test_a_lower_fence_is_an_anomaly_unless_a_pause_made_the_run_stale(cause: Fault) -> None:
    calls = [call(1, "k"), call(2, "k", sent=0.1)]
    effects = [eff("k", "id-2", 20, 3.0, pid=200), eff("k", "id-1", 10, 4.2, pid=100)]
    report = judge(calls, [ok(1), ok(2)], effects, [cause])
    assert (4, "fence went down") in checks_failed(report)
    assert report.stale_writes == []


# --------------------------------------------------------------------------- check 5


def test_a_mismatch_that_ran_a_body_is_an_anomaly() -> None:
    calls = [call(1, "x"), call(2, "x", kind="mismatch", tag="m2", sent=1.0, expect="mismatch")]
    answers = [ok(1), failed(2, "IdempotencyKeyMismatch: other arguments")]
    effects = [eff("x", "id-1", 1, 0.5), eff("x", "id-2", 2, 1.5, tag="m2")]
    report = judge(calls, answers, effects)
    assert checks_failed(report) == [(5, "mismatch ran")]
    assert "args m2" in report.anomalies[0].description
    assert report.extra_unexplained == 0  # reported once, by check 5


# --------------------------------------------------------------------------- figures


def test_anomalies_are_in_time_order() -> None:
    calls = [call(1, "a", sent=3.0), call(2, "b", sent=1.0)]
    report = judge(calls, [ok(1), lost(2)], [eff("a", "x", 1, 3.1), eff("a", "y", 1, 3.2)])
    assert [a.t - T for a in report.anomalies] == pytest.approx([1.0, 1.0, 3.2, 3.2])
    assert report.first_anomaly == str(report.anomalies[0])
    assert report.first_anomaly.startswith("check 1 (lost call), key 'b': call 2")


def test_latency_is_split_by_overlap_with_a_fault_window() -> None:
    # Fault window: [10, 11 + lease 2] = [10, 13].
    calls = [call(n, f"k{n}", sent=s) for n, s in [(1, 0), (2, 1), (3, 9), (4, 12.5), (5, 14)]]
    answers = [ok(1, done=0.5), ok(2, done=3), ok(3, done=10.5), ok(4, done=13.5), ok(5, done=16)]
    report = judge(calls, answers, [], [fault("proxy_blackhole", 10, 11)])
    assert report.answers_with_faults == report.answers_without_faults - 1 == 2
    assert (report.p50_with_faults, report.p99_with_faults) == pytest.approx((1.0, 1.5))
    assert (report.p50_without_faults, report.p99_without_faults) == pytest.approx((2.0, 2.0))
    quiet = judge(calls[:1], answers[:1], [])
    assert quiet.p50_with_faults is quiet.p99_with_faults is None
    assert quiet.p50_without_faults == pytest.approx(0.5)


def test_render_markdown_has_the_figures_faults_explanations_and_first_anomaly() -> None:
    report = rerun([fault("kill_child", 2.0, pids=(100,))])
    text = render_markdown(report, seed=42, title="Chaos soak")
    assert text.startswith("## Chaos soak\n")
    assert "Seed `42`" in text
    assert "| figure | value |" in text
    assert "| extra effects unexplained | 0 |" in text
    assert "| kill_child | 1 |" in text
    assert "explained by kill_child pids [100] at +2.000s" in text
    assert "### First anomaly\n\nNone." in text
    failed_run = render_markdown(rerun([]), seed=7, title="Chaos soak")
    assert "| verdict | FAILED: 1 anomalies |" in failed_run
    assert "```text\ncheck 3 (unexplained extra effect), key 'k': " in failed_run


def test_render_markdown_lists_twenty_explanations_then_counts() -> None:
    calls = [call(1, "k")]
    effects = [eff("k", f"id-{i}", i, float(i), pid=i) for i in range(1, 24)]
    faults = [fault("kill_child", i + 0.5, pids=(i,)) for i in range(1, 23)]
    text = render_markdown(judge(calls, [ok(1)], effects, faults), seed=1, title="t")
    assert text.count("; explained by kill_child") == 20
    assert "- ... and 2 more" in text


# --------------------------------------------------------------------------- inputs


def test_load_jsonl_reads_records_and_refuses_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "faults.jsonl"
    path.write_text(json.dumps({"kind": "proxy_drop", "start": 1.5}) + "\n\n")
    assert [Fault.from_json(r) for r in load_jsonl(path)] == [
        Fault(kind="proxy_drop", start=1.5, end=1.5, pids=(), detail="")
    ]
    path.write_text('{"kind": "proxy_drop", "start": 1.5}\n{"kind": "kill_')
    with pytest.raises(HistoryError, match=r"faults.jsonl:2: not JSON"):
        load_jsonl(path)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Call.from_json({"call": 1}), "missing field 'expect'"),
        (lambda: call(1, "k", expect="maybe"), "expect must be"),
        (lambda: eff("k", "i", True, 1.0), "field 'fence' must be an integer"),
        (lambda: fault("reboot", 1.0), "unknown fault kind 'reboot'"),
        (lambda: fault("stop_child", 2.0, 1.0), "ends before it starts"),
    ],
)
def test_malformed_records_are_refused(make: Any, message: str) -> None:
    with pytest.raises(HistoryError, match=message):
        make()


@pytest.mark.parametrize(
    ("calls", "answers", "message"),
    [
        ([call(1, "k"), call(1, "j")], [], "call numbers used twice"),
        ([call(1, "k")], [ok(1), ok(1)], "calls answered twice"),
        ([call(1, "k")], [ok(2)], "answers for calls never sent"),
        ([call(1, "k"), call(2, "k", expect="mismatch")], [], "reuses args_tag 'a'"),
    ],
)
def test_histories_the_checks_cannot_judge_are_refused(
    calls: list[Call], answers: list[Answer], message: str
) -> None:
    with pytest.raises(HistoryError, match=message):
        judge(calls, answers, [])


# --------------------------------------------------------------------------- by design


def test_a_run_that_fails_by_design_is_followed_by_any_task_ids_run() -> None:
    # A retry task's first attempt raised; its retry came late, the parked hold ran out
    # and a duplicate claimed the key: the duplicate's first attempt is the completing run.
    calls = [call(1, "r", kind="retry"), call(2, "r", kind="dup", sent=0.5)]
    first = Effect.from_json({
        "key": "r", "task": "chaos.retry_op", "task_id": "id-1", "fence": 10, "attempt": 0,
        "step": None, "args_tag": "a", "pid": 100, "t": T + 1.0, "fails": True,
    })  # fmt: skip
    dup = [
        Effect(**{**eff("r", "id-2", 20, 3.5, pid=200).__dict__, "fails": True}),
        eff("r", "id-2", 30, 3.7, pid=200, attempt=1),
    ]
    assert judge(calls, [ok(1, done=6.0), ok(2, done=6.0)], [first, *dup]).ok
    # The same history without the mark is a second run no fault explains.
    plain = eff("r", "id-1", 10, 1.0, pid=100)
    report = judge(calls, [ok(1, done=6.0), ok(2, done=6.0)], [plain, *dup])
    assert (3, "unexplained extra effect") in checks_failed(report)


def delivered(task_id: str, t: float) -> Delivery:
    return Delivery.from_json({"task_id": task_id, "t": T + t, "pid": 100})


def test_a_call_never_delivered_while_a_worker_was_killed_is_the_brokers_loss() -> None:
    calls = [call(1, "a"), call(2, "b", sent=1.0)]
    answers = [ok(1), lost(2)]
    effects = [eff("a", "id-1", 10, 0.5)]
    kill = fault("kill_worker", 1.05, 1.5, pids=(300, 301))
    report = judge(calls, answers, effects, [kill], deliveries=[delivered("id-1", 0.4)])
    assert report.ok
    assert [(c.call, f.kind) for c, f in report.lost_by_broker] == [(2, "kill_worker")]
    assert "before any delivery" in render_markdown(report, seed=1, title="t")


def test_a_retry_lost_by_the_broker_after_its_first_delivery_is_the_brokers_loss() -> None:
    # The first attempt ran (and sent its retry, same task id); the retry never arrived.
    calls = [call(1, "r", kind="retry")]
    first = Effect(**{**eff("r", "id-1", 10, 1.1).__dict__, "fails": True})
    kill = fault("kill_worker", 1.2, 1.6, pids=(300,))
    report = judge(calls, [lost(1)], [first], [kill], deliveries=[delivered("id-1", 1.0)])
    assert report.ok
    assert len(report.lost_by_broker) == 1


@pytest.mark.parametrize(
    ("kill_at", "was_delivered"), [(1.05, True), (20.0, False), (0.5, False)],
    ids=["delivered-after-the-kill", "kill-too-late", "kill-before-the-send"],
)  # fmt: skip
def test_a_lost_call_is_celery_idems_unless_the_broker_window_explains_it(
    kill_at: float, was_delivered: bool
) -> None:
    calls = [call(1, "a"), call(2, "b", sent=1.0)]
    effects = [eff("a", "id-1", 10, 0.5)]
    later = [delivered("id-2", kill_at + 0.6)] if was_delivered else []
    deliveries = [delivered("id-1", 0.4), *later]
    kill = fault("kill_worker", kill_at, kill_at + 0.5, pids=(300,))
    report = judge(calls, [ok(1), lost(2)], effects, [kill], deliveries=deliveries)
    assert checks_failed(report) == [(1, "lost call"), (6, "stuck key")]
    assert report.lost_by_broker == []
