"""The record vocabulary, owned here once: state letters, completed kinds, claim codes.

Pure: imports neither celery nor redis. The record format itself is documented once,
in ``lua/record.lua`` (prepended to every script); this module is its Python side:
what each state byte means (:class:`RecordState`), how a completed record ends
(:class:`RecordKind`), what a claim's reply code means (:class:`ClaimState`), the
Python ``decode`` (:func:`decode_record`), and the durable steps' format
(:func:`decode_steps`; :func:`claimed_steps` is what every store's claim makes of them).
``MemoryStore``, ``RedisStore``, ``PostgresStore``, the CLI and the tests read the
letters and codes from here, never as literals.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from celery_idem.exceptions import IdempotencyError

__all__ = [
    "ClaimState",
    "RecordFields",
    "RecordKind",
    "RecordState",
    "StepRecord",
    "claimed_steps",
    "decode_record",
    "decode_steps",
    "encode_steps",
    "step_label",
]


class RecordState(enum.Enum):
    """A record's state. The value is its one-byte tag, the first byte of the record."""

    IN_PROGRESS = "P"
    """An attempt holds the key (its lease runs), or it is parked for a retry (no owner)."""
    FREE = "F"
    """Released after a failure, keeping its fence; or a forgotten record's tombstone."""
    RESULT = "C"
    """Completed: the result is stored (:attr:`RecordKind.RESULT`)."""
    ERROR = "E"
    """Completed: a cached failure is stored (:attr:`RecordKind.ERROR`)."""
    NO_RESULT = "X"
    """Completed: the result could not be kept (:attr:`RecordKind.NO_RESULT`)."""
    QUARANTINED = "Q"
    """Taken over too many times without completing: nothing runs until it is forgotten."""
    RESERVED = "R"
    """Reserved by a publisher (``idem_dedupe_on_publish``) for the message it sends:
    the worker that gets that task id claims it as its own; until its deadline other
    messages wait as for a running holder, after it the record holds nothing."""

    @classmethod
    def of(cls, letter: str) -> RecordState | None:
        """The state a record's state byte names; None for a byte no record has."""
        try:
            return cls(letter)
        except ValueError:
            return None

    @property
    def completed(self) -> bool:
        """A run finished: ``C``, ``E`` or ``X`` (see :attr:`kind`)."""
        return self in _KINDS

    @property
    def kind(self) -> RecordKind | None:
        """How a completed record ends; None for any other state."""
        return _KINDS.get(self)


class RecordKind(enum.Enum):
    """How a completed record ends. The value is the one-byte tag kept in the store.

    The completed :class:`RecordState` letters, so ``RecordKind(letter)`` decodes the
    state byte of a completed record.
    """

    RESULT = RecordState.RESULT.value
    """The result is stored and is replayed to duplicates."""
    ERROR = RecordState.ERROR.value
    """A failure listed in ``idem_cache_errors`` is stored and re-raised to duplicates."""
    NO_RESULT = RecordState.NO_RESULT.value
    """The body ran but its result could not be kept; the payload says why."""

    @property
    def state(self) -> RecordState:
        """The state of a record completed this way."""
        return RecordState(self.value)


_KINDS: Mapping[RecordState, RecordKind] = {RecordState(kind.value): kind for kind in RecordKind}


class ClaimState(enum.Enum):
    """What one atomic claim-or-read found.

    The value is the code ``lua/claim.lua`` replies first (``lua/peek.lua`` and
    ``lua/reserve.lua`` answer with the same codes, and 0 when nothing holds the key;
    :attr:`RESERVED` is ``reserve.lua``'s alone): ``RedisStore`` decodes a reply with
    ``ClaimState(code)``, so a new state needs its code here and in the scripts.
    """

    CLAIMED = 1
    """The caller now owns the key (fresh, released, expired lease, or its parked retry)."""
    COMPLETED = 2
    """A run finished; the record holds its result (or why it has none)."""
    IN_PROGRESS = 3
    """Another live attempt owns the key."""
    MISMATCH = 4
    """The key is known with another arguments fingerprint; nothing changed."""
    QUARANTINED = 5
    """Taken over too many times without completing (a poison message): nothing runs
    until an operator forgets the key."""
    RESERVED = 6
    """A publisher reserved the key for the task id it is about to send (``reserve``
    only, never a claim): publish under that id."""


@dataclass(frozen=True, slots=True)
class RecordFields:
    """A record's fields, named as in ``lua/record.lua`` (its one-letter Lua name).

    Attributes:
        state: ``s``: the state byte, as text (see :class:`RecordState`).
        fence: ``f``.
        deadline: ``d``: ms on the server's clock.
        takeovers: ``n``.
        owner: ``o``.
        fingerprint: ``a``.
        task_id: ``i``.
        codec: ``c``.
        payload: ``r``: the rest of the record.
    """

    state: str
    fence: int
    deadline: int
    takeovers: int
    owner: bytes
    fingerprint: bytes
    task_id: bytes
    codec: bytes
    payload: bytes


