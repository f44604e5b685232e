"""Durability under `kill -9`: the server runs as a subprocess under concurrent Allocate/Release
load, is SIGKILLed mid-load and restarted on the same database, several times.

After each restart: every answered change is there as answered, no GPU is held twice,
revisions continue without a gap, and watchers that resume at last_seen + 1 (by hand, and
through the client library's resumable watch across every kill) get exactly the log.

Two loads: Allocate/Release with GPUs to spare (every answer ALLOCATED, checked exactly);
and the mixed load — 24 clients asking for more than 16 x 8 GPUs (many answers PENDING),
with SetQuota, Cordon/Uncordon and CreateReservation/CancelReservation in the mix — where
an allocation may since have moved on along its lifecycle but never back, and never vanish.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from rmgrpc.v1 import allocator_pb2 as pb
from rmgrpc.v1 import (
    allocator_pb2_grpc,
    gpu_manager_pb2,
    gpu_manager_pb2_grpc,
    quota_pb2,
    quota_pb2_grpc,
    reservation_pb2,
    reservation_pb2_grpc,
)
from rmgrpc.v1.resources_pb2 import Resources, Shape
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


# -- the mixed load: more asks than GPUs, quotas and cordons, on 16 nodes x 8 GPUs ----------

PENDING = pb.ALLOCATION_STATE_PENDING
CANCELLED = pb.ALLOCATION_STATE_CANCELLED
READY = gpu_manager_pb2.NODE_STATE_READY
CORDONED = gpu_manager_pb2.NODE_STATE_CORDONED
MIXED_ENV = {
    **ENV,
    "RMGRPC_SIMULATED_NODES": "16",
    # Were anything preempted, it would let go at once: ListGpus then shows exactly the
    # ALLOCATED allocations' GPUs.
    "RMGRPC_PREEMPTION_GRACE_SECONDS": "0",
}
MIXED_CLIENTS = 24
MIXED_NODES = 16
# Up to 8 asks of 1-4 GPUs open per client: 24 x 8 x ~2 GPUs wanted of 128, so many wait.
MIXED_HOLD = 8
EXPIRED = pb.ALLOCATION_STATE_EXPIRED
PREEMPTED = pb.ALLOCATION_STATE_PREEMPTED
LOST = pb.ALLOCATION_STATE_LOST
TERMINAL = {RELEASED, CANCELLED, EXPIRED, PREEMPTED, LOST}
# What an allocation may have become since an answer showed it in a state: that state or a
# later one of its lifecycle (PENDING → ALLOCATED → RELEASED/EXPIRED/PREEMPTED/LOST, or
# PENDING → CANCELLED). Never NOT_FOUND, never back.
LATER: dict[int, set[int]] = {
    PENDING: {PENDING, ALLOCATED, *TERMINAL},
    ALLOCATED: {ALLOCATED, RELEASED, EXPIRED, PREEMPTED, LOST},
    **{s: {s} for s in TERMINAL},
}


def _name(state: int) -> str:
    return pb.AllocationState.Name(state)  # type: ignore[arg-type]


@dataclass
class Op:
    """A call sent whose answer had not arrived when the server died."""

    kind: str  # allocate, release, quota, cordon, uncordon, reserve, cancel
    allocate: pb.AllocateRequest | None = None
    allocation_id: str = ""
    quota: quota_pb2.Quota | None = None
    reserve: reservation_pb2.CreateReservationRequest | None = None
    reservation_id: str = ""


@dataclass
class MixedClient:
    """One of the concurrent clients: its own tenant, perhaps a node it cordons, and the
    last answer it got for each thing it changed."""

    name: str
    rng: random.Random
    node_id: str  # the node only this client cordons and uncordons; "" for none
    held: list[str] = field(default_factory=list)
    seq: int = 0
    answered: dict[str, pb.Allocation] = field(default_factory=dict)
    quota: quota_pb2.Quota | None = None  # the last acknowledged SetQuota answer
    admin_state: int = 0  # the last acknowledged cordon/uncordon; 0 before any
    # The acknowledged state of every reservation it made (an hour ahead: nothing but a
    # cancel moves it while the test runs), and the one it may cancel next.
    reservations: dict[str, int] = field(default_factory=dict)
    open_reservation: str = ""
    in_flight: Op | None = None
    answers: dict[str, int] = field(default_factory=dict)  # answer kind → count

    @property
    def tenant(self) -> str:
        return f"org/{self.name}"

    async def run(self, channel: grpc.aio.Channel) -> None:
        """Calls until the server dies under us."""
        alloc = allocator_pb2_grpc.AllocatorServiceStub(channel)
        quotas = quota_pb2_grpc.QuotaServiceStub(channel)
        nodes = gpu_manager_pb2_grpc.GpuManagerServiceStub(channel)
        reservations = reservation_pb2_grpc.ReservationServiceStub(channel)
        try:
            while True:
                r = self.rng.random()
                if self.node_id and r < 0.04:
                    await self._toggle(nodes)
                elif r < 0.08:
                    await self._set_quota(quotas)
                elif r < 0.12:
                    await self._reserve_or_cancel(reservations)
                elif len(self.held) < MIXED_HOLD and (r < 0.6 or not self.held):
                    await self._allocate(alloc)
                else:
                    await self._release(alloc)
        except grpc.aio.AioRpcError as err:
            assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), err

    async def _allocate(self, alloc: allocator_pb2_grpc.AllocatorServiceStub) -> None:
        self.seq += 1
        request = pb.AllocateRequest(
            tenant=self.tenant,
            request_id=f"{self.name}-{self.seq}",
            count=1,
            shape=Shape(gpus=self.rng.choice((1, 1, 2, 4)), cpu_millis=100, memory_bytes=1 << 20),
            # A hard end well before the reservations' windows, so those can be guaranteed.
            max_duration_seconds=600,
        )
        self.in_flight = Op("allocate", allocate=request)
        resp = await alloc.Allocate(request)
        self.in_flight = None
        a = resp.allocation
        assert a.state in (PENDING, ALLOCATED), a
        self._answered(a)
        self.held.append(a.id)

    async def _release(self, alloc: allocator_pb2_grpc.AllocatorServiceStub) -> None:
        victim = self.held.pop(self.rng.randrange(len(self.held)))
        self.in_flight = Op("release", allocation_id=victim)
        resp = await alloc.ReleaseAllocation(pb.ReleaseAllocationRequest(id=victim))
        self.in_flight = None
        assert resp.allocation.state in TERMINAL, resp.allocation
        self._answered(resp.allocation)

    async def _set_quota(self, quotas: quota_pb2_grpc.QuotaServiceStub) -> None:
        # Limits stay above any one ask (4 GPUs): no Allocate is refused for quota.
        want = quota_pb2.Quota(
            tenant=self.tenant,
            parent="org",
            limit=Resources(gpus=self.rng.choice((8, 16, 32, 64))),
            weight=float(self.rng.choice((1, 2, 4))),
        )
        self.in_flight = Op("quota", quota=want)
        resp = await quotas.SetQuota(quota_pb2.SetQuotaRequest(quota=want))
        self.in_flight = None
        assert _quota_fields(resp.quota) == _quota_fields(want), resp.quota
        self.quota = resp.quota
        self.answers["quota"] = self.answers.get("quota", 0) + 1

    async def _toggle(self, nodes: gpu_manager_pb2_grpc.GpuManagerServiceStub) -> None:
        if self.admin_state == CORDONED:
            self.in_flight = Op("uncordon")
            resp = await nodes.UncordonNode(
                gpu_manager_pb2.UncordonNodeRequest(node_id=self.node_id)
            )
            node = resp.node
        else:
            self.in_flight = Op("cordon")
            resp2 = await nodes.CordonNode(
                gpu_manager_pb2.CordonNodeRequest(node_id=self.node_id, reason=self.name)
            )
            node = resp2.node
        target = CORDONED if self.in_flight.kind == "cordon" else READY
        self.in_flight = None
        assert node.admin_state == target, node
        self.admin_state = target
        self.answers["admin"] = self.answers.get("admin", 0) + 1

    async def _reserve_or_cancel(self, stub: reservation_pb2_grpc.ReservationServiceStub) -> None:
        if self.open_reservation:
            rid = self.open_reservation
            self.in_flight = Op("cancel", reservation_id=rid)
            got = (
                await stub.CancelReservation(reservation_pb2.CancelReservationRequest(id=rid))
            ).reservation
            self.in_flight = None
            assert got.state == reservation_pb2.RESERVATION_STATE_CANCELLED, got
            self.reservations[rid] = got.state
            self.open_reservation = ""
            self.answers["cancel"] = self.answers.get("cancel", 0) + 1
            return
        self.seq += 1
        start = time.time() + 3600
        request = reservation_pb2.CreateReservationRequest(
            tenant=self.tenant,
            request_id=f"{self.name}-r{self.seq}",
            shape=Shape(gpus=1, cpu_millis=100, memory_bytes=1 << 20),
            count=1,
            start_time=_stamp(start),
            end_time=_stamp(start + 3600),
        )
        self.in_flight = Op("reserve", reserve=request)
        try:
            got = (await stub.CreateReservation(request)).reservation
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            self.in_flight = None  # an answer too: it cannot be guaranteed, nothing made
            self.answers["reserve_refused"] = self.answers.get("reserve_refused", 0) + 1
            return
        self.in_flight = None
        self._reserved(got)

    def _reserved(self, got: reservation_pb2.Reservation) -> None:
        assert got.state == reservation_pb2.RESERVATION_STATE_SCHEDULED, got
        self.reservations[got.id] = got.state
        self.open_reservation = got.id
        self.answers["reserve"] = self.answers.get("reserve", 0) + 1

    def _answered(self, a: pb.Allocation) -> None:
        before = self.answered.get(a.id)
        if before is not None:
            assert a.state in LATER[before.state], (before, a)
            assert a.revision >= before.revision, (before, a)
        self.answered[a.id] = a
        self.answers[_name(a.state)] = self.answers.get(_name(a.state), 0) + 1

    async def check_survived(self, channel: grpc.aio.Channel) -> None:
        """Every acknowledged change of this client is there after the restart, as answered
        or (allocations) moved on along the lifecycle; an unanswered call may or may not
        have landed."""
        alloc = allocator_pb2_grpc.AllocatorServiceStub(channel)
        for aid, answered in self.answered.items():
            try:
                got = (await alloc.GetAllocation(pb.GetAllocationRequest(id=aid))).allocation
            except grpc.aio.AioRpcError as err:
                raise AssertionError(
                    f"acknowledged {_name(answered.state)} allocation {aid} (revision "
                    f"{answered.revision}) is gone after kill -9: {err.code().name}"
                ) from None
            assert got.state in LATER[answered.state], (
                f"{aid} was answered {_name(answered.state)}, reads {_name(got.state)}"
            )
            assert got.revision >= answered.revision, (answered, got)
            assert (got.tenant, got.request_id, got.create_revision) == (
                answered.tenant,
                answered.request_id,
                answered.create_revision,
            )
            if answered.state == ALLOCATED:
                assert list(got.placements) == list(answered.placements), (answered, got)

        op = self.in_flight
        quotas = quota_pb2_grpc.QuotaServiceStub(channel)
        try:
            q: quota_pb2.Quota | None = (
                await quotas.GetQuota(quota_pb2.GetQuotaRequest(tenant=self.tenant))
            ).quota
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND, err
            q = None
        acked = _quota_key(self.quota) if self.quota is not None else None
        got_key = _quota_key(q) if q is not None else None
        if op is not None and op.kind == "quota":
            assert op.quota is not None
            assert got_key == acked or (
                q is not None and _quota_fields(q) == _quota_fields(op.quota)
            ), f"{self.tenant}: quota {q} is neither the acknowledged {self.quota} nor {op.quota}"
        else:
            assert got_key == acked, f"{self.tenant}: acknowledged {self.quota}, reads {q}"
        if q is not None and self.quota is not None and got_key == acked:
            assert abs(_seconds(q.update_time) - _seconds(self.quota.update_time)) < 1e-3

        resv = reservation_pb2_grpc.ReservationServiceStub(channel)
        for rid, acked_state in self.reservations.items():
            try:
                r = (
                    await resv.GetReservation(reservation_pb2.GetReservationRequest(id=rid))
                ).reservation
            except grpc.aio.AioRpcError as err:
                raise AssertionError(
                    f"acknowledged reservation {rid} is gone after kill -9: {err.code().name}"
                ) from None
            allowed = {acked_state}
            if op is not None and op.kind == "cancel" and op.reservation_id == rid:
                allowed.add(reservation_pb2.RESERVATION_STATE_CANCELLED)
            assert r.state in allowed, f"{rid}: acknowledged {acked_state}, reads {r.state}"
            assert r.tenant == self.tenant, r

        if self.node_id and (self.admin_state or op is not None):
            nodes = gpu_manager_pb2_grpc.GpuManagerServiceStub(channel)
            node = (await nodes.GetNode(gpu_manager_pb2.GetNodeRequest(node_id=self.node_id))).node
            acked_admin = self.admin_state or READY
            allowed = {acked_admin}
            if op is not None and op.kind in ("cordon", "uncordon"):
                allowed.add(CORDONED if op.kind == "cordon" else READY)
            assert node.admin_state in allowed, (
                f"{self.node_id}: admin state {node.admin_state}, acknowledged {acked_admin}"
            )

    async def finish_in_flight(self, channel: grpc.aio.Channel) -> None:
        """After the restart: repeat what was in flight (every one of these is idempotent),
        so what this client knows is again all acknowledged."""
        op, self.in_flight = self.in_flight, None
        if op is None:
            return
        if op.kind == "allocate":
            assert op.allocate is not None
            alloc = allocator_pb2_grpc.AllocatorServiceStub(channel)
            a = (await alloc.Allocate(op.allocate)).allocation
            assert a.state in LATER[PENDING], a
            self._answered(a)
            self.held.append(a.id)
        elif op.kind == "release":
            alloc = allocator_pb2_grpc.AllocatorServiceStub(channel)
            resp = await alloc.ReleaseAllocation(pb.ReleaseAllocationRequest(id=op.allocation_id))
            assert resp.allocation.state in TERMINAL, resp.allocation
            self._answered(resp.allocation)
        elif op.kind == "quota":
            assert op.quota is not None
            quotas = quota_pb2_grpc.QuotaServiceStub(channel)
            self.quota = (await quotas.SetQuota(quota_pb2.SetQuotaRequest(quota=op.quota))).quota
        elif op.kind == "reserve":
            assert op.reserve is not None
            stub = reservation_pb2_grpc.ReservationServiceStub(channel)
            try:
                self._reserved((await stub.CreateReservation(op.reserve)).reservation)
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
        elif op.kind == "cancel":
            stub = reservation_pb2_grpc.ReservationServiceStub(channel)
            req = reservation_pb2.CancelReservationRequest(id=op.reservation_id)
            got = (await stub.CancelReservation(req)).reservation
            assert got.state == reservation_pb2.RESERVATION_STATE_CANCELLED, got
            self.reservations[got.id] = got.state
            self.open_reservation = ""
        else:
            nodes = gpu_manager_pb2_grpc.GpuManagerServiceStub(channel)
            if op.kind == "cordon":
                await nodes.CordonNode(gpu_manager_pb2.CordonNodeRequest(node_id=self.node_id))
                self.admin_state = CORDONED
            else:
                await nodes.UncordonNode(gpu_manager_pb2.UncordonNodeRequest(node_id=self.node_id))
                self.admin_state = READY


def _quota_fields(q: quota_pb2.Quota) -> tuple[object, ...]:
    return (
        q.tenant,
        q.parent,
        q.limit.SerializeToString(),
        q.guaranteed.SerializeToString(),
        q.weight,
    )


def _quota_key(q: quota_pb2.Quota) -> tuple[object, ...]:
    return (*_quota_fields(q), q.revision)


def _stamp(t: float) -> Timestamp:
    out = Timestamp()
    out.FromNanoseconds(int(t * 1e9))
    return out


def _seconds(t: object) -> float:
    return t.seconds + t.nanos / 1e9  # type: ignore[attr-defined]


async def no_gpu_held_twice(channel: grpc.aio.Channel) -> int:
    """ALLOCATED allocations hold disjoint GPUs and ListGpus shows exactly them; both read
    at one revision (the first cycle after a restart may still be placing work)."""
    alloc = allocator_pb2_grpc.AllocatorServiceStub(channel)
    gm = gpu_manager_pb2_grpc.GpuManagerServiceStub(channel)
    async with asyncio.timeout(20):
        while True:
            listed = await alloc.ListAllocations(
                pb.ListAllocationsRequest(states=[ALLOCATED], page_size=1000)
            )
            gpus = await gm.ListGpus(gpu_manager_pb2.ListGpusRequest(page_size=1000))
            if listed.revision == gpus.revision:
                break
            await asyncio.sleep(0.05)
    assert not listed.next_page_token and not gpus.next_page_token
    held: dict[tuple[str, int], str] = {}
    for a in listed.allocations:
        for p in a.placements:
            for i in p.gpu_indices:
                assert (p.node_id, i) not in held, (
                    f"GPU {p.node_id}/{i} held by {held[(p.node_id, i)]} and {a.id}"
                )
                held[(p.node_id, i)] = a.id
    shown = {(g.node_id, g.index): g.allocation_id for g in gpus.gpus if g.allocation_id}
    assert shown == held
    return len(held)


def log_revisions(db: Path) -> list[int]:
    """Every revision in the event log, read from the file itself (server not running)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [r for (r,) in conn.execute("SELECT revision FROM events ORDER BY revision")]
    finally:
        conn.close()


