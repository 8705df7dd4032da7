"""The completion that is not waited for: sent in the task's thread, answered later.

The renewer side (``Renewer.complete_later``) with a private renewer and a store whose
answers the test scripts; the wire side (``celery_idem.store.wire``) against the
suite's redis-server, including a reply lost with its connection.
"""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis

from celery_idem import IdempotentTask
from celery_idem.exceptions import IdempotencyError, StoreUnavailable
from celery_idem.keys import storage_key
from celery_idem.renewer import MAX_UNREAD, Completion, Lease, Renewer, renewer
from celery_idem.store import ClaimRequest, CompleteRequest, MemoryStore, RecordKind, Stored
from celery_idem.store.base import Settled
from celery_idem.store.redis import RedisStore
from celery_idem.store.wire import pack
from celery_idem.task import invalidate_settings
from celery_idem.task.headers import HEADER
from devtools.processes import wait_for
from tests.integration.conftest import with_db
from tests.unit.conftest import STORE_DB, make_app

RESULT = Stored(RecordKind.RESULT, b'"ok"', "j")


class Answer:
    """A PendingCompletion whose answer the test decides (a value or an error)."""

    def __init__(self, answer: bool | Exception) -> None:
        self.answer = answer
        self.reads = 0

    def result(self) -> bool:
        self.reads += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


class Told:
    """What a completion reported: lost, failed (and from which thread)."""

    def __init__(self) -> None:
        self.lost: list[str] = []
        self.failed: list[IdempotencyError] = []

    def completion(self, pending: Any, resend: Callable[[], bool]) -> Completion:
        return Completion(
            pending,
            resend=resend,
            on_lost=lambda: self.lost.append(threading.current_thread().name),
            on_failed=self.failed.append,
        )


def lease(renewer: Renewer, seconds: float = 1.0) -> Lease:
    return renewer.add(Lease(MemoryStore(), "k", "t", seconds, lambda _l: None))


def test_the_next_claim_in_the_same_thread_reads_the_answer() -> None:
    renewer, told = Renewer(), Told()
    held = lease(renewer, 60.0)
    answer = Answer(True)
    renewer.complete_later(held, told.completion(answer, resend=lambda: True))
    assert answer.reads == 0  # not waited for
    renewer.settle_sent()
    assert answer.reads == 1
    assert held.cancelled  # the lease is let go once the answer confirms it
    renewer.settle_sent()
    assert answer.reads == 1
    assert (told.lost, told.failed) == ([], [])


def test_a_refused_completion_is_reported_as_a_lost_lease() -> None:
    renewer, told = Renewer(), Told()
    renewer.complete_later(lease(renewer, 60.0), told.completion(Answer(False), lambda: True))
    renewer.settle_sent()
    assert told.lost == [threading.current_thread().name]


def test_without_a_next_claim_the_renewal_thread_reads_it_when_the_lease_is_due() -> None:
    renewer, told = Renewer(), Told()
    held = lease(renewer, 1.0)  # due after lease/3
    answer = Answer(False)
    renewer.complete_later(held, told.completion(answer, resend=lambda: True))
    wait_for(lambda: told.lost, timeout=10, message="the renewal thread read the answer")
    assert told.lost == ["celery-idem-renewer"]
    assert answer.reads == 1


def test_a_lost_answer_is_sent_again_by_the_renewal_thread() -> None:
    renewer, told = Renewer(), Told()
    held = lease(renewer, 60.0)
    resent: list[str] = []

    def resend() -> bool:
        resent.append(threading.current_thread().name)
        return True

    renewer.complete_later(held, told.completion(Answer(StoreUnavailable("gone")), resend))
    renewer.settle_sent()  # the answer is lost: handed to the renewal thread, not retried here
    wait_for(lambda: held.cancelled, timeout=10, message="sent again and confirmed")
    assert resent == ["celery-idem-renewer"]
    assert (told.lost, told.failed) == ([], [])


def test_a_completion_not_confirmed_while_the_lease_lasts_is_reported_failed() -> None:
    renewer, told = Renewer(), Told()
    held = lease(renewer, 1.0)

    def down() -> bool:
        raise StoreUnavailable("still down")

    renewer.complete_later(held, told.completion(Answer(StoreUnavailable("gone")), down))
    renewer.settle_sent()
    wait_for(lambda: told.failed, timeout=15, message="given up after the lease")
    assert isinstance(told.failed[0], StoreUnavailable)
    assert held.cancelled


def test_a_process_exit_settles_every_completion() -> None:
    renewer, told = Renewer(), Told()
    answers = [Answer(True), Answer(False)]
    for answer in answers:
        renewer.complete_later(lease(renewer, 60.0), told.completion(answer, lambda: True))
    renewer.settle_all()
    assert [a.reads for a in answers] == [1, 1]
    assert len(told.lost) == 1


# -- the wire ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 10, 6001, 100_000])
def test_pack_is_the_protocol_redis_py_writes(size: int) -> None:
    conn = redis.Connection()  # packs without connecting
    args: list[Any] = ["key", "tok", 12, 3.5, b"x" * size, ""]
    ours = b"".join(pack(b"$4\r\nECHO\r\n", 1, args[4:5]))
    assert ours == b"".join(conn.pack_command("ECHO", args[4]))
    full = b"".join(pack(b"$7\r\nEVALSHA\r\n", 1, args))
    assert full == b"".join(conn.pack_command("EVALSHA", *args))


