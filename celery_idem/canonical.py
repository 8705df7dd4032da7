"""Canonical encoding of task arguments, and their fingerprint.

This module owns one promise: the same call gives the same text, before and after
the broker. A positional and a keyword call, kwargs in any order, a tuple or a list
(they arrive alike after JSON), aware datetimes in any zone (normalised to UTC): each
pair encodes to the same deterministic JSON text, and different argument sets never
do. Types JSON lacks (UUID, Decimal, datetime, date, time, bytes, sets) are tagged
(``{"$uuid": ...}``); a user dict key starting with ``$`` is escaped so it cannot pose
as a tag. Anything else is refused with an error naming the argument's path.

Pure: standard library only. Runs on every execution, so the successful path does no
string work for error messages (paths are built only while an error travels up).
"""

from __future__ import annotations

import base64
import datetime as _dt
import decimal
import enum
import hashlib
import json
import math
import uuid
from collections.abc import Mapping, Sequence

from celery_idem.exceptions import UnencodableArgument

__all__ = [
    "b64",
    "canonical_encode",
    "dict_key",
    "encode_arguments",
    "encode_returned",
    "fingerprint_of",
    "type_name",
]

_ADVICE = "pass a primitive value such as its id, or give the task an idempotency_key rule"

# One encoder for every call: ``json.dumps`` with non-default options builds a new
# ``JSONEncoder`` each time. ``check_circular`` is off because the structure it sees
# was built by ``_convert``, which already refuses cycles.
_dump = json.JSONEncoder(
    ensure_ascii=False,
    check_circular=False,
    allow_nan=True,
    sort_keys=True,
    separators=(",", ":"),
).encode


class _Unencodable(Exception):
    """Raised deep inside ``_convert``; each container on the way up adds its path step.

    Building the path only on failure keeps the successful path free of string work.
    """

    def __init__(self, value: object, reason: str, cause: BaseException | None = None) -> None:
        super().__init__(reason)
        self.value = value
        self.reason = reason
        self.cause = cause
        self.steps: list[str] = []


def type_name(cls: type) -> str:
    """``module.Qualname`` of a class (bare for builtins), as error messages show it."""
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _unencodable(
    value: object, lenient: bool, reason: str | None = None, cause: BaseException | None = None
) -> object:
    """Refuse ``value``: raise in strict mode, stand in a type marker in lenient mode.

    Lenient mode is used when the key does not come from the arguments (explicit key
    or rule): the fingerprint then only guards against misuse, so an object that has
    no canonical form is recorded by its type instead of making the call fail.
    """
    name = type_name(type(value))
    if lenient:
        return {"$unencodable": name}
    if reason is None:
        reason = f"is a {name}, which has no canonical encoding"
    raise _Unencodable(value, reason, cause)


def _convert(value: object, lenient: bool, active: set[int]) -> object:
    """Return a JSON-ready structure for ``value`` (the canonical form).

    Args:
        value: The value to convert.
        lenient: Replace unencodable values by a type marker instead of raising.
        active: ids of the containers being converted (the current path), to detect
            a container that contains itself without refusing shared references.

    Raises:
        _Unencodable: In strict mode, for a value without canonical form.
    """
    cls = type(value)
    # Exact JSON types first: they are almost every argument ever passed.
    if cls is str or cls is int or cls is float or cls is bool or value is None:
        return value
    if cls is list or cls is tuple:
        return _convert_sequence(value, lenient, active)  # type: ignore[arg-type]
    if cls is dict:
        return _convert_dict(value, lenient, active)  # type: ignore[arg-type]
    return _convert_other(value, lenient, active)


def _convert_sequence(value: Sequence[object], lenient: bool, active: set[int]) -> object:
    # A tuple reaches the worker as a list (JSON has no tuple), so both encode alike.
    ident = id(value)
    if ident in active:
        return _unencodable(value, lenient, f"is a {type_name(type(value))} that contains itself")
    active.add(ident)
    out: list[object] = []
    append = out.append
    index = 0
    try:
        for index, item in enumerate(value):  # noqa: B007 - read on failure
            append(_convert(item, lenient, active))
    except _Unencodable as err:
        err.steps.append(f"[{index}]")
        raise
    finally:
        active.discard(ident)
    return out


