"""Domain objects survive the trip through their protobuf form (the stored form too)."""

from __future__ import annotations

import pytest

from rmgrpc import codec
from rmgrpc.model import (
    Allocation,
    AllocationState,
    Budget,
    Gpu,
    GpuHealth,
    GpuMetrics,
    Node,
    NodeState,
    Placement,
    Quota,
    Resources,
    Shape,
)
from rmgrpc.v1 import allocator_pb2, gpu_manager_pb2, quota_pb2


def test_allocation_round_trip() -> None:
    a = Allocation(
        id="a-1",
        tenant="org/team",
        count=2,
        shape=Shape.of(4, "H100", 8000, 1 << 34, {"zone": "a", "rack": "r1"}),
        request_id="req",
        priority=7,
        lease_seconds=60,
        max_duration_seconds=3600,
        state=AllocationState.PREEMPTED,
        placements=(Placement("n1", (0, 1, 2, 3)), Placement("n2", (4, 5, 6, 7))),
        state_reason="preempted",
        revision=42,
        create_time=1_800_000_000.25,
        allocate_time=1_800_000_001.5,
        lease_expire_time=1_800_000_061.5,
        max_end_time=1_800_003_601.5,
        end_time=1_800_000_030.0,
        grace_end_time=1_800_000_060.0,
        preempted_by="a-0",
        seq=40,
    )
    data = codec.allocation_to_proto(a).SerializeToString()
    back = codec.allocation_from_proto(allocator_pb2.Allocation.FromString(data))
    assert back == a


def test_pending_fields_only_show_while_pending() -> None:
    a = Allocation(
        id="a",
        tenant="t",
        count=1,
        shape=Shape(gpus=1),
        state=AllocationState.ALLOCATED,
        pending_reason="stale",
        queue_position=3,
    )
    msg = codec.allocation_to_proto(a)
    assert msg.pending_reason == "" and msg.queue_position == 0


@pytest.mark.parametrize("state", list(AllocationState))
@pytest.mark.parametrize(
    ("position", "estimate"),
    [(None, None), (4, None), (2, (1_800_000_090.5, "")), (0, (None, "x"))],
)
def test_a_revision_s_message_with_its_status_added_is_the_full_message(
    state: AllocationState, position: int | None, estimate: tuple[float | None, str] | None
) -> None:
    """Answers about PENDING work copy the message its event carries and add the status
    (`add_status`): the same message `allocation_to_proto` builds with the status."""
    a = Allocation(
        id="a",
        tenant="org/a",
        count=1,
        shape=Shape(gpus=2),
        state=state,
        pending_reason="no node with 2 free GPUs",
        queue_position=7,
        create_time=1_800_000_000.0,
        revision=5,
        seq=5,
    )
    full = codec.allocation_to_proto(a, position=position, estimate=estimate)
    msg = codec.allocation_to_proto(a, status=False)
    assert msg.queue_position == 0 and not msg.HasField("estimated_start_time")
    codec.add_status(msg, a, position, estimate)
    assert msg == full


def test_node_round_trip_and_holders() -> None:
    node = Node(
        id="n1",
        cpu_millis=64000,
        memory_bytes=1 << 40,
        labels={"zone": "a"},
        gpus=[
            Gpu(0, "GPU-0", "H100", 80 << 30),
            Gpu(
                1,
                "GPU-1",
                "H100",
                80 << 30,
                GpuHealth.UNHEALTHY,
                GpuMetrics(55.0, 1 << 30, 70.0, 300.0, 1, 2, 1_800_000_000.0),
            ),
        ],
        state=NodeState.CORDONED,
        state_reason="maintenance",
        last_heartbeat_time=1.5,
        lease_expire_time=31.5,
        revision=9,
    )
    msg = codec.node_to_proto(node, {("n1", 0): ("a-1", "org")})
    assert msg.gpus[0].allocation_id == "a-1" and msg.gpus[0].tenant == "org"
    assert msg.gpus[1].allocation_id == ""
    back = codec.node_from_proto(gpu_manager_pb2.Node.FromString(msg.SerializeToString()))
    assert back == node


def test_quota_round_trip_keeps_unset_limits_unbounded() -> None:
    q = Quota(
        tenant="org/team",
        parent="org",
        guaranteed=Resources(gpus=2),
        limit=Resources(gpus=8, memory_bytes=None, gpus_by_model={"H100": 4}),
        weight=2.5,
        budget=Budget(100.0, 86400),
        revision=3,
        update_time=12.0,
    )
    back = codec.quota_from_proto(
        quota_pb2.Quota.FromString(codec.quota_to_proto(q).SerializeToString())
    )
    assert back == q
    assert back.limit.cpu_millis is None and back.guaranteed.gpus == 2


def test_timestamps_keep_sub_second_precision() -> None:
    stamp = codec.ts(1_800_000_000.123456)
    assert stamp is not None
    assert abs(codec.from_ts(stamp, True) - 1_800_000_000.123456) < 1e-6  # type: ignore[operator]
    assert codec.ts(None) is None
