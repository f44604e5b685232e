"""What every connection to rmgrpc shares: the default address, auth metadata and the
channel options (transparent retry of UNAVAILABLE, which is safe because every mutating
RPC of rmgrpc is idempotent — Allocate through its `request_id`)."""

from __future__ import annotations

import json

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
