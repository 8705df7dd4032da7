"""The Celery app and tasks that the integration tests run on real worker processes.

Configured from environment variables that the ``Worker`` helper sets, so the test
process (which sends) and each worker subprocess (which runs) build the same app.
Every body writes to an effect ledger (a Redis list per name, in a database the
library never touches), so the tests count real executions, not what the library says.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import redis
from celery import Celery
from celery.exceptions import Ignore, Reject

from celery_idem import IdempotentTask
from celery_idem import signals as idem_signals
from tests.worker_settings import redelivering_worker

BROKER = os.environ.get("IDEM_TEST_BROKER", "memory://")
BACKEND = os.environ.get("IDEM_TEST_BACKEND", "cache+memory://")
STORE = os.environ.get("IDEM_TEST_STORE", "memory://tests")
LEDGER = os.environ.get("IDEM_TEST_LEDGER", "")
VISIBILITY = float(os.environ.get("IDEM_TEST_VISIBILITY", "3600"))

app = Celery("idemtest", broker=BROKER, backend=BACKEND)
app.conf.update(
    # The durable-step tasks (t.st_*) live in their own module; workers import it too.
    include=["tests.integration.step_tasks"],
    idem_redis_url=STORE,
    idem_lease=float(os.environ.get("IDEM_TEST_LEASE", "60")),
    idem_min_replicas=int(os.environ.get("IDEM_TEST_MIN_REPLICAS", "0")),
    **redelivering_worker(VISIBILITY),
)


_ledger_client: redis.Redis | None = None


def ledger() -> redis.Redis:
    """The effect ledger (one client per process: prefork children make their own)."""
    global _ledger_client
    pid = os.getpid()
    if _ledger_client is None or getattr(_ledger_client, "_pid", None) != pid:
        _ledger_client = redis.Redis.from_url(LEDGER)
        _ledger_client._pid = pid  # type: ignore[attr-defined]
    return _ledger_client


def effect(name: str, **fields: Any) -> int:
    """Record one real execution of ``name``; returns how many there were so far."""
    return int(ledger().rpush(f"ledger:{name}", json.dumps({"pid": os.getpid(), **fields})))


class PaymentDeclined(Exception):
    """A failure worth caching: retrying would decline again."""


@app.task(base=IdempotentTask, bind=True, name="t.record")
def record(
    self: IdempotentTask, name: str, value: Any = None, pause: float = 0.0
) -> dict[str, Any]:
    effect(name, key=self.idempotency_key, fence=self.idempotency_fence, task_id=self.request.id)
    if pause:
        time.sleep(pause)
    return {"name": name, "value": value, "key": self.idempotency_key}


@app.task(base=IdempotentTask, bind=True, name="t.deduped", idem_dedupe_on_publish=True)
def deduped(self: IdempotentTask, name: str, pause: float = 0.0) -> dict[str, Any]:
    """Like ``record``, but duplicates are stopped at publish when the key is known."""
    effect(name, task_id=self.request.id)
    if pause:
        time.sleep(pause)
    return {"name": name, "task_id": self.request.id}


@app.task(base=IdempotentTask, bind=True, name="t.keyed", idem_require_key=True, max_retries=3)
def keyed(self: IdempotentTask, name: str, retry: bool = False) -> dict[str, Any]:
    """Needs an explicit key (``idem_require_key``); retries its first run when asked."""
    n = effect(name, key=self.idempotency_key, retries=self.request.retries)
    if retry and n == 1:
        raise self.retry(countdown=0)
    return {"name": name, "key": self.idempotency_key, "retries": self.request.retries}


@app.task(
    base=IdempotentTask, bind=True, name="t.send_email", idempotency_key="{user_id}:{template}"
)
def send_email(self: IdempotentTask, user_id: int, template: str, body: str = "") -> str:
    effect(f"email:{user_id}:{template}", body=body)
    return f"sent {template} to {user_id} ({self.idempotency_key})"


@app.task(
    base=IdempotentTask, name="t.welcome", idempotency_key=lambda user_id, **_: f"welcome:{user_id}"
)
def welcome(user_id: int, ledger_name: str) -> str:
    effect(ledger_name)
    return f"welcome {user_id}"


@app.task(base=IdempotentTask, bind=True, name="t.fail_first")
def fail_first(self: IdempotentTask, name: str) -> str:
    """Fails on its first execution, succeeds on the next: the key must be released."""
    if effect(name) == 1:
        raise ValueError(f"{name}: transient failure")
    return f"{name} ok"


@app.task(base=IdempotentTask, bind=True, name="t.declined", idem_cache_errors=(PaymentDeclined,))
def declined(self: IdempotentTask, name: str) -> str:
    effect(name)
    raise PaymentDeclined(f"card declined for {name}")


@app.task(base=IdempotentTask, bind=True, name="t.retry_once", max_retries=3)
def retry_once(self: IdempotentTask, name: str, countdown: float = 1.0) -> dict[str, Any]:
    n = effect(name, retries=self.request.retries, fence=self.idempotency_fence)
    if n == 1:
        raise self.retry(countdown=countdown)
    return {"retries": self.request.retries, "fence": self.idempotency_fence}


@app.task(
    base=IdempotentTask,
    bind=True,
    name="t.autoretry",
    autoretry_for=(ValueError,),
    default_retry_delay=1,
    max_retries=3,
)
def autoretry(self: IdempotentTask, name: str) -> str:
    if effect(name, retries=self.request.retries) == 1:
        raise ValueError("first try fails")
    return f"{name} after {self.request.retries} retries"


@app.task(base=IdempotentTask, name="t.unserializable")
def unserializable(name: str) -> object:
    effect(name)
    return object()


@app.task(base=IdempotentTask, name="t.big", idem_max_result_bytes=1000)
def big(name: str, size: int) -> str:
    effect(name)
    return "x" * size


@app.task(base=IdempotentTask, bind=True, name="t.slow", idem_lease=1)
def slow(self: IdempotentTask, name: str, seconds: float) -> dict[str, Any]:
    """Runs longer than its lease; renewal must keep every duplicate out."""
    effect(name, fence=self.idempotency_fence)
    time.sleep(seconds)
    return {"name": name, "fence": self.idempotency_fence}


@app.task(base=IdempotentTask, bind=True, name="t.compute")
def compute(
    self: IdempotentTask, name: str, seconds: float, yield_every: float = 0.0
) -> dict[str, Any]:
    """Like ``slow``, but computes (a pure-Python loop, no I/O) instead of sleeping.

    Threads still get the GIL in turn, but under gevent or eventlet nothing else in the
    worker runs until the body yields: with ``yield_every`` > 0 it sleeps 1 ms that often.
    """
    effect(name, fence=self.idempotency_fence)
    now = time.monotonic()
    end, pause_at = now + seconds, now + yield_every
    while now < end:
        sum(range(1000))
        now = time.monotonic()
        if yield_every and now >= pause_at:
            time.sleep(0.001)
            pause_at = now + yield_every
    return {"name": name, "fence": self.idempotency_fence}


@app.task(base=IdempotentTask, bind=True, name="t.wait_slow", idem_on_in_progress="wait")
def wait_slow(self: IdempotentTask, name: str, seconds: float) -> str:
    effect(name)
    time.sleep(seconds)
    return f"{name} done"


@app.task(base=IdempotentTask, bind=True, name="t.raise_slow", idem_on_in_progress="raise")
def raise_slow(self: IdempotentTask, name: str, seconds: float) -> str:
    effect(name)
    time.sleep(seconds)
    return f"{name} done"


@app.task(name="t.plain_collect")
def plain_collect(value: Any, name: str) -> Any:
    """A plain callback: records what it was called with."""
    effect(name, value=value)
    return value


# -- store fault scenarios (tests/faults/test_store_faults.py); names prefixed t.sf_ ----


@app.task(base=IdempotentTask, bind=True, name="t.sf_wait_flag")
def sf_wait_flag(
    self: IdempotentTask, name: str, flag: str, timeout: float = 60.0
) -> dict[str, Any]:
    """Runs until the test sets ``flag:<flag>`` in the ledger, then notes that it returned."""
    effect(name, fence=self.idempotency_fence, task_id=self.request.id)
    deadline = time.monotonic() + timeout
    while not ledger().exists(f"flag:{flag}"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the test never set flag {flag!r}")
        time.sleep(0.01)
    effect(f"{name}:returned", task_id=self.request.id)
    return {"name": name, "fence": self.idempotency_fence}


class SfArmed:
    """A value only pickle could keep; unpickling it anywhere writes ``unpickled:<name>``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self) -> tuple[Any, ...]:
        return (effect, (f"unpickled:{self.name}",))


