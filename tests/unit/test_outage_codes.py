"""Which Redis refusals are outages, on every server version the suite can start.

An outage (``StoreUnavailable``) defers the task under ``idem_on_store_error``; any other
refusal fails it for good. Redis 7 answers a refusal met inside a script with its code
(``READONLY ...``); Redis 6.2 wraps it into a script error (``Error running script (call
to f_...): @user_script:N: @user_script: N: -READONLY ...``). Both must read the same.
The out-of-memory case, the one that broke ``make test`` on 6.2, is in
``test_worker_paths.py``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import pytest
import redis

from celery_idem.exceptions import IdempotencyError, StoreUnavailable
from celery_idem.store import ClaimRequest
from celery_idem.store.redis import RedisStore
from celery_idem.store.redis_admin import OUTAGE_CODES, is_outage, outage_code
from devtools.processes import free_port, wait_for
from devtools.redis_server import RedisServer

WRAPPER = "Error running script (call to f_5e1c): @user_script:146: @user_script: 146: -"
"""How Redis 6.2 passes on a refusal met inside a script (``f_`` + the script's sha)."""


def claim(store: RedisStore) -> None:
    store.claim(ClaimRequest("k", token="t", task_id="i", fingerprint="", lease=1, ttl=1))


def no_replicas(client: redis.Redis) -> None:
    client.config_set("min-replicas-to-write", 1)  # and no replica connected


def read_only(client: redis.Redis) -> None:
    client.replicaof("127.0.0.1", free_port())  # a replica of nothing (a demoted primary)


def master_down(client: redis.Redis) -> None:
    read_only(client)
    client.config_set("replica-serve-stale-data", "no")


@contextmanager
def busy(server: RedisServer) -> Iterator[None]:
    """Another client's script runs past lua-time-limit until the block ends."""
    control = server.client(0)
    control.config_set("lua-time-limit", 10)
    looping = server.client(0, socket_timeout=60)

    def loop() -> None:
        with suppress(redis.RedisError):  # killed by SCRIPT KILL below
            looping.eval("while true do end", 0)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()

    def is_busy() -> bool:
        try:
            control.get("probe")
        except redis.ResponseError as exc:
            return str(exc).startswith("BUSY ")
        return False

    wait_for(is_busy, timeout=10, message="the looping script makes the server BUSY")
    try:
        yield
    finally:
        control.script_kill()
        thread.join(timeout=10)
        looping.close()
        control.close()


STATES: dict[str, Callable[[redis.Redis], None]] = {
    "NOREPLICAS": no_replicas,
    "READONLY": read_only,
    "MASTERDOWN": master_down,
}


@pytest.mark.parametrize("code", sorted(STATES))
def test_a_refusal_that_passes_is_an_outage_on_every_version(
    server_per_version: RedisServer, code: str
) -> None:
    STATES[code](server_per_version.client(0))
    store = RedisStore.from_url(server_per_version.url(0))
    with pytest.raises(StoreUnavailable, match=f"Redis answered {code} "):
        claim(store)


def test_a_busy_server_is_an_outage_on_every_version(server_per_version: RedisServer) -> None:
    # redis-py has no class for BUSY: only its code tells it from a refusal for good.
    store = RedisStore.from_url(server_per_version.url(0))
    with busy(server_per_version), pytest.raises(StoreUnavailable, match="Redis answered BUSY "):
        claim(store)


@pytest.mark.parametrize("code", sorted(OUTAGE_CODES))
def test_every_outage_code_is_read_bare_and_inside_a_6_2_script_error(code: str) -> None:
    # LOADING, CLUSTERDOWN and TRYAGAIN cannot be provoked inside a script on one
    # server: their 6.2 wording is the one the servers above showed for the others.
    for reply in (f"{code} the server says no", f"{WRAPPER}{code} the server says no"):
        error = redis.ResponseError(reply)
        assert outage_code(error) == code, reply
        assert is_outage(error)


@pytest.mark.parametrize(
    "reply",
    [
        "WRONGTYPE Operation against a key holding the wrong kind of value",
        "BUSYKEY Target key name already exists.",
        f"{WRAPPER[:-1]}ERR value is not an integer or out of range",
        "Error running script (call to f_5e1c): @user_script:3: user_script:3: "
        "attempt to compare nil with number",
        "OOMPH is not a code",
    ],
)
def test_other_refusals_stay_refusals(reply: str) -> None:
    # A damaged record or another application's key fails the same way on every retry:
    # deferring it would loop forever.
    error = redis.ResponseError(reply)
    assert not is_outage(error)
    failing = RedisStore(redis.Redis(), url="redis://h/0")
    refusal = failing.error_for("k", error)
    assert type(refusal) is IdempotencyError
