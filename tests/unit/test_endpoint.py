"""The store's address forms and how the store settings combine (pure, no Redis)."""

from __future__ import annotations

from typing import Any

import pytest

from celery_idem import Endpoint, IdempotencyConfigError, Topology
from celery_idem.config import resolve_settings
from celery_idem.endpoint import parse_sentinels, sanitize_url


def endpoint(conf: dict[str, Any]) -> Endpoint:
    found = resolve_settings(conf).endpoint
    assert found is not None
    return found


def refused(conf: dict[str, Any]) -> str:
    with pytest.raises(IdempotencyConfigError) as info:
        resolve_settings(conf)
    return str(info.value)


def make_client() -> None:
    """Stands in for a user's factory; never called by these tests."""


@pytest.mark.parametrize(
    "url",
    ["redis://h:6379/2", "rediss://h:6380/0", "unix:///run/redis.sock?db=3"],
)
def test_plain_urls_are_standalone_and_kept_as_given(url: str) -> None:
    found = endpoint({"idem_redis_url": url})
    assert found.topology is Topology.STANDALONE
    assert found.url == url


@pytest.mark.parametrize(
    "url", ["redis+socket:///run/redis.sock?virtual_host=3", "socket:///run/redis.sock?db=3"]
)
def test_celerys_unix_socket_spellings_become_unix_urls(url: str) -> None:
    found = endpoint({"idem_redis_url": url})
    assert (found.topology, found.url) == (Topology.STANDALONE, "unix:///run/redis.sock?db=3")


def test_celery_spelling_of_tls_cert_reqs_becomes_redis_py_spelling() -> None:
    found = endpoint({"idem_redis_url": "rediss://h:6380/0?ssl_cert_reqs=CERT_REQUIRED"})
    assert found.url == "rediss://h:6380/0?ssl_cert_reqs=required"


def test_compact_sentinel_url_names_hosts_service_and_db() -> None:
    found = endpoint({"idem_redis_url": "sentinel://:pw@h1:26379;h2:26380/mymaster/2"})
    assert found.topology is Topology.SENTINEL
    assert found.sentinels == (("h1", 26379), ("h2", 26380))
    assert (found.service_name, found.db, found.password) == ("mymaster", 2, "pw")
    assert "pw" not in found.display


def test_celerys_sentinel_url_takes_the_master_name_from_transport_options() -> None:
    conf = {
        "result_backend": "sentinel://h1:26379/1;sentinel://h2:26379/1",
        "result_backend_transport_options": {"master_name": "cache"},
    }
    found = endpoint(conf)
    assert found.sentinels == (("h1", 26379), ("h2", 26379))
    assert (found.service_name, found.db) == ("cache", 1)


def test_sentinels_setting_with_master_setting() -> None:
    conf = {"idem_redis_sentinels": ["h1:1", ("h2", 2)], "idem_redis_sentinel_master": "m"}
    found = endpoint(conf)
    assert found.sentinels == (("h1", 1), ("h2", 2))
    assert found.service_name == "m"


def test_sentinels_setting_replaces_the_brokers_url() -> None:
    conf = {
        "broker_url": "redis://broker:6379/0",
        "idem_redis_sentinels": "h1:26379;h2:26379",
        "idem_redis_sentinel_master": "m",
    }
    assert endpoint(conf).topology is Topology.SENTINEL


@pytest.mark.parametrize(
    ("conf", "setting"),
    [
        ({"idem_redis_url": "sentinel://h1:26379"}, "idem_redis_sentinel_master"),
        ({"idem_redis_sentinels": ["h1:26379"]}, "idem_redis_sentinel_master"),
        ({"idem_redis_sentinels": ["h1:x"], "idem_redis_sentinel_master": "m"}, "h1:x"),
        ({"idem_redis_sentinels": [], "idem_redis_sentinel_master": "m"}, "idem_redis_sentinels"),
        (
            {"idem_redis_url": "redis://h/0", "idem_redis_sentinels": ["h1:1"]},
            "idem_redis_sentinels",
        ),
        ({"idem_redis_url": "redis://h/0", "idem_redis_sentinel_master": "m"}, "sentinel_master"),
        ({"idem_redis_url": "sentinel://h1:1/m/x"}, "idem_redis_url"),
        ({"idem_redis_url": "unix:///s.sock", "idem_redis_cluster": True}, "idem_redis_cluster"),
        ({"idem_redis_url": "redis://h/0", "idem_redis_cluster": "yes"}, "idem_redis_cluster"),
        ({"idem_redis_url": "redis://h/0", "idem_min_replicas": -1}, "idem_min_replicas"),
        ({"idem_redis_url": "redis://h/0", "idem_redis_options": ["ssl"]}, "idem_redis_options"),
        ({"idem_redis_client": "no_such_module.make"}, "idem_redis_client"),
        ({"idem_redis_client": 42}, "idem_redis_client"),
    ],
)
def test_contradictions_and_bad_values_name_the_setting(conf: dict[str, Any], setting: str) -> None:
    assert setting in refused(conf)


