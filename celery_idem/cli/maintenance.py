"""``celery idem migrate`` and ``purge``: a store's schema and its expired records.

Only a store with a schema (PostgreSQL) has something to migrate, and only one whose
server does not expire records itself has something to purge; which store does what
is :mod:`.traits`'. :func:`purge_expired` is also what the beat-schedulable task
``celery_idem.purge`` (:mod:`celery_idem.contrib.purge`) runs.

``postgres_admin`` is imported only for a PostgreSQL store: psycopg is an optional
dependency, and a Redis user never needs it.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass
from types import ModuleType

import click

from celery_idem.cli import render
from celery_idem.cli.context import (
    CliError,
    app_of,
    json_option,
    resolve,
    store_errors,
    task_option,
)
from celery_idem.cli.traits import StoreTraits, traits_of
from celery_idem.config import IdemSettings
from celery_idem.exceptions import IdempotencyConfigError
from celery_idem.store.base import StoreAdmin

__all__ = [
    "DEFAULT_BATCH",
    "Purged",
    "migrate_command",
    "postgres_admin",
    "purge_command",
    "purge_expired",
]

DEFAULT_BATCH = 1000
"""Expired rows one purge transaction deletes: short transactions, few locks at a time."""


def postgres_admin() -> ModuleType:
    """``celery_idem.store.postgres_admin``, imported now (it needs psycopg).

    Raises:
        IdempotencyConfigError: psycopg is not installed.
    """
    try:
        return importlib.import_module("celery_idem.store.postgres_admin")
    except ImportError as exc:
        raise IdempotencyConfigError(
            f"the PostgreSQL store needs psycopg 3 ({exc}): pip install "
            "'celery-idem[postgres]' (or psycopg[binary])"
        ) from exc


@dataclass(frozen=True)
class Purged:
    """What one purge did.

    Attributes:
        store: The store's URL, without a password.
        kind: The store's kind (``postgres``, ``redis``, ``memory``).
        deleted: Expired records deleted (0 where the server expires them itself).
        batch: Rows per delete transaction.
        note: Why nothing was to be deleted, for a store that expires records itself.
    """

    store: str
    kind: str
    deleted: int
    batch: int
    note: str | None = None


def _self_expiring_note(traits: StoreTraits) -> str:
    return (
        f"{traits.name} expires records itself (their TTLs): there are no expired records to purge"
    )


def purge_expired(
    settings: IdemSettings, store: StoreAdmin, *, batch: int = DEFAULT_BATCH
) -> Purged:
    """Delete the expired records of ``store`` (which ``settings`` name), in batches.

    A store whose server expires records itself (Redis, the in-process store) has
    none: nothing is done, and :attr:`Purged.note` says why.

    Raises:
        IdempotencyError: The store is unreachable or refused (``StoreUnavailable``),
            or psycopg is not installed.
    """
    endpoint = settings.endpoint
    traits = traits_of(endpoint, store)
    url = endpoint.display if endpoint is not None else ""
    if traits.expires_itself:
        return Purged(url, traits.kind, 0, batch, _self_expiring_note(traits))
    deleted = int(postgres_admin().purge(store, batch=batch))
    return Purged(url, traits.kind, deleted, batch)


@click.command(
    "migrate", short_help="Create or upgrade the PostgreSQL store's tables (safe to rerun)."
)
@task_option("Migrate the store of this task (its settings may name another store).")
@json_option
@click.pass_context
def migrate_command(ctx: click.Context, *, task_name: str | None, as_json: bool) -> None:
    """Create or upgrade the tables of the app's PostgreSQL store; say what was done.

    Runs the schema's statements in order (tables celery_idem_records and
    celery_idem_schema, the expiry index, the functions), each of which is safe to
    run again: a second run changes nothing. Django projects may run the same
    statements as a migration instead (celery_idem.contrib.django in INSTALLED_APPS,
    then `manage.py migrate celery_idem`); either may run first.

    Refused (exit 1) on a store without a schema: Redis keeps its records without
    one, so there is nothing to migrate there.

    --json prints an object: store, schema_version, done (what the migration did).
    """
    target = resolve(app_of(ctx), task_name)
    traits = target.traits
    target.require_shared_store()
    if not traits.schema:
        raise CliError(
            f"the store {target.url} is {traits.name}, which keeps records without a "
            "schema: there is nothing to migrate (migrate creates the tables of the "
            "PostgreSQL store: idem_store_url = 'postgresql://...')"
        )
    endpoint = target.settings.endpoint
    assert endpoint is not None  # a schema: PostgreSQL's endpoint
    with store_errors():
        admin = postgres_admin()
        done = admin.migrate(endpoint.url or "")
    version = admin.SCHEMA_VERSION
    if as_json:
        click.echo(render.to_json({"store": target.url, "schema_version": version, "done": done}))
    else:
        click.echo(f"{done[:1].upper()}{done[1:]}.")


@click.command("purge", short_help="Delete the PostgreSQL store's expired records, in batches.")
@task_option("Purge the store of this task (its settings may name another store).")
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    default=DEFAULT_BATCH,
    show_default=True,
    metavar="N",
    help="Rows deleted per transaction (short transactions hold few locks).",
)
@json_option
@click.pass_context
def purge_command(ctx: click.Context, *, task_name: str | None, batch: int, as_json: bool) -> None:
    """Delete the expired records of the app's PostgreSQL store; print how many.

    Deletes in batches of --batch rows, each in its own short transaction, until no
    expired row is left; a record is expired once its retention (idem_ttl after
    completion, or its lease and retention for one never completed) has passed, on
    the database server's clock. Nothing else deletes them: a claim reuses an
    expired row of its own key, and this command (or the celery_idem.purge task on a
    beat schedule, see celery_idem.contrib.purge) removes the rest.

    On Redis there is nothing to purge (records have TTLs, and Redis deletes them
    when they pass): the command says so and exits 0, so one schedule fits either
    store. A quarantined key never expires, on either store: it stays until forget.

    --json prints an object: store, kind, deleted, batch, note (why nothing was to be
    deleted, or null).
    """
    target = resolve(app_of(ctx), task_name)
    target.require_shared_store()
    with store_errors():
        purged = purge_expired(target.settings, target.store, batch=batch)
    if as_json:
        click.echo(render.to_json(asdict(purged)))
    elif purged.note is not None:
        click.echo(f"{purged.store}: {purged.note}.")
    else:
        click.echo(
            f"{purged.store}: deleted {purged.deleted} expired record(s) "
            f"(batches of {purged.batch})."
        )
