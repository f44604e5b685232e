"""Durability under `kill -9`: the server runs as a subprocess under concurrent Allocate/Release
load, is SIGKILLed mid-load and restarted on the same database, several times.

After each restart: every answered change is there as answered, no GPU is held twice,
revisions continue without a gap, and watchers that resume at last_seen + 1 (by hand, and
through the client library's resumable watch across every kill) get exactly the log.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from rmgrpc.v1 import allocator_pb2 as pb
from rmgrpc.v1 import allocator_pb2_grpc, gpu_manager_pb2, gpu_manager_pb2_grpc
from rmgrpc.v1.resources_pb2 import Shape
from tests.conftest import ServerProcess

ALLOCATED = pb.ALLOCATION_STATE_ALLOCATED
RELEASED = pb.ALLOCATION_STATE_RELEASED
PROGRESS = pb.ALLOCATION_EVENT_TYPE_PROGRESS
ENV = {
    "RMGRPC_SIMULATED_NODES": "2",
    "RMGRPC_SIMULATED_GPUS_PER_NODE": "8",
    "RMGRPC_WATCH_PROGRESS_SECONDS": "0.2",
    "RMGRPC_LOG_LEVEL": "warning",
}
SHAPE = Shape(gpus=1, cpu_millis=100, memory_bytes=1 << 20)


@dataclass
class Worker:
    """One client task's view: what the server answered, and what was in flight at the kill."""

    name: str
    rng: random.Random
    held: list[str] = field(default_factory=list)
    seq: int = 0
    # The answered state of every allocation this worker touched.
    answered: dict[str, pb.Allocation] = field(default_factory=dict)
    in_flight_allocate: str = ""  # request_id
    in_flight_release: str = ""  # allocation id

    async def run(self, stub: allocator_pb2_grpc.AllocatorServiceStub, hold: int) -> None:
        """Allocate and release until the server dies under us."""
        try:
            while True:
                if len(self.held) < hold and (self.rng.random() < 0.6 or not self.held):
                    self.seq += 1
                    self.in_flight_allocate = f"{self.name}-{self.seq}"
                    resp = await stub.Allocate(self._request(self.in_flight_allocate))
                    self.in_flight_allocate = ""
                    self._answered(resp.allocation)
                    self.held.append(resp.allocation.id)
                else:
                    victim = self.held.pop(self.rng.randrange(len(self.held)))
                    self.in_flight_release = victim
                    resp = await stub.ReleaseAllocation(pb.ReleaseAllocationRequest(id=victim))
                    self.in_flight_release = ""
                    self._answered(resp.allocation)
        except grpc.aio.AioRpcError as err:
            assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), err

    async def finish_in_flight(self, stub: allocator_pb2_grpc.AllocatorServiceStub) -> None:
        """After the restart: repeat what was in flight (both calls are idempotent)."""
        if self.in_flight_allocate:
            resp = await stub.Allocate(self._request(self.in_flight_allocate))
            a = resp.allocation
            # Committed as PENDING just before the kill, it is placed by the first cycle
            # after the restart, which the repeated request does not wait for.
            async with asyncio.timeout(10):
                while a.state == pb.ALLOCATION_STATE_PENDING:
                    await asyncio.sleep(0.02)
                    a = (await stub.GetAllocation(pb.GetAllocationRequest(id=a.id))).allocation
            self._answered(a)
            self.held.append(a.id)
            self.in_flight_allocate = ""
        if self.in_flight_release:
            resp = await stub.ReleaseAllocation(
                pb.ReleaseAllocationRequest(id=self.in_flight_release)
            )
            assert resp.allocation.state == RELEASED
            self._answered(resp.allocation)
            self.in_flight_release = ""

    def _request(self, request_id: str) -> pb.AllocateRequest:
        return pb.AllocateRequest(
            tenant=f"org/{self.name}", request_id=request_id, count=1, shape=SHAPE
        )

    def _answered(self, a: pb.Allocation) -> None:
        assert a.state in (ALLOCATED, RELEASED), a
        self.answered[a.id] = a


async def check_answered_changes_survived(
    stub: allocator_pb2_grpc.AllocatorServiceStub, workers: list[Worker]
) -> None:
    for w in workers:
        for aid, answered in w.answered.items():
            got = (await stub.GetAllocation(pb.GetAllocationRequest(id=aid))).allocation
            if aid == w.in_flight_release:
                # Its release may or may not have committed before the kill.
                assert got.state in (ALLOCATED, RELEASED)
                assert got.revision >= answered.revision
                continue
            assert (got.id, got.state, got.revision) == (
                answered.id,
                answered.state,
                answered.revision,
            )
            assert list(got.placements) == list(answered.placements)
            assert got.request_id == answered.request_id


async def check_no_gpu_held_twice(channel: grpc.aio.Channel) -> int:
    stub = allocator_pb2_grpc.AllocatorServiceStub(channel)
    listed = await stub.ListAllocations(
        pb.ListAllocationsRequest(states=[ALLOCATED], page_size=1000)
    )
    assert not listed.next_page_token
    held: dict[tuple[str, int], str] = {}
    for a in listed.allocations:
        for p in a.placements:
            for i in p.gpu_indices:
                assert (p.node_id, i) not in held, f"GPU {p.node_id}/{i} held twice"
                held[(p.node_id, i)] = a.id
    gpus = await gpu_manager_pb2_grpc.GpuManagerServiceStub(channel).ListGpus(
        gpu_manager_pb2.ListGpusRequest(page_size=1000)
    )
    shown = {(g.node_id, g.index): g.allocation_id for g in gpus.gpus if g.allocation_id}
    assert shown == held
    return len(held)


