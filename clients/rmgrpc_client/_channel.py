"""What every connection to rmgrpc shares: the default address, auth metadata and the
channel options (transparent retry of UNAVAILABLE, which is safe because every mutating
RPC of rmgrpc is idempotent — Allocate through its `request_id`)."""

from __future__ import annotations

import json
from pathlib import Path

import grpc

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 30.0

Metadata = tuple[tuple[str, str], ...]

_SERVICES = ("AllocatorService", "GpuManagerService", "QuotaService")

_SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [{"service": f"rmgrpc.v1.{name}"} for name in _SERVICES],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.1s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        },
        # The watch resumes by itself from the last revision it saw; a transparent retry
        # would replay the original start revision instead.
        {"name": [{"service": "rmgrpc.v1.AllocatorService", "method": "WatchAllocations"}]},
    ]
}

CHANNEL_OPTIONS: list[tuple[str, str | int]] = [
    ("grpc.enable_retries", 1),
    ("grpc.service_config", json.dumps(_SERVICE_CONFIG)),
]


def auth_metadata(token: str | None) -> Metadata:
    """The call metadata carrying `token` as a bearer credential (empty without one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def tls_credentials(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM files: `ca_file` to trust (the system's roots when
    None), and for mutual TLS the client's `cert_file` and `key_file`, which go together."""
    if bool(cert_file) != bool(key_file):
        raise ValueError("a client certificate and its key go together (--tls-cert, --tls-key)")

    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(
        root_certificates=read(ca_file),
        private_key=read(key_file),
        certificate_chain=read(cert_file),
    )
