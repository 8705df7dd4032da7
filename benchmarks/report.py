"""Figures from the runs: medians, per-round ratios, targets, the page and the chart."""

from __future__ import annotations

import os
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.chart import draw as draw_chart
from benchmarks.contenders import BASELINE, CONTENDERS, FLOORS, LABELS
from benchmarks.page import render as render_page
from benchmarks.scenarios import MAIN, Setup
from benchmarks.targets import idem_targets

__all__ = ["build", "environment", "spread", "stdout_table", "write_page"]

MANY_RECORDS = 1000
"""Runs leaving fewer records on the store give no used_memory-per-record figure."""
PACKAGES = (
    "celery",
    "kombu",
    "redis",
    "hiredis",
    "celery-once",
    "celery-singleton",
    "aws-lambda-powertools",
    "celery-idem",
)


def environment(redis_server_version: str, concurrency: int) -> dict[str, Any]:
    """The machine and the versions measured."""
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    versions = {"python": platform.python_version(), "redis-server": redis_server_version}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "versions": versions,
        "concurrency": concurrency,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _rate(run: dict[str, Any]) -> float:
    return float(run["deliveries"]) / float(run["elapsed"])


def _cpu(run: dict[str, Any]) -> float:
    return 1e6 * float(run["worker_cpu"]) / float(run["deliveries"])


def _rt(run: dict[str, Any], side: str) -> float:
    return sum(run["round_trips"][side].values()) / float(run["deliveries"])


def spread(values: list[float], spec: str = ".2f", suffix: str = "x") -> str:
    """``median [min, max]`` of per-round values: the form every ratio is reported in."""
    if not values:
        return "n/a"
    med = statistics.median(values)
    return f"{med:{spec}}{suffix} [{min(values):{spec}}, {max(values):{spec}}]"


def _summarise(
    scenario: Any, contender: str, runs: list[dict[str, Any]], by_round: dict[Any, Any]
) -> dict[str, Any]:
    mine = [r for r in runs if r["contender"] == contender and r["scenario"] == scenario.name]
    timed = [r for r in mine if "error" not in r and not r.get("timeout")]
    counted = [r for r in timed if "round_trips" in r]
    # Verified: runs whose results were written (not under task_ignore_result).
    checked = [r for r in timed if "answered" in r]
    # Per round: this contender's run over each denominator's run of the same round.
    ratios: dict[str, list[float]] = {base: [] for base in (BASELINE, *FLOORS)}
    cpu_ratios = []
    for run in timed:
        for base_name, values in ratios.items():
            base = by_round.get((scenario.name, base_name, run["round"]))
            if base is not None:
                values.append(_rate(run) / _rate(base))
        base = by_round.get((scenario.name, BASELINE, run["round"]))
        # Too few tasks: per-task CPU is below the 10 ms clock tick, a ratio is noise.
        if base is not None and _cpu(base) and scenario.n >= MANY_RECORDS:
            cpu_ratios.append(_cpu(run) / _cpu(base))
    rate_ratios = ratios[BASELINE]
    s: dict[str, Any] = {
        "runs": len(timed),
        "failed": len(mine) - len(timed),
        "rate": _median([_rate(r) for r in timed]),
        "rate_ratio": _median(rate_ratios),
        "rate_ratios": rate_ratios,
        "ratios": ratios,
        "rate_by_round": {r["round"]: _rate(r) for r in timed},
        "cpu_ratios": cpu_ratios,
        "cpu_us": _median([_cpu(r) for r in timed]),
        "cpu_ratio": _median(cpu_ratios),
        "publisher_cpu_us": _median([1e6 * r["publisher_cpu"] / r["deliveries"] for r in timed]),
        "monitor_cpu_us": _median([1e6 * r["monitor_cpu"] / r["deliveries"] for r in counted]),
        "foreign_cores": _median([r["foreign_cores"] for r in timed]),
        "foreign_cores_max": max((r["foreign_cores"] for r in timed), default=None),
        "deliveries": timed[0]["deliveries"] if timed else scenario.n,
        "answered_min": min((r["answered"] for r in checked), default=None),
        "wrong_max": max((r["wrong"] + r["missing"] for r in checked), default=None),
        "body_runs": _median([r["body_runs"] for r in checked]),
        "retries": _median([r["retries"] for r in timed]),
        "refused": _median([r["refused_at_publish"] for r in timed]),
        "given_existing": _median([r["given_existing_result"] for r in timed]),
        "keys_with_one_value": _median([r["keys_with_one_value"] for r in checked]),
        "distinct_keys": checked[0]["distinct_keys"] if checked else None,
        "result_bytes": _median([r["result_bytes"] for r in checked]),
        "store_keys": _median([r.get("store_keys", 0) for r in timed]),
        "bytes_per_record": _median(
            [r["store_bytes"] / r["store_keys"] for r in timed if r.get("store_keys")]
        ),
        # Only with many records: fixed overheads (client buffers) swamp a few hundred.
        "used_memory_per_record": _median(
            [
                r["store_used_memory"] / r["store_keys"]
                for r in timed
                if r.get("store_keys", 0) >= MANY_RECORDS
            ]
        ),
        "counted_runs": counted,
    }
    if counted:
        s["rt_worker"] = _median([_rt(r, "worker") for r in counted])
        s["rt_publisher"] = _median([_rt(r, "publisher") for r in counted])
        labels = sorted({k for r in counted for c in r["round_trips"].values() for k in c})
        s["rt_detail"] = {
            side: {
                k: _median([r["round_trips"][side].get(k, 0) / r["deliveries"] for r in counted])
                for k in labels
                if any(k in r["round_trips"][side] for r in counted)
            }
            for side in ("worker", "publisher")
        }
    elif contender == BASELINE:
        s["rt_worker"] = s["rt_publisher"] = 0.0
    return s


