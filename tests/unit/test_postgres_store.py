"""PostgresStore beyond the store contract: schema, outages, races, purge, transactions.

``tests/contract`` runs every store test on PostgreSQL too; this file covers what only
PostgreSQL has: the schema and its check, psycopg's errors, two first claims racing for
a row that does not exist yet, purging expired rows, and the completion (and step)
statement run inside a caller's own transaction.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from celery_idem.exceptions import IdempotencyConfigError, IdempotencyError, StoreUnavailable
from celery_idem.store import ClaimRequest, ClaimState, CompleteRequest, RecordKind, Stored
from celery_idem.store.base import ReserveRequest, StepRequest
from celery_idem.store.postgres import PostgresStore
from celery_idem.store.postgres_admin import (
    SCHEMA_VERSION,
    STATEMENT_MARKER,
    drop_statements,
    glob_prefix,
    migrate,
    migration_statements,
    prefix_end,
    purge,
)
from celery_idem.store.postgres_base import (
    cursor_key,
    display_url,
    is_outage,
    scan_cursor,
)
from devtools.pg_server import PostgresServer, PostgresServerError
from devtools.processes import wait_for

pytestmark = pytest.mark.postgres  # some start a private server: not the pg_server fixture

RESULT = Stored(RecordKind.RESULT, b'{"ok": 1}', "j")


def request(key: str, token: str = "t1", task_id: str = "id-1", **kw: Any) -> ClaimRequest:
    kw.setdefault("fingerprint", "fp")
    kw.setdefault("lease", 10.0)
    kw.setdefault("ttl", 30.0)
    return ClaimRequest(key, token=token, task_id=task_id, **kw)


def completion(key: str, fence: int, token: str = "t1", task_id: str = "id-1") -> CompleteRequest:
    return CompleteRequest(key, token=token, fence=fence, task_id=task_id, stored=RESULT, ttl=30)


@pytest.fixture(scope="module")
def migrated_url(pg_url: str) -> str:
    migrate(pg_url)  # harmless when the contract suite did it already
    return pg_url


@pytest.fixture
def store(migrated_url: str) -> Iterator[PostgresStore]:
    store = PostgresStore.from_url(migrated_url)
    yield store
    store.close()


@pytest.fixture
def key() -> str:
    return f"u-{uuid.uuid4().hex[:10]}:k"


def sql(url: str, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    psycopg = pytest.importorskip("psycopg")
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(statement, params or None)
        return cursor.fetchall() if cursor.description else []


# --------------------------------------------------------------------------- pure parts


def test_the_schema_splits_into_runnable_statements() -> None:
    statements = migration_statements()
    assert len(statements) > 20
    for statement in statements:
        assert STATEMENT_MARKER not in statement
        assert "%" not in statement  # a driver interpolating parameters leaves it alone
        assert not any(line.lstrip().startswith("\\") for line in statement.splitlines())
    for statement in statements:
        code = [line for line in statement.splitlines() if not line.startswith("--")]
        assert code[0].split()[0] in ("CREATE", "ALTER", "INSERT"), code[0]
    assert f"VALUES (true, {SCHEMA_VERSION})" in statements[-1]
    assert all(s.startswith("DROP ") for s in drop_statements())


def test_outages_are_told_from_refusals_by_sqlstate() -> None:
    psycopg = pytest.importorskip("psycopg")
    for state in ("57P01", "57P03", "08006", "53300", "53400", "25P03", "40001", "25006"):
        assert is_outage(psycopg.errors.lookup(state)("x")), state
    for state in ("42601", "42883", "23505", "22021"):
        assert not is_outage(psycopg.errors.lookup(state)("x")), state
    assert is_outage(psycopg.OperationalError("connection refused"))  # no SQLSTATE
    assert is_outage(psycopg.InterfaceError("the connection is closed"))
    assert not is_outage(psycopg.ProgrammingError("wrong number of parameters"))


def test_urls_are_shown_without_their_password() -> None:
    assert display_url("postgresql://u:secret@h:5432/db") == "postgresql://u:**@h:5432/db"
    shown = display_url("postgres://h/db?user=u&password=secret&sslmode=require")
    assert "secret" not in shown
    assert "sslmode=require" in shown


def test_scan_bounds_and_cursors() -> None:
    assert glob_prefix("idem:ab?def:*") == "idem:ab"
    assert glob_prefix("a\\*b*") == "a*b"
    assert glob_prefix("*") == ""
    assert prefix_end("idem:") == "idem;"
    assert prefix_end("a\U0010ffff") == "b"
    assert prefix_end("") is None
    for key in ("idem:x", "é:\U0001f600", "a"):
        assert cursor_key(scan_cursor(key)) == key
    assert cursor_key(0) == ""


def test_without_psycopg_the_modules_import_and_the_store_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` now fails
    with pytest.raises(IdempotencyConfigError, match=r"celery-idem\[postgres\]"):
        PostgresStore.from_url("postgresql://localhost/db")


def test_from_url_refuses_a_url_of_another_store() -> None:
    with pytest.raises(IdempotencyConfigError, match="not a PostgreSQL URL"):
        PostgresStore.from_url("redis://:secret@redis.internal:6380/0")


# --------------------------------------------------------------------------- the schema


def test_migrate_creates_the_schema_and_twice_is_harmless(fresh_pg_url: str) -> None:
    first = migrate(fresh_pg_url)
    assert first.startswith(f"created the celery-idem schema (version {SCHEMA_VERSION})")
    second = migrate(fresh_pg_url)
    assert f"already at version {SCHEMA_VERSION}" in second
    store = PostgresStore.from_url(fresh_pg_url)
    try:
        assert store.claim(request("k")).state is ClaimState.CLAIMED
        migrate(fresh_pg_url)  # records survive a migration
        assert store.read("k") is not None
    finally:
        store.close()
    assert sql(fresh_pg_url, "SELECT version FROM celery_idem_schema") == [(SCHEMA_VERSION,)]


def test_a_database_without_the_schema_is_refused_with_what_to_run(fresh_pg_url: str) -> None:
    store = PostgresStore.from_url(fresh_pg_url)
    database = fresh_pg_url.rsplit("/", 1)[1]
    try:
        for attempt in (lambda: store.claim(request("k")), lambda: store.probe(2.0)):
            with pytest.raises(IdempotencyConfigError) as info:
                attempt()
            message = str(info.value)
            assert database in message
            assert "celery_idem_records" in message
            assert "celery -A proj idem migrate" in message
            assert "python manage.py migrate celery_idem" in message
        migrate(fresh_pg_url)
        store.probe(2.0)
        assert store.claim(request("k")).state is ClaimState.CLAIMED
    finally:
        store.close()


def test_an_older_schema_is_refused_until_migrated(fresh_pg_url: str) -> None:
    migrate(fresh_pg_url)
    sql(fresh_pg_url, "UPDATE celery_idem_schema SET version = 0")
    store = PostgresStore.from_url(fresh_pg_url)
    try:
        with pytest.raises(IdempotencyConfigError, match="version 0, older than the version 1"):
            store.claim(request("k"))
        assert "from version 0 to 1" in migrate(fresh_pg_url)
        assert store.claim(request("k")).state is ClaimState.CLAIMED
    finally:
        store.close()


def test_migrate_leaves_a_newer_schema_alone(fresh_pg_url: str) -> None:
    migrate(fresh_pg_url)
    sql(fresh_pg_url, "UPDATE celery_idem_schema SET version = 99")
    with pytest.raises(IdempotencyConfigError, match="version 99, newer"):
        migrate(fresh_pg_url)
    assert sql(fresh_pg_url, "SELECT version FROM celery_idem_schema") == [(99,)]


def test_drop_statements_remove_the_schema(fresh_pg_url: str) -> None:
    migrate(fresh_pg_url)
    for statement in drop_statements():
        sql(fresh_pg_url, statement)
    left = sql(
        fresh_pg_url,
        "SELECT count(*) FROM pg_proc WHERE proname LIKE 'celery%%idem%%' UNION ALL "
        "SELECT count(*) FROM pg_class WHERE relname LIKE 'celery%%idem%%'",
    )
    assert left == [(0,), (0,)]
    assert migrate(fresh_pg_url).startswith("created")


# --------------------------------------------------------------------------- outages


def test_a_stopped_server_is_store_unavailable_naming_the_key_not_the_password() -> None:
    pytest.importorskip("psycopg")
    try:
        server = PostgresServer().start()
    except PostgresServerError as exc:
        pytest.skip(f"no PostgreSQL to start: {exc}")
    try:
        url = server.create_database("outage").replace("postgres@", "postgres:s3cret@")
        migrate(url)
        store = PostgresStore.from_url(url)
        assert store.claim(request("k1")).state is ClaimState.CLAIMED  # a pooled connection
        server.stop()
        for attempt in (
            lambda: store.claim(request("k2")),
            lambda: store.renew("k2", token="t", lease=1),
        ):
            with pytest.raises(StoreUnavailable) as info:
                attempt()
            message = str(info.value)
            assert "'k2'" in message
            assert f"127.0.0.1:{server.port}" in message
            assert "s3cret" not in message
            assert info.value.key == "k2"
        with pytest.raises(StoreUnavailable, match="connect"):
            store.probe(1.0)
        server.start()  # same port, same data
        # The pooled connections died with the server: the next call replaces them.
        assert store.claim(request("k1")).state is ClaimState.CLAIMED
        server.restart()
        assert store.complete(completion("k1", store.read("k1").fence))  # type: ignore[union-attr]
        store.close()
    finally:
        server.close()


# --------------------------------------------------------------------------- races


def race(store: PostgresStore, key: str, threads: int) -> list[ClaimState]:
    """``threads`` attempts claiming ``key`` at once (a barrier releases them together)."""
    barrier = threading.Barrier(threads)
    states: list[ClaimState] = []
    lock = threading.Lock()

    def go(i: int) -> None:
        barrier.wait(5)
        out = store.claim(request(key, token=f"t{i}", task_id=f"id-{i}", fingerprint=""))
        with lock:
            states.append(out.state)

    workers = [threading.Thread(target=go, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(20)
    return states


def test_concurrent_first_claims_of_a_new_key_have_one_winner(store: PostgresStore) -> None:
    threads = 8
    for round_ in range(5):
        states = race(store, f"race-{uuid.uuid4().hex[:8]}-{round_}", threads)
        assert states.count(ClaimState.CLAIMED) == 1, states
        assert states.count(ClaimState.IN_PROGRESS) == threads - 1, states


def test_concurrent_first_reservations_of_a_new_key_have_one_winner(store: PostgresStore) -> None:
    key = f"race-{uuid.uuid4().hex[:8]}"
    barrier = threading.Barrier(6)
    answers: list[Any] = []

    def go(i: int) -> None:
        barrier.wait(5)
        answers.append(store.reserve(ReserveRequest(key, task_id=f"s{i}", fingerprint="", hold=10)))

    workers = [threading.Thread(target=go, args=(i,)) for i in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(20)
    assert sorted(a.state.name for a in answers) == ["IN_PROGRESS"] * 5 + ["RESERVED"]


# --------------------------------------------------------------------------- purge


def test_purge_deletes_expired_rows_in_batches_and_keeps_the_rest(
    fresh_pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    migrate(fresh_pg_url)
    store = PostgresStore.from_url(fresh_pg_url)
    try:
        for i in range(7):
            out = store.claim(request(f"old{i}"))
            assert store.complete(CompleteRequest(
                f"old{i}", token="t1", fence=out.fence, task_id="id-1", stored=RESULT, ttl=0.05
            ))  # fmt: skip
        store.claim(request("live", lease=30))
        time.sleep(0.2)
        calls: list[int] = []
        original = PostgresStore.call

        def counted(self: PostgresStore, *args: Any, **kwargs: Any) -> Any:
            rows = original(self, *args, **kwargs)
            calls.append(rows[0][0])
            return rows

        monkeypatch.setattr(PostgresStore, "call", counted)
        assert purge(store, batch=3) == 7
        assert calls == [3, 3, 1]  # one short transaction per batch
        monkeypatch.undo()
        assert sql(fresh_pg_url, "SELECT key FROM celery_idem_records") == [("live",)]
        assert purge(fresh_pg_url) == 0
        assert store.read("live") is not None
    finally:
        store.close()
    with pytest.raises(ValueError, match="batch"):
        purge(fresh_pg_url, batch=0)


# --------------------------------------------------------------------------- transactions


def test_a_completion_in_a_rolled_back_transaction_leaves_the_key_in_progress(
    store: PostgresStore, migrated_url: str, key: str
) -> None:
    psycopg = pytest.importorskip("psycopg")
    out = store.claim(request(key))
    statement, params = PostgresStore.completion_statement(completion(key, out.fence))
    with psycopg.connect(migrated_url) as conn:  # not autocommit: the caller's transaction
        assert conn.execute(statement, params).fetchall() == [(True,)]
        conn.rollback()
        record = store.read(key)
        assert record is not None
        assert (record.state, record.stored) == ("P", None)
        stale = PostgresStore.completion_statement(completion(key, out.fence, token="zz"))
        assert conn.execute(*stale).fetchall() == [(False,)]
        conn.rollback()
        assert conn.execute(statement, params).fetchall() == [(True,)]
        conn.commit()
    duplicate = store.claim(request(key, token="t2", task_id="id-2"))
    assert (duplicate.state, duplicate.stored, duplicate.task_id) == (
        ClaimState.COMPLETED, RESULT, "id-1"
    )  # fmt: skip


def test_a_duplicate_does_not_wait_for_the_callers_transaction_nor_see_it_uncommitted(
    store: PostgresStore, migrated_url: str, key: str
) -> None:
    """A duplicate's claim reads a live holder's row without its lock: it writes nothing."""
    psycopg = pytest.importorskip("psycopg")
    out = store.claim(request(key))
    with psycopg.connect(migrated_url) as conn:
        conn.execute(*PostgresStore.completion_statement(completion(key, out.fence)))
        # The row is locked by the caller's open transaction: the duplicate is answered
        # at once, with the row as committed (in progress), not blocked on the lock.
        assert store.claim(request(key, token="t2")).state is ClaimState.IN_PROGRESS
        conn.commit()
    assert store.claim(request(key, token="t2")).state is ClaimState.COMPLETED
    # ...and answering it took no transaction id: a read-only claim never waits for a
    # WAL flush at its commit.
    xid_before = store.call(None, "SELECT pg_current_xact_id()::text::bigint", ())[0][0]
    for _ in range(5):
        assert store.claim(request(key, token="t3")).state is ClaimState.COMPLETED
    xid_after = store.call(None, "SELECT pg_current_xact_id()::text::bigint", ())[0][0]
    assert xid_after - xid_before == 1  # the second probe's own id: the claims took none


def test_a_step_statement_commits_with_the_callers_transaction(
    store: PostgresStore, migrated_url: str, key: str
) -> None:
    psycopg = pytest.importorskip("psycopg")
    store.claim(request(key))

    def step(position: int, token: str = "t1") -> StepRequest:
        return StepRequest(
            key, token=token, position=position, name="order", occurrence=position,
            codec="j", value=b'{"row": 7}',
        )  # fmt: skip

    with psycopg.connect(migrated_url) as conn:
        assert conn.execute(*PostgresStore.step_statement(step(1))).fetchall() == [(True,)]
        conn.rollback()
        assert store.read(key).steps == ()  # type: ignore[union-attr]
        assert conn.execute(*PostgresStore.step_statement(step(1, "zz"))).fetchall() == [(False,)]
        assert conn.execute(*PostgresStore.step_statement(step(1))).fetchall() == [(True,)]
        conn.commit()
        with pytest.raises(psycopg.Error, match="fewer than step order"):
            conn.execute(*PostgresStore.step_statement(step(3)))
        conn.rollback()
    assert [s.label for s in store.read(key).steps] == ["order"]  # type: ignore[union-attr]
    with pytest.raises(IdempotencyError, match="fewer durable steps"):
        store.step(step(3))


def test_a_row_locked_by_a_transaction_that_does_not_end_fails_the_call_instead_of_hanging(
    migrated_url: str, key: str
) -> None:
    """The store's statements wait at most ``lock_timeout`` (10 s unless the URL says)."""
    psycopg = pytest.importorskip("psycopg")
    default = PostgresStore.from_url(migrated_url)
    assert default.call(None, "SHOW lock_timeout", ()) == [("10s",)]
    default.close()
    impatient = PostgresStore.from_url(f"{migrated_url}?options=-c%20lock_timeout%3D200")
    out = impatient.claim(request(key, lease=0.3))
    with psycopg.connect(migrated_url) as conn:  # completes, then hangs before its commit
        conn.execute(*PostgresStore.completion_statement(completion(key, out.fence)))
        # Past the lease a new attempt would take the key over: it must lock the row.
        wait_for(
            lambda: bool(impatient.call(None, SERVER_PAST, (key,))[0][0]), 10,
            message="the lease ran out on the server's clock",
        )  # fmt: skip
        with pytest.raises(StoreUnavailable, match="lock_timeout") as caught:
            impatient.claim(request(key, token="t2"))
        assert key in str(caught.value)
        conn.rollback()
    assert impatient.claim(request(key, token="t2")).took_over is True
    impatient.close()


