"""``celery idem key TASK``: the key and storage key a call would use are the worker's.

Each storage key the command prints is checked against the record a run really wrote:
eager runs in this process (the same ``Execution`` a worker builds), and a real worker
subprocess fed by ``send_task`` from a plain Celery app, as another service would.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest
from celery import Celery

from celery_idem.keys import storage_key
from devtools.processes import free_port, wait_for
from tests.cli.conftest import Cli
from tests.integration.conftest import Worker, with_db


@dataclass(frozen=True)
class Call:
    """One call of a task of ``tests.cli.app``, and the ``key`` options naming it."""

    task: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] | None = None
    key: str | None = None

    def options(self) -> list[str]:
        out = [self.task, "--args", json.dumps(list(self.args))]
        if self.kwargs is not None:
            out += ["--kwargs", json.dumps(self.kwargs)]
        if self.key is not None:
            out += ["--key", self.key]
        return out


CALLS = {
    "derived": Call("cli.add", (1, 2)),
    "template": Call("cli.send", (7, "welcome")),
    "callable": Call("cli.welcome", (3,), {"locale": "fr"}),
    "explicit": Call("cli.add", (5, 6), key="evt_1"),
    "own prefix": Call("cli.archive", ("a",)),
    "renamed": Call("cli.mail.send_email", (7,)),  # idem_scope: its former name
}
SOURCES = {
    "derived": "args",
    "template": "rule",
    "callable": "rule",
    "explicit": "call",
    "own prefix": "args",
    "renamed": "args",
}


def _store_keys(cli: Cli) -> set[str]:
    return {k.decode() for k in cli.store.client.scan_iter(match="*", count=1000)}


def test_key_names_the_record_each_kind_of_eager_run_writes(cli: Cli, cli_app: ModuleType) -> None:
    runs = {}
    for name, call in CALLS.items():
        task = cli_app.app.tasks[call.task]
        runs[name] = task.apply(call.args, call.kwargs, idempotency_key=call.key)
    printed = {name: cli.json("key", *call.options()) for name, call in CALLS.items()}

    # Exactly the records the runs wrote: no more, no fewer.
    assert {view["storage_key"] for view in printed.values()} == _store_keys(cli)
    for name, view in printed.items():
        record = cli.store.read(view["storage_key"])
        assert record is not None, name
        assert record.task_id == runs[name].id, name
        assert view["source"] == SOURCES[name], name
        assert view["task"] == CALLS[name].task
        # The key is the one inspect takes with --task: the same record again.
        found = cli.json("inspect", view["key"], "--task", CALLS[name].task)
        assert (found["storage_key"], found["task_id"]) == (view["storage_key"], runs[name].id)
        # A record keeps the fingerprint that `key` prints (none for a derived key).
        assert (record.fingerprint or None) == view["fingerprint"], name

    assert printed["template"]["key"] == "7:welcome"
    assert printed["template"]["rule"] == "{user}:{template}"
    assert printed["callable"]["key"] == "welcome:3"
    assert printed["callable"]["rule"] == "tests.cli.app.welcome_key"
    assert printed["explicit"]["key"] == "evt_1"
    assert printed["own prefix"]["prefix"] == cli_app.ARCHIVE_PREFIX
    assert printed["own prefix"]["storage_key"].startswith(cli_app.ARCHIVE_PREFIX + ":")
    assert printed["derived"]["prefix"] == "idem"
    assert printed["derived"]["store"] == cli.url
    assert printed["derived"]["scope"] == "cli.add"
    renamed = printed["renamed"]
    assert renamed["scope"] == "cli.send_email"
    assert renamed["storage_key"] == storage_key("idem", "cli.send_email", renamed["key"])


def test_key_binds_arguments_as_the_worker_does(cli: Cli) -> None:
    positional = cli.json("key", "cli.add", "--args", "[1, 2]")
    assert cli.json("key", "cli.add", "--args", "[1]", "--kwargs", '{"y": 2}') == positional
    assert cli.json("key", "cli.add", "--kwargs", '{"y": 2, "x": 1}') == positional
    # A default applies: the same welcome with the locale written out or not.
    default = cli.json("key", "cli.welcome", "--args", "[3]")
    assert cli.json("key", "cli.welcome", "--args", '[3, "en"]') == default
    assert default["key"] == "welcome:3"


def test_key_alone_prints_the_storage_key_of_an_explicit_key(cli: Cli, cli_app: ModuleType) -> None:
    run = cli_app.archive.apply(("a",), idempotency_key="evt 9/ü")
    view = cli.json("key", "cli.archive", "--key", "evt 9/ü")
    assert (view["key"], view["source"], view["fingerprint"]) == ("evt 9/ü", "call", None)
    record = cli.store.read(view["storage_key"])
    assert record is not None
    assert record.task_id == run.id
    # With arguments too, the same storage key, and their fingerprint is the record's.
    checked = cli.json("key", "cli.archive", "--key", "evt 9/ü", "--args", '["a"]')
    assert checked["storage_key"] == view["storage_key"]
    assert checked["fingerprint"] == record.fingerprint
    other = cli.json("key", "cli.archive", "--key", "evt 9/ü", "--args", '["b"]')
    assert other["fingerprint"] != record.fingerprint  # a worker would refuse this call


@pytest.mark.parametrize("via", ["module", "celery"])
def test_key_prints_fields_for_people(cli: Cli, via: str) -> None:
    done = cli.run("key", "cli.send", "--args", '[7, "welcome"]', via=via)
    assert done.returncode == 0, done.stderr
    lines = dict(re.findall(r"^([a-z ]+):\s+(.*)$", done.stdout, re.M))
    view = cli.json("key", "cli.send", "--args", '[7, "welcome"]')
    assert lines == {
        "task": "cli.send",
        "key": "7:welcome",
        "storage key": view["storage_key"],
        "source": "the task's idempotency_key template '{user}:{template}'",
        "fingerprint": view["fingerprint"],
        "store": cli.url,
    }
    derived = cli.run("key", "cli.add", "--args", "[1, 2]", via=via)
    assert re.search(r"^source:\s+derived from the arguments$", derived.stdout, re.M)
    assert re.search(r"^fingerprint:\s+-$", derived.stdout, re.M)
    help_text = cli.run("key", "--help", via=via)
    assert help_text.returncode == 0
    assert "exactly as a worker computes it" in " ".join(help_text.stdout.split())


def test_key_shows_a_scope_other_than_the_task_name(cli: Cli) -> None:
    done = cli.run("key", "cli.mail.send_email", "--key", "welcome-7")
    assert done.returncode == 0, done.stderr
    assert re.search(
        r"^scope:\s+cli.send_email \(idem_scope: the storage key hashes it\)$", done.stdout, re.M
    )
    plain = cli.run("key", "cli.add", "--key", "k")
    assert not re.search(r"^scope:", plain.stdout, re.M)


def test_key_of_a_task_that_requires_a_key_needs_key(cli: Cli) -> None:
    done = cli.run("key", "cli.refund", "--args", "[1]")
    assert done.returncode == 2
    assert "requires an explicit idempotency key (idem_require_key)" in done.stderr
    assert "pass it with --key KEY" in done.stderr
    view = cli.json("key", "cli.refund", "--args", "[1]", "--key", "refund-1")
    assert (view["key"], view["source"]) == ("refund-1", "call")


def test_key_needs_no_redis(cli: Cli) -> None:
    down = {"IDEM_CLI_STORE": f"redis://127.0.0.1:{free_port()}/0"}
    view = cli.json("key", "cli.add", "--args", "[1, 2]", env=down)
    assert view["storage_key"] == cli.json("key", "cli.add", "--args", "[1, 2]")["storage_key"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["cli.ad", "--args", "[1, 2]"],
            "Error: task 'cli.ad' is not registered in app 'tests.cli.app' (did you mean 'cli.add'",
        ),
        (["Send"], "(did you mean 'cli.send'"),
        (["cli.plain"], "task 'cli.plain' is not an IdempotentTask"),
        (["cli.add", "--args", "[1, 2"], "Invalid value for '--args': not valid JSON ("),
        (["cli.add", "--kwargs", "{x: 1}"], "Invalid value for '--kwargs': not valid JSON ("),
        (["cli.add", "--args", '{"x": 1}'], "'--args': must be a JSON array, such as"),
        (["cli.add", "--kwargs", "[1]"], "'--kwargs': must be a JSON object, such as"),
        (
            ["cli.add", "--args", "[1]"],
            "the arguments do not fit the task's signature, cli.add(x, y): missing a "
            "required argument: 'y'",
        ),
        (["cli.add", "--args", "[1, 2, 3]"], "cli.add(x, y): too many positional arguments"),
        (
            ["cli.add", "--args", "[1, 2]", "--kwargs", '{"z": 0}'],
            "cli.add(x, y): got an unexpected keyword argument 'z'",
        ),
        (["cli.welcome"], "cli.welcome(user, locale='en'): missing a required argument: 'user'"),
        (["cli.add", "--key", ""], "Invalid value for '--key': idempotency key for task"),
        (["cli.add", "--key", "k" * 1025], "over the limit of 1024"),
    ],
)
def test_key_usage_errors_say_what_is_wrong(cli: Cli, options: list[str], message: str) -> None:
    done = cli.run("key", *options)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


def test_key_of_a_rule_result_over_the_length_limit_is_a_usage_error(cli: Cli) -> None:
    # A worker refuses this call the same way (InvalidIdempotencyKey).
    done = cli.run("key", "cli.send", "--args", json.dumps([1, "t" * 1100]))
    assert done.returncode == 2
    assert "from the task's idempotency_key rule" in done.stderr
    assert "over the limit of 1024" in done.stderr


def test_key_matches_the_record_a_real_worker_writes(cli: Cli) -> None:
    broker = with_db(cli.url, 1)
    worker = Worker(
        {"IDEM_CLI_STORE": cli.url, "IDEM_CLI_BROKER": broker},
        pool="solo",
        concurrency=1,
        app="tests.cli.app",
    )
    sender = Celery("another-service", broker=broker, set_as_current=False)
    printed = {name: cli.json("key", *call.options()) for name, call in CALLS.items()}
    worker.start()
    try:
        sent = {}
        for name, call in CALLS.items():
            sent[name] = task_id = f"{name.replace(' ', '-')}-{uuid.uuid4().hex[:8]}"
            headers = {"idempotency_key": call.key} if call.key is not None else {}
            sender.send_task(
                call.task, call.args, call.kwargs, task_id=task_id, queue=worker.queue,
                headers=headers,
            )  # fmt: skip

        def all_completed() -> bool:
            for name, view in printed.items():
                record = cli.store.read(view["storage_key"])
                if record is None or record.state != "C" or record.task_id != sent[name]:
                    return False
            return True

        wait_for(all_completed, timeout=60, message=f"worker runs; log:\n{worker.log()[-3000:]}")
    finally:
        worker.stop()
        sender.close()
    # The worker wrote those records and no other.
    assert _store_keys(cli) == {view["storage_key"] for view in printed.values()}
