"""Unit tests of celery_idem.keys: binding, canonical encoding, rules, validation, storage."""

from __future__ import annotations

import datetime as dt
import enum
import fnmatch
import json
import re
import uuid
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from celery_idem.canonical import canonical_encode, fingerprint_of
from celery_idem.exceptions import (
    IdempotencyConfigError,
    InvalidIdempotencyKey,
    UnencodableArgument,
)
from celery_idem.keys import (
    MAX_KEY_LENGTH,
    KeyRule,
    KeySource,
    ResolvedKey,
    storage_key,
    storage_pattern,
    storage_task_tag,
    task_tag,
    validate_key,
)

TASK = "shop.charge"

# ----------------------------------------------------------------------------- helpers

json_leaves = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10)
)
json_values = st.recursive(
    json_leaves,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)
fixed_zones = st.builds(
    dt.timezone,
    st.timedeltas(min_value=dt.timedelta(hours=-23), max_value=dt.timedelta(hours=23)),
)
PARAMS = ("a", "b", "c", "d", "e")


def five(a: Any, b: Any, c: Any, d: Any = None, e: Any = "default") -> None:
    """Five parameters, two with defaults."""


def charge(user: Any, items: Any = (), meta: Any = None) -> None:
    """A typical task body."""


def welcome(user_id: int, template: str, lang: str = "en") -> None:
    """A task keyed by a template rule."""


def flexible(a: Any, *rest: Any, **extra: Any) -> None:
    """Every kind of parameter."""


def only_kwargs(**kwargs: Any) -> None:
    """Keyword arguments only."""


def derived(run: Any, /, *args: Any, **kwargs: Any) -> ResolvedKey:
    return KeyRule(TASK, run, None).resolve(args, kwargs)


class User:
    def __init__(self, id: int) -> None:
        self.id = id