SF_HUGE_BYTES = 50 * 1024 * 1024


@app.task(base=IdempotentTask, name="t.sf_hostile_result")
def sf_hostile_result(name: str, kind: str) -> Any:
    """Returns a result the store cannot keep: ``object``, ``set``, ``armed`` or ``huge``."""
    effect(name, kind=kind)
    if kind == "object":
        return object()
    if kind == "set":
        return {1, 2, 3}
    if kind == "armed":
        return SfArmed(name)
    if kind == "huge":
        return "x" * SF_HUGE_BYTES
    raise ValueError(f"unknown kind {kind!r}")


# -- worker fault scenarios (tests/faults/test_worker_faults.py); names prefixed t.wf_ --


class WfWatched(IdempotentTask):
    """Notes every delivery in ``ledger:<name>:delivered`` before the protocol runs.

    One entry per message handed to a task body's process (first delivery, a broker
    redelivery, a deferred duplicate coming back), with ``redelivered`` as the broker
    flagged it, so a test counts deliveries without asking the library.
    """

    abstract = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if not request.called_directly and args:
            effect(
                f"{args[0]}:delivered",
                task_id=request.id,
                redelivered=bool((request.delivery_info or {}).get("redelivered")),
                t=time.time(),
            )
        return super().__call__(*args, **kwargs)


