"""Preemption through a real server (2 simulated nodes of 8 GPUs, no grace, no minimum
runtime): a guarantee reclaimed from an indivisible borrower, and the per-tenant
preemption policies as SetQuota/GetQuota carry them."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc
import pytest

from rmgrpc.server import RunningServer
from rmgrpc.v1 import allocator_pb2 as pb
from rmgrpc.v1 import allocator_pb2_grpc, quota_pb2, quota_pb2_grpc
from rmgrpc.v1.resources_pb2 import Resources, Shape
from tests.e2e.helpers import eventually, field_violations


@pytest.fixture
def alloc(channel: grpc.aio.Channel) -> allocator_pb2_grpc.AllocatorServiceStub:
    return allocator_pb2_grpc.AllocatorServiceStub(channel)


@pytest.fixture
def quota(channel: grpc.aio.Channel) -> quota_pb2_grpc.QuotaServiceStub:
    return quota_pb2_grpc.QuotaServiceStub(channel)


async def test_guarantee_is_reclaimed_from_an_indivisible_gang(
    alloc: allocator_pb2_grpc.AllocatorServiceStub, quota: quota_pb2_grpc.QuotaServiceStub
) -> None:
    """Issue 9: a 2x8 gang is what makes its tenant (guaranteed 8) borrow; the owner of
    the other guarantee of 8 reclaims it whole, though that takes the borrower to 0."""
    for tenant in ("borrower", "owner"):
        await quota.SetQuota(
            quota_pb2.SetQuotaRequest(
                quota=quota_pb2.Quota(tenant=tenant, guaranteed=Resources(gpus=8))
            )
        )
    gang = (
        await alloc.Allocate(
            pb.AllocateRequest(tenant="borrower", count=2, shape=Shape(gpus=8), priority=5)
        )
    ).allocation
    assert gang.state == pb.ALLOCATION_STATE_ALLOCATED
    back = (
        await alloc.Allocate(pb.AllocateRequest(tenant="owner", count=1, shape=Shape(gpus=8)))
    ).allocation
    placed = await eventually(
        lambda: alloc.GetAllocation(pb.GetAllocationRequest(id=back.id)),
        lambda r: r.allocation.state == pb.ALLOCATION_STATE_ALLOCATED,
    )
    assert len(placed.allocation.placements[0].gpu_indices) == 8
    victim = (await alloc.GetAllocation(pb.GetAllocationRequest(id=gang.id))).allocation
    assert victim.state == pb.ALLOCATION_STATE_PREEMPTED
    assert victim.preempted_by == back.id
    assert "reclaims its guaranteed quota from borrower borrower" in victim.state_reason
    usage = (await quota.GetUsage(quota_pb2.GetUsageRequest(tenant="owner"))).usage
    assert usage.held.gpus == 8


async def test_preemption_policies_round_trip_and_bad_values_are_refused(
    quota: quota_pb2_grpc.QuotaServiceStub,
) -> None:
    """The policies are stored and shown by GetQuota; defaults are written out; an enum
    value no one defined is INVALID_ARGUMENT naming the field."""
    await quota.SetQuota(quota_pb2.SetQuotaRequest(quota=quota_pb2.Quota(tenant="plain")))
    got = (await quota.GetQuota(quota_pb2.GetQuotaRequest(tenant="plain"))).quota
    assert got.within_tenant_preemption == quota_pb2.WITHIN_TENANT_PREEMPTION_LOWER_PRIORITY
    assert got.reclaim_from_others == quota_pb2.RECLAIM_POLICY_ANY
    assert got.preemption_while_borrowing == quota_pb2.BORROWING_PREEMPTION_ALWAYS
    await quota.SetQuota(
        quota_pb2.SetQuotaRequest(
            quota=quota_pb2.Quota(
                tenant="strict",
                within_tenant_preemption=quota_pb2.WITHIN_TENANT_PREEMPTION_NEVER,
                reclaim_from_others=quota_pb2.RECLAIM_POLICY_LOWER_PRIORITY,
                preemption_while_borrowing=quota_pb2.BORROWING_PREEMPTION_UP_TO_PRIORITY,
                borrowing_max_priority=3,
            )
        )
    )
    got = (await quota.GetQuota(quota_pb2.GetQuotaRequest(tenant="strict"))).quota
    assert got.within_tenant_preemption == quota_pb2.WITHIN_TENANT_PREEMPTION_NEVER
    assert got.reclaim_from_others == quota_pb2.RECLAIM_POLICY_LOWER_PRIORITY
    assert got.preemption_while_borrowing == quota_pb2.BORROWING_PREEMPTION_UP_TO_PRIORITY
    assert got.borrowing_max_priority == 3
    bad = quota_pb2.Quota(tenant="bad")
    bad.reclaim_from_others = 42  # type: ignore[assignment]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await quota.SetQuota(quota_pb2.SetQuotaRequest(quota=bad))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "quota.reclaim_from_others" in field_violations(err.value)


async def test_cli_sets_and_shows_the_policies(server: RunningServer) -> None:
    """`rmgrpcctl quota set` flags for the policies; `quota get` shows them in words."""
    ctl = [sys.executable, "-m", "rmgrpc_client.cli", "--server", f"127.0.0.1:{server.port}"]

    def call(*argv: str) -> str:
        done = subprocess.run([*ctl, *argv], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    await asyncio.to_thread(
        call,
        "quota",
        "set",
        "org/a",
        "--preempt-within",
        "lower-or-newer",
        "--reclaim",
        "never",
        "--preempt-while-borrowing",
        "up-to-priority",
        "--borrowing-max-priority",
        "-2",
    )
    out = await asyncio.to_thread(call, "quota", "get", "org/a")
    assert (
        "own: lower or newer equal priority; others: never; while borrowing: up to priority -2"
        in out
    )
