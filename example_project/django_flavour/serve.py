"""Serve the Django flavour's webhook: ``python -m example_project.django_flavour.serve``.

A small threaded WSGI server from the standard library (``wsgiref``) around Django's
WSGI application, as the Redis flavour's webhook is a ``ThreadingHTTPServer``; in
production, gunicorn or uWSGI serves the same application. ``--host``/``--port``
(defaults ``WEBHOOK_HOST``/``WEBHOOK_PORT``, else 127.0.0.1:8000).
"""

from __future__ import annotations

import argparse
import os
import socketserver
import sys
from collections.abc import Sequence
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server


class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    """One thread per request: the provider's concurrent deliveries do not queue."""

    daemon_threads = True


class Handler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        print(f"webhook: {self.address_string()} {format % args}", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Serve until interrupted."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("WEBHOOK_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("WEBHOOK_PORT", "8000")))
    args = parser.parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.django_flavour.settings")
    from django.core.wsgi import get_wsgi_application  # noqa: PLC0415 - after the env

    application = get_wsgi_application()
    server = make_server(
        args.host, args.port, application, server_class=ThreadingWSGIServer, handler_class=Handler
    )
    print(f"webhook: Django on http://{args.host}:{args.port}/webhooks/payments", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main(sys.argv[1:])
