"""Hard durations and start-time estimates through a real server on 127.0.0.1: the hard
end in every answer and event, expiry as an EXPIRED event with its reason, the limit on
durations, and a pending allocation's estimate in Get, List, the CLI and grpcurl."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from rmgrpc.clock import ManualClock
from rmgrpc.server import RunningServer, start
from rmgrpc.v1 import allocator_pb2 as pb
from rmgrpc.v1 import allocator_pb2_grpc
from rmgrpc.v1.resources_pb2 import Shape
from tests.conftest import ServerProcess, make_settings
from tests.e2e.helpers import eventually, field_violations
from tests.e2e.test_cli import Cli, table
from tests.e2e.test_grpcurl import GRPCURL, grpcurl, messages

HOUR = 3600


class Cluster:
    def __init__(self, running: RunningServer, clock: ManualClock, channel: grpc.aio.Channel):
        self.running = running
        self.clock = clock
        self.stub = allocator_pb2_grpc.AllocatorServiceStub(channel)

    async def allocate(self, gpus: int = 8, **kw: Any) -> pb.Allocation:
        shape = Shape(gpus=gpus, cpu_millis=1000, memory_bytes=1 << 30)
        req = pb.AllocateRequest(tenant="org/team", count=1, shape=shape, **kw)
        answer: pb.AllocateResponse = await self.stub.Allocate(req)
        return answer.allocation

    async def get(self, allocation_id: str) -> pb.Allocation:
        got: pb.GetAllocationResponse = await self.stub.GetAllocation(
            pb.GetAllocationRequest(id=allocation_id)
        )
        return got.allocation

    async def advance(self, seconds: float) -> None:
        """Moves the server's clock, fires what fell due and runs a pass on it."""
        self.clock.advance(seconds)
        self.running.engine.fire_timers()
        await self.running.engine.wait_committed()
        await self.running.engine.schedule_now()


async def _cluster(
    tmp_path: Path, clock: ManualClock | None = None, **overrides: Any
) -> AsyncIterator[Cluster]:
    clock = clock or ManualClock()
    settings = make_settings(
        tmp_path,
        simulated_nodes=1,
        estimate_interval_seconds=0.0,  # every pass: the manual clock does not move alone
        estimate_resolution_seconds=0.0,
        **overrides,
    )
    running = await start(settings, clock=clock)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield Cluster(running, clock, channel)
    await running.stop(0)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async for c in _cluster(tmp_path, max_allowed_duration_seconds=8 * HOUR):
        yield c


@pytest.fixture
async def now_cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """On a manual clock set to the real time: the CLI shows times relative to it."""
    async for c in _cluster(tmp_path, ManualClock(time.time())):
        yield c


@pytest.fixture
async def unlimited(tmp_path: Path) -> AsyncIterator[Cluster]:
    """No default duration and no limit: work may run without a hard end."""
    async for c in _cluster(tmp_path):
        yield c


def seconds(stamp: Any) -> float:
    return float(stamp.seconds) + float(stamp.nanos) / 1e9