def build(runs: list[dict[str, Any]], scenarios: list[Any], meta: dict[str, Any]) -> dict[str, Any]:
    """Everything the table, the page and the chart show."""
    by_round = {
        (r["scenario"], r["contender"], r["round"]): r
        for r in runs
        if "error" not in r and not r.get("timeout")
    }
    result: dict[str, Any] = {"meta": meta, "scenarios": {}}
    for scenario in scenarios:
        result["scenarios"][scenario.name] = {
            "title": scenario.title,
            "setup": scenario.setup,
            "workload": scenario.workload,
            "prefill": scenario.prefill,
            "n": scenario.n,
            "keys": scenario.keys,
            "sleep_ms": scenario.sleep_ms,
            "rounds": scenario.rounds,
            "contenders": {
                c: _summarise(scenario, c, runs, by_round)
                for c in CONTENDERS
                if any(r["contender"] == c and r["scenario"] == scenario.name for r in runs)
            },
        }
    result["setups"] = {u["name"]: {**u, "label": Setup(**u).label} for u in meta.get("setups", [])}
    result["targets"] = idem_targets(result)
    return result


def _fmt(value: float | None, spec: str = ".0f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _rows(result: dict[str, Any]) -> list[list[str]]:
    """The main setup's table: every figure of every contender (the matrix has its own)."""
    rows = []
    for name, sc in result["scenarios"].items():
        if sc["setup"] != MAIN.name:
            continue
        for contender, s in sc["contenders"].items():
            rt = "n/a"
            if "rt_worker" in s:
                rt = f"{s['rt_worker']:.2f} + {s['rt_publisher']:.2f}"
            mem = "0 (none kept)" if contender != "plain" and not s["store_keys"] else "-"
            if s["bytes_per_record"]:
                beyond = s["bytes_per_record"] - (s["result_bytes"] or 0)
                mem = f"{s['bytes_per_record']:.0f} ({beyond:.0f})"
                if s["used_memory_per_record"]:
                    mem += f"; {s['used_memory_per_record']:.0f}"
            answered = "n/a"
            if s["answered_min"] is not None:
                answered = f"{s['answered_min']}/{s['deliveries']}"
            rows.append(
                [
                    f"({name})",
                    LABELS[contender],
                    _fmt(s["rate"]),
                    spread(s["ratios"][BASELINE]),
                    spread(s["ratios"][FLOORS[0]]),
                    _fmt(s["cpu_us"]),
                    _fmt(s["cpu_ratio"], ".2f", "x"),
                    _fmt(s["publisher_cpu_us"]),
                    rt,
                    mem,
                    answered,
                    _fmt(s["body_runs"]),
                ]
            )
    return rows


HEADER = [
    "scenario",
    "contender",
    "tasks/s",
    "vs plain: median [min, max] of rounds",
    "vs plain + 1 raw round trip",
    "worker CPU us/task",
    "CPU vs plain",
    "publisher CPU us/task",
    "store round trips/task (worker + publisher)",
    "store bytes/record: MEMORY USAGE (beyond result); used_memory growth",
    "deliveries answered",
    "body runs",
]


def stdout_table(result: dict[str, Any]) -> str:
    """The table as aligned text."""
    rows = [HEADER, *_rows(result)]
    short = [
        h.replace("store round trips/task (worker + publisher)", "round trips w+p") for h in HEADER
    ]
    short = [h.split(":")[0] for h in short]
    rows[0] = short
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for t in result["targets"]:
        lines.append(f"[{'met' if t['met'] else 'NOT MET'}] {t['target']}: {t['measured']}")
    return "\n".join(lines)


def write_page(result: dict[str, Any], page: Path, chart: Path) -> None:
    """``docs/benchmarks.md`` and the chart next to it."""
    page.parent.mkdir(parents=True, exist_ok=True)
    draw_chart(result, chart)
    page.write_text(render_markdown(result, chart.name))


def render_markdown(result: dict[str, Any], chart_name: str) -> str:
    """The page's markdown (built by ``make bench``; do not edit by hand)."""
    return render_page(result, chart_name, HEADER, _rows(result))