class Color(str, enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class Shape(enum.Enum):
    SQUARE = object()


# ----------------------------------------------------------------------------- binding


def test_positional_and_keyword_calls_give_the_same_key() -> None:
    rule = KeyRule(TASK, five, None)
    positional = rule.resolve((1, "x", [2]), {})
    keyword = rule.resolve((), {"c": [2], "a": 1, "b": "x"})
    mixed = rule.resolve((1,), {"b": "x", "c": [2]})
    assert positional == keyword == mixed


@given(values=st.lists(json_values, min_size=5, max_size=5), order=st.permutations(PARAMS))
def test_kwargs_order_does_not_matter(values: list[Any], order: list[str]) -> None:
    by_name = dict(zip(PARAMS, values, strict=True))
    shuffled = {name: by_name[name] for name in order}
    rule = KeyRule(TASK, five, None)
    assert rule.resolve((), shuffled) == rule.resolve(tuple(values), {})


def test_defaults_are_applied() -> None:
    rule = KeyRule(TASK, five, None)
    omitted = rule.resolve((1, 2, 3), {})
    assert omitted == rule.resolve((1, 2, 3, None, "default"), {})
    assert omitted != rule.resolve((1, 2, 3, None, "other"), {})


def test_var_positional_is_a_tuple_and_var_keyword_is_flattened() -> None:
    resolved = derived(flexible, 1, 2, 3, x="y")
    expected = canonical_encode({"a": 1, "rest": [2, 3], "x": "y"})
    assert resolved.fingerprint == fingerprint_of(expected)
    # Empty *rest and **extra count, so the call without them has its own key.
    assert derived(flexible, 1).fingerprint == fingerprint_of(
        canonical_encode({"a": 1, "rest": []})
    )


@given(first=st.dictionaries(st.text(max_size=5), json_values, max_size=4), second=st.data())
def test_different_values_give_different_canonical_texts(
    first: dict[str, Any], second: Any
) -> None:
    other = second.draw(st.dictionaries(st.text(max_size=5), json_values, max_size=4))
    assume(first != other)
    assert canonical_encode(first) != canonical_encode(other)
    assert derived(only_kwargs, **first).key != derived(only_kwargs, **other).key


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((), {}),  # missing required arguments
        ((1, 2, 3, 4, 5, 6), {}),  # too many positional arguments
        ((1, 2, 3), {"zzz": 1}),  # unexpected keyword
        ((1, 2, 3), {"a": 1}),  # multiple values for 'a'
    ],
)
def test_binding_failure_raises_plain_type_error(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    rule = KeyRule(TASK, five, None)
    with pytest.raises(TypeError) as info:
        rule.resolve(args, kwargs)
    assert type(info.value) is TypeError  # not wrapped in one of ours


def test_bound_method_excludes_self() -> None:
    class ChargeTask:
        def run(self, amount: int, currency: str = "EUR") -> None:
            """Task body of a bound task."""

    rule = KeyRule(TASK, ChargeTask().run, None)
    assert list(rule.signature.parameters) == ["amount", "currency"]
    resolved = rule.resolve((10,), {})
    assert resolved == rule.resolve((), {"amount": 10, "currency": "EUR"})
    assert resolved.fingerprint == fingerprint_of(
        canonical_encode({"amount": 10, "currency": "EUR"})
    )
    with pytest.raises(TypeError):
        rule.resolve((10, "EUR", "extra"), {})


def test_keyword_shadowing_a_positional_only_parameter_is_refused() -> None:
    def run(a: Any, /, **extra: Any) -> None:
        """Positional-only ``a`` and a ``**extra`` that may also hold an ``a``."""

    rule = KeyRule(TASK, run, None)
    assert rule.resolve((1,), {"b": 2}).key  # no clash: fine
    with pytest.raises(UnencodableArgument, match="parameter 'a', which takes positional"):
        rule.resolve((1,), {"a": 2})


def test_keyword_shadowing_the_var_positional_name_is_refused() -> None:
    rule = KeyRule(TASK, flexible, None)
    # Without the check, extra={"rest": 3} would overwrite rest=(2,) in the mapping.
    with pytest.raises(UnencodableArgument, match="parameter 'rest'"):
        rule.resolve((1, 2), {"rest": 3})


# ----------------------------------------------------------------------------- encoding


@given(value=json_values)
def test_encoding_survives_a_json_round_trip(value: Any) -> None:
    assert canonical_encode(value) == canonical_encode(json.loads(json.dumps(value)))


def test_encoding_is_compact_sorted_json() -> None:
    value = {"b": [1, 2.5, None, True], "a": "é", "c": {"z": 1, "y": float("inf")}}
    assert canonical_encode(value) == ('{"a":"é","b":[1,2.5,null,true],"c":{"y":Infinity,"z":1}}')


@given(value=json_values)
def test_encoding_of_json_natives_is_sorted_compact_json(value: Any) -> None:
    assume("$" not in json.dumps(value))  # "$" keys are escaped, tested elsewhere
    assert canonical_encode(value) == json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )


@given(items=st.lists(json_values, max_size=5))
def test_tuples_encode_as_lists(items: list[Any]) -> None:
    assert canonical_encode(tuple(items)) == canonical_encode(items)
    assert canonical_encode({"k": (tuple(items), 1)}) == canonical_encode({"k": [items, 1]})


def test_non_str_dict_keys_encode_as_json_makes_them() -> None:
    assert canonical_encode({1: "x"}) == canonical_encode({"1": "x"})
    assert canonical_encode({True: 1, None: 2, 1.5: 3}) == canonical_encode(
        {"true": 1, "null": 2, "1.5": 3}
    )
    assert canonical_encode({10: 0, 9: 0}) == canonical_encode(
        json.loads(json.dumps({10: 0, 9: 0}))
    )


def test_dict_keys_colliding_after_json_are_refused() -> None:
    with pytest.raises(UnencodableArgument, match="keys 1 and '1'"):
        canonical_encode({1: "a", "1": "b"})


def test_dict_key_of_another_type_is_refused() -> None:
    with pytest.raises(UnencodableArgument, match=r"key of type tuple"):
        canonical_encode({(1, 2): "x"})


def test_json_scalars_keep_their_type() -> None:
    assert canonical_encode(1) != canonical_encode(1.0)
    assert canonical_encode(True) != canonical_encode(1)
    assert canonical_encode(None) != canonical_encode("null")
    assert canonical_encode(float("nan")) == canonical_encode(float("nan"))


