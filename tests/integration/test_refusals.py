"""Issue #14 items 4, 7 and 15 on a real prefork worker: what the call site refuses
before sending, what the worker refuses from other producers, and what the errors say.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest
import redis

from celery_idem import InvalidIdempotencyKey
from tests.integration.conftest import Worker, ledger_count

pytestmark = pytest.mark.integration
T = 30  # seconds any one result may take


@pytest.mark.parametrize(
    ("bad", "message"),
    [("", "must not be empty"), (5, "must be a str, got int 5"), ("k" * 1025, "over the limit")],
    ids=["empty", "int", "too-long"],
)
def test_a_bad_key_from_a_raw_header_says_it_came_from_the_header_and_carries_it(
    worker: Worker, tasks: ModuleType, ledger: redis.Redis, uid: str, bad: Any, message: str
) -> None:
    # Items 7 and 15: it said "(from the call site)" and carried repr(bad) as .key.
    res = tasks.app.send_task(
        "t.record", (uid, 0), queue=worker.queue, headers={"idempotency_key": bad}
    )
    with pytest.raises(InvalidIdempotencyKey, match=message) as info:
        res.get(timeout=T)
    text = str(info.value)
    assert "from the message header 'idempotency_key'" in text
    assert "app.send_task" in text
    assert "call site" not in text
    assert info.value.key == bad  # through the result backend, as the producer sent it
    assert info.value.task_name == "t.record"
    assert ledger_count(ledger, uid) == 0
