"""Configuration: the settings, their defaults, validation, and precedence.

This module owns the settings, their defaults, validation, and the one place where
precedence call > task > app > default is decided. Everything else in celery-idem
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
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from celery_idem.checks import (
    MAX_DURATION,
    MAX_PREFIX_LEN,
    REDIS_SCHEMES,
    Invalid,
    check_bool,
    check_cache_errors,
    check_client_factory,
    check_key_prefix,
    check_lease,
    check_max_result_bytes,
    check_min_replicas,
    check_name,
    check_options,
    check_redis_url,
    check_sentinels,
    check_ttl,
    policy_parser,
    seconds,
    short_repr,
    url_scheme,
)
from celery_idem.endpoint import Endpoint, EndpointError, build_endpoint
from celery_idem.exceptions import IdempotencyConfigError

__all__ = [
    "CALL_SETTINGS",
    "DEFAULTS",
    "SETTINGS",
    "IdemSettings",
    "InProgressPolicy",
    "StoreErrorPolicy",
    "resolve_settings",
    "with_call_overrides",
]


class InProgressPolicy(str, enum.Enum):
    """What a duplicate does when another live run holds its key."""

    RETRY = "retry"
    """Retry the task later (Celery retry with countdown); the worker slot is freed."""
    WAIT = "wait"
    """Block the worker, polling until the owner completes or its lease runs out."""
    RAISE = "raise"
    """Fail at once with :class:`~celery_idem.exceptions.DuplicateInProgress`."""


class StoreErrorPolicy(str, enum.Enum):
    """What a task does when the idempotency store cannot be reached."""

    RETRY = "retry"
    """Retry the task later; nothing runs without a claim (the safe default)."""
    RUN = "run"
    """Run the body unprotected: availability over at-most-once."""
    RAISE = "raise"
    """Fail with :class:`~celery_idem.exceptions.StoreUnavailable`."""


DEFAULTS: Mapping[str, object] = MappingProxyType(
    {
        "idem_redis_url": None,
        "idem_redis_sentinels": None,
        "idem_redis_sentinel_master": None,
        "idem_redis_cluster": False,
        "idem_redis_client": None,
        "idem_redis_options": None,
        "idem_min_replicas": 0,
        "idem_min_replicas_timeout": 1.0,
        "idem_ttl": 86400,
        "idem_lease": 60,
        "idem_key_prefix": "idem",
        "idem_on_in_progress": InProgressPolicy.RETRY,
        "idem_on_store_error": StoreErrorPolicy.RETRY,
        "idem_cache_errors": (),
        "idem_max_result_bytes": 1048576,
        "idem_dedupe_on_publish": False,
        "idem_max_takeovers": 5,
    }
)
"""Setting name -> default. ``idem_redis_url`` ``None`` means "derive from Celery's URLs";
the other ``None`` defaults mean "not used"."""

SETTINGS: tuple[str, ...] = tuple(DEFAULTS)
"""Every setting name, in documentation order. The names are a public contract."""

CALL_SETTINGS: frozenset[str] = frozenset(
    {
        "idem_ttl",
        "idem_lease",
        "idem_on_in_progress",
        "idem_on_store_error",
        "idem_max_result_bytes",
    }
)
"""Settings a single call may override (they travel in the message headers).

