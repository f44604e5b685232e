"""How the gRPC port is protected, decided once at start-up from the settings.

- `[auth] tokens_file` set: every RPC but health and reflection is authenticated and
  authorized (`auth`, `authorize`); SIGHUP rereads the file.
- `[tls] cert_file`/`key_file`: TLS; `client_ca_file` as well: mutual TLS, every client
  must present a certificate that CA signed. mTLS with no tokens file trusts every such
  certificate fully (transport authentication, no roles).
- Neither tokens nor client certificates: nobody is authenticated, so the server serves
  loopback only, and a non-loopback address is refused unless `insecure` says otherwise
  (warned about at every start).
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Any

import grpc

from rmgrpc.auth import AuthConfigError, Authenticator, AuthInterceptor
from rmgrpc.config import Settings
from rmgrpc.tls import ServerCertificates, TlsConfigError

log = logging.getLogger("rmgrpc.security")


class SecurityError(Exception):
    """The settings would expose the server unsafely, or name unusable files."""


def is_loopback(host: str) -> bool:
    """Only this machine can connect to `host` ("localhost", 127.0.0.0/8, ::1)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name that may resolve to anything


@dataclass
class Security:
    """The port's protection: who is authenticated (tokens), and over what (TLS)."""

    authenticator: Authenticator | None
    certificates: ServerCertificates | None
    # Said once the server is serving (not before: a start refused for another reason
    # prints only that reason).
    notice: str = ""

    def interceptors(self) -> list[Any]:
        return [] if self.authenticator is None else [AuthInterceptor(self.authenticator)]

    def add_port(self, server: grpc.aio.Server, listen: str) -> int:
        if self.certificates is None:
            return int(server.add_insecure_port(listen))
        return int(server.add_secure_port(listen, self.certificates.credentials()))

    def reload(self) -> None:
        """SIGHUP: reread the tokens file (certificates are reread when they change)."""
        if self.authenticator is None:
            log.info("SIGHUP: no tokens file configured, nothing to reload")
            return
        self.authenticator.reload()


def from_settings(settings: Settings) -> Security:
    """The protection `settings` ask for; raises SecurityError with one line to act on."""
    try:
        authenticator = Authenticator(settings.tokens_file) if settings.tokens_file else None
        certificates = (
            ServerCertificates(settings.cert_file, settings.key_file, settings.client_ca_file)
            if settings.cert_file
            else None
        )
    except (AuthConfigError, TlsConfigError) as exc:
        raise SecurityError(str(exc)) from None
    host = settings.listen.rpartition(":")[0]
    notice = ""
    authenticated = authenticator is not None or settings.client_ca_file != ""
    if not authenticated and not is_loopback(host):
        if not settings.insecure:
            raise SecurityError(
                f"refusing to serve {settings.listen} without authentication: anyone who "
                "can reach it could take every GPU. Configure [auth] tokens_file (and TLS), "
                "listen on 127.0.0.1, or pass --insecure"
            )
        log.warning(
            "INSECURE: serving %s with no authentication (--insecure): anyone who can "
            "reach it may do everything",
            settings.listen,
        )
    elif not authenticated:
        notice = f"no authentication configured: serving loopback only ({settings.listen})"
    elif authenticator is not None and certificates is None and not is_loopback(host):
        log.warning("tokens cross the network in clear text: configure [tls] for %s", host)
    if certificates is not None and certificates.mutual and authenticator is None:
        log.warning(
            "mutual TLS without a tokens file: every certificate %s signed may do everything",
            settings.client_ca_file,
        )
    return Security(authenticator, certificates, notice)
