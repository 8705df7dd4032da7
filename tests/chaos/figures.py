"""The figures of a chaos run: the Report, answer latency around faults, and its Markdown.

Kept apart from ``checker.py`` so that the checks read on their own: nothing in this
module judges a guarantee, it only counts, measures and formats. ``checker`` imports
from here (never the reverse at run time), and re-exports ``Report`` and
``render_markdown`` so callers need one import.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .checker import Answer, Call, Effect, Fault
    from .db_checks import DatabaseFigures

#: How many explained extra effects the Markdown lists before it only counts the rest.
LISTED_EXPLAINED = 20


# --------------------------------------------------------------------------- text


def at(t: float | None, t0: float) -> str:
    """A time as seconds since the run's first call: epoch seconds are unreadable in a report."""
    return "never" if t is None else f"{t - t0:+.3f}s"


def value_text(value: Any, limit: int = 120) -> str:
    """A stored value as JSON, cut short: a description names a value, it does not dump it."""
    text = json.dumps(value, sort_keys=True, default=repr)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def answer_text(answer: Answer | None, t0: float) -> str:
    """What the publisher got for one call, in words."""
    if answer is None:
        return "no answer record at all"
    if answer.state is None:
        return "no answer before the drain deadline"
    if answer.state == "SUCCESS":
        return f"SUCCESS {value_text(answer.value)} stored at {at(answer.done, t0)}"
    if answer.state == "FAILURE":
        return f"FAILURE {answer.error!r} stored at {at(answer.done, t0)}"
    return f"state {answer.state!r} stored at {at(answer.done, t0)}"


def call_text(call: Call, answer: Answer | None, t0: float) -> str:
    """One publisher call and its answer: enough to find it in the publisher's log."""
    return (
        f"call {call.call} ({call.kind} {call.task}, task id {call.task_id}, "
        f"args {call.args_tag}, expects {call.expect}, sent at {at(call.sent, t0)}): "
        f"{answer_text(answer, t0)}"
    )


def effect_text(effect: Effect, t0: float) -> str:
    """One ledger line: which run wrote it, under which claim (fence), from which process."""
    step = "" if effect.step is None else f" step {effect.step}"
    return (
        f"effect of {effect.task}{step} (task id {effect.task_id}, attempt {effect.attempt}, "
        f"fence {effect.fence}, args {effect.args_tag}, pid {effect.pid}) at {at(effect.t, t0)}"
    )


def fault_text(fault: Fault, t0: float) -> str:
    """One nemesis action: its kind, whom it hit and when."""
    pids = f" pids {list(fault.pids)}" if fault.pids else ""
    if fault.end == fault.start:
        span = f"at {at(fault.start, t0)}"
    else:
        span = f"from {at(fault.start, t0)} to {at(fault.end, t0)}"
    detail = f" ({fault.detail})" if fault.detail else ""
    return f"{fault.kind}{pids} {span}{detail}"


# --------------------------------------------------------------------------- latency


def percentile(values: Sequence[float], p: float) -> float | None:
    """The nearest-rank percentile (a value that was measured, never an interpolation).

    ``None`` for no samples: an empty class of calls has no latency, not a latency of 0.
    """
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def latency_split(
    calls: Iterable[Call],
    answers: Mapping[int, Answer],
    faults: Iterable[Fault],
    grace: float,
) -> tuple[list[float], list[float]]:
    """Answer latencies (done - sent) of calls that overlapped a fault window, and the rest.

    A fault window is ``[start, end + grace]``: a fault keeps slowing answers for about a
    lease after it ends (a lost lease frees its key only then), so the tail it causes is
    counted with it and does not pollute the fault-free figures. Calls without an answer
    or without a ``done`` time have no latency and are in neither list.
    """
    windows = [(fault.start, fault.end + grace) for fault in faults]
    hit: list[float] = []
    clear: list[float] = []
    for call in calls:
        answer = answers.get(call.call)
        if answer is None or answer.state is None or answer.done is None:
            continue
        overlaps = any(start <= answer.done and call.sent <= end for start, end in windows)
        (hit if overlaps else clear).append(answer.done - call.sent)
    return hit, clear


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Anomaly:
    """One violated guarantee: which check, which key, when, and everything involved.

    ``t`` is when it showed (the call's send, the effect's write): anomalies are reported
    in time order, because the first one is usually the cause of the rest.
    """

    check: int
    name: str
    key: str
    t: float
    description: str

    def __str__(self) -> str:
        return f"check {self.check} ({self.name}), key {self.key!r}: {self.description}"


@dataclass(frozen=True)
class Report:
    """Every figure of one run, the explained extra effects, and the anomalies.

    ``start`` is the epoch of the first call: every ``+s`` time in a description or in
    the Markdown is relative to it. ``faults`` counts injected faults by kind.
    ``disagreeing_keys`` counts keys whose SUCCESS values differ at all,
    ``disagreeing_unexplained`` those with more values than explained re-runs allow
    (check 2's anomalies). ``explained_extra`` pairs each extra effect with the fault
    that explains it; ``stale_writes`` each effect written under a lower fence after a
    takeover with the pause or store fault that made its run stale. Percentiles are in
    seconds, ``None`` when no answer fell in that class.
    """

    start: float | None
    duration: float | None
    calls: int
    keys: int
    duplicates: int
    faults: Counter[str]
    answers: int
    lost: int
    lost_by_broker: list[tuple[Call, Fault]]
    wrong: int
    disagreeing_keys: int
    disagreeing_unexplained: int
    effects: int
    extra_explained: int
    extra_unexplained: int
    stale_writes_explained: int
    p50_with_faults: float | None
    p99_with_faults: float | None
    p50_without_faults: float | None
    p99_without_faults: float | None
    answers_with_faults: int
    answers_without_faults: int
    explained_extra: list[tuple[Effect, Fault]]
    stale_writes: list[tuple[Effect, Fault]]
    anomalies: list[Anomaly]
    database: DatabaseFigures | None = None
    """Check 7's figures (the PostgreSQL store's runs); None without a database effect."""

    @property
    def ok(self) -> bool:
        """Whether every guarantee held: derived, so it can never disagree with the list."""
        return not self.anomalies

    @property
    def first_anomaly(self) -> str | None:
        """The earliest anomaly in full (anomalies are in time order), or ``None``."""
        return str(self.anomalies[0]) if self.anomalies else None


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f} s"


