"""Idempotency keys: how one task execution is named, fingerprinted and stored.

This module owns everything that turns a task call into a key, and nothing else:

* the canonical encoding of arguments (:func:`canonical_encode`), deterministic
  and equal before and after the broker's JSON round trip, so that a client and a
  worker, or two workers, compute the same text for the same call;
* the fingerprint of that text (:func:`fingerprint_of`), stored next to a key so
  that reusing the key with other arguments can be detected;
* the key itself (:class:`KeyRule`): explicit from the call site, from the task's
  ``idempotency_key`` rule (template or callable), or derived from the arguments;
* the validation of user-supplied keys (:func:`validate_key`) and the bounded,
  task-scoped name under which a key is stored (:func:`storage_key`).

It is pure (standard library only, no Celery, no Redis) so it can be tested and
reasoned about on its own, and it runs on every task execution, so all the work
that does not depend on the call (signature inspection, template parsing, rule
checks) is done once, when a :class:`KeyRule` is built.
"""

from __future__ import annotations

import base64
import datetime as _dt
import decimal
import enum
import hashlib
import inspect
import json
import math
import string
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from celery_idem.exceptions import (
    IdempotencyConfigError,
    InvalidIdempotencyKey,
    UnencodableArgument,
)

__all__ = [
    "MAX_KEY_LENGTH",
    "KeyRule",
    "KeySource",
    "ResolvedKey",
    "canonical_encode",
    "fingerprint_of",
    "storage_key",
    "validate_key",
]

MAX_KEY_LENGTH = 1024
"""Longest key accepted, in characters: a guard against passing a payload as a key."""

_ADVICE = "pass a primitive value such as its id, or give the task an idempotency_key rule"
_REPR_LIMIT = 80

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


class KeySource(enum.Enum):
    """Where the key of an execution came from.

    The store and the error messages need it: a key from the call site is the
    caller's promise, a derived key is ours.
    """

    CALL = "call"
    """Explicit key given at the call site (option or message header)."""
    RULE = "rule"
    """Computed by the task's ``idempotency_key`` option (template or callable)."""
    ARGS = "args"
    """Derived from the canonical encoding of the arguments."""


_SOURCE_TEXT = {
    KeySource.CALL: "from the call site",
    KeySource.RULE: "from the task's idempotency_key rule",
    KeySource.ARGS: "derived from the task's arguments",
}


@dataclass(frozen=True, slots=True)
class ResolvedKey:
    """The key of one execution, with what is needed to check its reuse.

    Attributes:
        key: The logical key, as the task sees it in ``self.idempotency_key``.
        fingerprint: Fingerprint of the canonical arguments. Always computed,
            whatever the source of the key, so that a key reused with other
            arguments can be told apart from a true duplicate.
        source: Where :attr:`key` came from.
    """

    key: str
    fingerprint: str
    source: KeySource


# --------------------------------------------------------------------------- encoding


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


def _type_name(cls: type) -> str:
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
    name = _type_name(type(value))
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
        return _unencodable(value, lenient, f"is a {_type_name(type(value))} that contains itself")
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


def _dict_key(key: object) -> str | None:
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
        return _unencodable(value, lenient, f"is a {_type_name(type(value))} that contains itself")
    active.add(ident)
    out: dict[str, object] = {}
    key: object = None
    bad_key = False
    try:
        for key, item in value.items():
            name = key if type(key) is str else _dict_key(key)
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
            f"is a dict with a key of type {_type_name(type(key))}, "
            "which has no canonical encoding",
        )
    if len(out) != len(value):
        return _unencodable(value, lenient, _collision_reason(value))
    return out


def _collision_reason(value: Mapping[object, object]) -> str:
    """Name two dict keys that become the same JSON text (slow path, errors only)."""
    seen: dict[str | None, object] = {}
    for key in value:
        name = _dict_key(key)
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
            f"is a {_type_name(type(value))} enum member whose value is not a str, int or "
            "float, which has no canonical encoding",
        )
    return _unencodable(value, lenient)