@given(
    value=st.one_of(
        st.uuids(),
        st.decimals(allow_nan=False),
        st.datetimes(),
        st.dates(),
        st.times(),
        st.binary(max_size=20),
    )
)
def test_tagged_values_encode_stably(value: Any) -> None:
    text = canonical_encode(value)
    assert text == canonical_encode(value)
    # Tagged, so never confused with the string form of the same value.
    assert text != canonical_encode(str(value))


def test_tagged_values_have_a_fixed_format() -> None:
    # Fingerprints outlive a deploy: the encoding must not drift between versions.
    utc_plus_2 = dt.timezone(dt.timedelta(hours=2))
    cases = {
        uuid.UUID(int=1): '{"$uuid":"00000000-0000-0000-0000-000000000001"}',
        Decimal("1.50"): '{"$decimal":"1.50"}',
        dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=utc_plus_2): (
            '{"$datetime":"2024-01-02T01:04:05+00:00"}'
        ),
        dt.datetime(2024, 1, 2, 3, 4, 5): '{"$datetime":"2024-01-02T03:04:05"}',
        dt.date(2024, 1, 2): '{"$date":"2024-01-02"}',
        dt.time(3, 4, 5): '{"$time":"03:04:05"}',
        b"\xfb\xff": '{"$bytes":"+/8="}',
        frozenset({"a", 1}): '{"$set":["\\"a\\"","1"]}',
    }
    for value, text in cases.items():
        assert canonical_encode(value) == text


def test_tagged_values_compare_by_value() -> None:
    u = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert canonical_encode(u) == canonical_encode(uuid.UUID(str(u)))
    assert canonical_encode(u) != canonical_encode(str(u))
    assert canonical_encode(Decimal("1.10")) == canonical_encode(Decimal("1.10"))
    assert canonical_encode(Decimal("1.10")) != canonical_encode(Decimal("1.1"))
    assert canonical_encode(b"ab") == canonical_encode(bytearray(b"ab"))
    assert canonical_encode(b"ab") == canonical_encode(memoryview(b"ab"))
    assert canonical_encode(b"ab") != canonical_encode("ab")
    assert canonical_encode(dt.date(2024, 1, 2)) != canonical_encode(dt.datetime(2024, 1, 2))


@given(
    moment=st.datetimes(min_value=dt.datetime(2, 1, 1), max_value=dt.datetime(9998, 1, 1)),
    zone=fixed_zones,
    other_zone=fixed_zones,
)
def test_aware_datetimes_encode_the_instant(
    moment: dt.datetime, zone: dt.timezone, other_zone: dt.timezone
) -> None:
    aware = moment.replace(tzinfo=zone)
    same_instant = aware.astimezone(other_zone)
    assert canonical_encode(aware) == canonical_encode(same_instant)
    assert canonical_encode(aware) != canonical_encode(moment)  # naive stays naive


def test_sets_ignore_order() -> None:
    # 1 and 9 share a hash slot in a small set, so insertion order is iteration order.
    first, second = set([1, 9]), set([9, 1])
    assert list(first) != list(second)  # precondition: the order really differs
    assert canonical_encode(first) == canonical_encode(second)
    assert canonical_encode({3, 1, 2}) == canonical_encode(frozenset([2, 1, 3]))
    assert canonical_encode({"b", "a"}) == canonical_encode({"a", "b"})
    assert canonical_encode({1, 2}) != canonical_encode([1, 2])


def test_enums_and_subclasses_encode_as_base_value() -> None:
    assert canonical_encode(Color.RED) == canonical_encode("red")
    assert canonical_encode(Level.HIGH) == canonical_encode(3)
    assert canonical_encode({Color.RED: Level.HIGH}) == canonical_encode({"red": 3})
    with pytest.raises(UnencodableArgument, match="enum member"):
        canonical_encode(Shape.SQUARE)


def test_tag_like_dict_keys_do_not_collide_with_tagged_values() -> None:
    u = uuid.uuid4()
    assert canonical_encode({"$uuid": str(u)}) != canonical_encode(u)
    assert canonical_encode({"$uuid": 1}) != canonical_encode({"$$uuid": 1})


