"""The wording of messages users read in logs and errors (issue #14, item 8).

Each test provokes the message for real (a closed port, a store-less app, a key held
by an earlier delivery of the same message) and checks what it says.
"""

from __future__ import annotations

import logging
import uuid

import pytest

from celery_idem import DuplicateInProgress, IdempotencyConfigError, StoreUnavailable
from celery_idem.store import ClaimRequest
from celery_idem.store.connect import store_for
from celery_idem.store.redis import RedisStore
from devtools.processes import free_port
from tests.unit.conftest import Env


def _closed_port_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


def _claim(key: str, task_id: str) -> ClaimRequest:
    return ClaimRequest(
        key, token=uuid.uuid4().hex, task_id=task_id, fingerprint="", lease=30, ttl=60
    )


def test_an_unreachable_store_is_named_once_with_no_double_period() -> None:
    store = RedisStore.from_url(_closed_port_url())
    with pytest.raises(StoreUnavailable) as caught:
        store.claim(_claim("idem:k", "t1"))
    message = str(caught.value)
    assert "failed on record 'idem:k'" in message
    assert ".." not in message
    assert "Check that Redis is reachable" in message


def test_a_failed_server_command_is_not_called_a_record() -> None:
    admin = RedisStore.from_url(_closed_port_url())  # a StoreAdmin too
    with pytest.raises(StoreUnavailable) as caught:
        admin.server_facts()
    message = str(caught.value)
    assert "failed on TIME" in message
    assert "record 'TIME'" not in message
    assert ".." not in message


def test_no_store_configured_does_not_stutter_the_project_name() -> None:
    with pytest.raises(IdempotencyConfigError) as caught:
        store_for(None, task_name="shop.send")
    message = str(caught.value)
    # The worker prefixes its log lines with "celery-idem: "; the error must not too.
    assert not message.lower().startswith("celery-idem")
    assert "celery-idem found" not in message
    assert "set idem_store_url" in message


def test_a_key_held_by_an_earlier_delivery_of_the_same_message_says_so(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    @env.task(idem_on_in_progress="retry")
    def send(x: int) -> int:
        return x

    task_id = str(uuid.uuid4())
    # An earlier delivery of this message claimed the key and is still within its lease.
    outcome = env.store.claim(_claim(env.storage(send, "K-held"), task_id))
    assert outcome.state.name == "CLAIMED"

    with caplog.at_level(logging.INFO), pytest.raises(DuplicateInProgress):
        send.apply((1,), idempotency_key="K-held", task_id=task_id).get()

    held = [r.getMessage() for r in caplog.records if "held by" in r.getMessage()]
    assert held, "no 'held by' line was logged"
    assert all(f"an earlier delivery of this same message (task {task_id})" in m for m in held)


def test_a_key_held_by_another_message_names_that_task(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    @env.task(idem_on_in_progress="retry")
    def send(x: int) -> int:
        return x

    holder = str(uuid.uuid4())
    env.store.claim(_claim(env.storage(send, "K-other"), holder))

    with caplog.at_level(logging.INFO), pytest.raises(DuplicateInProgress):
        send.apply((1,), idempotency_key="K-other").get()

    held = [r.getMessage() for r in caplog.records if "held by" in r.getMessage()]
    assert held
    assert all(f"held by task {holder} " in m for m in held)
