"""What each kind of store can report to ``celery idem``: the one place that says so.

Commands never ask which class a store is: they read its :class:`StoreTraits`, found
from the endpoint's topology (:func:`traits_of`). Redis walks its keys with ``SCAN``,
measures a record with ``MEMORY USAGE``, expires records itself and has no schema;
PostgreSQL pages through its table's primary key, measures a row with
``pg_column_size``, leaves expired rows for ``celery idem purge`` (or a claim that
reuses them) and has a schema that ``celery idem migrate`` applies. The in-process
store (``memory://``) keeps its records inside each process: nothing outside can read
them. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from celery_idem.endpoint import Endpoint, Topology
from celery_idem.store.memory import MemoryStore

__all__ = ["MEMORY", "POSTGRES", "REDIS", "StoreTraits", "traits_of"]


@dataclass(frozen=True)
class StoreTraits:
    """What a kind of store offers the operators' commands.

    Attributes:
        kind: ``"redis"``, ``"postgres"`` or ``"memory"`` (as
            :attr:`~celery_idem.store.base.ServerFacts.kind` says it).
        name: The store for people: ``Redis``, ``PostgreSQL``, ``memory://``.
        shared: Its records live outside the worker processes, so a command can read
            them (False: ``memory://``, whose records live in each process).
        walk_step: What one step of ``list`` / ``stats`` is (``SCAN step``, ``page``).
        measure: How ``stats`` measures a record's size (``MEMORY USAGE``), for the
            output; None when the store cannot say.
        schema: It has a schema that ``migrate`` applies (tables, indexes).
        expires_itself: The server deletes expired records on its own (Redis TTLs);
            False: expired records stay until ``purge`` (or a claim reusing the row).
        setting: The setting that names it, for messages.
    """

    kind: str
    name: str
    shared: bool
    walk_step: str
    measure: str | None
    schema: bool
    expires_itself: bool
    setting: str = "idem_store_url"

    def steps(self, count: int) -> str:
        """``3 SCAN step(s)``: how many walk steps a command took."""
        return f"{count} {self.walk_step}(s)"


REDIS = StoreTraits(
    kind="redis",
    name="Redis",
    shared=True,
    walk_step="SCAN step",
    measure="MEMORY USAGE",
    schema=False,
    expires_itself=True,
)
POSTGRES = StoreTraits(
    kind="postgres",
    name="PostgreSQL",
    shared=True,
    walk_step="page",
    measure="pg_column_size",
    schema=True,
    expires_itself=False,
)
MEMORY = StoreTraits(
    kind="memory",
    name="memory://",
    shared=False,
    walk_step="step",
    measure=None,
    schema=False,
    expires_itself=True,
)


def traits_of(endpoint: Endpoint | None, store: object = None) -> StoreTraits:
    """The traits of the store ``endpoint`` names (None, no store found: Redis's).

    Every topology but ``memory://`` and ``postgresql://`` is a way to reach Redis
    (standalone, Sentinel, Cluster, a client factory). ``store``, the store in use,
    wins when given: under ``celery_idem.testing.use_memory_store`` every endpoint is
    served by the in-process store.
    """
    if isinstance(store, MemoryStore):
        return MEMORY
    if endpoint is None:
        return REDIS
    if endpoint.topology is Topology.MEMORY:
        return MEMORY
    if endpoint.topology is Topology.POSTGRES:
        return POSTGRES
    return REDIS
