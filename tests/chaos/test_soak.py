"""The chaos soak as CI runs it: a short fixed-seed run must find nothing, and a
deliberately broken build must be caught (the checker's own test).

Each runs ``python -m tests.chaos.run`` as ``make chaos`` does, in its own process
with its own servers and workers; the full soak is ``make chaos`` (3 minutes).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import ROOT

pytestmark = pytest.mark.integration


def soak(tmp_path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.chaos.run", "--out", str(tmp_path), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def test_a_30_second_soak_with_a_fixed_seed_finds_nothing(tmp_path: Path) -> None:
    done = soak(tmp_path, "--seconds", "30", "--seed", "20261130", "--mean-gap", "0.8")
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "unexplained" in done.stdout  # the figures table was printed


@pytest.mark.rabbitmq
def test_a_20_second_soak_on_rabbitmq_finds_nothing(tmp_path: Path) -> None:
    # The second configuration: RabbitMQ redelivers a dead worker's messages at once.
    done = soak(
        tmp_path, "--broker", "rabbitmq", "--seconds", "20", "--seed", "1130", "--mean-gap", "0.8"
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "RabbitMQ broker" in done.stdout


def test_the_checker_catches_a_claim_that_skips_the_fence_check(tmp_path: Path) -> None:
    # CHAOS_BROKEN=claim in the workers: duplicates run the body under the holder's fence.
    done = soak(tmp_path, "--seconds", "15", "--seed", "7", "--no-faults", "--broken", "claim")
    assert done.returncode == 1, done.stdout[-6000:] + done.stderr[-3000:]
    assert "fence" in done.stdout.lower()
