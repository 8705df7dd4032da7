"""Configuration: the settings' public lists, validation, and precedence.

This module derives ``SETTINGS``, ``DEFAULTS``, ``CALL_SETTINGS``, the validators and
the Django spellings from the settings table (``settings_table.py``, one row per
setting), and owns validation and the one place where precedence
call > task > app > default is decided. Everything else in celery-idem
receives a validated, frozen :class:`IdemSettings` and never reads raw configuration,
so a bad value fails here, once, with a message that names the setting, the value,
where it came from and what is accepted.

Pure: imports neither celery nor redis. ``app_conf`` is any mapping (Celery's
``app.conf`` or a plain dict), which keeps the rules testable without an app.

Cost: callers resolve once per task per process and cache the result; a message that
carries call-level overrides goes through :func:`with_call_overrides`, which validates
only the overridden names and returns the cached object untouched when there are none.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from celery_idem.checks import Invalid, short_repr
from celery_idem.endpoint import (
    Endpoint,
    EndpointError,
    build_endpoint,
    celery_fallback,
    sanitize_url,
)
from celery_idem.exceptions import IdempotencyConfigError
from celery_idem.fingerprint import FingerprintSetting
from celery_idem.settings_table import TABLE, InProgressPolicy, Setting, StoreErrorPolicy

__all__ = [
    "CALL_OPTIONS",
    "CALL_SETTINGS",
    "DEFAULTS",
    "KEY_OPTION",
    "SETTINGS",
    "IdemSettings",
    "InProgressPolicy",
    "StoreErrorPolicy",
    "check_call_names",
    "resolve_settings",
    "with_call_overrides",
]


DEFAULTS: Mapping[str, object] = MappingProxyType({row.name: row.default for row in TABLE})
"""Setting name -> default. ``idem_redis_url`` ``None`` means "derive from Celery's URLs";
the other ``None`` defaults mean "not used"."""

SETTINGS: tuple[str, ...] = tuple(DEFAULTS)
"""Every setting name, in documentation order. The names are a public contract."""

CALL_SETTINGS: frozenset[str] = frozenset(row.name for row in TABLE if row.per_call)
"""Settings a single call may override (they travel in the message headers).