@app.task(base=WfWatched, bind=True, name="t.wf_storm")
def wf_storm(self: IdempotentTask, name: str, value: Any, pause: float = 0.0) -> dict[str, Any]:
    """One effect per run in ``ledger:<name>`` (with its key), ``<name>:end`` once done."""
    fields = {"key": self.idempotency_key, "fence": self.idempotency_fence}
    effect(name, task_id=self.request.id, **fields)
    if pause:
        time.sleep(pause)
    effect(f"{name}:end", **fields)
    return {"value": value, **fields}


@app.task(base=WfWatched, bind=True, name="t.wf_hold")
def wf_hold(self: IdempotentTask, name: str, value: Any = None) -> dict[str, Any]:
    """Claims, notes ``<name>:claimed``, holds while ``ledger:<name>:hold`` exists, then
    writes its one effect in ``ledger:<name>``: a kill while holding is before the effect.
    """
    fields = {"fence": self.idempotency_fence, "task_id": self.request.id}
    effect(f"{name}:claimed", t=time.time(), **fields)
    deadline = time.monotonic() + 60.0
    while ledger().exists(f"ledger:{name}:hold") and time.monotonic() < deadline:
        time.sleep(0.01)
    effect(name, **fields)
    return {"name": name, "value": value, "fence": self.idempotency_fence}


class WfDieAfterComplete(WfWatched):
    """SIGKILLs its own process once per name, right after a completed execution.

    That is after ``IdempotentTask.__call__`` returned (the idempotency record is
    completed) and before Celery's tracer stores the result in the backend and the
    worker acks the message (``task_acks_late``); ``task_reject_on_worker_lost``
    requeues it. (Later, from ``on_success``/``task_postrun``, is too late to get a
    redelivery: Celery 5.7 sees SUCCESS in the backend and acks the lost message.)
    """

    abstract = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        retval = super().__call__(*args, **kwargs)
        if not self.request.called_directly and ledger().set(
            f"ledger:{args[0]}:died", os.getpid(), nx=True
        ):
            os.kill(os.getpid(), signal.SIGKILL)
        return retval


@app.task(base=WfDieAfterComplete, bind=True, name="t.wf_die_after_complete")
def wf_die_after_complete(self: IdempotentTask, name: str) -> dict[str, Any]:
    effect(name, fence=self.idempotency_fence, task_id=self.request.id)
    return {"name": name, "fence": self.idempotency_fence}


@app.task(base=WfWatched, bind=True, name="t.wf_long", idem_lease=1)
def wf_long(self: IdempotentTask, name: str, seconds: float) -> dict[str, Any]:
    """Runs ``seconds`` under a 1 s lease; only renewal keeps duplicates out."""
    effect(name, fence=self.idempotency_fence, task_id=self.request.id)
    time.sleep(seconds)
    effect(f"{name}:end", fence=self.idempotency_fence, t=time.time())
    return {"name": name, "fence": self.idempotency_fence}


# -- composition (tests/integration/test_composition.py, tests/faults/test_composition_faults.py);
#    names prefixed t.cp_ ----------------------------------------------------------------


