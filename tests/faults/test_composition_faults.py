"""Faults where Celery composes tasks: a chain whose worker dies between the completion
and the dispatch of its next step, and a poison message that kills every worker.

Counted from outside the library: the effect ledger of ``tests.integration.tasks``
(one entry per body run, per delivery, per dispatched step) and the processes killed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import ModuleType
from typing import Any

import pytest
import redis
from celery import chain

from celery_idem import KeyQuarantined
from devtools.processes import wait_for
from tests.faults.harness import delivery_count, entries
from tests.integration.conftest import ROOT

pytestmark = pytest.mark.integration
T = 60


@pytest.mark.scenario(
    "chain kill before dispatch",
    inject="SIGKILL a chain step's child after its record is completed, before Celery "
    "sends the next step",
    expect="the redelivery sends the next step once, with the stored value; body once",
)
def test_a_chain_step_killed_before_dispatch_has_its_next_step_sent_by_the_redelivery(
    spawn: Any, tasks: ModuleType, ledger: redis.Redis, uid: str, fault_report: Any
) -> None:
    w = spawn()
    flow = chain(
        tasks.wf_die_after_complete.s(uid).set(queue=w.queue),
        tasks.plain_collect.s(f"{uid}:next").set(queue=w.queue),
    )
    out = flow.apply_async().get(timeout=T)
    died = int(ledger.get(f"ledger:{uid}:died") or 0)
    runs = entries(ledger, uid)
    steps = entries(ledger, f"{uid}:next")
    assert died
    assert len(runs) == 1
    assert runs[0]["pid"] == died
    assert out == {"name": uid, "fence": runs[0]["fence"]}
    assert [s["value"] for s in steps] == [out]  # sent once, by the redelivery
    fault_report(
        deliveries=delivery_count(ledger, uid),
        executions=len(runs),
        completions=len(steps),
        lost=1 - len(steps),
        duplicate_effects=len(runs) - 1 + max(0, len(steps) - 1),
    )


@pytest.mark.scenario(
    "chain kill after dispatch",
    inject="SIGKILL a chain step's child after Celery sent the next step (ignore_result, "
    "so the message is redelivered)",
    expect="the redelivery sends nothing again: next step once, body once",
)
def test_a_chain_step_killed_after_dispatch_is_not_dispatched_again(
    spawn: Any, tasks: ModuleType, ledger: redis.Redis, uid: str, fault_report: Any
) -> None:
    w = spawn()
    flow = chain(
        tasks.cp_die_after_dispatch.s(uid).set(queue=w.queue),
        tasks.plain_collect.s(f"{uid}:next").set(queue=w.queue),
    )
    res = flow.apply_async()
    out = res.get(timeout=T)
    died = int(wait_for(lambda: ledger.get(f"ledger:{uid}:died"), timeout=T, message="kill"))
    # The redelivery came and went: it replayed (the killed run never logged success).
    done = f"t.cp_die_after_dispatch[{res.parent.id}] succeeded"
    wait_for(lambda: done in w.log(), timeout=T, message="the redelivery finished")
    deliveries = entries(ledger, f"{uid}:delivered")
    assert [d["redelivered"] for d in deliveries] == [False, True]
    runs = entries(ledger, uid)
    steps = entries(ledger, f"{uid}:next")
    assert len(runs) == 1
    assert runs[0]["pid"] == died
    assert [s["value"] for s in steps] == [out]  # ... and sent nothing again
    fault_report(
        deliveries=len(deliveries),
        executions=len(runs),
        completions=len(steps),
        lost=1 - len(steps),
        duplicate_effects=len(runs) - 1 + max(0, len(steps) - 1),
    )


def celery_idem_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``celery -A tests.integration.tasks idem ...`` as an operator runs it."""
    full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.integration.tasks", "idem", *args],
        cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=T, check=False,
    )  # fmt: skip


@pytest.mark.scenario(
    "poison message",
    inject="a body that SIGKILLs its worker on every delivery (lease 1 s, "
    "idem_max_takeovers=2, acks_late + task_reject_on_worker_lost)",
    expect="3 runs, then quarantined: KeyQuarantined, one signal; forget releases it",
)
def test_a_poison_message_is_quarantined_after_the_cap_and_forget_releases_it(
    spawn: Any,
    tasks: ModuleType,
    ledger: redis.Redis,
    celery_env: dict[str, str],
    uid: str,
    fault_report: Any,
) -> None:
    w = spawn()
    key = f"poison-{uid}"
    ledger.set(f"ledger:{uid}:poison", 1)
    res = tasks.cp_poison.apply_async((uid,), idempotency_key=key, queue=w.queue)
    with pytest.raises(KeyQuarantined) as caught:
        res.get(timeout=T, propagate=True)
    assert key in str(caught.value)
    assert "idem forget" in str(caught.value)
    runs = entries(ledger, uid)
    assert len(runs) == 3  # the first run and two takeovers; the third takeover is refused
    assert len({r["fence"] for r in runs}) == 3
    signals = entries(ledger, f"quarantined:{key}")
    assert [s["takeovers"] for s in signals] == [3]
    # Another delivery of the key runs nothing and signals nothing more.
    again = tasks.cp_poison.apply_async((uid,), idempotency_key=key, queue=w.queue)
    with pytest.raises(KeyQuarantined):
        again.get(timeout=T)
    assert len(entries(ledger, uid)) == 3
    assert len(entries(ledger, f"quarantined:{key}")) == 1
    # The operator sees it, and forgets it once the cause is fixed.
    listed = celery_idem_cli(celery_env, "list", "--state", "quarantined", "--json")
    assert listed.returncode == 0, listed.stderr
    records = json.loads(listed.stdout)["records"]
    assert [(r["task"], r["takeovers"]) for r in records] == [("t.cp_poison", 3)]
    ledger.delete(f"ledger:{uid}:poison")
    forgot = celery_idem_cli(celery_env, "forget", key, "--task", "t.cp_poison", "--yes")
    assert forgot.returncode == 0, forgot.stderr
    fixed = tasks.cp_poison.apply_async((uid,), idempotency_key=key, queue=w.queue)
    assert fixed.get(timeout=T) == f"{uid} survived"
    fault_report(
        deliveries=len(entries(ledger, uid)) + 1,
        executions=len(entries(ledger, uid)),
        completions=1,
        lost=0,
        duplicate_effects=0,
        notes="quarantined after 3 runs (2 takeovers); released by `celery idem forget`",
    )