The others decide *where* a key lives or *which* failures are replayed; changing them
per call would let two calls with the same key disagree about the record itself.
"""


KEY_OPTION = "idempotency_key"
"""The call option (and message header) that carries an explicit key."""

CALL_OPTIONS: tuple[str, ...] = (KEY_OPTION, *(row.name for row in TABLE if row.per_call))
"""Every option a call may give celery-idem: the key, then the per-call settings."""


def renewal_period(lease: float) -> float:
    """Seconds between renewals of a lease: a third of it.

    Two renewals can be missed (a slow round trip, a GC pause) before the lease runs
    out, which is why the lease must be at least one second. The renewer schedules by
    it; :attr:`IdemSettings.renew_every` reports it.
    """
    return lease / 3


@dataclass(frozen=True, slots=True)
class IdemSettings:
    """The validated settings one task runs with.

    Frozen so a resolved object can be cached per task and shared between threads,
    and so a call-level override has to produce a new object instead of leaking into
    the next message. Build it with :func:`resolve_settings`, which validates; the
    constructor itself does not.

    Attributes:
        store_url: ``idem_store_url`` as set (``None``: not set).
        redis_url: The URL in force: ``idem_store_url``, else ``idem_redis_url``, else
            the Celery URL it falls back to (``redis://``, ``rediss://``, ``unix://``,
            ``sentinel://``, ``redis+cluster://``, ``memory://`` or ``postgresql://``).
            ``None`` when no store was configured or found; the store factory raises at
            first use, so importing and configuring never fail just because it is absent.
        redis_sentinels: Sentinel addresses, when not written in the URL.
        redis_sentinel_master: The Sentinel service name, when not in the URL.
        redis_cluster: Treat ``redis_url`` as a Redis Cluster startup node.
        redis_client: A factory returning a redis-py client, for anything else.
        redis_options: Keyword arguments for redis-py's client (TLS files, ...).
        min_replicas: Replicas a claim and a completion must reach (``WAIT``).
        min_replicas_timeout: Seconds ``WAIT`` may block.
        endpoint: All of the above combined and checked (see ``endpoint.py``).
        ttl: Seconds a completed result is kept and replayed.
        lease: Seconds a claim survives without renewal; after that another run may
            take the key over.
        key_prefix: First component of every Redis key.
        scope: The task's key space (``idem_scope``), hashed into its storage keys;
            ``None``: the task's name (:meth:`scope_of`). Set on a task only.
        fingerprint: What of the arguments the mismatch check and derived keys cover
            (``idem_fingerprint``): ``True`` all, ``False`` no check, a sorted tuple of
            names and dotted paths to leave out, or a callable over the arguments.
        on_in_progress: What a duplicate does while another run holds the key.
        on_store_error: What a task does when the store is unreachable.
        cache_errors: Exception classes whose failure is stored and re-raised to
            duplicates instead of letting the key be claimed again.
        max_result_bytes: Largest encoded result that is stored.
        dedupe_on_publish: Reserve the key before publishing (one round trip) and
            return the original task's AsyncResult instead of sending a duplicate.
        require_key: Refuse a call without an explicit key (``idempotency_key`` absent
            or ``None``) at the call site, and such a message on the worker.
        max_takeovers: Takeovers of a key from attempts that stopped renewing (dead
            or stalled workers) before the key is quarantined; 0 = no cap.
        blocking_completion: Wait for the completion's answer in the task's thread
            (``True``) instead of reading it off the task's path (the default).
    """

    store_url: str | None
    redis_url: str | None
    ttl: float
    lease: float
    key_prefix: str
    on_in_progress: InProgressPolicy
    on_store_error: StoreErrorPolicy
    cache_errors: tuple[type[BaseException], ...]
    max_result_bytes: int
    dedupe_on_publish: bool = False
    require_key: bool = False
    max_takeovers: int = 5
    blocking_completion: bool = False
    redis_sentinels: tuple[tuple[str, int], ...] | None = None
    redis_sentinel_master: str | None = None
    redis_cluster: bool = False
    redis_client: Callable[[], Any] | None = None
    redis_options: Mapping[str, Any] | None = None
    min_replicas: int = 0
    min_replicas_timeout: float = 1.0
    scope: str | None = None
    fingerprint: FingerprintSetting = True
    endpoint: Endpoint | None = None

    @property
    def renew_every(self) -> float:
        """Seconds between lease renewals: :func:`renewal_period` of the lease."""
        return renewal_period(self.lease)

    def scope_of(self, task_name: str) -> str:
        """The key space of ``task_name``'s records: ``idem_scope``, else the task's name.

        The one place that default is decided: workers, publishers and ``celery idem``
        all name a task's records through it.
        """
        return self.scope or task_name


# --------------------------------------------------------------------------- validation


_ROWS: Mapping[str, Setting] = MappingProxyType({row.name: row for row in TABLE})
_FIELDS: Mapping[str, str] = MappingProxyType({row.name: row.field for row in TABLE})
_DJANGO_NAMES: Mapping[str, str] = MappingProxyType({row.name: row.django for row in TABLE})
_DJANGO_KNOWN = frozenset(_DJANGO_NAMES.values())
_APP = "app configuration"
_CALL = "call option"


def _validate(
    name: str, key: str, value: object, where: str, task_name: str | None, *, call: bool = False
) -> Any:
    """Run the validator of ``name``, turning a rejection into a full error message.

    Args:
        name: The canonical setting name.
        key: The spelling it was found under (``CELERY_IDEM_TTL`` for ``idem_ttl``).
        value: The raw value.
        where: The origin, for the message.
        task_name: Carried into the error.
        call: The value is a call's: the row's ``call_check`` applies, if it has one.
    """
    row = _ROWS[name]
    check = row.call_check if call and row.call_check is not None else row.check
    try:
        return check(value)
    except Invalid as exc:
        label = name if key == name else f"{name} (set as {key})"
        why = f" ({exc.why})" if exc.why else ""
        raise IdempotencyConfigError(
            f"{label} from {where} is invalid: {short_repr(value)}{why}; expected {row.expected}.",
            None,
            task_name,
        ) from None


_DEFAULT_VALUES: Mapping[str, Any] = MappingProxyType(
    {row.name: row.check(row.default) for row in TABLE if row.default is not None}
)


# --------------------------------------------------------------------------- names


def _unknown_name(
    key: str,
    value: object,
    candidates: tuple[str, ...],
    *,
    prefix: str,
    where: str,
    task_name: str | None,
) -> IdempotencyConfigError:
    """Build the error for a misspelt setting, suggesting the closest valid name.

    Names are compared without their shared ``prefix``: it would otherwise make
    every ``idem_*`` name look similar and suggest nonsense.
    """
    cut = len(prefix)
    close = difflib.get_close_matches(key[cut:], [c[cut:] for c in candidates], n=1)
    hint = (
        f"did you mean {prefix + close[0]!r}?"
        if close
        else f"valid names: {', '.join(candidates)}."
    )
    return IdempotencyConfigError(
        f"{key} from {where} is not a celery-idem setting (value {short_repr(value)}); {hint}",
        None,
        task_name,
    )


_CALL_ORDERED = tuple(row.name for row in TABLE if row.per_call)
_DJANGO_ORDERED = tuple(_DJANGO_NAMES.values())


def _not_per_call(key: str, value: object, task_name: str | None) -> IdempotencyConfigError:
    layers = "the task or the app" if _ROWS[key].per_app else "the task"
    return IdempotencyConfigError(
        f"{key} cannot be set per call; set it on {layers} "
        f"(call option value {short_repr(value)}; per-call settings: "
        f"{', '.join(_CALL_ORDERED)}).",
        None,
        task_name,
    )


_OURS = (KEY_OPTION, *SETTINGS)
_CALL_NAMES = frozenset(CALL_OPTIONS)
_LOOKALIKE = 0.8
"""How close (difflib's ratio) a name not starting with ``idem`` must come to one of ours
to be taken for a misspelling of it: ``indempotency_key`` (0.97), ``idm_ttl`` (0.93) are;
no option of Celery's comes near (``idempotency`` alone is 0.85)."""


@functools.lru_cache(maxsize=1024)
def _call_name_problem(name: str) -> str | None:
    """Why ``name`` is refused as a call option (a hint), or None if it is not ours.

    Cached: the same few option names come back on every publish.
    """
    if name in _CALL_NAMES:
        return None
    lowered = name.lower()
    if not lowered.startswith("idem") and not difflib.get_close_matches(
        lowered, _OURS, n=1, cutoff=_LOOKALIKE
    ):
        return None  # Celery's own options, routing options, the user's own
    close: list[str] = []
    if lowered.startswith("idem_"):  # compared without the shared prefix, as settings are
        stem = difflib.get_close_matches(lowered[5:], [c[5:] for c in _CALL_ORDERED], n=1)
        close = ["idem_" + stem[0]] if stem else []
    close = close or difflib.get_close_matches(lowered, CALL_OPTIONS, n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    close = difflib.get_close_matches(lowered, SETTINGS, n=1)
    if close:
        return f"did you mean {close[0]!r}? (set on the task or the app: it is not per call)"
    return f"celery-idem's call options: {', '.join(CALL_OPTIONS)}."


def check_call_names(options: Mapping[str, Any], *, task_name: str | None = None) -> None:
    """Refuse a call option that looks like one of celery-idem's but is not one.

    ``apply_async`` hands every option it does not know to Celery, which ignores what
    it does not know either, so ``idempotancy_key=K`` used to be dropped and the key
    derived from the arguments instead. A name that starts with ``idem`` (any case), or
    comes close to one of ours (``indempotency_key``), is refused with the nearest valid
    name; Celery's own options and every other name are left alone.

    Raises:
        IdempotencyConfigError: A misspelt option, or a setting that cannot be set per
            call.
    """
    for name, value in options.items():
        if not isinstance(name, str) or name in _CALL_NAMES:
            continue
        if name in _FIELDS:
            raise _not_per_call(name, value, task_name)
        hint = _call_name_problem(name)
        if hint is not None:
            raise IdempotencyConfigError(
                f"{name} from {_CALL} is not a celery-idem call option "
                f"(value {short_repr(value)}); {hint}",
                None,
                task_name,
            )


def _check_app_names(app_conf: Mapping[str, Any], task_name: str | None) -> None:
    """Refuse misspelt ``idem_*`` / ``CELERY_IDEM_*`` keys; ignore all other keys.

    A typo in configuration would otherwise silently leave the default in force.
    """
    for key in app_conf:
        if not isinstance(key, str):
            continue
        if key.startswith("idem_"):
            if key not in _FIELDS:
                raise _unknown_name(
                    key,
                    app_conf.get(key),
                    SETTINGS,
                    prefix="idem_",
                    where=_APP,
                    task_name=task_name,
                )
        elif key.startswith("CELERY_IDEM_") and key not in _DJANGO_KNOWN:
            raise _unknown_name(
                key,
                app_conf.get(key),
                _DJANGO_ORDERED,
                prefix="CELERY_IDEM_",
                where=_APP,
                task_name=task_name,
            )


def _task_where(task_name: str | None) -> str:
    return f"task option of {task_name!r}" if task_name else "task option"


def _call_where(task_name: str | None) -> str:
    return f"{_CALL} of {task_name!r}" if task_name else _CALL


def _endpoint(
    values: Mapping[str, Any], app_conf: Mapping[str, Any], task_name: str | None
) -> tuple[str | None, Endpoint | None]:
    """Combine the store settings; an error names the setting at fault.

    Returns:
        The URL in force (``idem_redis_url`` or the Celery URL it falls back to, unless
        ``idem_redis_sentinels`` or ``idem_redis_client`` replace it) and the endpoint.
    """
    store_url, redis_url = values["store_url"], values["redis_url"]
    if store_url is not None and redis_url is not None and store_url != redis_url:
        raise IdempotencyConfigError(
            f"idem_store_url ({sanitize_url(store_url)!r}) and idem_redis_url "
            f"({sanitize_url(redis_url)!r}) name two stores: keep idem_store_url only "
            "(idem_redis_url is its older, Redis-only spelling).",
            None,
            task_name,
        )
    url, options, master_name = celery_fallback(
        app_conf,
        url=store_url if store_url is not None else redis_url,
        sentinels=values["redis_sentinels"],
        factory=values["redis_client"],
        options=values["redis_options"],
    )
    try:
        endpoint = build_endpoint(
            url=url,
            sentinels=values["redis_sentinels"],
            sentinel_master=values["redis_sentinel_master"],
            cluster=values["redis_cluster"],
            factory=values["redis_client"],
            options=options,
            min_replicas=values["min_replicas"],
            replicas_timeout=values["min_replicas_timeout"],
            celery_master_name=master_name,
        )
    except EndpointError as exc:
        raise IdempotencyConfigError(
            f"{exc.setting} is invalid: {exc.why}.", None, task_name
        ) from None
    return url, endpoint


# --------------------------------------------------------------------------- resolution


def resolve_settings(
    app_conf: Mapping[str, Any],
    task_options: Mapping[str, Any] | None = None,
    call_options: Mapping[str, Any] | None = None,
    *,
    task_name: str | None = None,
) -> IdemSettings:
    """Resolve and validate every setting: call > task > app > default.

    Precedence is decided here (the call layer through :func:`with_call_overrides`)
    and nowhere else, so every component sees the same answer. A value of ``None``
    in a layer means "not set there" and falls through, which lets decorators pass
    every option without overriding the app.

    Args:
        app_conf: Celery's ``app.conf`` or any mapping. ``idem_ttl`` is read, then the
            Django spelling ``CELERY_IDEM_TTL``. Unrelated keys are ignored; unknown
            ``idem_*`` keys are refused as typos.
        task_options: Options given on the task (decorator or class attributes).
        call_options: Per-call overrides from the message; only
            :data:`CALL_SETTINGS` are allowed.
        task_name: The task's name, for error messages.

    Returns:
        The frozen settings. Callers cache it per task; per message use
        :func:`with_call_overrides` on the cached object.

    Raises:
        IdempotencyConfigError: A value is invalid, a name is misspelt, or a call
            option names a setting that cannot be set per call.
    """
    _check_app_names(app_conf, task_name)
    task_where = _task_where(task_name)
    if task_options:
        for key in task_options:
            if isinstance(key, str) and key.startswith("idem_") and key not in _FIELDS:
                raise _unknown_name(
                    key,
                    task_options[key],
                    SETTINGS,
                    prefix="idem_",
                    where=task_where,
                    task_name=task_name,
                )

    values: dict[str, Any] = {}
    for name in SETTINGS:
        raw = task_options.get(name) if task_options else None
        if raw is not None:
            values[_FIELDS[name]] = _validate(name, name, raw, task_where, task_name)
            continue
        key = name
        raw = app_conf.get(name)
        if raw is None:
            key = _DJANGO_NAMES[name]
            raw = app_conf.get(key)
        if raw is not None and not _ROWS[name].per_app:
            raise IdempotencyConfigError(
                f"{key} cannot be set in the app configuration (value {short_repr(raw)}): it "
                f"names one task's key space, and the app would give it to every task, "
                f"merging their records; set it on the task, as in "
                f"@app.task(base=IdempotentTask, {name}=...).",
                None,
                task_name,
            )
        if raw is not None:
            values[_FIELDS[name]] = _validate(name, key, raw, _APP, task_name)
        else:
            values[_FIELDS[name]] = _DEFAULT_VALUES.get(name)
    values["redis_url"], values["endpoint"] = _endpoint(values, app_conf, task_name)
    settings = IdemSettings(**values)
    if call_options:
        return with_call_overrides(settings, call_options, task_name=task_name)
    return settings


def with_call_overrides(
    base: IdemSettings,
    call_options: Mapping[str, Any],
    *,
    task_name: str | None = None,
) -> IdemSettings:
    """Apply per-call overrides to already resolved settings.

    The per-message path: only the overridden names are validated, and ``base``
    itself is returned when nothing is overridden, so the common case allocates
    nothing. Keys not starting with ``idem_`` are ignored, so the whole header
    mapping may be passed.

    Args:
        base: Settings from :func:`resolve_settings` (usually cached).
        call_options: The call's options; ``None`` values mean "not set".
        task_name: The task's name, for error messages.

    Returns:
        ``base`` when no :data:`CALL_SETTINGS` is set, else a new object.

    Raises:
        IdempotencyConfigError: A value is invalid, or an ``idem_*`` name is not a
            per-call setting (or is misspelt).
    """
    changes: dict[str, Any] | None = None
    for key, raw in call_options.items():
        if key not in CALL_SETTINGS:
            if isinstance(key, str) and key.startswith("idem_"):
                if key in _FIELDS:
                    raise _not_per_call(key, raw, task_name)
                raise _unknown_name(
                    key,
                    raw,
                    _CALL_ORDERED,
                    prefix="idem_",
                    where=_call_where(task_name),
                    task_name=task_name,
                )
            continue
        if raw is None:
            continue
        if changes is None:
            changes = {}
        changes[_FIELDS[key]] = _validate(
            key, key, raw, _call_where(task_name), task_name, call=True
        )
    if changes is None:
        return base
    return dataclasses.replace(base, **changes)
