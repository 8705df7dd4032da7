"""Checks: what each setting accepts, one validator per kind of value.

This module owns the validators behind ``config``'s table of settings: each takes a
raw value and returns it normalised, or raises :class:`Invalid` saying why. They know
neither the setting's name nor where the value came from; ``config`` adds both to the
message, so every error reads the same way.

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

from celery_idem.endpoint import EndpointError, parse_sentinels


class Invalid(Exception):
    """Raised by a validator; the caller turns it into IdempotencyConfigError.

    Keeping validators ignorant of names and origins lets one table describe each
    setting and one function format every message the same way.
    """

    def __init__(self, why: str = "") -> None:
        super().__init__(why)
        self.why = why


REDIS_SCHEMES = frozenset({"redis", "rediss", "unix", "redis+socket", "socket", "sentinel"})
URL_SCHEMES = REDIS_SCHEMES | {"memory", "redis+cluster", "rediss+cluster"}
MAX_PREFIX_LEN = 64
MAX_REPR = 80


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


def url_scheme(value: str) -> str:
    """Return the lower-cased scheme of a URL, or ``""`` when it has none."""
    scheme, sep, _ = value.partition("://")
    return scheme.lower() if sep else ""


def check_redis_url(value: object) -> str:
    """A store URL: the scheme alone is checked here; ``endpoint`` parses the rest."""
    if not isinstance(value, str):
        raise Invalid("not a str")
    if url_scheme(value) not in URL_SCHEMES:
        raise Invalid("unsupported scheme")
    return value


def seconds(value: object, *, minimum: float, inclusive: bool) -> float:
    """Validate a duration in seconds; ``bool`` is refused though it is an ``int``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Invalid(f"{a_kind(value)}, not a number")
    try:
        seconds = float(value)
    except OverflowError:
        raise Invalid("too large") from None
    if not math.isfinite(seconds):
        raise Invalid("not finite")
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
