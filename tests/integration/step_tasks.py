"""Tasks made of durable steps (``self.step``), for the integration and fault tests.

Names prefixed ``t.st_``. Each step's function writes one entry to the effect ledger
(``tests.integration.tasks.effect``) when it really runs, so a test counts the runs of
each step from outside the library; ``replayed:<key>`` lists every ``step_replayed``
signal. Imported by the workers through the app's ``include``.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery_idem import IdempotentTask
from celery_idem import signals as idem_signals
from tests.integration.tasks import WfWatched, app, effect, ledger


class Flaky(Exception):
    """A transient failure that ``autoretry_for`` retries."""


def hold(flag: str) -> None:
    """Wait while ``ledger:<flag>`` exists (60 s at most): a test's point to act at."""
    deadline = time.monotonic() + 60.0
    while ledger().exists(f"ledger:{flag}") and time.monotonic() < deadline:
        time.sleep(0.01)


def _note_replay(
    sender: Any, key: str, task_id: str, step: str, occurrence: int, fence: int, **_: Any
) -> None:
    effect(f"replayed:{key}", step=step, occurrence=occurrence, fence=fence, task_id=task_id)


idem_signals.step_replayed.connect(_note_replay, weak=False)


@app.task(base=WfWatched, bind=True, name="t.st_checkout")
def st_checkout(self: IdempotentTask, name: str) -> dict[str, Any]:
    """Two steps, a row and then an email, holding between them while ``<name>:hold``.

    A kill while it holds is after the row step was stored and before the email.
    """
    fence = self.idempotency_fence

    def create_row() -> dict[str, Any]:
        effect(f"{name}:row", key=self.step_key, fence=fence, pid=os.getpid())
        return {"row": fence}

    def send_email(row: dict[str, Any]) -> str:
        effect(f"{name}:email", key=self.step_key, fence=fence, row=row["row"])
        return f"mail-{row['row']}"

    row = self.step("row", create_row)
    effect(f"{name}:between", pid=os.getpid(), fence=fence, task_id=self.request.id)
    hold(f"{name}:hold")
    email = self.step("email", send_email, row)
    return {"row": row, "email": email, "fence": fence}


@app.task(
    base=WfWatched, bind=True, name="t.st_autoretry", autoretry_for=(Flaky,), max_retries=4,
    retry_kwargs={"countdown": 0.1},
)  # fmt: skip
def st_autoretry(self: IdempotentTask, name: str, failures: int) -> dict[str, Any]:
    """Step ``one``, then step ``two`` that fails its first ``failures`` runs."""

    def one() -> int:
        return effect(f"{name}:one", fence=self.idempotency_fence)

    def two() -> int:
        runs = effect(f"{name}:two", fence=self.idempotency_fence)
        if runs <= failures:
            raise Flaky(f"run {runs} of step two fails")
        return runs

    return {"one": self.step("one", one), "two": self.step("two", two)}


@app.task(
    base=WfWatched, bind=True, name="t.st_loop", autoretry_for=(Flaky,), max_retries=2,
    retry_kwargs={"countdown": 0.1},
)  # fmt: skip
def st_loop(self: IdempotentTask, name: str, n: int, fail_after: int) -> list[int]:
    """``n`` steps of one name; the first attempt fails after ``fail_after`` of them."""
    attempt = effect(f"{name}:attempt")

    def square(i: int) -> int:
        effect(f"{name}:item", i=i, key=self.step_key)
        return i * i

    out = []
    for i in range(n):
        out.append(self.step("item", square, i))
        if attempt == 1 and i + 1 == fail_after:
            raise Flaky(f"the first attempt fails after {fail_after} steps")
    return out


@app.task(base=WfWatched, bind=True, name="t.st_pause")
def st_pause(self: IdempotentTask, name: str) -> dict[str, Any]:
    """Step ``one``; hold at ``<name>:hold``; step ``two``; hold at ``<name>:after``."""
    fence = self.idempotency_fence

    def mark(step: str) -> int | None:
        effect(f"{name}:{step}", fence=fence, pid=os.getpid(), task_id=self.request.id)
        return fence

    self.step("one", mark, "one")
    effect(f"{name}:between", pid=os.getpid(), fence=fence, task_id=self.request.id)
    hold(f"{name}:hold")
    self.step("two", mark, "two")
    hold(f"{name}:after")
    return {"fence": fence}
