"""Idempotency keys: how one task execution is named, fingerprinted and stored.

Over 400 lines on purpose: the rule, its validation against the task's signature and
the storage name are one contract (a key means the same on every worker), kept in one
pure module with its property tests (``tests/unit/test_keys.py``).

This module owns everything that turns a task call into a key, given the canonical
encoding of its arguments (``celery_idem.canonical``):

* the key itself (:class:`KeyRule`): explicit from the call site, from the task's
  ``idempotency_key`` rule (template or callable), or derived from the arguments, and
  the fingerprint its claim checks, over what ``idem_fingerprint`` covers of the
  arguments (compiled by ``celery_idem.fingerprint``);
* the validation of user-supplied keys (:func:`validate_key`) and the bounded,
  scoped name under which a key is stored (:func:`storage_key`): the prefix, a short
  tag of the task's scope (``idem_scope``, by default its name: so operators can find
  one task's records), and a hash of scope and key.

It is pure (standard library only, no Celery, no Redis) so it can be tested and
reasoned about on its own, and it runs on every task execution, so all the work
that does not depend on the call (signature inspection, template parsing, rule
checks) is done once, when a :class:`KeyRule` is built.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import inspect
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from celery_idem.canonical import b64, fingerprint_of, type_name
from celery_idem.exceptions import (
    IdempotencyConfigError,
    InvalidIdempotencyKey,
    UnencodableArgument,
)
from celery_idem.fingerprint import Coverage, FingerprintSetting, callable_name, keyword_problem

__all__ = [
    "MAX_KEY_LENGTH",
    "TASK_TAG_LENGTH",
    "KeyRule",
    "KeySource",
    "ResolvedKey",
    "storage_key",
    "storage_pattern",
    "storage_task_tag",
    "task_tag",
    "validate_key",
]

MAX_KEY_LENGTH = 1024
"""Longest key accepted, in characters: a guard against passing a payload as a key."""

_REPR_LIMIT = 80


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
        fingerprint: Fingerprint of the canonical arguments (of what
            ``idem_fingerprint`` covers of them). Computed whatever the source of the
            key, so that a key reused with other arguments can be told apart from a
            true duplicate; ``""`` when ``idem_fingerprint`` is False (not checked).
        source: Where :attr:`key` came from.
    """

    key: str
    fingerprint: str
    source: KeySource


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _REPR_LIMIT else text[:_REPR_LIMIT] + "..."


def validate_key(
    value: object, *, task_name: str, source: KeySource, origin: str | None = None
) -> str:
    """Check a key given by a user (call site or rule) and return it as a plain str.

    Only the type and length are checked: the key is hashed before it reaches the
    store, so any character (NUL, braces, non-ASCII) is safe. The length limit
    catches a payload passed by mistake as a key.

    Args:
        value: The candidate key.
        task_name: Task concerned, for the error message.
        source: Where the key came from, for the error message.
        origin: Says where the key came from more precisely than ``source`` does
            (``"from the message header 'idempotency_key'"`` on a worker), for the
            error message.

    Returns:
        The key (an exact ``str``, even if a ``str`` subclass was given).

    Raises:
        InvalidIdempotencyKey: Not a str, empty, or longer than
            :data:`MAX_KEY_LENGTH`. Its ``.key`` is ``value`` as given.
    """
    where = f"idempotency key for task '{task_name}' ({origin or _SOURCE_TEXT[source]})"
    given = value
    if type(value) is not str:
        if not isinstance(value, str):
            raise InvalidIdempotencyKey(
                f"{where} must be a str, got {type_name(type(value))} {_short_repr(value)}",
                given,
                task_name,
            )
        value = str.__str__(value)
    if not value:
        raise InvalidIdempotencyKey(f"{where} must not be empty", given, task_name)
    if len(value) > MAX_KEY_LENGTH:
        raise InvalidIdempotencyKey(
            f"{where} is {len(value)} characters long, over the limit of {MAX_KEY_LENGTH}; "
            "pass a hash of it instead, e.g. hashlib.sha256(key.encode()).hexdigest()",
            given,
            task_name,
        )
    return value


TASK_TAG_LENGTH = 6
"""Characters of the task tag in a storage key (36 bits of a hash of the task name)."""

_DIGEST_LENGTH = 22
_B64_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


@functools.lru_cache(maxsize=4096)
def task_tag(scope: str) -> str:
    """Return the short tag that names a task's scope inside its records' storage keys.

    The scope is the task's ``idem_scope``, by default its name. The tag lets an
    operator's tool find one task's records with ``SCAN MATCH`` and count records by
    task without keeping the task name in every record. Two scopes may share a tag (36
    bits): that only merges them in listings, never their records, whose digest hashes
    the full scope.
    """
    digest = hashlib.blake2b(scope.encode("utf-8"), digest_size=6, person=b"idem-tag")
    return b64(digest.digest())[:TASK_TAG_LENGTH]