async def read_log(
    stub: allocator_pb2_grpc.AllocatorServiceStub, start_revision: int, until: int
) -> list[pb.AllocationEvent]:
    """Events from `start_revision` until a message at or past `until` (progress included)."""
    out: list[pb.AllocationEvent] = []
    call = stub.WatchAllocations(pb.WatchAllocationsRequest(start_revision=start_revision))
    async with asyncio.timeout(30):
        async for ev in call:
            if ev.type != PROGRESS:
                out.append(ev)
            if ev.revision >= until:
                break
    call.cancel()
    return out


async def _crash_rounds(tmp_path: Path, rounds: int, workers_n: int, seed: int) -> None:
    from rmgrpc_client import AsyncClient

    rng = random.Random(seed)
    db = tmp_path / "rmgrpc.db"
    proc = ServerProcess(db, env=ENV)
    workers = [Worker(f"w{i}", random.Random(seed * 31 + i)) for i in range(workers_n)]
    # 1 GPU each, at most 3 held per worker: the 16 GPUs never run out, so every answer is
    # ALLOCATED and nothing is preempted.
    hold = max(1, 14 // workers_n)
    resumed: list[pb.AllocationEvent] = []  # the hand-resumed watcher, across all rounds
    last_seen = 0
    library_seen: list[pb.AllocationEvent] = []

    async def library_watch(client: AsyncClient) -> None:
        async for item in client.watch_allocations(
            start_revision=1, backoff_initial=0.05, backoff_max=0.2
        ):
            assert isinstance(item, pb.AllocationEvent), "relisted: nothing is compacted here"
            library_seen.append(item)

    async def resuming_watch(stub: allocator_pb2_grpc.AllocatorServiceStub) -> None:
        nonlocal last_seen
        call = stub.WatchAllocations(pb.WatchAllocationsRequest(start_revision=last_seen + 1))
        try:
            async for ev in call:
                if ev.type != PROGRESS:
                    resumed.append(ev)
                last_seen = ev.revision
        except grpc.aio.AioRpcError as err:
            assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), err

    library = AsyncClient(proc.target)
    lib_task: asyncio.Task[None] | None = None
    try:
        for round_ in range(rounds):
            proc.start()
            async with grpc.aio.insecure_channel(proc.target) as ch:
                stub = allocator_pb2_grpc.AllocatorServiceStub(ch)
                await asyncio.wait_for(ch.channel_ready(), 10)
                await check_answered_changes_survived(stub, workers)
                await check_no_gpu_held_twice(ch)
                for w in workers:
                    await w.finish_in_flight(stub)
                if lib_task is None:
                    lib_task = asyncio.create_task(library_watch(library))
                watcher = asyncio.create_task(resuming_watch(stub))
                load = [asyncio.create_task(w.run(stub, hold)) for w in workers]
                await asyncio.sleep(0.4 + rng.random() * 0.8)
                proc.kill()  # SIGKILL, mid-load
                await asyncio.gather(*load, watcher)
            assert sum(len(w.answered) for w in workers) > 10 * (round_ + 1)

        proc.start()
        async with grpc.aio.insecure_channel(proc.target) as ch:
            stub = allocator_pb2_grpc.AllocatorServiceStub(ch)
            await asyncio.wait_for(ch.channel_ready(), 10)
            await check_answered_changes_survived(stub, workers)
            await check_no_gpu_held_twice(ch)
            for w in workers:
                await w.finish_in_flight(stub)
            # Everything the workers still hold was answered ALLOCATED and is still held.
            held = await check_no_gpu_held_twice(ch)
            assert held == sum(len(w.held) for w in workers)
            final = (await stub.ListAllocations(pb.ListAllocationsRequest(page_size=1))).revision

            full = await read_log(stub, 1, final)
            revisions = [e.revision for e in full]
            assert revisions == sorted(set(revisions)), "allocation events out of order or twice"
            # The hand-resumed watcher saw exactly the log, across every kill.
            await resuming_watch_until(stub, resumed, last_seen, final)
            assert [(e.revision, e.allocation) for e in resumed] == [
                (e.revision, e.allocation) for e in full
            ]
            # So did the client library's watch, resuming by itself.
            async with asyncio.timeout(20):
                while not library_seen or library_seen[-1].revision < full[-1].revision:
                    await asyncio.sleep(0.05)
            assert [(e.revision, e.allocation) for e in library_seen] == [
                (e.revision, e.allocation) for e in full
            ]
            # Every answered allocation's events are in the log.
            logged = {e.allocation.id for e in full}
            assert all(aid in logged for w in workers for aid in w.answered)
        assert proc.terminate() == 0
    finally:
        if lib_task is not None:
            lib_task.cancel()
            await asyncio.gather(lib_task, return_exceptions=True)
        await library.close()
        proc.stop()

    # The log itself, all kinds of events: revisions 1..N with no gap.
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        revisions = [r for (r,) in conn.execute("SELECT revision FROM events ORDER BY revision")]
    finally:
        conn.close()
    assert revisions == list(range(1, len(revisions) + 1))
    assert revisions[-1] >= final


async def resuming_watch_until(
    stub: allocator_pb2_grpc.AllocatorServiceStub,
    into: list[pb.AllocationEvent],
    last_seen: int,
    until: int,
) -> None:
    """The hand-resumed watcher's last reconnect: from last_seen + 1 to the end."""
    if last_seen < until:
        into += await read_log(stub, last_seen + 1, until)


async def test_kill_9_under_load_loses_no_answered_change(tmp_path: Path) -> None:
    await _crash_rounds(tmp_path, rounds=3, workers_n=4, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 3, 4])
async def test_kill_9_under_load_many_rounds(tmp_path: Path, seed: int) -> None:
    await _crash_rounds(tmp_path, rounds=8, workers_n=8, seed=seed)
