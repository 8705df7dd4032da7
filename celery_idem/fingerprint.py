"""What the arguments' fingerprint covers: the ``idem_fingerprint`` setting, compiled.

A record keeps a fingerprint of its request's arguments, and a key reused with other
arguments is refused (``IdempotencyKeyMismatch``). Some parts of a request's
arguments are not the request, though: a webhook's delivery counter, the time it was
received. ``idem_fingerprint`` says what the check covers, and derived keys (the
arguments themselves) cover the same:

* ``True`` (the default): every bound argument;
* a list of argument names and dotted paths to leave out
  (``["payload.delivery_attempt", "received_at"]``): a path's first segment is an
  argument, each further one a key of a dict; a path that does not exist in a call
  (an optional field, a value that is not a dict) leaves nothing out of it;
* a callable, called with the bound arguments as keywords: its return value is what
  is covered;
* ``False``: no check at all (a derived key still covers every argument: a key
  derived from nothing would make every call one request).

This module owns the forms' syntax (:func:`parse_paths`, for the validator) and the
compiled form (:class:`Coverage`) that ``keys.KeyRule`` applies on every execution.
Paths are compiled into a tree once; applying them copies only the dicts on a path,
never the caller's values. The result feeds the canonical encoding, so it is the same
before and after the broker, in every process.

Pure: standard library only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from celery_idem.canonical import dict_key, encode_arguments, encode_returned
from celery_idem.exceptions import IdempotencyConfigError, InvalidIdempotencyKey

__all__ = [
    "MAX_PATHS",
    "MAX_PATH_LENGTH",
    "Coverage",
    "FingerprintSetting",
    "callable_name",
    "keyword_problem",
    "parse_paths",
]

FingerprintSetting = bool | tuple[str, ...] | Callable[..., Any]
"""A validated ``idem_fingerprint``: ``True``, ``False``, a sorted tuple of paths, a callable."""

MAX_PATHS = 100
"""Most paths one ``idem_fingerprint`` list may name."""
MAX_PATH_LENGTH = 200
"""Longest path, in characters."""

_Tree = dict[str, Any]
"""Compiled paths: segment -> subtree, or ``None`` to leave that whole value out."""


def parse_paths(values: Iterable[object]) -> tuple[str, ...]:
    """Check a leave-out list's entries; return them deduplicated and sorted.

    Sorted, so that two spellings of one list (another order, a duplicate) are one
    setting: the fingerprint does not depend on how the list was written.

    Raises:
        ValueError: An entry is not a str, is empty, has an empty segment (``"a..b"``,
            ``".a"``), or the list is too long; the message says which.
    """
    paths: set[str] = set()
    for entry in values:
        if not isinstance(entry, str):
            raise ValueError(f"entry {entry!r} is a {type(entry).__name__}, not a str")
        if len(entry) > MAX_PATH_LENGTH:
            raise ValueError(f"entry {entry[:40]!r}... is over {MAX_PATH_LENGTH} characters")
        if not entry or any(not segment for segment in entry.split(".")):
            raise ValueError(
                f"entry {entry!r} is not a name or a dotted path such as 'payload.attempt'"
            )
        paths.add(str.__str__(entry))
    if len(paths) > MAX_PATHS:
        raise ValueError(f"{len(paths)} paths, more than {MAX_PATHS}")
    return tuple(sorted(paths))


def callable_name(fn: Callable[..., Any]) -> str:
    """How messages name a user's callable: ``shop.tasks.welcome_key``.

    A lambda gets its line (``shop.tasks.<lambda> (line 12)``); a callable without a
    qualified name (an instance with ``__call__``, a partial) is named by its ``repr``.
    """
    name = getattr(fn, "__qualname__", None)
    if not isinstance(name, str):
        return repr(fn)
    module = getattr(fn, "__module__", None)
    if isinstance(module, str) and module != "builtins":
        name = f"{module}.{name}"
    code = getattr(fn, "__code__", None)
    if name.endswith("<lambda>") and code is not None:
        name += f" (line {code.co_firstlineno})"
    return name


def keyword_problem(fn: Callable[..., Any], names: Sequence[str], var_keyword: bool) -> str | None:
    """Why ``fn`` cannot be called with a task's arguments as keywords, or None.

    A callable whose signature cannot be read is let through: a bad call then fails
    when it happens.
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    dummy = dict.fromkeys(names)
    try:
        if var_keyword:
            signature.bind_partial(**dummy)  # extra keywords may come at run time
        else:
            signature.bind(**dummy)
    except TypeError as exc:
        return str(exc)
    return None


def _compile(paths: Iterable[str]) -> _Tree:
    tree: _Tree = {}
    for path in paths:
        node = tree
        *parents, last = path.split(".")
        for segment in parents:
            child = node.get(segment, {})
            if child is None:
                break  # a shorter path already leaves this whole value out
            node[segment] = child
            node = child
        else:
            node[last] = None
    return tree