def test_shared_references_are_not_mistaken_for_cycles() -> None:
    shared = [1, 2]
    assert canonical_encode([shared, shared]) == canonical_encode([[1, 2], [1, 2]])


# ----------------------------------------------------------------------------- unencodable


def test_unencodable_top_level_argument_names_argument_type_and_task() -> None:
    with pytest.raises(UnencodableArgument) as info:
        derived(charge, User(1))
    err = info.value
    message = str(err)
    assert "argument 'user' of task 'shop.charge'" in message
    assert f"{__name__}.User" in message
    assert "pass a primitive value such as its id" in message
    assert err.key is None
    assert err.task_name == TASK
    assert err.__cause__ is None
    assert isinstance(err, TypeError)


@pytest.mark.parametrize(
    ("kwargs", "path"),
    [
        ({"items": [1, 2, User(1)]}, "items[2]"),
        ({"meta": {"k": User(1)}}, "meta['k']"),
        ({"meta": {"k": [{"deep": lambda: 0}]}}, "meta['k'][0]['deep']"),
        ({"meta": {"tags": {1, User(1)}}}, "meta['tags']{...}"),
    ],
)
def test_unencodable_nested_value_names_its_path(kwargs: dict[str, Any], path: str) -> None:
    with pytest.raises(UnencodableArgument) as info:
        derived(charge, 1, **kwargs)
    assert f"argument '{path}' of task 'shop.charge'" in str(info.value)


def test_canonical_encode_names_the_given_path() -> None:
    with pytest.raises(UnencodableArgument, match=r"argument 'user\[0\]'"):
        canonical_encode([object()], path="user")


def test_self_containing_list_is_refused_clearly() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    with pytest.raises(UnencodableArgument, match=r"'items\[1\]' .*contains itself"):
        derived(charge, 1, loop)


def test_too_deep_nesting_is_refused_clearly() -> None:
    deep: list[Any] = []
    for _ in range(10_000):
        deep = [deep]
    with pytest.raises(UnencodableArgument, match="nested too deeply") as info:
        derived(charge, 1, deep)
    assert isinstance(info.value.__cause__, RecursionError)


def test_out_of_range_aware_datetime_is_refused_from_its_cause() -> None:
    late = dt.datetime.max.replace(tzinfo=dt.timezone(dt.timedelta(hours=-5)))
    with pytest.raises(UnencodableArgument, match="cannot be converted to UTC") as info:
        canonical_encode(late)
    assert isinstance(info.value.__cause__, OverflowError)


# ----------------------------------------------------------------------------- rules


def test_template_rule() -> None:
    rule = KeyRule("mail.welcome", welcome, "{user_id}:{template}")
    resolved = rule.resolve((5, "hello"), {})
    assert resolved.key == "5:hello"
    assert resolved.source is KeySource.RULE
    assert rule.resolve((), {"template": "hello", "user_id": 5}).key == "5:hello"


def test_template_rule_may_reach_into_objects_that_have_no_encoding() -> None:
    rule = KeyRule(TASK, charge, "{user.id}:{items[0]}")
    first = rule.resolve((User(7), ["sku"]), {})
    assert first.key == "7:sku"
    # The fingerprint still distinguishes the encodable arguments.
    assert first.fingerprint != rule.resolve((User(7), ["sku"]), {"meta": 1}).fingerprint


@pytest.mark.parametrize("template", ["{user_id}:{unknown}", "{user_id}:{nope.attr}", "{x[0]}"])
def test_template_with_unknown_field_fails_at_construction(template: str) -> None:
    with pytest.raises(IdempotencyConfigError) as info:
        KeyRule("mail.welcome", welcome, template)
    message = str(info.value)
    assert "'mail.welcome'" in message
    assert repr(template) in message
    assert "is not a parameter" in message
    assert info.value.task_name == "mail.welcome"


def test_template_field_in_format_spec_is_checked() -> None:
    with pytest.raises(IdempotencyConfigError, match="width"):
        KeyRule("mail.welcome", welcome, "{user_id:>{width}}")


