"""Checks: what each setting accepts, one validator per kind of value.

This module owns the validators behind the settings table (``settings_table``): each
takes a raw value and returns it normalised, or raises :class:`Invalid` saying why.
They know neither the setting's name nor where the value came from; ``config`` adds
both to the message, so every error reads the same way.

Pure: imports neither celery nor redis.
"""

from __future__ import annotations

import builtins
import enum
import importlib
import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

from celery_idem.endpoint import (
    STORE_SCHEMES,
    URL_SCHEMES,
    EndpointError,
    parse_sentinels,
    url_scheme,
)
from celery_idem.exceptions import IdempotencyConfigError
from celery_idem.fingerprint import FingerprintSetting, parse_paths


class Invalid(Exception):
    """Raised by a validator; the caller turns it into IdempotencyConfigError.

    Keeping validators ignorant of names and origins lets one table describe each
    setting and one function format every message the same way.
    """

    def __init__(self, why: str = "") -> None:
        super().__init__(why)
        self.why = why


MAX_PREFIX_LEN = 64
MAX_SCOPE_LEN = 200
"""Longest ``idem_scope``: a task name's length, with room to spare."""
MAX_REPR = 80

MAX_DURATION = 315_360_000
"""The longest duration, in seconds, celery-idem takes anywhere: ten years of 365 days.

Every setting in seconds (``idem_ttl``, ``idem_lease``, ``idem_min_replicas_timeout``)
is refused above it at start, and both stores refuse any longer duration they are
handed (a claim's lease and ttl, a renewal's lease, a completion's ttl, a parking's
hold), through :func:`check_store_durations`: what the memory store accepts in a test,
Redis holds in production.

Why a bound: Redis takes expiries in whole milliseconds (``PX``, ``PEXPIRE``, ``WAIT``)
and refuses one past 2**63 ms as "value is not an integer or out of range", and the
scripts add durations to the server's clock in Lua numbers, which are doubles, exact
only below 2**53 ms (about 285,000 years). The largest sum a script makes is the clock
(1.8e12 ms in 2026) plus twice a duration (a claim's record lives ttl + lease; renewal
and parking keep twice the lease or hold): with ten years, under 2.5e12 ms, exact with
three orders of magnitude to spare for centuries. Why ten years: a record is a key's
memory of one request, not an archive, and a lease that long would already keep a dead
worker's key blocked for a decade.
"""


def a_kind(value: object) -> str:
    """``"an int"``, ``"a str"``: the value's type with its article, for messages."""
    name = type(value).__name__
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"


def short_repr(value: object) -> str:
    """Return ``repr(value)`` cut to a length that keeps one error message readable."""
    text = repr(value)
    if len(text) > MAX_REPR:
        return text[: MAX_REPR - 3] + "..."
    return text


def check_redis_url(value: object) -> str:
    """A store URL: the scheme alone is checked here; ``endpoint`` parses the rest."""
    if not isinstance(value, str):
        raise Invalid("not a str")
    if url_scheme(value) not in URL_SCHEMES:
        raise Invalid("unsupported scheme")
    return value


def check_store_url(value: object) -> str:
    """``idem_store_url``: any ``idem_redis_url`` form, or a PostgreSQL URL."""
    if not isinstance(value, str):
        raise Invalid("not a str")
    if url_scheme(value) not in STORE_SCHEMES:
        raise Invalid("unsupported scheme")
    return value


def duration_problem(seconds: float) -> str | None:
    """Why no store can hold a duration of ``seconds``, or None when every store can.

    The one test of :data:`MAX_DURATION`, shared by the settings' validators and both
    stores, so the three cannot drift apart.
    """
    if not math.isfinite(seconds):
        return "not finite"
    if seconds > MAX_DURATION:
        return f"more than the maximum of {MAX_DURATION} s, 10 years"
    return None


def check_store_durations(**durations: float) -> None:
    """Refuse a duration no store can hold, before anything is read or written.

    Each store calls it with the durations one call was handed (``lease=``, ``ttl=``,
    ``hold=``). Validated settings never get here; a direct call, or a retry whose
    countdown is longer than :data:`MAX_DURATION`, does.

    Raises:
        IdempotencyConfigError: naming the argument, its value and the maximum.
    """
    for name, value in durations.items():
        problem = duration_problem(value)
        if problem is not None:
            raise IdempotencyConfigError(
                f"a store call was given {name}={short_repr(value)} seconds, {problem}: "
                f"Redis keeps durations in exact milliseconds (see idem_ttl, idem_lease)."
            )