@app.task(name="t.cp_add1")
def cp_add1(x: int, name: str) -> int:
    """A plain first step of a chain."""
    effect(name, x=x)
    return x + 1


@app.task(base=IdempotentTask, name="t.cp_double", idem_dedupe_on_publish=True)
def cp_double(x: int, name: str) -> int:
    """Deduplicated at publish: a completed key is not sent again (unless it must be)."""
    effect(name, x=x)
    return 2 * x


@app.task(base=IdempotentTask, bind=True, name="t.cp_target")
def cp_target(self: IdempotentTask, name: str, n: int, pause: float = 0.0) -> int:
    """An idempotent replacement: its side effect must not run twice either."""
    effect(name, n=n, task_id=self.request.id)
    if pause:
        time.sleep(pause)
    return n * 10


@app.task(bind=True, name="t.cp_plain_target")
def cp_plain_target(self: Any, name: str, n: int, pause: float = 0.0) -> int:
    """A plain replacement."""
    effect(name, n=n, task_id=self.request.id)
    if pause:
        time.sleep(pause)
    return n * 10


@app.task(bind=True, name="t.cp_fragile_target")
def cp_fragile_target(self: Any, name: str, n: int, pause: float = 0.0) -> int:
    """A plain replacement that fails its first run and succeeds after."""
    if effect(name, n=n, task_id=self.request.id) == 1:
        raise ValueError(f"{name}: the replacement failed")
    return n * 10


_TARGETS = {"idem": cp_target, "plain": cp_plain_target, "fragile": cp_fragile_target}


@app.task(base=IdempotentTask, bind=True, name="t.cp_replacer")
def cp_replacer(self: IdempotentTask, name: str, n: int, target: str = "idem") -> Any:
    """Runs once, then replaces itself with ``cp_target`` (or another of ``_TARGETS``)."""
    effect(name, task_id=self.request.id)
    queue = (self.request.delivery_info or {}).get("routing_key")  # the test's own queue
    return self.replace(_TARGETS[target].s(f"{name}:target", n, 1.0).set(queue=queue))


@app.task(base=IdempotentTask, bind=True, name="t.cp_reject")
def cp_reject(self: IdempotentTask, name: str) -> str:
    """Rejects its first delivery back to the queue; the requeued message must run."""
    if effect(name, task_id=self.request.id) == 1:
        raise Reject("not yet", requeue=True)
    return f"{name} ok"


@app.task(base=IdempotentTask, bind=True, name="t.cp_ignore")
def cp_ignore(self: IdempotentTask, name: str) -> str:
    """Ignores its first execution (no state); a later duplicate must run."""
    if effect(name, task_id=self.request.id) == 1:
        raise Ignore()
    return f"{name} ok"


@app.task(base=IdempotentTask, bind=True, name="t.cp_charge", max_retries=3)
def cp_charge(self: IdempotentTask, order: str, cents: int) -> str:
    """The deterministic-task-id idiom: retries its first attempt after 2 s."""
    effect(f"charge:{order}", cents=cents, retries=self.request.retries)
    if self.request.retries == 0:
        raise self.retry(countdown=2)
    return f"charged {cents}"


@app.task(base=IdempotentTask, bind=True, name="t.cp_retry_nothrow", max_retries=3)
def cp_retry_nothrow(self: IdempotentTask, name: str) -> str:
    """``self.retry(throw=False)``, then returns: the retry must still run the body."""
    if effect(name, retries=self.request.retries) == 1:
        self.retry(countdown=0, throw=False)
        return "first"
    return "second"


@app.task(base=IdempotentTask, name="t.cp_untyped", typing=False, idem_dedupe_on_publish=True)
def cp_untyped(x: int, y: int) -> int:
    """``typing=False``: arguments are not checked when sending."""
    return x + y


DEEP = 600
"""Nesting depth JSON carries but no canonical encoding takes."""


def nested(depth: int) -> list[Any]:
    out: list[Any] = []
    for _ in range(depth):
        out = [out]
    return out


@app.task(base=IdempotentTask, bind=True, name="t.cp_retry_deep", max_retries=3)
def cp_retry_deep(self: IdempotentTask, name: str, payload: Any = None) -> int:
    """Retries with an argument that has no canonical encoding; its key is carried."""
    if effect(name) == 1:
        raise self.retry(args=(name, nested(DEEP)), countdown=0)
    depth = 0
    while isinstance(payload, list) and payload:
        payload, depth = payload[0], depth + 1
    return depth


