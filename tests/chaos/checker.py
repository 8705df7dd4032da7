"""The chaos checker: did celery-idem's guarantees hold in one soak run?

The judge sees only what an outside observer can trust: the publisher's calls and the
answers it got, the effect ledger (one line per body run, written by the body, never by
the library) and the nemesis's fault log. celery-idem's own records are what is under
test, so they are never read. The checks, numbered as in the report:

1. every call got an answer, and a documented one (lost and wrong are counted apart);
2. all SUCCESS answers of one key agree (JSON equality), or differ by no more values
   than the key had re-runs a fault explains (each run answers with its own value);
3. a body ran more than once per (key, step) only where a fault explains it;
4. the fences of a (key, step) only grow (a lower one only from a run a fault made stale);
5. a call refused as a key mismatch never ran a body;
6. no key is stuck: each has at least one accepted answer;
7. with the PostgreSQL store, no duplicate database effect: each (key, step) has at most
   one committed row in the chaos table, and every answer names it (``db_checks.py``).

Malformed inputs (a producer bug, not a library anomaly) raise ``HistoryError``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checks import (
    FAULT_KINDS,
    MISMATCH_ERROR,
    Run,
    check_agreement,
    check_answers,
    check_extra,
    check_fences,
    check_mismatch,
    check_stuck,
    error_type,
    json_equal,
)
from .db_checks import LEASE_LOST, DatabaseFigures, Row, check_rows
from .figures import Anomaly, Report, latency_split, percentile, render_markdown, value_text

__all__ = [
    "DEFAULT_ALLOWED_ERRORS",
    "DEFAULT_LEASE",
    "DEFAULT_SLACK",
    "MISMATCH_ERROR",
    "Anomaly",
    "Answer",
    "Call",
    "DatabaseFigures",
    "Delivery",
    "Effect",
    "Fault",
    "HistoryError",
    "Report",
    "Row",
    "check",
    "error_type",
    "json_equal",
    "load_jsonl",
    "render_markdown",
]

#: Errors a caller may see and the library documents (docs/failure-modes.md), besides the
#: mismatch refusal: a quarantined key is the documented end of a poison message.
DEFAULT_ALLOWED_ERRORS = frozenset({"KeyQuarantined"})
#: celery-idem's default ``idem_lease``. A lease lost in a store outage frees its key one
#: lease later, so by default a fault explains re-runs (and slows answers) for one lease
#: after it ends: pass the run's lease.
DEFAULT_LEASE = 60.0
#: The nemesis stamps a fault just before it acts: an effect written in between may carry
#: a time slightly after the fault's ``start`` although the fault hit after it.
DEFAULT_SLACK = 0.05


class HistoryError(ValueError):
    """The inputs contradict the data spec: a producer bug, not a library anomaly."""


# --------------------------------------------------------------------------- data


def _field(record: Mapping[str, Any], name: str, types: tuple[type, ...], what: str) -> Any:
    """A typed field, so a producer bug fails loudly here instead of skewing a verdict."""
    if name not in record:
        raise HistoryError(f"missing field {name!r} in {value_text(record)}")
    value = record[name]
    # bool is an int in Python but never a number or an id in these records.
    if isinstance(value, bool) or not isinstance(value, types):
        raise HistoryError(f"field {name!r} must be {what}, got {value!r} in {value_text(record)}")
    return value


def _optional(record: Mapping[str, Any], name: str, types: tuple[type, ...], what: str) -> Any:
    return None if record.get(name) is None else _field(record, name, types, what)


def _str(record: Mapping[str, Any], name: str) -> str:
    return str(_field(record, name, (str,), "a string"))


def _int(record: Mapping[str, Any], name: str) -> int:
    return int(_field(record, name, (int,), "an integer"))


def _float(record: Mapping[str, Any], name: str) -> float:
    return float(_field(record, name, (int, float), "a number"))


@dataclass(frozen=True)
class Call:
    """One publisher call: what was sent, under which logical key, and what it expects."""

    call: int
    kind: str
    task: str
    key: str
    args_tag: str
    task_id: str
    sent: float
    expect: str

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Call:
        """Build from one history line; ``expect`` must be ``value`` or ``mismatch``."""
        expect = _str(record, "expect")
        if expect not in ("value", "mismatch"):
            raise HistoryError(f"expect must be 'value' or 'mismatch', got {expect!r}")
        return cls(
            call=_int(record, "call"),
            kind=_str(record, "kind"),
            task=_str(record, "task"),
            key=_str(record, "key"),
            args_tag=_str(record, "args_tag"),
            task_id=_str(record, "task_id"),
            sent=_float(record, "sent"),
            expect=expect,
        )


@dataclass(frozen=True)
class Answer:
    """What the publisher got for one call; ``state`` None means nothing came in time."""

    call: int
    state: str | None
    value: Any
    error: str | None
    done: float | None

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Answer:
        """Build from one history line; ``value``, ``error`` and ``done`` may be absent."""
        state = _optional(record, "state", (str,), "a string or null")
        done = _optional(record, "done", (int, float), "a number or null")
        return cls(
            call=_int(record, "call"),
            state=state,
            value=record.get("value"),
            error=_optional(record, "error", (str,), "a string or null"),
            done=None if done is None else float(done),
        )


@dataclass(frozen=True)
class Effect:
    """One body run, as the body itself wrote it to the ledger."""

    key: str
    task: str
    task_id: str
    fence: int
    attempt: int
    step: str | None
    args_tag: str
    pid: int
    t: float
    fails: bool = False
    """The run raises by design (a retry task's first attempt): the key is not completed,
    so the next run of it, by any task id, is the one that completes it."""

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Effect:
        """Build from one ledger line; ``step`` may be absent (a task with one step)."""
        return cls(
            key=_str(record, "key"),
            task=_str(record, "task"),
            task_id=_str(record, "task_id"),
            fence=_int(record, "fence"),
            attempt=_int(record, "attempt"),
            step=_optional(record, "step", (str,), "a string or null"),
            args_tag=_str(record, "args_tag"),
            pid=_int(record, "pid"),
            t=_float(record, "t"),
            fails=bool(record.get("fails", False)),
        )


@dataclass(frozen=True)
class Delivery:
    """A message handed to a task in a worker process (Celery's ``task_prerun``)."""

    task_id: str
    t: float
    pid: int

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Delivery:
        """Build from one deliveries line."""
        return cls(task_id=_str(record, "task_id"), t=_float(record, "t"), pid=_int(record, "pid"))


@dataclass(frozen=True)
class Fault:
    """One nemesis action. ``pids`` is a tuple (not a list) so the record stays immutable."""

    kind: str
    start: float
    end: float
    pids: tuple[int, ...]
    detail: str

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Fault:
        """Build from one fault-log line; ``end`` defaults to ``start`` (an instant fault)."""
        kind = _str(record, "kind")
        if kind not in FAULT_KINDS:
            raise HistoryError(
                f"unknown fault kind {kind!r}: expected one of {sorted(FAULT_KINDS)}"
            )
        start = _float(record, "start")
        end = start if record.get("end") is None else _float(record, "end")
        pids = record.get("pids") or []
        if not isinstance(pids, list) or any(
            isinstance(p, bool) or not isinstance(p, int) for p in pids
        ):
            raise HistoryError(f"pids must be a list of integers in {value_text(record)}")
        if end < start:
            raise HistoryError(f"fault ends before it starts: {value_text(record)}")
        detail = _optional(record, "detail", (str,), "a string")
        return cls(kind=kind, start=start, end=end, pids=tuple(pids), detail=detail or "")


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read one JSON object per line, skipping blank lines.

    A malformed line raises (naming file and line) instead of being dropped: a torn ledger
    line is still evidence that a body ran, and losing it could hide an extra effect.
    """
    records: list[dict[str, Any]] = []
    with Path(path).open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise HistoryError(f"{path}:{number}: not JSON ({exc})") from exc
            if not isinstance(record, dict):
                raise HistoryError(f"{path}:{number}: not a JSON object")
            records.append(record)
    return records


# --------------------------------------------------------------------------- verdict


def _validate(calls: list[Call], answers: list[Answer]) -> None:
    """Refuse histories the checks cannot judge fairly: they would report producer bugs."""
    numbers = Counter(c.call for c in calls)
    if twice := sorted(n for n, k in numbers.items() if k > 1):
        raise HistoryError(f"call numbers used twice: {twice[:10]}")
    answered = Counter(a.call for a in answers)
    if twice := sorted(n for n, k in answered.items() if k > 1):
        raise HistoryError(f"calls answered twice: {twice[:10]}")
    if unknown := sorted(set(answered) - set(numbers)):
        raise HistoryError(f"answers for calls never sent: {unknown[:10]}")
    own = {(c.key, c.args_tag) for c in calls if c.expect == "value"}
    for c in calls:
        if c.expect == "mismatch" and (c.key, c.args_tag) in own:
            # Check 5 finds a mismatch's runs by its args_tag: it must be the mismatch's own.
            raise HistoryError(f"mismatch call {c.call} reuses args_tag {c.args_tag!r} of its key")


def check(
    calls: Iterable[Call],
    answers: Iterable[Answer],
    effects: Iterable[Effect],
    faults: Iterable[Fault],
    *,
    deliveries: Iterable[Delivery] = (),
    rows: Iterable[Row] | None = None,
    lease: float = DEFAULT_LEASE,
    grace: float | None = None,
    allowed_errors: frozenset[str] = DEFAULT_ALLOWED_ERRORS,
    slack: float = DEFAULT_SLACK,
) -> Report:
    """Judge one run from its history, ledger and fault log; every figure in the Report.

    ``grace`` (seconds, by default ``lease``: the run's ``idem_lease``) is how long after
    a fault ends it still explains a re-run and still counts as slowing answers.
    ``allowed_errors`` are the failure types an answer may carry besides a mismatch
    refusal. ``slack`` is the tolerance between a fault's logged start and its blow.
    ``rows``: the committed rows of the chaos table (the PostgreSQL store's runs), for
    check 7; there a stale attempt's ``LeaseLost`` is a documented answer too.
    """
    grace = lease if grace is None else grace
    if grace < 0 or slack < 0:
        raise ValueError("grace and slack are durations: they cannot be negative")
    calls, answers = list(calls), list(answers)
    _validate(calls, answers)
    if rows is not None:
        allowed_errors = allowed_errors | {LEASE_LOST}
    run = Run(
        calls, answers, effects, faults, grace=grace, slack=slack,
        allowed_errors=allowed_errors, deliveries=deliveries,
    )  # fmt: skip
    answer_anomalies, lost, wrong, by_broker = check_answers(run)
    extra_anomalies, explained = check_extra(run)
    fence_anomalies, stale = check_fences(run)
    reruns = [effect for effect, _ in explained + stale]
    disagreeing, differ = check_agreement(run, reruns)
    anomalies = [
        *answer_anomalies,
        *disagreeing,
        *extra_anomalies,
        *fence_anomalies,
        *check_mismatch(run),
        *check_stuck(run),
    ]
    database: DatabaseFigures | None = None
    if rows is not None:
        row_anomalies, database = check_rows(run, rows)
        anomalies += row_anomalies
    anomalies.sort(key=lambda a: (a.t, a.check, a.key))
    hit, clear = latency_split(run.calls, run.answers, run.faults, grace)
    done = [a.done for a in answers if a.state is not None and a.done is not None]
    return Report(
        start=run.start,
        duration=max(done) - run.start if done and run.start is not None else None,
        calls=len(calls),
        keys=len(run.by_key),
        duplicates=len(calls) - len(run.by_key),
        faults=Counter(f.kind for f in run.faults),
        answers=sum(a.state is not None for a in answers),
        lost=lost,
        lost_by_broker=by_broker,
        wrong=wrong,
        disagreeing_keys=differ,
        disagreeing_unexplained=len(disagreeing),
        effects=len(run.effects),
        extra_explained=len(explained),
        extra_unexplained=len(extra_anomalies),
        stale_writes_explained=len(stale),
        p50_with_faults=percentile(hit, 50),
        p99_with_faults=percentile(hit, 99),
        p50_without_faults=percentile(clear, 50),
        p99_without_faults=percentile(clear, 99),
        answers_with_faults=len(hit),
        answers_without_faults=len(clear),
        explained_extra=explained,
        stale_writes=stale,
        anomalies=anomalies,
        database=database,
    )
