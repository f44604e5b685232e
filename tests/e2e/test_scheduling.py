"""Fair share, quotas, preemption, packing and gangs through a real server.

The server runs on 2 simulated nodes of 8 GPUs with no preemption grace and no
minimum runtime, so convergence happens within a few scheduling cycles.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2

from rmgrpc.server import RunningServer, start
from rmgrpc.v1 import allocator_pb2 as pb
from rmgrpc.v1 import allocator_pb2_grpc, quota_pb2, quota_pb2_grpc
from rmgrpc.v1.resources_pb2 import Resources, Shape
from tests.conftest import make_settings
from tests.e2e.helpers import detail, eventually, field_violations

ALLOCATED = pb.ALLOCATION_STATE_ALLOCATED
PENDING = pb.ALLOCATION_STATE_PENDING


def one_gpu(tenant: str, **kw: object) -> pb.AllocateRequest:
    return pb.AllocateRequest(tenant=tenant, count=1, shape=Shape(gpus=1), **kw)  # type: ignore[arg-type]


async def held_gpus(stub: allocator_pb2_grpc.AllocatorServiceStub) -> Counter[str]:
    listed = await stub.ListAllocations(
        pb.ListAllocationsRequest(states=[ALLOCATED], page_size=1000)
    )
    held: Counter[str] = Counter()
    for a in listed.allocations:
        held[a.tenant] += sum(len(p.gpu_indices) for p in a.placements)
    return held


@pytest.fixture
def alloc(channel: grpc.aio.Channel) -> allocator_pb2_grpc.AllocatorServiceStub:
    return allocator_pb2_grpc.AllocatorServiceStub(channel)


@pytest.fixture
def quota(channel: grpc.aio.Channel) -> quota_pb2_grpc.QuotaServiceStub:
    return quota_pb2_grpc.QuotaServiceStub(channel)


async def flood(stub: allocator_pb2_grpc.AllocatorServiceStub, tenant: str, n: int) -> None:
    for _ in range(n):
        await stub.Allocate(one_gpu(tenant))


async def test_equal_weights_converge_to_an_even_split(
    alloc: allocator_pb2_grpc.AllocatorServiceStub,
) -> None:
    await flood(alloc, "a", 16)
    assert (await held_gpus(alloc))["a"] == 16
    await flood(alloc, "b", 16)
    held = await eventually(lambda: held_gpus(alloc), lambda h: h["a"] == 8 and h["b"] == 8)
    assert held == Counter({"a": 8, "b": 8})


async def test_weights_three_to_one_converge_to_twelve_and_four(
    alloc: allocator_pb2_grpc.AllocatorServiceStub, quota: quota_pb2_grpc.QuotaServiceStub
) -> None:
    await quota.SetQuota(quota_pb2.SetQuotaRequest(quota=quota_pb2.Quota(tenant="big", weight=3)))
    await quota.SetQuota(quota_pb2.SetQuotaRequest(quota=quota_pb2.Quota(tenant="small", weight=1)))
    await flood(alloc, "small", 16)
    await flood(alloc, "big", 16)
    held = await eventually(lambda: held_gpus(alloc), lambda h: h["big"] == 12 and h["small"] == 4)
    assert held == Counter({"big": 12, "small": 4})


async def test_small_requests_leave_a_whole_node_free(
    alloc: allocator_pb2_grpc.AllocatorServiceStub,
) -> None:
    smalls = [(await alloc.Allocate(one_gpu("t"))).allocation for _ in range(4)]
    assert len({a.placements[0].node_id for a in smalls}) == 1
    whole = (
        await alloc.Allocate(pb.AllocateRequest(tenant="t", count=1, shape=Shape(gpus=8)))
    ).allocation
    assert whole.state == ALLOCATED
    assert whole.placements[0].node_id != smalls[0].placements[0].node_id


async def test_borrower_is_preempted_when_the_owner_returns(
    alloc: allocator_pb2_grpc.AllocatorServiceStub, quota: quota_pb2_grpc.QuotaServiceStub
) -> None:
    await quota.SetQuota(
        quota_pb2.SetQuotaRequest(
            quota=quota_pb2.Quota(tenant="owner", guaranteed=Resources(gpus=8))
        )
    )
    borrowed = [(await alloc.Allocate(one_gpu("borrower"))).allocation for _ in range(16)]
    assert all(a.state == ALLOCATED for a in borrowed)
    usage = (await quota.GetUsage(quota_pb2.GetUsageRequest(tenant="borrower"))).usage
    assert usage.held.gpus == 16
    back = (
        await alloc.Allocate(pb.AllocateRequest(tenant="owner", count=1, shape=Shape(gpus=8)))
    ).allocation
    placed = await eventually(
        lambda: alloc.GetAllocation(pb.GetAllocationRequest(id=back.id)),
        lambda r: r.allocation.state == ALLOCATED,
    )
    assert len(placed.allocation.placements[0].gpu_indices) == 8
    victims = [
        (await alloc.GetAllocation(pb.GetAllocationRequest(id=a.id))).allocation for a in borrowed
    ]
    preempted = [v for v in victims if v.state == pb.ALLOCATION_STATE_PREEMPTED]
    assert len(preempted) == 8  # the fewest that make room
    assert all(v.preempted_by == back.id for v in preempted)
    owner = (await quota.GetUsage(quota_pb2.GetUsageRequest(tenant="owner"))).usage
    assert owner.held.gpus == 8 and owner.guaranteed.gpus == 8


async def test_blocked_gang_does_not_stop_small_requests_and_is_placed(
    alloc: allocator_pb2_grpc.AllocatorServiceStub,
) -> None:
    first = (await alloc.Allocate(one_gpu("small"))).allocation
    gang = (
        await alloc.Allocate(pb.AllocateRequest(tenant="big", count=2, shape=Shape(gpus=8)))
    ).allocation
    assert gang.state == PENDING
    later = (await alloc.Allocate(one_gpu("small"))).allocation
    assert later.state == ALLOCATED  # admitted past the blocked gang
    await alloc.ReleaseAllocation(pb.ReleaseAllocationRequest(id=first.id))
    await alloc.ReleaseAllocation(pb.ReleaseAllocationRequest(id=later.id))
    placed = await eventually(
        lambda: alloc.GetAllocation(pb.GetAllocationRequest(id=gang.id)),
        lambda r: r.allocation.state == ALLOCATED,
    )
    assert sum(len(p.gpu_indices) for p in placed.allocation.placements) == 16


async def test_limit_is_never_exceeded_and_over_limit_request_is_refused(
    alloc: allocator_pb2_grpc.AllocatorServiceStub, quota: quota_pb2_grpc.QuotaServiceStub
) -> None:
    await quota.SetQuota(
        quota_pb2.SetQuotaRequest(quota=quota_pb2.Quota(tenant="capped", limit=Resources(gpus=4)))
    )
    answers = [(await alloc.Allocate(one_gpu("capped"))).allocation for _ in range(6)]
    assert [a.state for a in answers] == [ALLOCATED] * 4 + [PENDING] * 2
    assert "capped" in answers[-1].pending_reason
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await alloc.Allocate(pb.AllocateRequest(tenant="capped", count=1, shape=Shape(gpus=8)))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert detail(err.value, error_details_pb2.QuotaFailure).violations


async def test_parent_bounds_children(
    alloc: allocator_pb2_grpc.AllocatorServiceStub, quota: quota_pb2_grpc.QuotaServiceStub
) -> None:
    await quota.SetQuota(
        quota_pb2.SetQuotaRequest(quota=quota_pb2.Quota(tenant="org", limit=Resources(gpus=6)))
    )
    for team in ("org/x", "org/y"):
        for _ in range(4):
            await alloc.Allocate(one_gpu(team))
    held = await held_gpus(alloc)
    assert held["org/x"] + held["org/y"] == 6
    usage = (await quota.GetUsage(quota_pb2.GetUsageRequest(tenant="org"))).usage
    assert usage.held.gpus == 6 and usage.pending.gpus == 2


async def test_higher_priority_preempts_lower(
    alloc: allocator_pb2_grpc.AllocatorServiceStub,
) -> None:
    low = (
        await alloc.Allocate(
            pb.AllocateRequest(tenant="t", count=2, shape=Shape(gpus=8), priority=0)
        )
    ).allocation
    assert low.state == ALLOCATED
    high = (
        await alloc.Allocate(
            pb.AllocateRequest(tenant="u", count=1, shape=Shape(gpus=4), priority=10)
        )
    ).allocation
    placed = await eventually(
        lambda: alloc.GetAllocation(pb.GetAllocationRequest(id=high.id)),
        lambda r: r.allocation.state == ALLOCATED,
    )
    assert placed.allocation.state == ALLOCATED
    victim = (await alloc.GetAllocation(pb.GetAllocationRequest(id=low.id))).allocation
    assert victim.state == pb.ALLOCATION_STATE_PREEMPTED


async def test_dry_run_names_its_victims_and_changes_nothing(
    alloc: allocator_pb2_grpc.AllocatorServiceStub,
) -> None:
    low = (
        await alloc.Allocate(pb.AllocateRequest(tenant="t", count=2, shape=Shape(gpus=8)))
    ).allocation
    answer = await alloc.Allocate(
        pb.AllocateRequest(tenant="u", count=1, shape=Shape(gpus=8), priority=5, dry_run=True)
    )
    assert answer.dry_run
    assert list(answer.preempted_allocation_ids) == [low.id]
    still = (await alloc.GetAllocation(pb.GetAllocationRequest(id=low.id))).allocation
    assert still.state == ALLOCATED and still.revision == low.revision


async def test_quota_crud_and_validation(quota: quota_pb2_grpc.QuotaServiceStub) -> None:
    q = quota_pb2.Quota(
        tenant="org/team",
        guaranteed=Resources(gpus=2),
        limit=Resources(gpus=8, gpus_by_model={"H100": 4}),
        weight=2,
    )
    saved = (await quota.SetQuota(quota_pb2.SetQuotaRequest(quota=q))).quota
    assert saved.parent == "org" and saved.revision > 0
    got = (await quota.GetQuota(quota_pb2.GetQuotaRequest(tenant="org/team"))).quota
    assert got == saved
    listed = await quota.ListQuotas(quota_pb2.ListQuotasRequest(parent="org"))
    assert [x.tenant for x in listed.quotas] == ["org/team"]
    await quota.DeleteQuota(quota_pb2.DeleteQuotaRequest(tenant="org/team"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await quota.GetQuota(quota_pb2.GetQuotaRequest(tenant="org/team"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await quota.DeleteQuota(quota_pb2.DeleteQuotaRequest(tenant="org/team"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    bad = quota_pb2.Quota(
        tenant="", guaranteed=Resources(gpus=9), limit=Resources(gpus=3), weight=-1
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await quota.SetQuota(quota_pb2.SetQuotaRequest(quota=bad))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {"quota.tenant", "quota.guaranteed.gpus", "quota.weight"} <= set(
        field_violations(err.value)
    )


async def test_preemption_cap_and_min_runtime_hold(tmp_path: Path) -> None:
    running: RunningServer = await start(
        make_settings(tmp_path, max_preemptions_per_cycle=2, min_runtime_seconds=3600.0)
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = allocator_pb2_grpc.AllocatorServiceStub(ch)
            for _ in range(16):
                await stub.Allocate(one_gpu("low"))
            high = (
                await stub.Allocate(
                    pb.AllocateRequest(tenant="high", count=1, shape=Shape(gpus=1), priority=10)
                )
            ).allocation
            # Everything placed is younger than the minimum runtime: nobody is preempted.
            assert high.state == PENDING
            assert (await held_gpus(stub))["low"] == 16
    finally:
        await running.stop(0)


async def test_victims_keep_their_gpus_for_the_grace_period(tmp_path: Path) -> None:
    running = await start(make_settings(tmp_path, preemption_grace_seconds=1.0))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = allocator_pb2_grpc.AllocatorServiceStub(ch)
            low = (
                await stub.Allocate(pb.AllocateRequest(tenant="low", count=2, shape=Shape(gpus=8)))
            ).allocation
            high = (
                await stub.Allocate(
                    pb.AllocateRequest(tenant="high", count=1, shape=Shape(gpus=8), priority=5)
                )
            ).allocation
            assert high.state == PENDING
            assert "grace" in high.pending_reason
            victim = (await stub.GetAllocation(pb.GetAllocationRequest(id=low.id))).allocation
            assert victim.state == pb.ALLOCATION_STATE_PREEMPTED
            assert victim.HasField("grace_end_time") and victim.preempted_by == high.id
            placed = await eventually(
                lambda: stub.GetAllocation(pb.GetAllocationRequest(id=high.id)),
                lambda r: r.allocation.state == ALLOCATED,
            )
            assert placed.allocation.allocate_time.ToNanoseconds() >= (
                victim.grace_end_time.ToNanoseconds()
            )
    finally:
        await running.stop(0)