@app.task(base=IdempotentTask, bind=True, name="t.cp_poison", idem_lease=1, idem_max_takeovers=2)
def cp_poison(self: IdempotentTask, name: str) -> str:
    """Kills its own worker process while ``ledger:<name>:poison`` exists."""
    effect(name, fence=self.idempotency_fence, task_id=self.request.id)
    if ledger().exists(f"ledger:{name}:poison"):
        os.kill(os.getpid(), signal.SIGKILL)
    return f"{name} survived"


def _note_quarantine(sender: Any = None, **fields: Any) -> None:
    effect(f"quarantined:{fields['key']}", takeovers=fields["takeovers"])


idem_signals.quarantined.connect(_note_quarantine, weak=False)


def _note_wait(sender: Any = None, **fields: Any) -> None:
    effect(f"waits:{fields['key']}", task_id=fields["task_id"], retry_in=fields["retry_in"])


idem_signals.duplicate_in_progress.connect(_note_wait, weak=False)


class CpDieAfterDispatch(WfWatched):
    """SIGKILLs its own process once per name, after Celery sent the callbacks and chain
    and ``IdempotentTask.on_success`` marked them sent; with ``ignore_result`` Celery
    then requeues the lost message (no SUCCESS in the backend to tell it otherwise)."""

    abstract = True

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        super().on_success(retval, task_id, args, kwargs)
        if ledger().set(f"ledger:{args[0]}:died", os.getpid(), nx=True):
            os.kill(os.getpid(), signal.SIGKILL)


@app.task(base=CpDieAfterDispatch, bind=True, name="t.cp_die_after_dispatch", ignore_result=True)
def cp_die_after_dispatch(self: IdempotentTask, name: str) -> dict[str, Any]:
    effect(name, fence=self.idempotency_fence, task_id=self.request.id)
    return {"name": name, "fence": self.idempotency_fence}


# -- idem_fingerprint and idem_scope (tests/integration/test_fingerprint_scope.py);
#    names prefixed t.fs_ ------------------------------------------------------------

FS_LEAVE_OUT = ["event.delivery_attempt", "received_at"]
"""What a webhook's redelivery changes and the request does not."""


def _fs_deliver(
    task: IdempotentTask, name: str, event: dict[str, Any], received_at: str
) -> dict[str, Any]:
    run = effect(name, attempt=event["delivery_attempt"], task_id=task.request.id)
    return {"email": event["data"]["email"], "run": run, "task_id": task.request.id}


@app.task(base=IdempotentTask, bind=True, name="t.fs_event", idem_fingerprint=FS_LEAVE_OUT)
def fs_event(
    self: IdempotentTask, name: str, event: dict[str, Any], received_at: str
) -> dict[str, Any]:
    """A webhook handler whose duplicates differ in their delivery counter and time."""
    return _fs_deliver(self, name, event, received_at)


@app.task(base=IdempotentTask, bind=True, name="t.fs_event_strict")
def fs_event_strict(
    self: IdempotentTask, name: str, event: dict[str, Any], received_at: str
) -> dict[str, Any]:
    """The same handler without idem_fingerprint: every argument is the request."""
    return _fs_deliver(self, name, event, received_at)


@app.task(base=IdempotentTask, bind=True, name="t.fs_send_email")
def fs_send_email(self: IdempotentTask, name: str, user: int) -> dict[str, Any]:
    """A task before its rename."""
    effect(name, task=self.name)
    return {"user": user, "task_id": self.request.id, "task": self.name}


@app.task(base=IdempotentTask, bind=True, name="t.fs_mail.send_email", idem_scope="t.fs_send_email")
def fs_send_email_renamed(self: IdempotentTask, name: str, user: int) -> dict[str, Any]:
    """The same task after its rename, keeping its former name's key space."""
    effect(name, task=self.name)
    return {"user": user, "task_id": self.request.id, "task": self.name}


@app.task(base=IdempotentTask, bind=True, name="t.fs_mail.send_other")
def fs_send_other(self: IdempotentTask, name: str, user: int) -> dict[str, Any]:
    """Renamed without idem_scope: a key space of its own."""
    effect(name, task=self.name)
    return {"user": user, "task_id": self.request.id, "task": self.name}
