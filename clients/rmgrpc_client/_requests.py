"""Request messages built from keyword arguments, shared by the async and sync clients."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence

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
    no_requeue: bool = False,
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
        no_requeue=no_requeue,
    )


def quota_message(
    *,
    tenant: str,
    parent: str,
    guaranteed: resources_pb2.Resources | None,
    limit: resources_pb2.Resources | None,
    weight: float,
    budget: quota_pb2.Budget | None,
    policy: quota_pb2.Quota | None = None,
) -> quota_pb2.Quota:
    """A Quota; unset `guaranteed`/`limit`/`budget` stay unset (limit unset = unbounded).
    `policy` carries the preemption policy fields, `lending_limit`, and a `weight` it has
    set (the way to send weight 0, which `weight` itself takes as "default"); the rest of
    it is ignored."""
    quota = quota_pb2.Quota(tenant=tenant, parent=parent)
    if policy is not None:
        quota.within_tenant_preemption = policy.within_tenant_preemption
        quota.reclaim_from_others = policy.reclaim_from_others
        quota.preemption_while_borrowing = policy.preemption_while_borrowing
        quota.borrowing_max_priority = policy.borrowing_max_priority
    if weight:  # 0 leaves it unset: the server's default
        quota.weight = weight
    if policy is not None:
        if policy.HasField("weight"):
            quota.weight = policy.weight
        if policy.HasField("lending_limit"):
            quota.lending_limit.CopyFrom(policy.lending_limit)
    if guaranteed is not None:
        quota.guaranteed.CopyFrom(guaranteed)
    if limit is not None:
        quota.limit.CopyFrom(limit)
    if budget is not None:
        quota.budget.CopyFrom(budget)
    return quota


def quota_request(
    quota: quota_pb2.Quota, update_mask: Sequence[str] | None, etag: str
) -> quota_pb2.SetQuotaRequest:
    """A SetQuotaRequest; `update_mask` None sends no mask (a full replace)."""
    request = quota_pb2.SetQuotaRequest(quota=quota, etag=etag)
    if update_mask is not None:
        # Present even when empty: an empty mask changes nothing, no mask replaces all.
        request.update_mask.SetInParent()
        request.update_mask.paths.extend(update_mask)
    return request


def quota_update_mask(
    *,
    parent: str | None,
    guaranteed: resources_pb2.Resources | None,
    limit: resources_pb2.Resources | None,
    weight: float | None,
    budget: quota_pb2.Budget | None,
) -> list[str]:
    """The mask naming exactly what is given: a resource field counts as given when it
    is set in `guaranteed`/`limit` (a non-empty `gpus_by_model` replaces the whole map)."""
    mask = []
    if parent is not None:
        mask.append("parent")
    for name, resources in (("guaranteed", guaranteed), ("limit", limit)):
        if resources is None:
            continue
        for field in ("gpus", "cpu_millis", "memory_bytes"):
            if resources.HasField(field):
                mask.append(f"{name}.{field}")
        if resources.gpus_by_model:
            mask.append(f"{name}.gpus_by_model")
    if weight is not None:
        mask.append("weight")
    if budget is not None:
        mask.append("budget")
    return mask


def quota_update_request(
    tenant: str,
    *,
    parent: str | None,
    guaranteed: resources_pb2.Resources | None,
    limit: resources_pb2.Resources | None,
    weight: float | None,
    budget: quota_pb2.Budget | None,
    etag: str,
) -> quota_pb2.SetQuotaRequest:
    """The SetQuotaRequest of `update_quota`: only what is given, named in the mask."""
    mask = quota_update_mask(
        parent=parent, guaranteed=guaranteed, limit=limit, weight=weight, budget=budget
    )
    quota = quota_message(
        tenant=tenant,
        parent=parent or "",
        guaranteed=guaranteed,
        limit=limit,
        weight=0.0,
        budget=budget,
    )
    if weight is not None:
        quota.weight = weight  # 0 included: it is a weight of its own
    return quota_request(quota, mask, etag)
