"""What ``celery idem`` shows of a record, as plain data (for ``--json``) and as rows.

Pure: no I/O. Decoding a preview (a result, a durable step's value) uses only the
content types given, so a pickled payload is never unpickled unless the app accepts
pickle.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from celery_idem import codec
from celery_idem.cli import render
from celery_idem.store.base import RecordSummary, Stored, StoredRecord
from celery_idem.store.record import RecordKind, RecordState, StepRecord

__all__ = [
    "STATE_CHOICES",
    "STEP_HEADERS",
    "SUMMARY_HEADERS",
    "record_pairs",
    "record_text",
    "record_view",
    "state_of",
    "state_text",
    "step_row",
    "step_view",
    "summary_rows",
    "summary_view",
]

STATE_CHOICES = ("in_progress", "queued", "completed", "free", "quarantined")
"""What ``--state`` filters on."""

_KIND_NAMES = {
    RecordKind.RESULT: "result",
    RecordKind.ERROR: "error",
    RecordKind.NO_RESULT: "no_result",
}
"""A completed record's sub-state, as ``celery idem`` names it."""
SUMMARY_HEADERS = (
    "STORAGE KEY",
    "TASK",
    "STATE",
    "TASK ID",
    "CLAIMED AT",
    "LEASE LEFT",
    "EXPIRES IN",
    "RESULT",
)


def state_of(state: str, *, parked: bool, lease_left: float | None) -> tuple[str, str | None]:
    """A record's state and sub-state for people and scripts.

    ``in_progress``: ``running`` (a live lease), ``parked`` (held for a retry of the
    same task id) or ``lease_expired`` (its worker is gone: the next claim takes over);
    ``queued``: ``reserved`` (a publisher reserved the key for the message it sent,
    which no worker has claimed yet) or ``reservation_expired`` (no worker claimed it in
    time: the record holds nothing);
    ``completed``: ``result``, ``error`` (a cached failure) or ``no_result`` (ran, but
    its result could not be kept); ``free`` (released after a failure, keeps its fence);
    ``quarantined`` (taken over ``idem_max_takeovers`` times without completing: nothing
    runs until it is forgotten); ``not_a_record`` (something else lives under the key).
    """
    found = RecordState.of(state)
    if found is RecordState.IN_PROGRESS:
        if parked:
            return "in_progress", "parked"
        if lease_left is not None and lease_left <= 0:
            return "in_progress", "lease_expired"
        return "in_progress", "running"
    if found is RecordState.RESERVED:
        if lease_left is not None and lease_left <= 0:
            return "queued", "reservation_expired"
        return "queued", "reserved"
    if found is RecordState.FREE:
        return "free", None
    if found is RecordState.QUARANTINED:
        return "quarantined", None
    if found is not None and found.kind is not None:
        return "completed", _KIND_NAMES[found.kind]
    return "not_a_record", None


def state_text(state: str, sub: str | None) -> str:
    """``completed (result)``, ``free``."""
    return f"{state} ({sub})" if sub else state


def _codec_name(tag: str) -> str:
    """The serializer's name for a one-letter tag, else the content type the tag holds."""
    known = codec.CODEC_TAGS.get(tag)
    return known.name if known else tag.partition(";")[0]


def summary_view(summary: RecordSummary, task: str) -> dict[str, Any]:
    """One listed record as JSON-ready data."""
    state, sub = state_of(summary.state, parked=summary.parked, lease_left=summary.lease_left)
    claimed = None if state == "queued" else render.claimed_at(summary.fence)
    return {
        "storage_key": summary.key,
        "task": task,
        "state": state,
        "substate": sub,
        "task_id": summary.task_id or None,
        "fence": summary.fence or None,
        "claimed_at": render.timestamp(claimed) if claimed is not None else None,
        "lease_left": summary.lease_left,
        "expires_in": summary.ttl,
        "result_bytes": summary.payload_bytes if state == "completed" else None,
        "codec": _codec_name(summary.codec) if summary.codec else None,
        "takeovers": summary.takeovers,
    }