def seconds(value: object, *, minimum: float, inclusive: bool) -> float:
    """Validate a duration in seconds, at most :data:`MAX_DURATION`.

    ``bool`` is refused though it is an ``int``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Invalid(f"{a_kind(value)}, not a number")
    try:
        seconds = float(value)
    except OverflowError:
        raise Invalid("too large") from None
    problem = duration_problem(seconds)
    if problem is not None:
        raise Invalid(problem)
    if seconds < minimum or (not inclusive and seconds == minimum):
        raise Invalid("out of range")
    return seconds


def check_ttl(value: object) -> float:
    """Retention of a result: any positive duration."""
    return seconds(value, minimum=0.0, inclusive=False)


def check_lease(value: object) -> float:
    """At least a second: renewals every lease/3 must survive a slow round trip."""
    return seconds(value, minimum=1.0, inclusive=True)


def check_key_prefix(value: object) -> str:
    """A prefix without braces: a hash tag would pile every record into one Cluster slot."""
    if not isinstance(value, str):
        raise Invalid(f"{a_kind(value)}, not a str")
    if not value:
        raise Invalid("empty")
    if len(value) > MAX_PREFIX_LEN:
        raise Invalid(f"{len(value)} characters")
    if "{" in value or "}" in value:
        raise Invalid("contains a brace")
    if any(ch.isspace() for ch in value):
        raise Invalid("contains whitespace")
    return value


_E = TypeVar("_E", bound=enum.Enum)


def policy_parser(members: type[_E]) -> Callable[[object], _E]:
    """Build a parser accepting a member or its value in any letter case."""
    by_value: dict[str, _E] = {str(m.value): m for m in members}

    def parse(value: object) -> _E:
        if isinstance(value, members):
            return value
        if isinstance(value, str):
            member = by_value.get(value.lower())
            if member is not None:
                return member
        raise Invalid()

    return parse


def import_dotted(name: str) -> object:
    """Import ``package.module.ClassName`` (nested attributes allowed).

    A name without a dot is looked up in :mod:`builtins`, so ``"ValueError"`` works.
    The longest importable module prefix wins, which also finds nested classes.
    """
    parts = name.split(".")
    if any(not part for part in parts):
        raise Invalid(f"entry {name!r} is not a dotted name")
    if len(parts) == 1:
        if not hasattr(builtins, name):
            raise Invalid(f"entry {name!r} is not a builtin; use 'package.module.{name}'")
        return getattr(builtins, name)
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj: object = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            if module_name == missing or module_name.startswith(missing + "."):
                continue  # this prefix is not a module; try a shorter one
            raise Invalid(f"entry {name!r}: importing {module_name!r} failed: {exc}") from None
        except Exception as exc:
            raise Invalid(
                f"entry {name!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
            ) from None
        for attr in parts[split:]:
            try:
                obj = getattr(obj, attr)
            except AttributeError:
                raise Invalid(f"entry {name!r}: {attr!r} not found in {module_name!r}") from None
        return obj
    raise Invalid(f"entry {name!r}: no module {parts[0]!r} can be imported")


def check_cache_errors(value: object) -> tuple[type[BaseException], ...]:
    """Exception classes (or their dotted names), imported now so a typo fails at start."""
    entries: tuple[object, ...]
    if isinstance(value, (tuple, list, set, frozenset)):
        entries = tuple(value)
    elif isinstance(value, (str, type)):
        entries = (value,)
    else:
        raise Invalid(f"{a_kind(value)}")
    classes: list[type[BaseException]] = []
    for entry in entries:
        resolved = import_dotted(entry) if isinstance(entry, str) else entry
        if not (isinstance(resolved, type) and issubclass(resolved, BaseException)):
            raise Invalid(f"entry {short_repr(entry)} is not an exception class")
        if resolved not in classes:
            classes.append(resolved)
    return tuple(classes)


def check_bool(value: object) -> bool:
    """Only a real bool: ``"false"`` from an environment variable would be truthy."""
    if not isinstance(value, bool):
        raise Invalid(f"{a_kind(value)}, not a bool")
    return value


def check_sentinels(value: object) -> tuple[tuple[str, int], ...]:
    """Sentinel addresses, in any of the forms ``endpoint.parse_sentinels`` accepts."""
    try:
        return parse_sentinels(value)
    except EndpointError as exc:
        raise Invalid(exc.why) from None


def check_name(value: object) -> str:
    """A non-empty name (a Sentinel service)."""
    if not isinstance(value, str) or not value.strip():
        raise Invalid("not a non-empty str")
    return value


def check_client_factory(value: object) -> Callable[[], Any]:
    """A callable, or the dotted name of one, imported now so a typo fails at start."""
    factory = import_dotted(value) if isinstance(value, str) else value
    if not callable(factory):
        raise Invalid(f"{short_repr(value)} is not callable")
    return factory


def check_options(value: object) -> Mapping[str, Any]:
    """Keyword arguments for redis-py, frozen so the settings stay immutable."""
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise Invalid(f"{a_kind(value)}, not a dict with str keys")
    return MappingProxyType(dict(value))


def check_min_replicas(value: object) -> int:
    """A replica count; 0 turns ``WAIT`` off."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"{a_kind(value)}, not an int")
    if value < 0:
        raise Invalid("negative")
    return value


def check_max_result_bytes(value: object) -> int:
    """A positive size in bytes."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"{a_kind(value)}, not an int")
    if value <= 0:
        raise Invalid("out of range")
    return value


def check_fingerprint(value: object) -> FingerprintSetting:
    """``idem_fingerprint``: True, False, a list of names and dotted paths, or a callable.

    A list comes back as a sorted tuple without duplicates (the same setting however it
    was written), an empty one as True (nothing left out). A bare str is refused: it
    could be one path or a callable's dotted name, and guessing wrong would silently
    check the wrong thing.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        raise Invalid(f"a single str; give a list, e.g. [{value!r}]")
    if isinstance(value, (list, tuple, set, frozenset)):
        try:
            paths = parse_paths(value)
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        return paths or True
    if callable(value):
        return value
    raise Invalid(a_kind(value))


def check_call_fingerprint(value: object) -> FingerprintSetting:
    """``idem_fingerprint`` for one call: it travels in a header, so no callable."""
    if callable(value) and not isinstance(value, bool):
        raise Invalid(
            "a callable cannot travel in a message header; per call give True, False or "
            "a list of names and dotted paths, and set a callable on the task or the app"
        )
    return check_fingerprint(value)


def check_scope(value: object) -> str:
    """``idem_scope``: a task's key space, hashed into every storage key of the task."""
    if not isinstance(value, str):
        raise Invalid(f"{a_kind(value)}, not a str")
    if not value.strip():
        raise Invalid("empty")
    if value != value.strip():
        raise Invalid("leading or trailing whitespace")
    if len(value) > MAX_SCOPE_LEN:
        raise Invalid(f"{len(value)} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Invalid("not valid text (a lone surrogate)") from None
    return str.__str__(value)
