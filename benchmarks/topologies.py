"""What each deployment costs per key: ``make bench-topologies``.

Starts each deployment the test suite uses (``devtools/topologies.py``: one server, a
Sentinel deployment with one replica, a 3-master Cluster with and without a replica per
master) from the same redis-server binary, and times the store's two paths from one
client thread: a first run (claim + complete, two round trips) and a duplicate (one
claim). With ``idem_min_replicas=1`` each write also waits for its replica inside the
same round trip. Prints a Markdown table; one client on loopback, so it measures
latency per key, not a server's capacity.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

from celery_idem.store import ClaimRequest, CompleteRequest, RecordKind, Stored
from celery_idem.store.redis import RedisStore
from devtools.redis_server import RedisServer
from devtools.topologies import RedisCluster, SentinelDeployment

TOKEN, LATER = "t", "u"  # owner tokens of the first run and of its duplicate
RESULT = Stored(RecordKind.RESULT, b'"' + b"x" * 98 + b'"', "j")


@contextmanager
def standalone() -> Iterator[str]:
    """One private redis-server."""
    with RedisServer() as server:
        yield server.url(0)


@contextmanager
def sentinel() -> Iterator[str]:
    """1 master, 1 replica, 3 sentinels."""
    with SentinelDeployment() as deployment:
        yield deployment.sentinel_url(0)


@contextmanager
def cluster(replicas: int) -> Iterator[str]:
    """3 masters, ``replicas`` replicas each."""
    with RedisCluster(replicas_per_master=replicas) as deployment:
        yield "redis+cluster://" + deployment.url().partition("://")[2]


CASES: list[tuple[str, Callable[[], AbstractContextManager[str]], int]] = [
    ("standalone", standalone, 0),
    ("sentinel, 1 replica", sentinel, 0),
    ("sentinel, 1 replica", sentinel, 1),
    ("cluster, 3 masters", lambda: cluster(0), 0),
    ("cluster, 3 masters + 3 replicas", lambda: cluster(1), 0),
    ("cluster, 3 masters + 3 replicas", lambda: cluster(1), 1),
]


def measure(url: str, min_replicas: int, keys: int, rounds: int) -> tuple[float, float]:
    """Median keys/s over ``rounds`` of a first run each, then a duplicate each."""
    store = RedisStore.from_url(url, min_replicas=min_replicas)
    firsts, duplicates = [], []
    for _ in range(rounds + 1):  # the first round warms connections and scripts up
        names = [f"idem:bench:{uuid.uuid4().hex}" for _ in range(keys)]
        start = time.perf_counter()
        for name in names:
            out = store.claim(
                ClaimRequest(name, token=TOKEN, task_id="i", fingerprint="", lease=60, ttl=600)
            )
            store.complete(
                CompleteRequest(
                    name, token=TOKEN, fence=out.fence, task_id="i", stored=RESULT, ttl=600
                )
            )
        middle = time.perf_counter()
        for name in names:
            store.claim(
                ClaimRequest(name, token=LATER, task_id="j", fingerprint="", lease=60, ttl=600)
            )
        end = time.perf_counter()
        firsts.append(keys / (middle - start))
        duplicates.append(keys / (end - middle))
    return statistics.median(firsts[1:]), statistics.median(duplicates[1:])


def main() -> None:
    """Run every case and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=2000, help="keys per round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per case")
    args = parser.parse_args()
    print(f"{args.keys} keys x {args.rounds} rounds per case, one client thread, loopback\n")
    print("| deployment | idem_min_replicas | first runs/s | duplicates/s |")
    print("|---|---|---|---|")
    for name, start, min_replicas in CASES:
        with start() as url:
            first, duplicate = measure(url, min_replicas, args.keys, args.rounds)
        print(f"| {name} | {min_replicas} | {first:,.0f} | {duplicate:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