def summary_row(view: dict[str, Any]) -> list[str]:
    """A :func:`summary_view` as a table row under :data:`SUMMARY_HEADERS`."""
    result = "-"
    if view["result_bytes"] is not None:
        result = f"{render.size(view['result_bytes'])} {view['codec'] or ''}".rstrip()
    return [
        view["storage_key"],
        view["task"],
        state_text(view["state"], view["substate"]),
        view["task_id"] or "-",
        view["claimed_at"] or "-",
        render.duration(view["lease_left"]),
        render.duration(view["expires_in"]) if view["expires_in"] is not None else "never",
        result,
    ]


def result_view(stored: Stored, accept: frozenset[str], *, limit: int) -> dict[str, Any]:
    """What a completed record holds, decoded only with the ``accept`` content types."""
    content_type = codec.untag(stored.codec)[0]  # the codec tag's content type
    out: dict[str, Any] = {
        "kind": _KIND_NAMES[stored.kind],
        "content_type": content_type,
        "bytes": len(stored.payload),
    }
    if stored.kind is RecordKind.ERROR:
        out["error"] = codec.decode_error(stored, ())[1]
    elif stored.kind is RecordKind.NO_RESULT:
        out["reason"] = codec.no_result_reason(stored)
    else:
        out.update(_preview(stored, accept, limit))
        if not out["decoded"]:
            out["note"] += (
                f" (the app decodes results of the content types in result_accept_content, "
                f"else accept_content: {', '.join(sorted(accept))})"
            )
    return out


def _preview(stored: Stored, accept: frozenset[str], limit: int) -> dict[str, Any]:
    """``decoded`` and ``preview`` (a ``repr``), or why not in ``note``: results and steps.

    Only the ``accept`` content types are decoded, as a worker replaying the value
    would: a pickled value is never unpickled unless the app accepts pickle.
    """
    try:
        value = codec.decode_result(stored, accept)
    except codec.DECODE_ERRORS as exc:
        return {"decoded": False, "preview": None, "note": f"not decoded: {exc}"}
    return {"decoded": True, "preview": render.shorten(repr(value), limit)}


def step_view(
    step: StepRecord, position: int, accept: frozenset[str], *, limit: int, now: float
) -> dict[str, Any]:
    """One finished durable step, JSON-ready: what a later attempt would replay.

    Its value is previewed as a result is (the next attempt gets it back instead of
    running the step, so an operator deciding to forget the key needs to see it). A
    step whose value could not be kept has no size or content type: its ``reason``
    (kept in the value's place) is why the task cannot go past it.
    """
    out: dict[str, Any] = {
        "position": position,
        "name": step.name,
        "occurrence": step.occurrence,
        "at": render.timestamp(step.at),
        "ago": now - step.at,
        "kept": step.kept,
    }
    if not step.kept:
        reason = step.value.decode("utf-8", "replace")
        return {**out, "content_type": None, "bytes": None, "reason": reason}
    out["content_type"] = codec.untag(step.codec)[0]
    out["bytes"] = len(step.value)
    out.update(_preview(Stored(RecordKind.RESULT, step.value, step.codec), accept, limit))
    return out


def record_view(
    record: StoredRecord,
    *,
    storage_key: str,
    task: str,
    key: str | None,
    store_url: str,
    accept: frozenset[str],
    preview_limit: int,
    now: float,
    ttl: float | None = None,
) -> dict[str, Any]:
    """A record as ``inspect`` shows it, JSON-ready (``now``: this machine's clock).

    A completed record keeps no completion time, but it expires ``idem_ttl`` after
    it: with the task's ``ttl`` the completion is ``now + expires_in - ttl`` (off only
    if the run was given another ``idem_ttl`` per call, or the setting changed).

    ``steps`` are the finished durable steps a record that is not completed holds;
    ``steps_done`` counts the steps the run finished either way, since a completion
    drops the steps and keeps only their number.
    """
    state, sub = state_of(record.state, parked=record.parked, lease_left=record.lease_left)
    claimed = None if state == "queued" else render.claimed_at(record.fence)
    steps = [
        step_view(step, position, accept, limit=preview_limit, now=now)
        for position, step in enumerate(record.steps, start=1)
    ]
    return {
        "task": task,
        "key": key,
        "storage_key": storage_key,
        "store": store_url,
        "state": state,
        "substate": sub,
        "task_id": record.task_id or None,
        "fence": record.fence,
        "fingerprint": record.fingerprint or None,
        "takeovers": record.takeovers,
        "claimed_at": render.timestamp(claimed) if claimed is not None else None,
        "claimed_ago": now - claimed if claimed is not None else None,
        "lease_left": record.lease_left,
        "expires_in": record.ttl,
        "stored_at": (
            render.timestamp(now + record.ttl - ttl)
            if ttl is not None and record.ttl is not None and record.stored is not None
            else None
        ),
        "result": (
            result_view(record.stored, accept, limit=preview_limit)
            if record.stored is not None
            else None
        ),
        "steps": steps,
        "steps_done": record.steps_done if state == "completed" else len(steps),
    }