@pytest.mark.parametrize("template", ["{}", "{0}", "{user_id}-{1}"])
def test_positional_template_field_fails_at_construction(template: str) -> None:
    with pytest.raises(IdempotencyConfigError, match="positional field"):
        KeyRule("mail.welcome", welcome, template)


@pytest.mark.parametrize("template", ["{user_id", "user_id}", ""])
def test_malformed_template_fails_at_construction(template: str) -> None:
    with pytest.raises(IdempotencyConfigError):
        KeyRule("mail.welcome", welcome, template)


def test_template_fields_are_free_when_the_task_takes_kwargs() -> None:
    rule = KeyRule(TASK, flexible, "{order}")
    assert rule.resolve((1,), {"order": "o-9"}).key == "o-9"
    with pytest.raises(InvalidIdempotencyKey, match="raised KeyError") as info:
        rule.resolve((1,), {})
    assert isinstance(info.value.__cause__, KeyError)


def test_callable_rule_gets_arguments_by_name() -> None:
    seen: list[dict[str, Any]] = []

    def key_of(**arguments: Any) -> str:
        seen.append(arguments)
        return f"w-{arguments['user_id']}"

    resolved = KeyRule("mail.welcome", welcome, key_of).resolve((5,), {"template": "t"})
    assert resolved.key == "w-5"
    assert resolved.source is KeySource.RULE
    assert seen == [{"user_id": 5, "template": "t", "lang": "en"}]


def test_callable_rule_returning_non_str_is_invalid() -> None:
    rule = KeyRule("mail.welcome", welcome, lambda user_id, **_: user_id)
    with pytest.raises(InvalidIdempotencyKey, match="must be a str, got int 5") as info:
        rule.resolve((5, "t"), {})
    assert "from the task's idempotency_key rule" in str(info.value)
    assert info.value.key == 5  # what the rule returned, as it returned it


def test_callable_rule_raising_is_wrapped_with_its_cause() -> None:
    def key_of(**_: Any) -> str:
        raise ValueError("no user")

    with pytest.raises(InvalidIdempotencyKey) as info:
        KeyRule("mail.welcome", welcome, key_of).resolve((5, "t"), {})
    # Which rule, which task, what it raised.
    assert str(info.value) == (
        f"the idempotency_key rule {__name__}.test_callable_rule_raising_is_wrapped_with_"
        "its_cause.<locals>.key_of of task 'mail.welcome' raised ValueError: no user"
    )
    assert isinstance(info.value.__cause__, ValueError)
    assert info.value.task_name == "mail.welcome"


def test_a_raising_lambda_rule_is_named_with_its_line() -> None:
    key_of = lambda **arguments: arguments["missing"]  # noqa: E731
    line = key_of.__code__.co_firstlineno
    with pytest.raises(InvalidIdempotencyKey) as info:
        KeyRule("mail.welcome", welcome, key_of).resolve((5, "t"), {})
    assert str(info.value) == (
        f"the idempotency_key rule {__name__}.test_a_raising_lambda_rule_is_named_with_its_"
        f"line.<locals>.<lambda> (line {line}) of task 'mail.welcome' raised KeyError: "
        "'missing'"
    )


def test_a_raising_callable_object_rule_is_named_by_its_repr() -> None:
    class KeyOf:
        def __call__(self, **arguments: Any) -> str:
            raise LookupError("no such user")

        def __repr__(self) -> str:
            return "KeyOf(users)"

    with pytest.raises(InvalidIdempotencyKey) as info:
        KeyRule("mail.welcome", welcome, KeyOf()).resolve((5, "t"), {})
    assert str(info.value) == (
        "the idempotency_key rule KeyOf(users) of task 'mail.welcome' raised "
        "LookupError: no such user"
    )


def test_callable_rule_that_cannot_take_the_arguments_fails_at_construction() -> None:
    with pytest.raises(IdempotencyConfigError, match="cannot be called"):
        KeyRule("mail.welcome", welcome, lambda user_id: str(user_id))
    with pytest.raises(IdempotencyConfigError, match="cannot be called"):
        KeyRule("mail.welcome", welcome, lambda user_id, missing, **_: "k")


