"""``idem_fingerprint`` and ``idem_scope`` on tasks, eagerly, on the memory store and Redis.

What the pure tests check of the computation, here through ``IdempotentTask``: the task
option, the app setting and a call's value reach the claim; a refused value fails before
anything runs, naming the setting and the task; a renamed task keeps its records.
"""

from __future__ import annotations

from typing import Any

import pytest
from celery import group

from celery_idem import IdempotencyConfigError, IdempotencyKeyMismatch
from celery_idem.task import invalidate_settings
from tests.unit.conftest import Env

LEAVE_OUT = ["event.delivery_attempt", "received_at"]


def delivery(attempt: int, email: str = "ada@example.com") -> dict[str, Any]:
    return {"id": "evt_1", "delivery_attempt": attempt, "data": {"email": email}}


# --------------------------------------------------------------------------- idem_fingerprint


def test_two_deliveries_of_one_event_are_one_request(env: Env) -> None:
    runs: list[int] = []

    @env.task(idem_fingerprint=LEAVE_OUT)
    def on_event(event: dict[str, Any], received_at: str) -> str:
        runs.append(event["delivery_attempt"])
        return f"sent-{len(runs)}"

    first = on_event.apply((delivery(1), "10:00"), idempotency_key="evt_1").get()
    second = on_event.apply((delivery(2), "10:05"), idempotency_key="evt_1").get()
    assert (first, second, runs) == ("sent-1", "sent-1", [1])
    # What is not left out is still the request: another customer's data is refused.
    other = on_event.apply((delivery(3, "bob@example.com"), "10:06"), idempotency_key="evt_1")
    with pytest.raises(IdempotencyKeyMismatch):
        other.get()
    assert runs == [1]


def test_without_the_setting_the_second_delivery_is_a_mismatch(env: Env) -> None:
    runs: list[int] = []

    @env.task()
    def on_event(event: dict[str, Any], received_at: str) -> str:
        runs.append(event["delivery_attempt"])
        return "sent"

    assert on_event.apply((delivery(1), "10:00"), idempotency_key="evt_1").get() == "sent"
    second = on_event.apply((delivery(2), "10:05"), idempotency_key="evt_1")
    with pytest.raises(IdempotencyKeyMismatch):
        second.get()
    assert runs == [1]


def test_a_call_may_leave_fields_out_for_itself(env: Env) -> None:
    runs: list[int] = []

    @env.task()
    def on_event(event: dict[str, Any], received_at: str) -> str:
        runs.append(event["delivery_attempt"])
        return f"sent-{len(runs)}"

    for attempt in (1, 2):
        result = on_event.apply(
            (delivery(attempt), f"10:0{attempt}"),
            idempotency_key="evt_1",
            idem_fingerprint=LEAVE_OUT,
        )
        assert result.get() == "sent-1"
    # False: this call's arguments are not checked at all.
    unchecked = on_event.apply(
        (delivery(3, "bob@example.com"), "11:00"), idempotency_key="evt_1", idem_fingerprint=False
    )
    assert unchecked.get() == "sent-1"
    assert runs == [1]


def test_a_call_cannot_carry_a_callable_or_a_path_the_task_lacks(env: Env) -> None:
    runs: list[int] = []

    @env.task()
    def on_event(event: dict[str, Any], received_at: str) -> str:
        runs.append(1)
        return "sent"

    with pytest.raises(IdempotencyConfigError, match="cannot travel in a message header") as info:
        on_event.apply_async(
            (delivery(1), "10:00"), idempotency_key="evt_1", idem_fingerprint=lambda **_: 1
        )
    assert f"call option of '{on_event.name}'" in str(info.value)
    with pytest.raises(IdempotencyConfigError, match=r"'evnt' is not a parameter") as info:
        on_event.apply_async(
            (delivery(1), "10:00"), idempotency_key="evt_1", idem_fingerprint=["evnt.x"]
        )
    assert info.value.task_name == on_event.name
    assert runs == []


def test_derived_keys_ignore_the_left_out_fields(env: Env) -> None:
    runs: list[int] = []

    @env.task(bind=True, idem_fingerprint=LEAVE_OUT)
    def on_event(self: Any, event: dict[str, Any], received_at: str) -> str:
        runs.append(event["delivery_attempt"])
        return str(self.idempotency_key)

    first = on_event.apply((delivery(1), "10:00")).get()
    assert on_event.apply((delivery(2), "10:05")).get() == first
    assert on_event.apply((delivery(1, "bob@example.com"), "10:00")).get() != first
    assert runs == [1, 1]


def test_a_callable_on_the_task(env: Env) -> None:
    runs: list[int] = []

    def the_event(event: dict[str, Any], **_: Any) -> Any:
        return [event["id"], event["data"]]

    @env.task(idem_fingerprint=the_event)
    def on_event(event: dict[str, Any], received_at: str) -> str:
        runs.append(event["delivery_attempt"])
        return "sent"

    on_event.apply((delivery(1), "10:00"), idempotency_key="evt_1").get()
    assert on_event.apply((delivery(2), "12:00"), idempotency_key="evt_1").get() == "sent"
    assert runs == [1]