def decode_record(raw: bytes) -> RecordFields:
    """Parse the format documented in ``lua/record.lua`` (its ``decode``, in Python).

    Raises:
        ValueError: ``raw`` is not in that format.
    """
    state, pos = raw[:1].decode(), 1
    numbers: list[int] = []
    for _ in range(3):  # fence, deadline, takeovers: "<number>:"
        colon = raw.index(b":", pos)
        numbers.append(int(raw[pos:colon]))
        pos = colon + 1
    fields: list[bytes] = []
    for _ in range(4):  # owner, fingerprint, task id, codec: "<length>:<bytes>"
        colon = raw.index(b":", pos)
        start = colon + 1
        end = start + int(raw[pos:colon])
        fields.append(raw[start:end])
        pos = end
    fence, deadline, takeovers = numbers
    owner, fingerprint, task_id, codec = fields
    return RecordFields(
        state, fence, deadline, takeovers, owner, fingerprint, task_id, codec, raw[pos:]
    )


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One finished durable step, as a record keeps it (``lua/record.lua``, ``lua/step.lua``).

    Attributes:
        name: The name the run gave the step (``self.step(name, ...)``).
        occurrence: The n-th step of that name in the run, from 1.
        at: When it was stored: seconds since the epoch on the store's clock.
        codec: The value's codec tag (``celery_idem.codec``); ``""`` when the step ran
            but its value could not be kept (:attr:`value` then says why, as text).
        value: The serialized value (or why there is none).
    """

    name: str
    occurrence: int
    at: float
    codec: str
    value: bytes

    @property
    def kept(self) -> bool:
        """The value was stored (False: the step ran, its value could not be kept)."""
        return self.codec != ""

    @property
    def label(self) -> str:
        """How messages and downstream keys name it (:func:`step_label`)."""
        return step_label(self.name, self.occurrence)


def step_label(name: str, occurrence: int) -> str:
    """How messages and downstream keys name a step: ``name``, or ``name#n`` for n >= 2."""
    return name if occurrence == 1 else f"{name}#{occurrence}"


def decode_steps(payload: bytes) -> tuple[StepRecord, ...]:
    """The durable steps in the payload of a record that is not completed.

    The format is ``lua/record.lua``'s: ``<count>:`` then, per step,
    ``<len>:<name><occurrence>:<at>:<len>:<codec><len>:<value>``.

    Raises:
        ValueError: ``payload`` is not in that format.
    """
    if not payload:
        return ()
    colon = payload.index(b":")
    count, pos = int(payload[:colon]), colon + 1
    steps: list[StepRecord] = []
    for _ in range(count):
        name, pos = _field(payload, pos)
        colon = payload.index(b":", pos)
        occurrence, pos = int(payload[pos:colon]), colon + 1
        colon = payload.index(b":", pos)
        at_ms, pos = int(payload[pos:colon]), colon + 1
        codec, pos = _field(payload, pos)
        value, pos = _field(payload, pos)
        steps.append(StepRecord(name.decode(), occurrence, at_ms / 1000.0, codec.decode(), value))
    if pos != len(payload):
        raise ValueError(f"{len(payload) - pos} bytes after the last of {count} steps")
    return tuple(steps)


def claimed_steps(
    raw: bytes | bytearray | memoryview | None,
    *,
    key: str,
    where: str,
    release: Callable[[], object],
) -> tuple[StepRecord, ...]:
    """The durable steps a claim handed back, as every store's ``claim`` returns them.

    A list that cannot be read is refused for good rather than replayed wrongly: the
    body must not run, so the claim just taken is given back first (``release``; its
    own failure is swallowed, the lease frees the key anyway), then the claim fails.

    Args:
        raw: The claim's ``steps`` (``''`` or None: none).
        key: The storage key, for the error.
        where: The store, as its messages name it (its URL, password hidden).
        release: Frees the claim (the store's ``release`` for this key and token).

    Raises:
        IdempotencyError: ``raw`` is not in :func:`decode_steps`' format.
    """
    if not raw:
        return ()
    try:
        return decode_steps(bytes(raw))
    except ValueError as exc:
        with contextlib.suppress(IdempotencyError):
            release()
        raise IdempotencyError(
            f"record {key!r} in the idempotency store at {where} holds durable steps that "
            f"cannot be read ({exc}); nothing was run. Forget the key (celery idem forget) "
            f"if the record is damaged.",
            key=key,
        ) from exc


def encode_steps(steps: tuple[StepRecord, ...]) -> bytes:
    """The payload ``lua/step.lua`` builds for ``steps`` (``MemoryStore`` sizes, tests)."""
    if not steps:
        return b""
    parts = [f"{len(steps)}:".encode()]
    for step in steps:
        name, codec = step.name.encode(), step.codec.encode()
        parts.append(b"%d:%s%d:%d:" % (len(name), name, step.occurrence, round(step.at * 1000)))
        parts.append(b"%d:%s%d:%s" % (len(codec), codec, len(step.value), step.value))
    return b"".join(parts)


def _field(raw: bytes, pos: int) -> tuple[bytes, int]:
    """A ``<length>:<bytes>`` field at ``pos``; returns it and the position after it."""
    colon = raw.index(b":", pos)
    start = colon + 1
    end = start + int(raw[pos:colon])
    if end > len(raw):
        raise ValueError(f"a field of {end - start} bytes runs past the record's end")
    return raw[start:end], end
