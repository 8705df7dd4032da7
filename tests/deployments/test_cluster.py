"""Redis Cluster specifics: records spread over every slot owner, resharding, WAIT per node.

The contract suite and the worker tests already run on the session's 3-master cluster;
these cover what only a cluster has: a record's slot moving to another node while the
store's client still has the old slot map (MOVED), and ``idem_min_replicas`` on a
cluster with and without replicas.
"""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from celery import Celery

from celery_idem import IdempotencyConfigError, IdempotentTask, ReplicasNotReached, StoreUnavailable
from celery_idem.config import resolve_settings
from celery_idem.store import (
    ClaimRequest,
    ClaimState,
    CompleteRequest,
    RecordKind,
    RecordState,
    Stored,
    StoredRecord,
)
from celery_idem.store.connect import client_for
from celery_idem.store.redis import RedisStore
from celery_idem.task import invalidate_settings
from devtools.processes import free_port, wait_for
from devtools.redis_server import RedisServer
from devtools.topologies import RedisCluster
from tests.integration.conftest import Worker, ledger_count

pytestmark = pytest.mark.cluster

RESULT = Stored(RecordKind.RESULT, b'"ok"', "j")


@pytest.fixture(scope="module")
def replicated_cluster() -> Iterator[RedisCluster]:
    """3 masters with one replica each: WAIT has someone to wait for."""
    with RedisCluster(replicas_per_master=1) as cluster:
        yield cluster


def cluster_url(cluster: RedisCluster) -> str:
    return "redis+cluster://" + cluster.url().partition("://")[2]


def run_once(store: RedisStore, key: str) -> None:
    first = store.claim(
        ClaimRequest(key, token="a", task_id="id-a", fingerprint="fp", lease=30, ttl=60)
    )
    assert first.state is ClaimState.CLAIMED
    assert store.complete(
        CompleteRequest(key, token="a", fence=first.fence, task_id="id-a", stored=RESULT, ttl=60)
    )
    again = store.claim(
        ClaimRequest(key, token="b", task_id="id-b", fingerprint="fp", lease=30, ttl=60)
    )
    assert (again.state, again.stored) == (ClaimState.COMPLETED, RESULT)


def test_records_spread_over_every_master(
    cluster_store_url: str, redis_cluster: RedisCluster
) -> None:
    store = RedisStore.from_url(cluster_store_url)
    prefix = f"idem:spread-{uuid.uuid4().hex[:6]}"
    keys = [f"{prefix}:{i}" for i in range(30)]
    for key in keys:
        run_once(store, key)
    owners = {redis_cluster.node_for_key(key).port for key in keys}
    assert owners == {node.port for node in redis_cluster.masters}
    for key in keys:  # each record is on the node owning its slot
        assert redis_cluster.node_for_key(key).client().exists(key) == 1


@contextlib.contextmanager
def migrating(cluster: RedisCluster, key: str) -> Iterator[tuple[RedisServer, RedisServer]]:
    """Hold ``key``'s slot half-way to another master (what a reshard does), then finish.

    Yields the source and the target; on exit every master is told the target owns it.
    """
    source = cluster.node_for_key(key)
    target = next(node for node in cluster.masters if node.port != source.port)
    src, dst = source.client(), target.client()
    slot = int(src.execute_command("CLUSTER", "KEYSLOT", key))
    src_id, dst_id = src.execute_command("CLUSTER", "MYID"), dst.execute_command("CLUSTER", "MYID")
    dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
    src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
    try:
        yield source, target
    finally:
        for node in cluster.masters:
            node.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)


def migrate_slot_of(cluster: RedisCluster, key: str) -> None:
    """Move ``key``'s slot, with the key, to another master."""
    with migrating(cluster, key) as (source, target):
        source.client().execute_command(
            "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", key
        )
    assert target.client().exists(key) == 1


