"""Domain objects to protobuf messages and back.

The same messages are the API's answers and what the store keeps: an object's
stored form is its API form, so one codec serves both and a stored event can be
streamed to a watcher as it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from rmgrpc.model import (
    Allocation,
    AllocationState,
    BorrowingPreemption,
    Budget,
    BudgetPeriod,
    Gpu,
    GpuHealth,
    GpuMetrics,
    Node,
    NodeState,
    Placement,
    Quota,
    ReclaimPolicy,
    Reservation,
    ReservationState,
    Resources,
    Shape,
    WithinTenantPreemption,
)
from rmgrpc.v1 import allocator_pb2, gpu_manager_pb2, quota_pb2, reservation_pb2, resources_pb2


def ts(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    out = Timestamp()
    whole = math.floor(seconds)
    out.seconds = whole
    out.nanos = min(round((seconds - whole) * 1e9), 999_999_999)
    return out


def set_stamps(msg: Any, times: Iterable[tuple[str, float | None]]) -> None:
    """Sets each named Timestamp field of `msg` whose time is not None."""
    for name, seconds in times:
        stamp = ts(seconds)
        if stamp is not None:
            getattr(msg, name).CopyFrom(stamp)


def from_ts(msg: Timestamp, present: bool) -> float | None:
    return msg.seconds + msg.nanos / 1e9 if present else None


def shape_to_proto(shape: Shape) -> resources_pb2.Shape:
    return resources_pb2.Shape(
        gpus=shape.gpus,
        gpu_model=shape.gpu_model,
        cpu_millis=shape.cpu_millis,
        memory_bytes=shape.memory_bytes,
        node_selector=dict(shape.node_selector),
    )


def shape_from_proto(msg: resources_pb2.Shape) -> Shape:
    return Shape.of(msg.gpus, msg.gpu_model, msg.cpu_millis, msg.memory_bytes, msg.node_selector)


def resources_to_proto(res: Resources) -> resources_pb2.Resources:
    out = resources_pb2.Resources(gpus_by_model=res.gpus_by_model)
    if res.gpus is not None:
        out.gpus = res.gpus
    if res.cpu_millis is not None:
        out.cpu_millis = res.cpu_millis
    if res.memory_bytes is not None:
        out.memory_bytes = res.memory_bytes
    return out


def resources_from_proto(msg: resources_pb2.Resources) -> Resources:
    return Resources(
        gpus=msg.gpus if msg.HasField("gpus") else None,
        cpu_millis=msg.cpu_millis if msg.HasField("cpu_millis") else None,
        memory_bytes=msg.memory_bytes if msg.HasField("memory_bytes") else None,
        gpus_by_model=dict(msg.gpus_by_model),
    )


UuidOf = Callable[[str, int], str]


def placement_to_proto(p: Placement, uuid_of: UuidOf | None = None) -> resources_pb2.Placement:
    return resources_pb2.Placement(
        node_id=p.node_id,
        gpu_indices=p.gpu_indices,
        gpu_uuids=[uuid_of(p.node_id, i) for i in p.gpu_indices] if uuid_of else [],
    )


def allocation_to_proto(
    a: Allocation,
    uuid_of: UuidOf | None = None,
    *,
    status: bool = True,
    position: int | None = None,
    estimate: tuple[float | None, str] | None = None,
) -> allocator_pb2.Allocation:
    """`status=False` leaves out what is status, not state (`queue_position`): the
    encoding of a revision (events, the store) never carries it. `position` is the
    queue position to show (the last pass's); without it, `a.queue_position`.
    `estimate` is a PENDING allocation's (start time or None, reason), also status."""
    msg = allocator_pb2.Allocation(
        id=a.id,
        tenant=a.tenant,
        request_id=a.request_id,
        count=a.count,
        shape=shape_to_proto(a.shape),
        priority=a.priority,
        lease_seconds=a.lease_seconds,
        max_duration_seconds=a.max_duration_seconds,
        reservation_id=a.reservation_id,
        state=int(a.state),  # type: ignore[arg-type]
        placements=[placement_to_proto(p, uuid_of) for p in a.placements],
        pending_reason=a.pending_reason if a.state == AllocationState.PENDING else "",
        state_reason=a.state_reason,
        revision=a.revision,
        preempted_by=a.preempted_by,
        create_revision=a.seq,
        request_digest=a.request_digest,
        requeued_from=a.requeued_from,
        requeued_as=a.requeued_as,
        no_requeue=a.no_requeue,
    )
    times = (
        "create_time",
        "allocate_time",
        "lease_expire_time",
        "max_end_time",
        "end_time",
        "grace_end_time",
    )
    set_stamps(msg, ((name, getattr(a, name)) for name in times))
    if status:
        add_status(msg, a, position, estimate)
    return msg


def add_status(
    msg: allocator_pb2.Allocation,
    a: Allocation,
    position: int | None = None,
    estimate: tuple[float | None, str] | None = None,
) -> None:
    """Adds a PENDING allocation's status (queue position, start estimate) to `msg`, the
    encoding of its revision (`allocation_to_proto` with `status=False`)."""
    if a.state != AllocationState.PENDING:
        return
    msg.queue_position = a.queue_position if position is None else position
    if estimate is not None:
        start, msg.estimate_reason = estimate
        set_stamps(msg, (("estimated_start_time", start),))


def allocation_from_proto(msg: allocator_pb2.Allocation) -> Allocation:
    def t(name: str) -> float | None:
        return from_ts(getattr(msg, name), msg.HasField(name))  # type: ignore[arg-type]

    return Allocation(
        id=msg.id,
        tenant=msg.tenant,
        count=msg.count,
        shape=shape_from_proto(msg.shape),
        request_id=msg.request_id,
        priority=msg.priority,
        lease_seconds=msg.lease_seconds,
        max_duration_seconds=msg.max_duration_seconds,
        reservation_id=msg.reservation_id,
        state=AllocationState(msg.state),
        placements=tuple(Placement(p.node_id, tuple(p.gpu_indices)) for p in msg.placements),
        pending_reason=msg.pending_reason,
        queue_position=msg.queue_position,
        state_reason=msg.state_reason,
        revision=msg.revision,
        create_time=t("create_time") or 0.0,
        allocate_time=t("allocate_time"),
        lease_expire_time=t("lease_expire_time"),
        max_end_time=t("max_end_time"),
        end_time=t("end_time"),
        grace_end_time=t("grace_end_time"),
        preempted_by=msg.preempted_by,
        seq=msg.create_revision,
        request_digest=msg.request_digest,
        requeued_from=msg.requeued_from,
        requeued_as=msg.requeued_as,
        no_requeue=msg.no_requeue,
    )


def metrics_to_proto(m: GpuMetrics) -> gpu_manager_pb2.GpuMetrics:
    msg = gpu_manager_pb2.GpuMetrics(
        utilization_percent=m.utilization_percent,
        memory_used_bytes=m.memory_used_bytes,
        temperature_celsius=m.temperature_celsius,
        power_watts=m.power_watts,
        ecc_errors=m.ecc_errors,
        xid_errors=m.xid_errors,
        recent_xids=m.recent_xids,
    )
    stamp = ts(m.sample_time) if m.sample_time else None
    if stamp is not None:
        msg.sample_time.CopyFrom(stamp)
    return msg


def metrics_from_proto(msg: gpu_manager_pb2.GpuMetrics) -> GpuMetrics:
    return GpuMetrics(
        utilization_percent=msg.utilization_percent,
        memory_used_bytes=msg.memory_used_bytes,
        temperature_celsius=msg.temperature_celsius,
        power_watts=msg.power_watts,
        ecc_errors=msg.ecc_errors,
        xid_errors=msg.xid_errors,
        sample_time=from_ts(msg.sample_time, msg.HasField("sample_time")) or 0.0,
        recent_xids=tuple(msg.recent_xids),
    )


def gpu_to_proto(
    node_id: str, g: Gpu, holder: tuple[str, str] | None = None, *, status: bool = True
) -> gpu_manager_pb2.Gpu:
    msg = gpu_manager_pb2.Gpu(
        index=g.index,
        uuid=g.uuid,
        model=g.model,
        memory_bytes=g.memory_bytes,
        health=int(g.health),  # type: ignore[arg-type]
        node_id=node_id,
        cordoned=g.cordoned,
        health_reason=g.health_reason,
    )
    if status and g.metrics is not None:
        msg.metrics.CopyFrom(metrics_to_proto(g.metrics))
    if holder is not None:
        msg.allocation_id, msg.tenant = holder
    return msg


def node_to_proto(
    n: Node,
    holders: Mapping[tuple[str, int], tuple[str, str]] | None = None,
    allocated: Resources | None = None,
    *,
    status: bool = True,
) -> gpu_manager_pb2.Node:
    """`status=False` leaves out what is status, not state (GPU metrics, the last
    heartbeat and the lease's end): the encoding of a revision never carries it."""
    holders = holders or {}
    msg = gpu_manager_pb2.Node(
        id=n.id,
        cpu_millis=n.cpu_millis,
        memory_bytes=n.memory_bytes,
        labels=n.labels,
        gpus=[gpu_to_proto(n.id, g, holders.get((n.id, g.index)), status=status) for g in n.gpus],
        state=int(n.state),  # type: ignore[arg-type]
        state_reason=n.state_reason,
        simulated=n.simulated,
        revision=n.revision,
        admin_state=int(n.admin_state),  # type: ignore[arg-type]
    )
    if allocated is not None:
        msg.allocated.CopyFrom(resources_to_proto(allocated))
    if not status:
        return msg
    set_stamps(
        msg,
        (
            ("last_heartbeat_time", n.last_heartbeat_time or None),
            ("lease_expire_time", n.lease_expire_time),
        ),
    )
    return msg


def gpu_from_proto(msg: gpu_manager_pb2.Gpu) -> Gpu:
    return Gpu(
        index=msg.index,
        uuid=msg.uuid,
        model=msg.model,
        memory_bytes=msg.memory_bytes,
        health=GpuHealth(msg.health) if msg.health else GpuHealth.HEALTHY,
        metrics=metrics_from_proto(msg.metrics) if msg.HasField("metrics") else None,
        cordoned=msg.cordoned,
        health_reason=msg.health_reason,
    )


def node_from_proto(msg: gpu_manager_pb2.Node) -> Node:
    return Node(
        id=msg.id,
        cpu_millis=msg.cpu_millis,
        memory_bytes=msg.memory_bytes,
        labels=dict(msg.labels),
        gpus=[gpu_from_proto(g) for g in msg.gpus],
        state=NodeState(msg.state) if msg.state else NodeState.READY,
        state_reason=msg.state_reason,
        admin_state=NodeState(msg.admin_state) if msg.admin_state else NodeState.READY,
        simulated=msg.simulated,
        last_heartbeat_time=from_ts(msg.last_heartbeat_time, msg.HasField("last_heartbeat_time"))
        or 0.0,
        lease_expire_time=from_ts(msg.lease_expire_time, msg.HasField("lease_expire_time")),
        revision=msg.revision,
    )


def quota_to_proto(q: Quota) -> quota_pb2.Quota:
    msg = quota_pb2.Quota(
        tenant=q.tenant,
        parent=q.parent,
        guaranteed=resources_to_proto(q.guaranteed),
        limit=resources_to_proto(q.limit),
        weight=q.weight,
        revision=q.revision,
    )
    lend = resources_to_proto(q.lending_limit)
    if lend.ByteSize():
        msg.lending_limit.CopyFrom(lend)
    _preemption_policy_to_proto(q, msg)
    if q.budget is not None:
        msg.budget.CopyFrom(
            quota_pb2.Budget(
                amount=q.budget.amount,
                period_seconds=q.budget.period_seconds,
                stop_running=q.budget.stop_running,
                period=quota_pb2.BudgetPeriod.ValueType(q.budget.period),
            )
        )
    stamp = ts(q.update_time or None)
    if stamp is not None:
        msg.update_time.CopyFrom(stamp)
    return msg


def quota_from_proto(msg: quota_pb2.Quota) -> Quota:
    return Quota(
        tenant=msg.tenant,
        parent=msg.parent,
        guaranteed=resources_from_proto(msg.guaranteed),
        limit=resources_from_proto(msg.limit),
        # Rows written before weight had presence never held 0: absent means 1.
        weight=msg.weight if msg.HasField("weight") else 1.0,
        lending_limit=resources_from_proto(msg.lending_limit),
        budget=Budget(
            msg.budget.amount,
            msg.budget.period_seconds,
            msg.budget.stop_running,
            BudgetPeriod(msg.budget.period),
        )
        if msg.HasField("budget")
        else None,
        revision=msg.revision,
        update_time=from_ts(msg.update_time, msg.HasField("update_time")) or 0.0,
        **preemption_policy_from_proto(msg),
    )


def _preemption_policy_to_proto(q: Quota, msg: quota_pb2.Quota) -> None:
    # Enum values equal the proto ones; the defaults are written out, so GetQuota shows
    # what applies rather than UNSPECIFIED.
    msg.within_tenant_preemption = quota_pb2.WithinTenantPreemption.ValueType(
        q.within_tenant_preemption
    )
    msg.reclaim_from_others = quota_pb2.ReclaimPolicy.ValueType(q.reclaim_from_others)
    msg.preemption_while_borrowing = quota_pb2.BorrowingPreemption.ValueType(
        q.preemption_while_borrowing
    )
    msg.borrowing_max_priority = q.borrowing_max_priority


def preemption_policy_from_proto(msg: quota_pb2.Quota) -> dict[str, Any]:
    """UNSPECIFIED (and rows stored before these fields existed) take the defaults."""
    out: dict[str, Any] = {"borrowing_max_priority": msg.borrowing_max_priority}
    if msg.within_tenant_preemption:
        out["within_tenant_preemption"] = WithinTenantPreemption(msg.within_tenant_preemption)
    if msg.reclaim_from_others:
        out["reclaim_from_others"] = ReclaimPolicy(msg.reclaim_from_others)
    if msg.preemption_while_borrowing:
        out["preemption_while_borrowing"] = BorrowingPreemption(msg.preemption_while_borrowing)
    return out


def reservation_to_proto(
    r: Reservation, uuid_of: UuidOf | None = None
) -> reservation_pb2.Reservation:
    msg = reservation_pb2.Reservation(
        id=r.id,
        tenant=r.tenant,
        request_id=r.request_id,
        shape=shape_to_proto(r.shape),
        count=r.count,
        state=int(r.state),  # type: ignore[arg-type]
        placements=[placement_to_proto(p, uuid_of) for p in r.placements],
        revision=r.revision,
        state_reason=r.state_reason,
        create_revision=r.seq,
        request_digest=r.request_digest,
    )
    set_stamps(
        msg,
        (("start_time", r.start_time), ("end_time", r.end_time), ("create_time", r.create_time)),
    )
    return msg


def reservation_from_proto(msg: reservation_pb2.Reservation) -> Reservation:
    return Reservation(
        id=msg.id,
        tenant=msg.tenant,
        shape=shape_from_proto(msg.shape),
        count=msg.count,
        start_time=from_ts(msg.start_time, True) or 0.0,
        end_time=from_ts(msg.end_time, True) or 0.0,
        request_id=msg.request_id,
        state=ReservationState(msg.state),
        placements=tuple(Placement(p.node_id, tuple(p.gpu_indices)) for p in msg.placements),
        state_reason=msg.state_reason,
        revision=msg.revision,
        create_time=from_ts(msg.create_time, True) or 0.0,
        seq=msg.create_revision,
        request_digest=msg.request_digest,
    )
