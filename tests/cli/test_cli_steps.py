"""``celery idem inspect`` (and ``forget``) show a key's durable steps.

Records with steps are written through the store as an attempt writes them (a claim,
then ``step`` per finished step), or by an eager run of ``cli.checkout``, which
completes; the CLI runs as a subprocess against the test's redis-server.
"""

from __future__ import annotations

import pickle
import re
import time
from datetime import datetime
from types import ModuleType

from celery_idem.store import StepRequest
from tests.cli.conftest import Cli

TOO_LARGE = "ResultTooLarge: the result serializes to 300 bytes, over idem_max_result_bytes (100)"


def _iso(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _step(
    cli: Cli, stored: str, position: int, name: str, value: bytes, *, codec: str = "j", n: int = 1
) -> None:
    """Store a finished step as the attempt of ``cli.running`` (token ``t``) would."""
    request = StepRequest(
        stored, token="t", position=position, name=name, occurrence=n, codec=codec, value=value
    )
    assert cli.store.step(request)


def _running_with_steps(cli: Cli, key: str) -> str:
    """A record in progress with a kept step, a second occurrence, and a step not kept."""
    stored = cli.running("cli.checkout", key, token="t")
    _step(cli, stored, 1, "reserve", b'{"order": 8}')
    _step(cli, stored, 2, "charge", b'"ch_8"')
    _step(cli, stored, 3, "charge", TOO_LARGE.encode(), codec="", n=2)
    return stored


def test_inspect_json_lists_the_finished_steps(cli: Cli) -> None:
    before = time.time()
    _running_with_steps(cli, "o-8")
    view = cli.json("inspect", "o-8", "--task", "cli.checkout")
    assert view["steps_done"] == 3
    steps = view["steps"]
    assert [(s["position"], s["name"], s["occurrence"], s["kept"]) for s in steps] == [
        (1, "reserve", 1, True),
        (2, "charge", 1, True),
        (3, "charge", 2, False),
    ]
    assert {k: v for k, v in steps[0].items() if k not in ("at", "ago")} == {
        "position": 1,
        "name": "reserve",
        "occurrence": 1,
        "kept": True,
        "content_type": "application/json",
        "bytes": 12,
        "decoded": True,
        "preview": "{'order': 8}",
    }
    for step in steps:  # the server's clock when stored; the same server and machine
        assert before - 1 < _iso(step["at"]) < time.time() + 1
        assert -1 < step["ago"] < 30
    not_kept = steps[2]
    assert (not_kept["bytes"], not_kept["content_type"], not_kept["reason"]) == (
        None,
        None,
        TOO_LARGE,
    )
    assert "preview" not in not_kept


def test_inspect_shows_one_line_per_step_and_marks_a_step_not_kept(cli: Cli) -> None:
    _running_with_steps(cli, "o-8")
    done = cli.run("inspect", "o-8", "--task", "cli.checkout")
    assert done.returncode == 0, done.stderr
    assert re.search(r"^steps:\s+3 finished \(a later attempt replays them", done.stdout, re.M)
    rows = done.stdout.split("\n\n", 1)[1].splitlines()
    assert rows[0].split() == ["#", "STEP", "OCCURRENCE", "SIZE", "STORED", "AT", "VALUE"]
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \(\d+(ms|\.\ds) ago\)"
    assert re.fullmatch(rf"1\s+reserve\s+1\s+12 B\s+{stamp}\s+\{{'order': 8\}}", rows[2])
    assert re.fullmatch(rf"2\s+charge\s+1\s+6 B\s+{stamp}\s+'ch_8'", rows[3])
    assert re.fullmatch(
        rf"3\s+charge\s+2\s+-\s+{stamp}\s+not kept: {re.escape(TOO_LARGE)}", rows[4]
    )
    assert len(rows) == 5


def test_a_completed_record_counts_the_steps_its_run_stored(cli: Cli, cli_app: ModuleType) -> None:
    assert cli_app.checkout.apply((7,), idempotency_key="o-7").get() == "paid ch_7"
    view = cli.json("inspect", "o-7", "--task", "cli.checkout")
    assert (view["state"], view["steps"], view["steps_done"]) == ("completed", [], 2)
    done = cli.run("inspect", "o-7", "--task", "cli.checkout")
    lines = dict(re.findall(r"^([a-z ]+):\s+(.*)$", done.stdout, re.M))
    assert lines["steps"] == "2 stored by the run (dropped at completion)"
    assert "STEP" not in done.stdout


def test_a_record_without_steps_shows_none(cli: Cli, cli_app: ModuleType) -> None:
    cli_app.add.apply((1, 2), idempotency_key="plain")
    view = cli.json("inspect", "plain", "--task", "cli.add")
    assert (view["steps"], view["steps_done"]) == ([], 0)
    done = cli.run("inspect", "plain", "--task", "cli.add")
    assert not re.search(r"^steps:", done.stdout, re.M), done.stdout


def test_a_step_value_is_never_unpickled_unless_the_app_accepts_pickle(cli: Cli) -> None:
    stored = cli.running("cli.checkout", "pickled", token="t")
    _step(cli, stored, 1, "blob", pickle.dumps({1, 2}), codec="p")
    step = cli.json("inspect", "pickled", "--task", "cli.checkout")["steps"][0]
    assert (step["decoded"], step["preview"]) == (False, None)
    assert step["note"].startswith("not decoded:")
    assert "(not decoded:" in cli.run("inspect", "pickled", "--task", "cli.checkout").stdout
    env = {"IDEM_CLI_ACCEPT": "json,pickle"}
    step = cli.json("inspect", "pickled", "--task", "cli.checkout", env=env)["steps"][0]
    assert (step["decoded"], step["preview"]) == (True, "{1, 2}")


def test_forget_shows_the_steps_it_would_drop(cli: Cli) -> None:
    _running_with_steps(cli, "o-9")
    done = cli.run("forget", "o-9", "--task", "cli.checkout", "--force", input="n\n")
    assert done.returncode == 1
    assert re.search(r"^3\s+charge\s+2\s+-\s+.*not kept: ResultTooLarge", done.stdout, re.M)
    view = cli.json("forget", "o-9", "--task", "cli.checkout", "--force", "--yes")
    assert view["forgotten"] is True
    assert view["record"]["steps_done"] == 3
