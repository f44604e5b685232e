"""rmgrpc_client: a typed client for the rmgrpc resource manager.

`AsyncClient` (asyncio) and `Client` (blocking) wrap every RPC of AllocatorService,
GpuManagerService and QuotaService; `watch_allocations` is a watch that survives
disconnects and compaction; `AsyncKeepalive`/`Keepalive` (`client.keepalive(id)`) renew an
allocation's lease until stopped; every failure is an `RmgrpcError`. Only the protobuf stubs
(`rmgrpc.v1`) are needed, not the server.
"""

from rmgrpc_client._async_client import AsyncClient
from rmgrpc_client._errors import (
    AbortedError,
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    RmgrpcError,
    UnauthenticatedError,
    UnavailableError,
)
from rmgrpc_client._paging import Page
from rmgrpc_client._sync_client import Client
from rmgrpc_client.keepalive import AllocationEnded, AsyncKeepalive, Keepalive
from rmgrpc_client.watch import AllocationWatch, Relisted, Relister, WatchItem, watch_allocations

__all__ = [
    "AbortedError",
    "AllocationEnded",
    "AllocationWatch",
    "AlreadyExistsError",
    "AsyncClient",
    "AsyncKeepalive",
    "Client",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "Keepalive",
    "NotFoundError",
    "OutOfRangeError",
    "Page",
    "PermissionDeniedError",
    "Relisted",
    "Relister",
    "ResourceExhaustedError",
    "RmgrpcError",
    "UnauthenticatedError",
    "UnavailableError",
    "WatchItem",
    "watch_allocations",
]
