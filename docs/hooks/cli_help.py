"""MkDocs hook: the CLI page's reference is the commands' own ``--help``, at build time.

A page that contains the marker line ``<!-- celery-idem-cli-help -->`` gets, in its
place, the help of ``celery -A APP idem`` and of each of its commands, exactly as click
prints it (at a fixed width, so the build does not depend on the terminal). The
reference thus cannot drift from the commands; a CLI that fails to import fails the
build.
"""

from __future__ import annotations

from typing import Any

import click

MARKER = "<!-- celery-idem-cli-help -->"
PROG = "celery -A APP idem"
WIDTH = 88


def _help(command: click.Command, name: str, parent: click.Context | None) -> str:
    ctx = click.Context(
        command, info_name=name, parent=parent, terminal_width=WIDTH, max_content_width=WIDTH
    )
    return ctx.get_help()


def cli_reference() -> str:
    """The help of the ``idem`` group and of each command, as Markdown."""
    from celery_idem.cli import idem  # noqa: PLC0415 - only pages with the marker need it

    group_ctx = click.Context(idem, info_name=PROG, terminal_width=WIDTH, max_content_width=WIDTH)
    parts = [f"### `{PROG}`\n\n```text\n{idem.get_help(group_ctx)}\n```\n"]
    for name in sorted(idem.commands):
        text = _help(idem.commands[name], name, group_ctx)
        parts.append(f"### `{PROG} {name}`\n\n```text\n{text}\n```\n")
    return "\n".join(parts)


def on_page_markdown(markdown: str, **_: Any) -> str:
    """Replace the marker with the generated reference (MkDocs event)."""
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, cli_reference())