def record_pairs(view: dict[str, Any]) -> list[tuple[str, str]]:
    """The lines of ``inspect``'s table for a :func:`record_view`."""
    claimed = view["claimed_at"] or (
        "not yet (queued: no worker claimed it)"
        if view["state"] == "queued"
        else "unknown (the fence is not a time)"
    )
    if view["claimed_ago"] is not None:
        claimed += f" ({render.duration(view['claimed_ago'])} ago)"
    pairs = [
        ("task", view["task"]),
        ("key", view["key"] if view["key"] is not None else "(not known: given a storage key)"),
        ("storage key", view["storage_key"]),
        ("store", view["store"]),
        ("state", state_text(view["state"], view["substate"])),
        ("task id", view["task_id"] or "-"),
        ("fence", str(view["fence"])),
        ("fingerprint", view["fingerprint"] or "- (not checked: the key derives from the args)"),
        ("claimed at", claimed),
    ]
    if view["takeovers"] or view["state"] == "quarantined":
        pairs.append(("takeovers", str(view["takeovers"])))
    if view["state"] == "in_progress":
        label = "hold left" if view["substate"] == "parked" else "lease left"
        pairs.append((label, render.duration(view["lease_left"])))
    if view["state"] == "queued":
        pairs.append(("reservation left", render.duration(view["lease_left"])))
    if view["state"] == "completed":
        stored_at = view.get("stored_at")
        pairs.append(
            (
                "stored at",
                f"{stored_at} (expiry minus idem_ttl)" if stored_at else "unknown (no idem_ttl)",
            )
        )
    expires = view["expires_in"]
    pairs.append(("expires in", render.duration(expires) if expires is not None else "never"))
    if view["steps"]:
        count = len(view["steps"])
        pairs.append(("steps", f"{count} finished (a later attempt replays them, see below)"))
    elif view["steps_done"]:
        pairs.append(("steps", f"{view['steps_done']} stored by the run (dropped at completion)"))
    result = view["result"]
    if result is not None:
        pairs.append(("result", _result_line(result)))
        for label in ("preview", "note", "error", "reason"):
            if result.get(label) is not None:
                pairs.append((label, str(result[label])))
    return pairs


STEP_HEADERS = ("#", "STEP", "OCCURRENCE", "SIZE", "STORED AT", "VALUE")
"""The columns of ``inspect``'s table of durable steps."""


def step_row(step: dict[str, Any]) -> list[str]:
    """A :func:`step_view` as a row under :data:`STEP_HEADERS`."""
    # A server clock a little ahead of this machine's must not read "ago ago".
    stored = f"{step['at']} ({render.duration(max(step['ago'], 0.0))} ago)"
    if not step["kept"]:
        value = f"not kept: {step['reason']}"
    elif step["decoded"]:
        value = step["preview"]
    else:
        value = f"({step['note']})"
    return [
        str(step["position"]),
        step["name"],
        str(step["occurrence"]),
        render.size(step["bytes"]),
        stored,
        value,
    ]


def record_text(view: dict[str, Any]) -> str:
    """``inspect``'s output for people: :func:`record_pairs`, then the steps' table.

    The steps come as a table of their own, one row per step, since a run may finish
    many and their columns line up; ``forget`` shows the same before it asks.
    """
    text = render.fields(record_pairs(view))
    if not view["steps"]:
        return text
    rows = [step_row(step) for step in view["steps"]]
    return f"{text}\n\n{render.table(STEP_HEADERS, rows)}"


def _result_line(result: dict[str, Any]) -> str:
    what = {"result": "a result", "error": "a cached error", "no_result": "no result kept"}
    return f"{what[result['kind']]}, {result['content_type']}, {render.size(result['bytes'])}"


def summary_rows(views: Sequence[dict[str, Any]]) -> list[list[str]]:
    """Table rows for listed records."""
    return [summary_row(v) for v in views]
