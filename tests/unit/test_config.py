"""Unit tests for celery_idem.config: defaults, precedence, validation, overrides."""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_idem.checks import MAX_DURATION
from celery_idem.config import (
    CALL_SETTINGS,
    DEFAULTS,
    SETTINGS,
    IdemSettings,
    InProgressPolicy,
    StoreErrorPolicy,
    resolve_settings,
    with_call_overrides,
)
from celery_idem.endpoint import Topology
from celery_idem.exceptions import IdempotencyConfigError

REDIS = "redis://cache.internal:6379/0"


class PaymentDeclined(Exception):
    pass


class NotAnError:
    pass


@pytest.fixture
def fake_module() -> Iterator[str]:
    """A throwaway importable module holding exception classes for dotted names."""
    name = "idem_test_fake_errors"
    module = types.ModuleType(name)

    class Outer:
        class Inner(Exception):
            pass

    module.Declined = PaymentDeclined  # type: ignore[attr-defined]
    module.Outer = Outer  # type: ignore[attr-defined]
    module.NotAnError = NotAnError  # type: ignore[attr-defined]
    sys.modules[name] = module
    yield name
    del sys.modules[name]


def config_error(
    app: dict[str, Any] | None = None,
    task: dict[str, Any] | None = None,
    call: dict[str, Any] | None = None,
    task_name: str | None = None,
) -> IdempotencyConfigError:
    with pytest.raises(IdempotencyConfigError) as info:
        resolve_settings(app or {}, task, call, task_name=task_name)
    return info.value


# --------------------------------------------------------------------------- public shape


def test_settings_table() -> None:
    assert SETTINGS == (
        "idem_store_url",
        "idem_redis_url",
        "idem_redis_sentinels",
        "idem_redis_sentinel_master",
        "idem_redis_cluster",
        "idem_redis_client",
        "idem_redis_options",
        "idem_min_replicas",
        "idem_min_replicas_timeout",
        "idem_ttl",
        "idem_lease",
        "idem_key_prefix",
        "idem_scope",
        "idem_fingerprint",
        "idem_on_in_progress",
        "idem_on_store_error",
        "idem_cache_errors",
        "idem_max_result_bytes",
        "idem_dedupe_on_publish",
        "idem_require_key",
        "idem_max_takeovers",
        "idem_blocking_completion",
    )
    assert set(DEFAULTS) == set(SETTINGS)
    expected_call = {
        "idem_ttl",
        "idem_lease",
        "idem_fingerprint",
        "idem_on_in_progress",
        "idem_on_store_error",
        "idem_max_result_bytes",
    }
    assert expected_call == CALL_SETTINGS
    assert DEFAULTS["idem_on_in_progress"] == "retry"
    with pytest.raises(TypeError):
        DEFAULTS["idem_ttl"] = 1  # type: ignore[index]


def test_dedupe_on_publish_is_an_off_by_default_bool_per_task() -> None:
    assert resolve_settings({}).dedupe_on_publish is False
    assert resolve_settings({}, {"idem_dedupe_on_publish": True}).dedupe_on_publish is True
    with pytest.raises(IdempotencyConfigError, match="idem_dedupe_on_publish"):
        resolve_settings({"idem_dedupe_on_publish": "yes"})


def test_defaults() -> None:
    s = resolve_settings({})
    assert s == IdemSettings(
        store_url=None,
        redis_url=None,
        ttl=86400.0,
        lease=60.0,
        key_prefix="idem",
        on_in_progress=InProgressPolicy.RETRY,
        on_store_error=StoreErrorPolicy.RETRY,
        cache_errors=(),
        max_result_bytes=1048576,
    )
    assert isinstance(s.ttl, float)
    assert isinstance(s.lease, float)