def _error(path: str, task_name: str | None, err: _Unencodable) -> UnencodableArgument:
    where = f"argument '{path}{''.join(reversed(err.steps))}'"
    if task_name is not None:
        where += f" of task '{task_name}'"
    return UnencodableArgument(f"{where} {err.reason}; {_ADVICE}", None, task_name)


def _deep_error(path: str, task_name: str | None, value: object) -> UnencodableArgument:
    err = _Unencodable(value, f"is a {_type_name(type(value))} nested too deeply to encode")
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


def _encode_arguments(mapping: Mapping[str, object], task_name: str, lenient: bool) -> str:
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
                out[_escape(name)] = {"$unencodable": _type_name(type(value))}
                continue
            raise _deep_error(name, task_name, value) from exc
    return _dump(out)


def _b64(digest: bytes) -> str:
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
    return _b64(hashlib.blake2b(data, digest_size=12).digest())


# --------------------------------------------------------------------------- keys


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _REPR_LIMIT else text[:_REPR_LIMIT] + "..."


def validate_key(value: object, *, task_name: str, source: KeySource) -> str:
    """Check a key given by a user (call site or rule) and return it as a plain str.

    Only the type and length are checked: the key is hashed before it reaches the
    store, so any character (NUL, braces, non-ASCII) is safe. The length limit
    catches a payload passed by mistake as a key.

    Args:
        value: The candidate key.
        task_name: Task concerned, for the error message.
        source: Where the key came from, for the error message.

    Returns:
        The key (an exact ``str``, even if a ``str`` subclass was given).

    Raises:
        InvalidIdempotencyKey: Not a str, empty, or longer than
            :data:`MAX_KEY_LENGTH`.
    """
    where = f"idempotency key for task '{task_name}' ({_SOURCE_TEXT[source]})"
    if type(value) is not str:
        if not isinstance(value, str):
            raise InvalidIdempotencyKey(
                f"{where} must be a str, got {_type_name(type(value))} {_short_repr(value)}",
                _short_repr(value),
                task_name,
            )
        value = str.__str__(value)
    if not value:
        raise InvalidIdempotencyKey(f"{where} must not be empty", "''", task_name)
    if len(value) > MAX_KEY_LENGTH:
        raise InvalidIdempotencyKey(
            f"{where} is {len(value)} characters long, over the limit of {MAX_KEY_LENGTH}; "
            "pass a hash of it instead, e.g. hashlib.sha256(key.encode()).hexdigest()",
            _short_repr(value),
            task_name,
        )
    return value


def storage_key(prefix: str, task_name: str, key: str) -> str:
    """Return the store's name for ``key`` of ``task_name``.

    The key is hashed so the stored name is bounded (22 characters after the prefix)
    whatever the key's length or characters, and the task name is hashed with it so
    that two tasks using the same key never share a record.

    Args:
        prefix: Namespace of all records, e.g. ``"idem"``.
        task_name: The Celery task name.
        key: The logical key.

    Returns:
        ``f"{prefix}:{digest}"`` where digest is the URL-safe base64 (no padding)
        of ``blake2b(task_name + NUL + key, digest_size=16)``.
    """
    h = hashlib.blake2b(task_name.encode("utf-8"), digest_size=16)
    h.update(b"\x00")
    h.update(key.encode("utf-8", "surrogatepass"))
    return f"{prefix}:{_b64(h.digest())}"


# --------------------------------------------------------------------------- rules


def _template_fields(template: str) -> Iterator[tuple[str, str | None]]:
    """Yield ``(field_name, conversion)`` of a format template, nested specs included."""
    for _literal, field, spec, conversion in string.Formatter().parse(template):
        if field is None:
            continue
        yield field, conversion
        if spec:
            yield from _template_fields(spec)


def _field_root(field: str) -> str:
    for index, char in enumerate(field):
        if char in ".[":
            return field[:index]
    return field


def _rule_name(rule: Callable[..., Any]) -> str:
    return getattr(rule, "__qualname__", None) or repr(rule)


