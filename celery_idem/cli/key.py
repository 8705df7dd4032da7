"""``celery idem key TASK``: the key and storage key a call of TASK would use.

So an operator can ``inspect`` or ``forget`` a call's record without reading worker
logs. Nothing here computes a key: the command hands the call to the worker's own
:class:`~celery_idem.task.execution.Execution` (built, never performed: no Redis round
trip) and prints what it found, so the answer follows whatever the worker does (the
task's rule, its settings, how a storage key is named) by construction.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import click
from celery.app.task import Context

from celery_idem.cli import render
from celery_idem.cli.context import CliError, app_of, idempotent_task, json_option
from celery_idem.exceptions import IdempotencyError, InvalidIdempotencyKey
from celery_idem.keys import KeyRule, KeySource, validate_key
from celery_idem.task import IdempotentTask
from celery_idem.task.execution import Execution
from celery_idem.task.headers import HEADER, RETRY_KEY
from celery_idem.task.spec import Spec

__all__ = ["key_command"]


def _json_value(option: str, text: str | None, kind: type, example: str) -> Any:
    """``--args`` / ``--kwargs``: JSON of the expected kind, else a usage error (exit 2)."""
    if text is None:
        return kind()
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"not valid JSON ({exc}): {text!r}", param_hint=option) from exc
    if not isinstance(value, kind):
        raise click.BadParameter(
            f"must be a JSON {'array' if kind is list else 'object'}, such as {example}; "
            f"got {text!r}",
            param_hint=option,
        )
    return value


def _rule_text(rule: str | Callable[..., Any] | None) -> str | None:
    """The task's ``idempotency_key`` option as people know it, or None (derived)."""
    if rule is None or isinstance(rule, str):
        return rule
    module = getattr(rule, "__module__", None)
    name = getattr(rule, "__qualname__", None) or repr(rule)
    return f"{module}.{name}" if module else name


def _parameters(rule: KeyRule) -> str:
    """The run function's parameters as written, without annotations: ``(x, y=2)``."""
    signature = rule.signature
    plain = [p.replace(annotation=p.empty) for p in signature.parameters.values()]
    return str(signature.replace(parameters=plain, return_annotation=signature.empty))


def _execution(
    task: IdempotentTask,
    spec: Spec,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    explicit: str | None,
    *,
    with_arguments: bool,
) -> Execution:
    """The worker's execution of this call, built as a worker builds it, never performed.

    An explicit key travels as the ``idempotency_key`` header, as ``apply_async``
    sends it. Given alone (no ``--args``/``--kwargs``), it goes the way a worker
    locates a key it already has, without binding arguments: a retry's key header.
    """
    if explicit is not None and not with_arguments:
        headers = {RETRY_KEY: explicit}
    elif explicit is not None:
        headers = {HEADER: explicit}
    else:
        headers = {}
    request = Context(id=f"celery-idem-key-{uuid.uuid4()}", headers=headers, group_index=None)
    return Execution(task, spec, request, args, kwargs)


