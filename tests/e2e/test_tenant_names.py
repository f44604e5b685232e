"""Tenant subtrees are whole path segments: "org/a" is not a prefix of "org/ab", nor "org" of
"org2". Checked where a tenant names a subtree: ListAllocations and WatchAllocations
filters (replayed from revision 1 and live) and GetUsage.

Tenants: org (a root with work of its own), its children org/a and org/ab, org/a/x below
org/a, and the root org2. Each holds a distinct power of two of GPUs, so any sum names
exactly which tenants it counted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from rmgrpc.server import RunningServer, start
from rmgrpc.v1 import allocator_pb2 as pb
from rmgrpc.v1 import allocator_pb2_grpc, quota_pb2_grpc
from rmgrpc.v1 import quota_pb2 as qpb
from rmgrpc.v1.resources_pb2 import Resources, Shape
from tests.conftest import make_settings

PROGRESS = pb.ALLOCATION_EVENT_TYPE_PROGRESS
ALLOCATED = pb.ALLOCATION_STATE_ALLOCATED
PENDING = pb.ALLOCATION_STATE_PENDING
# tenant → (replicas, GPUs per replica). org2 first: it needs two whole nodes.
WORK = {"org2": (2, 8), "org/ab": (1, 8), "org/a/x": (1, 4), "org/a": (1, 2), "org": (1, 1)}
# tenant → parent, set explicitly as quotas (the same as the path would give).
PARENTS = {"org": "", "org2": "", "org/a": "org", "org/ab": "org", "org/a/x": "org/a"}
# filter → the tenants it covers.
SUBTREES = {
    "org": {"org", "org/a", "org/ab", "org/a/x"},
    "org/a": {"org/a", "org/a/x"},
    "org/ab": {"org/ab"},
    "org/a/x": {"org/a/x"},
    "org2": {"org2"},
    "or": set(),
}


@pytest.fixture
async def stubs(
    tmp_path: Path,
) -> AsyncIterator[tuple[allocator_pb2_grpc.AllocatorServiceStub, quota_pb2_grpc.QuotaServiceStub]]:
    # 4 nodes x 8 GPUs: room for all of WORK (31 GPUs).
    running: RunningServer = await start(
        make_settings(tmp_path, simulated_nodes=4, watch_progress_seconds=0.2)
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        yield allocator_pb2_grpc.AllocatorServiceStub(ch), quota_pb2_grpc.QuotaServiceStub(ch)
    await running.stop(0)


def in_subtree(tenant: str, root: str) -> bool:
    return tenant == root or tenant.startswith(root + "/")


async def allocate_all(alloc: allocator_pb2_grpc.AllocatorServiceStub) -> dict[str, str]:
    """One allocation per tenant, all placed; allocation id → tenant."""
    out = {}
    for tenant, (count, gpus) in WORK.items():
        resp = await alloc.Allocate(
            pb.AllocateRequest(
                tenant=tenant,
                count=count,
                shape=Shape(gpus=gpus, cpu_millis=100, memory_bytes=1 << 20),
            )
        )
        assert resp.allocation.state == ALLOCATED, resp.allocation
        out[resp.allocation.id] = tenant
    return out


async def read_until(call: grpc.aio.UnaryStreamCall, until: int) -> list[pb.AllocationEvent]:
    """Non-progress events of a watch until a message at or past `until`."""
    out: list[pb.AllocationEvent] = []
    async with asyncio.timeout(10):
        while True:
            ev = await call.read()
            assert ev is not grpc.aio.EOF, "watch ended"
            if ev.type != PROGRESS:
                out.append(ev)
            if ev.revision >= until:
                return out


async def current_revision(alloc: allocator_pb2_grpc.AllocatorServiceStub) -> int:
    return (await alloc.ListAllocations(pb.ListAllocationsRequest(page_size=1))).revision


async def test_list_allocations_tenant_filter_takes_whole_segments(
    stubs: tuple[allocator_pb2_grpc.AllocatorServiceStub, quota_pb2_grpc.QuotaServiceStub],
) -> None:
    """ListAllocations `tenant`: "this tenant and its subtree" — org/a lists org/a/x but
    not its sibling org/ab; org lists its children but not org2; "or" lists nothing."""
    alloc, _ = stubs
    owner = await allocate_all(alloc)
    for root, covered in SUBTREES.items():
        listed = await alloc.ListAllocations(pb.ListAllocationsRequest(tenant=root))
        got = {a.id for a in listed.allocations}
        want = {aid for aid, t in owner.items() if t in covered}
        assert got == want, (root, sorted(owner[i] for i in got))


async def test_watch_tenant_filter_takes_whole_segments_replayed_and_live(
    stubs: tuple[allocator_pb2_grpc.AllocatorServiceStub, quota_pb2_grpc.QuotaServiceStub],
) -> None:
    """WatchAllocations `tenant`: only the tenant and its subtree, by whole path segments,
    both when replaying the log from revision 1 and for events that happen while watching."""
    alloc, _ = stubs
    owner = await allocate_all(alloc)
    now = await current_revision(alloc)

    # Replayed from revision 1: creations and placements of the subtree's allocations.
    for root, covered in SUBTREES.items():
        call = alloc.WatchAllocations(pb.WatchAllocationsRequest(start_revision=1, tenant=root))
        events = await read_until(call, now)
        call.cancel()
        assert {e.allocation.tenant for e in events} == covered, root
        assert {e.allocation.id for e in events} == {a for a, t in owner.items() if t in covered}

    # Live: streams opened from now on (attached once their first progress message is
    # in), then every allocation ends and a new one starts in each tenant.
    calls = {
        root: alloc.WatchAllocations(pb.WatchAllocationsRequest(start_revision=0, tenant=root))
        for root in SUBTREES
    }
    for call in calls.values():
        await read_until(call, 0)
    for aid in owner:
        await alloc.ReleaseAllocation(pb.ReleaseAllocationRequest(id=aid))
    again = await allocate_all(alloc)
    end = await current_revision(alloc)
    for root, call in calls.items():
        events = await read_until(call, end)
        call.cancel()
        covered = SUBTREES[root]
        assert {e.allocation.tenant for e in events} == covered, root
        want = {a for a, t in {**owner, **again}.items() if t in covered}
        assert {e.allocation.id for e in events} == want, root
        assert all(e.revision > now for e in events)


async def test_usage_of_a_tenant_counts_its_subtree_only(
    stubs: tuple[allocator_pb2_grpc.AllocatorServiceStub, quota_pb2_grpc.QuotaServiceStub],
) -> None:
    """GetUsage: held, pending and counts of a tenant cover its subtree (quota parents set
    explicitly), and never a sibling whose name merely starts the same: org/a excludes
    org/ab; org includes org/a and org/ab but not org2."""
    alloc, quotas = stubs
    for tenant, parent in PARENTS.items():
        limit = Resources(gpus=8) if tenant == "org/ab" else Resources()
        await quotas.SetQuota(
            qpb.SetQuotaRequest(quota=qpb.Quota(tenant=tenant, parent=parent, limit=limit))
        )
    await allocate_all(alloc)
    # org/ab is at its limit of 8: one more GPU waits.
    waiting = await alloc.Allocate(
        pb.AllocateRequest(
            tenant="org/ab", count=1, shape=Shape(gpus=1, cpu_millis=100, memory_bytes=1 << 20)
        )
    )
    assert waiting.allocation.state == PENDING, waiting.allocation

    for root, covered in SUBTREES.items():
        usage = (await quotas.GetUsage(qpb.GetUsageRequest(tenant=root))).usage
        held = sum(c * g for t, (c, g) in WORK.items() if t in covered)
        pending = 1 if "org/ab" in covered else 0
        assert usage.held.gpus == held, (root, usage)
        assert usage.running_allocations == len(covered), (root, usage)
        assert usage.pending.gpus == pending, (root, usage)
        assert usage.pending_allocations == pending, (root, usage)
