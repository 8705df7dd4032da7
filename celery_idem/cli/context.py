"""Which app, task, settings and store a ``celery idem`` command works on.

With ``--task NAME`` a command uses that task's settings (task options over the app's,
as a worker would); without it, the app's (``resolve_settings(app.conf)``). Only the
store talks to Redis; this module only builds it.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import click

from celery_idem import codec
from celery_idem.cli.traits import StoreTraits, traits_of
from celery_idem.config import IdemSettings, resolve_settings
from celery_idem.exceptions import IdempotencyError
from celery_idem.keys import task_tag
from celery_idem.store import StoreAdmin, admin_for
from celery_idem.task import IdempotentTask

__all__ = [
    "EXIT_FAILURE",
    "EXIT_NOT_FOUND",
    "EXIT_USAGE",
    "CliError",
    "NotFound",
    "Target",
    "app_of",
    "close_names",
    "idempotent_task",
    "json_option",
    "resolve",
    "store_errors",
    "task_option",
]

EXIT_FAILURE = 1
"""The command failed: store unreachable, refused, a doctor check failed, not confirmed."""
EXIT_USAGE = 2
"""Bad command line (click's own code)."""
EXIT_NOT_FOUND = 3
"""``inspect`` / ``forget``: there is no such record."""


class CliError(click.ClickException):
    """A failure, reported as ``Error: message`` on stderr; exit status 1."""

    exit_code = EXIT_FAILURE


class NotFound(CliError):
    """There is no such record; exit status 3."""

    exit_code = EXIT_NOT_FOUND


@dataclass(frozen=True)
class Target:
    """Everything a command needs to find and decode records.

    Attributes:
        app: The Celery app.
        task_name: The ``--task`` given, if any.
        settings: The task's settings, else the app's.
        store: The operators' tools on the store those settings name.
        accept: Content types results may be decoded from (the app's
            ``result_accept_content``, else ``accept_content``).
        tasks_by_tag: Task tag (of a task's scope: its ``idem_scope``, else its name) ->
            the app's idempotent tasks with that tag whose records live in this store
            under this prefix; and ``--task`` itself when it is not registered.
        elsewhere: The app's idempotent tasks whose records live in another store or
            under another prefix (a command without ``--task`` does not see them).
    """

    app: Any
    task_name: str | None
    settings: IdemSettings
    store: StoreAdmin
    accept: frozenset[str]
    tasks_by_tag: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    elsewhere: tuple[str, ...] = ()

    @property
    def prefix(self) -> str:
        """The key prefix of the records."""
        return self.settings.key_prefix

    @property
    def scope(self) -> str | None:
        """The key space of ``--task``'s records (its ``idem_scope``, else its name)."""
        return None if self.task_name is None else self.settings.scope_of(self.task_name)

    @property
    def url(self) -> str:
        """The store's URL, without a password."""
        endpoint = self.settings.endpoint
        return endpoint.display if endpoint is not None else ""

    def task_label(self, tag: str | None) -> str:
        """The task name(s) a record's tag stands for, or ``?TAG`` for an unknown one."""
        if tag is None:
            return "?"
        names = self.tasks_by_tag.get(tag)
        if not names:
            return f"?{tag}"
        return " | ".join(names)

    @property
    def traits(self) -> StoreTraits:
        """What the store can report (its kind, how it is walked and measured)."""
        return traits_of(self.settings.endpoint, self.store)

    def require_shared_store(self) -> None:
        """Refuse ``memory://``: its records live inside each process, not here."""
        if not self.traits.shared:
            raise CliError(
                f"the store ({self.settings.redis_url!r}) is the in-process store for "
                "tests: its records live inside each worker process, so there is nothing "
                "for this command to read. Point idem_store_url at PostgreSQL or Redis."
            )


def app_of(ctx: click.Context) -> Any:
    """The Celery app: Celery's ``-A APP`` (``ctx.obj.app``) or ``python -m celery_idem``'s."""
    app = getattr(ctx.obj, "app", None)
    if app is None:
        raise click.UsageError(
            "no Celery app: run as `celery -A APP idem ...` or `python -m celery_idem -A APP ...`"
        )
    return app


def _idempotent_tasks(app: Any) -> dict[str, Any]:
    try:
        app.loader.import_default_modules()  # the app's `imports`/`include`, autodiscovery
    except Exception as exc:
        raise CliError(
            f"importing the task modules of app {app.main!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    return {
        name: task for name, task in sorted(app.tasks.items()) if isinstance(task, IdempotentTask)
    }


_CLOSE = 0.7
"""How similar (difflib's ratio, 0 to 1) a registered name must be to be suggested."""


def _similarity(name: str, candidate: str) -> float:
    """How close two lower-cased task names are, from 0 to 1 (difflib's ratio).

    The dotted parts both start with are left out first, so that tasks of one module
    are not all alike for sharing it (``cli.ad`` is close to ``cli.add``, not to
    ``cli.send``); the last dotted parts alone are compared too, for a name given
    without its module.
    """
    ours, theirs = name.split("."), candidate.split(".")
    common = 0
    while common < min(len(ours), len(theirs)) - 1 and ours[common] == theirs[common]:
        common += 1
    rest = difflib.SequenceMatcher(None, ".".join(ours[common:]), ".".join(theirs[common:]))
    tails = difflib.SequenceMatcher(None, ours[-1], theirs[-1])
    return max(rest.ratio(), tails.ratio())


def close_names(name: str, names: Iterable[str], *, limit: int = 3) -> list[str]:
    """The names closest to a mistyped ``name``, best first (at most ``limit``).

    Names whose last dotted part is ``name``'s come first (``send_welcome_email`` for
    ``shop.tasks.send_welcome_email``), then those at least :data:`_CLOSE` similar, ignoring case.
    """
    wanted = name.lower()
    scored = sorted(
        ((_similarity(wanted, n.lower()), n) for n in names if n != name),
        key=lambda pair: -pair[0],
    )
    tail = wanted.rsplit(".", 1)[-1]
    same_tail = [n for _, n in scored if n.lower().rsplit(".", 1)[-1] == tail]
    similar = [n for score, n in scored if score >= _CLOSE]
    return list(dict.fromkeys([*same_tail, *similar]))[:limit]


def _did_you_mean(name: str, names: Iterable[str]) -> str:
    """`` (did you mean 'a' or 'b'?)``, or ``""`` when nothing is close."""
    close = close_names(name, names)
    if not close:
        return ""
    quoted = [repr(n) for n in close]
    listed = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
    return f" (did you mean {listed}?)"


def _unregistered_hint(task_name: str, tasks: Mapping[str, Any]) -> str:
    """Which tasks keep ``task_name`` as their ``idem_scope`` (a former name), else a typo hint."""
    keepers = []
    for name, task in tasks.items():
        try:
            if name != task_name and task.idem_settings().scope_of(name) == task_name:
                keepers.append(repr(name))
        except IdempotencyError:
            continue  # resolve() says why, once
    if keepers:
        return f" (it is the idem_scope of {', '.join(keepers)}: the same records)"
    return _did_you_mean(task_name, tasks)


def _not_idempotent(task_name: str, tasks: Mapping[str, Any]) -> click.UsageError:
    return click.UsageError(
        f"task {task_name!r} is not an IdempotentTask: it keeps no records "
        f"(idempotent tasks of this app: {', '.join(tasks) or 'none'})"
    )


def idempotent_task(app: Any, task_name: str) -> IdempotentTask:
    """The app's idempotent task ``task_name``, which must be registered.

    Raises:
        click.UsageError: No task of that name (the message suggests the closest
            idempotent tasks), or it is not an ``IdempotentTask``.
        CliError: Importing the app's task modules failed.
    """
    tasks = _idempotent_tasks(app)
    if task_name in tasks:
        task: IdempotentTask = tasks[task_name]
        return task
    if task_name in app.tasks:
        raise _not_idempotent(task_name, tasks)
    raise click.UsageError(
        f"task {task_name!r} is not registered in app {app.main!r}"
        f"{_did_you_mean(task_name, tasks)}; its idempotent tasks: {', '.join(tasks) or 'none'}"
    )


def _where(settings: IdemSettings) -> tuple[object, str]:
    endpoint = settings.endpoint
    return (endpoint.location if endpoint else None), settings.key_prefix


def resolve(app: Any, task_name: str | None) -> Target:
    """Settings and store for ``task_name`` (or the app), and the app's task tags.

    An unregistered ``task_name`` (a task of another service) is allowed: the app's
    settings are used and a note says so on stderr, with the closest registered names
    (a typo).

    Raises:
        CliError: The task is registered but not idempotent, a setting is invalid, or
            no store URL can be found.
    """
    tasks = _idempotent_tasks(app)
    try:
        if task_name is None:
            settings = resolve_settings(app.conf)
        elif task_name in tasks:
            settings = tasks[task_name].idem_settings()
        elif task_name in app.tasks:
            raise _not_idempotent(task_name, tasks)
        else:
            click.echo(
                f"note: task {task_name!r} is not registered in app {app.main!r}"
                f"{_unregistered_hint(task_name, tasks)}; using the app's settings",
                err=True,
            )
            settings = resolve_settings(app.conf)
        store = admin_for(settings.endpoint, task_name=task_name, app_name=app.main)
    except IdempotencyError as exc:
        raise CliError(str(exc)) from exc
    by_tag: dict[str, list[str]] = {}
    elsewhere: list[str] = []
    scopes: set[str] = set()
    here = _where(settings)
    for name, task in tasks.items():
        try:
            theirs = task.idem_settings()
        except IdempotencyError as exc:
            click.echo(f"note: task {name!r} is skipped: {exc}", err=True)
            continue
        if _where(theirs) == here:
            scope = theirs.scope_of(name)
            scopes.add(scope)
            by_tag.setdefault(task_tag(scope), []).append(name)
        else:
            elsewhere.append(name)
    if task_name is not None and task_name not in tasks and task_name not in scopes:
        # A task of another service, or a former name no registered task keeps as its
        # idem_scope: its records are under its own name.
        by_tag.setdefault(task_tag(task_name), []).insert(0, task_name)
    conf = app.conf
    accept = codec.accepted_content_types(conf.result_accept_content or conf.accept_content)
    return Target(
        app=app,
        task_name=task_name,
        settings=settings,
        store=store,
        accept=accept,
        tasks_by_tag={tag: tuple(names) for tag, names in by_tag.items()},
        elsewhere=tuple(elsewhere),
    )


@contextlib.contextmanager
def store_errors() -> Iterator[None]:
    """Turn a store's errors (unreachable, refused) into a clean exit 1."""
    try:
        yield
    except IdempotencyError as exc:
        raise CliError(str(exc)) from exc


F = TypeVar("F", bound=Callable[..., Any])


def json_option(fn: F) -> F:
    """``--json``: machine-readable output on stdout."""
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Print JSON for scripts instead of a table (errors still go to stderr).",
    )(fn)


def scan_count_option(default: int) -> Callable[[F], F]:
    """``--scan-count N``: the COUNT hint of each SCAN step."""

    def decorate(fn: F) -> F:
        return click.option(
            "--scan-count",
            type=click.IntRange(min=1),
            default=default,
            show_default=True,
            help="COUNT hint of each SCAN step (keys looked at per round trip; rows per "
            "page on PostgreSQL).",
        )(fn)

    return decorate


def task_option(help_text: str) -> Callable[[F], F]:
    """``--task NAME``."""

    def decorate(fn: F) -> F:
        return click.option("--task", "-t", "task_name", metavar="NAME", help=help_text)(fn)

    return decorate