def dict_key(key: object) -> str | None:
    """Convert a dict key the way ``json.dumps`` does, or ``None`` if it cannot.

    Matching ``json.dumps`` makes ``{1: x}`` and ``{"1": x}`` encode alike, as they
    are alike once the broker's JSON has carried them to the worker.
    """
    if isinstance(key, str):
        return str.__str__(key)
    if key is True:
        return "true"
    if key is False:
        return "false"
    if key is None:
        return "null"
    if isinstance(key, int):
        return int.__repr__(key)
    if isinstance(key, float):
        if math.isnan(key):
            return "NaN"
        if math.isinf(key):
            return "Infinity" if key > 0 else "-Infinity"
        return float.__repr__(key)
    return None


def _escape(name: str) -> str:
    # Tagged values are dicts with a "$..." key; doubling a leading "$" in user keys
    # keeps {"$uuid": "..."} (a dict) apart from a UUID, and stays injective.
    return "$" + name if name[:1] == "$" else name


def _convert_dict(value: Mapping[object, object], lenient: bool, active: set[int]) -> object:
    ident = id(value)
    if ident in active:
        return _unencodable(value, lenient, f"is a {type_name(type(value))} that contains itself")
    active.add(ident)
    out: dict[str, object] = {}
    key: object = None
    bad_key = False
    try:
        for key, item in value.items():
            name = key if type(key) is str else dict_key(key)
            if name is None:
                bad_key = True
                break
            out[_escape(name)] = _convert(item, lenient, active)
    except _Unencodable as err:
        err.steps.append(f"[{key!r}]")
        raise
    finally:
        active.discard(ident)
    if bad_key:
        return _unencodable(
            value,
            lenient,
            f"is a dict with a key of type {type_name(type(key))}, which has no canonical encoding",
        )
    if len(out) != len(value):
        return _unencodable(value, lenient, _collision_reason(value))
    return out


def _collision_reason(value: Mapping[object, object]) -> str:
    """Name two dict keys that become the same JSON text (slow path, errors only)."""
    seen: dict[str | None, object] = {}
    for key in value:
        name = dict_key(key)
        if name in seen:
            return (
                f"is a dict whose keys {seen[name]!r} and {key!r} are the same once "
                "converted to JSON, so the worker could not tell them apart"
            )
        seen[name] = key
    return "is a dict with colliding keys"  # pragma: no cover - unreachable


def _convert_other(value: object, lenient: bool, active: set[int]) -> object:
    """Convert subclasses of JSON types and the tagged non-JSON types."""
    # Subclasses (str/int enums, ...) count as their base value, as in JSON.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, (list, tuple)):
        return _convert_sequence(value, lenient, active)
    if isinstance(value, dict):
        return _convert_dict(value, lenient, active)
    if isinstance(value, uuid.UUID):
        return {"$uuid": str(value)}
    if isinstance(value, decimal.Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, _dt.datetime):
        try:
            if value.utcoffset() is not None:
                # The same instant in two zones must give the same key.
                value = value.astimezone(_dt.timezone.utc)
            return {"$datetime": value.isoformat()}
        except (OverflowError, ValueError, TypeError) as exc:
            return _unencodable(
                value, lenient, f"is a datetime that cannot be converted to UTC ({exc})", exc
            )
    if isinstance(value, _dt.date):
        return {"$date": value.isoformat()}
    if isinstance(value, _dt.time):
        return {"$time": value.isoformat()}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, (set, frozenset)):
        # Sets have no order: sort the members' canonical texts.
        try:
            members = sorted(_dump(_convert(item, lenient, active)) for item in value)
        except _Unencodable as err:
            err.steps.append("{...}")
            raise
        return {"$set": members}
    if isinstance(value, enum.Enum):
        return _unencodable(
            value,
            lenient,
            f"is a {type_name(type(value))} enum member whose value is not a str, int or "
            "float, which has no canonical encoding",
        )
    return _unencodable(value, lenient)