async def test_a_pending_allocation_shows_when_it_will_start(cluster: Cluster) -> None:
    c = cluster
    first = await c.allocate(max_duration_seconds=HOUR)
    assert first.state == pb.ALLOCATION_STATE_ALLOCATED
    assert seconds(first.max_end_time) == c.clock.now() + HOUR
    waiting = await c.allocate(max_duration_seconds=600)
    assert waiting.state == pb.ALLOCATION_STATE_PENDING
    await c.running.engine.schedule_now()

    got = await c.get(waiting.id)
    assert seconds(got.estimated_start_time) == seconds(first.max_end_time)
    assert first.id in got.estimate_reason
    listed = await c.stub.ListAllocations(pb.ListAllocationsRequest(tenant="org"))
    by_id = {a.id: a for a in listed.allocations}
    assert by_id[waiting.id].estimated_start_time == got.estimated_start_time
    assert by_id[waiting.id].estimate_reason == got.estimate_reason
    # Placed work carries its hard end (Get and List) and no estimate.
    assert (await c.get(first.id)).max_end_time == first.max_end_time
    assert by_id[first.id].max_end_time == first.max_end_time
    assert not by_id[first.id].HasField("estimated_start_time")

    # Status, not state: no event carries an estimate.
    events = await c.running.engine.store.read_events(0, 10_000)
    stored = [pb.Allocation.FromString(e.data) for e in events if e.object_id == waiting.id]
    assert stored and not any(a.HasField("estimated_start_time") for a in stored)

    # It starts when the estimate said, once the first one's hard end is reached.
    await c.advance(HOUR)
    done = await c.get(first.id)
    assert done.state == pb.ALLOCATION_STATE_EXPIRED
    placed = await c.get(waiting.id)
    assert placed.state == pb.ALLOCATION_STATE_ALLOCATED
    assert placed.allocate_time == got.estimated_start_time
    assert not placed.HasField("estimated_start_time") and not placed.estimate_reason


async def test_expiry_at_the_hard_end_is_an_event_with_its_reason(cluster: Cluster) -> None:
    c = cluster
    a = await c.allocate(gpus=2, max_duration_seconds=90)
    watch = c.stub.WatchAllocations(pb.WatchAllocationsRequest(allocation_id=a.id))
    seen: list[pb.AllocationEvent] = []

    async def follow() -> None:
        async for e in watch:
            if e.type == pb.ALLOCATION_EVENT_TYPE_PROGRESS:
                continue
            seen.append(e)
            if e.allocation.state == pb.ALLOCATION_STATE_EXPIRED:
                return

    task = asyncio.ensure_future(follow())
    await c.advance(89)
    assert (await c.get(a.id)).state == pb.ALLOCATION_STATE_ALLOCATED
    await c.advance(1)
    await asyncio.wait_for(task, 10)
    watch.cancel()
    ended = seen[-1]
    assert ended.type == pb.ALLOCATION_EVENT_TYPE_ENDED
    assert ended.allocation.state_reason == "ran past max_duration_seconds (90 s)"
    assert ended.allocation.max_end_time == a.max_end_time
    assert seconds(ended.allocation.end_time) == seconds(a.max_end_time)


async def test_work_without_a_hard_end_makes_the_estimate_unknown(unlimited: Cluster) -> None:
    c = unlimited
    await c.allocate()  # no max_duration_seconds, and no default configured here
    waiting = await c.allocate(max_duration_seconds=60)
    await c.running.engine.schedule_now()
    got = await c.get(waiting.id)
    assert not got.HasField("estimated_start_time")
    assert got.estimate_reason.startswith("unknown: work without a hard end")


async def test_a_duration_above_the_limit_is_refused_naming_it(cluster: Cluster) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cluster.allocate(max_duration_seconds=8 * HOUR + 1)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_allowed_duration_seconds" in field_violations(err.value)["max_duration_seconds"]
    # With no duration asked, the limit is the hard end (Slurm's MaxTime as default).
    a = await cluster.allocate(gpus=1)
    assert a.max_duration_seconds == 8 * HOUR and a.HasField("max_end_time")


