"""``celery idem inspect`` and ``forget``: one record (``list`` is in :mod:`.listing`).

``inspect KEY --task NAME`` reads one record (one round trip); ``forget`` deletes one
with a compare-and-delete script (it is refused while a live attempt holds the key, and
when the record changed after it was shown).
"""

from __future__ import annotations

import time
from typing import Any

import click

from celery_idem.cli import render, views
from celery_idem.cli.context import (
    CliError,
    NotFound,
    Target,
    app_of,
    json_option,
    resolve,
    store_errors,
    task_option,
)
from celery_idem.exceptions import IdempotencyError, InvalidIdempotencyKey, StoreUnavailable
from celery_idem.keys import KeySource, storage_key, storage_task_tag, validate_key
from celery_idem.store.base import NOT_A_RECORD_FENCE, ForgetResult, RecordSummary, StoredRecord
from celery_idem.store.record import RecordState

__all__ = ["forget_command", "inspect_command"]

_PREVIEW = 200

_KEY_HELP = (
    "The task whose record KEY is (its settings pick the store and prefix). Required "
    "unless --storage-key."
)
_STORAGE_KEY_HELP = (
    "KEY is a record's storage key as `list` and `stats` print it (PREFIX:TAG:HASH), "
    "not an idempotency key; --task is then optional."
)


def _locate(
    ctx: click.Context, key: str, task_name: str | None, is_storage_key: bool
) -> tuple[Target, str, str | None, str]:
    """The target, storage key, logical key (None if unknown) and task label."""
    if not is_storage_key and task_name is None:
        raise click.UsageError(
            "--task NAME is required with an idempotency key (the record's name hashes "
            "the task name with the key); or pass a storage key with --storage-key"
        )
    target = resolve(app_of(ctx), task_name)
    target.require_shared_store()
    if is_storage_key:
        label = task_name or target.task_label(storage_task_tag(target.prefix, key))
        return target, key, None, label
    assert task_name is not None
    try:
        key = validate_key(key, task_name=task_name, source=KeySource.CALL)
    except InvalidIdempotencyKey as exc:
        raise click.UsageError(str(exc)) from exc
    assert target.scope is not None
    return target, storage_key(target.prefix, target.scope, key), key, task_name


_FOREIGN = "another type, or a string that is not a record"
"""What a key that holds something else than a celery-idem record may hold."""


def _read(target: Target, stored: str) -> StoredRecord | RecordSummary | None:
    """The record; None when absent; for a key holding something else, its summary.

    A key of another type makes the read script fail (``WRONGTYPE``) and a string that
    is not a record fails to decode: the summary script, which checks the type first,
    then says whether it is foreign (state ``""``), with its expiry.
    """
    with store_errors():
        try:
            return target.store.read(stored)
        except StoreUnavailable:
            raise
        except (ValueError, IndexError, IdempotencyError) as exc:
            summary = target.store.summarize([stored])[0]
            if summary is not None and summary.state:  # a record after all: the error stands
                if isinstance(exc, IdempotencyError):
                    raise
                raise CliError(f"{stored!r} does not hold a celery-idem record ({exc})") from exc
            return summary


def _foreign(stored: str, summary: RecordSummary, label: str, as_json: bool) -> CliError:
    """``inspect`` of a key under which something else lives (exit status 1)."""
    if as_json:
        click.echo(render.to_json(views.summary_view(summary, label)))
    return CliError(
        f"{stored} does not hold a celery-idem record ({_FOREIGN}); `forget --storage-key "
        "--force` deletes it"
    )


def _absent(stored: str, key: str | None, label: str, as_json: bool) -> NotFound:
    what = f"key {key!r} of task {label!r}" if key is not None else f"storage key {stored!r}"
    if as_json:
        click.echo(
            render.to_json({"storage_key": stored, "key": key, "task": label, "state": "absent"})
        )
    return NotFound(f"no record for {what} ({stored}): never claimed, expired, or forgotten")


def _view(
    target: Target, record: StoredRecord, *, stored: str, key: str | None, label: str, limit: int
) -> dict[str, Any]:
    return views.record_view(
        record,
        storage_key=stored,
        task=label,
        key=key,
        store_url=target.url,
        accept=target.accept,
        preview_limit=limit,
        now=time.time(),
        ttl=target.settings.ttl,
    )