class HandResumedWatcher:
    """WatchAllocations from revision 1, reconnected by hand at last_seen + 1 after each kill."""

    def __init__(self) -> None:
        self.events: list[pb.AllocationEvent] = []
        self.last_seen = 0

    async def run(self, stub: allocator_pb2_grpc.AllocatorServiceStub) -> None:
        call = stub.WatchAllocations(pb.WatchAllocationsRequest(start_revision=self.last_seen + 1))
        try:
            async for ev in call:
                if ev.type != PROGRESS:
                    self.events.append(ev)
                self.last_seen = ev.revision
        except grpc.aio.AioRpcError as err:
            assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), err


async def _mixed_crash_rounds(tmp_path: Path, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    db = tmp_path / "rmgrpc.db"
    proc = ServerProcess(db, env=MIXED_ENV)
    clients = [
        MixedClient(
            f"c{i}",
            random.Random(seed * 1000 + i),
            f"sim-node-{i}" if i < MIXED_NODES else "",
        )
        for i in range(MIXED_CLIENTS)
    ]
    watcher = HandResumedWatcher()

    async def restarted() -> None:
        """Start on the same database and check everything acknowledged is there."""
        proc.start()
        async with grpc.aio.insecure_channel(proc.target) as ch:
            await asyncio.wait_for(ch.channel_ready(), 10)
            await asyncio.gather(*(c.check_survived(ch) for c in clients))
            await no_gpu_held_twice(ch)
            await asyncio.gather(*(c.finish_in_flight(ch) for c in clients))

    async def load(seconds: float) -> None:
        channels = [grpc.aio.insecure_channel(proc.target) for _ in clients]
        try:
            stub = allocator_pb2_grpc.AllocatorServiceStub(channels[0])
            watching = asyncio.create_task(watcher.run(stub))
            running = [
                asyncio.create_task(c.run(ch)) for c, ch in zip(clients, channels, strict=True)
            ]
            await asyncio.sleep(seconds)
            proc.kill()  # SIGKILL, mid-load
            await asyncio.gather(*running, watching)
        finally:
            for ch in channels:
                await ch.close()

    try:
        for _ in range(rounds):
            await restarted()
            await load(2.5 + rng.random())
            revisions = log_revisions(db)
            assert revisions == list(range(1, len(revisions) + 1)), "gap in the event log"

        await restarted()
        async with grpc.aio.insecure_channel(proc.target) as ch:
            stub = allocator_pb2_grpc.AllocatorServiceStub(ch)
            held = await no_gpu_held_twice(ch)
            assert held <= MIXED_NODES * 8
            final = (await stub.ListAllocations(pb.ListAllocationsRequest(page_size=1))).revision
            full = await read_log(stub, 1, final)
            revisions = [e.revision for e in full]
            assert revisions == sorted(set(revisions)), "allocation events out of order or twice"
            # The hand-resumed watcher saw exactly the log, across every kill.
            await resuming_watch_until(stub, watcher.events, watcher.last_seen, final)
            assert [(e.revision, e.allocation) for e in watcher.events] == [
                (e.revision, e.allocation) for e in full
            ]
            # Every acknowledged allocation's last answer is an event of the log.
            logged = {(e.allocation.id, e.revision) for e in full}
            for c in clients:
                for a in c.answered.values():
                    assert (a.id, a.revision) in logged, a
        assert proc.terminate() == 0
    finally:
        proc.stop()

    revisions = log_revisions(db)
    assert revisions == list(range(1, len(revisions) + 1)), "gap in the event log"
    assert revisions[-1] >= final
    # The load did what it is meant to: many answers PENDING, quotas and cordons acknowledged.
    total: dict[str, int] = {}
    for c in clients:
        for kind, n in c.answers.items():
            total[kind] = total.get(kind, 0) + n
    assert total.get("ALLOCATION_STATE_PENDING", 0) >= 20 * rounds, total
    assert total.get("ALLOCATION_STATE_ALLOCATED", 0) >= 20 * rounds, total
    assert total.get("quota", 0) >= 5 * rounds and total.get("admin", 0) >= 5 * rounds, total
    assert total.get("reserve", 0) >= 5 * rounds and total.get("cancel", 0) >= 2 * rounds, total


async def test_kill_9_mixed_load_five_rounds(tmp_path: Path) -> None:
    """Durability under kill -9 with 24 clients on 16 x 8 GPUs, five rounds on one database:
    every acknowledged Allocate (PENDING or ALLOCATED), Release, SetQuota, Cordon/Uncordon
    and CreateReservation/CancelReservation survives, allocations only move forward in
    their lifecycle, no GPU is held twice, the log has no gap, and a watcher resumed at
    last_seen + 1 reads exactly the full replay."""
    await _mixed_crash_rounds(tmp_path, rounds=5, seed=11)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [12, 13, 14])
async def test_kill_9_mixed_load_many_rounds(tmp_path: Path, seed: int) -> None:
    """The same durability promises as the five-round test, over more rounds and seeds."""
    await _mixed_crash_rounds(tmp_path, rounds=10, seed=seed)
