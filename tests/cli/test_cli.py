"""``celery idem`` / ``python -m celery_idem``: every command against a real Redis.

Each test has a redis-server of its own (``store_server``); the CLI runs as a
subprocess, through both entry points, and each test checks the exit status, the
table for people and the ``--json`` structure.
"""

from __future__ import annotations

import os
import pickle
import re
import time
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from celery_idem.keys import storage_key, task_tag
from celery_idem.store import (
    ClaimRequest,
    CompleteRequest,
    MemoryStore,
    RecordKind,
    ReserveRequest,
    Stored,
)
from celery_idem.store.base import NOT_A_RECORD_FENCE, ForgetResult
from devtools.processes import free_port, wait_for
from devtools.redis_server import RedisServer
from tests.cli.conftest import Cli

VIAS = ["module", "celery"]


def _iso(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# --------------------------------------------------------------------------- entry points


@pytest.mark.parametrize("via", VIAS)
def test_help_lists_every_command_with_exit_statuses(cli: Cli, via: str) -> None:
    done = cli.run("--help", via=via)
    assert done.returncode == 0, done.stderr
    for command in ("key", "inspect", "forget", "list", "stats", "doctor"):
        assert re.search(rf"^\s+{command}\s", done.stdout, re.M), done.stdout
    assert "3 no such" in done.stdout
    inspect_help = cli.run("inspect", "--help", via=via)
    assert inspect_help.returncode == 0
    assert "--storage-key" in inspect_help.stdout
    assert "is never unpickled unless the app accepts pickle" in " ".join(
        inspect_help.stdout.split()
    )


def test_module_entry_point_needs_an_app_it_can_load(cli: Cli) -> None:
    done = cli.run("list", app=None)
    assert done.returncode == 2
    assert "Missing option '-A' / '--app'" in done.stderr
    bad = cli.run("list", app="tests.cli.missing")
    assert bad.returncode == 2
    assert "cannot load the Celery app 'tests.cli.missing'" in bad.stderr


# --------------------------------------------------------------------------- inspect


@pytest.mark.parametrize("via", VIAS)
def test_inspect_shows_a_completed_record_from_an_eager_run(
    cli: Cli, cli_app: ModuleType, via: str
) -> None:
    run = cli_app.add.apply((1, 2), idempotency_key="order-1")
    assert run.get() == 3
    view = cli.json("inspect", "order-1", "--task", "cli.add", via=via)
    assert view["task"] == "cli.add"
    assert view["key"] == "order-1"
    assert view["storage_key"] == storage_key("idem", "cli.add", "order-1")
    assert (view["state"], view["substate"], view["task_id"]) == ("completed", "result", run.id)
    assert view["result"] == {
        "kind": "result",
        "content_type": "application/json",
        "bytes": 1,
        "decoded": True,
        "preview": "3",
    }
    assert 86000 < view["expires_in"] <= 86400  # idem_ttl, counted from the completion
    assert view["lease_left"] is None
    assert abs(_iso(view["claimed_at"]) - time.time()) < 30
    assert abs(_iso(view["claimed_at"]) - view["fence"] / 1000) < 0.001
    # Stored just after the claim (an eager run): expiry minus idem_ttl says when.
    assert 0 <= _iso(view["stored_at"]) - _iso(view["claimed_at"]) < 30

    table = cli.run("inspect", "order-1", "--task", "cli.add", via=via)
    assert table.returncode == 0, table.stderr
    lines = dict(re.findall(r"^([a-z ]+):\s+(.*)$", table.stdout, re.M))
    assert lines["state"] == "completed (result)"
    assert lines["task id"] == run.id
    assert lines["preview"] == "3"
    assert lines["stored at"].endswith("(expiry minus idem_ttl)")
    assert lines["expires in"].startswith("23h")


def test_inspect_shows_a_running_record_with_its_lease(cli: Cli) -> None:
    stored = cli.running("cli.send", "7:welcome", lease=60)
    view = cli.json("inspect", "7:welcome", "--task", "cli.send")
    assert view["storage_key"] == stored
    assert (view["state"], view["substate"], view["task_id"]) == (
        "in_progress",
        "running",
        "id-7:welcome",
    )
    assert 50 < view["lease_left"] <= 60
    assert view["result"] is None
    table = cli.run("inspect", "7:welcome", "--task", "cli.send")
    assert re.search(r"^lease left:\s+\d+\.\ds$", table.stdout, re.M), table.stdout


def test_inspect_of_a_missing_record_exits_3(cli: Cli) -> None:
    done = cli.run("inspect", "nope", "--task", "cli.add")
    assert done.returncode == 3
    assert "no record for key 'nope' of task 'cli.add'" in done.stderr
    view = cli.json("inspect", "nope", "--task", "cli.add", code=3)
    assert view["state"] == "absent"


def test_inspect_never_unpickles_unless_the_app_accepts_pickle(cli: Cli, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return os.mkdir, (str(marker),)

    cli.completed("cli.add", "pickled", payload=pickle.dumps(Payload()), codec="p")
    view = cli.json("inspect", "pickled", "--task", "cli.add")  # the app accepts json only
    assert view["result"]["decoded"] is False
    assert "application/x-python-serialize" in view["result"]["note"]
    assert not marker.exists()
    # The same payload is live: an app that accepts pickle does unpickle it.
    cli.json("inspect", "pickled", "--task", "cli.add", env={"IDEM_CLI_ACCEPT": "json,pickle"})
    assert marker.is_dir()


def test_inspect_by_storage_key_names_the_task_from_its_tag(cli: Cli) -> None:
    stored = cli.completed("cli.send", "1:bye", payload=b'"sent bye to 1"')
    view = cli.json("inspect", stored, "--storage-key")
    assert (view["task"], view["key"], view["state"]) == ("cli.send", None, "completed")
    assert view["result"]["preview"] == "'sent bye to 1'"


def test_inspect_of_an_unknown_task_suggests_the_closest_names(cli: Cli) -> None:
    done = cli.run("inspect", "k", "--task", "cli.ad")
    assert done.returncode == 3  # maybe another service's task: looked up, not refused
    assert (
        "note: task 'cli.ad' is not registered in app 'tests.cli.app' (did you mean "
        "'cli.add'?); using the app's settings"
    ) in done.stderr  # not every task of the module 'cli'
    # The last dotted part alone, and a case slip, find the task too.
    assert "(did you mean 'cli.send'?)" in cli.run("inspect", "k", "--task", "send").stderr
    assert "(did you mean 'cli.archive'?)" in cli.run("list", "--task", "CLI.Archive").stderr
    # A former name kept as a task's idem_scope is no typo: the note says whose it is.
    former = cli.run("inspect", "k", "--task", "cli.send_email")
    assert (
        "not registered in app 'tests.cli.app' (it is the idem_scope of "
        "'cli.mail.send_email': the same records); using the app's settings"
    ) in former.stderr
    far = cli.run("inspect", "k", "--task", "billing.charge_card")
    assert "not registered in app 'tests.cli.app'; using" in far.stderr  # nothing close


def test_inspect_without_task_is_a_usage_error(cli: Cli) -> None:
    done = cli.run("inspect", "order-1")
    assert done.returncode == 2
    assert "--task NAME is required" in done.stderr
    plain = cli.run("inspect", "k", "--task", "cli.plain")
    assert plain.returncode == 2
    assert "not an IdempotentTask" in plain.stderr


# --------------------------------------------------------------------------- forget


def test_forget_with_yes_deletes_the_record(cli: Cli, cli_app: ModuleType) -> None:
    cli_app.add.apply((1, 2), idempotency_key="order-1")
    stored = cli.key("cli.add", "order-1")
    done = cli.run("forget", "order-1", "--task", "cli.add", "--yes")
    assert done.returncode == 0, done.stderr
    assert f"Forgotten: {stored}" in done.stdout
    assert cli.store.read(stored) is None
    # The key runs its body again: a new task id completes it.
    again = cli_app.add.apply((1, 2), idempotency_key="order-1")
    record = cli.store.read(stored)
    assert record is not None
    assert record.task_id == again.id


def test_forget_answered_no_on_stdin_keeps_the_record(cli: Cli) -> None:
    stored = cli.completed("cli.add", "k")
    done = cli.run("forget", "k", "--task", "cli.add", input="n\n")
    assert done.returncode == 1
    assert "Forget this record? [y/N]" in done.stderr
    assert "state:" in done.stdout  # the record was shown before the question
    assert "not confirmed: nothing deleted" in done.stderr
    assert cli.store.read(stored) is not None


def test_forget_answered_yes_on_stdin_deletes_the_record(cli: Cli) -> None:
    stored = cli.completed("cli.add", "k")
    result = cli.json("forget", "k", "--task", "cli.add", input="y\n")
    assert result["forgotten"] is True
    assert result["record"]["storage_key"] == stored
    assert cli.store.read(stored) is None


def test_forget_refuses_a_record_in_progress_unless_forced(cli: Cli) -> None:
    stored = cli.running("cli.add", "busy")
    refused = cli.run("forget", "busy", "--task", "cli.add", "--yes")
    assert refused.returncode == 1
    assert "in_progress (running)" in refused.stderr
    assert "--force" in refused.stderr
    assert cli.store.read(stored) is not None
    forced = cli.run("forget", "busy", "--task", "cli.add", "--yes", "--force", via="celery")
    assert forced.returncode == 0, forced.stderr
    assert cli.store.read(stored) is None


def test_forget_of_a_missing_record_exits_3(cli: Cli) -> None:
    done = cli.run("forget", "nope", "--task", "cli.add", "--yes")
    assert done.returncode == 3
    assert "no record" in done.stderr


def test_forget_force_deletes_a_key_under_the_prefix_that_is_not_a_record(cli: Cli) -> None:
    client = cli.store.client
    garbage = cli.key("cli.add", "garbage")  # a string that does not decode
    client.set(garbage, "not a record", ex=600)
    other_type = f"idem:{task_tag('gone.task')}:{'B' * 22}"  # a hash, WRONGTYPE for GET
    client.hset(other_type, "field", "value")

    for stored in (garbage, other_type):
        seen = cli.run("inspect", stored, "--storage-key")
        assert seen.returncode == 1
        assert "does not hold a celery-idem record (another type, or a string" in seen.stderr
        assert "WRONGTYPE" not in seen.stderr
        as_json = cli.json("inspect", stored, "--storage-key", code=1)
        assert (as_json["storage_key"], as_json["state"]) == (stored, "not_a_record")
        kept = cli.run("forget", stored, "--storage-key", "--yes")
        assert kept.returncode == 1
        assert "kept; --force deletes it" in kept.stderr
        assert client.exists(stored)

    no = cli.run("forget", "garbage", "--task", "cli.add", "--force", input="n\n")
    assert no.returncode == 1
    assert re.search(r"^state:\s+not_a_record", no.stdout, re.M), no.stdout
    assert re.search(r"^expires in:\s+(9|10)m", no.stdout, re.M), no.stdout
    assert "Delete this key? [y/N]" in no.stderr
    assert client.exists(garbage)
    yes = cli.run("forget", "garbage", "--task", "cli.add", "--force", input="y\n")
    assert yes.returncode == 0, yes.stderr
    assert f"Deleted: {garbage} (not a celery-idem record)." in yes.stdout
    assert not client.exists(garbage)

    forced = cli.json("forget", other_type, "--storage-key", "--force", "--yes", via="celery")
    assert forced["forgotten"] is True
    record = forced["record"]
    assert (record["storage_key"], record["task"], record["state"]) == (
        other_type,
        f"?{task_tag('gone.task')}",
        "not_a_record",
    )
    assert not client.exists(other_type)


def test_forget_never_deletes_a_key_outside_the_prefix(cli: Cli, cli_app: ModuleType) -> None:
    client = cli.store.client
    archived = f"{cli_app.ARCHIVE_PREFIX}:{task_tag('cli.archive')}:{'C' * 22}"
    outside = ["unrelated:key", "idem:short", archived]
    for stored in outside:
        client.set(stored, "someone else's")
        done = cli.run("forget", stored, "--storage-key", "--force", "--yes")
        assert done.returncode == 1, (stored, done.stderr)
        assert "is not a storage key under the prefix 'idem'" in done.stderr
        assert "never deletes a key outside its prefix" in done.stderr
    assert all(client.get(stored) == b"someone else's" for stored in outside)
    # Under cli.archive's own prefix, with its --task, the key is ours to delete.
    done = cli.run("forget", archived, "--storage-key", "--task", "cli.archive", "--force", "-y")
    assert done.returncode == 0, done.stderr
    assert not client.exists(archived)


def test_a_forced_forget_of_a_non_record_keeps_a_record_written_since(cli: Cli) -> None:
    # What `forget --force` sends after showing a non-record: a record that took the
    # key's place in between (a claim) is kept, on Redis and in memory alike.
    stored = cli.running("cli.add", "claimed-meanwhile")
    memory = MemoryStore()
    memory.claim(ClaimRequest(stored, token="t", task_id="i", fingerprint="", lease=60, ttl=60))
    for store in (cli.store, memory):
        outcome = store.forget_if(stored, fence=NOT_A_RECORD_FENCE, force=True)
        assert outcome is ForgetResult.CHANGED
        assert store.read(stored) is not None


# --------------------------------------------------------------------------- list


def test_list_pages_through_scan_cursors_and_stops_at_the_limit(cli: Cli) -> None:
    added = {cli.completed("cli.add", f"k{i}") for i in range(300)}
    running = {cli.running("cli.send", f"{i}:hi") for i in range(3)}
    cli.store.client.set("unrelated:key", "x")  # outside the prefix: never listed

    page = cli.json("list", "--task", "cli.add", "--limit", "250", "--scan-count", "50")
    keys = [r["storage_key"] for r in page["records"]]
    assert len(keys) == len(set(keys)) == 250
    assert set(keys) <= added
    assert page["truncated"] is True
    assert page["scan_calls"] > 1  # more than one SCAN cursor was followed
    assert {(r["task"], r["state"]) for r in page["records"]} == {("cli.add", "completed")}

    everything = cli.json("list", "--limit", "0", "--scan-count", "50")
    assert {r["storage_key"] for r in everything["records"]} == added | running
    assert len(everything["records"]) == 303
    assert everything["truncated"] is False
    assert everything["scan_calls"] > 1
    fences = [r["fence"] for r in everything["records"]]
    assert fences == sorted(fences)  # oldest claim first

    limited = cli.json("list", "--limit", "120")
    assert len(limited["records"]) == 120
    assert limited["truncated"] is True


@pytest.mark.parametrize("via", VIAS)
def test_list_filters_by_state_and_prints_a_table(cli: Cli, via: str) -> None:
    for i in range(5):
        cli.completed("cli.add", f"k{i}")
    running = sorted(cli.running("cli.send", f"{i}:hi") for i in range(3))
    in_progress = cli.json("list", "--state", "in_progress", via=via)
    assert sorted(r["storage_key"] for r in in_progress["records"]) == running
    assert {r["substate"] for r in in_progress["records"]} == {"running"}

    table = cli.run("list", "--state", "in_progress", via=via)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["STORAGE", "KEY", "TASK"]
    rows = [line for line in lines[2:] if line.startswith("idem:")]
    assert sorted(row.split()[0] for row in rows) == running
    assert all("cli.send" in row and "in_progress (running)" in row for row in rows)
    assert re.search(r"^3 record\(s\) in redis://", table.stdout, re.M)


def test_list_of_a_task_with_its_own_prefix_needs_task(cli: Cli, cli_app: ModuleType) -> None:
    cli_app.archive.apply(("a",))
    cli_app.add.apply((1, 1))
    default = cli.json("list")
    assert [r["task"] for r in default["records"]] == ["cli.add"]
    note = cli.run("list")
    assert "tasks cli.archive keep their records in another store" in note.stderr
    archived = cli.json("list", "--task", "cli.archive")
    assert [r["task"] for r in archived["records"]] == ["cli.archive"]
    assert archived["records"][0]["storage_key"].startswith(cli_app.ARCHIVE_PREFIX + ":")


def test_a_store_that_is_down_fails_cleanly(cli: Cli) -> None:
    down = {"IDEM_CLI_STORE": f"redis://127.0.0.1:{free_port()}/0"}
    for args in (["list"], ["stats"], ["inspect", "k", "--task", "cli.add"]):
        done = cli.run(*args, env=down)
        assert done.returncode == 1, (args, done.stderr)
        assert "Error: the idempotency store at redis://127.0.0.1:" in done.stderr
        assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------- stats


def _wait_for_next_server_ms(cli: Cli, fence: int) -> None:
    """Let the server's clock pass ``fence``, so the next claim gets a later fence."""

    def server_ms() -> int:
        seconds, micros = cli.store.client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    wait_for(lambda: server_ms() > fence, timeout=5, message="server clock")


@pytest.mark.parametrize("via", VIAS)
def test_stats_counts_by_task_and_state(cli: Cli, cli_app: ModuleType, via: str) -> None:
    for i in range(4):
        cli_app.add.apply((i, i))
    cli_app.send.apply((1, "hello"))
    oldest = cli.running("cli.send", "1:old")
    record = cli.store.read(oldest)
    assert record is not None
    _wait_for_next_server_ms(cli, record.fence)
    cli.running("cli.send", "2:new")
    parked = cli.key("cli.add", "parked")
    cli.store.claim(
        ClaimRequest(parked, token="tp", task_id="id-p", fingerprint="", lease=60, ttl=60)
    )
    assert cli.store.park(parked, token="tp", hold=60)
    stray = f"idem:{task_tag('gone.task')}:{'A' * 22}"  # a task this app does not have
    cli.store.client.set(stray, "not a record")

    stats = cli.json("stats", via=via)
    assert stats["records"] == 9
    add, send = stats["by_task"]["cli.add"], stats["by_task"]["cli.send"]
    assert (add["result"], add["parked"], add["total"]) == (4, 1, 5)
    assert (send["result"], send["running"], send["total"]) == (1, 2, 3)
    assert stats["by_task"][f"?{task_tag('gone.task')}"]["not_a_record"] == 1
    assert stats["oldest_in_progress"]["storage_key"] == oldest
    assert stats["oldest_in_progress"]["substate"] == "running"
    memory = stats["memory"]
    assert memory["sampled"] == 9
    assert 50 < memory["mean_bytes"] < 400
    assert memory["estimated_total_bytes"] == round(memory["mean_bytes"] * 9)
    assert stats["other_stores"] == ["cli.archive"]

    only_send = cli.json("stats", "--task", "cli.send", "--sample", "0", via=via)
    assert list(only_send["by_task"]) == ["cli.send"]
    assert only_send["memory"] is None

    table = cli.run("stats", via=via)
    assert table.returncode == 0, table.stderr
    header, _, *rows = table.stdout.splitlines()
    assert header.split()[:2] == ["TASK", "RUNNING"]
    counts = {row.split()[0]: row.split()[-1] for row in rows if row.startswith(("cli.", "(all)"))}
    assert counts == {"cli.add": "5", "cli.send": "3", "(all)": "9"}
    assert re.search(r"^oldest in progress:\s+" + re.escape(oldest), table.stdout, re.M)


def test_a_quarantined_key_is_counted_listed_inspected_and_released_by_forget(
    cli: Cli,
) -> None:
    # Two attempts that stopped renewing (their leases ran out): the claim that would be
    # the second takeover, past idem_max_takeovers=1, quarantines the key.
    stored = cli.key("cli.send", "9:poison")

    def claim(token: str) -> Any:
        return cli.store.claim(ClaimRequest(
            stored, token=token, task_id="id-p", fingerprint="", lease=0.05, ttl=3600,
            max_takeovers=1,
        ))  # fmt: skip

    def lease_ran_out() -> bool:
        record = cli.store.read(stored)
        return record is not None and (record.lease_left or 0) <= 0

    claim("t1")
    wait_for(lease_ran_out, timeout=10, message="first lease")
    assert claim("t2").took_over
    wait_for(lease_ran_out, timeout=10, message="second lease")
    assert claim("t3").quarantined_now

    stats = cli.json("stats", "--sample", "0")
    assert stats["by_task"]["cli.send"]["quarantined"] == 1
    listed = cli.json("list", "--state", "quarantined")
    assert [(r["storage_key"], r["takeovers"]) for r in listed["records"]] == [(stored, 2)]
    view = cli.json("inspect", "9:poison", "--task", "cli.send")
    assert (view["state"], view["takeovers"], view["expires_in"]) == ("quarantined", 2, None)
    table = cli.run("inspect", "9:poison", "--task", "cli.send")
    assert re.search(r"^takeovers:\s+2$", table.stdout, re.M), table.stdout
    forgot = cli.run("forget", "9:poison", "--task", "cli.send", "--yes")  # no --force needed
    assert forgot.returncode == 0, forgot.stderr
    assert cli.store.read(stored) is None


def test_a_reserved_key_is_queued_for_every_command_and_forget_needs_force(cli: Cli) -> None:
    # What idem_dedupe_on_publish leaves between the publish and the worker's claim.
    stored = cli.key("cli.send", "8:queued")
    reserved = cli.store.reserve(ReserveRequest(stored, task_id="id-q", fingerprint="fp", hold=60))
    assert reserved is not None
    view = cli.json("inspect", "8:queued", "--task", "cli.send")
    assert (view["state"], view["substate"], view["task_id"]) == ("queued", "reserved", "id-q")
    assert 50 < view["lease_left"] <= 60
    assert view["claimed_at"] is None
    table = cli.run("inspect", "8:queued", "--task", "cli.send")
    assert re.search(r"^reservation left:\s+\d+\.\ds$", table.stdout, re.M), table.stdout
    assert re.search(r"^claimed at:\s+not yet", table.stdout, re.M), table.stdout
    listed = cli.json("list", "--state", "queued")
    assert [(r["storage_key"], r["substate"]) for r in listed["records"]] == [(stored, "reserved")]
    stats = cli.json("stats", "--sample", "0")
    assert stats["by_task"]["cli.send"]["reserved"] == 1
    assert "QUEUED" in cli.run("stats", "--sample", "0").stdout
    refused = cli.run("forget", "8:queued", "--task", "cli.send", "--yes")
    assert refused.returncode == 1
    assert "queued (reserved)" in refused.stderr
    assert "still queued" in refused.stderr
    assert cli.store.read(stored) is not None
    forced = cli.run("forget", "8:queued", "--task", "cli.send", "--yes", "--force")
    assert forced.returncode == 0, forced.stderr
    assert cli.store.read(stored) is None


# --------------------------------------------------------------------------- doctor


def _findings(report: Any) -> dict[str, dict[str, str]]:
    return {f["check"]: f for f in report["findings"]}


@pytest.mark.parametrize("via", VIAS)
def test_doctor_passes_a_healthy_store(cli: Cli, via: str) -> None:
    with RedisServer(extra_args=["--appendonly", "yes"]) as healthy:
        env = {"IDEM_CLI_STORE": healthy.url(0)}
        report = cli.json("doctor", via=via, env=env)
        findings = _findings(report)
        assert report["ok"] is True
        assert set(findings) == {
            "reachable",
            "version",
            "scripts",
            "eviction",
            "persistence",
            "topology",
            "clock",
        }
        assert {f["status"] for f in findings.values()} == {"ok"}, findings
        table = cli.run("doctor", "--strict", via=via, env=env)
        assert table.returncode == 0, table.stdout
        assert "0 failure(s), 0 warning(s)." in table.stdout


def test_doctor_fails_an_evicting_store_and_says_how_to_fix_it(cli: Cli) -> None:
    cli.server.client().config_set("maxmemory-policy", "allkeys-lru")
    cli.server.client().config_set("maxmemory", "100mb")
    report = cli.json("doctor", code=1)
    eviction = _findings(report)["eviction"]
    assert eviction["status"] == "fail"
    assert "allkeys-lru" in eviction["detail"]
    assert "CONFIG SET maxmemory-policy noeviction" in eviction["fix"]
    assert report["ok"] is False
    table = cli.run("doctor")
    assert table.returncode == 1
    assert re.search(r"^FAIL\s+eviction\s+maxmemory-policy is allkeys-lru", table.stdout, re.M)
    assert re.search(r"^\s+fix: CONFIG SET maxmemory-policy noeviction", table.stdout, re.M)

    # Without a memory limit nothing is evicted yet: a warning, failing only --strict.
    cli.server.client().config_set("maxmemory", "0")
    warned = cli.json("doctor")
    assert _findings(warned)["eviction"]["status"] == "warn"
    assert cli.run("doctor", "--strict").returncode == 1


def test_doctor_warns_about_a_store_without_persistence(cli: Cli) -> None:
    report = cli.json("doctor")  # the suite's servers run with save "" and appendonly no
    persistence = _findings(report)["persistence"]
    assert persistence["status"] == "warn"
    assert "a restart loses every record" in persistence["detail"]
    assert "appendonly yes" in persistence["fix"]
    assert report["ok"] is True


def test_doctor_reports_an_unreachable_store(cli: Cli) -> None:
    env = {"IDEM_CLI_STORE": f"redis://127.0.0.1:{free_port()}/0"}
    report = cli.json("doctor", env=env, code=1)
    assert [(f["check"], f["status"]) for f in report["findings"]] == [("reachable", "fail")]
    assert "idem_redis_url" in report["findings"][0]["fix"]


def test_doctor_fails_a_replica(cli: Cli) -> None:
    with RedisServer(extra_args=["--replicaof", "127.0.0.1", str(cli.server.port)]) as replica:
        report = cli.json("doctor", env={"IDEM_CLI_STORE": replica.url(0)}, code=1)
    topology = _findings(report)["topology"]
    assert topology["status"] == "fail"
    assert "role slave" in topology["detail"]
    assert "primary" in topology["fix"]


def test_stored_payload_kinds_show_their_reason(cli: Cli) -> None:
    stored = cli.key("cli.add", "nr")
    cli.store.claim(ClaimRequest(stored, token="t", task_id="i", fingerprint="", lease=60, ttl=60))
    reason = Stored(RecordKind.NO_RESULT, b'{"reason": "too big"}', "j")
    out = cli.store.read(stored)
    assert out is not None
    cli.store.complete(
        CompleteRequest(stored, token="t", fence=out.fence, task_id="i", stored=reason, ttl=60)
    )
    view = cli.json("inspect", "nr", "--task", "cli.add")
    assert (view["state"], view["substate"]) == ("completed", "no_result")
    assert view["result"]["reason"] == "too big"


# --------------------------------------------------------------------------- idem_scope


def test_a_renamed_task_finds_the_records_of_its_former_name(cli: Cli, cli_app: ModuleType) -> None:
    """``cli.mail.send_email`` has ``idem_scope="cli.send_email"``, its former name."""
    old = cli.completed("cli.send_email", "welcome-7", payload=b'"mail to 7"')
    assert cli_app.send_email.apply((7,), idempotency_key="welcome-7").get() == "mail to 7"

    view = cli.json("inspect", "welcome-7", "--task", "cli.mail.send_email")
    assert (view["storage_key"], view["task"], view["state"]) == (
        old,
        "cli.mail.send_email",
        "completed",
    )
    # The former name, no longer registered, still names the same records.
    assert cli.json("inspect", "welcome-7", "--task", "cli.send_email")["storage_key"] == old

    listed = cli.json("list", "--task", "cli.mail.send_email")
    assert [r["storage_key"] for r in listed["records"]] == [old]
    assert cli.json("list", "--task", "cli.add")["records"] == []
    by_tag = cli.json("list")
    assert {r["storage_key"]: r["task"] for r in by_tag["records"]} == {old: "cli.mail.send_email"}
    stats = cli.json("stats", "--task", "cli.mail.send_email", "--sample", "0")
    assert stats["by_task"]["cli.mail.send_email"]["result"] == 1

    done = cli.run("forget", "welcome-7", "--task", "cli.mail.send_email", "--yes")
    assert done.returncode == 0, done.stderr
    assert cli.store.read(old) is None