SERVER_PAST = "SELECT deadline < clock_timestamp() FROM celery_idem_records WHERE key = %s"


def test_a_duplicate_is_one_statement_and_a_first_run_two_counted_by_the_server(
    pg_server: Any, migrated_url: str, key: str
) -> None:
    """One round trip for a duplicate, one before a first run's body and one after it.

    Counted in the server's own log (``log_statement = all`` on the store's sessions:
    one line per statement a client sends, none for what a function runs inside).
    """
    from benchmarks.pgcount import PgCounter, logged  # noqa: PLC0415 - tests' own tools

    store = PostgresStore.from_url(logged(migrated_url))
    store.claim(request(f"{key}:warm"))  # the store's first call also checks the schema
    counter = PgCounter(pg_server.log_path, migrated_url)
    try:
        out: list[Any] = []

        def first_run() -> None:
            out.append(store.claim(request(key)))
            assert store.complete(completion(key, out[0].fence))

        first = counter.count(first_run, 1, {})
        duplicate = counter.count(lambda: out.append(store.claim(request(key, "t2"))), 1, {})
    finally:
        counter.close()
        store.close()
    assert out[0].state is ClaimState.CLAIMED
    assert out[1].state is ClaimState.COMPLETED
    assert first == {"store": {"celery_idem_claim": 1, "celery_idem_complete": 1}}
    assert duplicate == {"store": {"celery_idem_claim": 1}}
