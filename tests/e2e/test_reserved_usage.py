"""Reserved capacity is visible: GetUsage (per tenant, its subtree included) and
GetClusterSummary (per resource, and per tenant) show what ACTIVE and SCHEDULED
reservations book, through a real server on a fake clock, as reservations begin, end and
are cancelled; `rmgrpcctl usage` prints both."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from rmgrpc.clock import ManualClock
from rmgrpc.server import RunningServer, start
from rmgrpc.v1 import (
    quota_pb2,
    quota_pb2_grpc,
    reservation_pb2,
    reservation_pb2_grpc,
    resources_pb2,
    telemetry_pb2,
    telemetry_pb2_grpc,
)
from rmgrpc_client.cli import main
from tests.conftest import make_settings

GIB = 1 << 30
HOUR = 3600


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[RunningServer, ManualClock]]:
    clock = ManualClock()
    running = await start(make_settings(tmp_path, node_lease_seconds=1e6), clock)
    yield running, clock
    await running.stop(0)


@pytest.fixture
async def channel(
    served: tuple[RunningServer, ManualClock],
) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{served[0].port}") as ch:
        yield ch


def at(t: float) -> Timestamp:
    out = Timestamp()
    out.FromSeconds(int(t))
    return out


def triple(r: resources_pb2.Resources) -> tuple[int, int, int]:
    return (r.gpus, r.cpu_millis, r.memory_bytes)


async def test_usage_and_the_summary_show_reserved_capacity(
    served: tuple[RunningServer, ManualClock],
    channel: grpc.aio.Channel,
    capsys: pytest.CaptureFixture[str],
) -> None:
    running, clock = served
    resv = reservation_pb2_grpc.ReservationServiceStub(channel)
    quotas = quota_pb2_grpc.QuotaServiceStub(channel)
    telemetry = telemetry_pb2_grpc.TelemetryServiceStub(channel)
    now = clock.now()

    async def reserve(tenant: str, gpus: int, count: int, start: float) -> str:
        shape = resources_pb2.Shape(gpus=gpus, cpu_millis=1000, memory_bytes=GIB)
        req = reservation_pb2.CreateReservationRequest(
            tenant=tenant,
            count=count,
            shape=shape,
            start_time=at(start),
            end_time=at(start + 2 * HOUR),
        )
        return (await resv.CreateReservation(req)).reservation.id

    async def usage(tenant: str) -> quota_pb2.TenantUsage:
        return (await quotas.GetUsage(quota_pb2.GetUsageRequest(tenant=tenant))).usage

    async def summary() -> telemetry_pb2.ClusterSummary:
        req = telemetry_pb2.GetClusterSummaryRequest()
        return (await telemetry.GetClusterSummary(req)).summary

    # The summary lists tenants with a quota or allocations (and their ancestors).
    await quotas.SetQuota(quota_pb2.SetQuotaRequest(quota=quota_pb2.Quota(tenant="org/b")))
    active = await reserve("org/a", 2, 2, now)  # begins at once
    await reserve("org/b", 4, 1, now + HOUR)  # in an hour
    await reserve("other", 1, 1, now + HOUR)

    a, b, org = await usage("org/a"), await usage("org/b"), await usage("org")
    assert triple(a.reserved) == (4, 2000, 2 * GIB) and triple(a.reserved_upcoming) == (0, 0, 0)
    assert triple(b.reserved) == (0, 0, 0) and triple(b.reserved_upcoming) == (4, 1000, GIB)
    assert triple(org.reserved) == (4, 2000, 2 * GIB)  # the subtree's
    assert triple(org.reserved_upcoming) == (4, 1000, GIB)
    s = await summary()
    assert triple(s.reserved) == (4, 2000, 2 * GIB)
    assert triple(s.reserved_upcoming) == (5, 2000, 2 * GIB)
    tenants = {t.tenant: t for t in s.tenants}
    assert triple(tenants["org"].reserved_upcoming) == (4, 1000, GIB)
    assert triple(tenants["org"].reserved) == (4, 2000, 2 * GIB)
    assert triple(tenants["org/b"].reserved) == (0, 0, 0)

    server = ["--server", f"127.0.0.1:{running.port}"]
    assert await asyncio.to_thread(main, [*server, "usage", "org"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [" ".join(ln.split()) for ln in lines if ln.startswith("reserved")] == [
        "reserved: gpus=4 cpu=2 mem=2Gi",
        "reserved later: gpus=4 cpu=1 mem=1Gi",
    ]

    # An hour on, the booked ones have begun; cancelled capacity is booked no more.
    clock.advance(HOUR)
    running.engine.fire_timers()
    await running.engine.wait_committed()
    await resv.CancelReservation(reservation_pb2.CancelReservationRequest(id=active))
    org = await usage("org")
    assert triple(org.reserved) == (4, 1000, GIB) and org.reserved_upcoming.gpus == 0
    s = await summary()
    assert (s.reserved.gpus, s.reserved_upcoming.gpus) == (5, 0)
    # Past their windows, nothing is booked.
    clock.advance(2 * HOUR)
    running.engine.fire_timers()
    await running.engine.wait_committed()
    assert triple((await usage("org")).reserved) == (0, 0, 0)
    assert (await summary()).reserved.gpus == 0
