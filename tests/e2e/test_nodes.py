"""The node-agent protocol through a real in-process server: RegisterNode, Heartbeat, the node
lease (DOWN → allocations LOST), GPU health, cordon/uncordon/drain, and the example agent.

Lease tests drive a `ManualClock` and call `engine.fire_timers` so they neither sleep nor
race; one test checks the same with the real clock and a 1 s lease.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from rmgrpc.clock import ManualClock
from rmgrpc.server import RunningServer, start
from rmgrpc.v1 import allocator_pb2 as pb
from rmgrpc.v1 import allocator_pb2_grpc, gpu_manager_pb2, gpu_manager_pb2_grpc
from rmgrpc.v1 import gpu_manager_pb2 as gm
from rmgrpc.v1.resources_pb2 import Shape
from tests.conftest import make_settings
from tests.e2e.helpers import detail, eventually, field_violations

LEASE = 1.0
INTERVAL = 0.3
TENANT = "team"  # one tenant: fair-share reclaim never moves work between tenants here
ALLOCATED = pb.ALLOCATION_STATE_ALLOCATED
PENDING = pb.ALLOCATION_STATE_PENDING
PROGRESS = pb.ALLOCATION_EVENT_TYPE_PROGRESS
ENDED = pb.ALLOCATION_EVENT_TYPE_ENDED
HEALTHY = gm.GPU_HEALTH_HEALTHY


class Cluster:
    """An in-process server with no simulated nodes, and stubs for it."""

    def __init__(self, server: RunningServer, channel: grpc.aio.Channel, clock: ManualClock | None):
        self.server = server
        self.engine = server.engine
        self.clock = clock
        self.alloc = allocator_pb2_grpc.AllocatorServiceStub(channel)
        self.nodes = gpu_manager_pb2_grpc.GpuManagerServiceStub(channel)

    async def register(
        self, node_id: str, gpus: int = 2, **kw: Any
    ) -> gpu_manager_pb2.RegisterNodeResponse:
        return await self.nodes.RegisterNode(
            gm.RegisterNodeRequest(
                node_id=node_id,
                cpu_millis=kw.pop("cpu_millis", 16_000),
                memory_bytes=kw.pop("memory_bytes", 64 << 30),
                gpus=kw.pop("gpu_list", None) or gpu_list(gpus),
                **kw,
            )
        )

    async def heartbeat(self, node_id: str, *statuses: gm.GpuStatus) -> gm.HeartbeatResponse:
        return await self.nodes.Heartbeat(gm.HeartbeatRequest(node_id=node_id, gpus=statuses))

    async def allocate(self, gpus: int = 1, **kw: Any) -> pb.Allocation:
        resp = await self.alloc.Allocate(
            pb.AllocateRequest(
                tenant=TENANT,
                count=1,
                shape=Shape(gpus=gpus, cpu_millis=100, memory_bytes=1 << 20),
                **kw,
            )
        )
        return resp.allocation

    async def get(self, allocation_id: str) -> pb.Allocation:
        return (
            await self.alloc.GetAllocation(pb.GetAllocationRequest(id=allocation_id))
        ).allocation

    async def node(self, node_id: str) -> gm.Node:
        return (await self.nodes.GetNode(gm.GetNodeRequest(node_id=node_id))).node

    async def placed(self, allocation_id: str) -> pb.Allocation:
        return await eventually(lambda: self.get(allocation_id), lambda a: a.state == ALLOCATED)

    def advance(self, seconds: float) -> None:
        """Move the manual clock and handle every deadline now due."""
        assert self.clock is not None
        self.clock.advance(seconds)
        self.engine.fire_timers(self.clock.now())

    async def advance_alive(self, seconds: float, *node_ids: str) -> None:
        """Move the manual clock by `seconds` in heartbeat intervals, the agents of `node_ids`
        heartbeating at each: time passes, their leases hold."""
        while seconds > 1e-9:
            step = min(INTERVAL, seconds)
            self.advance(step)
            seconds -= step
            for node_id in node_ids:
                await self.heartbeat(node_id)


def gpu_list(n: int, model: str = "H100") -> list[gm.Gpu]:
    return [
        gm.Gpu(index=i, model=model, memory_bytes=80 << 30, health=gm.GPU_HEALTH_HEALTHY)
        for i in range(n)
    ]


@pytest.fixture
async def cluster_factory(tmp_path: Path) -> AsyncIterator[Any]:
    opened: list[tuple[RunningServer, grpc.aio.Channel]] = []

    async def make(manual: bool = True, **overrides: Any) -> Cluster:
        clock = ManualClock() if manual else None
        base: dict[str, Any] = {
            "simulated_nodes": 0,
            "node_lease_seconds": LEASE,
            "heartbeat_interval_seconds": INTERVAL,
            # Nothing is preempted behind the tests' backs (drain still preempts).
            "min_runtime_seconds": 3600.0,
            # A GPU reported healthy again returns at once (the health policy's timed
            # return has its own tests in test_gpu_health.py).
            "gpu_recovery_seconds": 0.0,
            "watch_progress_seconds": 0.2,
        }
        settings = make_settings(tmp_path, **{**base, **overrides})
        server = await start(settings, clock=clock)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        opened.append((server, channel))
        return Cluster(server, channel, clock)

    yield make
    for server, channel in opened:
        await channel.close()
        await server.stop(0)


async def tick() -> None:
    """A no-op probe for `eventually` when the condition is local."""
    await asyncio.sleep(0)


async def next_event(call: Any, timeout: float = 10.0) -> pb.AllocationEvent:
    """The next non-progress event of a watch stream."""
    async with asyncio.timeout(timeout):
        while True:
            ev = await call.read()
            assert ev is not grpc.aio.EOF, "watch stream ended"
            if ev.type != PROGRESS:
                return ev


# -- RegisterNode and Heartbeat ----------------------------------------------------------------


async def test_register_node_is_idempotent_and_updates_capacity_labels_and_gpus(
    cluster_factory: Any,
) -> None:
    c: Cluster = await cluster_factory()
    first = await c.register("n1", gpus=2, labels={"zone": "a"})
    assert first.node.state == gm.NODE_STATE_READY
    assert (first.heartbeat_interval_seconds, first.lease_seconds) == (INTERVAL, LEASE)
    again = await c.register("n1", gpus=2, labels={"zone": "a"})
    listed = await c.nodes.ListNodes(gm.ListNodesRequest())
    assert [n.id for n in listed.nodes] == ["n1"]
    assert [(g.index, g.uuid) for g in again.node.gpus] == [
        (g.index, g.uuid) for g in first.node.gpus
    ]
    assert [g.uuid for g in again.node.gpus] == ["n1-gpu-0", "n1-gpu-1"]

    updated = await c.register(
        "n1",
        cpu_millis=32_000,
        memory_bytes=128 << 30,
        labels={"zone": "b", "rack": "r7"},
        gpu_list=gpu_list(4, model="A100"),
    )
    node = await c.node("n1")
    assert node == updated.node
    assert (node.cpu_millis, node.memory_bytes) == (32_000, 128 << 30)
    assert node.labels == {"zone": "b", "rack": "r7"}
    assert [(g.index, g.model) for g in node.gpus] == [(i, "A100") for i in range(4)]
    gpus = await c.nodes.ListGpus(gm.ListGpusRequest(node_id="n1"))
    assert len(gpus.gpus) == 4
    # The new GPUs take work.
    a = await c.allocate(gpus=4)
    assert a.state == ALLOCATED and a.placements[0].node_id == "n1"


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (gm.RegisterNodeRequest(node_id="", gpus=gpu_list(1)), "node_id"),
        (gm.RegisterNodeRequest(node_id="bad node!", gpus=gpu_list(1)), "node_id"),
        (
            gm.RegisterNodeRequest(node_id="n1", gpus=[*gpu_list(2), gpu_list(2)[1]]),
            "gpus[2].index",
        ),
        (gm.RegisterNodeRequest(node_id="n1", memory_bytes=-1), "memory_bytes"),
        (gm.RegisterNodeRequest(node_id="n1", cpu_millis=-1), "cpu_millis"),
        (
            gm.RegisterNodeRequest(
                node_id="n1", gpus=[gm.Gpu(index=0, model="H100", memory_bytes=-5, health=HEALTHY)]
            ),
            "gpus[0].memory_bytes",
        ),
        (
            gm.RegisterNodeRequest(node_id="n1", gpus=[gm.Gpu(index=0, model="H100", health=7)]),  # type: ignore[arg-type]
            "gpus[0].health",
        ),
        (
            gm.RegisterNodeRequest(
                node_id="n1", gpus=[gm.Gpu(index=-1, model="H100", health=HEALTHY)]
            ),
            "gpus[0].index",
        ),
        (
            gm.RegisterNodeRequest(node_id="n1", gpus=[gm.Gpu(index=0, health=HEALTHY)]),
            "gpus[0].model",
        ),
        (gm.RegisterNodeRequest(node_id="n1", labels={"bad key!": "v"}), "labels['bad key!']"),
    ],
)
async def test_bad_register_node_is_invalid_argument_and_changes_nothing(
    cluster_factory: Any, request_: gm.RegisterNodeRequest, field: str
) -> None:
    c: Cluster = await cluster_factory()
    before = c.engine.revision
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await c.nodes.RegisterNode(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(err.value)
    assert field in violations, violations
    assert c.engine.revision == before
    assert not (await c.nodes.ListNodes(gm.ListNodesRequest())).nodes


async def test_gpu_health_may_be_left_unspecified(cluster_factory: Any) -> None:
    """An agent that does not know health (no NVML) leaves it unset: healthy by default; a
    heartbeat carrying only metrics leaves health alone."""
    c: Cluster = await cluster_factory()
    resp = await c.nodes.RegisterNode(
        gm.RegisterNodeRequest(node_id="n1", gpus=[gm.Gpu(index=0, model="H100")])
    )
    assert resp.node.gpus[0].health == gm.GPU_HEALTH_HEALTHY
    await c.heartbeat("n1", gm.GpuStatus(index=0, metrics=gm.GpuMetrics(utilization_percent=50)))
    gpus = await c.nodes.ListGpus(gm.ListGpusRequest(node_id="n1"))
    assert gpus.gpus[0].health == gm.GPU_HEALTH_HEALTHY
    assert gpus.gpus[0].metrics.utilization_percent == 50


async def test_heartbeat_for_an_unknown_node_is_not_found(cluster_factory: Any) -> None:
    c: Cluster = await cluster_factory()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await c.heartbeat("ghost")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    info = detail(err.value, error_details_pb2.ResourceInfo)
    assert (info.resource_type, info.resource_name) == ("node", "ghost")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await c.heartbeat("")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await c.heartbeat("n1", gm.GpuStatus(index=0, health=9))  # type: ignore[arg-type]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "gpus[0].health" in field_violations(err.value)


# -- the node lease --------------------------------------------------------------------------


@pytest.mark.parametrize("comeback", ["heartbeat", "register"])
async def test_silent_node_goes_down_its_work_is_lost_and_it_comes_back(
    cluster_factory: Any, comeback: str
) -> None:
    c: Cluster = await cluster_factory()
    await c.register("n1", gpus=2)
    a = await c.allocate(gpus=2)
    assert a.state == ALLOCATED and a.placements[0].node_id == "n1"
    watch = c.alloc.WatchAllocations(
        pb.WatchAllocationsRequest(node_id="n1", start_revision=a.revision + 1)
    )
    # Heartbeats keep it alive well past one lease.
    for _ in range(6):
        c.advance(INTERVAL)
        hb = await c.heartbeat("n1")
        assert hb.state == gm.NODE_STATE_READY
    # They stop. Just short of the lease after the last one: still READY.
    c.advance(LEASE - 0.05)
    assert (await c.node("n1")).state == gm.NODE_STATE_READY
    # Within lease + one interval: DOWN, and its allocation LOST.
    c.advance(INTERVAL)
    node = await c.node("n1")
    assert node.state == gm.NODE_STATE_DOWN and node.state_reason
    ev = await next_event(watch)
    assert ev.type == ENDED and ev.allocation.id == a.id
    assert ev.allocation.state == pb.ALLOCATION_STATE_LOST
    assert "n1" in ev.allocation.state_reason
    assert (await c.get(a.id)).state == pb.ALLOCATION_STATE_LOST

    # Its GPUs are free but unschedulable while it is DOWN: new work waits.
    gpus = await c.nodes.ListGpus(gm.ListGpusRequest(node_id="n1"))
    assert [g.allocation_id for g in gpus.gpus] == ["", ""]
    b = await c.allocate(gpus=1)
    assert b.state == PENDING and b.pending_reason
    c.advance(5.0)
    assert (await c.get(b.id)).state == PENDING

    if comeback == "heartbeat":
        hb = await c.heartbeat("n1")
        assert hb.state == gm.NODE_STATE_READY
    else:
        reg = await c.register("n1", gpus=2)
        assert reg.node.state == gm.NODE_STATE_READY
    placed = await c.placed(b.id)
    assert placed.placements[0].node_id == "n1"
    ev = await next_event(watch)
    assert ev.allocation.id == b.id and ev.type == pb.ALLOCATION_EVENT_TYPE_PLACED
    watch.cancel()


async def test_node_lease_with_the_real_clock(cluster_factory: Any) -> None:
    """Leases: a node whose agent misses heartbeats for the node lease goes DOWN and its
    allocations become LOST — here through the real clock and the server's own timer loop.
    Heartbeats every 0.1 s for longer than the lease keep the node READY; once they stop,
    LOST arrives, and never before the lease of the last heartbeat before it ran out: by the
    server's clock (the times it reports) and by this process's monotonic clock. Only lower
    bounds: a loaded machine may make LOST late, never early."""
    c: Cluster = await cluster_factory(manual=False)

    def seconds(t: Any) -> float:
        return float(t.seconds + t.nanos / 1e9)

    sent = time.monotonic()
    reg = await c.register("n1", gpus=1)
    # (monotonic time the call was sent, lease end the server answered) per lease renewal.
    leases = [(sent, seconds(reg.node.lease_expire_time))]
    a = await c.allocate(gpus=1)
    assert a.state == ALLOCATED
    watch = c.alloc.WatchAllocations(
        pb.WatchAllocationsRequest(node_id="n1", start_revision=a.revision + 1)
    )
    for _ in range(12):  # 1.2 s of heartbeats: longer than the lease
        await asyncio.sleep(0.1)
        sent = time.monotonic()
        hb = await c.heartbeat("n1")
        assert hb.state == gm.NODE_STATE_READY
        leases.append((sent, seconds(hb.lease_expire_time)))
    ev = await next_event(watch, timeout=30)
    arrived = time.monotonic()
    watch.cancel()
    assert (ev.type, ev.allocation.id) == (ENDED, a.id)
    assert ev.allocation.state == pb.ALLOCATION_STATE_LOST
    lost_at = seconds(ev.event_time)
    # The last renewal the server had made when it declared the node lost (its lease
    # started then: lease end - LEASE). Normally the last heartbeat; earlier only if this
    # machine stalled the heartbeats for longer than the lease.
    renewed = [(s, end) for s, end in leases if end - LEASE <= lost_at]
    last_sent, lease_end = renewed[-1]
    assert lost_at >= lease_end, (lost_at, lease_end)
    assert seconds(ev.allocation.end_time) >= lease_end
    assert arrived - last_sent >= LEASE, arrived - last_sent
    node = await c.node("n1")
    assert node.state == gm.NODE_STATE_DOWN or seconds(node.last_heartbeat_time) > lost_at
    if node.state == gm.NODE_STATE_DOWN:
        assert seconds(node.lease_expire_time) <= lost_at


async def test_unhealthy_gpu_gets_no_new_work(cluster_factory: Any) -> None:
    c: Cluster = await cluster_factory()
    await c.register("n1", gpus=2)
    hb = await c.heartbeat("n1", gm.GpuStatus(index=0, health=gm.GPU_HEALTH_UNHEALTHY))
    assert hb.state == gm.NODE_STATE_READY
    gpus = await c.nodes.ListGpus(gm.ListGpusRequest(node_id="n1"))
    assert [g.health for g in gpus.gpus] == [gm.GPU_HEALTH_UNHEALTHY, gm.GPU_HEALTH_HEALTHY]
    first = await c.allocate(gpus=1)
    assert first.state == ALLOCATED and list(first.placements[0].gpu_indices) == [1]
    second = await c.allocate(gpus=1)
    assert second.state == PENDING
    whole = await c.allocate(gpus=2, dry_run=True)
    assert whole.state == PENDING
    # Healthy again: the waiting request gets GPU 0.
    await c.heartbeat("n1", gm.GpuStatus(index=0, health=gm.GPU_HEALTH_HEALTHY))
    placed = await c.placed(second.id)
    assert list(placed.placements[0].gpu_indices) == [0]


# -- cordon, uncordon, drain ------------------------------------------------------------------


async def test_cordon_uncordon_and_drain(cluster_factory: Any) -> None:
    c: Cluster = await cluster_factory()
    await c.register("n1", gpus=2)
    await c.register("n2", gpus=2)
    cordoned = (
        await c.nodes.CordonNode(gm.CordonNodeRequest(node_id="n1", reason="fw update"))
    ).node
    assert cordoned.state == gm.NODE_STATE_CORDONED and cordoned.state_reason == "fw update"
    # Re-registering (an agent restart) does not lift the cordon.
    assert (await c.register("n1", gpus=2)).node.state == gm.NODE_STATE_CORDONED
    # Heartbeats keep the nodes alive without changing that.
    c.advance(INTERVAL)
    assert (await c.heartbeat("n1")).state == gm.NODE_STATE_CORDONED
    await c.heartbeat("n2")

    on_n2 = [await c.allocate(gpus=1) for _ in range(2)]
    assert all(a.state == ALLOCATED and a.placements[0].node_id == "n2" for a in on_n2)
    # Opted out of requeueing: the drain below ends it for good (requeueing has its
    # own tests in test_drain_e2e.py).
    waiting = await c.allocate(gpus=2, no_requeue=True)
    assert waiting.state == PENDING

    uncordoned = (await c.nodes.UncordonNode(gm.UncordonNodeRequest(node_id="n1"))).node
    assert uncordoned.state == gm.NODE_STATE_READY
    placed = await c.placed(waiting.id)
    assert placed.placements[0].node_id == "n1"

    watch = c.alloc.WatchAllocations(
        pb.WatchAllocationsRequest(node_id="n1", start_revision=c.engine.hub.revision + 1)
    )
    drained = await c.nodes.DrainNode(
        gm.DrainNodeRequest(node_id="n1", reason="decommission", grace_seconds=5)
    )
    assert drained.node.state == gm.NODE_STATE_DRAINING
    assert list(drained.allocation_ids) == [waiting.id]
    ev = await next_event(watch)
    assert ev.type == ENDED and ev.allocation.id == waiting.id
    victim = ev.allocation
    assert victim.state == pb.ALLOCATION_STATE_PREEMPTED
    assert victim.grace_end_time.ToNanoseconds() - victim.end_time.ToNanoseconds() == 5 * 10**9
    # During the grace period the victim still holds its GPUs; nothing new lands on n1.
    gpus = await c.nodes.ListGpus(gm.ListGpusRequest(node_id="n1"))
    assert {g.allocation_id for g in gpus.gpus} == {waiting.id}
    late = await c.allocate(gpus=1)
    assert late.state == PENDING
    await c.advance_alive(4.9, "n1", "n2")
    gpus = await c.nodes.ListGpus(gm.ListGpusRequest(node_id="n1"))
    assert {g.allocation_id for g in gpus.gpus} == {waiting.id}
    await c.advance_alive(0.2, "n1", "n2")
    await eventually(
        lambda: c.nodes.ListGpus(gm.ListGpusRequest(node_id="n1")),
        lambda r: all(not g.allocation_id for g in r.gpus),
    )
    # Free, and the node is drained: still no new work.
    await c.advance_alive(1.0, "n1", "n2")
    await asyncio.sleep(0.1)
    assert (await c.get(late.id)).state == PENDING
    assert (await c.node("n1")).state == gm.NODE_STATE_DRAINED
    # Drained nodes can be uncordoned back into service.
    await c.nodes.UncordonNode(gm.UncordonNodeRequest(node_id="n1"))
    assert (await c.placed(late.id)).placements[0].node_id == "n1"
    watch.cancel()

    # A DOWN node keeps the operator's cordon for when its agent is back; an unknown
    # node is NOT_FOUND.
    c.advance(LEASE + INTERVAL)
    assert (await c.node("n2")).state == gm.NODE_STATE_DOWN
    cordoned = (await c.nodes.CordonNode(gm.CordonNodeRequest(node_id="n2"))).node
    assert cordoned.state == gm.NODE_STATE_DOWN
    assert cordoned.admin_state == gm.NODE_STATE_CORDONED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await c.nodes.CordonNode(gm.CordonNodeRequest(node_id="ghost"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("comeback", ["heartbeat", "register"])
async def test_a_cordon_survives_the_node_going_down_and_back(
    cluster_factory: Any, comeback: str
) -> None:
    c: Cluster = await cluster_factory()
    await c.register("n1", gpus=2)
    await c.register("n2", gpus=2)
    await c.nodes.CordonNode(gm.CordonNodeRequest(node_id="n1", reason="bad fan"))
    await c.advance_alive(LEASE + INTERVAL, "n2")
    assert (await c.node("n1")).state == gm.NODE_STATE_DOWN
    if comeback == "heartbeat":
        await c.heartbeat("n1")
    else:
        await c.register("n1", gpus=2)
    node = await c.node("n1")
    assert node.state == gm.NODE_STATE_CORDONED, gm.NodeState.Name(node.state)
    placed = [await c.allocate(gpus=1) for _ in range(3)]
    assert [a.placements[0].node_id if a.placements else "" for a in placed] == ["n2", "n2", ""]


# -- the example agent ---------------------------------------------------------------------


def _agent(c: Cluster, node_id: str, state_file: Path, lines: list[str]) -> Any:
    from rmgrpc_client import AsyncClient
    from rmgrpc_client._gpus import SimulatedGpus
    from rmgrpc_client.agent import Agent, NodeSpec

    client = AsyncClient(f"127.0.0.1:{c.server.port}")
    agent = Agent(
        client,
        NodeSpec(node_id, 16_000, 64 << 30, {"role": "agent"}),
        SimulatedGpus(node_id, 2, "H100", 80 << 30),
        state_file,
        emit=lines.append,
        heartbeat_interval=0.2,
        backoff_initial=0.05,
        backoff_max=0.2,
    )
    return client, agent


def _actions(lines: list[str]) -> list[str]:
    return [" ".join(line.split()[:2]) for line in lines if line.startswith(("start ", "stop "))]


async def test_example_agent_acts_once_across_its_own_restart(
    cluster_factory: Any, tmp_path: Path
) -> None:
    c: Cluster = await cluster_factory(
        manual=False, node_lease_seconds=5.0, heartbeat_interval_seconds=1.0
    )
    state_file = tmp_path / "agent" / "n-agent.json"
    lines: list[str] = []
    client, agent = _agent(c, "n-agent", state_file, lines)
    running = asyncio.create_task(agent.run())
    try:
        await eventually(
            lambda: c.nodes.ListNodes(gm.ListNodesRequest()), lambda r: len(r.nodes) == 1
        )
        a = await c.allocate(gpus=1)
        assert a.placements[0].node_id == "n-agent"
        await eventually(tick, lambda _: f"start {a.id}" in _actions(lines))
        b = await c.allocate(gpus=1)
        await eventually(tick, lambda _: f"start {b.id}" in _actions(lines))
        # Heartbeats keep its lease (5 s) while events flow.
        await asyncio.sleep(0.5)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await client.close()
    assert state_file.exists()

    # While the agent is away: one allocation ends, another arrives.
    await c.alloc.ReleaseAllocation(pb.ReleaseAllocationRequest(id=a.id))
    d = await c.allocate(gpus=1)
    assert d.state == ALLOCATED

    client, agent = _agent(c, "n-agent", state_file, lines)
    running = asyncio.create_task(agent.run())
    try:
        await eventually(
            tick,
            lambda _: {f"stop {a.id}", f"start {d.id}"} <= set(_actions(lines)),
        )
        await asyncio.sleep(0.5)  # long enough for any repeat to show
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await client.close()
    assert any(line.startswith("resuming from revision") for line in lines)
    assert _actions(lines) == [f"start {a.id}", f"start {b.id}", f"stop {a.id}", f"start {d.id}"]
    assert agent.reconciler.started == {b.id, d.id}


async def _read_lines(stream: asyncio.StreamReader, into: list[str]) -> None:
    while line := await stream.readline():
        into.append(line.decode().rstrip("\n"))


async def test_example_agent_process_survives_kill_9_without_repeating_actions(
    cluster_factory: Any, tmp_path: Path
) -> None:
    c: Cluster = await cluster_factory(
        manual=False, node_lease_seconds=5.0, heartbeat_interval_seconds=1.0
    )
    state_file = tmp_path / "agent-state.json"
    lines: list[str] = []

    async def launch() -> tuple[asyncio.subprocess.Process, asyncio.Task[None]]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "rmgrpc_client.agent",
            "--server",
            f"127.0.0.1:{c.server.port}",
            "--node-id",
            "n-proc",
            "--simulated-gpus",
            "2",
            "--cpu-millis",
            "8000",
            "--memory",
            "32Gi",
            "--state-file",
            str(state_file),
            "--heartbeat-interval",
            "0.3",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert proc.stdout is not None
        return proc, asyncio.create_task(_read_lines(proc.stdout, lines))

    proc, reader = await launch()
    try:
        await eventually(
            lambda: c.nodes.ListNodes(gm.ListNodesRequest()), lambda r: len(r.nodes) == 1, 20
        )
        a = await c.allocate(gpus=1)
        assert a.placements[0].node_id == "n-proc"
        await eventually(tick, lambda _: f"start {a.id}" in _actions(lines), 20)
        # The agent saves right after acting; a kill between the two repeats the action
        # (documented). Kill once the start is saved, as an agent restart here tests.
        await eventually(tick, lambda _: state_file.exists() and a.id in state_file.read_text(), 10)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        await reader
        b = await c.allocate(gpus=1)

        proc, reader = await launch()
        await eventually(tick, lambda _: f"start {b.id}" in _actions(lines), 20)
        await c.alloc.ReleaseAllocation(pb.ReleaseAllocationRequest(id=a.id))
        await eventually(tick, lambda _: f"stop {a.id}" in _actions(lines), 20)
        await asyncio.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        await reader
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert _actions(lines) == [f"start {a.id}", f"start {b.id}", f"stop {a.id}"], lines
    assert lines[-1] == "stopped"
