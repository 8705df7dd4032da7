"""The shell examples of ``docs/cli.md`` that pipe ``--json`` into ``jq`` work as written.

Each such line is run by bash against the CLI tests' app and a private redis-server
(the ``cli`` and ``cli_app`` fixtures, from ``tests/cli/conftest.py``):
``celery -A shop idem`` becomes ``python -m celery_idem -A tests.cli.app`` and the
page's task names become the app's (same parameters); nothing else is changed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.cli.conftest import ROOT, TIMEOUT, Cli

PAGE = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
TASKS = {
    "shop.tasks.charge": "cli.add",
    "shop.tasks.send_email": "cli.send",
    "shop.tasks.send_welcome_email": "cli.welcome",
}


def jq_examples() -> list[str]:
    """The lines of the page's code blocks that pipe into jq."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", PAGE.read_text(encoding="utf-8"), re.M | re.S)
    return [line for block in blocks for line in block.splitlines() if "| jq " in line]


def _run(cli: Cli, line: str) -> subprocess.CompletedProcess[str]:
    command = line.replace("celery -A shop idem", '"$PYTHON" -m celery_idem -A tests.cli.app')
    for page_name, app_name in TASKS.items():
        command = command.replace(page_name, app_name)
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "IDEM_CLI_STORE": cli.url,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_the_page_has_jq_examples() -> None:
    examples = jq_examples()
    assert any(" list " in line for line in examples), examples
    assert any(" key " in line for line in examples), examples


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed")
def test_every_jq_example_runs_as_written(cli: Cli, cli_app: ModuleType) -> None:
    running = {cli.running("cli.send", f"{i}:hi") for i in range(2)}
    cli.completed("cli.add", "done")
    charge = cli_app.add.apply((42, 100))

    for line in jq_examples():
        done = _run(cli, line)
        assert done.returncode == 0, (line, done.stdout, done.stderr)
        assert done.stdout.strip(), line
        if " list " in line:  # records in progress, one JSON object each
            found = [json.loads(chunk) for chunk in re.split(r"(?m)^(?=\{)", done.stdout) if chunk]
            assert {record["storage_key"] for record in found} == running, line
            assert {record["state"] for record in found} == {"in_progress"}
        elif " key " in line:  # the record of that call, found through `key`
            assert re.search(rf"^task id:\s+{charge.id}$", done.stdout, re.M), done.stdout
            assert re.search(r"^state:\s+completed \(result\)$", done.stdout, re.M)
