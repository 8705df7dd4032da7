"""``celery -A APP idem``: operators' commands for celery-idem records and their store.

Registered as a Celery sub-command through the ``celery.commands`` entry point (Celery
adds every click command of that group to ``celery``), and also runnable as
``python -m celery_idem -A APP ...``. Commands:

``inspect KEY --task NAME``
    One record: state, owner task id, fence, claim time (the fence is the server's
    clock in ms at the claim), lease left, expiry, and a result preview decoded only
    with the app's accepted content types; "stored at" is the expiry minus the task's
    ``idem_ttl``; the durable steps the key's attempts finished (or, completed, how
    many the run stored). ``--storage-key`` takes a Redis key as ``list`` prints it.
``forget KEY --task NAME [--yes] [--force]``
    Deletes one record after confirmation; refused while an attempt holds the key
    unless ``--force``; atomic, and only deletes the record that was shown. A key
    under the prefix that is not a record is deleted only with ``--force``; a key
    outside the prefix never.
``list [--task NAME] [--state in_progress|completed|free] [--limit N]``
    Records found with ``SCAN`` (``MATCH`` on the prefix, or the task's tag), never
    ``KEYS``.
``stats [--task NAME]``
    Counts by task and state, memory (``MEMORY USAGE`` of a sample), the oldest claim
    in progress.
``key TASK [--args JSON] [--kwargs JSON] [--key KEY]``
    The idempotency key and storage key a call would use, computed by the worker's
    own code (explicit, rule or derived), and the task's prefix and store; no Redis.
``doctor [--task NAME] [--strict]``
    Checks the store: reachable, version, scripts, eviction policy, persistence,
    topology, clock offset (PostgreSQL: schema, functions, indexes, privileges,
    writable, idle_in_transaction_session_timeout, durability, clock); each finding
    with a fix; exits 1 on a failure.
``migrate [--task NAME]``
    Creates or upgrades the PostgreSQL store's tables (idempotent); refused on Redis.
``purge [--task NAME] [--batch N]``
    Deletes the PostgreSQL store's expired rows in batches and prints the count; on
    Redis, which expires records itself, says so and exits 0.

Every command prints a table for people and JSON with ``--json``. Exit status: 0
success, 1 failure, 2 usage error, 3 no such record (``inspect``, ``forget``).

Records live under ``PREFIX:TAG:HASH`` (:func:`celery_idem.keys.storage_key`): the
tag (6 characters of a hash of the task's scope: its ``idem_scope``, else its name) is
what lets ``list --task`` and ``stats`` tell records' tasks apart without storing the
name in every record. ``--task NAME`` finds a task's records through its scope, so a
task renamed with ``idem_scope`` set to its former name still finds the old records.
"""

from __future__ import annotations

from typing import Any

import click

from celery_idem.cli.doctor import doctor_command
from celery_idem.cli.key import key_command
from celery_idem.cli.listing import list_command
from celery_idem.cli.maintenance import migrate_command, purge_command
from celery_idem.cli.records import forget_command, inspect_command
from celery_idem.cli.stats import stats_command

__all__ = ["idem", "main"]

_COMMANDS = (
    key_command, inspect_command, forget_command, list_command, stats_command, doctor_command,
    migrate_command, purge_command,
)  # fmt: skip

_HELP = """Inspect and repair celery-idem records; check their store.

Each command uses the app's idempotency settings (idem_store_url or
idem_redis_url, idem_key_prefix, ...), or with --task NAME that task's (task options
may override the app's, as on a worker). Tables are for people; --json prints JSON
for scripts.

Records live in Redis, or in PostgreSQL's celery_idem_records table, under
PREFIX:TAG:HASH: TAG is 6 characters of a hash of the task name, HASH a hash of
task name and key. The idempotency key cannot be read back from the store: `list`
and `stats` show storage keys, which `inspect` and `forget` accept with
--storage-key; `key TASK --args JSON` prints the key and storage key a call would
use. On PostgreSQL, `migrate` creates the tables and `purge` deletes expired rows.

\b
States of a record:
  in_progress  running (a live lease), parked (held for a retry of the same
               task id) or lease_expired (its worker is gone: the next
               claim takes the key over)
  completed    result, error (a cached failure) or no_result (ran, but
               its result could not be kept)
  free         released after a failed run; the next claim runs the body

\b
Exit status: 0 success; 1 failure (store unreachable or refusing, a doctor
check failed, forget not confirmed or refused); 2 usage error; 3 no such
record (inspect, forget).
"""


@click.group("idem", help=_HELP)
def idem() -> None:
    """The ``celery idem`` group (its help is ``_HELP``)."""


class _AppHolder:
    """``ctx.obj`` for ``python -m celery_idem``: what Celery's CLIContext offers us."""

    def __init__(self, app: Any) -> None:
        self.app = app


@click.group("celery_idem", help=_HELP + "\nThe same commands as `celery -A APP idem COMMAND`.\n")
@click.option(
    "-A",
    "--app",
    "app_name",
    required=True,
    metavar="APP",
    help="The Celery app, as for `celery -A`: module, or module:attribute.",
)
@click.pass_context
def main(ctx: click.Context, app_name: str) -> None:
    """``python -m celery_idem -A APP COMMAND``."""
    from celery.app.utils import find_app  # noqa: PLC0415 - not needed to register `idem`

    try:
        app = find_app(app_name)
    except Exception as exc:
        raise click.BadParameter(
            f"cannot load the Celery app {app_name!r}: {type(exc).__name__}: {exc}",
            param_hint="'-A' / '--app'",
        ) from exc
    ctx.obj = _AppHolder(app)


for _command in _COMMANDS:
    idem.add_command(_command)
    main.add_command(_command)