@click.command(
    "inspect", short_help="Show one record: state, owner, fence, lease, expiry, result, steps."
)
@click.argument("key")
@task_option(_KEY_HELP)
@click.option("--storage-key", "is_storage_key", is_flag=True, help=_STORAGE_KEY_HELP)
@click.option(
    "--full",
    is_flag=True,
    help=f"Show the whole result and step values (default: {_PREVIEW} chars).",
)
@json_option
@click.pass_context
def inspect_command(
    ctx: click.Context,
    *,
    key: str,
    task_name: str | None,
    is_storage_key: bool,
    full: bool,
    as_json: bool,
) -> None:
    """Show one record: state, owner, fence, lease, expiry, result and durable steps.

    KEY is the effective idempotency key of --task NAME (what the body sees as
    self.idempotency_key; a group member's is KEY#<position>.<fingerprint>).

    \b
    Shows: the state (in_progress: running / parked / lease_expired; queued:
    reserved / reservation_expired; completed: result / error / no_result; free), the
    owner (or reserved) task id, the fence, when the claim
    was taken (the fence is the server's clock in ms at the claim), the lease left,
    when the result was stored (its expiry minus the task's idem_ttl), when the record
    expires, and a preview of the result.

    Then the durable steps (self.step) the key's attempts finished, which a later
    attempt replays instead of running them: one line each with its position, name,
    occurrence (the n-th step of that name), size, when it was stored (the server's
    clock) and a preview of its value, or "not kept" and why (the step ran, but its
    value could not be stored: the task cannot go past it). A completed record drops
    its steps and keeps only how many the run stored.

    The previews are decoded only with the content types the app accepts
    (result_accept_content, else accept_content): a pickled result or step value
    is never unpickled unless the app accepts pickle. Exit status 3 when there is no
    record.

    --json prints an object: task, key, storage_key, store, state, substate,
    task_id, fence, fingerprint, takeovers, claimed_at and stored_at (ISO 8601, UTC, or null),
    claimed_ago, lease_left and expires_in (seconds, or null), result (null, or kind,
    content_type, bytes, and decoded + preview, or note, error or reason), steps (a
    list, one object per step: position, name, occurrence, at (ISO 8601, UTC), ago
    (seconds), kept, content_type and bytes (null when not kept), and decoded + preview,
    or note, or reason when not kept; empty for a completed record) and steps_done (the
    steps the run finished: a completed record's count, else how many are listed);
    {"state": "absent", ...} with exit status 3 when there is no record.
    """  # noqa: D301 - \b is click's no-rewrap marker
    target, stored, key_or_none, label = _locate(ctx, key, task_name, is_storage_key)
    record = _read(target, stored)
    if record is None:
        raise _absent(stored, key_or_none, label, as_json)
    if isinstance(record, RecordSummary):
        raise _foreign(stored, record, label, as_json)
    limit = 0 if full else _PREVIEW
    view = _view(target, record, stored=stored, key=key_or_none, label=label, limit=limit)
    click.echo(render.to_json(view) if as_json else views.record_text(view))