The others decide *where* a key lives or *which* failures are replayed; changing them
per call would let two calls with the same key disagree about the record itself.
"""


@dataclass(frozen=True, slots=True)
class IdemSettings:
    """The validated settings one task runs with.

    Frozen so a resolved object can be cached per task and shared between threads,
    and so a call-level override has to produce a new object instead of leaking into
    the next message. Build it with :func:`resolve_settings`, which validates; the
    constructor itself does not.

    Attributes:
        redis_url: Where records live (``redis://``, ``rediss://``, ``unix://``,
            ``sentinel://``, ``redis+cluster://`` or ``memory://``). ``None`` when no
            Redis was configured or found; the store factory raises at first use, so
            importing and configuring never fail just because Redis is absent.
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
        on_in_progress: What a duplicate does while another run holds the key.
        on_store_error: What a task does when the store is unreachable.
        cache_errors: Exception classes whose failure is stored and re-raised to
            duplicates instead of letting the key be claimed again.
        max_result_bytes: Largest encoded result that is stored.
        dedupe_on_publish: Look the key up before publishing (one round trip) and
            return the original task's AsyncResult instead of sending a duplicate.
        max_takeovers: Takeovers of a key from attempts that stopped renewing (dead
            or stalled workers) before the key is quarantined; 0 = no cap.
    """

    redis_url: str | None
    ttl: float
    lease: float
    key_prefix: str
    on_in_progress: InProgressPolicy
    on_store_error: StoreErrorPolicy
    cache_errors: tuple[type[BaseException], ...]
    max_result_bytes: int
    dedupe_on_publish: bool = False
    max_takeovers: int = 5
    redis_sentinels: tuple[tuple[str, int], ...] | None = None
    redis_sentinel_master: str | None = None
    redis_cluster: bool = False
    redis_client: Callable[[], Any] | None = None
    redis_options: Mapping[str, Any] | None = None
    min_replicas: int = 0
    min_replicas_timeout: float = 1.0
    endpoint: Endpoint | None = None

    @property
    def renew_every(self) -> float:
        """Seconds between lease renewals: a third of the lease.

        Two renewals can be missed (a slow round trip, a GC pause) before the lease
        runs out, which is why the lease must be at least one second.
        """
        return self.lease / 3


# --------------------------------------------------------------------------- validation


_UP_TO = f"<= {MAX_DURATION} (10 years)"

_RULES: Mapping[str, tuple[Callable[[object], Any], str]] = MappingProxyType(
    {
        "idem_redis_url": (
            check_redis_url,
            "a str URL with scheme redis://, rediss://, unix:// (or redis+socket://), sentinel://, "
            "redis+cluster://, rediss+cluster:// or memory://",
        ),
        "idem_redis_sentinels": (
            check_sentinels,
            "Sentinel addresses: 'h1:26379;h2:26379' or a list of 'host:port' / (host, port)",
        ),
        "idem_redis_sentinel_master": (check_name, "the Sentinel service name, a str"),
        "idem_redis_cluster": (check_bool, "True or False"),
        "idem_redis_client": (
            check_client_factory,
            "a callable returning a redis-py client, or its dotted name 'package.module.make'",
        ),
        "idem_redis_options": (
            check_options,
            "a dict of redis-py client keyword arguments (e.g. ssl_ca_certs, socket_timeout)",
        ),
        "idem_min_replicas": (check_min_replicas, "an int >= 0 (not bool)"),
        "idem_min_replicas_timeout": (
            lambda v: seconds(v, minimum=0.0, inclusive=False),
            f"seconds as an int or float > 0 and {_UP_TO} (not bool)",
        ),
        "idem_ttl": (check_ttl, f"seconds as an int or float > 0 and {_UP_TO} (not bool)"),
        "idem_lease": (
            check_lease,
            f"seconds as an int or float >= 1 and {_UP_TO} (not bool); a shorter lease "
            "cannot be renewed reliably",
        ),
        "idem_key_prefix": (
            check_key_prefix,
            f"a non-empty str of at most {MAX_PREFIX_LEN} characters without whitespace "
            "or '{' '}' (braces would change Redis Cluster hash slots)",
        ),
        "idem_on_in_progress": (
            policy_parser(InProgressPolicy),
            "one of 'retry', 'wait', 'raise' (any case) or an InProgressPolicy member",
        ),
        "idem_on_store_error": (
            policy_parser(StoreErrorPolicy),
            "one of 'retry', 'run', 'raise' (any case) or a StoreErrorPolicy member",
        ),
        "idem_cache_errors": (
            check_cache_errors,
            "an exception class or dotted name 'package.module.ClassName', or a "
            "tuple/list/set of them",
        ),
        "idem_max_result_bytes": (check_max_result_bytes, "an int > 0 (not bool)"),
        "idem_dedupe_on_publish": (check_bool, "True or False"),
        "idem_max_takeovers": (check_min_replicas, "an int >= 0 (not bool); 0 = no cap"),
    }
)

_FIELDS: Mapping[str, str] = MappingProxyType({name: name[5:] for name in SETTINGS})
_DJANGO_PREFIX = "CELERY_"
_DJANGO_NAMES: Mapping[str, str] = MappingProxyType(
    {name: _DJANGO_PREFIX + name.upper() for name in SETTINGS}
)
_DJANGO_KNOWN = frozenset(_DJANGO_NAMES.values())
_APP = "app configuration"
_CALL = "call option"


def _validate(name: str, key: str, value: object, where: str, task_name: str | None) -> Any:
    """Run the validator of ``name``, turning a rejection into a full error message.

    Args:
        name: The canonical setting name.
        key: The spelling it was found under (``CELERY_IDEM_TTL`` for ``idem_ttl``).
        value: The raw value.
        where: The origin, for the message.
        task_name: Carried into the error.
    """
    check, expected = _RULES[name]
    try:
        return check(value)
    except Invalid as exc:
        label = name if key == name else f"{name} (set as {key})"
        why = f" ({exc.why})" if exc.why else ""
        raise IdempotencyConfigError(
            f"{label} from {where} is invalid: {short_repr(value)}{why}; expected {expected}.",
            None,
            task_name,
        ) from None


_DEFAULT_VALUES: Mapping[str, Any] = MappingProxyType(
    {name: _RULES[name][0](DEFAULTS[name]) for name in SETTINGS if DEFAULTS[name] is not None}
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


_CALL_ORDERED = tuple(name for name in SETTINGS if name in CALL_SETTINGS)
_DJANGO_ORDERED = tuple(_DJANGO_NAMES.values())


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


def _redis_fallback(app_conf: Mapping[str, Any]) -> tuple[str | None, Mapping[str, Any]]:
    """Reuse Celery's result backend, else its broker, when either is a Redis URL.

    Celery's ``app.conf`` exposes ``result_backend`` and ``broker_url`` as properties
    that also honour the ``CELERY_RESULT_BACKEND`` / ``CELERY_BROKER_URL`` environment
    variables; reading the attribute first finds the same server Celery connects to.
    A plain dict has no such attribute and is read by key (either spelling).

    Returns:
        The URL, and that side's transport options (where Celery keeps a
        ``sentinel://`` URL's ``master_name`` and ``sentinel_kwargs``).
    """
    for attr, options in (("result_backend", "result_backend"), ("broker_url", "broker")):
        url = getattr(app_conf, attr, None)
        if url is None:
            url = app_conf.get(attr)
            if url is None:
                url = app_conf.get(f"CELERY_{attr.upper()}")
        if isinstance(url, str) and url_scheme(url) in REDIS_SCHEMES:
            name = f"{options}_transport_options"
            transport = app_conf.get(name) or app_conf.get(f"CELERY_{name.upper()}") or {}
            return url, transport if isinstance(transport, Mapping) else {}
    return None, {}


def _endpoint(
    values: Mapping[str, Any], app_conf: Mapping[str, Any], task_name: str | None
) -> tuple[str | None, Endpoint | None]:
    """Combine the store settings; an error names the setting at fault.

    Returns:
        The URL in force (``idem_redis_url`` or the Celery URL it falls back to, unless
        ``idem_redis_sentinels`` or ``idem_redis_client`` replace it) and the endpoint.
    """
    url: str | None = values["redis_url"]
    transport: Mapping[str, Any] = {}
    options = values["redis_options"]
    if url is None and values["redis_sentinels"] is None and values["redis_client"] is None:
        url, transport = _redis_fallback(app_conf)
        sentinel_kwargs = transport.get("sentinel_kwargs")
        if url_scheme(url or "") == "sentinel" and isinstance(sentinel_kwargs, Mapping):
            # Celery's Sentinels' own options (their password) come along with the URL.
            options = {"sentinel_kwargs": dict(sentinel_kwargs), **(options or {})}
    master_name = transport.get("master_name")
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
            celery_master_name=master_name if isinstance(master_name, str) else None,
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
                    raise IdempotencyConfigError(
                        f"{key} cannot be set per call; set it on the task or the app "
                        f"(call option value {short_repr(raw)}; per-call settings: "
                        f"{', '.join(_CALL_ORDERED)}).",
                        None,
                        task_name,
                    )
                raise _unknown_name(
                    key, raw, _CALL_ORDERED, prefix="idem_", where=_CALL, task_name=task_name
                )
            continue
        if raw is None:
            continue
        if changes is None:
            changes = {}
        changes[_FIELDS[key]] = _validate(key, key, raw, _CALL, task_name)
    if changes is None:
        return base
    return dataclasses.replace(base, **changes)
