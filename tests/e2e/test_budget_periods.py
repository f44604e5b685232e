"""Calendar budget periods end to end: set with SetQuota and the CLI, shown by GetQuota,
the CLI and GetCostReport, refused with a field violation when given with a length,
carried by budget alerts, and a refusal that lifts on the 1st of the month."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2

from rmgrpc.clock import ManualClock
from rmgrpc.server import RunningServer, start
from rmgrpc.v1 import (
    allocator_pb2,
    allocator_pb2_grpc,
    quota_pb2,
    quota_pb2_grpc,
    resources_pb2,
    telemetry_pb2,
    telemetry_pb2_grpc,
)
from rmgrpc_client.cli import main
from tests.conftest import make_settings
from tests.e2e.helpers import detail, field_violations

# 21:00 UTC on Jan 31 2027: three hours before the month ends.
JAN31 = datetime(2027, 1, 31, 21, tzinfo=UTC).timestamp()
FEB1 = datetime(2027, 2, 1, tzinfo=UTC).timestamp()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[RunningServer, ManualClock]]:
    clock = ManualClock(JAN31)
    settings = make_settings(
        tmp_path,
        gpu_hour_prices="H100=4.0",
        cpu_core_hour_price=0.0,
        memory_gib_hour_price=0.0,
        watch_progress_seconds=0.1,
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


def allocate(tenant: str, gpus: int = 1, **kw: int) -> allocator_pb2.AllocateRequest:
    return allocator_pb2.AllocateRequest(
        tenant=tenant, count=1, shape=resources_pb2.Shape(gpus=gpus), **kw
    )


async def tick(running: RunningServer) -> None:
    await running.engine.committer.wait(running.engine.cost.tick())


async def test_cli_sets_a_monthly_budget_and_get_quota_shows_it(
    served: tuple[RunningServer, ManualClock],
    channel: grpc.aio.Channel,
    capsys: pytest.CaptureFixture[str],
) -> None:
    running, _ = served
    server = ["--server", f"127.0.0.1:{running.port}"]
    quotas = quota_pb2_grpc.QuotaServiceStub(channel)
    args = [*server, "quota", "set", "org", "--budget", "50", "--budget-period", "3600"]
    assert await asyncio.to_thread(main, args) == 0
    capsys.readouterr()
    # Only the period changes; the length it replaces is cleared with it.
    args = [*server, "quota", "set", "org", "--budget-period", "month"]
    assert await asyncio.to_thread(main, args) == 0
    assert "budget:     50/month" in capsys.readouterr().out
    got = (await quotas.GetQuota(quota_pb2.GetQuotaRequest(tenant="org"))).quota.budget
    assert (got.amount, got.period_seconds, got.period) == (50, 0, quota_pb2.BUDGET_PERIOD_MONTH)
    assert await asyncio.to_thread(main, [*server, "quota", "list"]) == 0
    assert "50/month" in capsys.readouterr().out
    # And back to a length.
    args = [*server, "quota", "set", "org", "--budget-period", "86400"]
    assert await asyncio.to_thread(main, args) == 0
    got = (await quotas.GetQuota(quota_pb2.GetQuotaRequest(tenant="org"))).quota.budget
    assert (got.period_seconds, got.period) == (86400, quota_pb2.BUDGET_PERIOD_UNSPECIFIED)
    bad = [*server, "quota", "set", "org", "--budget-period", "fortnight"]
    assert await asyncio.to_thread(main, bad) == 2
    assert "not day, week, month or a number of seconds" in capsys.readouterr().err


async def test_a_period_and_a_length_together_are_invalid(
    served: tuple[RunningServer, ManualClock], channel: grpc.aio.Channel
) -> None:
    quotas = quota_pb2_grpc.QuotaServiceStub(channel)
    budget = quota_pb2.Budget(amount=5, period_seconds=3600, period=quota_pb2.BUDGET_PERIOD_DAY)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await quotas.SetQuota(
            quota_pb2.SetQuotaRequest(quota=quota_pb2.Quota(tenant="org", budget=budget))
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not both" in field_violations(err.value)["quota.budget.period"]
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await quotas.GetQuota(quota_pb2.GetQuotaRequest(tenant="org"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND  # nothing was written


async def test_a_monthly_budget_refuses_until_the_first_and_alerts_say_which_month(
    served: tuple[RunningServer, ManualClock],
    channel: grpc.aio.Channel,
    capsys: pytest.CaptureFixture[str],
) -> None:
    running, clock = served
    allocator = allocator_pb2_grpc.AllocatorServiceStub(channel)
    quotas = quota_pb2_grpc.QuotaServiceStub(channel)
    telemetry = telemetry_pb2_grpc.TelemetryServiceStub(channel)
    budget = quota_pb2.Budget(amount=10, period=quota_pb2.BUDGET_PERIOD_MONTH)
    await quotas.SetQuota(
        quota_pb2.SetQuotaRequest(quota=quota_pb2.Quota(tenant="org", budget=budget))
    )
    await allocator.Allocate(allocate("org/a"))  # 4 an hour
    clock.advance(2.5 * 3600)  # 23:30 on Jan 31: 10 of 10 spent in January
    await tick(running)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await allocator.Allocate(allocate("org/b"))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    (violation,) = detail(err.value, error_details_pb2.QuotaFailure).violations
    assert violation.description == "budget of 'org' is spent: 10.00 of 10.00 this month"
    report = await telemetry.GetCostReport(telemetry_pb2.GetCostReportRequest(tenant="org"))
    row = {t.tenant: t for t in report.tenants}["org"]
    assert (row.budget_period, row.budget_spent) == (quota_pb2.BUDGET_PERIOD_MONTH, 10)
    server = ["--server", f"127.0.0.1:{running.port}"]
    assert await asyncio.to_thread(main, [*server, "cost", "--tenant", "org"]) == 0
    rows = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()}
    assert "10.00/10 per month" in rows["org"]

    clock.advance(1800)  # 00:00 Feb 1
    await tick(running)
    usage = (await quotas.GetUsage(quota_pb2.GetUsageRequest(tenant="org"))).usage
    assert usage.cost == 0 and usage.budget_used_fraction == 0
    placed = (await allocator.Allocate(allocate("org/b"))).allocation
    assert placed.state == allocator_pb2.ALLOCATION_STATE_ALLOCATED

    watch = allocator.WatchAllocations(
        allocator_pb2.WatchAllocationsRequest(start_revision=1, tenant="org", budget_alerts=True)
    )
    alerts = []
    async for event in watch:
        if event.type == allocator_pb2.ALLOCATION_EVENT_TYPE_PROGRESS:
            break
        if event.type == allocator_pb2.ALLOCATION_EVENT_TYPE_BUDGET_ALERT:
            alerts.append(event.budget_alert)
    watch.cancel()
    assert [a.percent for a in alerts] == [50, 75, 90, 100]
    assert {a.period for a in alerts} == {quota_pb2.BUDGET_PERIOD_MONTH}
    assert {a.period_start.seconds for a in alerts} == {
        int(datetime(2027, 1, 1, tzinfo=UTC).timestamp())
    }
    assert clock.now() == FEB1


async def test_cli_watch_prints_budget_alerts(
    served: tuple[RunningServer, ManualClock],
    channel: grpc.aio.Channel,
    capsys: pytest.CaptureFixture[str],
) -> None:
    running, clock = served
    allocator = allocator_pb2_grpc.AllocatorServiceStub(channel)
    quotas = quota_pb2_grpc.QuotaServiceStub(channel)
    budget = quota_pb2.Budget(amount=10, period=quota_pb2.BUDGET_PERIOD_MONTH)
    await quotas.SetQuota(
        quota_pb2.SetQuotaRequest(quota=quota_pb2.Quota(tenant="org", budget=budget))
    )
    a = (await allocator.Allocate(allocate("org/a"))).allocation  # 4 an hour
    clock.advance(2 * 3600)  # 23:00: 8 of 10 spent: 50 and 75 %
    await tick(running)
    await allocator.ReleaseAllocation(allocator_pb2.ReleaseAllocationRequest(id=a.id))
    server = ["--server", f"127.0.0.1:{running.port}"]
    # CREATED, PLACED, 50 %, 75 %, ENDED: five events from the start.
    watch = [*server, "watch", "--tenant", "org", "--budget-alerts", "--from-revision", "1"]
    assert await asyncio.to_thread(main, [*watch, "--limit", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    alerts = [line.split(" ", 1)[1] for line in lines if "BUDGET_ALERT" in line]
    assert alerts == [
        "BUDGET_ALERT org 50% spent 8.00 of 10.00 this month (from 2027-01-01)",
        "BUDGET_ALERT org 75% spent 8.00 of 10.00 this month (from 2027-01-01)",
    ]
    assert len(lines) == 5 and sum(a.id in line for line in lines) == 3
    # Without the flag: the allocation's events only.
    assert await asyncio.to_thread(main, [*watch[:-3], "--from-revision", "1", "--limit", "3"]) == 0
    assert "BUDGET_ALERT" not in capsys.readouterr().out
    # Budget alerts are per tenant: not with a node filter (the server says why).
    bad = [*server, "watch", "--node", "sim-node-0", "--budget-alerts"]
    assert await asyncio.to_thread(main, bad) == 1
    assert "budget_alerts" in capsys.readouterr().err
