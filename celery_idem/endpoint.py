"""Endpoint: where the records live, parsed from the settings, before any I/O.

This module owns the store's address forms (``redis://``, ``rediss://``, ``unix://``
and Celery's ``redis+socket://``, ``sentinel://``, ``redis+cluster://``, ``memory://``),
how the store settings combine (``idem_redis_sentinels``, ``idem_redis_cluster``,
``idem_redis_client``, ...), and where the store is when none of them is set: Celery's
own Redis (:func:`celery_fallback`).
It turns them into one frozen :class:`Endpoint`, so a contradiction is refused at
start-up with the setting's name, and ``store/clients.py`` only builds what is
described here. Over 400 lines on purpose: one grammar, every address form beside the
others, so that no form is parsed twice or differently.

Pure: imports neither celery nor redis (the URL grammar is checked here; redis-py
parses the rest when the client is built).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = [
    "Endpoint",
    "EndpointError",
    "Topology",
    "celery_fallback",
    "parse_sentinels",
    "sanitize_url",
    "url_scheme",
]

REDIS_SCHEMES = frozenset({"redis", "rediss", "unix", "redis+socket", "socket", "sentinel"})
"""Schemes of a Redis server, in redis-py's and Celery's spellings."""
URL_SCHEMES = REDIS_SCHEMES | {"memory", "redis+cluster", "rediss+cluster"}
"""Schemes ``idem_redis_url`` accepts: a Redis server, a Cluster, or the memory store."""
POSTGRES_SCHEMES = frozenset({"postgresql", "postgres"})
"""Schemes of the PostgreSQL store (``idem_store_url`` only)."""
STORE_SCHEMES = URL_SCHEMES | POSTGRES_SCHEMES
"""Schemes ``idem_store_url`` accepts: every ``idem_redis_url`` form, or PostgreSQL."""
DEFAULT_SENTINEL_PORT = 26379
_CERT_REQS = {"cert_none": "none", "cert_optional": "optional", "cert_required": "required"}


class Topology(str, enum.Enum):
    """How the records are spread over Redis servers."""

    STANDALONE = "standalone"
    """One server (or a proxy): ``redis://``, ``rediss://``, ``unix://``."""
    SENTINEL = "sentinel"
    """A primary found through Sentinel, followed across failovers."""
    CLUSTER = "cluster"
    """Redis Cluster: each record lives on the node owning its key's slot."""
    CUSTOM = "custom"
    """A client built by the user's ``idem_redis_client`` factory."""
    MEMORY = "memory"
    """The in-process store for users' tests (``memory://NAME``)."""
    POSTGRES = "postgres"
    """One table of a PostgreSQL database (``postgresql://``, ``idem_store_url``)."""


class EndpointError(ValueError):
    """A store setting is malformed or contradicts another; names the setting."""

    def __init__(self, setting: str, why: str) -> None:
        super().__init__(f"{setting}: {why}")
        self.setting = setting
        self.why = why


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One store address, complete enough to build its client.

    Attributes:
        topology: Which kind of deployment.
        url: The redis-py URL (``redis``/``rediss``/``unix`` scheme) for standalone and
            cluster (the cluster's first startup node), ``memory://NAME``, else None.
        sentinels: ``(host, port)`` of each Sentinel (Sentinel only).
        service_name: The monitored primary's name (Sentinel only).
        db: The database number on the Sentinel-managed primary.
        username: Username for the Sentinel-managed primary, from the URL.
        password: Password for the Sentinel-managed primary, from the URL.
        options: ``idem_redis_options``: keyword arguments for redis-py's client
            (TLS files, timeouts, ...), sorted, as pairs so the endpoint is hashable.
        factory: ``idem_redis_client``: a callable returning a redis-py client.
        min_replicas: ``WAIT`` for this many replicas after a claim and a completion.
        replicas_timeout: Seconds ``WAIT`` may block before the write counts as not
            durable.
    """

    topology: Topology
    url: str | None = None
    sentinels: tuple[tuple[str, int], ...] = ()
    service_name: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    options: tuple[tuple[str, Any], ...] = ()
    factory: Callable[[], Any] | None = None
    min_replicas: int = 0
    replicas_timeout: float = 1.0

    @property
    def display(self) -> str:
        """The address for messages and logs, never with a password."""
        if self.topology is Topology.SENTINEL:
            hosts = ";".join(f"{h}:{p}" for h, p in self.sentinels)
            return f"sentinel://{hosts}/{self.service_name}/{self.db}"
        if self.topology is Topology.CUSTOM:
            factory = self.factory
            name = getattr(factory, "__qualname__", repr(factory))
            return f"idem_redis_client {getattr(factory, '__module__', '?')}.{name}"
        text = sanitize_url(self.url or "")
        return f"cluster {text}" if self.topology is Topology.CLUSTER else text

    @property
    def location(self) -> tuple[object, ...]:
        """Where the records are, whatever the client options: equal for one store."""
        return (self.topology, self.url, self.sentinels, self.service_name, self.db, self.factory)

    @property
    def cache_key(self) -> str:
        """A text identity: two endpoints with the same key share one client per process."""
        return repr(self)

    def option_dict(self) -> dict[str, Any]:
        """``idem_redis_options`` as keyword arguments (a fresh dict each call)."""
        return dict(self.options)


def url_scheme(value: str) -> str:
    """Return the lower-cased scheme of a URL, or ``""`` when it has none."""
    scheme, sep, _ = value.partition("://")
    return scheme.lower() if sep else ""


def sanitize_url(url: str) -> str:
    """``url`` with any password replaced by ``**``, so it can be logged."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:**@{host}").geturl()


