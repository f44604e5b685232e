"""Cost and budgets end to end: GetCostReport and GetUsage through a real server on a fake
clock, budget refusal as RESOURCE_EXHAUSTED + QuotaFailure, the CLI's `cost`, grpcurl, and
accrual across a kill -9 of a server process."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2

from rmgrpc import telemetry
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
from tests.conftest import ServerProcess, make_settings
from tests.e2e.helpers import detail, field_violations
from tests.e2e.test_grpcurl import GRPCURL, grpcurl

GIB = 1 << 30
DAY = 86400
# 2 GPUs, 8 cores, 32 GiB for an hour, at the prices below.
HOURLY = 2 * 4.0 + 8 * 0.05 + 32 * 0.01


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[RunningServer, ManualClock]]:
    clock = ManualClock()
    settings = make_settings(
        tmp_path,
        gpu_hour_prices="H100=4.0",
        cpu_core_hour_price=0.05,
        memory_gib_hour_price=0.01,
        watch_progress_seconds=0.1,  # a caught-up watch says so quickly
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


def allocate(
    tenant: str, gpus: int = 2, max_duration_seconds: int = 0, dry_run: bool = False
) -> allocator_pb2.AllocateRequest:
    shape = resources_pb2.Shape(gpus=gpus, cpu_millis=8000, memory_bytes=32 * GIB)
    return allocator_pb2.AllocateRequest(
        tenant=tenant,
        count=1,
        shape=shape,
        max_duration_seconds=max_duration_seconds,
        dry_run=dry_run,
    )


async def tick(running: RunningServer) -> None:
    await running.engine.committer.wait(running.engine.cost.tick())


async def test_cost_report_and_usage_of_a_90_minute_allocation(
    served: tuple[RunningServer, ManualClock], channel: grpc.aio.Channel
) -> None:
    running, clock = served
    allocator = allocator_pb2_grpc.AllocatorServiceStub(channel)
    quotas = quota_pb2_grpc.QuotaServiceStub(channel)
    telemetry = telemetry_pb2_grpc.TelemetryServiceStub(channel)
    await quotas.SetQuota(
        quota_pb2.SetQuotaRequest(
            quota=quota_pb2.Quota(
                tenant="org", budget=quota_pb2.Budget(amount=100, period_seconds=DAY)
            )
        )
    )
    a = (await allocator.Allocate(allocate("org/a"))).allocation
    await allocator.Allocate(allocate("org/b", gpus=0))
    clock.advance(3600)
    await tick(running)
    clock.advance(1800)
    await allocator.ReleaseAllocation(allocator_pb2.ReleaseAllocationRequest(id=a.id))
    await tick(running)

    report = await telemetry.GetCostReport(telemetry_pb2.GetCostReportRequest())
    rows = {t.tenant: t for t in report.tenants}
    a_cost = 1.5 * HOURLY
    b_cost = 1.5 * (8 * 0.05 + 32 * 0.01)
    assert rows["org/a"].cost == pytest.approx(a_cost)
    assert rows["org/a"].gpu_hours == pytest.approx(3.0)
    assert rows["org/a"].parent == "org"
    assert rows["org"].cost == pytest.approx(a_cost + b_cost)  # the subtree rolled up
    assert rows["org"].own_cost == 0 and rows["org"].parent == ""
    assert rows["org"].budget_amount == 100 and rows["org"].budget_period_seconds == DAY
    assert report.total_cost == pytest.approx(a_cost + b_cost)
    by_model = {m.model: m.cost for m in report.models}
    assert by_model == {"H100": pytest.approx(a_cost), "": pytest.approx(b_cost)}
    (day,) = report.days
    assert day.day.seconds == int(clock.now()) // DAY * DAY
    assert report.start_time.seconds == day.day.seconds
    assert report.end_time.seconds == day.day.seconds + DAY

    usage = (await quotas.GetUsage(quota_pb2.GetUsageRequest(tenant="org"))).usage
    assert usage.cost == pytest.approx(a_cost + b_cost)
    assert usage.budget_used_fraction == pytest.approx((a_cost + b_cost) / 100)
    own = (await quotas.GetUsage(quota_pb2.GetUsageRequest(tenant="org/a"))).usage
    assert own.cost == pytest.approx(a_cost) and own.budget_used_fraction == 0

    # One tenant's subtree, and a range that leaves the day out.
    only_b = await telemetry.GetCostReport(telemetry_pb2.GetCostReportRequest(tenant="org/b"))
    assert [t.tenant for t in only_b.tenants] == ["org/b"]
    assert only_b.total_cost == pytest.approx(b_cost)
    later = Timestamp(seconds=day.day.seconds + DAY)
    after = Timestamp(seconds=day.day.seconds + 2 * DAY)
    empty = await telemetry.GetCostReport(
        telemetry_pb2.GetCostReportRequest(start_time=later, end_time=after)
    )
    assert empty.total_cost == 0 and not empty.days


async def test_cost_report_validates_its_range(channel: grpc.aio.Channel) -> None:
    telemetry = telemetry_pb2_grpc.TelemetryServiceStub(channel)
    bad = [
        (
            telemetry_pb2.GetCostReportRequest(
                start_time=Timestamp(seconds=2000), end_time=Timestamp(seconds=1000)
            ),
            "end_time",
        ),
        (telemetry_pb2.GetCostReportRequest(start_time=Timestamp(seconds=-5)), "start_time"),
        (telemetry_pb2.GetCostReportRequest(end_time=Timestamp(nanos=-1)), "end_time"),
        (telemetry_pb2.GetCostReportRequest(tenant="bad tenant!"), "tenant"),
        # ManualClock's now is 2027-01-15: a start after it with no end is an empty range.
        (
            telemetry_pb2.GetCostReportRequest(start_time=Timestamp(seconds=1_900_000_000)),
            "start_time",
        ),
    ]
    for request, field in bad:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await telemetry.GetCostReport(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in field_violations(err.value)


async def test_a_budget_refuses_work_it_cannot_cover(
    served: tuple[RunningServer, ManualClock], channel: grpc.aio.Channel
) -> None:
    running, clock = served
    allocator = allocator_pb2_grpc.AllocatorServiceStub(channel)
    quotas = quota_pb2_grpc.QuotaServiceStub(channel)
    budget = quota_pb2.Budget(amount=HOURLY * 2.5, period_seconds=DAY)
    await quotas.SetQuota(
        quota_pb2.SetQuotaRequest(quota=quota_pb2.Quota(tenant="team", budget=budget))
    )
    await allocator.Allocate(allocate("team", max_duration_seconds=7200))
    clock.advance(3600)
    await tick(running)  # spent: one hour's worth; 1.5 hours' worth is left
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await allocator.Allocate(allocate("team", max_duration_seconds=7200))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    (violation,) = detail(err.value, error_details_pb2.QuotaFailure).violations
    assert violation.subject == "budget:team"
    assert "cannot cover" in violation.description
    # A dry run says the same and changes nothing.
    with pytest.raises(grpc.aio.AioRpcError) as dry:
        await allocator.Allocate(allocate("team", max_duration_seconds=7200, dry_run=True))
    assert dry.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await allocator.Allocate(allocate("team", max_duration_seconds=1200))  # this fits
    clock.advance(3600)
    await tick(running)  # both ran to their hard end: 2 + 1/3 hours of 2.5 spent

    def alerts(threshold: str) -> float | None:
        return running.metrics.registry.get_sample_value(
            "rmgrpc_budget_alerts_total", {"tenant": "team", "threshold": threshold}
        )

    assert [alerts(t) for t in ("50", "75", "90", "100")] == [1, 1, 1, None]
    usage = (await quotas.GetUsage(quota_pb2.GetUsageRequest(tenant="team"))).usage
    assert usage.budget_used_fraction == pytest.approx(2.333333 / 2.5)
    # The gauges say the same at their next refresh.
    await telemetry.StatePublisher(running.metrics, running.engine.hub).refresh(running.engine)
    ratio = running.metrics.registry.get_sample_value(
        "rmgrpc_tenant_budget_used_ratio", {"tenant": "team"}
    )
    assert ratio == pytest.approx(usage.budget_used_fraction)


async def test_cli_cost_prints_the_report(
    served: tuple[RunningServer, ManualClock],
    channel: grpc.aio.Channel,
    capsys: pytest.CaptureFixture[str],
) -> None:
    running, clock = served
    allocator = allocator_pb2_grpc.AllocatorServiceStub(channel)
    await allocator.Allocate(allocate("org/a"))
    clock.advance(3600)
    await tick(running)
    server = ["--server", f"127.0.0.1:{running.port}"]

    assert await asyncio.to_thread(main, [*server, "cost"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["TENANT", "COST", "OWN"]
    rows = {line.split()[0]: line.split() for line in lines[1:-1]}
    assert rows["org/a"][1] == f"{HOURLY:.2f}" and rows["org"][2] == "0.00"
    assert lines[-1].startswith(f"total: {HOURLY:.2f}")

    assert await asyncio.to_thread(main, [*server, "cost", "--by", "model"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == ["H100", f"{HOURLY:.2f}", "2.00"]

    since = ["--since", "2027-01-15", "--until", "2027-01-16T00:00:00Z"]
    args = [*server, "-o", "json", "cost", "--tenant", "org", "--by", "day", *since]
    assert await asyncio.to_thread(main, args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["days"][0]["day"] == "2027-01-15T00:00:00Z"
    assert doc["total_cost"] == pytest.approx(HOURLY)

    assert await asyncio.to_thread(main, [*server, "cost", "--since", "yesterday"]) == 2
    assert "--since: 'yesterday' is not a date" in capsys.readouterr().err


async def test_cli_sets_a_budget_that_stops_running_work(
    served: tuple[RunningServer, ManualClock],
    channel: grpc.aio.Channel,
    capsys: pytest.CaptureFixture[str],
) -> None:
    running, _ = served
    server = ["--server", f"127.0.0.1:{running.port}"]
    args = [*server, "quota", "set", "org", "--budget", "50", "--budget-period", "86400"]
    assert await asyncio.to_thread(main, [*args, "--budget-stop-running"]) == 0
    quotas = quota_pb2_grpc.QuotaServiceStub(channel)
    got = (await quotas.GetQuota(quota_pb2.GetQuotaRequest(tenant="org"))).quota.budget
    assert (got.amount, got.period_seconds, got.stop_running) == (50, 86400, True)
    # Only the flag given changes.
    off = [*server, "quota", "set", "org", "--no-budget-stop-running"]
    assert await asyncio.to_thread(main, off) == 0
    got = (await quotas.GetQuota(quota_pb2.GetQuotaRequest(tenant="org"))).quota.budget
    assert (got.amount, got.period_seconds, got.stop_running) == (50, 86400, False)
    assert await asyncio.to_thread(main, [*server, "usage", "org"]) == 0
    assert "cost:" in capsys.readouterr().out


def test_accrual_survives_kill_9_and_grpcurl_reads_it(tmp_path: Path) -> None:
    """Accrual is durable: after a kill -9 the report still has everything reported
    before, and the next accrual charges from the stored watermark, so the spend of a
    running allocation equals its rate times (accrued_through - allocate_time): no
    interval is lost at all, let alone more than one."""
    if GRPCURL is None:
        pytest.skip("grpcurl binary not installed")
    env = {"RMGRPC_COST_ACCRUAL_INTERVAL_SECONDS": "0.2", "RMGRPC_LOG_LEVEL": "warning"}
    proc = ServerProcess(tmp_path / "rmgrpc.db", env=env).start()
    try:
        made = grpcurl(
            proc.target,
            "rmgrpc.v1.AllocatorService/Allocate",
            data={"tenant": "org/a", "count": 1, "shape": {"gpus": 2, "gpu_model": "H100"}},
        )
        placed_at = _seconds(json.loads(made.stdout)["allocation"]["allocate_time"])

        def report() -> dict[str, Any]:
            out = grpcurl(
                proc.target, "rmgrpc.v1.TelemetryService/GetCostReport", data={"tenant": "org"}
            )
            doc: dict[str, Any] = json.loads(out.stdout)
            return doc

        def accrued(r: dict[str, Any]) -> float:
            return _seconds(r.get("accrued_through", ""))

        before = _wait(report, lambda r: accrued(r) > placed_at + 0.5)
        proc.kill()
        proc.start()
        after = report()
        assert after.get("total_cost", 0) >= before["total_cost"]
        assert accrued(after) >= accrued(before)
        resumed = _wait(report, lambda r: accrued(r) > accrued(after))
        hours = (accrued(resumed) - placed_at) / 3600
        assert resumed["total_cost"] == pytest.approx(2 * 4.0 * hours, rel=1e-6)
        assert {t["tenant"] for t in resumed["tenants"]} == {"org", "org/a"}
        assert [m["model"] for m in resumed["models"]] == ["H100"]
    finally:
        proc.stop()


def _seconds(stamp: str) -> float:
    if not stamp:
        return 0.0
    ts = Timestamp()
    ts.FromJsonString(stamp)
    return ts.seconds + ts.nanos / 1e9


def _wait(
    probe: Callable[[], dict[str, Any]], ok: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Polls `probe` until `ok` holds (the server's own accrual loop makes progress)."""
    deadline = time.monotonic() + 30
    while True:
        value = probe()
        if ok(value):
            return value
        assert time.monotonic() < deadline, f"not reached in 30 s: {value}"
        time.sleep(0.1)