@pytest.mark.parametrize("min_replicas", [0, 1])
def test_a_record_whose_slot_moved_is_followed_through_moved(
    replicated_cluster: RedisCluster, min_replicas: int
) -> None:
    store = RedisStore.from_url(cluster_url(replicated_cluster), min_replicas=min_replicas)
    key = f"idem:moved-{uuid.uuid4().hex[:8]}"
    first = store.claim(
        ClaimRequest(key, token="a", task_id="id-a", fingerprint="fp", lease=30, ttl=60)
    )
    assert first.state is ClaimState.CLAIMED  # the client's slot map now points at the source
    migrate_slot_of(replicated_cluster, key)
    # The completion goes to the old owner first, gets MOVED, and lands on the new one.
    assert store.complete(
        CompleteRequest(key, token="a", fence=first.fence, task_id="id-a", stored=RESULT, ttl=60)
    )
    again = store.claim(
        ClaimRequest(key, token="b", task_id="id-b", fingerprint="fp", lease=30, ttl=60)
    )
    assert (again.state, again.stored) == (ClaimState.COMPLETED, RESULT)


def test_min_replicas_waits_on_the_node_owning_the_key(replicated_cluster: RedisCluster) -> None:
    store = RedisStore.from_url(cluster_url(replicated_cluster), min_replicas=1)
    for i in range(6):
        run_once(store, f"idem:wait-{uuid.uuid4().hex[:8]}-{i}")


def test_min_replicas_on_a_cluster_without_replicas_refuses_every_claim(
    cluster_store_url: str, redis_cluster: RedisCluster
) -> None:
    store = RedisStore.from_url(cluster_store_url, min_replicas=1)
    store._wait_ms = 100
    key = f"idem:lonely-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ReplicasNotReached, match="0 of idem_min_replicas=1"):
        store.claim(
            ClaimRequest(key, token="a", task_id="id-a", fingerprint="fp", lease=30, ttl=60)
        )
    record = store.read(key)  # released: nothing holds the key
    assert record is not None
    assert record.state == RecordState.FREE.value


def test_a_script_flushed_on_one_node_is_reloaded_there(
    cluster_store_url: str, redis_cluster: RedisCluster
) -> None:
    store = RedisStore.from_url(cluster_store_url)
    key = f"idem:noscript-{uuid.uuid4().hex[:8]}"
    run_once(store, f"{key}-warm")
    node = redis_cluster.node_for_key(key)
    node.client().script_flush()
    assert node.client().script_exists(store.scripts.claim.sha) == [False]
    run_once(store, key)  # NOSCRIPT on that node, answered by loading it there
    assert node.client().script_exists(store.scripts.claim.sha) == [True]


def test_a_worker_warns_at_start_and_runs_nothing_when_replicas_are_missing(
    cluster_store_url: str, start_worker: Any, tasks: ModuleType, ledger: Any, uid: str
) -> None:
    w: Worker = start_worker(
        extra_env={"IDEM_TEST_STORE": cluster_store_url, "IDEM_TEST_MIN_REPLICAS": "1"}
    )
    assert "idem_min_replicas=1 but the primary" in w.log()
    tasks.record.apply_async((uid,), queue=w.queue)
    wait_for(lambda: "ReplicasNotReached" in w.log() or "0 of idem_min_replicas" in w.log(),
             timeout=30, message="the claim refused for want of replicas")  # fmt: skip
    assert "body not run" in w.log()
    assert ledger_count(ledger, uid) == 0


def test_a_cluster_with_no_node_answering_is_a_store_outage_not_a_crash() -> None:
    app = Celery("unreachable", broker="memory://", backend="cache+memory://",
                 set_as_current=False)  # fmt: skip
    app.conf.update(
        task_always_eager=True,
        idem_redis_url=f"redis+cluster://127.0.0.1:{free_port()}/0",
        idem_on_store_error="raise",
    )
    ran: list[int] = []

    @app.task(base=IdempotentTask, shared=False, name="unreachable.add")
    def add(x: int) -> int:
        ran.append(x)
        return x

    with pytest.raises(StoreUnavailable, match="could not be reached") as info:
        add.apply((1,)).get()
    assert info.value.key is not None
    assert ran == []  # nothing ran without a claim
    app.conf.idem_on_store_error = "run"
    invalidate_settings()
    assert add.apply((2,)).get() == 2  # the policy decides, as for any outage


