"""``idem_min_replicas`` keeps the round-trip budget: one for a duplicate, two for a first run.

Counted with the ``round_trips`` fixture (see ``conftest.py``), on the session's
Sentinel deployment (one replica) and on a Cluster with a replica per master.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from celery_idem.store import ClaimRequest, ClaimState, CompleteRequest, RecordKind, Stored
from celery_idem.store.redis import RedisStore
from devtools.topologies import RedisCluster

RESULT = Stored(RecordKind.RESULT, b'"ok"', "j")


@pytest.fixture(scope="module")
def replicated_cluster_url() -> Iterator[str]:
    with RedisCluster(replicas_per_master=1) as cluster:
        yield "redis+cluster://" + cluster.url().partition("://")[2]


@pytest.mark.parametrize(
    "url_fixture",
    [
        pytest.param("sentinel_store_url", id="sentinel", marks=pytest.mark.sentinel),
        pytest.param("replicated_cluster_url", id="cluster", marks=pytest.mark.cluster),
    ],
)
def test_wait_rides_in_the_same_round_trip_as_claim_and_complete(
    url_fixture: str, request: pytest.FixtureRequest, round_trips: Callable[[], int]
) -> None:
    store = RedisStore.from_url(request.getfixturevalue(url_fixture), min_replicas=1)
    # One hash slot for both keys, so on Cluster the warm-up connects to the same node.
    slot = uuid.uuid4().hex[:8]
    warm = f"idem:{{{slot}}}:warm"  # connect, load both scripts
    out = store.claim(ClaimRequest(warm, token="w", task_id="w", fingerprint="", lease=30, ttl=60))
    store.complete(
        CompleteRequest(warm, token="w", fence=out.fence, task_id="w", stored=RESULT, ttl=60)
    )
    round_trips()

    key = f"idem:{{{slot}}}:k"
    first = store.claim(
        ClaimRequest(key, token="a", task_id="id-a", fingerprint="fp", lease=30, ttl=60)
    )
    assert first.state is ClaimState.CLAIMED
    assert store.complete(
        CompleteRequest(key, token="a", fence=first.fence, task_id="id-a", stored=RESULT, ttl=60)
    )
    assert round_trips() == 2  # claim + WAIT, complete + WAIT

    again = store.claim(
        ClaimRequest(key, token="b", task_id="id-b", fingerprint="fp", lease=30, ttl=60)
    )
    assert again.state is ClaimState.COMPLETED
    assert round_trips() == 1  # a duplicate: one round trip