async def test_the_cli_shows_the_estimate(
    now_cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    c = now_cluster
    await c.allocate(max_duration_seconds=2 * HOUR)
    waiting = await c.allocate(max_duration_seconds=60)
    await c.running.engine.schedule_now()
    cli = Cli(c.running, capsys)
    (row,) = table(await cli.ok("queue"))
    two_hours = r"in (2h|119m)"  # the CLI reads the real clock, a moment later
    assert row["ID"] == waiting.id and re.fullmatch(two_hours, row["START"])
    rows = {r["ID"]: r for r in table(await cli.ok("list"))}
    assert re.fullmatch(two_hours, rows[waiting.id]["START"])
    out = await cli.ok("get", waiting.id)
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    assert re.search(rf"^estimated start: +{stamp} \({two_hours}\)$", out, re.M)
    assert re.search(r"^estimate: +capacity frees at the hard end of a-", out, re.M)


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl binary not installed")
async def test_grpcurl_prints_the_estimate(tmp_path: Path) -> None:
    env = {
        "RMGRPC_SIMULATED_NODES": "1",
        "RMGRPC_ESTIMATE_INTERVAL_SECONDS": "0",
        "RMGRPC_ESTIMATE_RESOLUTION_SECONDS": "0",
    }
    proc = ServerProcess(tmp_path / "rmgrpc.db", env=env).start()
    try:
        t = proc.target
        call = "rmgrpc.v1.AllocatorService/Allocate"
        body = {"tenant": "ml", "shape": {"gpus": 8}, "count": 1, "max_duration_seconds": 3600}
        first = messages((await asyncio.to_thread(grpcurl, t, call, data=body)).stdout)[0]
        second = messages((await asyncio.to_thread(grpcurl, t, call, data=body)).stdout)[0]
        assert first["allocation"]["max_end_time"]
        waiting = second["allocation"]["id"]

        async def get() -> dict[str, Any]:
            out = await asyncio.to_thread(
                grpcurl, t, "rmgrpc.v1.AllocatorService/GetAllocation", data={"id": waiting}
            )
            got: dict[str, Any] = messages(out.stdout)[0]["allocation"]
            return got

        got = await eventually(get, lambda a: "estimated_start_time" in a, timeout=20)
        assert got["estimated_start_time"] == first["allocation"]["max_end_time"]
        assert got["estimate_reason"].startswith("capacity frees at the hard end of")
    finally:
        proc.stop()


def test_hard_ends_survive_kill_9_and_expire_after_the_restart(tmp_path: Path) -> None:
    """A hard end is durable with the answer that placed the work: after kill -9 and a
    restart past it, the work is EXPIRED with its reason and what waited behind it is
    placed; work whose hard end is still ahead keeps it, to the second."""
    proc = ServerProcess(tmp_path / "rmgrpc.db", env={"RMGRPC_SIMULATED_NODES": "1"}).start()
    try:
        with grpc.insecure_channel(proc.target) as ch:
            stub = allocator_pb2_grpc.AllocatorServiceStub(ch)

            def allocate(gpus: int, seconds: int) -> pb.Allocation:
                shape = Shape(gpus=gpus, cpu_millis=1000, memory_bytes=1 << 30)
                req = pb.AllocateRequest(
                    tenant="ml", count=1, shape=shape, max_duration_seconds=seconds
                )
                answer: pb.AllocateResponse = stub.Allocate(req, timeout=10)
                return answer.allocation

            short = allocate(4, 1)
            long = allocate(4, HOUR)
            behind = allocate(4, HOUR)
        assert short.state == long.state == pb.ALLOCATION_STATE_ALLOCATED
        assert behind.state == pb.ALLOCATION_STATE_PENDING
        proc.kill()
        # Past the short one's hard end while the server is down.
        time.sleep(max(0.0, short.max_end_time.ToNanoseconds() / 1e9 - time.time()) + 0.2)
        proc.start()
        with grpc.insecure_channel(proc.target) as ch:
            stub = allocator_pb2_grpc.AllocatorServiceStub(ch)

            def get(aid: str) -> pb.Allocation:
                got: pb.GetAllocationResponse = stub.GetAllocation(
                    pb.GetAllocationRequest(id=aid), timeout=10
                )
                return got.allocation

            deadline = time.monotonic() + 20
            while get(behind.id).state != pb.ALLOCATION_STATE_ALLOCATED:
                assert time.monotonic() < deadline, get(behind.id)
                time.sleep(0.05)
            ended = get(short.id)
            assert ended.state == pb.ALLOCATION_STATE_EXPIRED
            assert ended.state_reason == "ran past max_duration_seconds (1 s)"
            kept = get(long.id)
            assert kept.state == pb.ALLOCATION_STATE_ALLOCATED
            assert kept.max_end_time == long.max_end_time
    finally:
        proc.stop()
