"""What every ``doctor`` check gives, whatever the store: a finding, and the report of them.

Pure: no I/O. The Redis checks are in :mod:`.doctor`, the PostgreSQL ones in
:mod:`.postgres`; both end in :class:`Finding` objects that :func:`report` prints.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CLOCK_TOLERANCE", "Finding", "clock_finding", "report"]

CLOCK_TOLERANCE = 1.0
"""Seconds of offset between this machine and the server before a warning."""


@dataclass(frozen=True)
class Finding:
    """One check's outcome: ``status`` is ``ok``, ``warn`` or ``fail``."""

    check: str
    status: str
    detail: str
    fix: str = ""


def clock_finding(
    server: str,
    *,
    server_time: float | None,
    local_time: float | None,
    round_trip: float | None,
    clock: str,
) -> Finding:
    """The offset of the server's clock from this machine's.

    Deadlines are measured on the server's clock only (``clock`` names it: ``TIME``,
    ``clock_timestamp()``), so an offset does not touch the guarantee; it does shift
    the claim times ``celery idem`` shows, and hints at an unsynchronised host.
    """
    if server_time is None or local_time is None:
        return Finding("clock", "warn", "the server's clock could not be read")
    offset = server_time - local_time
    error = (round_trip or 0) / 2
    side = "ahead of" if offset >= 0 else "behind"
    detail = f"{server} is {abs(offset):.3f} s {side} this machine (+/- {error:.3f} s)"
    if abs(offset) - error <= CLOCK_TOLERANCE:
        return Finding("clock", "ok", f"{detail}; leases use the {server} clock only")
    detail += (
        f": leases use the {server} clock only ({clock}), so workers are unaffected, but "
        "the claim times this tool shows are off by as much against this machine's clock"
    )
    return Finding("clock", "warn", detail, "synchronise both clocks (NTP: chrony, timesyncd)")


_MARK = {"ok": "ok", "warn": "WARN", "fail": "FAIL"}


def report(findings: list[Finding]) -> str:
    """The findings as aligned lines, each fix under its finding."""
    width = max(len(f.check) for f in findings)
    lines = []
    for f in findings:
        lines.append(f"{_MARK[f.status]:<4}  {f.check:<{width}}  {f.detail}")
        if f.fix:
            lines.append(f"{'':<4}  {'':<{width}}  fix: {f.fix}")
    return "\n".join(lines)
