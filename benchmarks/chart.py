"""``docs/benchmarks.png``: the ratios of one ``make bench`` run, drawn.

Left and middle: the main setup's scenarios, every contender's median per-round ratio to
plain Celery (tasks/s, worker CPU). Right: celery-idem over "plain + 1 raw round trip"
on every setup, unique tasks and duplicates of completed keys, with the 0.95 target and
the min-max of the rounds as error bars: the figure the issue's targets are judged on.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from benchmarks.contenders import CHART_ORDER, COLORS, FLOORS, LABELS
from benchmarks.scenarios import MAIN

__all__ = ["draw"]

FLOOR_TARGET = 0.95


def _main_panels(result: dict[str, Any], axes: Any) -> None:
    names = [n for n, sc in result["scenarios"].items() if sc["setup"] == MAIN.name]
    others = [c.name for c in CHART_ORDER]
    panels = (
        (axes[0], "rate_ratio", "tasks/s vs plain Celery (higher is better)"),
        (axes[1], "cpu_ratio", "worker CPU per task vs plain Celery (lower is better)"),
    )
    width = 0.85 / len(others)
    for ax, field, title in panels:
        for i, contender in enumerate(others):
            here = [
                (j, result["scenarios"][n]["contenders"][contender][field])
                for j, n in enumerate(names)
                if contender in result["scenarios"][n]["contenders"]
            ]
            if not here:
                continue
            xs = [j + (i - (len(others) - 1) / 2) * width for j, _ in here]
            bars = ax.bar(
                xs, [v or 0.0 for _, v in here], width, label=LABELS[contender],
                color=COLORS[contender],
            )  # fmt: skip
            labels = ["n/a" if v is None else f"{v:.2f}" for _, v in here]
            ax.bar_label(bars, labels=labels, fontsize=5, padding=1, rotation=90)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([f"({n})" for n in names])
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("median of per-round ratios", fontsize=8)
        ax.margins(y=0.15)
    axes[0].legend(fontsize=6, loc="upper left")


def _floor_panel(result: dict[str, Any], ax: Any) -> None:
    rows = []
    for name, sc in result["scenarios"].items():
        idem = sc["contenders"].get("idem")
        if sc["workload"] not in ("a", "e") or idem is None:
            continue
        values = idem["ratios"].get(FLOORS[0]) or []
        if values:
            rows.append((name, sc["workload"], values))
    for i, (_name, workload, values) in enumerate(rows):
        med = statistics.median(values)
        ax.barh(
            i, med, color=COLORS["idem"] if workload == "a" else "#8fb7e0",
            xerr=[[med - min(values)], [max(values) - med]], capsize=2,
        )  # fmt: skip
        ax.annotate(f"{med:.2f}", (max(values), i), fontsize=6, va="center", xytext=(6, 0),
                    textcoords="offset points")  # fmt: skip
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.axvline(FLOOR_TARGET, color="grey", linestyle="--", linewidth=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"({n})" for n, _, _ in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_title("celery-idem vs plain + 1 raw round trip\n(a) unique, (e) duplicates", fontsize=9)
    ax.set_xlabel("median [min, max] of per-round ratios; dashed: 0.95 target", fontsize=7)


def draw(result: dict[str, Any], path: Path) -> None:
    """Write the chart to ``path`` (matplotlib, Agg backend)."""
    import matplotlib  # noqa: PLC0415 - only the page needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), gridspec_kw={"width_ratios": [1.3, 1.3, 1.0]})
    _main_panels(result, axes)
    _floor_panel(result, axes[2])
    fig.suptitle(
        f"main setup ({MAIN.label}): "
        + "; ".join(
            f"({n}) {sc['title']}"
            for n, sc in result["scenarios"].items()
            if sc["setup"] == MAIN.name
        ),
        fontsize=8,
    )  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