def test_cluster_url_and_cluster_flag() -> None:
    found = endpoint({"idem_redis_url": "redis+cluster://:pw@h:7000/0"})
    assert found.topology is Topology.CLUSTER
    assert found.url == "redis://:pw@h:7000/0"
    assert "pw" not in found.display
    tls = endpoint({"idem_redis_url": "rediss+cluster://h:7000"})
    assert tls.url == "rediss://h:7000"
    flagged = endpoint({"idem_redis_url": "redis://h:7000", "idem_redis_cluster": True})
    assert flagged.topology is Topology.CLUSTER


def test_client_factory_by_dotted_name_or_callable() -> None:
    by_name = endpoint({"idem_redis_client": f"{__name__}.make_client"})
    assert by_name.topology is Topology.CUSTOM
    assert by_name.factory is make_client
    assert endpoint({"idem_redis_client": make_client}).factory is make_client
    assert "make_client" in by_name.display


def test_options_and_durability_travel_with_the_endpoint() -> None:
    found = endpoint(
        {
            "idem_redis_url": "rediss://h:6380/0",
            "idem_redis_options": {"ssl_ca_certs": "/ca.pem"},
            "idem_min_replicas": 1,
            "idem_min_replicas_timeout": 0.25,
        }
    )
    assert found.option_dict() == {"ssl_ca_certs": "/ca.pem"}
    assert (found.min_replicas, found.replicas_timeout) == (1, 0.25)


def test_equal_settings_give_equal_cache_keys() -> None:
    conf = {"idem_redis_url": "redis://h/0", "idem_redis_options": {"b": 1, "a": 2}}
    assert endpoint(conf).cache_key == endpoint(dict(conf)).cache_key
    other = {**conf, "idem_min_replicas": 1}
    assert endpoint(other).cache_key != endpoint(conf).cache_key


def test_parse_sentinels_forms() -> None:
    assert parse_sentinels("a:1, b") == (("a", 1), ("b", 26379))
    assert parse_sentinels([("a", 1)]) == (("a", 1),)


def test_sanitize_url_masks_only_the_password() -> None:
    assert sanitize_url("redis://user:secret@h:1/0") == "redis://user:**@h:1/0"
    assert sanitize_url("redis://h:1/0") == "redis://h:1/0"


@pytest.mark.parametrize(
    ("conf", "setting"),
    [
        ({"idem_redis_url": "redis+cluster://h:7000/3"}, "idem_redis_url"),
        ({"idem_redis_url": "redis://h:7000/1", "idem_redis_cluster": True}, "idem_redis_cluster"),
        ({"idem_redis_client": make_client, "idem_redis_url": "redis://h/0"}, "idem_redis_client"),
        (
            {"idem_redis_client": make_client, "idem_redis_options": {"db": 1}},
            "idem_redis_client",
        ),
        (
            {
                "idem_redis_sentinels": ["h1:1"],
                "idem_redis_sentinel_master": "m",
                "idem_redis_cluster": True,
            },
            "idem_redis_cluster",
        ),
    ],
)
def test_settings_that_would_be_ignored_or_refused_later_are_refused_now(
    conf: dict[str, Any], setting: str
) -> None:
    assert setting in refused(conf)


def test_tls_query_keeps_other_values_exactly_as_written() -> None:
    url = "rediss://h:6380/0?ssl_cert_reqs=CERT_REQUIRED&ssl_ca_certs=%2Fetc%2Fmy%20ca.pem"
    found = endpoint({"idem_redis_url": url})
    assert found.url == "rediss://h:6380/0?ssl_cert_reqs=required&ssl_ca_certs=%2Fetc%2Fmy%20ca.pem"


def test_celerys_sentinel_backend_brings_its_sentinel_password_along() -> None:
    conf = {
        "result_backend": "sentinel://h1:26379/0;sentinel://h2:26379/0",
        "result_backend_transport_options": {
            "master_name": "cache",
            "sentinel_kwargs": {"password": "s3cret"},
        },
    }
    found = endpoint(conf)
    assert found.option_dict() == {"sentinel_kwargs": {"password": "s3cret"}}
    own = endpoint({**conf, "idem_redis_options": {"sentinel_kwargs": {"password": "mine"}}})
    assert own.option_dict() == {"sentinel_kwargs": {"password": "mine"}}


def test_location_ignores_client_options() -> None:
    plain = endpoint({"idem_redis_url": "redis://h/0"})
    durable = endpoint({"idem_redis_url": "redis://h/0", "idem_min_replicas": 1})
    assert plain.location == durable.location
    assert plain.cache_key != durable.cache_key
