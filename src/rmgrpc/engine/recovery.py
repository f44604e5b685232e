"""Recovery on start: the store's objects decoded back into the read model.

What was durable is what comes back. Time the server was down does not count against
a lease: leases get at least a fresh node lease to be renewed in. A row that does not
decode stops the start with one line naming the file and the object, never a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from google.protobuf.message import DecodeError

from rmgrpc import codec
from rmgrpc.config import Settings
from rmgrpc.model import (
    Allocation,
    AllocationState,
    EventKind,
    Node,
    NodeState,
    Quota,
    Reservation,
)
from rmgrpc.state import ClusterState
from rmgrpc.store import LoadedState, StoreError
from rmgrpc.v1 import allocator_pb2, gpu_manager_pb2, quota_pb2, reservation_pb2

T = TypeVar("T")


_DECODERS: dict[EventKind, Callable[[bytes], object]] = {
    EventKind.NODE: lambda d: codec.node_from_proto(gpu_manager_pb2.Node.FromString(d)),
    EventKind.QUOTA: lambda d: codec.quota_from_proto(quota_pb2.Quota.FromString(d)),
    EventKind.ALLOCATION: lambda d: codec.allocation_from_proto(
        allocator_pb2.Allocation.FromString(d)
    ),
    EventKind.RESERVATION: lambda d: codec.reservation_from_proto(
        reservation_pb2.Reservation.FromString(d)
    ),
}


def _decoded(loaded: LoadedState, path: str, kind: EventKind, cls: type[T]) -> list[T]:
    """Every stored object of `kind`; one that does not decode stops the start."""
    out = []
    for object_id, data in loaded.objects.get(kind, {}).items():
        try:
            obj = _DECODERS[kind](data)
        except (DecodeError, ValueError, KeyError) as exc:
            raise StoreError(
                f"database {path}: stored {kind.value} {object_id!r} cannot be decoded "
                f"({exc}); restore a backup, or move the file away to start empty"
            ) from None
        assert isinstance(obj, cls)
        out.append(obj)
    return out


def recover(loaded: LoadedState, path: str, settings: Settings, now: float) -> ClusterState:
    """The read model as of `loaded.last_revision`."""
    state = ClusterState()
    for node in _decoded(loaded, path, EventKind.NODE, Node):
        # The lease is status, not stored: every agent-reported node holds one, and
        # gets a full one after a restart to find the server again.
        if not node.simulated and node.state != NodeState.DOWN:
            node.lease_expire_time = now + settings.node_lease_seconds
        state.put_node(node)
    for quota in _decoded(loaded, path, EventKind.QUOTA, Quota):
        state.quotas[quota.tenant] = quota
    for r in _decoded(loaded, path, EventKind.RESERVATION, Reservation):
        state.reservations[r.id] = r
    allocations = _decoded(loaded, path, EventKind.ALLOCATION, Allocation)
    allocations.sort(key=lambda a: (a.seq, a.id))
    for a in allocations:
        if a.state == AllocationState.ALLOCATED and a.lease_expire_time is not None:
            a.lease_expire_time = max(
                a.lease_expire_time, now + min(a.lease_seconds, settings.node_lease_seconds)
            )
        state.add(a, now)
    return state
