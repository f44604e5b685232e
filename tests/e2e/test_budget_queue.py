"""Queued work and budgets end to end, on a fake clock: work queued before its tenant's
budget ran out stays PENDING with the budget as its reason once capacity frees, and starts
when the next month begins."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from rmgrpc.clock import ManualClock
from rmgrpc.engine import scheduling
from rmgrpc.server import RunningServer, start
from rmgrpc.v1 import allocator_pb2, allocator_pb2_grpc, quota_pb2, quota_pb2_grpc, resources_pb2
from tests.conftest import make_settings
from tests.e2e.helpers import eventually

PENDING = allocator_pb2.ALLOCATION_STATE_PENDING
ALLOCATED = allocator_pb2.ALLOCATION_STATE_ALLOCATED


@pytest.fixture
async def served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[RunningServer, ManualClock]]:
    # A changed pending reason is written at most every 30 s per request: the test
    # follows one request's reason as it changes, so it lifts that rate limit.
    monkeypatch.setattr(scheduling, "REASON_EVERY", 0.0)
    clock = ManualClock(datetime(2027, 1, 31, 23, tzinfo=UTC).timestamp())  # 23:00 UTC
    settings = make_settings(
        tmp_path, gpu_hour_prices="H100=4.0", cpu_core_hour_price=0.0, memory_gib_hour_price=0.0
    )
    running = await start(settings, clock)
    yield running, clock
    await running.stop(0)


@pytest.fixture
async def channel(
    served: tuple[RunningServer, ManualClock],
) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{served[0].port}") as ch:
        yield ch


def allocate(tenant: str, gpus: int) -> allocator_pb2.AllocateRequest:
    return allocator_pb2.AllocateRequest(
        tenant=tenant, count=1, shape=resources_pb2.Shape(gpus=gpus)
    )


async def tick(running: RunningServer) -> None:
    await running.engine.committer.wait(running.engine.cost.tick())


async def test_queued_work_waits_for_a_spent_budget_and_starts_next_month(
    served: tuple[RunningServer, ManualClock], channel: grpc.aio.Channel
) -> None:
    running, clock = served
    allocator = allocator_pb2_grpc.AllocatorServiceStub(channel)
    quotas = quota_pb2_grpc.QuotaServiceStub(channel)
    budget = quota_pb2.Budget(amount=12, period=quota_pb2.BUDGET_PERIOD_MONTH)
    await quotas.SetQuota(
        quota_pb2.SetQuotaRequest(quota=quota_pb2.Quota(tenant="org", budget=budget))
    )
    await allocator.Allocate(allocate("org/a", 4))  # 16 an hour
    other = (await allocator.Allocate(allocate("other", 8))).allocation
    await allocator.Allocate(allocate("other", 4))  # both nodes are full
    queued = (await allocator.Allocate(allocate("org/c", 8))).allocation
    assert queued.state == PENDING  # admitted to the queue: the budget was not spent yet
    clock.advance(50 * 60)  # 23:50: 13.33 of 12 spent
    await tick(running)
    await allocator.ReleaseAllocation(allocator_pb2.ReleaseAllocationRequest(id=other.id))

    async def get() -> allocator_pb2.Allocation:
        req = allocator_pb2.GetAllocationRequest(id=queued.id)
        return (await allocator.GetAllocation(req)).allocation

    waiting = await eventually(get, lambda a: a.pending_reason.startswith("budget of"))
    assert waiting.state == PENDING
    assert waiting.pending_reason == (
        "budget of 'org' is spent: 13.33 of 12.00 this month; "
        "starts with the next month or a raised budget"
    )
    clock.advance(10 * 60)  # 00:00 Feb 1: a new month, nothing spent in it
    await tick(running)
    started = await eventually(get, lambda a: a.state != PENDING)
    assert started.state == ALLOCATED
