"""The settings table is the one description of each setting; the rest must agree with it.

``IdemSettings`` keeps explicit fields (for type checkers) and ``IdempotentTask``
explicit task options (for readers and documentation): these tests make either fail
the moment it drifts from :data:`celery_idem.settings_table.TABLE`.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

import pytest
from celery import Celery

from celery_idem import IdempotencyConfigError, IdempotentTask
from celery_idem.config import (
    CALL_SETTINGS,
    DEFAULTS,
    SETTINGS,
    IdemSettings,
    renewal_period,
    resolve_settings,
)
from celery_idem.endpoint import celery_fallback
from celery_idem.renewer import next_due
from celery_idem.settings_table import TABLE, Setting
from celery_idem.task.base import task_options

NOT_SETTINGS = {"endpoint"}
"""IdemSettings fields that are derived, not set: the store settings combined."""


def test_rows_are_well_formed() -> None:
    names = [row.name for row in TABLE]
    assert len(set(names)) == len(names)
    for row in TABLE:
        assert row.name.startswith("idem_"), row.name
        assert row.name == row.name.lower()
        assert row.expected.strip(), row.name
        assert row.doc.strip(), row.name
        assert "\n" not in row.doc, f"{row.name}: the doc is one line"
        if row.default is not None:
            row.check(row.default)  # every default passes its own validator


def test_public_lists_are_derived_from_the_table() -> None:
    assert tuple(row.name for row in TABLE) == SETTINGS
    assert {row.name: row.default for row in TABLE} == dict(DEFAULTS)
    assert {row.name for row in TABLE if row.per_call} == CALL_SETTINGS


def test_django_spelling_of_each_row() -> None:
    spelled = {row.name: row.django for row in TABLE}
    assert spelled["idem_ttl"] == "CELERY_IDEM_TTL"
    assert spelled["idem_redis_sentinel_master"] == "CELERY_IDEM_REDIS_SENTINEL_MASTER"
    for row in TABLE:
        found = resolve_settings({row.django: row.default}) if row.default is not None else None
        if found is not None:
            assert getattr(found, row.field) == row.check(row.default)


def test_idem_settings_has_one_field_per_row() -> None:
    fields = [f.name for f in dataclasses.fields(IdemSettings) if f.name not in NOT_SETTINGS]
    assert sorted(fields) == sorted(row.field for row in TABLE)
    assert len(fields) == len(TABLE)


def test_idem_settings_field_defaults_are_the_tables() -> None:
    """A field with a default of its own must hold the table's (validated) default."""
    rows = {row.field: row for row in TABLE}
    resolved = resolve_settings({})
    for field in dataclasses.fields(IdemSettings):
        if field.name in NOT_SETTINGS or field.default is dataclasses.MISSING:
            continue
        row = rows[field.name]
        expected = None if row.default is None else row.check(row.default)
        assert field.default == expected, field.name
        assert getattr(resolved, field.name) == expected, field.name


def test_idem_settings_documents_each_field() -> None:
    doc = inspect.getdoc(IdemSettings) or ""
    for row in TABLE:
        assert re.search(rf"^\s+{row.field}: ", doc, re.MULTILINE), row.field


# --------------------------------------------------------------------------- task options


def test_idempotent_task_declares_one_option_per_row_documented() -> None:
    source = inspect.getsource(IdempotentTask)
    documented = re.findall(r"#: (.+)\n\s+(idem_\w+): ClassVar", source)
    assert [(row.doc, row.name) for row in TABLE] == documented
    for row in TABLE:
        assert IdempotentTask.__dict__[row.name] is None, row.name
    declared = {
        name
        for name, value in vars(IdempotentTask).items()
        if name.startswith("idem_") and not callable(value)
    }
    assert declared == set(SETTINGS)


def test_task_options_are_the_options_set_on_the_task() -> None:
    app = Celery("settings-table", set_as_current=False)

    @app.task(base=IdempotentTask, idem_ttl=30, idem_on_in_progress="wait", shared=False)
    def decorated() -> None:
        pass

    class Base(IdempotentTask):  # type: ignore[misc]
        idem_lease = 10
        idem_key_prefix = "shop"

    class Child(Base):
        idem_key_prefix = None  # back to the app's value

    assert task_options(IdempotentTask) == {}
    task = app.tasks[decorated.name]
    assert task_options(type(task)) == {"idem_ttl": 30, "idem_on_in_progress": "wait"}
    assert task_options(Base) == {"idem_lease": 10, "idem_key_prefix": "shop"}
    assert task_options(Child) == {"idem_lease": 10}


def test_a_misspelt_task_option_is_still_refused() -> None:
    class Typo(IdempotentTask):  # type: ignore[misc]
        idem_tll = 5

    options = task_options(Typo)
    assert options == {"idem_tll": 5}
    with pytest.raises(IdempotencyConfigError, match="did you mean 'idem_ttl'"):
        resolve_settings({}, options, task_name="typo")


# --------------------------------------------------------------------------- renewal


@pytest.mark.parametrize("lease", [1, 30, 60.0])
def test_the_renewer_renews_every_renew_every(lease: float) -> None:
    settings = resolve_settings({"idem_lease": lease})
    assert renewal_period(settings.lease) == settings.renew_every
    assert next_due(100.0, settings.lease) == 100.0 + settings.renew_every


# --------------------------------------------------------------------------- fallback


def test_the_celery_fallback_applies_only_without_any_store_address() -> None:
    conf = {"result_backend": "redis://backend/1", "broker_url": "redis://broker/0"}
    given: dict[str, Any] = {"socket_timeout": 1}
    for kept in (
        {"url": "memory://x", "sentinels": None, "factory": None},
        {"url": None, "sentinels": "h:26379", "factory": None},
        {"url": None, "sentinels": None, "factory": object},
    ):
        assert celery_fallback(conf, options=given, **kept) == (kept["url"], given, None)
    found = celery_fallback(conf, url=None, sentinels=None, factory=None, options=given)
    assert found == ("redis://backend/1", given, None)


def test_the_celery_fallback_brings_the_sentinel_options_of_its_side() -> None:
    conf = {
        "broker_url": "sentinel://s1:26379/0;sentinel://s2:26379/0",
        "broker_transport_options": {"master_name": "main", "sentinel_kwargs": {"password": "p"}},
        "result_backend_transport_options": {"master_name": "other"},
    }
    url, options, master = celery_fallback(
        conf, url=None, sentinels=None, factory=None, options={"socket_timeout": 2}
    )
    assert url == conf["broker_url"]
    assert options == {"sentinel_kwargs": {"password": "p"}, "socket_timeout": 2}
    assert master == "main"


def test_setting_is_a_frozen_row() -> None:
    row = TABLE[0]
    assert isinstance(row, Setting)
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.per_call = True  # type: ignore[misc]
