"""``celery idem`` on Cluster and Sentinel: list and stats see every node, doctor accepts both.

The CLI runs as a subprocess (``python -m celery_idem -A tests.cli.app``) with
``IDEM_CLI_STORE`` set to the deployment's URL, as an operator would run it. Each test
writes records of ``cli.add`` only, a task nothing else runs on the session's shared
deployments, so listing that task sees exactly this test's records.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import Any

import pytest

from celery_idem.keys import storage_key
from celery_idem.store import ClaimRequest, CompleteRequest, RecordKind, Stored
from celery_idem.store.redis import RedisStore

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULT = Stored(RecordKind.RESULT, b"3", "j")

TOPOLOGIES = [
    pytest.param("cluster_store_url", id="cluster", marks=pytest.mark.cluster),
    pytest.param("sentinel_store_url", id="sentinel", marks=pytest.mark.sentinel),
]


def run(url: str, *args: str, code: int = 0) -> Any:
    env = {
        **os.environ,
        "IDEM_CLI_STORE": url,
        "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
    }
    cmd = [sys.executable, "-m", "celery_idem", "-A", "tests.cli.app", *args, "--json"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    return json.loads(done.stdout)


@pytest.mark.parametrize("url_fixture", TOPOLOGIES)
def test_list_stats_and_forget_cover_every_node(
    url_fixture: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(url_fixture)
    prefix, tag = "idem", uuid.uuid4().hex[:6]
    store = RedisStore.from_url(url)
    keys = set()
    for i in range(40):  # on Cluster, 40 keys land on all three masters
        key = storage_key(prefix, "cli.add", f"{tag}-{i}")
        out = store.claim(
            ClaimRequest(key, token="t", task_id=f"id-{i}", fingerprint="", lease=60, ttl=600)
        )
        assert store.complete(
            CompleteRequest(
                key, token="t", fence=out.fence, task_id=f"id-{i}", stored=RESULT, ttl=600
            )
        )
        keys.add(key)
    listed = run(url, "list", "--task", "cli.add", "--limit", "0", "--scan-count", "10")
    assert {r["storage_key"] for r in listed["records"]} == keys
    stats = run(url, "stats", "--task", "cli.add")
    assert stats["records"] == 40
    assert stats["by_task"]["cli.add"]["result"] == 40
    assert stats["memory"]["sampled"] > 0  # MEMORY USAGE reached the keys' own nodes
    forgotten = run(url, "forget", f"{tag}-7", "--task", "cli.add", "--yes")
    assert forgotten["forgotten"] is True
    assert store.read(storage_key(prefix, "cli.add", f"{tag}-7")) is None


@pytest.mark.parametrize("url_fixture", TOPOLOGIES)
def test_doctor_accepts_the_topology(url_fixture: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue(url_fixture)
    report = run(url, "doctor")  # no persistence: a warning, not a failure
    findings = {f["check"]: f for f in report["findings"]}
    assert findings["topology"]["status"] == "ok", findings["topology"]
    expected = "Redis Cluster" if url.startswith("redis+cluster") else "Sentinel-managed primary"
    assert expected in findings["topology"]["detail"]
    assert findings["scripts"]["status"] == "ok"
