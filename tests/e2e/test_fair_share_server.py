"""Issue 9 part B through a real server: hierarchical fair share as GetUsage reports it,
weight 0 and lending limits on quotas, and requests no node could ever host.

The server runs on 2 simulated nodes of 8 GPUs (no preemption grace, no minimum runtime).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import grpc
import pytest

from rmgrpc.server import start
from rmgrpc.v1 import allocator_pb2 as pb
from rmgrpc.v1 import allocator_pb2_grpc, quota_pb2, quota_pb2_grpc
from rmgrpc.v1.resources_pb2 import Resources, Shape
from tests.conftest import make_settings
from tests.e2e.helpers import eventually, field_violations

ALLOCATED = pb.ALLOCATION_STATE_ALLOCATED
PENDING = pb.ALLOCATION_STATE_PENDING
REJECTED = pb.ALLOCATION_STATE_REJECTED


@pytest.fixture
def alloc(channel: grpc.aio.Channel) -> allocator_pb2_grpc.AllocatorServiceStub:
    return allocator_pb2_grpc.AllocatorServiceStub(channel)


@pytest.fixture
def quota(channel: grpc.aio.Channel) -> quota_pb2_grpc.QuotaServiceStub:
    return quota_pb2_grpc.QuotaServiceStub(channel)


def gpus(tenant: str, n: int = 1, count: int = 1, **shape: object) -> pb.AllocateRequest:
    return pb.AllocateRequest(tenant=tenant, count=count, shape=Shape(gpus=n, **shape))  # type: ignore[arg-type]


async def held(stub: allocator_pb2_grpc.AllocatorServiceStub) -> Counter[str]:
    listed = await stub.ListAllocations(
        pb.ListAllocationsRequest(states=[ALLOCATED], page_size=1000)
    )
    out: Counter[str] = Counter()
    for a in listed.allocations:
        n = sum(len(p.gpu_indices) for p in a.placements)
        out[a.tenant] += n
        out[a.tenant.split("/")[0]] += n if "/" in a.tenant else 0
    return out


async def test_parent_and_sibling_split_by_the_tree_and_usage_agrees(
    alloc: allocator_pb2_grpc.AllocatorServiceStub, quota: quota_pb2_grpc.QuotaServiceStub
) -> None:
    """Issue 9's case on 16 GPUs: p's three busy children against sibling s end at 8 and
    8 (flat ordering gave 12 and 4), and GetUsage's fair shares say the same. A filler
    holds the cluster while the flood queues up, so a pass serves it in the fair order
    (on an idle cluster requests are simply placed as they come). The filler runs at a
    higher priority, so no pass during the flood reclaims it for a tenant below its fair
    share (which would place flood requests before the flood is complete)."""
    filler = gpus("filler", 8)
    filler.priority = 1
    fill = [(await alloc.Allocate(filler)).allocation for _ in range(2)]
    assert all(a.state == ALLOCATED for a in fill)
    for _ in range(8):
        for t in ("p/a", "p/b", "p/c", "s"):
            assert (await alloc.Allocate(gpus(t))).allocation.state == PENDING
    for a in fill:
        await alloc.ReleaseAllocation(pb.ReleaseAllocationRequest(id=a.id))
    got = await eventually(lambda: held(alloc), lambda h: sum(h[t] for t in ("p", "s")) == 16)
    assert (got["p"], got["s"]) == (8, 8)
    for t in ("p", "s"):
        u = (await quota.GetUsage(quota_pb2.GetUsageRequest(tenant=t))).usage
        assert u.fair_share_resources.gpus == 8
        assert u.fair_share == pytest.approx(0.5)
        assert u.order_explanation.startswith("ordered among the top-level tenants by 8 GPUs")
    child = (await quota.GetUsage(quota_pb2.GetUsageRequest(tenant="p/a"))).usage
    assert child.order_explanation.startswith("ordered among the children of p by ")
    assert child.usage_half_life_seconds == 3600  # the default


async def test_weight_zero_and_lending_limit_are_kept_and_shown(
    alloc: allocator_pb2_grpc.AllocatorServiceStub, quota: quota_pb2_grpc.QuotaServiceStub
) -> None:
    q = quota_pb2.Quota(
        tenant="idle",
        guaranteed=Resources(gpus=8),
        lending_limit=Resources(gpus=2),
        weight=0,
    )
    saved = (await quota.SetQuota(quota_pb2.SetQuotaRequest(quota=q))).quota
    assert saved.HasField("weight") and saved.weight == 0
    assert saved.lending_limit.gpus == 2
    got = (await quota.GetQuota(quota_pb2.GetQuotaRequest(tenant="idle"))).quota
    assert (got.weight, got.lending_limit.gpus) == (0, 2)
    # Unset weight is 1, as before.
    plain = await quota.SetQuota(quota_pb2.SetQuotaRequest(quota=quota_pb2.Quota(tenant="x")))
    assert plain.quota.weight == 1
    # Others may borrow only 2 of idle's 8 guaranteed GPUs: 16 - 6 = 10.
    for _ in range(16):
        await alloc.Allocate(gpus("b"))
    # (quick decisions and passes alike keep off the kept capacity)
    got_held = await eventually(lambda: held(alloc), lambda h: h["b"] == 10)
    assert got_held["b"] == 10
    waiting = await alloc.ListAllocations(
        pb.ListAllocationsRequest(tenant="b", states=[PENDING], page_size=100)
    )
    assert any(
        "kept idle for the guarantee of idle" in a.pending_reason for a in waiting.allocations
    )


async def test_bad_lending_limits_and_weights_are_invalid_argument(
    quota: quota_pb2_grpc.QuotaServiceStub,
) -> None:
    cases = [
        (
            quota_pb2.Quota(
                tenant="t", guaranteed=Resources(gpus=2), lending_limit=Resources(gpus=3)
            ),
            "quota.lending_limit.gpus",
        ),
        (quota_pb2.Quota(tenant="t", lending_limit=Resources(gpus=1)), "quota.lending_limit.gpus"),
        (quota_pb2.Quota(tenant="t", weight=-1), "quota.weight"),
    ]
    for q, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await quota.SetQuota(quota_pb2.SetQuotaRequest(quota=q))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in field_violations(err.value)


async def test_requests_that_never_fit_are_rejected_at_once(
    alloc: allocator_pb2_grpc.AllocatorServiceStub,
) -> None:
    cases = [
        (gpus("t", 16), "2 have fewer than 16 GPUs of one model in total"),
        (gpus("t", 1, gpu_model="B200"), "2 have no B200 GPUs"),
        (gpus("t", 1, node_selector={"zone": "mars"}), "2 lack label zone=mars"),
        (
            pb.AllocateRequest(tenant="t", count=1, shape=Shape(cpu_millis=10_000_000)),
            "2 have less than 10000 CPU in total",
        ),
        (gpus("t", 8, count=3), "could host only 2 of 3 replicas"),
    ]
    for request, words in cases:
        a = (await alloc.Allocate(request)).allocation
        assert a.state == REJECTED, a
        assert a.state_reason.startswith("never fits: "), a.state_reason
        assert words in a.state_reason, a.state_reason
        assert "healthy" not in a.state_reason
        # Durable and visible like any other allocation.
        got = (await alloc.GetAllocation(pb.GetAllocationRequest(id=a.id))).allocation
        assert got.state == REJECTED
    dry = (
        await alloc.Allocate(
            pb.AllocateRequest(tenant="t", count=1, shape=Shape(gpus=16), dry_run=True)
        )
    ).allocation
    assert dry.state == REJECTED and dry.state_reason.startswith("never fits")


async def test_never_fits_pending_when_configured(tmp_path: Path) -> None:
    running = await start(make_settings(tmp_path, never_fits="pending"))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = allocator_pb2_grpc.AllocatorServiceStub(ch)
            a = (await stub.Allocate(gpus("t", 16))).allocation
            assert a.state == PENDING
            assert a.pending_reason.startswith("never fits: no registered node could ever host")
    finally:
        await running.stop(0)
