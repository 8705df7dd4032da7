"""Pure formatting for ``celery idem``: tables, durations, times, JSON. No I/O here."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

__all__ = [
    "claimed_at",
    "duration",
    "fields",
    "shorten",
    "size",
    "table",
    "timestamp",
    "to_json",
]

_EPOCH_MS_FLOOR = 1_000_000_000_000
"""A fence at least this large (2001-09-09 in ms) was taken from the server's clock."""


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces, a rule under the header."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out.extend(line(row) for row in rows)
    return "\n".join(out)


def fields(pairs: Sequence[tuple[str, str]]) -> str:
    """``label:  value`` lines with the values aligned."""
    width = max((len(label) for label, _ in pairs), default=0) + 1
    return "\n".join(f"{(label + ':').ljust(width)}  {value}" for label, value in pairs)


def duration(seconds: float | None) -> str:
    """``750ms``, ``42.0s``, ``5m 03s``, ``2h 05m``, ``3d 04h``; ``-`` for None.

    A negative duration (a deadline that passed) reads ``12.0s ago``.
    """
    if seconds is None:
        return "-"
    if seconds < 0:
        return f"{duration(-seconds)} ago"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m {whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h {whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d {whole % 86400 // 3600:02d}h"


def timestamp(epoch: float | None) -> str:
    """UTC ISO 8601 to the millisecond (``2026-01-02T03:04:05.678Z``); ``-`` for None."""
    if epoch is None:
        return "-"
    moment = datetime.fromtimestamp(epoch, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def claimed_at(fence: int) -> float | None:
    """When the claim that set ``fence`` was taken, on the server's clock (seconds).

    A claim's fence is ``max(previous fence + 1, server clock in ms)``, so it is the
    claim's time unless claims of one key came faster than once per millisecond (then
    it is off by that many ms). None for a fence that is not a time (a forged record).
    """
    if fence < _EPOCH_MS_FLOOR:
        return None
    return fence / 1000.0


def size(n: int | None) -> str:
    """Bytes for people: ``230 B``, ``1.5 KiB``, ``12.0 MiB``; ``-`` for None."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def shorten(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis (no limit when 0)."""
    if limit <= 0 or len(text) <= limit:
        return text
    return text[: max(limit - 3, 0)] + "..."


def to_json(data: Any) -> str:
    """Indented JSON, keys in the order built, non-ASCII kept."""
    return json.dumps(data, indent=2, ensure_ascii=False, default=str)