def claimed(store: RedisStore) -> CompleteRequest:
    """A fresh key claimed by attempt ``t``, and the request that completes it."""
    key = f"wire:{uuid.uuid4().hex}"
    out = store.claim(
        ClaimRequest(key, token="t", task_id="id", fingerprint="", lease=60.0, ttl=60.0)
    )
    return CompleteRequest(key, token="t", fence=out.fence, task_id="id", stored=RESULT, ttl=60)


def test_the_first_completion_of_a_process_is_waited_for(redis_url: str) -> None:
    """The server may not have the script yet: a NOSCRIPT must not wait to be read."""
    store = RedisStore.from_url(redis_url)
    store.client.script_flush()  # a restarted server, or this process's first call
    first = store.send_completion(claimed(store))
    assert isinstance(first, Settled)
    assert first.result() is True
    assert not isinstance(store.send_completion(claimed(store)), Settled)


def test_a_sent_completion_whose_connection_dropped_is_asked_again(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url)
    store.send_completion(claimed(store)).result()  # the server knows the script now
    request = claimed(store)
    key = request.key
    pending = store.send_completion(request)
    # The reply is lost: the held connection breaks before anyone reads it.
    pending.sent._connection._sock.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]
    assert pending.result() is True  # asked again: the same attempt's completion stands
    record = store.read(key)
    assert record is not None
    assert record.stored == RESULT
    store.forget(key)


def test_a_process_leaves_at_most_max_unread_completions_unread() -> None:
    """Threads that never claim again (a greenlet per task) must not hold a connection each."""
    renewer, told = Renewer(), Told()
    answers = [Answer(True) for _ in range(MAX_UNREAD + 5)]
    threads = [
        threading.Thread(
            target=renewer.complete_later,
            args=(lease(renewer, 60.0), told.completion(answer, lambda: True)),
        )
        for answer in answers
    ]
    for thread in threads:  # one thread per completion, none claims again
        thread.start()
        thread.join()
    assert sum(a.reads for a in answers) == 5  # the oldest five were read
    assert [a.reads for a in answers[:5]] == [1] * 5


# -- the task's side ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("blocking", "calls"), [(False, ["send_completion"]), (True, ["complete"])]
)
def test_a_worker_run_sends_its_completion_unless_idem_blocking_completion(
    redis_url: str,
    key_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    blocking: bool,
    calls: list[str],
) -> None:
    app = make_app("completion")
    app.conf.task_always_eager = False
    app.conf.update(idem_redis_url=with_db(redis_url, STORE_DB), idem_key_prefix=key_prefix)
    invalidate_settings()

    @app.task(
        base=IdempotentTask, bind=True, shared=False, name=f"{app.main}.job",
        idem_blocking_completion=blocking,
    )  # fmt: skip
    def job(self: Any, x: str) -> str:
        return f"done {x}"

    def run_as_a_worker(x: str) -> None:
        """What the worker's tracer does: a request that is neither eager nor direct."""
        job.push_request(
            id=str(uuid.uuid4()), args=(x,), kwargs={}, is_eager=False, called_directly=False,
            headers={HEADER: x},
        )  # fmt: skip
        try:
            assert job(x) == f"done {x}"
        finally:
            job.pop_request()

    try:
        run_as_a_worker("warm")  # a process's first completion is waited for either way
        renewer.settle_sent()
        store = job.idem_spec().store
        seen: list[str] = []
        for name in ("complete", "send_completion"):
            original = getattr(store, name)
            monkeypatch.setattr(
                store, name, lambda r, _o=original, _n=name: seen.append(_n) or _o(r)
            )
        key = uuid.uuid4().hex
        run_as_a_worker(key)
        assert seen == calls
        renewer.settle_sent()  # what the next claim of this thread does first
        assert seen == calls  # the answer was read, not asked for again
        record = store.read(storage_key(key_prefix, job.name, key))
        assert record is not None
        assert record.stored is not None
        assert record.stored.payload == f'"done {key}"'.encode()
    finally:
        invalidate_settings()


def test_a_lost_script_is_loaded_where_the_call_goes(store_server: Any, redis_url: str) -> None:
    """After a failover the pool may still hold a connection to the restarted old primary.

    Loaded through the pool, the script reached that server, and the call, on the new
    primary, met ``NOSCRIPT`` again: CI saw a Sentinel failover refuse a claim so. The
    load must go down the connection of the call.
    """
    store = RedisStore.from_url(store_server.url())
    claimed(store)  # the wire now holds a connection to the "new primary"
    store.client.script_flush()  # ... which has no scripts (it was a replica)
    # The pool's next connection points at another server: the old primary, restarted.
    stale = store.client.connection_pool.get_connection(
        *(("EVALSHA",) if store.wire and store.wire._checkout else ())
    )
    elsewhere = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs
    stale.disconnect()
    stale.host, stale.port = elsewhere["host"], elsewhere["port"]  # where it reconnects
    store.client.connection_pool.release(stale)
    request = claimed(store)  # NOSCRIPT on the wire's connection: loaded there, run there
    assert store.read(request.key) is not None
