"""``celery idem doctor``: is the store fit to keep celery-idem's guarantee?

This module holds the Redis checks; the PostgreSQL store's are in :mod:`.postgres`
(the command picks them by the store's :mod:`.traits`). Each check ends ``ok``,
``warn`` or ``fail``, with a fix for anything but ``ok``:

* **fail** - the guarantee does not hold in normal operation, or tasks will error:
  the store is unreachable, ``memory://``, older than Redis 6.0, refuses the scripts,
  evicts keys (a ``maxmemory-policy`` other than ``noeviction`` with ``maxmemory``
  set), is a read-only replica, or is a Sentinel or Cluster node reached through a
  plain ``redis://`` URL (use ``sentinel://`` or ``redis+cluster://``).
* **warn** - it holds until a rare event, or cannot be verified: no AOF (a restart
  loses records), an eviction policy not in force yet (``maxmemory`` 0), a clock
  offset over a second (only the times shown by this tool are affected), settings
  the server refused to tell (managed services often refuse ``CONFIG``).

The command exits 1 when a check fails (with ``--strict``, also on a warning), else 0.
:func:`judge` is pure: it turns :class:`~celery_idem.store.ServerFacts` into findings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict

import click

from celery_idem.cli import postgres, render
from celery_idem.cli.context import (
    EXIT_FAILURE,
    Target,
    app_of,
    json_option,
    resolve,
    task_option,
)
from celery_idem.cli.findings import CLOCK_TOLERANCE, Finding, clock_finding, report
from celery_idem.exceptions import IdempotencyError
from celery_idem.store.base import ServerFacts

__all__ = ["CLOCK_TOLERANCE", "MIN_VERSION", "Finding", "doctor_command", "judge", "report"]

MIN_VERSION = (6, 0, 0)
"""The scripts use ``SET ... KEEPTTL`` (Redis 6.0) and write after ``TIME`` (effects
replication, the default since 5.0); nothing newer (no ``SET ... GET``, no functions)."""
_CONFIG_TIP = "in redis.conf too, or CONFIG REWRITE, so a restart keeps it"


def _version(text: str | None) -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in (text or "").split(".")[:3])
    except ValueError:
        return None


def _version_finding(info: Mapping[str, str]) -> Finding:
    text = info.get("redis_version")
    version = _version(text)
    need = ".".join(map(str, MIN_VERSION))
    if not version:
        detail = f"the server did not tell its version (INFO: {text!r})"
        return Finding("version", "warn", detail, f"make sure it runs Redis {need} or later")
    if version < MIN_VERSION:
        detail = f"Redis {text}: the scripts need {need} or later (SET ... KEEPTTL)"
        return Finding("version", "fail", detail, f"upgrade to Redis {need} or later")
    return Finding("version", "ok", f"Redis {text} (the scripts need {need}+: SET ... KEEPTTL)")


def _eviction_finding(facts: ServerFacts) -> Finding:
    policy = facts.config.get("maxmemory-policy") or facts.info.get("maxmemory_policy")
    fix = (
        f"CONFIG SET maxmemory-policy noeviction ({_CONFIG_TIP}); give Redis memory for "
        "idem_ttl x records per second x ~250 bytes"
    )
    if not policy:
        detail = "maxmemory-policy is not readable (CONFIG and INFO refused)"
        return Finding("eviction", "warn", detail, "check with your provider: noeviction")
    if policy == "noeviction":
        return Finding("eviction", "ok", "maxmemory-policy noeviction: records are never evicted")
    maxmemory = facts.info.get("maxmemory")
    if maxmemory == "0":
        detail = (
            f"maxmemory-policy is {policy}; nothing is evicted while maxmemory is 0 (no "
            "limit), but once a limit is set, records would be evicted and their "
            "duplicates run the body again"
        )
        return Finding("eviction", "warn", detail, fix)
    detail = (
        f"maxmemory-policy is {policy} (maxmemory {maxmemory or 'unknown'}): under memory "
        "pressure Redis evicts records, and a duplicate of an evicted key runs the body again"
    )
    return Finding("eviction", "fail", detail, fix)


def _persistence_finding(facts: ServerFacts) -> Finding:
    aof_enabled = facts.info.get("aof_enabled", "")
    aof = facts.config.get("appendonly") or {"1": "yes", "0": "no"}.get(aof_enabled)
    fsync = facts.config.get("appendfsync")
    save = facts.config.get("save")
    fix = f"CONFIG SET appendonly yes ({_CONFIG_TIP}); appendfsync everysec or always"
    if aof == "yes":
        if fsync == "no":
            detail = "AOF on with appendfsync no: a crash of the host can lose ~30 s of records"
            return Finding("persistence", "warn", detail, fix)
        detail = f"AOF on (appendfsync {fsync or 'unknown'}): records survive a restart"
        return Finding("persistence", "ok", detail)
    if aof is None:
        detail = "appendonly is not readable (CONFIG and INFO refused)"
        return Finding("persistence", "warn", detail, "check with your provider that AOF is on")
    if save:
        detail = (
            f"RDB snapshots only (save {save!r}), no AOF: a restart loses the records written "
            "since the last snapshot, and their duplicates run the body again"
        )
        return Finding("persistence", "warn", detail, fix)
    detail = (
        "no persistence (no AOF, no RDB snapshots): a restart loses every record, and the "
        "duplicates of completed keys run the body again"
    )
    return Finding("persistence", "warn", detail, fix)


def _topology_finding(facts: ServerFacts) -> Finding:
    info = facts.info
    mode = info.get("redis_mode")
    role = info.get("role")
    if mode is None and role is None:
        fix = "make sure idem_redis_url names a primary (or sentinel:// / redis+cluster://)"
        return Finding("topology", "warn", "INFO refused: the topology is unknown", fix)
    if mode == "sentinel":
        detail = "idem_redis_url names a Sentinel as if it were a data node"
        fix = "write it as sentinel://host:26379;host2:26379/SERVICE/0"
        return Finding("topology", "fail", detail, fix)
    replicas = info.get("connected_slaves", "0")
    if facts.topology == "cluster":
        detail = f"Redis Cluster (this primary has {replicas} replica(s)); records spread by slot"
        return Finding("topology", "ok", detail + _replication_note(replicas))
    if mode == "cluster" or info.get("cluster_enabled") == "1":
        detail = (
            "Redis Cluster node reached as a standalone server: records hashed to other "
            "nodes' slots fail with MOVED"
        )
        fix = "set idem_redis_cluster = True, or write the URL as redis+cluster://"
        return Finding("topology", "fail", detail, fix)
    if role not in (None, "master"):
        detail = f"standalone, role {role}: a replica refuses writes, so every claim fails"
        return Finding("topology", "fail", detail, "point idem_redis_url at the primary")
    kind = "Sentinel-managed primary" if facts.topology == "sentinel" else "standalone"
    detail = f"{kind}, role {role or 'unknown'}, {replicas} replica(s)"
    return Finding("topology", "ok", detail + _replication_note(replicas))


def _replication_note(replicas: str) -> str:
    if replicas in ("0", ""):
        return ""
    return (
        " (replication is asynchronous: a failover can lose the last writes; "
        "idem_min_replicas makes claims and results wait for replicas)"
    )


def _clock_finding(facts: ServerFacts) -> Finding:
    return clock_finding(
        "Redis",
        server_time=facts.server_time,
        local_time=facts.local_time,
        round_trip=facts.round_trip,
        clock="TIME",
    )


def judge(facts: ServerFacts, *, scripts_error: str | None) -> list[Finding]:
    """Findings for a reachable store's facts (``scripts_error``: the probe's failure)."""
    if facts.kind == "memory":
        detail = (
            "idem_redis_url is memory://: records live inside each process, so workers do "
            "not share them and nothing is deduplicated across processes"
        )
        fix = "set idem_redis_url to a Redis URL (memory:// is for tests)"
        return [Finding("store", "fail", detail, fix)]
    round_trip = render.duration(facts.round_trip)
    findings = [Finding("reachable", "ok", f"{facts.url} answered TIME in {round_trip}")]
    findings.append(_version_finding(facts.info))
    if scripts_error is None:
        findings.append(Finding("scripts", "ok", "the Lua scripts load and run (EVALSHA)"))
    else:
        detail = f"running a script failed: {scripts_error}"
        fix = "allow EVAL, EVALSHA and SCRIPT for this user (ACL +@scripting)"
        findings.append(Finding("scripts", "fail", detail, fix))
    if facts.info_error:
        detail = f"INFO refused: {facts.info_error}"
        fix = "allow INFO for this user, or check these settings by hand"
        findings.append(Finding("info", "warn", detail, fix))
    findings.append(_eviction_finding(facts))
    findings.append(_persistence_finding(facts))
    findings.append(_topology_finding(facts))
    findings.append(_clock_finding(facts))
    return findings


def _examine_redis(target: Target) -> list[Finding]:
    """``doctor``'s findings for a Redis store (or ``memory://``, which fails alone)."""
    try:
        facts = target.store.server_facts()
    except IdempotencyError as exc:
        fix = (
            "check idem_redis_url (host, port, db, password, rediss:// for TLS) and that "
            "Redis runs and accepts connections from this machine"
        )
        return [Finding("reachable", "fail", str(exc), fix)]
    scripts_error = None
    if facts.kind != "memory":
        try:
            target.store.read(f"{target.prefix}:doctor-probe")
        except IdempotencyError as exc:
            scripts_error = str(exc)
    return judge(facts, scripts_error=scripts_error)