def _host_port(text: str, setting: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        host, port = text.strip(), str(DEFAULT_SENTINEL_PORT)
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise EndpointError(setting, f"{text!r} is not 'host:port'")
    return host, int(port)


def parse_sentinels(
    value: object, setting: str = "idem_redis_sentinels"
) -> tuple[tuple[str, int], ...]:
    """Sentinel addresses from ``"h1:26379;h2:26379"``, or a list of ``"h:p"`` / ``(h, p)``."""
    entries: list[object]
    if isinstance(value, str):
        entries = [part for part in value.replace(",", ";").split(";") if part.strip()]
    elif isinstance(value, (list, tuple)):
        entries = list(value)
    else:
        raise EndpointError(setting, f"a {type(value).__name__}, not a list of 'host:port'")
    out: list[tuple[str, int]] = []
    for entry in entries:
        if isinstance(entry, str):
            out.append(_host_port(entry, setting))
        elif (
            isinstance(entry, (list, tuple))
            and len(entry) == 2
            and isinstance(entry[0], str)
            and isinstance(entry[1], int)
            and not isinstance(entry[1], bool)
        ):
            out.append((entry[0], entry[1]))
        else:
            raise EndpointError(setting, f"entry {entry!r} is not 'host:port' or (host, port)")
    if not out:
        raise EndpointError(setting, "no Sentinel address given")
    return tuple(out)


@dataclass(frozen=True, slots=True)
class _SentinelUrl:
    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    db: int
    username: str | None
    password: str | None


def _parse_sentinel_url(url: str, setting: str) -> _SentinelUrl:
    """``sentinel://[user:pw@]h1:p1;h2:p2/SERVICE/DB``, or Celery's form.

    Celery's Redis backend spells it ``sentinel://h1:p1/0;sentinel://h2:p2/0`` with the
    service name in ``master_name`` of its transport options; both are accepted, so a
    Celery ``result_backend`` can be reused as it is.
    """
    segments = [seg for seg in url.split(";") if seg.strip()]
    hosts: list[tuple[str, int]] = []
    path, username, password = "", None, None
    for segment in segments:
        rest = segment.strip()
        if "://" in rest:
            scheme, _, rest = rest.partition("://")
            if scheme.lower() != "sentinel":
                raise EndpointError(
                    setting, f"segment {sanitize_url(segment)!r} is not sentinel://"
                )
        netloc, slash, tail = rest.partition("/")
        netloc = netloc.partition("?")[0]
        if slash:
            path = tail.partition("?")[0]
        creds, at, hostport = netloc.rpartition("@")
        if at:
            user, _, secret = creds.partition(":")
            username, password = unquote(user) or None, unquote(secret) or None
        hosts.append(_host_port(hostport, setting))
    parts = [part for part in path.split("/") if part]
    service, db = "", "0"
    if len(parts) == 1:
        service, db = ("", parts[0]) if parts[0].isdigit() else (parts[0], "0")
    elif len(parts) == 2:
        service, db = parts
    elif parts:
        raise EndpointError(setting, f"path {path!r} is not /SERVICE/DB")
    if not db.isdigit():
        raise EndpointError(setting, f"database {db!r} is not a number")
    if not hosts:
        raise EndpointError(setting, "no Sentinel address given")
    return _SentinelUrl(tuple(hosts), unquote(service), int(db), username, password)


def _normalize_tls_query(url: str) -> str:
    """Accept Celery's ``ssl_cert_reqs=CERT_REQUIRED`` where redis-py wants ``required``."""
    parts = urlsplit(url)
    if "ssl_cert_reqs=" not in parts.query:
        return url
    pairs = []
    for pair in parts.query.split("&"):
        name, _, value = pair.partition("=")
        if name == "ssl_cert_reqs":
            pairs.append(f"{name}={_CERT_REQS.get(unquote(value).lower(), value)}")
        else:
            pairs.append(pair)  # exactly as written: already percent-encoded
    return parts._replace(query="&".join(pairs)).geturl()


def _celery_redis_url(conf: Mapping[str, Any]) -> tuple[str | None, Mapping[str, Any]]:
    """Celery's result backend, else its broker, when either is a Redis URL.

    Celery's ``app.conf`` exposes ``result_backend`` and ``broker_url`` as properties
    that also honour the ``CELERY_RESULT_BACKEND`` / ``CELERY_BROKER_URL`` environment
    variables; reading the attribute first finds the same server Celery connects to.
    A plain dict has no such attribute and is read by key (either spelling).

    Returns:
        The URL, and that side's transport options (where Celery keeps a
        ``sentinel://`` URL's ``master_name`` and ``sentinel_kwargs``).
    """
    for attr, options in (("result_backend", "result_backend"), ("broker_url", "broker")):
        url = getattr(conf, attr, None)
        if url is None:
            url = conf.get(attr)
            if url is None:
                url = conf.get(f"CELERY_{attr.upper()}")
        if isinstance(url, str) and url_scheme(url) in REDIS_SCHEMES:
            name = f"{options}_transport_options"
            transport = conf.get(name) or conf.get(f"CELERY_{name.upper()}") or {}
            return url, transport if isinstance(transport, Mapping) else {}
    return None, {}


def celery_fallback(
    conf: Mapping[str, Any],
    *,
    url: str | None,
    sentinels: object,
    factory: object,
    options: Mapping[str, Any] | None,
) -> tuple[str | None, Mapping[str, Any] | None, str | None]:
    """``idem_redis_url``'s fallback: Celery's result backend, else its broker, if Redis.

    It applies only when no store address is set at all (no ``idem_redis_url``,
    ``idem_redis_sentinels`` or ``idem_redis_client``); otherwise ``url`` and
    ``options`` come back as they are.

    Args:
        conf: Celery's ``app.conf`` or any mapping.
        url: ``idem_redis_url``.
        sentinels: ``idem_redis_sentinels``.
        factory: ``idem_redis_client``.
        options: ``idem_redis_options``.

    Returns:
        The URL in force (None when there is none), the client options (for Celery's
        ``sentinel://`` URL with the ``sentinel_kwargs`` of its transport options, the
        Sentinels' own password), and the ``master_name`` of those transport options,
        for :func:`build_endpoint`'s ``celery_master_name``.
    """
    if url is not None or sentinels is not None or factory is not None:
        return url, options, None
    url, transport = _celery_redis_url(conf)
    sentinel_kwargs = transport.get("sentinel_kwargs")
    if url_scheme(url or "") == "sentinel" and isinstance(sentinel_kwargs, Mapping):
        # Celery's Sentinels' own options (their password) come along with the URL.
        options = {"sentinel_kwargs": dict(sentinel_kwargs), **(options or {})}
    master_name = transport.get("master_name")
    return url, options, master_name if isinstance(master_name, str) else None


def build_endpoint(
    *,
    url: str | None,
    sentinels: object = None,
    sentinel_master: str | None = None,
    cluster: bool = False,
    factory: Callable[[], Any] | None = None,
    options: Mapping[str, Any] | None = None,
    min_replicas: int = 0,
    replicas_timeout: float = 1.0,
    celery_master_name: str | None = None,
) -> Endpoint | None:
    """Combine the store settings into one endpoint, refusing contradictions.

    Args:
        url: ``idem_redis_url`` (already scheme-checked), or the Celery URL it falls
            back to; None when neither exists.
        sentinels: ``idem_redis_sentinels``.
        sentinel_master: ``idem_redis_sentinel_master``.
        cluster: ``idem_redis_cluster``.
        factory: ``idem_redis_client``, already imported.
        options: ``idem_redis_options``.
        min_replicas: ``idem_min_replicas``.
        replicas_timeout: ``idem_min_replicas_timeout``.
        celery_master_name: ``master_name`` from Celery's transport options, used for
            a ``sentinel://`` URL that names no service.

    Returns:
        The endpoint, or None when no store is configured at all (the store factory
        explains that at first use).

    Raises:
        EndpointError: Naming the setting at fault.
    """
    opts = tuple(sorted((options or {}).items()))
    common: dict[str, Any] = {
        "options": opts,
        "min_replicas": min_replicas,
        "replicas_timeout": replicas_timeout,
    }
    scheme = url.partition("://")[0].lower() if url else ""
    if factory is not None:
        if url is not None or sentinels is not None or cluster or sentinel_master or options:
            raise EndpointError(
                "idem_redis_client",
                "the factory builds the whole client: drop idem_redis_url, "
                "idem_redis_sentinels, idem_redis_sentinel_master, idem_redis_cluster and "
                "idem_redis_options (configure them inside the factory)",
            )
        return Endpoint(Topology.CUSTOM, factory=factory, **common)
    if sentinels is not None:
        if cluster:
            raise EndpointError("idem_redis_cluster", "True with idem_redis_sentinels")
        if url and scheme != "sentinel":
            raise EndpointError(
                "idem_redis_sentinels",
                f"set together with idem_redis_url {sanitize_url(url)!r}: give the "
                "Sentinels in one of them only",
            )
        hosts = parse_sentinels(sentinels)
        parsed = _parse_sentinel_url(url, "idem_redis_url") if url else None
        if parsed is not None and set(parsed.sentinels) != set(hosts):
            raise EndpointError("idem_redis_sentinels", "names other Sentinels than idem_redis_url")
        service = sentinel_master or (parsed.service_name if parsed else "")
        return _sentinel(hosts, service, parsed, celery_master_name, common)
    if url is None:
        return None
    if scheme == "memory":
        return Endpoint(Topology.MEMORY, url=url)
    if scheme in POSTGRES_SCHEMES:
        return _postgres(url, cluster=cluster, sentinel_master=sentinel_master, common=common)
    if scheme == "sentinel":
        if cluster:
            raise EndpointError("idem_redis_cluster", "True with a sentinel:// URL")
        parsed = _parse_sentinel_url(url, "idem_redis_url")
        service = sentinel_master or parsed.service_name
        return _sentinel(parsed.sentinels, service, parsed, celery_master_name, common)
    if sentinel_master is not None:
        raise EndpointError(
            "idem_redis_sentinel_master",
            "set without Sentinels: give idem_redis_sentinels or a sentinel:// idem_redis_url",
        )
    if scheme in ("socket", "redis+socket"):
        # Celery's spellings of a unix socket; its virtual_host query names the db.
        rest = url[len(scheme) + 3 :].replace("virtual_host=", "db=")
        url, scheme = "unix://" + rest, "unix"
    if scheme in ("redis+cluster", "rediss+cluster"):
        return _cluster(scheme[:-8] + url[len(scheme) :], "idem_redis_url", common)
    if cluster:
        if scheme == "unix":
            raise EndpointError("idem_redis_cluster", "True with a unix:// URL (Cluster is TCP)")
        return _cluster(url, "idem_redis_cluster", common)
    return Endpoint(Topology.STANDALONE, url=_normalize_tls_query(url), **common)


def _cluster(url: str, setting: str, common: dict[str, Any]) -> Endpoint:
    db = urlsplit(url).path.strip("/")
    if db not in ("", "0"):
        raise EndpointError(
            setting,
            f"database {db} with Redis Cluster, which has database 0 only "
            "(keep records apart with idem_key_prefix)",
        )
    return Endpoint(Topology.CLUSTER, url=_normalize_tls_query(url), **common)


def _sentinel(
    hosts: tuple[tuple[str, int], ...],
    service: str,
    parsed: _SentinelUrl | None,
    celery_master_name: str | None,
    common: dict[str, Any],
) -> Endpoint:
    service = service or celery_master_name or ""
    if not service:
        raise EndpointError(
            "idem_redis_sentinel_master",
            "no Sentinel service name: write it in the URL (sentinel://h1:26379;h2:26379/"
            "mymaster/0) or set idem_redis_sentinel_master = 'mymaster'",
        )
    return Endpoint(
        Topology.SENTINEL,
        sentinels=hosts,
        service_name=service,
        db=parsed.db if parsed else 0,
        username=parsed.username if parsed else None,
        password=parsed.password if parsed else None,
        **common,
    )


def _postgres(
    url: str, *, cluster: bool, sentinel_master: str | None, common: Mapping[str, Any]
) -> Endpoint:
    """The PostgreSQL store's endpoint; the Redis-only settings beside it are refused.

    They would be silently ignored otherwise: a user who set ``idem_min_replicas`` for
    durability must learn that PostgreSQL's own replication settings apply instead.
    """
    redis_only = {
        "idem_redis_cluster": cluster,
        "idem_redis_sentinel_master": sentinel_master,
        "idem_redis_options": common["options"],
        "idem_min_replicas": common["min_replicas"],
    }
    for setting, value in redis_only.items():
        if value:
            raise EndpointError(
                setting,
                f"set with the PostgreSQL store {sanitize_url(url)!r}: it applies to Redis "
                "only (PostgreSQL's connection options go in the URL's query, its "
                "durability in synchronous_commit and its replication settings)",
            )
    return Endpoint(Topology.POSTGRES, url=url)