def test_frozen() -> None:
    s = resolve_settings({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.ttl = 5  # type: ignore[misc]


def test_renew_every_is_a_third_of_the_lease() -> None:
    assert resolve_settings({"idem_lease": 30}).renew_every == pytest.approx(10.0)
    assert resolve_settings({}).renew_every == pytest.approx(20.0)


# --------------------------------------------------------------------------- precedence


def test_app_beats_default() -> None:
    assert resolve_settings({"idem_ttl": 10}).ttl == 10.0


def test_task_beats_app() -> None:
    s = resolve_settings(
        {"idem_ttl": 10, "idem_key_prefix": "app"}, {"idem_ttl": 20, "idem_key_prefix": "t"}
    )
    assert (s.ttl, s.key_prefix) == (20.0, "t")


def test_call_beats_task() -> None:
    s = resolve_settings({"idem_ttl": 10}, {"idem_ttl": 20}, {"idem_ttl": 30})
    assert s.ttl == 30.0


def test_call_beats_app_without_task_layer() -> None:
    assert resolve_settings({"idem_lease": 5}, None, {"idem_lease": 7}).lease == 7.0


def test_none_falls_through_every_layer() -> None:
    s = resolve_settings(
        {"idem_ttl": 10, "idem_lease": None},
        {"idem_ttl": None, "idem_lease": None},
        {"idem_ttl": None, "idem_lease": None},
    )
    assert s.ttl == 10.0
    assert s.lease == 60.0


def test_unrelated_keys_are_ignored() -> None:
    s = resolve_settings(
        {"broker_url": "amqp://", "task_acks_late": True, "IDEM": 1},
        {"bind": True, "max_retries": 3},
        {"countdown": 3, "id": "abc"},
    )
    assert s == resolve_settings({})


# --------------------------------------------------------------------------- redis url


@pytest.mark.parametrize(
    "url",
    [REDIS, "rediss://h:6380/1", "unix:///tmp/redis.sock", "memory://", "REDIS://h"],
)
def test_explicit_redis_url_schemes(url: str) -> None:
    assert resolve_settings({"idem_redis_url": url}).redis_url == url


def test_explicit_redis_url_beats_fallback() -> None:
    s = resolve_settings({"idem_redis_url": "memory://", "result_backend": REDIS})
    assert s.redis_url == "memory://"


def test_redis_url_falls_back_to_result_backend_then_broker() -> None:
    backend, broker = "redis://backend:6379/1", "rediss://broker:6379/0"
    assert resolve_settings({"result_backend": backend, "broker_url": broker}).redis_url == backend
    assert resolve_settings({"result_backend": "rpc://", "broker_url": broker}).redis_url == broker
    assert resolve_settings({"broker_url": broker}).redis_url == broker


def test_redis_url_fallback_ignores_non_redis_urls() -> None:
    assert resolve_settings({"broker_url": "amqp://guest@localhost//"}).redis_url is None
    assert resolve_settings({"result_backend": "db+sqlite:///x.db"}).redis_url is None
    # kombu's in-memory broker is not our memory store: never a fallback
    assert resolve_settings({"broker_url": "memory://"}).redis_url is None
    assert resolve_settings({"broker_url": ["redis://a", "redis://b"]}).redis_url is None


def test_redis_url_fallback_django_spelling() -> None:
    s = resolve_settings({"CELERY_BROKER_URL": REDIS})
    assert s.redis_url == REDIS


@pytest.mark.parametrize("bad", ["amqp://localhost", "cache.internal:6379", "", 6379, b"redis://h"])
def test_explicit_bad_redis_url(bad: object) -> None:
    err = config_error({"idem_redis_url": bad})
    assert "idem_redis_url" in str(err)
    assert repr(bad) in str(err)
    assert "app configuration" in str(err)
    assert "rediss://" in str(err)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("idem_ttl", 0),
        ("idem_ttl", -1.5),
        ("idem_ttl", True),
        ("idem_ttl", "60"),
        ("idem_ttl", float("inf")),
        ("idem_ttl", float("nan")),
        ("idem_lease", 0.5),
        ("idem_lease", False),
        ("idem_lease", "60"),
        ("idem_key_prefix", ""),
        ("idem_key_prefix", "a b"),
        ("idem_key_prefix", "idem\n"),
        ("idem_key_prefix", "{idem}"),
        ("idem_key_prefix", "x" * 65),
        ("idem_key_prefix", 5),
        ("idem_on_in_progress", "later"),
        ("idem_on_in_progress", 1),
        ("idem_on_store_error", "ignore"),
        ("idem_on_store_error", InProgressPolicy.WAIT),
        ("idem_cache_errors", 42),
        ("idem_cache_errors", {"a": ValueError}),
        ("idem_max_result_bytes", 0),
        ("idem_max_result_bytes", 1.5),
        ("idem_max_result_bytes", True),
    ],
)
def test_each_validation_error_names_the_setting(name: str, bad: object) -> None:
    err = config_error({name: bad})
    message = str(err)
    assert message.startswith(name)
    assert "app configuration" in message
    assert "expected" in message
    assert err.key is None


