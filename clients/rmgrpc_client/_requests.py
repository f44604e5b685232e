"""Request messages built from keyword arguments, shared by the async and sync clients."""

from __future__ import annotations

import uuid
from collections.abc import Mapping

from rmgrpc.v1 import allocator_pb2, quota_pb2, resources_pb2


def allocate_request(
    *,
    tenant: str,
    count: int,
    gpus: int,
    gpu_model: str,
    cpu_millis: int,
    memory_bytes: int,
    node_selector: Mapping[str, str] | None,
    priority: int,
    lease_seconds: int,
    max_duration_seconds: int,
    reservation_id: str,
    request_id: str | None,
    dry_run: bool,
) -> allocator_pb2.AllocateRequest:
    """An AllocateRequest; a fresh uuid4 `request_id` unless one is given, so that a retry
    of the same request object can never allocate twice."""
    return allocator_pb2.AllocateRequest(
        tenant=tenant,
        request_id=request_id if request_id is not None else str(uuid.uuid4()),
        count=count,
        shape=resources_pb2.Shape(
            gpus=gpus,
            gpu_model=gpu_model,
            cpu_millis=cpu_millis,
            memory_bytes=memory_bytes,
            node_selector=dict(node_selector or {}),
        ),
        priority=priority,
        lease_seconds=lease_seconds,
        max_duration_seconds=max_duration_seconds,
        reservation_id=reservation_id,
        dry_run=dry_run,
    )


def quota_message(
    *,
    tenant: str,
    parent: str,
    guaranteed: resources_pb2.Resources | None,
    limit: resources_pb2.Resources | None,
    weight: float,
    budget: quota_pb2.Budget | None,
) -> quota_pb2.Quota:
    """A Quota; unset `guaranteed`/`limit`/`budget` stay unset (limit unset = unbounded)."""
    quota = quota_pb2.Quota(tenant=tenant, parent=parent, weight=weight)
    if guaranteed is not None:
        quota.guaranteed.CopyFrom(guaranteed)
    if limit is not None:
        quota.limit.CopyFrom(limit)
    if budget is not None:
        quota.budget.CopyFrom(budget)
    return quota