@click.command(
    "doctor", short_help="Check the store: schema or version, durability, topology, clock."
)
@task_option("Check the store of this task (its settings may name another store).")
@click.option("--strict", is_flag=True, help="Exit 1 on warnings too, not only on failures.")
@json_option
@click.pass_context
def doctor_command(
    ctx: click.Context, *, task_name: str | None, strict: bool, as_json: bool
) -> None:
    """Check that the store can keep celery-idem's guarantee; each finding with a fix.

    \b
    Checks on Redis, in order:
      reachable    the server answers (TIME), with the round trip
      version      Redis 6.0 or later (the scripts use SET ... KEEPTTL)
      scripts      the Lua scripts load and run (a read-only EVALSHA)
      eviction     maxmemory-policy noeviction: an evicted record lets a
                   duplicate run the body again
      persistence  AOF on: without it a restart loses the records
      topology     a primary: standalone, Sentinel-managed or Cluster (from
                   INFO: redis_mode, role, replicas); a replica, or a Sentinel
                   or Cluster node behind a plain redis:// URL, fails
      clock        offset of the Redis clock from this machine's (TIME)

    \b
    Checks on PostgreSQL (idem_store_url = postgresql://...), in order:
      reachable        the server answers, with the round trip and its version
      schema           celery_idem_records and celery_idem_schema exist at
                       this release's schema version (else: idem migrate)
      functions        the schema's functions (one per transition) exist
      indexes          the primary key on key, the expiry index (purge), valid
      privileges       the URL's role may read and write the tables and run
                       the functions
      writable         a primary (not a standby), not read-only by default
      idle_tx_timeout  idle_in_transaction_session_timeout is set: with 0, a
                       task stuck inside idem_atomic() holds its key's row
                       lock forever (warns; a fix recommends a value)
      durability       fsync and synchronous_commit on (off: a crash can lose
                       the last completions)
      clock            offset of the server's clock (clock_timestamp()) from
                       this machine's

    \b
    FAIL: the guarantee does not hold in normal operation, or tasks will error.
    WARN: it holds until a rare event (a restart), or could not be verified.
    Exits 1 when a check fails (with --strict, also when one warns), else 0.

    --json prints an object: store, prefix, ok, failures, warnings, findings (each:
    check, status ok/warn/fail, detail, fix).
    """  # noqa: D301 - \b is click's no-rewrap marker
    target = resolve(app_of(ctx), task_name)
    examine = postgres.examine if target.traits.kind == "postgres" else _examine_redis
    findings = examine(target)
    failures = sum(f.status == "fail" for f in findings)
    warnings = sum(f.status == "warn" for f in findings)
    failed = failures > 0 or (strict and warnings > 0)
    if as_json:
        click.echo(
            render.to_json(
                {
                    "store": target.url,
                    "prefix": target.prefix,
                    "ok": not failed,
                    "failures": failures,
                    "warnings": warnings,
                    "findings": [asdict(f) for f in findings],
                }
            )
        )
    else:
        click.echo(f"celery-idem doctor: {target.url or '(no URL)'}, prefix {target.prefix!r}")
        click.echo(report(findings))
        click.echo(f"{failures} failure(s), {warnings} warning(s).")
    if failed:
        ctx.exit(EXIT_FAILURE)