def test_error_reports_origin_and_task_name() -> None:
    err = config_error(task={"idem_ttl": -1}, task_name="shop.charge")
    assert "task option of 'shop.charge'" in str(err)
    assert err.task_name == "shop.charge"
    assert err.args == (err.message, None, "shop.charge")

    err = config_error(call={"idem_ttl": -1}, task_name="shop.charge")
    assert "call option" in str(err)
    assert err.task_name == "shop.charge"


def test_error_truncates_long_values() -> None:
    err = config_error({"idem_key_prefix": "y" * 500})
    assert "y" * 200 not in str(err)
    assert "..." in str(err)


def test_boundaries_accepted() -> None:
    s = resolve_settings(
        {
            "idem_ttl": 0.001,
            "idem_lease": 1,
            "idem_key_prefix": "p" * 64,
            "idem_max_result_bytes": 1,
        }
    )
    assert (s.ttl, s.lease, s.key_prefix, s.max_result_bytes) == (0.001, 1.0, "p" * 64, 1)


DURATIONS = ("idem_ttl", "idem_lease", "idem_min_replicas_timeout")
"""Every setting in seconds: each is bounded by what Redis holds in exact milliseconds."""


@pytest.mark.parametrize(
    ("layer", "name"),
    [
        (layer, name)
        for layer in ("app", "task", "call")
        for name in DURATIONS
        if layer != "call" or name in CALL_SETTINGS
    ],
)
@pytest.mark.parametrize("too_long", [sys.maxsize, MAX_DURATION + 0.5])
def test_a_duration_redis_cannot_hold_is_refused_naming_the_setting_and_maximum(
    layer: str, name: str, too_long: float
) -> None:
    # idem_ttl=sys.maxsize was accepted, worked on the memory store, and then made every
    # Redis call fail ("value is not an integer or out of range"), blamed on another app.
    err = config_error(**{layer: {name: too_long}}, task_name="shop.charge")
    assert str(err).startswith(f"{name} from ")
    assert f"<= {MAX_DURATION} (10 years)" in str(err)


def test_every_duration_setting_takes_the_maximum_itself() -> None:
    s = resolve_settings(dict.fromkeys(DURATIONS, MAX_DURATION))
    assert s.ttl == s.lease == s.min_replicas_timeout == MAX_DURATION
    call = with_call_overrides(s, {"idem_ttl": MAX_DURATION, "idem_lease": MAX_DURATION})
    assert call.ttl == call.lease == MAX_DURATION


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("retry", InProgressPolicy.RETRY),
        ("WAIT", InProgressPolicy.WAIT),
        ("Raise", InProgressPolicy.RAISE),
        (InProgressPolicy.WAIT, InProgressPolicy.WAIT),
    ],
)
def test_in_progress_policy_parsing(value: object, expected: InProgressPolicy) -> None:
    s = resolve_settings({"idem_on_in_progress": value})
    assert s.on_in_progress is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("RUN", StoreErrorPolicy.RUN),
        ("raise", StoreErrorPolicy.RAISE),
        (StoreErrorPolicy.RETRY, StoreErrorPolicy.RETRY),
    ],
)
def test_store_error_policy_parsing(value: object, expected: StoreErrorPolicy) -> None:
    s = resolve_settings({}, {"idem_on_store_error": value})
    assert s.on_store_error is expected


# --------------------------------------------------------------------------- cache_errors


def test_cache_errors_classes() -> None:
    s = resolve_settings({"idem_cache_errors": [PaymentDeclined, KeyError, PaymentDeclined]})
    assert s.cache_errors == (PaymentDeclined, KeyError)
    assert resolve_settings({"idem_cache_errors": ValueError}).cache_errors == (ValueError,)
    assert resolve_settings({"idem_cache_errors": {ValueError}}).cache_errors == (ValueError,)


def test_cache_errors_dotted_names(fake_module: str) -> None:
    s = resolve_settings(
        {},
        {
            "idem_cache_errors": (
                f"{fake_module}.Declined",
                f"{fake_module}.Outer.Inner",
                "json.JSONDecodeError",
                "ValueError",
            )
        },
    )
    outer: Any = sys.modules[fake_module].Outer
    assert s.cache_errors == (PaymentDeclined, outer.Inner, json.JSONDecodeError, ValueError)
    single = resolve_settings({"idem_cache_errors": f"{fake_module}.Declined"})
    assert single.cache_errors == (PaymentDeclined,)