@click.command("forget", short_help="Delete one record (asks first; refuses one in progress).")
@click.argument("key")
@task_option(_KEY_HELP)
@click.option("--storage-key", "is_storage_key", is_flag=True, help=_STORAGE_KEY_HELP)
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--force",
    is_flag=True,
    help="Delete the record even while an attempt holds it (in progress with a live lease, "
    "parked for a retry, or queued: reserved for a message not yet claimed): a duplicate "
    "may then run the body concurrently. Also delete a key under the prefix that is not a "
    "celery-idem record.",
)
@json_option
@click.pass_context
def forget_command(
    ctx: click.Context,
    *,
    key: str,
    task_name: str | None,
    is_storage_key: bool,
    yes: bool,
    force: bool,
    as_json: bool,
) -> None:
    """Delete one record, so the next call of KEY runs the body again.

    For an operator unsticking a key: a completed record whose result must not be
    replayed any more, or a failed run's record. Shows the record and asks for
    confirmation (--yes skips it; answering no exits 1 and deletes nothing).

    A record in progress (a live lease, or parked for a retry) or queued (reserved by
    a publisher for a message no worker has claimed yet) is refused unless --force:
    deleting it lets a duplicate run while the first attempt still runs (or is queued).
    The delete is atomic and only removes the record that was shown: if another
    attempt claimed the key in the meantime, nothing is deleted (exit 1). Exit status
    3 when there is no record.

    A key of the form PREFIX:TAG:HASH under the prefix that holds something else
    (another type, or a string that is not a record) is kept unless --force; forced,
    it is deleted only while it still is not a record. A key outside the prefix is
    never deleted.

    --json prints {"forgotten": true, "record": <as inspect --json>}; the record and
    the question then go to stderr.
    """
    target, stored, key_or_none, label = _locate(ctx, key, task_name, is_storage_key)
    record = _read(target, stored)
    if record is None:
        raise _absent(stored, key_or_none, label, as_json)
    if isinstance(record, RecordSummary):
        _forget_foreign(target, record, label=label, yes=yes, force=force, as_json=as_json)
        return
    view = _view(target, record, stored=stored, key=key_or_none, label=label, limit=_PREVIEW)
    held = record.state in _HOLDING and (record.lease_left or 0) > 0
    if held and not force:
        raise CliError(
            f"the record of {stored} is {views.state_text(view['state'], view['substate'])} "
            f"(task id {record.task_id}, {render.duration(record.lease_left)} left): deleting "
            f"it would let a duplicate run the body while {_holder(record.state)}; wait "
            "for it, or pass --force"
        )
    if not yes:
        click.echo(views.record_text(view), err=as_json)
        if held:
            click.echo("warning: an attempt still holds this key (--force)", err=True)
        if not click.confirm("Forget this record?", default=False, err=True):
            raise CliError("not confirmed: nothing deleted")
    with store_errors():
        outcome = target.store.forget_if(stored, fence=record.fence, force=force)
    if outcome is ForgetResult.ABSENT:
        raise NotFound(f"{stored} expired or was deleted meanwhile")
    if outcome is ForgetResult.CHANGED:
        raise CliError(
            f"{stored} changed after it was shown (another attempt claimed the key): nothing "
            "deleted; inspect it again"
        )
    if outcome is ForgetResult.HELD:
        raise CliError(
            f"{stored} is held by a live attempt now (claimed or renewed meanwhile): nothing "
            "deleted (use --force)"
        )
    if outcome is not ForgetResult.DELETED:  # NOT_A_RECORD: read() decoded it, so rare
        raise CliError(f"{stored} does not hold a celery-idem record: nothing deleted")
    if as_json:
        click.echo(render.to_json({"forgotten": True, "record": view}))
    else:
        click.echo(f"Forgotten: {stored} ({label}).")


_HOLDING = (RecordState.IN_PROGRESS.value, RecordState.RESERVED.value)
"""States whose live deadline (a lease, a hold, a reservation) holds the key."""


def _holder(state: str) -> str:
    if state == RecordState.RESERVED.value:
        return "the message it was reserved for is still queued"
    return "this attempt still runs"


def _forget_foreign(
    target: Target, summary: RecordSummary, *, label: str, yes: bool, force: bool, as_json: bool
) -> None:
    """``forget`` of a key that holds something else than a record: only forced, only ours.

    Only a key named like a record under the prefix (``PREFIX:TAG:HASH``) is deleted,
    and only while it still is not a record: the script compares the fence with
    :data:`~celery_idem.store.base.NOT_A_RECORD_FENCE`, which no record has, so a
    record written there since it was shown is kept.
    """
    stored = summary.key
    if storage_task_tag(target.prefix, stored) is None:
        raise CliError(
            f"{stored} does not hold a celery-idem record ({_FOREIGN}) and is not a storage "
            f"key under the prefix {target.prefix!r} (PREFIX:TAG:HASH): nothing deleted; "
            "celery idem never deletes a key outside its prefix (with another task's "
            "prefix, pass --task NAME)"
        )
    if not force:
        raise CliError(
            f"{stored} does not hold a celery-idem record ({_FOREIGN}): kept; --force deletes it"
        )
    view = views.summary_view(summary, label)
    if not yes:
        expires = render.duration(summary.ttl) if summary.ttl is not None else "never"
        pairs = [
            ("task", label),
            ("storage key", stored),
            ("store", target.url),
            ("state", f"not_a_record ({_FOREIGN})"),
            ("expires in", expires),
        ]
        click.echo(render.fields(pairs), err=as_json)
        if not click.confirm("Delete this key?", default=False, err=True):
            raise CliError("not confirmed: nothing deleted")
    with store_errors():
        outcome = target.store.forget_if(stored, fence=NOT_A_RECORD_FENCE, force=True)
    if outcome is ForgetResult.ABSENT:
        raise NotFound(f"{stored} expired or was deleted meanwhile")
    if outcome is not ForgetResult.DELETED:  # CHANGED: a record was written there since
        raise CliError(
            f"{stored} holds a celery-idem record now (written after it was shown): "
            "nothing deleted; inspect it again"
        )
    if as_json:
        click.echo(render.to_json({"forgotten": True, "record": view}))
    else:
        click.echo(f"Deleted: {stored} (not a celery-idem record).")
