"""``celery idem list``: a store's records, walked with ``SCAN`` (or PostgreSQL's pages).

Kept apart from ``inspect`` and ``forget`` (one record, :mod:`.records`): it walks the
store with ``SCAN`` (``MATCH`` on the prefix, and on the task's tag with ``--task``),
reading each page of keys in one pipelined round trip; it never uses ``KEYS``. On
PostgreSQL the same walk pages through the primary key's range of the prefix.
"""

from __future__ import annotations

from typing import Any

import click

from celery_idem.cli import render, views
from celery_idem.cli.context import store_errors
from celery_idem.cli.walk import Walk, count_option, scan_command

__all__ = ["list_command"]


def _wanted(view: dict[str, Any], state: str | None) -> bool:
    return state is None or view["state"] == state


@scan_command(
    "list",
    short_help="List records with SCAN, by task and state.",
    scan_count=500,
    options=(
        click.option(
            "--state",
            type=click.Choice(views.STATE_CHOICES),
            help="Only records in this state (in_progress includes parked and lease_expired).",
        ),
        count_option(
            "--limit", default=100, help_text="Stop after this many records (0: no limit)."
        ),
    ),
)
def list_command(
    ctx: click.Context,
    *,
    task_name: str | None,
    state: str | None,
    limit: int,
    scan_count: int,
    as_json: bool,
) -> None:
    """List records: storage key, task, state, owner, claim time, lease, expiry.

    Walks the store with SCAN (never KEYS), MATCH on the key prefix, or on the task's
    tag with --task, so it is safe on a busy production Redis; on PostgreSQL, pages of
    the primary key's range under the prefix. The idempotency key itself cannot be
    read back from the store (the record's name is a hash of it): use the storage key
    with `inspect --storage-key` or `forget --storage-key`.

    Records are shown oldest claim first among those found; with --limit, the walk
    stops once that many matched, so they are not the oldest of the whole store. A
    record that expires during the walk is skipped; one written during it may or may
    not be seen (SCAN's guarantee).

    --json prints an object: store, prefix, task, state, records (a list, one object
    per record: storage_key, task, state, substate, task_id, fence, claimed_at,
    lease_left, expires_in, result_bytes, codec, takeovers), truncated (stopped at
    --limit with more keys left) and scan_calls (SCAN steps, or pages on
    PostgreSQL). `jq '.records[]'` walks the records.
    """
    walk = Walk(ctx, task_name, scan_count)
    found: list[dict[str, Any]] = []
    truncated = False
    with store_errors():
        for step in walk.steps(once=True):
            found.extend(view for view in step if _wanted(view, state))
            if limit and len(found) >= limit:
                truncated = len(found) > limit or not walk.finished
                found = found[:limit]
                break
    found.sort(key=lambda v: v["fence"] or 0)
    if as_json:
        click.echo(
            render.to_json(
                {
                    **walk.json_head(),
                    "state": state,
                    "records": found,
                    "truncated": truncated,
                    "scan_calls": walk.calls,
                }
            )
        )
        return
    if found:
        click.echo(render.table(views.SUMMARY_HEADERS, views.summary_rows(found)))
    more = f"; stopped at --limit {limit}, more may match" if truncated else ""
    where = f"{walk.target.url} under {walk.pattern!r}"
    steps = walk.target.traits.steps(walk.calls)
    click.echo(f"{len(found)} record(s) in {where} ({steps}){more}.")
    walk.note_elsewhere()