def test_a_slot_being_migrated_is_followed_through_ask_on_the_wait_path(
    replicated_cluster: RedisCluster,
) -> None:
    store = RedisStore.from_url(cluster_url(replicated_cluster), min_replicas=1)
    key = f"idem:ask-{uuid.uuid4().hex[:8]}"
    with migrating(replicated_cluster, key) as (_, target):
        # The key is not on the source: it answers ASK, and the pair goes to the target.
        run_once(store, key)
    assert target.client().exists(key) == 1  # written on the importing node, behind ASKING
    again = store.claim(
        ClaimRequest(key, token="c", task_id="id-c", fingerprint="fp", lease=30, ttl=60)
    )
    assert again.state is ClaimState.COMPLETED


def test_a_cluster_going_down_under_a_store_is_an_outage() -> None:
    with RedisCluster() as cluster:
        store = RedisStore.from_url(cluster_url(cluster))
        run_once(store, f"idem:down-{uuid.uuid4().hex[:8]}")
        cluster.stop()
        key = f"idem:down-{uuid.uuid4().hex[:8]}"
        with pytest.raises(StoreUnavailable, match=key):
            store.claim(
                ClaimRequest(key, token="a", task_id="id-a", fingerprint="", lease=30, ttl=60)
            )
        with pytest.raises(StoreUnavailable):
            store.read(key)


def test_cluster_options_redis_py_would_drop_are_refused() -> None:
    conf = {"idem_redis_url": "redis+cluster://127.0.0.1:1/0",
            "idem_redis_options": {"socket_timout": 3}}  # fmt: skip
    endpoint = resolve_settings(conf).endpoint
    assert endpoint is not None
    with pytest.raises(IdempotencyConfigError, match="socket_timout"):
        client_for(endpoint)


def test_a_primary_failing_over_keeps_replicated_records_and_the_store_follows() -> None:
    with RedisCluster(replicas_per_master=1) as cluster:
        url = cluster_url(cluster)
        plain, durable = RedisStore.from_url(url), RedisStore.from_url(url, min_replicas=1)
        tag = uuid.uuid4().hex[:6]
        kept, later = f"idem:{{{tag}}}:kept", f"idem:{{{tag}}}:later"  # one slot
        run_once(durable, kept)  # WAIT saw the replica take the completed record
        primary = cluster.node_for_key(kept)
        assert primary.pid is not None
        os.kill(primary.pid, signal.SIGKILL)
        primary.stop()

        def answered() -> StoredRecord | None:
            try:
                return plain.read(kept)
            except StoreUnavailable:
                return None  # the cluster has not promoted the replica yet

        record = wait_for(answered, 30, message="the replica promoted")
        # The completed record survived the failover.
        assert record.state == RecordState.RESULT.value
        again = plain.claim(
            ClaimRequest(kept, token="b", task_id="id-b", fingerprint="fp", lease=30, ttl=60)
        )
        assert (again.state, again.stored) == (ClaimState.COMPLETED, RESULT)

        # The WAIT path reaches the new primary too; it has no replica left (its old
        # primary is dead), so a durable claim is refused, not lost or sent to the dead node.
        def refused_by_new_primary() -> bool:
            try:
                durable.claim(
                    ClaimRequest(later, token="c", task_id="id-c", fingerprint="", lease=30, ttl=60)
                )
            except ReplicasNotReached:
                return True
            except StoreUnavailable:
                return False
            raise AssertionError("claimed without a replica to confirm it")

        wait_for(refused_by_new_primary, 30, message="durable claims reach the new primary")
