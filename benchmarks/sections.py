"""The page's tables for the issue #16 comparisons: floors on every setup, and per call.

Split from :mod:`benchmarks.page` (the prose around the main table) to keep both short.
Every verdict comes from :mod:`benchmarks.targets`, so the page and the targets table
cannot disagree.
"""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.contenders import BASELINE, FLOORS, LABELS
from benchmarks.targets import FLOOR_TARGET, PERCALL_TARGETS, floor_verdict

__all__ = ["floors_section", "percall_section", "table"]

VERDICT = {True: "met", False: "**not met**", None: "n/a"}


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _spread(values: list[float] | None, spec: str = ".2f", suffix: str = "x") -> str:
    if not values:
        return "n/a"
    med = statistics.median(values)
    return f"{med:{spec}}{suffix} [{min(values):{spec}}, {max(values):{spec}}]"


def _floor_rows(result: dict[str, Any], workload: str) -> list[list[str]]:
    rows = []
    for name, sc in result["scenarios"].items():
        if sc["workload"] != workload or "idem" not in sc["contenders"]:
            continue
        c = sc["contenders"]
        idem = c["idem"]
        setup = result["setups"].get(sc["setup"], {})
        _, met = floor_verdict(idem)
        rows.append(
            [
                f"({name})",
                setup.get("label", sc["setup"]),
                f"{c[BASELINE]['rate']:.0f}" if c.get(BASELINE, {}).get("rate") else "n/a",
                *(_spread(c[f]["ratios"][BASELINE]) if f in c else "n/a" for f in FLOORS),
                _spread(idem["ratios"][BASELINE]),
                *(_spread(idem["ratios"][f]) for f in FLOORS),
                str(len(idem["ratios"][BASELINE])),
                VERDICT[met],
            ]
        )
    return rows


def floors_section(result: dict[str, Any]) -> str:
    """Unique tasks and duplicates of completed keys against the floors, every setup."""
    header = [
        "scenario",
        "worker",
        "plain Celery tasks/s",
        *(f"{LABELS[f]} vs plain" for f in FLOORS),
        "celery-idem vs plain",
        *(f"celery-idem vs {LABELS[f]}" for f in FLOORS),
        "rounds",
        f"target: celery-idem >= {FLOOR_TARGET:.2f}x {LABELS[FLOORS[0]]}",
    ]
    parts = []
    for workload, title in (
        ("a", "Unique tasks (no-op body)"),
        ("e", "Duplicates of completed keys (no-op body)"),
    ):
        rows = _floor_rows(result, workload)
        if rows:
            parts.append(f"### {title}\n\n" + table(header, rows))
    if not parts:
        return ""
    return (
        "## Against the floors, on every worker setup\n\n"
        f"The floors are plain Celery whose no-op body also sends raw redis-py commands to a "
        f"redis-server of the same kind as celery-idem's store: *{LABELS[FLOORS[0]]}* (one "
        f"`SET NX` with a key per task: the floor of a one-command check) and "
        f"*{LABELS[FLOORS[-1]]}* (a `SET NX` before the body, a `SET` of the result after: "
        "the floor of any claim-then-complete design). Each cell is the median [min, max] "
        "over the rounds of the ratio of tasks/s taken within each round (same worker, "
        "same minute); the contenders take turns in an order that rotates every round. "
        "In (e) every key first ran once, untimed, so each timed celery-idem delivery is "
        "a duplicate of a completed key (one claim, the first result replayed, no body); "
        "plain Celery and the floors have nothing to deduplicate and run the body again.\n\n"
        + "\n\n".join(parts)
        + "\n\n"
    )


def percall_section(result: dict[str, Any]) -> str:
    """celery-idem and Powertools per call, and the store's calls beside a bare GET."""
    percall = result["meta"].get("percall")
    if percall is None:
        return ""
    if "error" in percall:
        return f"## Per call\n\nNot measured: {percall['error']}.\n\n"
    us, ratios = percall["us"], percall["ratios"]

    def row(label: str, key: str, ratio: str = "", target: str = "", status: str = "") -> list[str]:
        return [label, _spread(us[key], ".0f", " us"), ratio, target, status]

    rows = []
    for path in ("first", "duplicate"):
        values = ratios[path]
        limit = PERCALL_TARGETS[path]
        rows.append(
            row(
                f"celery-idem, {path} run",
                f"idem_{path}",
                _spread(values),
                f"<= {limit:.2f}x Powertools",
                VERDICT[statistics.median(values) <= limit],
            )
        )
        rows.append(row(f"Powertools `idempotent_function`, {path} run", f"powertools_{path}"))
    rows.append(row("plain task (the tracer alone), first run", "plain_first"))
    rows.append(row("bare `GET`, celery-idem's store client", "get", "1.00x of GET"))
    for key, label in (
        ("claim", "`RedisStore.claim`, a new key"),
        ("complete", "`RedisStore.complete`"),
        ("duplicate_claim", "`RedisStore.claim`, a completed key (a duplicate)"),
    ):
        rows.append(row(label, key, _spread(ratios[f"{key}_over_get"]) + " of GET"))
    v = percall["versions"]
    return (
        "## Per call: celery-idem against Powertools, and beside a bare GET\n\n"
        f"One process, one private redis-server, every call through Celery's tracer "
        f"(`build_tracer`, what a worker runs per message; `task_ignore_result`): "
        f"{percall['calls']} calls a batch, {percall['rounds']} rounds, the batches "
        "interleaved in an order that rotates every round (`benchmarks/percall.py`). "
        "Powertools is a plain task whose body calls a function decorated with "
        "`idempotent_function` on its Redis persistence layer "
        f"(aws-lambda-powertools {v['aws-lambda-powertools']}), on the same server. A "
        "duplicate is the same keys again, completed, under new task ids. Times are "
        "median [min, max] of the per-round means; ratios are taken within each round. "
        "The last rows are celery-idem's store calls alone on its own client, beside a "
        "bare `GET` on that client: what a round trip costs here, and what the claim and "
        "the completion add to it.\n\n"
        + table(["call", "us per call", "ratio (per round)", "target", "status"], rows)
        + "\n\n"
    )
