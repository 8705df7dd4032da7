"""What ``list`` and ``stats`` share: their options, and one ``SCAN`` walk of the records.

Both walk the store with ``SCAN`` (``MATCH`` on the prefix, or on the task's tag with
``--task``; never ``KEYS``; PostgreSQL's ``scan`` pages through the primary key's range
of the same pattern), read each step's keys in one pipelined round trip, and
turn each record into a :func:`~celery_idem.cli.views.summary_view`. They differ only
in what they keep of the views, so the walk, the options and the closing note on
tasks whose records live elsewhere are written here once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import click

from celery_idem.cli import views
from celery_idem.cli.context import (
    F,
    Target,
    app_of,
    json_option,
    resolve,
    scan_count_option,
    task_option,
)
from celery_idem.keys import storage_pattern, storage_task_tag

__all__ = ["Option", "Walk", "count_option", "scan_command"]

_TASK_HELP = "Only this task's records (SCAN MATCH on its tag), with its settings."


def count_option(flag: str, *, default: int, help_text: str) -> Callable[[F], F]:
    """``FLAG N``: a whole number, 0 or more, with its default shown in ``--help``."""

    def decorate(fn: F) -> F:
        return click.option(
            flag, type=click.IntRange(min=0), default=default, show_default=True, help=help_text
        )(fn)

    return decorate


Option = Callable[[Callable[..., Any]], Callable[..., Any]]
"""A click option (or argument) decorator."""


def scan_command(
    name: str, *, short_help: str, scan_count: int, options: Sequence[Option] = ()
) -> Callable[[Callable[..., Any]], click.Command]:
    """A walking command: ``--task``, its own ``options``, ``--scan-count``, ``--json``.

    The options are listed in ``--help`` in that order; the function gets the click
    context first, then the options as keywords (``task_name``, ..., ``scan_count``,
    ``as_json``).
    """

    def decorate(fn: Callable[..., Any]) -> click.Command:
        stack: tuple[Option, ...] = (
            task_option(_TASK_HELP), *options, scan_count_option(scan_count), json_option,
        )  # fmt: skip
        command: Callable[..., Any] = click.pass_context(fn)
        for option in reversed(stack):  # the last applied is listed first
            command = option(command)
        return click.command(name, short_help=short_help)(command)

    return decorate


class Walk:
    """One ``SCAN`` walk over the records a command sees.

    Args:
        ctx: The command's click context (its app).
        task_name: ``--task``: only that task's records, with its settings.
        scan_count: The ``COUNT`` hint of each step.

    Raises:
        CliError: As :func:`~celery_idem.cli.context.resolve`, and for a store that
            lives inside each process (``memory://``).
    """

    def __init__(self, ctx: click.Context, task_name: str | None, scan_count: int) -> None:
        self.target: Target = resolve(app_of(ctx), task_name)
        self.target.require_shared_store()
        self.task_name = task_name
        # --task: SCAN MATCH on the tag of the task's scope (idem_scope, else its name).
        self.pattern = storage_pattern(self.target.prefix, self.target.scope)
        self.scan_count = scan_count
        self.calls = 0
        """``SCAN`` steps taken so far."""
        self.finished = False
        """The last step ended the walk (its cursor was 0): every key was looked at."""

    def steps(self, *, once: bool = False) -> Iterator[list[dict[str, Any]]]:
        """Each step's records as summary views; a record expired since ``SCAN`` is left out.

        A caller may stop between steps (no more round trips are made). Store errors
        propagate: walk inside :func:`~celery_idem.cli.context.store_errors`.

        Args:
            once: Leave out keys an earlier step returned (``SCAN`` returns a key twice
                while Redis resizes its table), at the cost of keeping every key seen.
        """
        store, prefix = self.target.store, self.target.prefix
        seen: set[str] | None = set() if once else None
        cursor = 0
        while True:
            cursor, keys = store.scan(self.pattern, cursor=cursor, count=self.scan_count)
            self.calls += 1
            self.finished = cursor == 0
            if seen is not None:
                keys = [k for k in keys if k not in seen]
                seen.update(keys)
            found = []
            for summary in store.summarize(keys):
                if summary is not None:
                    tag = storage_task_tag(prefix, summary.key)
                    label = self.task_name or self.target.task_label(tag)
                    found.append(views.summary_view(summary, label))
            yield found
            if self.finished:
                return

    def json_head(self) -> dict[str, Any]:
        """What every ``--json`` answer of a walk starts with: store, prefix, task."""
        return {"store": self.target.url, "prefix": self.target.prefix, "task": self.task_name}

    def note_elsewhere(self) -> None:
        """Without ``--task``, name on stderr the tasks whose records this walk missed."""
        if self.target.elsewhere and self.task_name is None:
            click.echo(
                f"note: tasks {', '.join(self.target.elsewhere)} keep their records in "
                "another store or under another prefix: use --task",
                err=True,
            )