def _pruned(value: Mapping[Any, Any], tree: _Tree) -> dict[Any, Any]:
    """A copy of the dict ``value`` without what ``tree`` names; ``value`` is untouched.

    Dict keys are compared as the canonical encoding writes them (``1`` and ``"1"``
    alike), as they are once the broker's JSON has carried them.
    """
    out = dict(value)
    for key in value:
        text = key if type(key) is str else dict_key(key)
        if text is None or text not in tree:
            continue
        sub = tree[text]
        if sub is None:
            del out[key]
        else:
            child = value[key]
            if isinstance(child, dict):
                out[key] = _pruned(child, sub)
    return out


class Coverage:
    """One ``idem_fingerprint`` setting, compiled for one task.

    Built when the task's key rule is (once per process), or per call for a per-call
    value. The checks that do not depend on a call are made here: a leave-out path
    must start with a parameter of the task (unless ``check_roots`` is off: a list set
    on the app is for many tasks), and a callable must accept the task's arguments.

    Args:
        task_name: The task, for messages.
        setting: The validated setting.
        parameters: The task's parameter names (without ``**kwargs``).
        var_keyword: The task takes ``**kwargs`` (any root is then a possible argument).
        origin: Where the setting came from, for messages ("task option", ...).
        check_roots: Refuse a path whose first segment is not a parameter.

    Raises:
        IdempotencyConfigError: A path names no parameter, or the callable cannot be
            called with the task's arguments as keywords.
    """

    __slots__ = ("_fn", "_tree", "off", "setting", "task_name")

    def __init__(
        self,
        task_name: str,
        setting: FingerprintSetting,
        *,
        parameters: Sequence[str],
        var_keyword: bool,
        origin: str,
        check_roots: bool,
    ) -> None:
        self.task_name = task_name
        self.setting = setting
        self.off = setting is False
        """No check: the fingerprint is empty (a derived key still covers everything)."""
        self._fn: Callable[..., Any] | None = None
        self._tree: _Tree = {}
        if isinstance(setting, tuple):
            if check_roots and not var_keyword:
                self._check_roots(setting, parameters, origin)
            self._tree = _compile(setting)
        elif callable(setting) and not isinstance(setting, bool):
            problem = keyword_problem(setting, parameters, var_keyword)
            if problem is not None:
                raise IdempotencyConfigError(
                    f"the idem_fingerprint callable {callable_name(setting)} ({origin}) of "
                    f"task '{task_name}' cannot be called with the task's arguments as "
                    f"keywords ({', '.join(parameters) or 'none'}): {problem}; give it those "
                    "parameters or a **kwargs parameter",
                    None,
                    task_name,
                )
            self._fn = setting

    def _check_roots(self, paths: tuple[str, ...], parameters: Sequence[str], origin: str) -> None:
        known = set(parameters)
        for path in paths:
            root = path.split(".", 1)[0]
            if root not in known:
                raise IdempotencyConfigError(
                    f"idem_fingerprint ({origin}) of task '{self.task_name}' leaves out "
                    f"{path!r}, but {root!r} is not a parameter of the task (parameters: "
                    f"{', '.join(parameters) or 'none'}); start each path with one of them, "
                    "or set the list on the app, where it applies to the tasks that have it",
                    None,
                    self.task_name,
                )

    def encode(self, arguments: Mapping[str, Any], *, lenient: bool) -> str:
        """The canonical text of what this setting covers of the bound ``arguments``.

        ``False`` covers every argument here: the caller leaves the fingerprint out
        (:attr:`off`) and derives keys from all of them.

        Args:
            arguments: The bound arguments (not modified).
            lenient: An unencodable argument enters as a type marker instead of
                failing (the key does not come from the arguments). A callable's
                return value is always encoded strictly: it was written for this.

        Raises:
            UnencodableArgument: Strict, and a covered value has no canonical form; or
                the callable returned one that has none.
            InvalidIdempotencyKey: The callable raised.
        """
        fn = self._fn
        if fn is not None:
            name = callable_name(fn)
            try:
                value = fn(**arguments)
            except Exception as exc:
                raise InvalidIdempotencyKey(
                    f"the idem_fingerprint callable {name} of task '{self.task_name}' raised "
                    f"{type(exc).__name__}: {exc}; nothing was run",
                    None,
                    self.task_name,
                ) from exc
            what = f"the value returned by the idem_fingerprint callable {name}"
            return encode_returned(value, what=what, task_name=self.task_name)
        if self._tree:
            arguments = _pruned(arguments, self._tree)
        return encode_arguments(arguments, self.task_name, lenient)
