"""``idem_fingerprint`` in the pure modules: what the fingerprint and derived keys cover.

``celery_idem.fingerprint`` compiles the setting; ``KeyRule`` applies it on every
resolve; ``checks`` validates it. Two deliveries of one event must give one fingerprint
when they differ only in what is left out, and different ones otherwise; the result
must be the same in every process and after the broker's JSON.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from celery_idem.checks import Invalid, check_call_fingerprint, check_fingerprint, check_scope
from celery_idem.exceptions import (
    IdempotencyConfigError,
    InvalidIdempotencyKey,
    UnencodableArgument,
)
from celery_idem.fingerprint import MAX_PATH_LENGTH, MAX_PATHS, parse_paths
from celery_idem.keys import KeyRule, KeySource, storage_key, task_tag

TASK = "hooks.customer_created"
ROOT = Path(__file__).resolve().parents[2]


def on_event(payload: dict[str, Any], received_at: str = "", source: str = "stripe") -> None:
    """A webhook task: the event, when it was received, who sent it."""


def event(attempt: int = 1, email: str = "ada@example.com", **extra: Any) -> dict[str, Any]:
    return {
        "id": "evt_1",
        "delivery_attempt": attempt,
        "data": {"email": email, "meta": {"trace": "t-1"}},
        **extra,
    }


LEAVE_OUT = ("payload.delivery_attempt", "received_at")


def rule(fingerprint: Any = True, **kw: Any) -> KeyRule:
    return KeyRule(TASK, on_event, None, check_fingerprint(fingerprint), **kw)


def fp(key_rule: KeyRule, *args: Any, fingerprint: Any = None, **kwargs: Any) -> str:
    """The fingerprint of a call with an explicit key (what the claim checks)."""
    return key_rule.resolve(args, kwargs, "evt_1", fingerprint).fingerprint


def derived(key_rule: KeyRule, *args: Any, **kwargs: Any) -> str:
    resolved = key_rule.resolve(args, kwargs)
    assert resolved.source is KeySource.ARGS
    return resolved.key


# --------------------------------------------------------------------------- leave-out lists


def test_by_default_every_argument_is_covered() -> None:
    r = rule()
    assert fp(r, event(1), "10:00") != fp(r, event(2), "10:00")
    assert fp(r, event(1), "10:00") != fp(r, event(1), "10:01")


def test_a_left_out_argument_and_a_left_out_dict_field_do_not_count() -> None:
    r = rule(list(LEAVE_OUT))
    first = fp(r, event(1), "2024-05-01T10:00:00Z")
    assert fp(r, event(2), "2024-05-01T10:01:00Z") == first
    assert fp(r, payload=event(7), received_at="later") == first  # keywords alike


def test_what_is_not_left_out_still_counts() -> None:
    r = rule(list(LEAVE_OUT))
    first = fp(r, event(1), "10:00")
    assert fp(r, event(1, email="bob@example.com"), "10:00") != first
    assert fp(r, event(1), "10:00", "paypal") != first
    assert fp(r, event(1, extra_field=1), "10:00") != first


def test_a_path_reaches_into_nested_dicts_only_where_it_points() -> None:
    r = rule(["payload.data.meta.trace"])
    assert fp(r, event(1)) != fp(r, event(2))  # delivery_attempt still counts
    same_attempt = event(1)
    other_trace = copy.deepcopy(same_attempt)
    other_trace["data"]["meta"]["trace"] = "another"
    assert fp(r, same_attempt) == fp(r, other_trace)


@pytest.mark.parametrize(
    "payload",
    [
        {"id": "evt_1"},  # the field is optional: absent here
        {"id": "evt_1", "data": None},
        {"id": "evt_1", "data": ["email", "x"]},  # a list: paths go into dicts only
        {"id": "evt_1", "data": "text"},
    ],
)
def test_a_path_that_does_not_exist_in_a_call_leaves_nothing_out(payload: dict[str, Any]) -> None:
    left = rule(["payload.data.email", "payload.delivery_attempt"])
    everything = rule()
    assert fp(left, payload) == fp(everything, payload)


def test_a_left_out_argument_with_its_default_applied() -> None:
    r = rule(["received_at"])
    assert fp(r, event(1)) == fp(r, event(1), "now")
    assert fp(r, event(1)) != fp(r, event(2))  # the rest still counts


def test_leaving_out_never_modifies_the_callers_arguments() -> None:
    r = rule(["payload.data.meta", "payload.delivery_attempt", "received_at"])
    payload = event(3)
    before = copy.deepcopy(payload)
    fp(r, payload, "10:00")
    derived(r, payload, "10:00")
    assert payload == before


def test_dict_keys_are_matched_as_json_writes_them() -> None:
    """After the broker ``{1: x}`` is ``{"1": x}``: a path names both alike."""
    r = rule(["payload.1"])
    assert fp(r, {1: "a", 2: "b"}) == fp(r, {1: "other", 2: "b"})
    assert fp(r, {1: "a", 2: "b"}) == fp(r, json.loads(json.dumps({1: "z", 2: "b"})))
    assert fp(r, {1: "a", 2: "b"}) != fp(r, {1: "a", 2: "c"})


def test_a_shorter_path_covers_the_longer_ones_in_any_order() -> None:
    one = rule(["payload.data", "payload.data.email"])
    other = rule(["payload.data.email", "payload.data"])
    assert fp(one, event(1)) == fp(other, event(1, email="x"))
    assert fp(one, event(1)) == fp(rule(["payload.data"]), event(1))


def test_the_list_is_one_setting_however_it_is_written() -> None:
    assert check_fingerprint(["received_at", "payload.a", "received_at"]) == (
        "payload.a",
        "received_at",
    )
    assert check_fingerprint(("b", "a")) == check_fingerprint({"a", "b"}) == ("a", "b")
    assert check_fingerprint([]) is True  # nothing left out: every argument


def test_a_json_round_trip_of_the_arguments_gives_the_same_fingerprint_and_key() -> None:
    r = rule(list(LEAVE_OUT))
    args = (event(1, items=("a", "b")), "10:00")
    carried = json.loads(json.dumps(args))
    assert fp(r, *args) == fp(r, *carried)
    assert derived(r, *args) == derived(r, *carried)


json_leaf = st.none() | st.booleans() | st.integers() | st.text(max_size=5)
json_dicts = st.recursive(
    st.dictionaries(st.text(max_size=3), json_leaf, max_size=4),
    lambda inner: st.dictionaries(st.text(max_size=3), inner | json_leaf, max_size=4),
    max_leaves=15,
)


@given(json_dicts, st.lists(st.text(min_size=1, max_size=3), min_size=1, max_size=3))
def test_leaving_a_path_out_is_deleting_it_by_hand(
    payload: dict[str, Any], path: list[str]
) -> None:
    if any("." in segment for segment in path):
        return  # a segment cannot contain the separator
    pruned = copy.deepcopy(payload)
    node: Any = pruned
    for segment in path[:-1]:
        node = node.get(segment) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(path[-1], None)
    left = rule(["payload." + ".".join(path)])
    assert fp(left, payload) == fp(rule(), pruned)


# --------------------------------------------------------------------------- derived keys


def test_derived_keys_ignore_the_same_fields() -> None:
    r = rule(list(LEAVE_OUT))
    assert derived(r, event(1), "10:00") == derived(r, event(2), "10:05")
    assert derived(r, event(1), "10:00") != derived(r, event(1, email="x"), "10:00")


def test_a_derived_key_is_unchanged_for_calls_without_the_left_out_fields() -> None:
    """Adding the setting keeps the keys of calls that never carried those fields."""
    payload = {"id": "evt_1", "data": {"email": "ada@example.com"}}
    assert derived(rule(["payload.delivery_attempt"]), payload) == derived(rule(), payload)


def test_a_left_out_argument_needs_no_canonical_encoding_for_a_derived_key() -> None:
    r = rule(["received_at"])
    assert derived(r, event(1), object()) == derived(r, event(1), object())
    with pytest.raises(UnencodableArgument, match="received_at"):
        derived(rule(), event(1), object())


# --------------------------------------------------------------------------- callables


def only_the_event_id(payload: dict[str, Any], **_: Any) -> Any:
    return {"event": payload["id"], "email": payload["data"]["email"]}


def test_a_callable_decides_what_is_covered() -> None:
    r = rule(only_the_event_id)
    assert fp(r, event(1), "10:00", "stripe") == fp(r, event(9), "11:00", "paypal")
    assert fp(r, event(1)) != fp(r, event(1, email="bob@example.com"))
    assert derived(r, event(1), "10:00") == derived(r, event(2), "10:01")


def test_a_callable_gets_the_bound_arguments_by_name_with_defaults() -> None:
    seen: list[dict[str, Any]] = []

    def spy(**arguments: Any) -> str:
        seen.append(arguments)
        return "x"

    fp(rule(spy), event(1), source="paypal")
    assert seen == [{"payload": event(1), "received_at": "", "source": "paypal"}]


def test_a_callable_that_raises_fails_the_call_naming_it() -> None:
    def broken(payload: Any, **_: Any) -> Any:
        return payload["missing"]

    with pytest.raises(InvalidIdempotencyKey, match=r"idem_fingerprint callable .*broken") as info:
        fp(rule(broken), event(1))
    assert TASK in str(info.value)
    assert isinstance(info.value.__cause__, KeyError)


def test_a_callable_returning_something_without_an_encoding_is_refused() -> None:
    with pytest.raises(UnencodableArgument, match=r"returned by the idem_fingerprint callable"):
        fp(rule(lambda **_: {"when": object()}), event(1))


def test_a_callable_that_cannot_take_the_arguments_fails_when_the_rule_is_built() -> None:
    def narrow(payload: Any) -> Any:
        return payload

    with pytest.raises(IdempotencyConfigError, match="idem_fingerprint callable") as info:
        rule(narrow)
    assert "received_at" in str(info.value)
    assert info.value.task_name == TASK


# --------------------------------------------------------------------------- False


def test_false_turns_the_check_off_for_explicit_and_rule_keys() -> None:
    r = rule(False)
    assert fp(r, event(1)) == fp(r, event(2)) == ""
    templated = KeyRule(TASK, on_event, "{payload[id]}", False)
    assert templated.resolve((event(1),), {}).fingerprint == ""


def test_false_leaves_derived_keys_covering_every_argument() -> None:
    """A key derived from nothing would make every call one request."""
    assert derived(rule(False), event(1)) == derived(rule(), event(1))
    assert derived(rule(False), event(1)) != derived(rule(False), event(2))


def test_false_does_not_encode_the_arguments_of_an_explicit_key() -> None:
    assert fp(rule(False), object()) == ""


# --------------------------------------------------------------------------- roots and calls


def test_a_task_level_path_must_start_with_a_parameter() -> None:
    with pytest.raises(IdempotencyConfigError) as info:
        rule(["paylod.delivery_attempt"])
    text = str(info.value)
    assert "idem_fingerprint (task option)" in text
    assert TASK in text
    assert "'paylod'" in text
    assert "payload, received_at, source" in text


def test_an_app_level_list_may_name_arguments_a_task_does_not_have() -> None:
    r = rule(["received_at", "delivered_at"], fingerprint_from_app=True)
    assert fp(r, event(1), "a") == fp(r, event(1), "b")


def test_any_root_is_an_argument_of_a_task_with_kwargs() -> None:
    def loose(payload: Any, **extra: Any) -> None: ...

    r = KeyRule(TASK, loose, None, ("delivered_at",))
    assert r.resolve((1,), {"delivered_at": 1}, "k").fingerprint == (
        r.resolve((1,), {"delivered_at": 2}, "k").fingerprint
    )


def test_a_per_call_value_overrides_the_tasks_for_that_call() -> None:
    r = rule()
    left = ("payload.delivery_attempt",)
    assert fp(r, event(1), fingerprint=left) == fp(r, event(2), fingerprint=left)
    assert fp(r, event(1)) != fp(r, event(2))
    assert fp(r, event(1), fingerprint=False) == ""
    assert r.coverage_for(left) is r.coverage_for(("payload.delivery_attempt",))  # compiled once
    assert r.coverage_for(True) is r.coverage


def test_a_per_call_path_must_start_with_a_parameter() -> None:
    with pytest.raises(IdempotencyConfigError, match=r"idem_fingerprint \(call option\)"):
        fp(rule(), event(1), fingerprint=("nope",))


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("received_at", "a single str; give a list, e.g. ['received_at']"),
        (["a..b"], "not a name or a dotted path"),
        ([".a"], "not a name or a dotted path"),
        ([""], "not a name or a dotted path"),
        ([1], "is a int, not a str"),
        (1, "an int"),
        (None, "a NoneType"),
        (["x" * (MAX_PATH_LENGTH + 1)], f"over {MAX_PATH_LENGTH} characters"),
        ([f"p{i}" for i in range(MAX_PATHS + 1)], f"more than {MAX_PATHS}"),
    ],
)
def test_invalid_settings_say_why(value: Any, why: str) -> None:
    with pytest.raises(Invalid) as info:
        check_fingerprint(value)
    assert why in info.value.why


def test_true_false_and_callables_pass_as_they_are() -> None:
    assert check_fingerprint(True) is True
    assert check_fingerprint(False) is False
    assert check_fingerprint(only_the_event_id) is only_the_event_id


def test_a_call_cannot_carry_a_callable() -> None:
    with pytest.raises(Invalid, match="cannot travel in a message header"):
        check_call_fingerprint(only_the_event_id)
    assert check_call_fingerprint(["b", "a"]) == ("a", "b")
    assert check_call_fingerprint(False) is False


def test_parse_paths_keeps_plain_strs() -> None:
    class Name(str):
        pass

    (path,) = parse_paths([Name("payload.a")])
    assert type(path) is str


# --------------------------------------------------------------------------- stability


STABILITY_SCRIPT = """
import json, sys
from celery_idem.checks import check_fingerprint
from celery_idem.keys import KeyRule
from tests.unit.test_fingerprint import on_event, event
for setting in (True, ["received_at", "payload.delivery_attempt"], ["payload.data.meta"]):
    r = KeyRule("hooks.customer_created", on_event, None, check_fingerprint(setting))
    explicit = r.resolve((event(3), "10:00"), {}, "evt_1")
    print(explicit.fingerprint, r.resolve((event(3), "10:00"), {}).key)
