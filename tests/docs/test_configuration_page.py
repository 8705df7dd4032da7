"""The configuration reference (``docs/configuration.md``) agrees with the settings table.

The page is written by hand; ``celery_idem.settings_table.TABLE`` is what the code
runs on. This test fails the moment the two disagree: a setting added, renamed or
dropped on one side only, a default, a Django spelling or the per-call flag changed
without the page, a section whose opening no longer says what the row's ``doc`` says.
Both the summary table and each setting's own section are checked.
"""

from __future__ import annotations

import enum
import json
import re
from pathlib import Path

import pytest

from celery_idem import IdempotentTask
from celery_idem.settings_table import TABLE, Setting

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
SUMMARY_COLUMNS = ["setting", "default", "type", "Django", "per task", "per call"]
FACTS = [*SUMMARY_COLUMNS, "per app"]
"""A section's facts: the summary's columns, and "per app" where it is "no"."""


def _page() -> str:
    """The page without its fenced code, whose ``# comments`` would read as headings."""
    return re.sub(r"^```.*?^```$", "", PAGE.read_text(encoding="utf-8"), flags=re.M | re.S)


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _chapter(text: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level."""
    level = heading.split(" ", 1)[0]
    start = text.index(f"\n{heading}\n") + len(heading) + 2
    ends = [m.start() for m in re.finditer(rf"^#{{1,{len(level)}}} ", text[start:], re.M)]
    return text[start : start + ends[0]] if ends else text[start:]


def _summary() -> dict[str, dict[str, str]]:
    """The summary table, setting -> column -> cell, in the page's order."""
    lines = [ln for ln in _chapter(_page(), "## Summary").splitlines() if ln.startswith("|")]
    header, rule, *rows = lines
    assert _cells(header) == SUMMARY_COLUMNS
    assert set(rule) <= set("|-: ")
    table: dict[str, dict[str, str]] = {}
    for line in rows:
        cells = dict(zip(SUMMARY_COLUMNS, _cells(line), strict=True))
        table[cells["setting"].strip("`")] = cells
    return table


def _sections() -> dict[str, tuple[str, dict[str, str]]]:
    """Each ``### `idem_*``` section: its opening paragraph and its key/value table."""
    settings = _chapter(_page(), "## Settings")
    found: dict[str, tuple[str, dict[str, str]]] = {}
    for match in re.finditer(r"^### `(idem_\w+)`\n", settings, re.M):
        body = _chapter(settings, f"### `{match.group(1)}`")
        opening = " ".join(body.strip().split("\n\n", 1)[0].split())
        facts = {}
        for line in body.splitlines():
            cells = _cells(line) if line.startswith("|") else []
            if len(cells) == 2 and cells[0] in FACTS:
                facts[cells[0]] = cells[1]
        found[match.group(1)] = (opening, facts)
    return found


def shown(default: object) -> str:
    """A default as the page writes it in code: ``None``, ``86400``, ``"idem"``, ``()``."""
    if isinstance(default, enum.Enum):
        default = default.value
    if isinstance(default, str):
        return json.dumps(default)
    return repr(default)


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def django(row: Setting) -> str:
    """The Django cell: the spelling, or that the app (Django's settings) cannot set it."""
    return f"`{row.django}`" if row.per_app else "none: per task only"


def test_the_summary_lists_every_setting_in_table_order() -> None:
    assert list(_summary()) == [row.name for row in TABLE]


def test_the_sections_describe_every_setting_in_table_order() -> None:
    assert list(_sections()) == [row.name for row in TABLE]


@pytest.mark.parametrize("row", TABLE, ids=lambda row: row.name)
def test_the_summary_row_agrees_with_the_table(row: Setting) -> None:
    cells = _summary()[row.name]
    assert cells["default"].startswith(f"`{shown(row.default)}`"), cells["default"]
    assert cells["Django"] == django(row)
    assert cells["per task"] == yes_no(row.name in vars(IdempotentTask))
    assert cells["per call"] == yes_no(row.per_call)


@pytest.mark.parametrize("row", TABLE, ids=lambda row: row.name)
def test_the_section_agrees_with_the_table(row: Setting) -> None:
    opening, facts = _sections()[row.name]
    assert opening.startswith(row.doc.rstrip(".")), opening
    assert facts["default"].startswith(f"`{shown(row.default)}`"), facts["default"]
    assert facts["Django"] == django(row)
    assert facts.get("per app", "yes") == yes_no(row.per_app)
    assert facts["per task"] == yes_no(row.name in vars(IdempotentTask))
    assert facts["per call"] == yes_no(row.per_call)