@pytest.mark.parametrize("rule", [42, b"{user_id}", ["{user_id}"]])
def test_rule_of_another_type_fails_at_construction(rule: Any) -> None:
    with pytest.raises(IdempotencyConfigError, match="must be a str template"):
        KeyRule("mail.welcome", welcome, rule)


# ----------------------------------------------------------------------------- precedence


def test_explicit_beats_rule_beats_derived() -> None:
    with_rule = KeyRule("mail.welcome", welcome, "{user_id}")
    without_rule = KeyRule("mail.welcome", welcome, None)
    args = (5, "t")

    explicit = with_rule.resolve(args, {}, explicit="call-key")
    ruled = with_rule.resolve(args, {})
    plain = without_rule.resolve(args, {})
    explicit_no_rule = without_rule.resolve(args, {}, explicit="call-key")

    assert (explicit.key, explicit.source) == ("call-key", KeySource.CALL)
    assert (explicit_no_rule.key, explicit_no_rule.source) == ("call-key", KeySource.CALL)
    assert (ruled.key, ruled.source) == ("5", KeySource.RULE)
    assert plain.source is KeySource.ARGS
    assert re.fullmatch(r"[0-9a-f]{32}", plain.key)
    # Same arguments, same fingerprint, whatever the source of the key.
    assert explicit.fingerprint == ruled.fingerprint == plain.fingerprint
    assert explicit.fingerprint == fingerprint_of(
        canonical_encode({"user_id": 5, "template": "t", "lang": "en"})
    )


def test_fingerprint_differs_for_different_arguments() -> None:
    rule = KeyRule("mail.welcome", welcome, "{user_id}")
    one = rule.resolve((5, "t"), {}, explicit="k")
    other = rule.resolve((5, "u"), {}, explicit="k")
    assert one.key == other.key
    assert one.fingerprint != other.fingerprint


def test_explicit_key_tolerates_unencodable_arguments() -> None:
    resolved = KeyRule(TASK, charge, None).resolve((User(1),), {}, explicit="order-1")
    assert resolved.key == "order-1"
    assert (
        resolved.fingerprint
        != KeyRule(TASK, charge, None)
        .resolve((User(1),), {"meta": 2}, explicit="order-1")
        .fingerprint
    )


def test_explicit_key_is_validated() -> None:
    with pytest.raises(InvalidIdempotencyKey, match="from the call site"):
        KeyRule(TASK, charge, None).resolve((1,), {}, explicit=42)


@given(value=json_values)
def test_fingerprint_format(value: Any) -> None:
    fingerprint = fingerprint_of(canonical_encode(value))
    assert re.fullmatch(r"[A-Za-z0-9_-]{16}", fingerprint)


# ----------------------------------------------------------------------------- validate_key


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("", "must not be empty"),
        (42, "must be a str, got int 42"),
        (None, "must be a str, got NoneType None"),
        (b"key", "must be a str, got bytes b'key'"),
        ("k" * (MAX_KEY_LENGTH + 1), "is 1025 characters long, over the limit of 1024"),
    ],
)
def test_validate_key_rejects(value: object, match: str) -> None:
    with pytest.raises(InvalidIdempotencyKey, match=match) as info:
        validate_key(value, task_name=TASK, source=KeySource.CALL)
    assert info.value.task_name == TASK
    assert info.value.key is value  # as given: not its repr, not a str made of it
    assert info.value.args == (str(info.value), value, TASK)


def test_validate_key_message_names_task_and_source() -> None:
    with pytest.raises(InvalidIdempotencyKey) as info:
        validate_key(42, task_name="x.y", source=KeySource.RULE)
    assert str(info.value) == (
        "idempotency key for task 'x.y' (from the task's idempotency_key rule) "
        "must be a str, got int 42"
    )


def test_validate_key_carries_a_long_key_whole_but_shows_it_bounded() -> None:
    with pytest.raises(InvalidIdempotencyKey, match="hash") as info:
        validate_key("k" * 5000, task_name=TASK, source=KeySource.CALL)
    assert info.value.key == "k" * 5000
    # Celery logs a failure with repr(exc): a payload passed as a key stays out of it.
    assert len(repr(info.value)) < 400
    assert repr("k" * 5000)[:80] + "..." in repr(info.value)
    assert len(str(info.value)) < 300