async def test_the_four_budget_alerts_reach_watchers_once_each(
    served: tuple[RunningServer, ManualClock], channel: grpc.aio.Channel
) -> None:
    running, clock = served
    allocator = allocator_pb2_grpc.AllocatorServiceStub(channel)
    quotas = quota_pb2_grpc.QuotaServiceStub(channel)
    budget = quota_pb2.Budget(amount=HOURLY * 4, period_seconds=0)
    await quotas.SetQuota(
        quota_pb2.SetQuotaRequest(quota=quota_pb2.Quota(tenant="org", budget=budget))
    )
    await allocator.Allocate(allocate("org/a"))
    for _ in range(10):  # 10 hours of a 4-hour budget: 250 %
        clock.advance(3600)
        await tick(running)

    async def alerts(tenant: str) -> list[tuple[str, int, float]]:
        watch = allocator.WatchAllocations(
            allocator_pb2.WatchAllocationsRequest(
                start_revision=1, tenant=tenant, budget_alerts=True
            )
        )
        out = []
        async for event in watch:
            if event.type == allocator_pb2.ALLOCATION_EVENT_TYPE_PROGRESS:
                break  # caught up with the log
            if event.type == allocator_pb2.ALLOCATION_EVENT_TYPE_BUDGET_ALERT:
                a = event.budget_alert
                assert not event.HasField("allocation") and a.amount == pytest.approx(HOURLY * 4)
                out.append((a.tenant, a.percent, a.spent / HOURLY))
        watch.cancel()
        return out

    expected = [("org", 50, 2.0), ("org", 75, 3.0), ("org", 90, 4.0), ("org", 100, 4.0)]
    assert [(t, p) for t, p, _ in await alerts("org")] == [(t, p) for t, p, _ in expected]
    assert [s for *_, s in await alerts("")] == pytest.approx([s for *_, s in expected])
    assert await alerts("org/a") == []  # its parent's budget is not its to see
    # Without asking, a watch streams allocations only (as before).
    plain = allocator.WatchAllocations(allocator_pb2.WatchAllocationsRequest(start_revision=1))
    async for event in plain:
        if event.type == allocator_pb2.ALLOCATION_EVENT_TYPE_PROGRESS:
            break
        assert event.type != allocator_pb2.ALLOCATION_EVENT_TYPE_BUDGET_ALERT
    plain.cancel()
    bad = allocator.WatchAllocations(
        allocator_pb2.WatchAllocationsRequest(node_id="sim-node-0", budget_alerts=True)
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await bad.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "budget_alerts" in field_violations(err.value)
