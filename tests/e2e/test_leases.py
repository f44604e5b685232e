"""Leases that surprise no one, through a real server on 127.0.0.1 whose clock is a
`ManualClock`: no lease unless asked; the agent keeps what runs on its node alive past
the lease (and its work expires soon after the agent dies); the keepalive helper does
the same for any owner; renewing an allocation with no lease writes nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from rmgrpc.clock import ManualClock
from rmgrpc.gpu.simulated import SIMULATED_LABEL
from rmgrpc.server import RunningServer, start
from rmgrpc.v1 import allocator_pb2 as pb
from rmgrpc_client import AllocationEnded, AsyncClient, Client
from rmgrpc_client._gpus import SimulatedGpus
from rmgrpc_client.agent import Agent, NodeSpec
from tests.conftest import make_settings

LEASE = 10  # the server's default lease in these tests: short, on the manual clock
ALLOCATED = pb.ALLOCATION_STATE_ALLOCATED
EXPIRED = pb.ALLOCATION_STATE_EXPIRED


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


class Cluster:
    def __init__(self, running: RunningServer, clock: ManualClock, rm: AsyncClient) -> None:
        self.running = running
        self.clock = clock
        self.rm = rm

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    async def advance(self, seconds: float) -> None:
        """Moves the server's clock and fires what fell due, as its timer loop would."""
        self.clock.advance(seconds)
        self.running.engine.fire_timers()
        await self.running.engine.wait_committed()

    async def state(self, allocation_id: str) -> int:
        return (await self.rm.get_allocation(allocation_id)).state


async def _cluster(tmp_path: Path, **settings: object) -> AsyncIterator[Cluster]:
    clock = ManualClock()
    running = await start(
        make_settings(tmp_path, simulated_nodes=1, node_lease_seconds=3600.0, **settings),
        clock=clock,
    )
    async with AsyncClient(f"127.0.0.1:{running.port}") as rm:
        yield Cluster(running, clock, rm)
    await running.stop(0)


@pytest.fixture
async def leased(tmp_path: Path) -> AsyncIterator[Cluster]:
    async for c in _cluster(tmp_path, default_lease_seconds=LEASE):
        yield c


@pytest.fixture
async def default(tmp_path: Path) -> AsyncIterator[Cluster]:
    async for c in _cluster(tmp_path):
        yield c


async def test_by_default_work_runs_until_released(default: Cluster) -> None:
    a = await default.rm.allocate("org/team", gpus=1)
    assert a.state == ALLOCATED and a.lease_seconds == 0
    assert not a.HasField("lease_expire_time")
    await default.advance(30 * 86400)  # a month, renewed by no one
    assert await default.state(a.id) == ALLOCATED
    # Renewing it is harmless and writes nothing: keepalive loops may call it blindly.
    revision = default.running.engine.revision
    assert (await default.rm.renew(a.id)).revision == a.revision
    assert default.running.engine.revision == revision
    # Asking for a lease still gives one.
    b = await default.rm.allocate("org/team", gpus=1, lease_seconds=60)
    await default.advance(61)
    assert await default.state(b.id) == EXPIRED