@pytest.mark.parametrize(
    "bad",
    [
        "no_such_package_xyz.Error",
        "json.NoSuchError",
        "NoSuchBuiltinError",
        "json..JSONDecodeError",
    ],
)
def test_cache_errors_bad_dotted_name(bad: str) -> None:
    err = config_error({"idem_cache_errors": [ValueError, bad]})
    assert str(err).startswith("idem_cache_errors")
    assert repr(bad) in str(err)


def test_cache_errors_non_exception_class(fake_module: str) -> None:
    err = config_error({"idem_cache_errors": (ValueError, NotAnError)})
    assert str(err).startswith("idem_cache_errors")
    assert "NotAnError" in str(err)

    err = config_error({"idem_cache_errors": f"{fake_module}.NotAnError"})
    assert "NotAnError" in str(err)

    err = config_error({"idem_cache_errors": [ValueError("an instance")]})
    assert "an instance" in str(err)


def test_cache_errors_module_failing_to_import_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "idem_test_needs_dep.py").write_text("import idem_no_such_dependency\n")
    (tmp_path / "idem_test_explodes.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    err = config_error({"idem_cache_errors": "idem_test_needs_dep.Error"})
    assert "idem_no_such_dependency" in str(err)
    assert "'idem_test_needs_dep.Error'" in str(err)

    err = config_error({"idem_cache_errors": "idem_test_explodes.Error"})
    assert "boom at import" in str(err)
    assert str(err).startswith("idem_cache_errors")


# --------------------------------------------------------------------------- names


def test_django_spelling_fallback() -> None:
    s = resolve_settings({"CELERY_IDEM_TTL": 5, "CELERY_IDEM_ON_IN_PROGRESS": "wait"})
    assert s.ttl == 5.0
    assert s.on_in_progress is InProgressPolicy.WAIT


def test_canonical_name_beats_django_spelling() -> None:
    assert resolve_settings({"idem_ttl": 7, "CELERY_IDEM_TTL": 5}).ttl == 7.0
    assert resolve_settings({"idem_ttl": None, "CELERY_IDEM_TTL": 5}).ttl == 5.0


def test_django_spelling_error_names_both_spellings() -> None:
    err = config_error({"CELERY_IDEM_LEASE": 0})
    assert "idem_lease" in str(err)
    assert "CELERY_IDEM_LEASE" in str(err)


def test_typo_in_task_options_suggests_closest() -> None:
    err = config_error(task={"idem_tll": 5}, task_name="shop.charge")
    assert "idem_tll" in str(err)
    assert "did you mean 'idem_ttl'" in str(err)
    assert "task option of 'shop.charge'" in str(err)


def test_typo_in_task_options_without_close_match_lists_names() -> None:
    err = config_error(task={"idem_zzzzzzzzzzzz": 5})
    assert "idem_max_result_bytes" in str(err)


def test_typo_in_app_conf() -> None:
    err = config_error({"idem_key_prefx": "x"})
    assert "did you mean 'idem_key_prefix'" in str(err)
    assert "app configuration" in str(err)
    err = config_error({"CELERY_IDEM_TLL": 5})
    assert "did you mean 'CELERY_IDEM_TTL'" in str(err)


def test_typo_in_call_options() -> None:
    err = config_error(call={"idem_leas": 5})
    assert "did you mean 'idem_lease'" in str(err)


def test_unrelated_idem_name_gets_no_forced_suggestion() -> None:
    err = config_error(call={"idem_foo": 5})
    assert "did you mean" not in str(err)
    assert "idem_foo" in str(err)
    assert "idem_max_result_bytes" in str(err)


@pytest.mark.parametrize(
    "name", sorted(set(SETTINGS) - CALL_SETTINGS), ids=lambda n: n.removeprefix("idem_")
)
def test_disallowed_call_option(name: str) -> None:
    err = config_error(call={name: DEFAULTS[name] or "memory://"}, task_name="t")
    layers = "the task" if name == "idem_scope" else "the task or the app"
    assert str(err).startswith(f"{name} cannot be set per call; set it on {layers} (")
    assert err.task_name == "t"


# --------------------------------------------------------------------------- overrides


def test_with_call_overrides_returns_base_when_nothing_overridden() -> None:
    base = resolve_settings({"idem_ttl": 10})
    assert with_call_overrides(base, {}) is base
    assert with_call_overrides(base, {"countdown": 5, "id": "x"}) is base
    assert with_call_overrides(base, dict.fromkeys(CALL_SETTINGS)) is base


def test_with_call_overrides_replaces_only_overridden() -> None:
    base = resolve_settings({"idem_ttl": 10, "idem_key_prefix": "p", "result_backend": REDIS})
    out = with_call_overrides(
        base,
        {"idem_ttl": 3, "idem_on_in_progress": "RAISE", "idem_max_result_bytes": 10},
    )
    assert out is not base
    assert out == dataclasses.replace(
        base, ttl=3.0, on_in_progress=InProgressPolicy.RAISE, max_result_bytes=10
    )
    assert base.ttl == 10.0


def test_with_call_overrides_revalidates() -> None:
    base = resolve_settings({})
    with pytest.raises(IdempotencyConfigError, match=r"^idem_lease from call option") as info:
        with_call_overrides(base, {"idem_lease": 0.2}, task_name="shop.charge")
    assert info.value.task_name == "shop.charge"
    with pytest.raises(IdempotencyConfigError, match="idem_on_store_error"):
        with_call_overrides(base, {"idem_on_store_error": "explode"})


def test_with_call_overrides_refuses_non_call_settings() -> None:
    base = resolve_settings({})
    with pytest.raises(IdempotencyConfigError, match=r"^idem_key_prefix cannot be set per call"):
        with_call_overrides(base, {"idem_key_prefix": "other"})


def test_resolve_with_call_equals_with_call_overrides() -> None:
    app = {"idem_ttl": 10}
    task = {"idem_lease": 20}
    call = {"idem_ttl": 1, "idem_lease": 2}
    assert resolve_settings(app, task, call) == with_call_overrides(
        resolve_settings(app, task), call
    )


# --------------------------------------------------------------------------- real Celery


@pytest.fixture
def no_celery_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Celery's broker_url / result_backend properties honour these variables.
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    monkeypatch.delenv("CELERY_RESULT_BACKEND", raising=False)


@pytest.mark.usefixtures("no_celery_env")
def test_real_celery_app_conf_with_namespace() -> None:
    class Config:
        CELERY_IDEM_TTL = 5
        CELERY_IDEM_ON_STORE_ERROR = "run"
        CELERY_BROKER_URL = "amqp://guest@localhost//"
        CELERY_RESULT_BACKEND = "redis://backend:6379/2"

    app = Celery("config-test", set_as_current=False)
    app.config_from_object(Config, namespace="CELERY")
    s = resolve_settings(app.conf, task_name="shop.charge")
    assert s.ttl == 5.0
    assert s.on_store_error is StoreErrorPolicy.RUN
    assert s.redis_url == "redis://backend:6379/2"
    assert s.lease == 60.0


@pytest.mark.usefixtures("no_celery_env")
def test_real_celery_app_conf_plain_and_typo() -> None:
    app = Celery("config-test", set_as_current=False, broker="redis://broker:6379/0")
    app.conf.update(idem_lease=12)
    s = resolve_settings(app.conf)
    assert s.lease == 12.0
    assert s.redis_url == "redis://broker:6379/0"

    app.conf.update(idem_leese=12)
    with pytest.raises(IdempotencyConfigError, match="did you mean 'idem_lease'"):
        resolve_settings(app.conf)


def test_idem_store_url_selects_postgres_and_refuses_redis_only_settings() -> None:
    s = resolve_settings({"idem_store_url": "postgresql://u:secret@db.internal:5432/app"})
    assert s.endpoint is not None
    assert s.endpoint.topology is Topology.POSTGRES
    assert s.endpoint.display == "postgresql://u:**@db.internal:5432/app"
    redis = resolve_settings({"idem_store_url": "redis://redis.internal:6380/3"})
    assert redis.endpoint is not None
    assert redis.endpoint.topology is Topology.STANDALONE
    with pytest.raises(IdempotencyConfigError, match=r"idem_min_replicas is invalid.*PostgreSQL"):
        resolve_settings({"idem_store_url": "postgres://db/app", "idem_min_replicas": 1})
    with pytest.raises(IdempotencyConfigError, match="name two stores"):
        resolve_settings({"idem_store_url": "postgres://db/app", "idem_redis_url": "redis://r/1"})
    with pytest.raises(IdempotencyConfigError, match=r"idem_redis_url.*unsupported scheme"):
        resolve_settings({"idem_redis_url": "postgresql://db/app"})  # the Redis-only spelling
    django = resolve_settings({"CELERY_IDEM_STORE_URL": "postgresql://db/app"})
    assert django.endpoint is not None
    assert django.endpoint.topology is Topology.POSTGRES