def _database_rows(figures: DatabaseFigures | None) -> list[tuple[str, str]]:
    """Check 7's rows of the figures table (none without a database effect)."""
    if figures is None:
        return []
    return [
        ("database rows committed (one per key and step expected)", str(figures.rows)),
        ("keys and steps with a committed row", str(figures.units)),
        ("duplicate database effects (committed rows beyond one per key and step)",
         str(figures.duplicate_effects)),
        ("SUCCESS answers checked against the committed rows", str(figures.answers_checked)),
        ("... that do not name their key's committed row", str(figures.answers_not_naming)),
        ("rows committed with a refused call's arguments", str(figures.refused_rows)),
        ("calls answered LeaseLost (a stale attempt, its transaction rolled back)",
         str(figures.lease_lost)),
        ("... for a key no attempt committed a row for", str(figures.lease_lost_unexplained)),
    ]  # fmt: skip


def render_markdown(report: Report, *, seed: int | str, title: str) -> str:
    """A Markdown section for docs/reliability.md: figures, faults, explanations, verdict.

    Written so a reader can check the verdict without the raw files: each explained extra
    effect names the fault that explains it, and a failed run shows its first anomaly in
    full (the first one in time is usually the cause of the others).
    """
    t0 = report.start if report.start is not None else 0.0
    verdict = "OK: every check held" if report.ok else f"FAILED: {len(report.anomalies)} anomalies"
    by_check = Counter(f"{a.check} ({a.name})" for a in report.anomalies)
    rows = [
        ("verdict", verdict),
        ("duration", _seconds(report.duration)),
        ("calls", str(report.calls)),
        ("keys", str(report.keys)),
        ("duplicate calls", str(report.duplicates)),
        ("faults", str(sum(report.faults.values()))),
        ("answers", str(report.answers)),
        ("lost calls", str(report.lost)),
        (
            "calls the Redis broker lost before any delivery (a whole worker killed as it "
            "popped them: kombu's pop-then-record window, not celery-idem's)",
            str(len(report.lost_by_broker)),
        ),
        ("wrong answers", str(report.wrong)),
        ("keys whose answers differ", str(report.disagreeing_keys)),
        ("... more than the key's explained re-runs allow", str(report.disagreeing_unexplained)),
        ("effects (body runs)", str(report.effects)),
        ("extra effects explained by a fault", str(report.extra_explained)),
        ("extra effects unexplained", str(report.extra_unexplained)),
        ("stale writes (lower fence) explained by a fault", str(report.stale_writes_explained)),
        (
            f"answer latency with faults, p50 / p99 ({report.answers_with_faults} answers)",
            f"{_seconds(report.p50_with_faults)} / {_seconds(report.p99_with_faults)}",
        ),
        (
            f"answer latency without faults, p50 / p99 ({report.answers_without_faults} answers)",
            f"{_seconds(report.p50_without_faults)} / {_seconds(report.p99_without_faults)}",
        ),
        *_database_rows(report.database),
        (
            "anomalies by check",
            ", ".join(f"{k}: {n}" for k, n in sorted(by_check.items())) or "none",
        ),
    ]
    lines = [f"## {title}", "", f"Seed `{seed}`. Times are seconds since the first call.", ""]
    if report.database is not None:
        lines += [f"**duplicate database effects: {report.database.duplicate_effects}**", ""]
    lines += ["| figure | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]
    lines += ["", "### Faults by kind", ""]
    if report.faults:
        lines += ["| fault | count |", "|---|---|"]
        lines += [f"| {kind} | {n} |" for kind, n in sorted(report.faults.items())]
    else:
        lines.append("No fault was injected.")
    lines += ["", "### Extra effects explained by a fault", ""]
    explained = report.explained_extra + report.stale_writes
    if explained:
        for effect, fault in explained[:LISTED_EXPLAINED]:
            lines.append(
                f"- key `{effect.key}`: {effect_text(effect, t0)}; explained by "
                f"{fault_text(fault, t0)}"
            )
        if len(explained) > LISTED_EXPLAINED:
            lines.append(f"- ... and {len(explained) - LISTED_EXPLAINED} more")
    else:
        lines.append("None: every body ran once.")
    if report.lost_by_broker:
        lines += ["", "### Calls the broker lost before any delivery", ""]
        for call, fault in report.lost_by_broker[:LISTED_EXPLAINED]:
            lines.append(
                f"- {call_text(call, None, t0)}: no task received its last message (the call, "
                f"or the retry it sent); {fault_text(fault, t0)}"
            )
        if len(report.lost_by_broker) > LISTED_EXPLAINED:
            lines.append(f"- ... and {len(report.lost_by_broker) - LISTED_EXPLAINED} more")
    lines += ["", "### First anomaly", ""]
    if report.first_anomaly is None:
        lines.append("None.")
    else:
        lines += ["```text", report.first_anomaly, "```"]
    return "\n".join(lines) + "\n"
