"""TLS and mutual TLS for the gRPC port, with certificates reloaded without a restart.

gRPC asks `ServerCertificates.fetch` before every new connection's handshake; it answers
a new configuration when one of the files changed since it last read them (a renewed
certificate, a rotated client CA), else None to keep the current one. A set of files that
does not load (e.g. caught half-written) is logged and the previous set stays in use.
Connections already open keep the certificate they were made with.
"""

from __future__ import annotations

import logging
import os

import grpc

log = logging.getLogger("rmgrpc.tls")


class TlsConfigError(Exception):
    """A certificate, key or CA file that cannot be used; the message names it."""


class ServerCertificates:
    """The server's certificate chain, key and optional client CA, reread when changed."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str = "") -> None:
        self.files = [f for f in (cert_file, key_file, client_ca_file) if f]
        self.cert_file = cert_file
        self.key_file = key_file
        self.client_ca_file = client_ca_file
        self._stamp = self._stamps()
        self.initial = self._load()
        self.reloads = 0

    @property
    def mutual(self) -> bool:
        """Client certificates are required (and checked against the client CA)."""
        return bool(self.client_ca_file)

    def _stamps(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for path in self.files:
            try:
                st = os.stat(path)
            except OSError as exc:
                raise TlsConfigError(f"cannot read {path}: {exc.strerror}") from None
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(out)

    def _read(self, path: str) -> bytes:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise TlsConfigError(f"cannot read {path}: {exc.strerror}") from None
        if b"-----BEGIN" not in data:
            raise TlsConfigError(f"{path} is not PEM")
        return data

    def _load(self) -> grpc.ServerCertificateConfiguration:
        chain = self._read(self.cert_file)
        key = self._read(self.key_file)
        ca = self._read(self.client_ca_file) if self.client_ca_file else None
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before each handshake: the new configuration if a file changed."""
        try:
            stamp = self._stamps()
            if stamp == self._stamp:
                return None
            config = self._load()
        except TlsConfigError as exc:
            log.error("TLS files not reloaded, the previous ones stay in use: %s", exc)
            return None
        except Exception:  # gRPC would only log it from its own thread; keep serving
            log.exception("TLS files not reloaded, the previous ones stay in use")
            return None
        self._stamp = stamp
        self.reloads += 1
        log.info("TLS certificate files reloaded: %s", ", ".join(self.files))
        return config

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.initial, self.fetch, require_client_authentication=self.mutual
        )
