"""Random operations against a real server; after each step the invariants hold, as a client
sees them: no GPU held twice, no tenant or parent over its limit, gangs whole, every
pending allocation explained with a distinct queue position, and the GPU listing agrees
with the allocations."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from rmgrpc.engine import Engine
from rmgrpc.scheduler.fairshare import Amount, Ledger
from rmgrpc.scheduler.placement import CapacityView
from rmgrpc.scheduler.snapshot import Snapshot
from rmgrpc.server import RunningServer, start
from rmgrpc.v1 import allocator_pb2 as pb
from rmgrpc.v1 import (
    allocator_pb2_grpc,
    gpu_manager_pb2,
    gpu_manager_pb2_grpc,
    quota_pb2,
    quota_pb2_grpc,
)
from rmgrpc.v1.resources_pb2 import Resources, Shape
from tests.conftest import make_settings

TENANTS = ["org/a", "org/b", "lab/x", "solo"]
LIMITS = {"org": 10, "org/a": 6, "lab/x": 5}


async def check(
    alloc: allocator_pb2_grpc.AllocatorServiceStub,
    nodes: gpu_manager_pb2_grpc.GpuManagerServiceStub,
    *,
    settled: bool = True,
) -> None:
    """`settled`: no request is in flight, so the last cycle has seen every allocation."""
    listed = await alloc.ListAllocations(pb.ListAllocationsRequest(page_size=1000))
    assert not listed.next_page_token
    holding = [a for a in listed.allocations if a.state == pb.ALLOCATION_STATE_ALLOCATED]
    held: dict[tuple[str, int], str] = {}
    per_tenant: Counter[str] = Counter()
    for a in holding:
        assert len(a.placements) == a.count, f"gang {a.id} not whole"
        for p in a.placements:
            assert len(p.gpu_indices) == a.shape.gpus
            for i in p.gpu_indices:
                key = (p.node_id, i)
                assert key not in held, f"GPU {key} held by {held[key]} and {a.id}"
                held[key] = a.id
        per_tenant[a.tenant] += a.count * a.shape.gpus
    for tenant, limit in LIMITS.items():
        used = sum(n for t, n in per_tenant.items() if t == tenant or t.startswith(tenant + "/"))
        assert used <= limit, f"{tenant} holds {used} > limit {limit}"
    pending = [a for a in listed.allocations if a.state == pb.ALLOCATION_STATE_PENDING]
    assert all(a.pending_reason for a in pending)
    if not settled:
        return  # the GPU listing below is a second read: others may have changed things
    assert sorted(a.queue_position for a in pending) == list(range(1, len(pending) + 1))
    gpus = (await nodes.ListGpus(gpu_manager_pb2.ListGpusRequest(page_size=1000))).gpus
    listed_holders = {(g.node_id, g.index): g.allocation_id for g in gpus if g.allocation_id}
    # The listing also shows preempted allocations still inside their grace period.
    assert {k: v for k, v in listed_holders.items() if v in {a.id for a in holding}} == held
    assert set(held) <= set(listed_holders)


def check_quick_ledger(engine: Engine) -> None:
    """The quick decisions' ledger, followed change by change across passes (rebuilt only
    on node and quota changes), says what a ledger built afresh says."""
    sched = engine.scheduling
    kept = sched._quick_ledger
    if kept is None:
        return
    holding = engine.state.holding()
    # Built as of time 0, so victims whose grace the clock has passed but whose timer has
    # not fired yet count as held, as the state (and the followed ledger) still counts them.
    fresh = Ledger(
        Snapshot(
            now=0.0,
            nodes=engine.state.nodes,
            allocations={a.id: a for a in holding},
            quotas=engine.state.quotas,
            config=engine.config,
        )
    )

    def amounts(table: dict[str, Amount]) -> dict[str, tuple[int, int, int, dict[str, int]]]:
        out = {
            t: (a.gpus, a.cpu, a.mem, {m: n for m, n in a.models.items() if n})
            for t, a in table.items()
        }
        return {t: v for t, v in out.items() if v != (0, 0, 0, {})}

    assert amounts(kept.held) == amounts(fresh.held)
    assert amounts(kept.leaving) == amounts(fresh.leaving)
    check_quick_view(engine)


def check_quick_view(engine: Engine) -> None:
    """The quick view, followed in place as holders come and go and passes move their holds
    for gangs and set-asides for preemptors, has free per node what one built afresh has:
    the same free GPUs of each model, CPU and memory, and the same hold."""
    sched = engine.scheduling
    if sched._quick is None:
        return
    followed = sched._quick[0]
    fresh, _, _ = sched._build_view(engine.state.holding())

    def free(view: CapacityView) -> dict[str, tuple[object, ...]]:
        return {
            nid: (
                {m: tuple(lst) for m, lst in n.free.items()},
                n.cpu_free,
                n.mem_free,
                n.held_for,
            )
            for nid, n in view.nodes.items()
        }

    assert free(followed) == free(fresh)
    assert followed.holders == fresh.holders


@dataclass
class Cluster:
    running: RunningServer
    alloc: allocator_pb2_grpc.AllocatorServiceStub
    nodes: gpu_manager_pb2_grpc.GpuManagerServiceStub


@asynccontextmanager
async def cluster(tmp_path: Path, grace: float, rng: random.Random) -> AsyncIterator[Cluster]:
    """3 simulated nodes of 8 GPUs with the LIMITS quotas (random guarantees and weights)."""
    running = await start(
        make_settings(tmp_path, simulated_nodes=3, preemption_grace_seconds=grace)
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            quotas = quota_pb2_grpc.QuotaServiceStub(ch)
            for tenant, limit in LIMITS.items():
                quota = quota_pb2.Quota(
                    tenant=tenant,
                    limit=Resources(gpus=limit),
                    guaranteed=Resources(gpus=rng.choice([0, min(limit, 2)])),
                    weight=rng.choice([1, 2, 3]),
                )
                await quotas.SetQuota(quota_pb2.SetQuotaRequest(quota=quota))
            yield Cluster(
                running,
                allocator_pb2_grpc.AllocatorServiceStub(ch),
                gpu_manager_pb2_grpc.GpuManagerServiceStub(ch),
            )
    finally:
        await running.stop(0)


async def allocate_or_release(c: Cluster, rng: random.Random, held: list[str]) -> None:
    """One random step: usually a random Allocate, else releasing one of `held`."""
    if rng.random() < 0.4 and held:
        request = pb.ReleaseAllocationRequest(id=held.pop(rng.randrange(len(held))))
        await c.alloc.ReleaseAllocation(request)
        return
    try:
        answer = await c.alloc.Allocate(
            pb.AllocateRequest(
                tenant=rng.choice(TENANTS),
                count=rng.choice([1, 1, 1, 2, 3]),
                shape=Shape(gpus=rng.choice([1, 1, 2, 4, 8])),
                priority=rng.choice([0, 0, 0, 5]),
            )
        )
        held.append(answer.allocation.id)
    except grpc.aio.AioRpcError as err:
        # Asking for more than a limit allows, in one request, is refused.
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("grace", [0.0, 0.05])
@pytest.mark.parametrize("seed", range(4))
async def test_random_operations_keep_the_invariants(
    tmp_path: Path, seed: int, grace: float
) -> None:
    rng = random.Random(seed)
    async with cluster(tmp_path, grace, rng) as c:
        held: list[str] = []
        for _ in range(120):
            op = rng.random()
            node = f"sim-node-{rng.randrange(3)}"
            if op < 0.8:
                await allocate_or_release(c, rng, held)
            elif op < 0.9:
                if rng.random() < 0.5:
                    await c.nodes.CordonNode(gpu_manager_pb2.CordonNodeRequest(node_id=node))
                else:
                    await c.nodes.UncordonNode(gpu_manager_pb2.UncordonNodeRequest(node_id=node))
            else:
                drained = await c.nodes.DrainNode(gpu_manager_pb2.DrainNodeRequest(node_id=node))
                # DRAINED at once when nothing holds capacity there (no grace, or empty).
                assert drained.node.state in (
                    gpu_manager_pb2.NODE_STATE_DRAINING,
                    gpu_manager_pb2.NODE_STATE_DRAINED,
                )
                await c.nodes.UncordonNode(gpu_manager_pb2.UncordonNodeRequest(node_id=node))
            check_quick_ledger(c.running.engine)  # between passes, too
            await c.running.engine.schedule_now()  # releases do not wait for their cycle
            await check(c.alloc, c.nodes)
            check_quick_ledger(c.running.engine)


@pytest.mark.parametrize("seed", range(3))
async def test_concurrent_random_operations_keep_the_invariants(tmp_path: Path, seed: int) -> None:
    async with cluster(tmp_path, 0.05, random.Random(seed)) as c:

        async def worker(n: int) -> None:
            rng = random.Random(seed * 100 + n)
            held: list[str] = []
            for _ in range(40):
                await allocate_or_release(c, rng, held)

        async def checker() -> None:
            for _ in range(20):
                await check(c.alloc, c.nodes, settled=False)
                # Mid-run, quick decisions and passes interleaved: the view follows each.
                check_quick_ledger(c.running.engine)

        await asyncio.gather(*(worker(n) for n in range(8)), checker())
        await c.running.engine.schedule_now()  # the last releases' cycle
        await check(c.alloc, c.nodes)
        check_quick_ledger(c.running.engine)
