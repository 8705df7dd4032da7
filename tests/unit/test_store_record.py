"""The record vocabulary of ``celery_idem.store.record`` against the Lua scripts.

The scripts are the format's other owner: the letters, the completed kinds and the
claim codes must stay the ones ``lua/*.lua`` write and reply, and the Python decoder
must read what ``record.lua``'s ``encode`` writes.
"""

from __future__ import annotations

import re
from importlib import resources

import pytest
import redis

from celery_idem.exceptions import IdempotencyError
from celery_idem.store import (
    ClaimRequest,
    ClaimState,
    CompleteRequest,
    RecordKind,
    RecordState,
    Stored,
)
from celery_idem.store.record import (
    RecordFields,
    StepRecord,
    claimed_steps,
    decode_record,
    encode_steps,
)
from celery_idem.store.redis import RedisStore

LUA = resources.files("celery_idem.store").joinpath("lua")


def lua(name: str) -> str:
    return LUA.joinpath(f"{name}.lua").read_text("utf-8")


REPLY = re.compile(r"^--\s+\{([1-9]), fence[^}]*\}\s+([A-Z_]+)", re.M)
"""A documented reply of a script: ``{code, fence, ...}  STATE ...``."""


def test_claim_states_are_the_codes_claim_lua_replies() -> None:
    documented = REPLY.findall(lua("claim"))
    claims = {s.value: s.name for s in ClaimState if s is not ClaimState.RESERVED}
    assert {int(code): name for code, name in documented} == claims


def test_reserve_replies_reserved_or_what_peek_replies() -> None:
    documented = REPLY.findall(lua("reserve"))
    assert [ClaimState(int(code)).name for code, _ in documented] == [n for _, n in documented]
    assert {name for _, name in documented} == {
        "RESERVED", "COMPLETED", "IN_PROGRESS", "MISMATCH"
    }  # fmt: skip
    assert re.search(r"^--\s+\{0\}\s+not reserved, publish anyway", lua("reserve"), re.M)


def test_peek_replies_the_claim_codes_or_zero() -> None:
    documented = REPLY.findall(lua("peek"))
    assert [ClaimState(int(code)).name for code, _ in documented] == [n for _, n in documented]
    assert len(documented) == 3
    assert re.search(r"^--\s+\{0\}\s+nothing holds the key", lua("peek"), re.M)


def test_the_completed_states_are_those_record_lua_calls_completed() -> None:
    body = re.search(r"local function completed\(r\)(.*?)\nend", lua("record"), re.S)
    assert body is not None
    letters = set(re.findall(r"r\.s == '(\w)'", body.group(1)))
    assert letters == {state.value for state in RecordState if state.completed}
    assert letters == {kind.value for kind in RecordKind}


def test_every_state_letter_is_one_record_lua_documents() -> None:
    doc = re.search(r"--\s+state\s+one byte:(.*?)--\s+fence", lua("record"), re.S)
    assert doc is not None
    assert set(re.findall(r"\b([A-Z])\b", doc.group(1))) == {s.value for s in RecordState}


@pytest.mark.parametrize("kind", list(RecordKind))
def test_a_kind_and_its_state_name_each_other(kind: RecordKind) -> None:
    assert kind.state.completed
    assert kind.state.kind is kind
    assert RecordKind(kind.state.value) is kind


def test_states_that_are_not_completed_have_no_kind() -> None:
    others = {
        RecordState.IN_PROGRESS, RecordState.FREE, RecordState.QUARANTINED, RecordState.RESERVED
    }  # fmt: skip
    assert {s for s in RecordState if not s.completed} == others
    assert all(s.kind is None for s in others)


def test_of_reads_a_state_byte_and_refuses_others() -> None:
    assert RecordState.of("P") is RecordState.IN_PROGRESS
    assert RecordState.of("Z") is None
    assert RecordState.of("") is None


def test_decode_record_reads_every_field() -> None:
    raw = b"C1700000000123:0:2:1:+2:fp3:tid1:j" + b'{"a": "1:2:3"}'
    assert decode_record(raw) == RecordFields(
        state="C",
        fence=1700000000123,
        deadline=0,
        takeovers=2,
        owner=b"+",
        fingerprint=b"fp",
        task_id=b"tid",
        codec=b"j",
        payload=b'{"a": "1:2:3"}',
    )


def test_decode_record_refuses_what_is_not_a_record() -> None:
    with pytest.raises(ValueError, match="invalid literal"):
        decode_record(b"Cnot:a:record")


def test_claimed_steps_reads_the_list_and_leaves_the_claim() -> None:
    steps = (StepRecord("charge", 1, 1700000000.123, "json", b"7"),)
    released: list[str] = []
    for raw in (b"", None):
        assert claimed_steps(raw, key="k", where="here", release=lambda: released.append("x")) == ()
    got = claimed_steps(
        memoryview(encode_steps(steps)), key="k", where="here", release=lambda: released.append("x")
    )
    assert got == steps
    assert released == []


def test_claimed_steps_gives_a_damaged_list_back_and_refuses_it() -> None:
    released: list[str] = []

    def release() -> None:
        released.append("k")
        raise IdempotencyError("the store is down", key="k")  # swallowed: the lease frees it

    with pytest.raises(IdempotencyError, match="holds durable steps that cannot be read") as err:
        claimed_steps(b"2:garbage", key="k", where="redis://h:6379/0", release=release)
    assert released == ["k"]
    assert err.value.key == "k"
    assert "redis://h:6379/0" in str(err.value)


def test_decode_record_reads_what_the_lua_encode_wrote(redis_url: str, key_prefix: str) -> None:
    store = RedisStore.from_url(redis_url)
    key = f"{key_prefix}:k"
    out = store.claim(
        ClaimRequest(key, token="t", task_id="id-1", fingerprint="fp", lease=30, ttl=60)
    )
    payload = b"\x00bytes:with:colons\xff"
    stored = Stored(RecordKind.ERROR, payload, "application/x-custom;binary")
    assert store.complete(
        CompleteRequest(
            key,
            token="t",
            fence=out.fence,
            task_id="id-1",
            stored=stored,
            ttl=60,
            continuation=True,
        )
    )
    client = redis.Redis.from_url(redis_url)
    try:
        raw = client.get(key)
    finally:
        client.close()
    assert isinstance(raw, bytes)
    fields = decode_record(raw)
    assert RecordState.of(fields.state) is RecordState.ERROR
    assert (fields.fence, fields.takeovers, fields.owner) == (out.fence, 0, b"+")
    assert (fields.fingerprint, fields.task_id) == (b"fp", b"id-1")
    assert (fields.codec, fields.payload) == (b"application/x-custom;binary", payload)
