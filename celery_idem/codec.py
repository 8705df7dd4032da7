"""Turning a task's outcome into a stored payload and back, without ever trusting it.

Results are serialized with the app's ``result_serializer`` through kombu (the same
registry Celery uses) and decoded only with the content types the app accepts
(``result_accept_content``, else ``accept_content``): a record forged with a pickle
payload is refused unless the app itself accepts pickle. Cached errors are stored as
JSON and rebuilt only as classes listed in ``idem_cache_errors``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from kombu.exceptions import ContentDisallowed, DecodeError, EncodeError
from kombu.serialization import dumps, loads, prepare_accept_content

from celery_idem.store.base import Stored
from celery_idem.store.record import RecordKind

__all__ = [
    "CODEC_TAGS",
    "Codec",
    "ResultTooLarge",
    "decode_error",
    "decode_result",
    "encode_error",
    "encode_no_result",
    "encode_result",
    "no_result_reason",
]


class Codec(NamedTuple):
    """A serializer a one-letter codec tag stands for."""

    name: str
    """Its kombu serializer name (``result_serializer``)."""
    content_type: str
    content_encoding: str


CODEC_TAGS: Mapping[str, Codec] = MappingProxyType(
    {
        "j": Codec("json", "application/json", "utf-8"),
        "p": Codec("pickle", "application/x-python-serialize", "binary"),
        "m": Codec("msgpack", "application/x-msgpack", "binary"),
        "y": Codec("yaml", "application/x-yaml", "utf-8"),
    }
)
"""The one-letter codec tags of the common serializers: they keep a record small.

Any other serializer's payload is stored with the tag ``content_type;content_encoding``
in full (see :func:`untag`).
"""

_SHORT = {(c.content_type, c.content_encoding): tag for tag, c in CODEC_TAGS.items()}
_LONG = {tag: (c.content_type, c.content_encoding) for tag, c in CODEC_TAGS.items()}


class ResultTooLarge(ValueError):
    """The serialized result is over ``idem_max_result_bytes``."""


def _tag(content_type: str, encoding: str) -> str:
    return _SHORT.get((content_type, encoding)) or f"{content_type};{encoding}"


def untag(codec: str) -> tuple[str, str]:
    pair = _LONG.get(codec)
    if pair is not None:
        return pair
    content_type, _, encoding = codec.partition(";")
    return content_type, encoding


def encode_result(value: Any, serializer: str, max_bytes: int) -> Stored:
    """Serialize a task's return value for the store.

    Raises:
        kombu.exceptions.EncodeError: The value cannot be serialized.
        ResultTooLarge: It serializes to more than ``max_bytes``.
    """
    content_type, encoding, data = dumps(value, serializer=serializer)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if len(payload) > max_bytes:
        raise ResultTooLarge(
            f"the result serializes to {len(payload)} bytes, over idem_max_result_bytes "
            f"({max_bytes})"
        )
    return Stored(RecordKind.RESULT, payload, _tag(content_type, encoding))


def accepted_content_types(names: Iterable[str]) -> frozenset[str]:
    """Content types for Celery-style accept names ('json' or 'application/json')."""
    return frozenset(prepare_accept_content(list(names)))


def decode_result(stored: Stored, accept: frozenset[str]) -> Any:
    """Decode a stored result with only the content types in ``accept``.

    ``accept`` comes from :func:`accepted_content_types`, computed once per task.

    Raises:
        kombu.exceptions.ContentDisallowed: The payload's type is not accepted.
        kombu.exceptions.DecodeError: The payload is corrupt.
    """
    content_type, encoding = untag(stored.codec)
    return loads(stored.payload, content_type, encoding, accept=accept)


def encode_no_result(reason: str) -> Stored:
    """A completed record that says why it has no result."""
    return Stored(RecordKind.NO_RESULT, json.dumps({"reason": reason}).encode(), "j")


def no_result_reason(stored: Stored) -> str:
    """The reason kept by :func:`encode_no_result` (tolerant of a damaged record)."""
    try:
        return str(json.loads(stored.payload)["reason"])
    except (ValueError, KeyError, TypeError):
        return "no reason was recorded"


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        if isinstance(value, bytes):
            return {"$bytes": base64.b64encode(value).decode()}
        return repr(value)
    return value


def encode_error(exc: BaseException) -> Stored:
    """Keep a cached failure as JSON: its class path, args and message."""
    cls = type(exc)
    body = {
        "type": f"{cls.__module__}.{cls.__qualname__}",
        "args": [_jsonable(arg) for arg in exc.args],
        "message": str(exc),
    }
    return Stored(RecordKind.ERROR, json.dumps(body).encode(), "j")


def decode_error(
    stored: Stored, allowed: Iterable[type[BaseException]]
) -> tuple[BaseException | None, str]:
    """Rebuild a cached failure, but only as one of the ``allowed`` classes.

    Returns:
        The rebuilt exception (None when its class is no longer allowed or cannot be
        rebuilt) and the dotted class path plus message, for an explanatory error.
    """
    try:
        body = json.loads(stored.payload)
        path, args, message = str(body["type"]), list(body["args"]), str(body["message"])
    except (ValueError, KeyError, TypeError):
        return None, "an unreadable cached error"
    described = f"{path}: {message}"
    for cls in allowed:
        if f"{cls.__module__}.{cls.__qualname__}" == path:
            try:
                return cls(*args), described
            except Exception:
                try:
                    return cls(message), described
                except Exception:
                    return None, described
    return None, described


DECODE_ERRORS = (ContentDisallowed, DecodeError)
ENCODE_ERRORS = (EncodeError, ResultTooLarge)