def _error(path: str, task_name: str | None, err: _Unencodable) -> UnencodableArgument:
    where = f"argument '{path}{''.join(reversed(err.steps))}'"
    if task_name is not None:
        where += f" of task '{task_name}'"
    return UnencodableArgument(f"{where} {err.reason}; {_ADVICE}", None, task_name)


def _deep_error(path: str, task_name: str | None, value: object) -> UnencodableArgument:
    err = _Unencodable(value, f"is a {type_name(type(value))} nested too deeply to encode")
    return _error(path, task_name, err)


def canonical_encode(value: object, *, path: str = "argument") -> str:
    """Return the canonical text of one value.

    The text is deterministic JSON (sorted keys, no spaces) of a converted structure
    in which tuples are lists, dict keys are strings as ``json.dumps`` makes them,
    and the non-JSON types Celery users pass (UUID, Decimal, datetime, date, time,
    bytes, sets) are tagged objects such as ``{"$uuid": "..."}``. It is equal before
    and after the broker's JSON round trip, so a client and a worker agree on it.

    Args:
        value: The value to encode.
        path: Name of the value in error messages; nested values extend it
            (``items[2]``, ``meta['k']``).

    Returns:
        The canonical JSON text.

    Raises:
        UnencodableArgument: ``value`` (or something inside it) has no canonical
            form, contains itself, or is nested too deeply.
    """
    try:
        return _dump(_convert(value, False, set()))
    except _Unencodable as err:
        raise _error(path, None, err) from err.cause
    except RecursionError as exc:
        raise _deep_error(path, None, value) from exc


def encode_arguments(mapping: Mapping[str, object], task_name: str, lenient: bool) -> str:
    """Canonical text of the bound arguments; same text as ``canonical_encode(mapping)``.

    The top level is converted here rather than by ``_convert_dict`` so that error
    paths start at the argument's name (``items[2]``, not ``argument['items'][2]``).
    """
    out: dict[str, object] = {}
    active: set[int] = set()
    for name, value in mapping.items():
        try:
            out[_escape(name)] = _convert(value, lenient, active)
        except _Unencodable as err:
            raise _error(name, task_name, err) from err.cause
        except RecursionError as exc:
            if lenient:
                out[_escape(name)] = {"$unencodable": type_name(type(value))}
                continue
            raise _deep_error(name, task_name, value) from exc
    return _dump(out)


def encode_returned(value: object, *, what: str, task_name: str) -> str:
    """Canonical text of a value a user's callable returned (``idem_fingerprint``).

    Strict, as for arguments; the error names ``what`` returned the value and the
    path inside it, and asks for plain data.

    Raises:
        UnencodableArgument: ``value`` (or something inside it) has no canonical form.
    """
    try:
        return _dump(_convert(value, False, set()))
    except _Unencodable as err:
        inside = "".join(reversed(err.steps))
        where = f"{what} (at {inside})" if inside else what
        raise UnencodableArgument(
            f"{where} of task '{task_name}' {err.reason}; return plain data: str, int, "
            "float, bool, None, lists and dicts of them, or the tagged types of the "
            "canonical encoding",
            None,
            task_name,
        ) from err.cause
    except RecursionError as exc:
        raise UnencodableArgument(
            f"{what} of task '{task_name}' is nested too deeply to encode", None, task_name
        ) from exc


def b64(digest: bytes) -> str:
    """URL-safe base64 without padding: short, and safe in a Redis key or a log line."""
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def fingerprint_of(canonical: str) -> str:
    """Return the fingerprint of a canonical text: 16 URL-safe base64 characters.

    96 bits is plenty to tell apart the argument sets used with one key, and keeps
    the stored record small. Lone surrogates (from ``surrogateescape`` decoding)
    are kept rather than rejected, since they are valid in a Python str argument.

    Args:
        canonical: Text returned by :func:`canonical_encode`.

    Returns:
        ``blake2b(canonical, digest_size=12)`` in URL-safe base64 without padding.
    """
    data = canonical.encode("utf-8", "surrogatepass")
    return b64(hashlib.blake2b(data, digest_size=12).digest())