class KeyRule:
    """Built once per task (at first use); resolves the key of each execution.

    All the call-independent work is done here, once: reading the run function's
    signature, parsing and checking a template rule, checking that a callable rule
    accepts the task's arguments. A configuration mistake is thus reported when the
    task is first used, not when some particular call happens to reach it.

    Args:
        task_name: The Celery task name (for messages).
        run: The task's run function, or bound method (``self`` then excluded).
        rule: The task's ``idempotency_key`` option: a ``str.format`` template over
            the argument names, a callable called with the arguments as keywords,
            or ``None`` to derive the key from the arguments.

    Raises:
        IdempotencyConfigError: The signature cannot be read, or the rule does not
            fit it (unknown or positional template field, callable that cannot
            take the task's arguments, rule of another type).
    """

    __slots__ = (
        "_bind",
        "_check_shadowing",
        "_rule",
        "_shadowable",
        "_template",
        "_var_keyword",
        "rule",
        "signature",
        "task_name",
    )

    def __init__(
        self,
        task_name: str,
        run: Callable[..., Any],
        rule: str | Callable[..., Any] | None,
    ) -> None:
        self.task_name = task_name
        self.rule = rule
        try:
            self.signature = inspect.signature(run)
        except (TypeError, ValueError) as exc:
            raise IdempotencyConfigError(
                f"cannot read the signature of the run function of task '{task_name}' "
                f"({exc}); idempotency keys need its parameter names",
                None,
                task_name,
            ) from exc
        self._bind = self.signature.bind
        params = self.signature.parameters
        var_keyword = [p.name for p in params.values() if p.kind is p.VAR_KEYWORD]
        self._var_keyword: str | None = var_keyword[0] if var_keyword else None
        # A **kwargs key can share its name with another parameter only if that one
        # cannot be passed by keyword (positional-only, or the *args name); the
        # flattened mapping could not hold both, so such calls must be refused.
        self._shadowable = frozenset(
            p.name
            for p in params.values()
            if p.kind is p.POSITIONAL_ONLY or p.kind is p.VAR_POSITIONAL
        )
        self._check_shadowing = bool(self._var_keyword and self._shadowable)
        names = [p.name for p in params.values() if p.kind is not p.VAR_KEYWORD]

        self._template: str | None = None
        self._rule: Callable[..., Any] | None = None
        if rule is None:
            pass
        elif isinstance(rule, str):
            self._check_template(rule, names)
            self._template = rule
        elif callable(rule):
            self._check_callable(rule, names)
            self._rule = rule
        else:
            raise IdempotencyConfigError(
                f"the idempotency_key option of task '{task_name}' must be a str template, "
                f"a callable or None, got {_type_name(type(rule))} {_short_repr(rule)}",
                None,
                task_name,
            )

    def _config_error(self, message: str, cause: BaseException | None = None) -> NoReturn:
        raise IdempotencyConfigError(message, None, self.task_name) from cause

    def _check_template(self, template: str, names: list[str]) -> None:
        what = f"the idempotency_key template {template!r} of task '{self.task_name}'"
        if not template:
            self._config_error(f"{what} is empty; it would give every call the same empty key")
        try:
            fields = list(_template_fields(template))
        except ValueError as exc:
            self._config_error(f"{what} is not a valid format string: {exc}", exc)
        known = set(names)
        listing = ", ".join(names) or "none"
        for field, conversion in fields:
            root = _field_root(field)
            if not root or root.isdigit():
                self._config_error(
                    f"{what} has a positional field {{{field}}}; name the argument instead, "
                    f"as in {{{names[0] if names else 'name'}}} (parameters: {listing})"
                )
            if root not in known and self._var_keyword is None:
                self._config_error(
                    f"{what} uses the field {{{field}}}, but {root!r} is not a parameter of "
                    f"the task (parameters: {listing})"
                )
            if conversion not in (None, "r", "s", "a"):
                self._config_error(
                    f"{what} has an unknown conversion !{conversion} in field {{{field}}}"
                )

    def _check_callable(self, rule: Callable[..., Any], names: list[str]) -> None:
        try:
            rule_signature = inspect.signature(rule)
        except (TypeError, ValueError):
            return  # Cannot be checked in advance; a bad call surfaces at resolve.
        dummy = dict.fromkeys(names)
        try:
            if self._var_keyword is None:
                rule_signature.bind(**dummy)
            else:
                # Extra keywords may come at run time; check the known ones only.
                rule_signature.bind_partial(**dummy)
        except TypeError as exc:
            self._config_error(
                f"the idempotency_key rule {_rule_name(rule)} of task '{self.task_name}' "
                f"cannot be called with the task's arguments as keywords "
                f"({', '.join(names) or 'none'}): {exc}; give it those parameters "
                "or a **kwargs parameter",
                exc,
            )

    def _arguments(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Bind a call to the signature: one name -> value mapping per distinct call.

        A ``TypeError`` from binding propagates as is, exactly as calling the
        function with those arguments would raise one.
        """
        bound = self._bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments  # A fresh dict of ours: no copy needed.
        if self._var_keyword is not None:
            extra: dict[str, Any] = arguments.pop(self._var_keyword)
            clash = self._check_shadowing and sorted(extra.keys() & self._shadowable)
            if clash:
                name = clash[0]
                raise UnencodableArgument(
                    f"keyword argument '{name}' of task '{self.task_name}' has the name "
                    f"of the parameter '{name}', which takes positional arguments only, "
                    "so the key could not tell them apart; rename one of them",
                    None,
                    self.task_name,
                )
            arguments.update(extra)
        return arguments

    def resolve(
        self,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        explicit: object | None = None,
    ) -> ResolvedKey:
        """Return the key of one execution and the fingerprint of its arguments.

        Precedence: an explicit key, else the rule, else a key derived from the
        arguments. When the key does not come from the arguments, an argument with
        no canonical form does not fail the call (a rule such as ``"{user.id}"``
        exists precisely for such arguments): it enters the fingerprint as a
        ``{"$unencodable": "<type>"}`` marker.

        Args:
            args: Positional arguments of the call.
            kwargs: Keyword arguments of the call.
            explicit: Key given at the call site, if any.

        Returns:
            The resolved key.

        Raises:
            TypeError: The arguments do not fit the run function's signature.
            UnencodableArgument: No explicit key nor rule, and an argument has no
                canonical form.
            InvalidIdempotencyKey: The explicit key or the rule's result is not a
                valid key, or the rule raised.
        """
        arguments = self._arguments(args, kwargs)
        if explicit is not None:
            key = validate_key(explicit, task_name=self.task_name, source=KeySource.CALL)
            canonical = _encode_arguments(arguments, self.task_name, True)
            return ResolvedKey(key, fingerprint_of(canonical), KeySource.CALL)
        if self._template is None and self._rule is None:
            data = _encode_arguments(arguments, self.task_name, False).encode(
                "utf-8", "surrogatepass"
            )
            return ResolvedKey(
                hashlib.blake2b(data, digest_size=16).hexdigest(),
                _b64(hashlib.blake2b(data, digest_size=12).digest()),
                KeySource.ARGS,
            )
        # Encode before the rule runs, so a rule that mutates an argument cannot
        # change the fingerprint.
        canonical = _encode_arguments(arguments, self.task_name, True)
        try:
            if self._template is not None:
                value: object = self._template.format_map(arguments)
            else:
                assert self._rule is not None
                value = self._rule(**arguments)
        except Exception as exc:
            what = (
                f"the idempotency_key template {self._template!r}"
                if self._template is not None
                else "the idempotency_key rule"
            )
            raise InvalidIdempotencyKey(
                f"{what} of task '{self.task_name}' raised {type(exc).__name__}: {exc}",
                None,
                self.task_name,
            ) from exc
        key = validate_key(value, task_name=self.task_name, source=KeySource.RULE)
        return ResolvedKey(key, fingerprint_of(canonical), KeySource.RULE)
