"""The settings table: one row per setting, the only place a setting is described.

This module owns the list of celery-idem's settings. Each :class:`Setting` row holds
the name, the default, the validator, the text an error shows as "expected", whether a
call may override it, and a one-line description. Everything else is derived from the
rows: ``config`` builds ``DEFAULTS``, ``SETTINGS``, ``CALL_SETTINGS``, the validators
(a per-call value may have a stricter one: it travels in a header) and the Django
spellings from them. What must stay written out is held to the rows by
tests, so it cannot drift: ``IdemSettings`` has one field per row (type checkers need
them spelled), ``IdempotentTask`` declares one task option per row with the row's
``doc`` as its ``#:`` comment, and docs/configuration.md has one section per row
(opening with the ``doc``) and one row of its summary table (default, Django spelling,
per task, per call; a setting the app cannot set says so in both).

Pure: imports neither celery nor redis.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery_idem.checks import (
    MAX_DURATION,
    MAX_PREFIX_LEN,
    MAX_SCOPE_LEN,
    check_bool,
    check_cache_errors,
    check_call_fingerprint,
    check_client_factory,
    check_fingerprint,
    check_key_prefix,
    check_lease,
    check_max_result_bytes,
    check_min_replicas,
    check_name,
    check_options,
    check_redis_url,
    check_scope,
    check_sentinels,
    check_store_url,
    check_ttl,
    policy_parser,
    seconds,
)

__all__ = ["DJANGO_PREFIX", "TABLE", "InProgressPolicy", "Setting", "StoreErrorPolicy"]


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

    @property
    def consequence(self) -> str:
        """What a message meets while the store is down, in words for a log line."""
        if self is StoreErrorPolicy.RUN:
            return "run their bodies without protection (duplicates may run twice)"
        if self is StoreErrorPolicy.RAISE:
            return "fail with StoreUnavailable"
        return "are retried later and nothing runs without a claim"


DJANGO_PREFIX = "CELERY_"
"""Django's settings carry Celery's namespace: ``idem_ttl`` is ``CELERY_IDEM_TTL``."""


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting, everything celery-idem knows about it.

    Attributes:
        name: The name in the app's configuration, on a task and in a call (``idem_*``).
        default: The value when no layer sets one, before validation; ``None`` means
            "not used" (for ``idem_redis_url``: "derive from Celery's URLs").
        check: The validator: the raw value in, the normalised value out, or
            :class:`~celery_idem.checks.Invalid`.
        expected: What is accepted, as the end of an error message ("expected ...").
        per_call: Whether a single call may override it (in the message headers).
        doc: One line saying what it decides: the task option's ``#:`` comment and the
            opening of its section in docs/configuration.md.
        call_check: The validator of a per-call value, when it is stricter than
            ``check`` (a value that cannot travel in a message header); None: ``check``.
        per_app: Whether the app's configuration may set it; False for what names
            one task alone (``idem_scope``), which the app would give every task.
    """

    name: str
    default: object
    check: Callable[[object], Any]
    expected: str
    per_call: bool
    doc: str
    call_check: Callable[[object], Any] | None = None
    per_app: bool = True

    @property
    def field(self) -> str:
        """The :class:`~celery_idem.config.IdemSettings` field: the name without ``idem_``."""
        return self.name[len("idem_") :]

    @property
    def django(self) -> str:
        """The Django spelling: ``CELERY_IDEM_TTL`` for ``idem_ttl``."""
        return DJANGO_PREFIX + self.name.upper()


def _check_replicas_timeout(value: object) -> float:
    return seconds(value, minimum=0.0, inclusive=False)


def _policy(name: str, members: type[InProgressPolicy | StoreErrorPolicy], doc: str) -> Setting:
    """A policy setting: a member or its value in any case, ``retry`` by default."""
    values = ", ".join(repr(member.value) for member in members)
    article = "an" if members.__name__[0] in "AEIOU" else "a"
    return Setting(
        name,
        default=members("retry"),
        check=policy_parser(members),
        expected=f"one of {values} (any case) or {article} {members.__name__} member",
        per_call=True,
        doc=doc,
    )


_UP_TO = f"<= {MAX_DURATION} (10 years)"
_SECONDS = f"seconds as an int or float > 0 and {_UP_TO} (not bool)"

