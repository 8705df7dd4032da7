"""Check 7 of the chaos checker: duplicate database effects (the PostgreSQL store).

With the records in PostgreSQL, a body's rows and its key's completion commit in one
transaction (``self.idem_atomic``), fenced by the attempt's token. So, under every fault
and with no exception, each (key, step) has at most one committed row in the chaos
table (``database.py``), and every answer of a key names that row. The body run itself
may happen again (the ledger's extra effects: a run killed inside its transaction), but
its row never commits twice. Anomalies, all check 7:

- *duplicate database effect*: a (key, step) with more than one committed row;
- *answer names another row*: a SUCCESS answer naming no row of a (key, step) of its key
  that has one, a row that is not that (key, step)'s committed row (rolled back, or
  never written), or a row of another key;
- *row of a refused call*: a row committed with the arguments of a mismatch call;
- *lease lost, nothing committed*: a call answered ``LeaseLost`` (a stale attempt whose
  transaction rolled back) for a key no other attempt committed a row for.

Like the ledger, the table is written by the bodies, never by the library: the checker
still never reads celery-idem's records.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .checks import error_type
from .figures import Anomaly, at, value_text

if TYPE_CHECKING:
    from .checker import Call
    from .checks import Run

__all__ = ["LEASE_LOST", "DatabaseFigures", "Row", "check_rows", "named_rows"]

LEASE_LOST = "LeaseLost"
"""What a stale attempt's ``idem_atomic()`` raises when its transaction rolls back: a
documented answer in the PostgreSQL configuration (docs/postgres.md)."""

Unit = tuple[str, "str | None"]


@dataclass(frozen=True)
class Row:
    """One committed row of the chaos table: a body's database effect."""

    id: int
    key: str
    step: str | None
    task_id: str
    fence: int
    attempt: int
    args_tag: str
    pid: int
    t: float

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Row:
        """Build from one rows line (``step`` may be null)."""
        from .checker import HistoryError  # noqa: PLC0415 - checker imports this module

        def typed(name: str, types: tuple[type, ...], optional: bool = False) -> Any:
            value = record.get(name)
            if value is None and optional:
                return None
            if isinstance(value, bool) or not isinstance(value, types):
                raise HistoryError(f"row field {name!r} is {value!r} in {value_text(record)}")
            return value

        return cls(
            id=typed("id", (int,)),
            key=typed("key", (str,)),
            step=typed("step", (str,), optional=True),
            task_id=typed("task_id", (str,)),
            fence=typed("fence", (int,)),
            attempt=typed("attempt", (int,)),
            args_tag=typed("args_tag", (str,)),
            pid=typed("pid", (int,)),
            t=float(typed("t", (int, float))),
        )

    def text(self, t0: float) -> str:
        """The row in words: which run committed it, under which claim."""
        step = "" if self.step is None else f" step {self.step}"
        return (
            f"row {self.id} of {self.key!r}{step} (task id {self.task_id}, attempt "
            f"{self.attempt}, fence {self.fence}, args {self.args_tag}, pid {self.pid}) "
            f"inserted at {at(self.t, t0)}"
        )


@dataclass(frozen=True)
class DatabaseFigures:
    """Check 7's figures, for the report.

    ``duplicate_effects`` is the headline: committed rows beyond one per (key, step).
    """

    rows: int
    units: int
    duplicate_effects: int
    answers_checked: int
    answers_not_naming: int
    refused_rows: int
    lease_lost: int
    lease_lost_unexplained: int


def named_rows(value: Any) -> dict[Unit, int]:
    """The rows an answer names: ``{"key", "row"}``, a chain's ``path`` of
    ``[step, fence, row]``, or a group's list of those."""
    found: dict[Unit, int] = {}
    if isinstance(value, list):
        for item in value:
            found.update(named_rows(item))
    elif isinstance(value, dict) and isinstance(value.get("key"), str):
        key = value["key"]
        if isinstance(value.get("row"), int):
            found[key, None] = value["row"]
        for entry in value.get("path") or []:
            if isinstance(entry, list) and len(entry) == 3 and isinstance(entry[2], int):
                found[key, str(entry[0])] = entry[2]
    return found


def _unit_text(unit: Unit) -> str:
    key, step = unit
    return f"{key!r}" + ("" if step is None else f" step {step}")


def _answer_anomalies(run: Run, call: Call, committed: dict[Unit, list[Row]]) -> list[str]:
    """What is wrong with the rows one SUCCESS answer names (empty: nothing)."""
    answer = run.answers[call.call]
    claims = named_rows(answer.value)
    units = {u for u in committed if call.key in run.owners(u[0])} | set(claims)
    problems: list[str] = []
    for unit in sorted(units, key=lambda u: (u[0], u[1] or "")):
        rows, claimed = committed.get(unit, []), claims.get(unit)
        ids = [r.id for r in rows]
        if call.key not in run.owners(unit[0]):
            problems.append(f"names row {claimed} of {_unit_text(unit)}, another key's")
        elif claimed is None:
            problems.append(f"names no row of {_unit_text(unit)}, whose committed rows are {ids}")
        elif not rows:
            problems.append(
                f"names row {claimed} of {_unit_text(unit)}, which has no committed row"
            )
        elif claimed not in ids:
            problems.append(
                f"names row {claimed} of {_unit_text(unit)}, whose committed rows are {ids}"
            )
    return problems


def check_rows(run: Run, rows: Iterable[Row]) -> tuple[list[Anomaly], DatabaseFigures]:
    """Check 7 over the committed rows and the answers (see the module docstring)."""
    anomalies: list[Anomaly] = []
    rows = sorted(rows, key=lambda r: r.id)
    committed: dict[Unit, list[Row]] = defaultdict(list)
    refused = 0
    for row in rows:
        call = run.mismatch.get((row.key, row.args_tag))
        if call is not None:
            refused += 1
            text = f"{row.text(run.t0)} carries the arguments of {run.call(call)}"
            anomalies.append(Anomaly(7, "row of a refused call", row.key, row.t, text))
        else:
            committed[row.key, row.step].append(row)
    duplicates = 0
    for unit, found in committed.items():
        if len(found) > 1:
            duplicates += len(found) - 1
            text = (
                f"{len(found)} committed rows for {_unit_text(unit)}, one expected whatever "
                f"the faults: " + "; ".join(r.text(run.t0) for r in found)
            )
            anomalies.append(Anomaly(7, "duplicate database effect", unit[0], found[1].t, text))
    checked = not_naming = lease_lost = unexplained = 0
    for call in run.calls:
        answer = run.answers.get(call.call)
        if answer is None or call.expect != "value":
            continue
        if answer.state == "FAILURE" and error_type(answer.error) == LEASE_LOST:
            lease_lost += 1
            if not any(call.key in run.owners(u[0]) for u in committed):
                unexplained += 1
                text = f"{run.call(call)}, and no attempt committed a row of the key"
                anomalies.append(Anomaly(7, "lease lost, nothing committed", call.key,
                                         call.sent, text))  # fmt: skip
            continue
        if answer.state != "SUCCESS":
            continue
        checked += 1
        problems = _answer_anomalies(run, call, committed)
        if problems:
            not_naming += 1
            text = f"{run.call(call)}: " + "; ".join(problems)
            anomalies.append(Anomaly(7, "answer names another row", call.key, call.sent, text))
    figures = DatabaseFigures(
        rows=len(rows), units=len(committed), duplicate_effects=duplicates,
        answers_checked=checked, answers_not_naming=not_naming, refused_rows=refused,
        lease_lost=lease_lost, lease_lost_unexplained=unexplained,
    )  # fmt: skip
    return anomalies, figures