def test_validate_key_says_where_the_key_came_from_when_told() -> None:
    origin = "from the message header 'idempotency_key' of another producer"
    with pytest.raises(InvalidIdempotencyKey) as info:
        validate_key("", task_name="x.y", source=KeySource.CALL, origin=origin)
    assert str(info.value) == f"idempotency key for task 'x.y' ({origin}) must not be empty"
    with pytest.raises(InvalidIdempotencyKey, match=r"\(from the call site\)"):
        validate_key("", task_name="x.y", source=KeySource.CALL)
    with pytest.raises(InvalidIdempotencyKey, match=origin) as info:
        KeyRule(TASK, charge, None).resolve((1,), {}, explicit=5, origin=origin)
    assert info.value.key == 5


@pytest.mark.parametrize(
    "value", ["k" * MAX_KEY_LENGTH, "a\x00b", "{user_id}", "clé-ключ-鍵-🔑", "x"]
)
def test_validate_key_accepts(value: str) -> None:
    assert validate_key(value, task_name=TASK, source=KeySource.CALL) == value


def test_validate_key_returns_a_plain_str() -> None:
    key = validate_key(Color.RED, task_name=TASK, source=KeySource.RULE)
    assert type(key) is str
    assert key == "red"


# ----------------------------------------------------------------------------- storage_key


@given(key=st.text(min_size=1, max_size=MAX_KEY_LENGTH), task=st.text(min_size=1, max_size=50))
def test_storage_key_is_bounded_and_safe(key: str, task: str) -> None:
    stored = storage_key("idem", task, key)
    assert re.fullmatch(r"idem:[A-Za-z0-9_-]{6}:[A-Za-z0-9_-]{22}", stored)
    assert stored.split(":")[1] == task_tag(task)
    assert storage_task_tag("idem", stored) == task_tag(task)
    assert fnmatch.fnmatchcase(stored, storage_pattern("idem", task))
    assert fnmatch.fnmatchcase(stored, storage_pattern("idem"))


def test_storage_key_of_a_max_length_key_is_bounded() -> None:
    assert len(storage_key("idem", TASK, "k" * MAX_KEY_LENGTH)) == len("idem:") + 6 + 1 + 22


def test_storage_pattern_of_one_task_does_not_match_another_tasks_records() -> None:
    other = storage_key("idem", "other.task", "k")
    assert task_tag("other.task") != task_tag(TASK)
    assert not fnmatch.fnmatchcase(other, storage_pattern("idem", TASK))


def test_storage_pattern_escapes_glob_characters_of_the_prefix() -> None:
    stored = storage_key("a*[b]?", TASK, "k")
    pattern = storage_pattern("a*[b]?", TASK)
    assert pattern.startswith("a\\*\\[b\\]\\?:")
    assert storage_task_tag("a*[b]?", stored) == task_tag(TASK)
    assert storage_task_tag("axbb", stored) is None


def test_storage_task_tag_refuses_keys_of_another_layout() -> None:
    assert storage_task_tag("idem", "idem:" + "A" * 22) is None  # no task tag
    assert storage_task_tag("idem", "other:abcdef:" + "A" * 22) is None  # another prefix
    assert storage_task_tag("idem", "idem:abc*ef:" + "A" * 22) is None  # not base64


def test_storage_key_is_deterministic() -> None:
    assert storage_key("idem", TASK, "order-1") == storage_key("idem", TASK, "order-1")


def test_storage_key_is_scoped_by_task_and_key() -> None:
    assert storage_key("idem", "a.task", "k") != storage_key("idem", "b.task", "k")
    assert storage_key("idem", TASK, "k1") != storage_key("idem", TASK, "k2")
    # The separator keeps task and key apart: ("ab", "c") is not ("a", "bc").
    assert storage_key("idem", "ab", "c") != storage_key("idem", "a", "bc")


def test_storage_key_accepts_lone_surrogates() -> None:
    assert storage_key("idem", TASK, "bad\udcff") != storage_key("idem", TASK, "bad")