async def test_the_agent_keeps_its_allocations_alive_past_the_lease(
    leased: Cluster, tmp_path: Path
) -> None:
    c = leased
    lines: list[str] = []
    agent = Agent(
        c.rm,
        NodeSpec("gpu-box-1", 16_000, 64 << 30, {"pool": "agent"}),
        SimulatedGpus("gpu-box-1", 4, "H100", 80 << 30),
        tmp_path / "agent.json",
        emit=lines.append,
        heartbeat_interval=0.02,
        monotonic=c.clock.monotonic,  # the agent counts lease time as the server does
    )
    running = asyncio.create_task(agent.run())
    try:
        await until(lambda: "gpu-box-1" in c.running.engine.state.nodes)
        on_agent = await c.rm.allocate("org/team", gpus=2, node_selector={"pool": "agent"})
        # The same default lease on the simulated node, which no agent renews.
        unattended = await c.rm.allocate(
            "org/team", gpus=2, node_selector={SIMULATED_LABEL: "true"}
        )
        assert on_agent.placements[0].node_id == "gpu-box-1"
        assert unattended.placements[0].node_id != "gpu-box-1"
        assert on_agent.lease_seconds == unattended.lease_seconds == LEASE

        async def rounds(n: int) -> None:
            """Waits until the agent has run `n` whole heartbeat rounds from now."""
            seen = agent.heartbeats
            async with asyncio.timeout(10):
                while agent.heartbeats < seen + n:
                    await asyncio.sleep(0.005)

        await until(lambda: on_agent.id in agent.reconciler.started)
        await rounds(2)
        for _ in range(10):  # 30 s on the server's clock: three leases
            await c.advance(3)
            await rounds(2)
        assert await c.state(on_agent.id) == ALLOCATED
        assert await c.state(unattended.id) == EXPIRED
        renewed = await c.rm.get_allocation(on_agent.id)
        assert renewed.lease_expire_time.ToSeconds() > c.clock.now()
        assert not any("cannot renew" in line for line in lines)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    # The agent died: its work outlives it by at most one lease.
    await c.advance(LEASE + 1)
    assert await c.state(on_agent.id) == EXPIRED


async def test_async_keepalive_renews_until_stopped_and_reports_the_end(leased: Cluster) -> None:
    c = leased
    a = await c.rm.allocate("org/team", gpus=1)
    renewed: list[pb.Allocation] = []
    # The helper sleeps on the real clock and the lease runs on the server's manual one:
    # a tiny fraction makes it renew every 0.1 s real, and the test waits for renewals
    # (events, not time) before it moves the server's clock on.
    ka = c.rm.keepalive(a, fraction=0.01, on_renewed=renewed.append)
    async with ka:
        for _ in range(10):  # 30 s on the server's clock: three leases
            count = len(renewed)
            await until(lambda k=count: len(renewed) >= k + 2)  # type: ignore[misc]
            await c.advance(3)
            assert await c.state(a.id) == ALLOCATED
        assert ka.failure is None
    assert all(r.state == ALLOCATED and r.lease_seconds == LEASE for r in renewed)

    # Stopped: nothing renews it now, and it expires.
    await c.advance(LEASE + 1)
    assert await c.state(a.id) == EXPIRED

    # A keepalive on an allocation that ends reports how it ended.
    b = await c.rm.allocate("org/team", gpus=1)
    ka = c.rm.keepalive(b.id, fraction=0.01)
    ka.start()
    await until(lambda: ka.renewals >= 1)
    await c.rm.release(b.id)
    with pytest.raises(AllocationEnded) as ended:
        async with asyncio.timeout(10):
            await ka.wait()
    assert ended.value.allocation.state == pb.ALLOCATION_STATE_RELEASED


async def test_sync_keepalive_from_blocking_code(leased: Cluster) -> None:
    c = leased
    loop = asyncio.get_running_loop()

    def advance(seconds: float) -> None:
        asyncio.run_coroutine_threadsafe(c.advance(seconds), loop).result(10)

    def hold() -> tuple[int, int, int]:
        with Client(c.target) as client:
            a = client.allocate("org/team", gpus=1)
            with client.keepalive(a.id, fraction=0.01) as ka:
                deadline = time.monotonic() + 30  # bounds the test, times nothing
                for _ in range(10):  # 30 s on the server's clock: three leases
                    seen = ka.renewals
                    while ka.renewals < seen + 2:
                        assert not ka.wait(0.005), ka.failure  # still running
                        assert time.monotonic() < deadline, "no renewals"
                    advance(3)
                alive = client.get_allocation(a.id).state
            assert ka.failure is None
            renewals = ka.renewals
            advance(LEASE + 1)  # stopped: nothing renews it now
            return renewals, alive, client.get_allocation(a.id).state

    renewals, alive, after = await asyncio.to_thread(hold)
    assert renewals >= 20 and alive == ALLOCATED and after == EXPIRED
