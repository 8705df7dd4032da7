"""The six checks of the chaos checker, over one run's indexed history.

Kept apart from ``checker.py`` (the data model and the entry point ``check``) for size
only. Every check returns ``Anomaly`` records whose description names each call, effect
and fault involved: a soak that failed after an hour must be diagnosable from its report.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .figures import Anomaly, at, call_text, effect_text, fault_text, value_text

if TYPE_CHECKING:
    from .checker import Answer, Call, Delivery, Effect, Fault

#: The refusal a mismatch call must get, and only a mismatch call.
MISMATCH_ERROR = "IdempotencyKeyMismatch"
#: Faults that hit processes (their ``pids``): a run killed or paused between its effect
#: and its completion write is the documented crash window.
PROCESS_FAULTS = frozenset({"kill_child", "kill_worker", "stop_child"})
#: Store-side faults that can lose a claim, a renewal or a completion (the PostgreSQL
#: store's kill and terminated sessions too). ``script_flush`` is not one: the scripts
#: are reloaded transparently (NOSCRIPT) and nothing is lost.
STORE_FAULTS = frozenset({
    "store_restart", "store_kill", "terminate_backends",
    "proxy_latency", "proxy_drop", "proxy_blackhole",
})  # fmt: skip
FAULT_KINDS = PROCESS_FAULTS | STORE_FAULTS | {"script_flush"}
#: How many related calls, effects or faults a description lists before it only counts.
LISTED = 6
#: Seconds after a call's message was last sent (the call itself, or a retry or deferral
#: its last delivery sent) in which a whole worker's death explains that message never
#: reaching any task: kombu's Redis transport pops a message (BRPOP) and only then records
#: it as unacked, so a worker SIGKILLed in between loses it (celery/celery#7950). A
#: message may wait in the queue while every process is busy, hence seconds, not a blink.
BROKER_WINDOW = 15.0

Unit = tuple[str, str | None]


def json_equal(a: object, b: object) -> bool:
    """Equality of JSON values: ``true`` is not ``1`` (Python's ``==`` says it is), ``1 == 1.0``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def error_type(error: str | None) -> str:
    """The exception's class name in ``"ExcTypeName: message"``, any module path dropped."""
    return (error or "").split(":", 1)[0].strip().rsplit(".", 1)[-1]


def _listed(texts: Sequence[str]) -> str:
    shown = "; ".join(texts[:LISTED]) or "none"
    return shown if len(texts) <= LISTED else f"{shown}; and {len(texts) - LISTED} more"


class Run:
    """One run's history, indexed once for every check."""

    def __init__(
        self,
        calls: Sequence[Call],
        answers: Iterable[Answer],
        effects: Iterable[Effect],
        faults: Iterable[Fault],
        *,
        grace: float,
        slack: float,
        allowed_errors: frozenset[str],
        deliveries: Iterable[Delivery] = (),
    ) -> None:
        self.calls = sorted(calls, key=lambda c: c.call)
        self.delivered: dict[str, float] = {}  # task id -> its last delivery
        for d in deliveries:
            self.delivered[d.task_id] = max(d.t, self.delivered.get(d.task_id, d.t))
        self.broker_lost: set[int] = set()  # calls the broker lost (check 1 fills it)
        self.answers = {answer.call: answer for answer in answers}
        self.faults = sorted(faults, key=lambda f: (f.start, f.end, f.kind))
        self.effects = sorted(effects, key=lambda e: (e.t, e.fence, e.task_id, e.attempt, e.pid))
        self.grace, self.slack, self.allowed_errors = grace, slack, allowed_errors
        starts = [c.sent for c in self.calls] or [e.t for e in self.effects]
        self.start: float | None = min(starts) if starts else None
        self.t0 = self.start if self.start is not None else 0.0
        self.by_key: dict[str, list[Call]] = defaultdict(list)
        self.mismatch: dict[tuple[str, str], Call] = {}
        for call in self.calls:
            self.by_key[call.key].append(call)
            if call.expect == "mismatch":
                self.mismatch[call.key, call.args_tag] = call
        # Effects of a call's key, its sub-keys included: a group's members write
        # ``K.0``, ``K.1`` ... (or the library's ``K#0.<args>``) under the group's key K.
        self.key_effects: dict[str, list[Effect]] = defaultdict(list)
        # A mismatch that ran is check 5's anomaly; checks 3 and 4 leave it out so that one
        # wrong run is reported once, not three times.
        self.mismatch_runs: list[tuple[Effect, Call]] = []
        self.units: dict[Unit, list[Effect]] = defaultdict(list)
        for effect in self.effects:
            for owner in self.owners(effect.key):
                self.key_effects[owner].append(effect)
            refused = self.mismatch.get((effect.key, effect.args_tag))
            if refused is not None:
                self.mismatch_runs.append((effect, refused))
            else:
                self.units[effect.key, effect.step].append(effect)

    def owners(self, key: str) -> list[str]:
        """The call keys an effect's key belongs to: itself, or a prefix before ``.``/``#``."""
        cuts = [i for i, char in enumerate(key) if char in ".#"]
        return [k for k in (key, *(key[:i] for i in cuts)) if k in self.by_key]

    def call(self, call: Call) -> str:
        return call_text(call, self.answers.get(call.call), self.t0)

    def effect(self, effect: Effect) -> str:
        return effect_text(effect, self.t0)

    def fault(self, fault: Fault) -> str:
        return fault_text(fault, self.t0)

    def wrong(self, call: Call, answer: Answer) -> str | None:
        """Why an arrived answer is not one the documentation allows, or ``None``."""
        if answer.state == "SUCCESS":
            if call.expect == "mismatch":
                return f"a mismatch call must be refused with {MISMATCH_ERROR}, it succeeded"
            return None
        if answer.state != "FAILURE":
            return f"state {answer.state!r} is neither SUCCESS nor FAILURE"
        name = error_type(answer.error)
        if name == MISMATCH_ERROR and call.expect == "mismatch":
            return None
        if name == MISMATCH_ERROR:
            return f"{MISMATCH_ERROR} for a call with the key's own arguments"
        if name in self.allowed_errors:
            return None
        allowed = sorted(
            self.allowed_errors | ({MISMATCH_ERROR} if call.expect == "mismatch" else set())
        )
        return f"FAILURE with an undocumented error {name or '(none)'!r} (allowed: {allowed})"

    def accepted(self, call: Call) -> bool:
        answer = self.answers.get(call.call)
        return answer is not None and answer.state is not None and self.wrong(call, answer) is None

    def nearby(self, *effects: Effect) -> list[Fault]:
        """Faults within a grace of the effects, those on their processes first: near misses."""
        pids = {e.pid for e in effects}
        low = min(e.t for e in effects) - self.grace
        high = max(e.t for e in effects) + self.grace
        near = [f for f in self.faults if f.start <= high and f.end >= low]
        return sorted(near, key=lambda f: not pids & set(f.pids))


# --------------------------------------------------------------------------- explanations


def stale_writer(run: Run, taker: Effect, stale: Effect) -> Fault | None:
    """A pause of the stale run's process that let ``taker`` take its key over.

    The paused run resumes and finishes its body: its effect lands under a lower fence,
    usually after the taker's (check 4's stale write), or before it when the taker's
    body is the slower. Documented (docs/failure-modes.md, "a run paused past its
    lease"): downstream rejects it by fence; the library cannot stop a resumed body.
    """
    for fault in reversed(run.faults):
        if (
            fault.kind == "stop_child"
            and stale.pid in fault.pids
            and fault.start <= taker.t + run.slack
            and taker.t <= fault.end + run.grace
            and fault.end <= stale.t + run.slack
        ):
            return fault
    return None


def store_fault(run: Run, first: Effect, later: Effect) -> Fault | None:
    """A store fault whose window ``[start, end + grace]`` overlaps ``[first.t, later.t]``."""
    for fault in reversed(run.faults):
        if (
            fault.kind in STORE_FAULTS
            and fault.start <= later.t
            and fault.end + run.grace >= first.t
        ):
            return fault
    return None


def explain_rerun(run: Run, previous: Effect, effect: Effect) -> Fault | None:
    """The fault that explains a second run of a (key, step), or ``None``.

    In order: the previous run's process was killed or paused after its effect, before
    this one (the crash window of README "Guarantees and limits"); one of the two runs was
    paused past its lease and resumed (whichever wrote first); a store fault lost a
    completion, a lease or the records.
    """
    for fault in reversed(run.faults):
        if (
            fault.kind in PROCESS_FAULTS
            and previous.pid in fault.pids
            and previous.t - run.slack <= fault.start <= effect.t
        ):
            return fault
    return (
        stale_writer(run, previous, effect)
        or stale_writer(run, effect, previous)
        or store_fault(run, previous, effect)
    )


# --------------------------------------------------------------------------- checks


def lost_by_broker(run: Run, call: Call) -> Fault | None:
    """The whole-worker kill that explains a lost call's message never reaching a task.

    The message last sent for the call is the call itself or, when a task of it was
    delivered, the retry or deferral that delivery sent (same task id). Nothing after
    that was delivered; a worker killed soon after it was sent explains the loss.
    """
    if not run.delivered:
        return None  # no delivery log: nothing tells a broker's loss from ours
    ids = call.task_id.split(",")
    last = max([call.sent, *(run.delivered[i] for i in ids if i in run.delivered)])
    for fault in run.faults:
        if fault.kind == "kill_worker" and last - run.slack <= fault.start <= last + BROKER_WINDOW:
            return fault
    return None


def check_answers(run: Run) -> tuple[list[Anomaly], int, int, list[tuple[Call, Fault]]]:
    """Check 1: every call answered, with a documented outcome.

    Returns (anomalies, lost, wrong, and the calls the broker lost before any delivery,
    each with the worker kill that explains it: those are not celery-idem's to answer).
    """
    anomalies: list[Anomaly] = []
    lost = wrong = 0
    by_broker: list[tuple[Call, Fault]] = []
    for call in run.calls:
        answer = run.answers.get(call.call)
        if answer is None or answer.state is None:
            if (fault := lost_by_broker(run, call)) is not None:
                by_broker.append((call, fault))
                run.broker_lost.add(call.call)
                continue
            lost += 1
            name, text = "lost call", run.call(call)
        elif (reason := run.wrong(call, answer)) is not None:
            wrong += 1
            name, text = "wrong answer", f"{run.call(call)}: {reason}"
        else:
            continue
        others = [run.call(c) for c in run.by_key[call.key] if c.call != call.call]
        text += (
            f"; the key's other calls: {_listed(others)}; "
            f"{len(run.key_effects[call.key])} effects of the key"
        )
        anomalies.append(Anomaly(1, name, call.key, call.sent, text))
    return anomalies, lost, wrong, by_broker


def check_agreement(run: Run, reruns: Iterable[Effect]) -> tuple[list[Anomaly], int]:
    """Check 2: every SUCCESS of one key's calls (mismatch calls aside) is the same value.

    A run answers with its own value, so a key that ran again for a documented reason
    (``reruns``: the extra effects and stale writes a fault explains) may give one more
    value per such run; more values than runs came from nowhere. Returns the anomalies
    and the number of keys whose answers differ, explained or not.
    """
    allowance: Counter[str] = Counter()
    for effect in set(reruns):
        allowance.update(run.owners(effect.key))
    anomalies: list[Anomaly] = []
    differ = 0
    for key, calls in run.by_key.items():
        groups: list[tuple[Any, list[Call]]] = []
        for call in calls:
            answer = run.answers.get(call.call)
            if call.expect != "value" or answer is None or answer.state != "SUCCESS":
                continue
            for value, members in groups:
                if json_equal(value, answer.value):
                    members.append(call)
                    break
            else:
                groups.append((answer.value, [call]))
        if len(groups) < 2:
            continue
        differ += 1
        if len(groups) <= 1 + allowance[key]:
            continue
        values = [
            f"{value_text(value)} from calls {[c.call for c in members]} (first: "
            f"{run.call(members[0])})"
            for value, members in groups
        ]
        t = min(c.sent for _, members in groups[1:] for c in members)
        text = (
            f"{len(groups)} different SUCCESS values, but the key ran again only "
            f"{allowance[key]} times for a reason a fault explains: {_listed(values)}"
        )
        anomalies.append(Anomaly(2, "disagreeing answers", key, t, text))
    return anomalies, differ


def check_extra(run: Run) -> tuple[list[Anomaly], list[tuple[Effect, Fault]]]:
    """Check 3: each (key, step) ran once, or again only where a fault explains it.

    The first effect's task id owns the unit; each of its attempts (``request.retries``)
    is a run by design, so effects are de-duplicated by (task id, attempt). An effect of
    another task id, or a second one of the same (task id, attempt), is extra, unless the
    run before it failed by design (``fails``): that run completed nothing, so whichever
    message claims the key next (its retry, or a duplicate once the parked hold ran out)
    is the run that completes it.
    """
    anomalies: list[Anomaly] = []
    explained: list[tuple[Effect, Fault]] = []
    for effects in run.units.values():
        owner = effects[0].task_id
        seen: set[tuple[str, int]] = set()
        for i, effect in enumerate(effects):
            attempt = (effect.task_id, effect.attempt)
            if i > 0 and effects[i - 1].fails and attempt not in seen:
                owner = effect.task_id  # the completing run may be any task id's
            expected = effect.task_id == owner and attempt not in seen
            seen.add(attempt)
            if expected:
                continue
            previous = effects[i - 1]
            fault = explain_rerun(run, previous, effect)
            if fault is not None:
                explained.append((effect, fault))
                continue
            why = (
                f"a second run of task id {effect.task_id} attempt {effect.attempt}"
                if effect.task_id == owner
                else f"a run of task id {effect.task_id}, the key's first run was {owner}"
            )
            text = (
                f"{why}: {run.effect(effect)} follows {run.effect(previous)}, and no fault "
                f"explains it (no kill or stop of pid {previous.pid} from the previous effect "
                f"to this one, no stop of pid {effect.pid} before the previous effect, no "
                f"store fault within {run.grace}s of the two); faults nearby: "
                f"{_listed([run.fault(f) for f in run.nearby(previous, effect)])}"
            )
            anomalies.append(Anomaly(3, "unexplained extra effect", effect.key, effect.t, text))
    return anomalies, explained


def check_fences(run: Run) -> tuple[list[Anomaly], list[tuple[Effect, Fault]]]:
    """Check 4: in time order, each effect of a (key, step) has a fence above all before it.

    An equal fence is two runs under one claim: always an anomaly. A lower fence written
    later is a stale run (it lost its lease while paused or cut off from the store and
    finished its body anyway): explained when such a fault hit it, else an anomaly.
    """
    anomalies: list[Anomaly] = []
    stale: list[tuple[Effect, Fault]] = []
    for effects in run.units.values():
        by_fence: dict[int, Effect] = {}
        top = effects[0]
        for effect in effects:
            if effect.fence in by_fence:
                text = (
                    f"two runs under one claim: {run.effect(effect)} has the fence of "
                    f"{run.effect(by_fence[effect.fence])}"
                )
                anomalies.append(Anomaly(4, "fence reused", effect.key, effect.t, text))
            elif effect.fence < top.fence:
                fault = stale_writer(run, top, effect) or store_fault(run, top, effect)
                if fault is not None:
                    stale.append((effect, fault))
                else:
                    text = (
                        f"{run.effect(effect)} was written after {run.effect(top)}, with a "
                        f"lower fence, and no pause of pid {effect.pid} or store fault made it "
                        f"a stale run; faults nearby: "
                        f"{_listed([run.fault(f) for f in run.nearby(top, effect)])}"
                    )
                    anomalies.append(Anomaly(4, "fence went down", effect.key, effect.t, text))
            by_fence.setdefault(effect.fence, effect)
            if effect.fence > top.fence:
                top = effect
    return anomalies, stale


def check_mismatch(run: Run) -> list[Anomaly]:
    """Check 5: no body ran with the arguments of a call that had to be refused."""
    return [
        Anomaly(
            5,
            "mismatch ran",
            effect.key,
            effect.t,
            f"{run.effect(effect)} carries the arguments of {run.call(call)}, which "
            f"had to be refused with {MISMATCH_ERROR} without running a body",
        )
        for effect, call in run.mismatch_runs
    ]


def check_stuck(run: Run) -> list[Anomaly]:
    """Check 6: each key with a non-mismatch call has one accepted answer to such a call.

    A mismatch call's refusal does not count: it shows the key's record exists, not that
    the key's own work was answered.
    """
    anomalies: list[Anomaly] = []
    for key, calls in run.by_key.items():
        # A call the broker lost before any delivery never reached celery-idem (check 1).
        own = [c for c in calls if c.expect == "value" and c.call not in run.broker_lost]
        if not own or any(run.accepted(c) for c in own):
            continue
        every_lost = all((a := run.answers.get(c.call)) is None or a.state is None for c in own)
        what = "every call of the key is lost" if every_lost else "no call got an accepted answer"
        text = (
            f"{what}: {_listed([run.call(c) for c in own])}; "
            f"{len(run.key_effects[key])} effects of the key, the last at "
            f"{at(max((e.t for e in run.key_effects[key]), default=None), run.t0)}"
        )
        anomalies.append(Anomaly(6, "stuck key", key, own[0].sent, text))
    return anomalies