def test_false_on_the_task_turns_the_check_off(env: Env) -> None:
    runs: list[str] = []

    @env.task(idem_fingerprint=False)
    def on_event(event: dict[str, Any], received_at: str) -> str:
        runs.append(event["data"]["email"])
        return "sent"

    on_event.apply((delivery(1), "10:00"), idempotency_key="evt_1").get()
    other = on_event.apply((delivery(1, "bob@example.com"), "10:00"), idempotency_key="evt_1")
    assert other.get() == "sent"
    assert runs == ["ada@example.com"]


def test_group_members_without_a_fingerprint_are_keyed_by_position(env: Env) -> None:
    keys: list[str] = []

    @env.task(bind=True, idem_fingerprint=False)
    def member(self: Any, x: int) -> int:
        keys.append(self.idempotency_key)
        return x

    assert group(member.s(1), member.s(2)).apply_async(idempotency_key="K").get() == [1, 2]
    assert sorted(keys) == ["K#0", "K#1"]


def test_a_task_level_path_that_names_no_parameter_fails_at_first_use(env: Env) -> None:
    runs: list[int] = []

    @env.task(idem_fingerprint=["evnt.delivery_attempt"])
    def on_event(event: dict[str, Any]) -> str:
        runs.append(1)
        return "sent"

    # Checked with the task's key rule at its first use: the call itself refuses.
    with pytest.raises(IdempotencyConfigError) as info:
        on_event.apply((delivery(1),), idempotency_key="evt_1")
    text = str(info.value)
    assert "idem_fingerprint (task option)" in text
    assert "'evnt' is not a parameter" in text
    assert info.value.task_name == on_event.name
    assert runs == []


def test_an_app_level_list_applies_where_the_arguments_exist(env: Env) -> None:
    env.app.conf.idem_fingerprint = ["received_at"]
    invalidate_settings()
    runs: list[str] = []

    @env.task()
    def with_it(event: dict[str, Any], received_at: str) -> str:
        runs.append(received_at)
        return "a"

    @env.task()
    def without_it(event: dict[str, Any]) -> str:
        runs.append("b")
        return "b"

    with_it.apply((delivery(1), "10:00"), idempotency_key="evt_1").get()
    assert with_it.apply((delivery(1), "10:09"), idempotency_key="evt_1").get() == "a"
    without_it.apply((delivery(1),), idempotency_key="evt_1").get()
    with pytest.raises(IdempotencyKeyMismatch):
        without_it.apply((delivery(2),), idempotency_key="evt_1").get()
    assert runs == ["10:00", "b"]


# --------------------------------------------------------------------------- idem_scope


def test_a_renamed_task_with_the_old_name_as_scope_replays_the_old_records(env: Env) -> None:
    runs: list[str] = []

    @env.task()
    def send_email(user_id: int) -> str:
        runs.append("old")
        return f"mail-{user_id}"

    @env.task(idem_scope=send_email.name)
    def send_email_renamed(user_id: int) -> str:
        runs.append("new")
        return "never"

    @env.task()
    def unrelated(user_id: int) -> str:
        runs.append("unrelated")
        return "other"

    assert send_email.apply((7,), idempotency_key="welcome-7").get() == "mail-7"
    assert send_email_renamed.apply((7,), idempotency_key="welcome-7").get() == "mail-7"
    derived = send_email.apply((8,)).get()
    assert send_email_renamed.apply((8,)).get() == derived  # derived keys too
    assert unrelated.apply((7,), idempotency_key="welcome-7").get() == "other"
    assert runs == ["old", "old", "unrelated"]  # the renamed task never ran
    assert env.storage(send_email_renamed, "welcome-7") == env.storage(send_email, "welcome-7")


def test_a_scope_set_on_the_app_is_refused_naming_it(env: Env) -> None:
    env.app.conf.idem_scope = "shared"
    invalidate_settings()
    runs: list[int] = []

    @env.task()
    def scoped(x: int) -> int:
        runs.append(x)
        return x

    with pytest.raises(IdempotencyConfigError, match="idem_scope cannot be set in the app"):
        scoped.apply((1,), idempotency_key="K").get()
    assert runs == []


def test_a_scope_cannot_be_set_per_call(env: Env) -> None:
    @env.task()
    def scoped(x: int) -> int:
        return x

    with pytest.raises(IdempotencyConfigError, match="idem_scope cannot be set per call; set it"):
        scoped.apply_async((1,), idempotency_key="K", idem_scope="other")


def test_an_invalid_scope_names_the_setting_and_the_task(env: Env) -> None:
    @env.task(idem_scope="")
    def empty(x: int) -> int:
        return x

    @env.task(idem_scope=" padded")
    def padded(x: int) -> int:
        return x

    with pytest.raises(IdempotencyConfigError) as info:
        padded.apply((1,), idempotency_key="K").get()
    assert f"idem_scope from task option of '{padded.name}' is invalid" in str(info.value)
    # Only None means "not set": an empty str is refused too.
    with pytest.raises(IdempotencyConfigError, match=r"idem_scope .* is invalid: '' \(empty\)"):
        empty.apply((1,), idempotency_key="K").get()
