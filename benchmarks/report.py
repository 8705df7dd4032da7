"""Figures from the runs: medians, per-round ratios, targets, the page and the chart."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.contenders import CHART_ORDER, COLORS, CONTENDERS, LABELS
from benchmarks.page import render as render_page

__all__ = ["build", "environment", "stdout_table", "write_page"]

MANY_RECORDS = 1000
"""Runs leaving fewer records on the store give no used_memory-per-record figure."""
PACKAGES = ("celery", "kombu", "redis", "celery-once", "celery-singleton", "celery-idem")


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


def _summarise(
    scenario: Any, contender: str, runs: list[dict[str, Any]], by_round: dict[Any, Any]
) -> dict[str, Any]:
    mine = [r for r in runs if r["contender"] == contender and r["scenario"] == scenario.name]
    timed = [r for r in mine if "error" not in r and not r.get("timeout")]
    counted = [r for r in timed if "round_trips" in r]
    rate_ratios, cpu_ratios = [], []
    for run in timed:
        base = by_round.get((scenario.name, "plain", run["round"]))
        if base is not None:
            rate_ratios.append(_rate(run) / _rate(base))
            # Too few tasks: per-task CPU is below the 10 ms clock tick, a ratio is noise.
            if _cpu(base) and scenario.n >= MANY_RECORDS:
                cpu_ratios.append(_cpu(run) / _cpu(base))
    s: dict[str, Any] = {
        "runs": len(timed),
        "failed": len(mine) - len(timed),
        "rate": _median([_rate(r) for r in timed]),
        "rate_ratio": _median(rate_ratios),
        "rate_ratios": rate_ratios,
        "cpu_us": _median([_cpu(r) for r in timed]),
        "cpu_ratio": _median(cpu_ratios),
        "publisher_cpu_us": _median([1e6 * r["publisher_cpu"] / r["deliveries"] for r in timed]),
        "monitor_cpu_us": _median([1e6 * r["monitor_cpu"] / r["deliveries"] for r in counted]),
        "foreign_cores": _median([r["foreign_cores"] for r in timed]),
        "foreign_cores_max": max((r["foreign_cores"] for r in timed), default=None),
        "deliveries": timed[0]["deliveries"] if timed else scenario.n,
        "answered_min": min((r["answered"] for r in timed), default=None),
        "wrong_max": max((r["wrong"] + r["missing"] for r in timed), default=None),
        "body_runs": _median([r["body_runs"] for r in timed]),
        "retries": _median([r["retries"] for r in timed]),
        "refused": _median([r["refused_at_publish"] for r in timed]),
        "given_existing": _median([r["given_existing_result"] for r in timed]),
        "keys_with_one_value": _median([r["keys_with_one_value"] for r in timed]),
        "distinct_keys": timed[0]["distinct_keys"] if timed else None,
        "result_bytes": _median([r["result_bytes"] for r in timed]),
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
    elif contender == "plain":
        s["rt_worker"] = s["rt_publisher"] = 0.0
    return s


def _scripts(run: dict[str, Any]) -> Counter[str]:
    return Counter(run["round_trips"]["worker"])


def _idem_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    sc = result["scenarios"]

    def idem(name: str) -> dict[str, Any] | None:
        return sc[name]["contenders"].get("idem") if name in sc else None

    firsts = []
    for name in ("a", "b"):
        s = idem(name)
        for run in s["counted_runs"] if s else []:
            w, n = _scripts(run), run["deliveries"]
            firsts.append(
                (name, sum(w.values()) / n, w["evalsha:claim"] == w["evalsha:complete"] == n)
            )
    if firsts:
        exact = all(ok and per == 2.0 for _, per, ok in firsts)
        out.append(
            {
                "target": "2 round trips per first run (claim + complete)",
                "measured": ", ".join(
                    f"({n}) {per:.3f}" for n, per in sorted({(n, p) for n, p, _ in firsts})
                )
                + f" per task, in every one of {len(firsts)} runs"
                if exact
                else ", ".join(f"({n}) {per:.3f}" for n, per, _ in firsts),
                "met": exact,
            }
        )
    c = idem("c")
    if c and c["counted_runs"]:
        per_dups, cleans, deferred = [], [], []
        for run in c["counted_runs"]:
            w = _scripts(run)
            first = w["evalsha:complete"]
            dups = run["deliveries"] - first
            spent = sum(w.values()) - 2 * first - w["evalsha:renew"]
            per_dups.append(spent / dups)
            cleans.append((spent - run["retries"]) / dups)
            deferred.append(run["retries"])
        out.append(
            {
                "target": "exactly 1 round trip per duplicate",
                "measured": "(c) "
                + ", ".join(f"{p:.4f}" for p in per_dups)
                + " per duplicate (one per run); a duplicate that arrives while its key's "
                "first run holds it is deferred and claims once more (deferrals per run: "
                + ", ".join(str(d) for d in deferred)
                + "); without those: "
                + ", ".join(f"{x:.4f}" for x in cleans),
                "met": all(p == 1.0 for p in per_dups),
            }
        )
    renewals = []
    for name in ("a", "b", "c"):
        s = idem(name)
        if s and s["counted_runs"]:
            renewals.append((name, sum(_scripts(r)["evalsha:renew"] for r in s["counted_runs"])))
    if renewals:
        out.append(
            {
                "target": "0 renewals for tasks shorter than lease/3",
                "measured": ", ".join(f"({n}) {r}" for n, r in renewals)
                + " renewals over all runs",
                "met": all(r == 0 for _, r in renewals),
            }
        )
    a = idem("a")
    if a and a["rate_ratio"] is not None:
        out.append(
            {
                "target": "(a) celery-idem >= 0.90x plain Celery (tasks/s)",
                "measured": f"{a['rate_ratio']:.2f}x (per round: "
                + ", ".join(f"{r:.2f}" for r in a["rate_ratios"])
                + ")",
                "met": a["rate_ratio"] >= 0.90,
            }
        )
    variant = sc["c"]["contenders"].get("idem_pub") if "c" in sc else None
    for label, s in (("", c), (" (with idem_dedupe_on_publish)", variant)):
        if not s or s["rate"] is None:
            continue
        peers = {
            k: v["rate"]
            for k, v in sc["c"]["contenders"].items()
            if k in ("once", "singleton") and v["rate"]
        }
        fastest = max(peers.items(), key=lambda kv: kv[1]) if peers else ("plain", 0.0)
        all_answered = s["answered_min"] == s["deliveries"] and not s["wrong_max"]
        out.append(
            {
                "target": "(c) at least as fast as the fastest peer, every delivery answered"
                + label,
                "measured": f"{s['rate']:.0f}/s vs {LABELS[fastest[0]]} {fastest[1]:.0f}/s; "
                f"answered {s['answered_min']}/{s['deliveries']} (worst run), "
                f"{s['keys_with_one_value']:.0f}/{s['distinct_keys']} keys with one value",
                "met": s["rate"] >= fastest[1] and all_answered,
            }
        )
    beyond = []
    for name, sc_ in sc.items():
        st = sc_["contenders"].get("idem")
        if st and st["bytes_per_record"]:
            used = st["used_memory_per_record"] or 0.0
            beyond.append((name, st["bytes_per_record"], st["result_bytes"], used))
    if beyond:
        out.append(
            {
                "target": "<= 200 bytes per completed record beyond the result (MEMORY USAGE)",
                "measured": ", ".join(
                    f"({n}) {b - r:.0f} B ({b:.0f} B record, {r:.0f} B result)"
                    for n, b, r, _ in beyond
                )
                + (
                    "; counting the keyspace and expiry hash-table entries that MEMORY USAGE "
                    "leaves out (used_memory growth per record, minus the result): "
                    + ", ".join(f"({n}) {u - r:.0f} B" for n, _, r, u in beyond if u)
                    if any(u for *_, u in beyond)
                    else ""
                ),
                "met": all(b - r <= 200 for _, b, r, _ in beyond),
            }
        )
    return out


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
    result["targets"] = _idem_targets(result)
    return result


def _fmt(value: float | None, spec: str = ".0f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, sc in result["scenarios"].items():
        for contender, s in sc["contenders"].items():
            rt = "n/a"
            if "rt_worker" in s:
                rt = f"{s['rt_worker']:.2f} + {s['rt_publisher']:.2f}"
            mem = "0 (none kept)" if contender != "plain" and not s["store_keys"] else "-"
            if s["bytes_per_record"]:
                beyond = s["bytes_per_record"] - s["result_bytes"]
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
                    _fmt(s["rate_ratio"], ".2f", "x"),
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
    "vs plain",
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


def _chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib  # noqa: PLC0415 - only the page needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = list(result["scenarios"])
    others = [c.name for c in CHART_ORDER]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    panels = (
        (axes[0], "rate_ratio", "end-to-end tasks/s vs plain Celery (higher is better)"),
        (axes[1], "cpu_ratio", "worker CPU per task vs plain Celery (lower is better)"),
    )
    width = 0.2
    for ax, field, title in panels:
        for i, contender in enumerate(others):
            here = [
                (j, result["scenarios"][n]["contenders"][contender][field])
                for j, n in enumerate(names)
                if contender in result["scenarios"][n]["contenders"]
            ]
            if not here:
                continue
            xs = [j + (i - 1.5) * width for j, _ in here]
            bars = ax.bar(
                xs, [v or 0.0 for _, v in here], width, label=LABELS[contender],
                color=COLORS[contender],
            )  # fmt: skip
            labels = ["n/a" if v is None else f"{v:.2f}" for _, v in here]
            ax.bar_label(bars, labels=labels, fontsize=6, padding=1)
        ax.axhline(1.0, color="black", linewidth=0.8)
        if field == "rate_ratio":
            ax.axhline(0.9, color="grey", linestyle="--", linewidth=0.8)
            ax.annotate(
                "0.90", (1.005, 0.9), xycoords=("axes fraction", "data"), fontsize=7,
                va="center", ha="left", color="grey", annotation_clip=False,
            )  # fmt: skip
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([f"({n})" for n in names])
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("ratio to plain Celery (median of per-round ratios)", fontsize=8)
        ax.margins(y=0.12)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(
        "; ".join(f"({n}) {result['scenarios'][n]['title']}" for n in names)
        + ("\n(d): CPU per task is below the clock-tick resolution, n/a" if "d" in names else ""),
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_page(result: dict[str, Any], page: Path, chart: Path) -> None:
    """``docs/benchmarks.md`` and the chart next to it."""
    page.parent.mkdir(parents=True, exist_ok=True)
    _chart(result, chart)
    page.write_text(render_markdown(result, chart.name))


def render_markdown(result: dict[str, Any], chart_name: str) -> str:
    """The page's markdown (built by ``make bench``; do not edit by hand)."""
    return render_page(result, chart_name, HEADER, _rows(result))