TABLE: tuple[Setting, ...] = (
    Setting(
        "idem_store_url",
        default=None,
        check=check_store_url,
        expected="a str URL with scheme postgresql:// (or postgres://), or any form "
        "idem_redis_url accepts",
        per_call=False,
        doc="Where records live: any `idem_redis_url` form, or `postgresql://` for PostgreSQL.",
    ),
    Setting(
        "idem_redis_url",
        default=None,
        check=check_redis_url,
        expected="a str URL with scheme redis://, rediss://, unix:// (or redis+socket://), "
        "sentinel://, redis+cluster://, rediss+cluster:// or memory://",
        per_call=False,
        doc="Where records live.",
    ),
    Setting(
        "idem_redis_sentinels",
        default=None,
        check=check_sentinels,
        expected="Sentinel addresses: 'h1:26379;h2:26379' or a list of 'host:port' / (host, port)",
        per_call=False,
        doc="The Sentinels to ask for the primary, when they are not written in `idem_redis_url`.",
    ),
    Setting(
        "idem_redis_sentinel_master",
        default=None,
        check=check_name,
        expected="the Sentinel service name, a str",
        per_call=False,
        doc="The name of the primary the Sentinels monitor (`sentinel monitor NAME ...`).",
    ),
    Setting(
        "idem_redis_cluster",
        default=False,
        check=check_bool,
        expected="True or False",
        per_call=False,
        doc="Treat `idem_redis_url` as a node of a Redis Cluster.",
    ),
    Setting(
        "idem_redis_client",
        default=None,
        check=check_client_factory,
        expected="a callable returning a redis-py client, or its dotted name 'package.module.make'",
        per_call=False,
        doc="A factory for the redis-py client, for what the URL forms cannot express.",
    ),
    Setting(
        "idem_redis_options",
        default=None,
        check=check_options,
        expected="a dict of redis-py client keyword arguments (e.g. ssl_ca_certs, socket_timeout)",
        per_call=False,
        doc="Keyword arguments for redis-py's client.",
    ),
    Setting(
        "idem_min_replicas",
        default=0,
        check=check_min_replicas,
        expected="an int >= 0 (not bool)",
        per_call=False,
        doc="Replicas that must confirm a claim and a completion before they count.",
    ),
    Setting(
        "idem_min_replicas_timeout",
        default=1.0,
        check=_check_replicas_timeout,
        expected=_SECONDS,
        per_call=False,
        doc="Seconds a claim or a completion waits for `idem_min_replicas` replicas.",
    ),
    Setting(
        "idem_ttl",
        default=86400,
        check=check_ttl,
        expected=_SECONDS,
        per_call=True,
        doc="Seconds a completed result is kept and replayed to duplicates.",
    ),
    Setting(
        "idem_lease",
        default=60,
        check=check_lease,
        expected=f"seconds as an int or float >= 1 and {_UP_TO} (not bool); a shorter lease "
        "cannot be renewed reliably",
        per_call=True,
        doc="Seconds a claim survives without renewal.",
    ),
    Setting(
        "idem_key_prefix",
        default="idem",
        check=check_key_prefix,
        expected=f"a non-empty str of at most {MAX_PREFIX_LEN} characters without whitespace "
        "or '{' '}' (braces would change Redis Cluster hash slots)",
        per_call=False,
        doc="The namespace of every Redis key celery-idem writes.",
    ),
    Setting(
        "idem_scope",
        default=None,
        check=check_scope,
        expected=f"a non-empty str of at most {MAX_SCOPE_LEN} characters, without leading or "
        "trailing whitespace (usually the task's former name)",
        per_call=False,
        doc="The key space of the task's records: its name unless set.",
        per_app=False,
    ),
    Setting(
        "idem_fingerprint",
        default=True,
        check=check_fingerprint,
        expected="True (every argument), False (no check), a list of argument names and "
        "dotted paths to leave out, e.g. ['payload.delivery_attempt', 'received_at'], or a "
        "callable over the bound arguments (not per call)",
        per_call=True,
        doc="Which parts of the arguments the mismatch check and derived keys cover.",
        call_check=check_call_fingerprint,
    ),
    _policy(
        "idem_on_in_progress",
        InProgressPolicy,
        "What a duplicate does when another live run holds its key.",
    ),
    _policy(
        "idem_on_store_error",
        StoreErrorPolicy,
        "What a task does when Redis cannot be reached to claim its key.",
    ),
    Setting(
        "idem_cache_errors",
        default=(),
        check=check_cache_errors,
        expected="an exception class or dotted name 'package.module.ClassName', or a "
        "tuple/list/set of them",
        per_call=False,
        doc="Exception classes whose failure is stored and re-raised to duplicates.",
    ),
    Setting(
        "idem_max_result_bytes",
        default=1048576,
        check=check_max_result_bytes,
        expected="an int > 0 (not bool)",
        per_call=True,
        doc="The largest serialized result that is stored.",
    ),
    Setting(
        "idem_dedupe_on_publish",
        default=False,
        check=check_bool,
        expected="True or False",
        per_call=False,
        doc="Reserve the key before publishing; send nothing when it is taken.",
    ),
    Setting(
        "idem_require_key",
        default=False,
        check=check_bool,
        expected="True or False",
        per_call=False,
        doc="Refuse calls and messages that carry no explicit idempotency key.",
    ),
    Setting(
        "idem_max_takeovers",
        default=5,
        check=check_min_replicas,
        expected="an int >= 0 (not bool); 0 = no cap",
        per_call=False,
        doc="Takeovers of one key, without a completion, before the key is quarantined.",
    ),
    Setting(
        "idem_blocking_completion",
        default=False,
        check=check_bool,
        expected="True or False",
        per_call=False,
        doc="Wait for the completion's answer before the task returns.",
    ),
)
"""Every setting, in documentation order. Their names are a public contract.

A new setting is a row here, plus what the tests then ask for: its ``IdemSettings``
field, its ``IdempotentTask`` option, and its section and summary row in
docs/configuration.md.
"""
