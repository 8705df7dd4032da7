"""The testing page's example of a task with a transactional completion passes under pytest.

``docs/testing.md`` ("Tasks with a transactional completion") shows a project's
``orders.py`` and its ``test_orders.py``; ``test_page_examples.py`` runs them as a page
(the test functions take fixtures, so it only defines them). Here they run as in a
user's project: in a pytest process of their own, with celery-idem's pytest plugin
(entry point ``pytest11``) providing ``idem_store``, on SQLite through SQLAlchemy.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
pytest.importorskip("sqlalchemy")

PAGE = Path(__file__).resolve().parents[2] / "docs" / "testing.md"


def block(header: str) -> str:
    """The page's ``python`` block whose first line is ``# <header>``."""
    text = PAGE.read_text(encoding="utf-8")
    found = re.findall(rf"^```python\n(# {re.escape(header)}\n.*?)^```", text, re.S | re.M)
    assert len(found) == 1, f"no single block # {header} in {PAGE.name}"
    return str(found[0])


def test_the_transactional_completion_example_passes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(orders=block("orders.py"), test_orders=block("test_orders.py"))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "*test_one_order_per_event PASSED*",
            "*test_a_failed_insert_rolls_back_and_a_retry_runs PASSED*",
        ]
    )
