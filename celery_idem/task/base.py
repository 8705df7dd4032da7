"""IdempotentTask itself: the Celery task base, its options and its hooks into Celery.

Publishing (``publish.py``) moves ``idempotency_key`` and ``idem_*`` call options into
message headers and may answer from the store before sending; ``__call__`` hands each
message to one :class:`~celery_idem.task.execution.Execution`.

Celery calls a task's ``__call__`` from its tracer (worker and ``apply``/eager) with
the request already pushed and ``called_directly`` False; a plain function call
``task(x)`` has ``called_directly`` True and bypasses the protocol, as documented.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar, ParamSpec, TypeVar, overload

from celery import Task

from celery_idem import codec
from celery_idem.config import (
    SETTINGS,
    IdemSettings,
    InProgressPolicy,
    StoreErrorPolicy,
    resolve_settings,
)
from celery_idem.exceptions import (
    DuplicateInProgress,
    IdempotencyKeyMismatch,
    KeyQuarantined,
    LeaseLost,
    ResultNotStored,
    StoreUnavailable,
)
from celery_idem.keys import KeyRule
from celery_idem.store import Store, store_for
from celery_idem.store.unreachable import UnreachableStore
from celery_idem.task import handover, publish, spec
from celery_idem.task.atomic import AtomicBlock, atomic_block
from celery_idem.task.execution import Execution
from celery_idem.task.headers import RETRY_KEY
from celery_idem.task.spec import Spec
from celery_idem.task.steps import AtomicTarget, Steps, unrecorded_step

__all__ = ["IdempotentTask", "task_options"]

_EXPECTED = (
    IdempotencyKeyMismatch, DuplicateInProgress, ResultNotStored, KeyQuarantined, LeaseLost
)  # fmt: skip
"""Exceptions a worker logs as expected (Celery's ``Task.throws``), at INFO."""

P = ParamSpec("P")
T = TypeVar("T")


def task_options(cls: type[IdempotentTask]) -> dict[str, Any]:
    """The task layer: every task option the class sets (by the decorator or a subclass).

    The declared options that are not None, plus any other ``idem_*`` name a subclass
    sets, so that :func:`~celery_idem.config.resolve_settings` refuses it as a typo.
    """
    options = {name: getattr(cls, name) for name in SETTINGS if getattr(cls, name) is not None}
    for klass in reversed(cls.__mro__):
        if klass is IdempotentTask or not issubclass(klass, IdempotentTask):
            continue
        options.update(
            {k: v for k, v in vars(klass).items() if k.startswith("idem_") and k not in SETTINGS}
        )
    return options


class IdempotentTask(Task):  # type: ignore[misc]  # celery ships no type hints
    """A Celery task base that runs each idempotency key's body once.

    Use as ``@app.task(base=IdempotentTask)``. The task option ``idempotency_key`` (a
    ``str.format`` template or a callable over the bound arguments) sets the task's key
    rule; inside the body ``self.idempotency_key`` is the effective key of the running
    execution and ``self.idempotency_fence`` its fence number.
    """

    abstract: ClassVar[bool] = True

    # Task options: one per setting, all None here ("not set on the task": the app's
    # value, else the default, applies). Set them with ``@app.task(base=IdempotentTask,
    # idem_ttl=3600)`` or on a subclass. Each ``#:`` line is its row's ``doc`` in
    # ``celery_idem.settings_table`` (a test keeps the two equal); docs/configuration.md
    # describes each setting in full.

    #: Where records live: any `idem_redis_url` form, or `postgresql://` for PostgreSQL.
    idem_store_url: ClassVar[str | None] = None
    #: Where records live.
    idem_redis_url: ClassVar[str | None] = None
    #: The Sentinels to ask for the primary, when they are not written in `idem_redis_url`.
    idem_redis_sentinels: ClassVar[str | Sequence[str | tuple[str, int]] | None] = None
    #: The name of the primary the Sentinels monitor (`sentinel monitor NAME ...`).
    idem_redis_sentinel_master: ClassVar[str | None] = None
    #: Treat `idem_redis_url` as a node of a Redis Cluster.
    idem_redis_cluster: ClassVar[bool | None] = None
    #: A factory for the redis-py client, for what the URL forms cannot express.
    idem_redis_client: ClassVar[Callable[[], Any] | str | None] = None
    #: Keyword arguments for redis-py's client.
    idem_redis_options: ClassVar[Mapping[str, Any] | None] = None
    #: Replicas that must confirm a claim and a completion before they count.
    idem_min_replicas: ClassVar[int | None] = None
    #: Seconds a claim or a completion waits for `idem_min_replicas` replicas.
    idem_min_replicas_timeout: ClassVar[float | None] = None
    #: Seconds a completed result is kept and replayed to duplicates.
    idem_ttl: ClassVar[float | None] = None
    #: Seconds a claim survives without renewal.
    idem_lease: ClassVar[float | None] = None
    #: The namespace of every Redis key celery-idem writes.
    idem_key_prefix: ClassVar[str | None] = None
    #: The key space of the task's records: its name unless set.
    idem_scope: ClassVar[str | None] = None
    #: Which parts of the arguments the mismatch check and derived keys cover.
    idem_fingerprint: ClassVar[bool | Sequence[str] | Callable[..., Any] | None] = None
    #: What a duplicate does when another live run holds its key.
    idem_on_in_progress: ClassVar[InProgressPolicy | str | None] = None
    #: What a task does when Redis cannot be reached to claim its key.
    idem_on_store_error: ClassVar[StoreErrorPolicy | str | None] = None
    #: Exception classes whose failure is stored and re-raised to duplicates.
    idem_cache_errors: ClassVar[
        type[BaseException] | str | Iterable[type[BaseException] | str] | None
    ] = None
    #: The largest serialized result that is stored.
    idem_max_result_bytes: ClassVar[int | None] = None
    #: Reserve the key before publishing; send nothing when it is taken.
    idem_dedupe_on_publish: ClassVar[bool | None] = None
    #: Refuse calls and messages that carry no explicit idempotency key.
    idem_require_key: ClassVar[bool | None] = None
    #: Takeovers of one key, without a completion, before the key is quarantined.
    idem_max_takeovers: ClassVar[int | None] = None
    #: Wait for the completion's answer before the task returns.
    idem_blocking_completion: ClassVar[bool | None] = None

    _idem_key_rule: ClassVar[str | Callable[..., Any] | None] = None
    _idem_spec_cache: Spec | None = None
    _idem_settings_cache: tuple[int, IdemSettings] | None = None
    _idem_rule_cache: tuple[int, KeyRule] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Celery's decorator turns task options into class attributes, which would hide
        # the ``idempotency_key`` property; move the rule aside and keep the property.
        super().__init_subclass__(**kwargs)
        # Refusals are outcomes, not crashes: the worker logs them without a traceback.
        cls.throws = (*cls.__dict__.get("throws", ()), *_EXPECTED)
        if "idempotency_key" in cls.__dict__:
            rule = cls.__dict__["idempotency_key"]
            if not isinstance(rule, property):
                cls._idem_key_rule = rule  # None switches an inherited rule off
                delattr(cls, "idempotency_key")

    @property
    def idempotency_key(self) -> str | None:
        """The effective key of the running execution (None outside one)."""
        return getattr(self.request, "idem_key", None)

    @property
    def idempotency_fence(self) -> int | None:
        """The fence of the running execution: it only grows for one key."""
        return getattr(self.request, "idem_fence", None)

    # -- durable steps (steps.py) ------------------------------------------------

    @overload
    def step(self, name: str, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T: ...

    # ``atomic=`` cannot sit beside ``P.kwargs`` (PEP 612), so a call that passes it
    # gets this looser signature; mypy calls it unreachable, yet it is what such a
    # call matches once the first one refuses the unknown keyword.
    @overload
    def step(  # type: ignore[overload-cannot-match]
        self, name: str, fn: Callable[..., T], /, *args: Any, atomic: AtomicTarget, **kwargs: Any
    ) -> T: ...

    def step(self, name: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` once per key: a later attempt gets its stored value.

        Inside the body of an execution that claimed its key, the value is stored
        (serialized as results are, fenced by this attempt's claim) before it is
        returned; a retry, redelivery or takeover of the same key that reaches the
        same step (the n-th call with this ``name``) returns the stored value without
        calling ``fn`` and sends ``step_replayed``. The value returned is the decoded
        one on every attempt, the first included. Outside such an execution (a plain
        call ``task(x)``, a store down under ``idem_on_store_error='run'``) it just
        calls ``fn``. See ``docs/durable-steps.md``.

        ``atomic=`` (step's own keyword; the PostgreSQL store): ``True`` (Django's
        default database), a Django alias, or a connection as ``idem_atomic`` takes:
        ``fn`` runs in a transaction on it and the step is recorded in that same
        transaction, so its writes and its value commit together or not at all (a
        lost lease rolls both back). See ``task/atomic.py`` and ``docs/postgres.md``.

        Raises:
            LeaseLost: Another attempt took the key over; nothing was stored.
            ResultNotStored: The value could not be kept (the step counts as done;
                with ``atomic``, all was rolled back instead).
            IdempotencyError: A different step stands at this place in the record, or
                the step is inside or after an ``idem_atomic()`` block.
            IdempotencyConfigError: ``atomic`` refused (see :meth:`idem_atomic`).
        """
        atomic = kwargs.pop("atomic", None)
        request = self.request
        steps = getattr(request, "idem_steps", None)
        if steps is None:
            execution = getattr(request, "idem_run", None)
            if execution is None or execution.finished_steps is None:
                if atomic is None or atomic is False:
                    return fn(*args, **kwargs)
                return unrecorded_step(self, atomic, lambda: fn(*args, **kwargs))
            steps = request.idem_steps = Steps(execution, execution.finished_steps)
        value: T = steps.run(name, fn, args, kwargs, atomic)
        return value

    def idem_atomic(
        self, conn: Any = None, *, using: str | None = None
    ) -> AbstractContextManager[AtomicBlock]:
        """A transaction whose commit also completes the key: ``with ... as done:``.

        The outermost transaction on ``conn`` (a psycopg 3 ``Connection``, a SQLAlchemy
        ``Connection`` or ``Session``), or Django's ``atomic(using=using or "default")``
        with no ``conn``. The body writes through it (``done.connection``) and sets
        ``done.result``; leaving the block writes the key's completion (``done.result``,
        encoded as any result) in that transaction, fenced by this attempt's token, and
        commits: writes and completion commit together, once per key. The task returns
        ``done.result``. Needs the PostgreSQL store on the database ``conn`` writes to;
        the rules are in ``task/atomic.py`` and ``docs/postgres.md``.

        Raises:
            LeaseLost: Another attempt took the key over: rolled back, nothing committed.
            ResultNotStored: ``done.result`` cannot be encoded: rolled back.
            IdempotencyConfigError: Not the PostgreSQL store, or ``conn`` is not usable
                (another database, already in a transaction, Django not configured).
            IdempotencyError: Outside a running execution, inside a block or a step, or
                after a block of this run committed.
        """
        return atomic_block(self, conn, using)

    @property
    def step_key(self) -> str | None:
        """The running step's downstream idempotency key: ``f"{idempotency_key}/{name}"``.

        ``#n`` is appended for the n-th step of the same name (n >= 2). Stable across
        attempts, so pass it to the payment provider or the mailer the step calls.
        None outside a step, or outside an execution that claimed its key.
        """
        steps = getattr(self.request, "idem_steps", None)
        return None if steps is None else steps.current_key

    # -- publishing ---------------------------------------------------------------

    def apply_async(  # noqa: PLR0917 - mirrors celery.Task.apply_async
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> Any:
        """Send the task; ``idempotency_key=...`` and ``idem_*=...`` travel as headers.

        Checked before anything is sent (``publish.prepare_call``): the key, the
        ``idem_*`` values, option names that look like ours but are misspelt, our
        options passed as task keyword arguments, the task's key rule and
        ``idem_require_key``. With ``idem_dedupe_on_publish``, the key is reserved for
        the message's task id in the same round trip that finds a key completed, in
        progress or reserved by another send: then nothing is sent and the caller gets
        the AsyncResult of the task that holds it. A publish that fails withdraws its
        reservation.
        """
        publish.prepare_call(self, kwargs, options)
        if (
            self.idem_settings().dedupe_on_publish
            and not self.app.conf.task_always_eager
            and not (link or link_error or options.get("chain"))
        ):
            # A message with callbacks or a chain is sent: its worker replays the stored
            # value into them, exactly as for any duplicate (they are the caller's own).
            reservation = publish.published(self, args, kwargs, task_id, options)
            if reservation.existing is not None:
                return reservation.existing
            try:
                return super().apply_async(
                    args, kwargs, reservation.task_id or task_id, producer, link, link_error,
                    shadow, **options,
                )  # fmt: skip
            except BaseException:
                publish.withdraw(self, reservation)
                raise
        return super().apply_async(
            args, kwargs, task_id, producer, link, link_error, shadow, **options
        )

    def apply(self, args: Sequence[Any] | None = None, kwargs: Any = None, **options: Any) -> Any:
        """Run eagerly, under the same protocol; ``idempotency_key=...`` is honoured.

        The call is checked as ``apply_async`` checks it.
        """
        publish.prepare_call(self, kwargs, options)
        publish.with_eager_group_position(options)
        return super().apply(args, kwargs, **options)

    def retry(self, *args: Any, **options: Any) -> Any:
        """Celery's ``retry``, keeping this execution's key for the retried message.

        A retry may change its arguments (``self.retry(args=(page + 1,))``); its key
        must not change with them, or the parked record would be abandoned and a
        duplicate of the original request would run again.
        """
        request = self.request
        key = getattr(request, "idem_key", None)
        if key is not None:
            base = options.get("headers") or request.as_execution_options().get("headers")
            base = base if isinstance(base, Mapping) else {}
            options["headers"] = {**base, RETRY_KEY: key}
        sent = super().retry(*args, **options)
        if key is not None and not request.is_eager:
            # ``throw=False``: the retry is on its way although the body goes on and
            # returns normally; the key must still be parked for it, not completed.
            request.idem_retry_sent = sent
        return sent

    # -- configuration ------------------------------------------------------------

    def idem_settings(self) -> IdemSettings:
        """The task's resolved settings (app and task layers), cached; needs no store.

        A process that only publishes (no Redis of its own) can still validate call
        options against them; ``celery idem`` reads them too.
        """
        cached = self._idem_settings_cache
        if cached is not None and cached[0] == spec.generation():
            return cached[1]
        settings = resolve_settings(self.app.conf, task_options(type(self)), task_name=self.name)
        self._idem_settings_cache = (spec.generation(), settings)
        return settings

    def idem_key_rule(self) -> KeyRule:
        """The task's key rule and fingerprint coverage, checked once per process (cached).

        Needs no store either: a publisher checks the rule on its first publish, so a
        rule that cannot fit the task (``"{nope}"``) fails there, not on a worker.
        """
        cached = self._idem_rule_cache
        if cached is not None and cached[0] == spec.generation():
            return cached[1]
        rule = KeyRule(
            self.name,
            self.run,
            type(self)._idem_key_rule,
            self.idem_settings().fingerprint,
            fingerprint_from_app="idem_fingerprint" not in task_options(type(self)),
        )
        self._idem_rule_cache = (spec.generation(), rule)
        return rule

    def idem_spec(self) -> Spec:
        """Settings, key rule, store and codec of this task in this process (cached)."""
        cached = self._idem_spec_cache
        if (
            cached is not None
            and cached.pid == os.getpid()
            and cached.generation == spec.generation()
        ):
            return cached
        conf = self.app.conf
        settings = self.idem_settings()
        accept = conf.result_accept_content or conf.accept_content
        visibility = (conf.broker_transport_options or {}).get("visibility_timeout")
        store: Store
        try:
            store = store_for(settings.endpoint, task_name=self.name, app_name=self.app.main)
        except StoreUnavailable as exc:
            # No client at all (a Cluster with no node answering): each operation is an
            # outage under idem_on_store_error, and the next message tries again.
            store = UnreachableStore(exc)
        built = Spec(
            max_defer=float(visibility) / 2 if visibility else float("inf"),
            settings=settings,
            rule=self.idem_key_rule(),
            scope=settings.scope_of(self.name),
            store=store,
            serializer=conf.result_serializer,
            accept=codec.accepted_content_types(accept),
            pid=os.getpid(),
            generation=spec.generation(),
        )
        if not isinstance(store, UnreachableStore):
            self._idem_spec_cache = built
        return built

    # -- executing ----------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the body at most once per key; replay the stored outcome otherwise."""
        request = self.request
        if request.called_directly or getattr(request, "idem_active", False):
            return super().__call__(*args, **kwargs)
        request.idem_active = True
        execution = request.idem_run = Execution(self, self.idem_spec(), request, args, kwargs)
        return execution.perform()

    def on_replace(self, sig: Any) -> Any:
        """Hand the key to the replacement before Celery sends it (``handover.py``)."""
        request = self.request
        execution = getattr(request, "idem_run", None)
        if execution is not None and not request.is_eager:
            handover.hand_over(execution, sig)
        return super().on_replace(sig)

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        """Celery has sent this run's callbacks and chain: mark the record so.

        Subclasses that override ``on_success`` must call ``super().on_success(...)``;
        without it, a worker killed later would have them sent a second time by the
        redelivery (never lost, but twice).
        """
        execution = getattr(self.request, "idem_owed", None)
        if execution is not None:
            self.request.idem_owed = None
            execution.dispatched()
        super().on_success(retval, task_id, args, kwargs)