@click.command("key", short_help="Print the key and storage key a call of TASK would use.")
@click.argument("task_name", metavar="TASK")
@click.option(
    "--args",
    "args_json",
    metavar="JSON",
    help="The call's positional arguments: a JSON array, such as '[42, 100]'.",
)
@click.option(
    "--kwargs",
    "kwargs_json",
    metavar="JSON",
    help="The call's keyword arguments: a JSON object, such as '{\"amount\": 100}'.",
)
@click.option(
    "--key",
    "explicit",
    metavar="KEY",
    help="An explicit idempotency key (apply_async(idempotency_key=KEY), or the "
    "message header): print its storage key; with --args/--kwargs, also check them "
    "against the task and show their fingerprint.",
)
@json_option
@click.pass_context
def key_command(
    ctx: click.Context,
    *,
    task_name: str,
    args_json: str | None,
    kwargs_json: str | None,
    explicit: str | None,
    as_json: bool,
) -> None:
    """Print the idempotency key and storage key a call of TASK would use.

    The key comes from --key, else from the task's idempotency_key rule (template or
    callable), else from the arguments, exactly as a worker computes it (the worker's
    own code runs; nothing is sent and Redis is not asked). The storage key is the
    record's name in Redis, under the task's idem_key_prefix: pass it to
    `inspect --storage-key` or `forget --storage-key`, or pass the key to `inspect
    KEY --task TASK`.

    The arguments are JSON, as a JSON serializer delivers them to the worker (tuples
    arrive as lists). A call without --args/--kwargs has no arguments. The key of a
    group member (KEY#<position>.<fingerprint>) is not computed here.

    TASK must be an idempotent task of the app: an unknown name is a usage error
    that names the closest registered tasks; so are arguments that do not fit the
    task's signature, --args or --kwargs that are not JSON, and a missing --key for a
    task with idem_require_key (exit status 2).

    --json prints an object: task, key, storage_key, source (call, rule or args),
    rule (the template, the callable's name, or null), fingerprint (what the record
    keeps to refuse the key with other arguments; null when none is checked: the key
    is derived from them, or idem_fingerprint is False), scope (the task's
    idem_scope, else its name: the storage key hashes it), prefix, store.
    """
    app = app_of(ctx)
    task = idempotent_task(app, task_name)
    args = _json_value("'--args'", args_json, list, "'[42, 100]'")
    kwargs = _json_value("'--kwargs'", kwargs_json, dict, "'{\"amount\": 100}'")
    with_arguments = args_json is not None or kwargs_json is not None
    try:
        spec = task.idem_spec()
    except IdempotencyError as exc:  # invalid settings, a broken rule, no store URL
        raise CliError(str(exc)) from exc
    if explicit is None and spec.settings.require_key:
        raise click.UsageError(
            f"task {task_name!r} requires an explicit idempotency key (idem_require_key): "
            "every call names its own; pass it with --key KEY"
        )
    if explicit is not None:
        try:
            validate_key(explicit, task_name=task_name, source=KeySource.CALL)
        except InvalidIdempotencyKey as exc:
            raise click.BadParameter(str(exc), param_hint="'--key'") from exc
    rule = spec.rule
    try:
        execution = _execution(task, spec, args, kwargs, explicit, with_arguments=with_arguments)
    except InvalidIdempotencyKey as exc:  # before TypeError: UnencodableArgument is one
        raise click.UsageError(str(exc)) from exc
    except TypeError as exc:
        raise click.UsageError(
            f"the arguments do not fit the task's signature, {task_name}{_parameters(rule)}: {exc}"
        ) from exc
    except IdempotencyError as exc:
        raise CliError(str(exc)) from exc
    if explicit is not None:
        source = KeySource.CALL
    else:
        source = KeySource.RULE if rule.rule is not None else KeySource.ARGS
    settings = execution.settings
    endpoint = settings.endpoint
    view = {
        "task": task_name,
        "key": execution.key,
        "storage_key": execution.storage,
        "source": source.value,
        "rule": _rule_text(rule.rule),
        "fingerprint": execution.fingerprint or None,
        "scope": spec.scope,
        "prefix": settings.key_prefix,
        "store": endpoint.display if endpoint is not None else None,
    }
    if as_json:
        click.echo(render.to_json(view))
        return
    if source is KeySource.CALL:
        how = "explicit (--key)"
    elif source is KeySource.ARGS:
        how = "derived from the arguments"
    elif isinstance(rule.rule, str):
        how = f"the task's idempotency_key template {rule.rule!r}"
    else:
        how = f"the task's idempotency_key callable {view['rule']}"
    pairs = [
        ("task", task_name),
        ("key", execution.key),
        ("storage key", execution.storage),
        ("source", how),
        ("fingerprint", view["fingerprint"] or "-"),
        ("store", view["store"] or "-"),
    ]
    if view["scope"] != task_name:
        pairs.insert(3, ("scope", f"{view['scope']} (idem_scope: the storage key hashes it)"))
    click.echo(render.fields(pairs))
