"""The example of the docs' testing page (``docs/examples/test_welcome_email.py``) passes.

It runs in its own pytest process, as in a user's project: celery-idem's pytest plugin
(entry point ``pytest11``) provides the ``idem_store`` fixture, and the example its own
``celery_app``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "test_welcome_email.py"


def test_the_testing_example_passes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_welcome_email=EXAMPLE.read_text(encoding="utf-8"))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(
        [
            "*test_one_email_per_event PASSED*",
            "*test_a_reused_event_id_is_refused PASSED*",
            "*test_without_the_fixture PASSED*",
            "*test_a_crashed_run_is_taken_over_after_its_lease PASSED*",
        ]
    )