def storage_key(prefix: str, scope: str, key: str) -> str:
    """Return the store's name for ``key`` in the key space ``scope``.

    The one place the layout of a storage key is defined (:func:`storage_pattern` and
    :func:`storage_task_tag` read it back). The key is hashed so the stored name is
    bounded (``6 + 1 + 22`` characters after the prefix) whatever the key's length or
    characters, and the scope is hashed with it so that two tasks using the same key
    never share a record.

    Args:
        prefix: Namespace of all records, e.g. ``"idem"``.
        scope: The task's key space: its ``idem_scope``, by default the Celery task
            name (so a task renamed with ``idem_scope`` set to its old name keeps its
            records).
        key: The logical key.

    Returns:
        ``f"{prefix}:{tag}:{digest}"`` where tag is :func:`task_tag` of the scope and
        digest the URL-safe base64 (no padding) of
        ``blake2b(scope + NUL + key, digest_size=16)``.
    """
    h = hashlib.blake2b(scope.encode("utf-8"), digest_size=16)
    h.update(b"\x00")
    h.update(key.encode("utf-8", "surrogatepass"))
    return f"{prefix}:{task_tag(scope)}:{b64(h.digest())}"


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def storage_pattern(prefix: str, scope: str | None = None) -> str:
    """A Redis ``SCAN MATCH`` pattern for the records under ``prefix``.

    Only those of the key space ``scope`` when given (a task's ``idem_scope``, by
    default its name), and of any scope sharing its tag.
    """
    tag = task_tag(scope) if scope is not None else "?" * TASK_TAG_LENGTH
    return f"{_glob_escape(prefix)}:{tag}:{'?' * _DIGEST_LENGTH}"