"""


def test_fingerprints_and_keys_are_the_same_in_another_process() -> None:
    """They are stored in the record and compared by the claim script: any process,
    any hash seed, must compute the same."""
    expected = []
    for setting in (True, ["received_at", "payload.delivery_attempt"], ["payload.data.meta"]):
        r = rule(setting)
        explicit = r.resolve((event(3), "10:00"), {}, "evt_1")
        expected.append(f"{explicit.fingerprint} {r.resolve((event(3), '10:00'), {}).key}")
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        out = subprocess.run(
            [sys.executable, "-c", STABILITY_SCRIPT],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.split("\n")[:-1] == expected


def test_known_fingerprints() -> None:
    """Pinned: a change here changes what records hold, and every stored key mismatches.

    The default's is the value celery-idem computed before ``idem_fingerprint`` existed.
    """
    assert fp(rule(), {"id": "evt_1"}, "") == "qgsO7eq3NC_LjW6v"
    left = fp(rule(list(LEAVE_OUT)), {"id": "evt_1", "delivery_attempt": 2}, "10:00")
    assert left == fp(rule(list(LEAVE_OUT)), {"id": "evt_1"}, "")
    assert left == "p85_V0PjYd3u2QCj"


# --------------------------------------------------------------------------- idem_scope


def test_a_scope_is_the_storage_key_space() -> None:
    old = storage_key("idem", "tasks.send_email", "K")
    assert storage_key("idem", "tasks.send_email", "K") == old  # a renamed task's idem_scope
    assert storage_key("idem", "mail.tasks.send_email", "K") != old
    assert old.split(":")[1] == task_tag("tasks.send_email")


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("", "empty"),
        ("   ", "empty"),
        (" tasks.x", "leading or trailing whitespace"),
        ("x" * 201, "201 characters"),
        ("bad\udc80", "lone surrogate"),
        (3, "an int, not a str"),
    ],
)
def test_invalid_scopes_say_why(value: Any, why: str) -> None:
    with pytest.raises(Invalid) as info:
        check_scope(value)
    assert why in info.value.why


def test_a_valid_scope_is_a_plain_str() -> None:
    class Name(str):
        pass

    assert type(check_scope(Name("tasks.send_email"))) is str
    assert check_scope("x" * 200) == "x" * 200
