"""``doctor``'s judgement of servers the suite cannot start: old, clustered, managed.

``judge`` is pure; ``test_cli.py`` runs the command on real servers (healthy, evicting,
without persistence, a replica, unreachable). These cover the other findings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from celery_idem.cli.doctor import judge
from celery_idem.store.base import ServerFacts

HEALTHY_INFO = {
    "redis_version": "7.2.4",
    "redis_mode": "standalone",
    "role": "master",
    "connected_slaves": "0",
    "maxmemory": "0",
    "maxmemory_policy": "noeviction",
    "aof_enabled": "1",
    "cluster_enabled": "0",
}
HEALTHY_CONFIG = {
    "maxmemory-policy": "noeviction",
    "appendonly": "yes",
    "appendfsync": "everysec",
    "save": "",
}


def facts(info: dict[str, str] | None = None, **changes: Any) -> ServerFacts:
    values: dict[str, Any] = {
        "kind": "redis",
        "url": "redis://r:6379/0",
        "info": {**HEALTHY_INFO, **(info or {})},
        "config": dict(HEALTHY_CONFIG),
        "server_time": 1000.0,
        "local_time": 1000.0,
        "round_trip": 0.001,
    }
    values.update(changes)
    return ServerFacts(**values)


def by_check(f: ServerFacts, scripts_error: str | None = None) -> dict[str, tuple[str, str]]:
    return {
        x.check: (x.status, x.detail + " | " + x.fix) for x in judge(f, scripts_error=scripts_error)
    }


def test_a_healthy_server_passes_every_check() -> None:
    assert {status for status, _ in by_check(facts()).values()} == {"ok"}


def test_a_server_older_than_6_0_fails_the_version_check() -> None:
    status, text = by_check(facts({"redis_version": "5.0.14"}))["version"]
    assert status == "fail"
    assert "KEEPTTL" in text
    assert by_check(facts({"redis_version": "6.0.0"}))["version"][0] == "ok"


def test_cluster_and_sentinel_nodes_behind_a_plain_url_fail_the_topology_check() -> None:
    status, text = by_check(facts({"redis_mode": "cluster", "cluster_enabled": "1"}))["topology"]
    assert (status, "MOVED" in text, "redis+cluster://" in text) == ("fail", True, True)
    status, text = by_check(facts({"redis_mode": "sentinel"}))["topology"]
    assert (status, "sentinel://" in text) == ("fail", True)


def test_cluster_and_sentinel_reached_as_such_pass_the_topology_check() -> None:
    cluster_info = {"redis_mode": "cluster", "cluster_enabled": "1"}
    status, text = by_check(facts(cluster_info, topology="cluster"))["topology"]
    assert (status, "Redis Cluster" in text) == ("ok", True)
    status, text = by_check(facts({"connected_slaves": "1"}, topology="sentinel"))["topology"]
    assert (status, "Sentinel-managed primary" in text, "idem_min_replicas" in text) == (
        "ok",
        True,
        True,
    )


def test_a_primary_with_replicas_passes_and_mentions_asynchronous_replication() -> None:
    status, text = by_check(facts({"connected_slaves": "2"}))["topology"]
    assert status == "ok"
    assert "2 replica(s)" in text
    assert "asynchronous" in text


def test_config_refused_falls_back_to_info_for_eviction_and_aof() -> None:
    refused = dict.fromkeys(HEALTHY_CONFIG)
    found = by_check(facts(config=refused))
    assert found["eviction"][0] == "ok"  # INFO's maxmemory_policy
    assert found["persistence"][0] == "ok"  # INFO's aof_enabled
    info = {k: v for k, v in HEALTHY_INFO.items() if k not in ("maxmemory_policy", "aof_enabled")}
    blind = by_check(dataclasses.replace(facts(), info=info, config=refused))
    assert blind["eviction"][0] == "warn"
    assert blind["persistence"][0] == "warn"


def test_rdb_only_and_fsync_no_are_warnings() -> None:
    rdb = facts(
        {"aof_enabled": "0"}, config={**HEALTHY_CONFIG, "appendonly": "no", "save": "3600 1"}
    )
    status, text = by_check(rdb)["persistence"]
    assert (status, "RDB snapshots only" in text) == ("warn", True)
    lazy = facts(config={**HEALTHY_CONFIG, "appendfsync": "no"})
    assert by_check(lazy)["persistence"][0] == "warn"


def test_a_clock_offset_over_a_second_is_a_warning() -> None:
    assert by_check(facts(server_time=1000.5))["clock"][0] == "ok"
    status, text = by_check(facts(server_time=1003.0))["clock"]
    assert status == "warn"
    assert "3.000 s ahead" in text
    assert "NTP" in text


def test_a_script_failure_fails_and_memory_store_fails_alone() -> None:
    status, text = by_check(facts(), scripts_error="NOPERM")["scripts"]
    assert (status, "NOPERM" in text) == ("fail", True)
    memory = judge(ServerFacts(kind="memory", url="memory://"), scripts_error=None)
    assert [(f.check, f.status) for f in memory] == [("store", "fail")]