def storage_task_tag(prefix: str, stored: str) -> str | None:
    """The task tag of a storage key under ``prefix``, or None if it is not one."""
    head = f"{prefix}:"
    if (
        not stored.startswith(head)
        or len(stored) != len(head) + TASK_TAG_LENGTH + 1 + _DIGEST_LENGTH
    ):
        return None
    tag, sep, digest = stored[len(head) :].partition(":")
    if sep != ":" or len(tag) != TASK_TAG_LENGTH or not _B64_CHARS.issuperset(tag + digest):
        return None
    return tag


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
        fingerprint: The task's validated ``idem_fingerprint``: what of the
            arguments the fingerprint and a derived key cover (see
            ``celery_idem.fingerprint``).
        fingerprint_from_app: It was set on the app, not on the task: its paths then
            need not name parameters of this task (it applies to many tasks).

    Raises:
        IdempotencyConfigError: The signature cannot be read, or the rule does not
            fit it (unknown or positional template field, callable that cannot
            take the task's arguments, rule of another type), or ``fingerprint``
            does not fit it (a path that names no parameter, a callable that cannot
            take the task's arguments).
    """

    __slots__ = (
        "_bind",
        "_call_coverages",
        "_check_shadowing",
        "_parameters",
        "_plain",
        "_plain_defaults",
        "_plain_set",
        "_rule",
        "_shadowable",
        "_template",
        "_var_keyword",
        "coverage",
        "rule",
        "signature",
        "task_name",
    )

    def __init__(
        self,
        task_name: str,
        run: Callable[..., Any],
        rule: str | Callable[..., Any] | None,
        fingerprint: FingerprintSetting = True,
        *,
        fingerprint_from_app: bool = False,
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
        self._parameters = tuple(names)
        # Most tasks take plain parameters: bind those without inspect (a fifth of the
        # key's cost), and leave every unusual call to Signature.bind and its errors.
        simple = all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params.values())
        self._plain: tuple[str, ...] | None = tuple(names) if simple else None
        self._plain_set = frozenset(names)
        self._plain_defaults = tuple(
            (p.name, p.default) for p in params.values() if p.default is not p.empty
        )

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
                f"a callable or None, got {type_name(type(rule))} {_short_repr(rule)}",
                None,
                task_name,
            )
        self.coverage = self._cover(
            fingerprint,
            origin="app configuration" if fingerprint_from_app else "task option",
            check_roots=not fingerprint_from_app,
        )
        """What the fingerprint (and a derived key) covers, unless a call says otherwise."""
        self._call_coverages: dict[object, Coverage] = {}

    def _cover(self, setting: FingerprintSetting, *, origin: str, check_roots: bool) -> Coverage:
        return Coverage(
            self.task_name,
            setting,
            parameters=self._parameters,
            var_keyword=self._var_keyword is not None,
            origin=origin,
            check_roots=check_roots,
        )

    def coverage_for(self, setting: FingerprintSetting) -> Coverage:
        """The compiled ``idem_fingerprint`` for ``setting``: the task's, or a call's.

        A per-call value (``True``, ``False`` or a list: never a callable) is compiled
        once and kept; its paths must name parameters of the task.

        Raises:
            IdempotencyConfigError: A path of a per-call list names no parameter.
        """
        own = self.coverage
        if setting is own.setting or (not callable(setting) and setting == own.setting):
            return own
        found = self._call_coverages.get(setting)
        if found is None:
            found = self._cover(setting, origin="call option", check_roots=True)
            if len(self._call_coverages) >= 64:
                self._call_coverages.clear()  # a bound, not a cache policy: lists are few
            self._call_coverages[setting] = found
        return found

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
        problem = keyword_problem(rule, names, self._var_keyword is not None)
        if problem is not None:
            self._config_error(
                f"the idempotency_key rule {callable_name(rule)} of task '{self.task_name}' "
                f"cannot be called with the task's arguments as keywords "
                f"({', '.join(names) or 'none'}): {problem}; give it those parameters "
                "or a **kwargs parameter"
            )

    def _arguments(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Bind a call to the signature: one name -> value mapping per distinct call.

        A ``TypeError`` from binding propagates as is, exactly as calling the
        function with those arguments would raise one.
        """
        plain = self._plain
        if plain is not None and len(args) <= len(plain):
            arguments = dict(zip(plain, args, strict=False))  # len(args) <= len(plain)
            if all(k in self._plain_set and k not in arguments for k in kwargs):
                arguments.update(kwargs)
                for name, default in self._plain_defaults:
                    arguments.setdefault(name, default)
                if len(arguments) == len(plain):
                    return arguments
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
        fingerprint: FingerprintSetting | None = None,
        *,
        origin: str | None = None,
    ) -> ResolvedKey:
        """Return the key of one execution and the fingerprint of its arguments.

        Precedence: an explicit key, else the rule, else a key derived from the
        arguments. When the key does not come from the arguments, an argument with
        no canonical form does not fail the call (a rule such as ``"{user.id}"``
        exists precisely for such arguments): it enters the fingerprint as a
        ``{"$unencodable": "<type>"}`` marker.

        What the fingerprint covers, and so what a derived key is computed from, is
        ``idem_fingerprint`` (:attr:`coverage`, or ``fingerprint`` for one call): with
        ``False`` the fingerprint is ``""`` (not checked) and a derived key covers
        every argument.

        Args:
            args: Positional arguments of the call.
            kwargs: Keyword arguments of the call.
            explicit: Key given at the call site, if any.
            fingerprint: This call's ``idem_fingerprint`` if it differs from the
                task's (``None``: the task's).
            origin: Where ``explicit`` came from, when more precise than "the call
                site" (a worker reads it from a message header), for error messages.

        Returns:
            The resolved key.

        Raises:
            TypeError: The arguments do not fit the run function's signature.
            UnencodableArgument: No explicit key nor rule, and a covered argument has
                no canonical form; or the fingerprint callable returned such a value.
            InvalidIdempotencyKey: The explicit key or the rule's result is not a
                valid key, or the rule or the fingerprint callable raised.
            IdempotencyConfigError: A per-call ``fingerprint`` names no parameter.
        """
        coverage = self.coverage if fingerprint is None else self.coverage_for(fingerprint)
        arguments = self._arguments(args, kwargs)
        if explicit is not None:
            key = validate_key(
                explicit, task_name=self.task_name, source=KeySource.CALL, origin=origin
            )
            return ResolvedKey(key, self._fingerprint(coverage, arguments), KeySource.CALL)
        if self._template is None and self._rule is None:
            data = coverage.encode(arguments, lenient=False).encode("utf-8", "surrogatepass")
            return ResolvedKey(
                hashlib.blake2b(data, digest_size=16).hexdigest(),
                b64(hashlib.blake2b(data, digest_size=12).digest()),
                KeySource.ARGS,
            )
        # Fingerprint before the rule runs, so a rule that mutates an argument cannot
        # change it.
        fingerprinted = self._fingerprint(coverage, arguments)
        try:
            if self._template is not None:
                value: object = self._template.format_map(arguments)
            else:
                assert self._rule is not None
                value = self._rule(**arguments)
        except Exception as exc:
            what = (
                f"the idempotency_key rule {callable_name(self._rule)}"
                if self._rule is not None
                else f"the idempotency_key template {self._template!r}"
            )
            raise InvalidIdempotencyKey(
                f"{what} of task '{self.task_name}' raised {type(exc).__name__}: {exc}",
                None,
                self.task_name,
            ) from exc
        key = validate_key(value, task_name=self.task_name, source=KeySource.RULE)
        return ResolvedKey(key, fingerprinted, KeySource.RULE)

    def _fingerprint(self, coverage: Coverage, arguments: Mapping[str, Any]) -> str:
        """The fingerprint the claim checks, ``""`` when ``idem_fingerprint`` is False."""
        if coverage.off:
            return ""
        return fingerprint_of(coverage.encode(arguments, lenient=True))
