"""The node agent: the pure reconciler, its state file, and the I/O loop against a fake
server (register, heartbeat, re-register, watch, resume, relist, SIGTERM)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from rmgrpc.v1 import (
    allocator_pb2,
    allocator_pb2_grpc,
    gpu_manager_pb2,
    gpu_manager_pb2_grpc,
    resources_pb2,
)
from rmgrpc_client import AsyncClient
from rmgrpc_client._gpus import SimulatedGpus, model_name, open_nvml
from rmgrpc_client._reconcile import AgentState, Reconciler, Start, Stop
from rmgrpc_client.agent import Agent, NodeSpec

A = allocator_pb2
ALLOCATED = A.ALLOCATION_STATE_ALLOCATED
RELEASED = A.ALLOCATION_STATE_RELEASED
PREEMPTED = A.ALLOCATION_STATE_PREEMPTED
PLACED = A.ALLOCATION_EVENT_TYPE_PLACED
UPDATED = A.ALLOCATION_EVENT_TYPE_UPDATED
ENDED = A.ALLOCATION_EVENT_TYPE_ENDED
PROGRESS = A.ALLOCATION_EVENT_TYPE_PROGRESS


def alloc(
    alloc_id: str, state: int = ALLOCATED, nodes: dict[str, list[int]] | None = None
) -> A.Allocation:
    placements = [
        resources_pb2.Placement(node_id=node, gpu_indices=gpus)
        for node, gpus in (nodes if nodes is not None else {"n1": [0, 1]}).items()
    ]
    return A.Allocation(id=alloc_id, tenant="org/team", state=state, placements=placements)


def event(revision: int, kind: int, allocation: A.Allocation | None = None) -> A.AllocationEvent:
    return A.AllocationEvent(revision=revision, type=kind, allocation=allocation)


# -- the reconciler ---------------------------------------------------------------------


def test_placed_here_starts_once_and_ended_stops_once() -> None:
    r = Reconciler("n1")
    assert r.on_event(event(3, PLACED, alloc("a1"))) == [Start("a1", "org/team", (0, 1), 3)]
    assert r.on_event(event(5, UPDATED, alloc("a1"))) == []  # e.g. a lease renewal
    assert r.on_event(event(8, ENDED, alloc("a1", RELEASED))) == [Stop("a1", "released", 8)]
    assert r.on_event(event(9, ENDED, alloc("a1", RELEASED))) == []
    assert r.started == frozenset()
    assert r.revision == 9


def test_events_at_or_below_the_applied_revision_are_ignored() -> None:
    r = Reconciler("n1")
    r.on_event(event(4, PLACED, alloc("a1")))
    assert r.on_event(event(4, ENDED, alloc("a1", RELEASED))) == []
    assert r.on_event(event(2, PLACED, alloc("a2"))) == []
    assert r.started == {"a1"}


def test_allocations_of_other_nodes_are_ignored_and_gpus_are_this_nodes() -> None:
    r = Reconciler("n1")
    assert r.on_event(event(1, PLACED, alloc("a1", nodes={"n2": [0]}))) == []
    gang = alloc("a2", nodes={"n2": [0, 1]})
    gang.placements.add(node_id="n1", gpu_indices=[4, 5])
    assert r.on_event(event(2, PLACED, gang)) == [Start("a2", "org/team", (4, 5), 2)]


def test_moved_off_or_preempted_stops_with_a_reason() -> None:
    r = Reconciler("n1")
    r.on_event(event(1, PLACED, alloc("a1")))
    r.on_event(event(2, PLACED, alloc("a2")))
    assert r.on_event(event(3, UPDATED, alloc("a1", nodes={"n2": [0]}))) == [
        Stop("a1", "moved off this node", 3)
    ]
    preempted = alloc("a2", PREEMPTED)
    preempted.state_reason = "higher priority work"
    assert r.on_event(event(4, ENDED, preempted)) == [
        Stop("a2", "preempted: higher priority work", 4)
    ]


def test_progress_only_advances_the_revision() -> None:
    r = Reconciler("n1")
    assert r.on_event(event(7, PROGRESS)) == []
    assert r.revision == 7
    r.advance(5)
    assert r.revision == 7


def test_relist_starts_what_is_missing_and_stops_what_is_gone() -> None:
    r = Reconciler("n1", AgentState("n1", revision=10, started={"keep", "gone"}))
    actions = r.on_relist(
        [
            alloc("keep"),
            alloc("new"),
            alloc("elsewhere", nodes={"n2": [0]}),
            alloc("old", RELEASED),
        ],
        revision=20,
    )
    assert actions == [
        Stop("gone", "no longer placed here", 20),
        Start("new", "org/team", (0, 1), 20),
    ]
    assert r.started == {"keep", "new"}
    assert r.revision == 20
    assert r.on_relist([alloc("keep"), alloc("new")], revision=21) == []


def test_state_file_round_trip_and_restart_repeats_nothing(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "n1.json"
    first = Reconciler("n1")
    first.on_event(event(3, PLACED, alloc("a1")))
    first.state().save(path)
    assert json.loads(path.read_text())["started"] == ["a1"]

    loaded = AgentState.load(path, "n1")
    assert loaded == AgentState("n1", 3, {"a1"})
    again = Reconciler("n1", loaded)
    assert again.on_event(event(3, PLACED, alloc("a1"))) == []  # replayed: already applied
    assert again.on_event(event(6, UPDATED, alloc("a1"))) == []  # newer, still running
    assert again.on_event(event(7, ENDED, alloc("a1", RELEASED))) == [Stop("a1", "released", 7)]


def test_state_file_missing_foreign_or_broken(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    assert AgentState.load(path, "n1") is None
    AgentState("n2", 1, set()).save(path)
    with pytest.raises(ValueError, match="n2"):
        AgentState.load(path, "n1")
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not an agent state"):
        AgentState.load(path, "n1")


def test_gpu_sources() -> None:
    sim = SimulatedGpus("n1", 2, "A100", 40 << 30)
    assert [(g.index, g.model, g.uuid) for g in sim.inventory()] == [
        (0, "A100", "GPU-sim-n1-0"),
        (1, "A100", "GPU-sim-n1-1"),
    ]
    assert sim.statuses() == []
    assert model_name("NVIDIA H100 80GB HBM3") == "H100"
    assert model_name("Tesla V100-SXM2-16GB") == "V100"


# -- the I/O loop against a fake server -------------------------------------------------


class FakeServer(
    allocator_pb2_grpc.AllocatorServiceServicer, gpu_manager_pb2_grpc.GpuManagerServiceServicer
):
    """Just enough of rmgrpc for an agent: nodes, an allocation log, watch, list."""

    def __init__(self) -> None:
        self.nodes: set[str] = set()
        self.registrations = 0
        self.heartbeats = 0
        self.log: list[A.AllocationEvent] = []
        self.current: dict[str, A.Allocation] = {}
        self.oldest = 1
        self.drop_next_watch = False
        self.watch_starts: list[int] = []
        self.changed = asyncio.Condition()
        self.target = ""

    @property
    def revision(self) -> int:
        return self.log[-1].revision if self.log else 0

    async def put(self, kind: int, allocation: A.Allocation, gap: int = 1) -> None:
        allocation.revision = self.revision + gap
        self.current[allocation.id] = allocation
        self.log.append(event(allocation.revision, kind, allocation))
        async with self.changed:
            self.changed.notify_all()

    async def RegisterNode(self, request: Any, context: Any) -> Any:
        self.nodes.add(request.node_id)
        self.registrations += 1
        return gpu_manager_pb2.RegisterNodeResponse(heartbeat_interval_seconds=30)

    async def Heartbeat(self, request: Any, context: Any) -> Any:
        self.heartbeats += 1
        if request.node_id not in self.nodes:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"node {request.node_id} not found")
        return gpu_manager_pb2.HeartbeatResponse(revision=self.revision)

    async def ListAllocations(self, request: Any, context: Any) -> Any:
        items = [
            a
            for a in self.current.values()
            if any(p.node_id == request.node_id for p in a.placements)
            and (not request.states or a.state in request.states)
        ]
        return A.ListAllocationsResponse(allocations=items, revision=self.revision)

    async def WatchAllocations(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self.watch_starts.append(request.start_revision)
        start = request.start_revision or self.revision + 1
        if start < self.oldest:
            info = error_details_pb2.ErrorInfo(
                reason="REVISION_COMPACTED",
                metadata={"oldest_revision": str(self.oldest), "current_revision": "0"},
            )
            detail = any_pb2.Any()
            detail.Pack(info)
            status = status_pb2.Status(
                code=code_pb2.OUT_OF_RANGE, message="compacted", details=[detail]
            )
            await context.abort_with_status(rpc_status.to_status(status))
        while True:
            for e in [e for e in self.log if e.revision >= start]:
                if self.drop_next_watch:
                    self.drop_next_watch = False
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "server restarting")
                if any(p.node_id == request.node_id for p in e.allocation.placements):
                    yield e
                start = e.revision + 1
            async with self.changed:
                await self.changed.wait_for(lambda s=start: self.revision >= s)


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeServer, AsyncClient]]:
    servicer = FakeServer()
    server = grpc.aio.server()
    allocator_pb2_grpc.add_AllocatorServiceServicer_to_server(servicer, server)
    gpu_manager_pb2_grpc.add_GpuManagerServiceServicer_to_server(servicer, server)
    servicer.target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    client = AsyncClient(servicer.target)
    yield servicer, client
    await client.close()
    await server.stop(None)


async def eventually(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not check():
            await asyncio.sleep(0.005)


class Running:
    """An Agent on a task, its output lines collected."""

    def __init__(self, client: AsyncClient, state_file: Path) -> None:
        self.lines: list[str] = []
        self.agent = Agent(
            client,
            NodeSpec("n1", 8000, 64 << 30),
            SimulatedGpus("n1", 8, "H100", 80 << 30),
            state_file,
            emit=self.lines.append,
            heartbeat_interval=0.01,
            backoff_initial=0.001,
            backoff_max=0.01,
        )
        self.task = asyncio.create_task(self.agent.run())

    def actions(self) -> list[str]:
        return [
            line.split(" (revision")[0] for line in self.lines if line.startswith(("start", "stop"))
        ]

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def test_agent_acts_once_across_drops_reregisters_and_resumes_after_restart(
    fake: tuple[FakeServer, AsyncClient], tmp_path: Path
) -> None:
    server, client = fake
    state_file = tmp_path / "n1.json"
    await server.put(PLACED, alloc("a1"), gap=3)  # 3: already running here before the agent
    await server.put(PLACED, alloc("x", nodes={"n2": [0]}))  # 4: another node's

    agent = Running(client, state_file)
    await eventually(lambda: "start a1 tenant=org/team gpus=0,1" in agent.actions())
    await eventually(lambda: server.watch_starts == [5])  # listed at 4, watching from 5

    await server.put(PLACED, alloc("a2", nodes={"n1": [2]}), gap=2)  # 6
    server.drop_next_watch = True
    await server.put(ENDED, alloc("a1", RELEASED))  # 7, after a dropped stream
    await eventually(lambda: len(agent.actions()) == 3)
    assert agent.actions() == [
        "start a1 tenant=org/team gpus=0,1",
        "start a2 tenant=org/team gpus=2",
        "stop a1 (released)",
    ]
    assert not server.drop_next_watch
    assert len(server.watch_starts) == 2  # one reconnect, resumed (no relist)

    server.nodes.clear()  # the server lost the node
    await eventually(lambda: server.registrations == 2)
    assert "the server does not know this node; registering again" in agent.lines
    await agent.stop()
    assert AgentState.load(state_file, "n1") == AgentState("n1", 7, {"a2"})

    # Restart: resume at 8, repeat nothing, act on what happened meanwhile.
    await server.put(ENDED, alloc("a2", RELEASED))  # 8
    again = Running(client, state_file)
    await eventually(lambda: again.actions() == ["stop a2 (released)"])
    assert server.watch_starts[-1] == 8
    assert again.lines[0] == "resuming from revision 7 with 1 allocation(s) started"
    await again.stop()


async def test_agent_restart_after_compaction_relists_and_reconciles(
    fake: tuple[FakeServer, AsyncClient], tmp_path: Path
) -> None:
    server, client = fake
    state_file = tmp_path / "n1.json"
    AgentState("n1", 2, {"old", "kept"}).save(state_file)
    await server.put(PLACED, alloc("kept"), gap=3)  # 3
    await server.put(PLACED, alloc("new"))  # 4
    server.oldest = 4  # 3 is compacted: the agent must relist

    agent = Running(client, state_file)
    await eventually(lambda: len(agent.actions()) == 2)
    assert agent.actions() == [
        "stop old (no longer placed here)",
        "start new tenant=org/team gpus=0,1",
    ]
    assert "relisted at revision 4; reconciling" in agent.lines
    await agent.stop()
    assert AgentState.load(state_file, "n1") == AgentState("n1", 4, {"kept", "new"})


async def test_agent_process_stops_cleanly_on_sigterm(
    fake: tuple[FakeServer, AsyncClient], tmp_path: Path
) -> None:
    server, _ = fake
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "rmgrpc_client.agent",
        "--server",
        server.target,
        "--node-id",
        "n1",
        "--simulated-gpus",
        "2",
        "--state-file",
        str(tmp_path / "n1.json"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    lines = []
    async with asyncio.timeout(20):
        while not lines or not lines[-1].startswith("registered"):
            lines.append((await proc.stdout.readline()).decode().strip())
    proc.send_signal(signal.SIGTERM)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()
    assert out.decode().strip().endswith("stopped")
    assert "registered node n1 with" in lines[-1]
    if open_nvml()[0] is None:
        assert lines[0].startswith("NVML not available (")
        assert lines[0].endswith("simulating 2 H100 GPU(s)")
    assert server.registrations == 1
