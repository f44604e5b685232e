"""Reservations through a real server on 127.0.0.1 whose clock is a `ManualClock`:
booking, refusal with the conflicts and the earliest window, idempotency, validation,
the states moved by the clock, the watch stream; work running inside a reservation and
never past it; backfill one second either side of the start; the reservation honoured
when the cluster fills (stale plans refused, newer work preempted, lost nodes booked
again); a restart and a kill -9."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2

from rmgrpc.clock import ManualClock
from rmgrpc.model import Placement
from rmgrpc.scheduler.snapshot import Admission, Decisions
from rmgrpc.server import RunningServer, start
from rmgrpc.v1 import allocator_pb2 as apb
from rmgrpc.v1 import (
    allocator_pb2_grpc,
    gpu_manager_pb2,
    gpu_manager_pb2_grpc,
    reservation_pb2_grpc,
    resources_pb2,
)
from rmgrpc.v1 import reservation_pb2 as rpb
from tests.conftest import ServerProcess, make_settings
from tests.e2e.helpers import detail, field_violations

HOUR = 3600.0
SCHEDULED = rpb.RESERVATION_STATE_SCHEDULED
ACTIVE = rpb.RESERVATION_STATE_ACTIVE
ENDED = rpb.RESERVATION_STATE_ENDED
CANCELLED = rpb.RESERVATION_STATE_CANCELLED


def stamp(t: float) -> Timestamp:
    out = Timestamp()
    out.FromNanoseconds(int(t * 1e9))
    return out


class Cluster:
    """A server with 2 simulated nodes of 8 GPUs each, on a manual clock."""

    def __init__(self, tmp_path: Path, **settings: object) -> None:
        self.tmp_path = tmp_path
        self.settings = settings
        self.clock = ManualClock()
        self.running: RunningServer | None = None
        self.channel: grpc.aio.Channel | None = None

    async def start(self) -> Cluster:
        settings = make_settings(self.tmp_path, node_lease_seconds=1e6, **self.settings)
        self.running = await start(settings, clock=self.clock)
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.running.port}")
        self.resv = reservation_pb2_grpc.ReservationServiceStub(self.channel)
        self.alloc = allocator_pb2_grpc.AllocatorServiceStub(self.channel)
        return self

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        if self.running is not None:
            await self.running.stop(0)

    @property
    def now(self) -> float:
        return self.clock.now()

    async def advance(self, seconds: float) -> None:
        """Moves the clock and fires what fell due, as the timer loop would."""
        assert self.running is not None
        self.clock.advance(seconds)
        self.running.engine.fire_timers()
        await self.running.engine.wait_committed()

    def request(
        self,
        start: float,
        end: float,
        gpus: int = 8,
        count: int = 1,
        tenant: str = "org/a",
        **kw: object,
    ) -> rpb.CreateReservationRequest:
        return rpb.CreateReservationRequest(
            tenant=tenant,
            count=count,
            shape=resources_pb2.Shape(gpus=gpus),
            start_time=stamp(start),
            end_time=stamp(end),
            **kw,  # type: ignore[arg-type]
        )

    async def reserve(self, start: float, end: float, **kw: object) -> rpb.Reservation:
        answer = await self.resv.CreateReservation(self.request(start, end, **kw))  # type: ignore[arg-type]
        return answer.reservation

    async def get(self, rid: str) -> rpb.Reservation:
        return (await self.resv.GetReservation(rpb.GetReservationRequest(id=rid))).reservation


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    c = await Cluster(tmp_path).start()
    yield c
    await c.stop()


async def test_create_get_list_cancel(cluster: Cluster) -> None:
    t = cluster.now
    r = await cluster.reserve(t + HOUR, t + 2 * HOUR, gpus=4, count=2)
    assert r.id.startswith("r-") and r.state == SCHEDULED and r.tenant == "org/a"
    assert len(r.placements) == 2 and all(len(p.gpu_indices) == 4 for p in r.placements)
    assert r.revision > 0 and r.create_revision == r.revision
    assert (await cluster.get(r.id)) == r
    listed = await cluster.resv.ListReservations(rpb.ListReservationsRequest())
    assert [x.id for x in listed.reservations] == [r.id] and listed.revision >= r.revision
    cancelled = await cluster.resv.CancelReservation(rpb.CancelReservationRequest(id=r.id))
    assert cancelled.reservation.state == CANCELLED
    assert cancelled.reservation.state_reason == "cancelled by its owner"
    # Cancelling again answers the same; the capacity is free again for a new booking.
    again = await cluster.resv.CancelReservation(rpb.CancelReservationRequest(id=r.id))
    assert again.reservation.revision == cancelled.reservation.revision
    r2 = await cluster.reserve(t + HOUR, t + 2 * HOUR, gpus=8, count=2)
    assert r2.state == SCHEDULED


async def test_conflicting_reservation_is_refused_with_earliest_window(cluster: Cluster) -> None:
    t = cluster.now
    first = await cluster.reserve(t + HOUR, t + 3 * HOUR, gpus=8, count=2)  # the whole cluster
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cluster.reserve(t + 2 * HOUR, t + 4 * HOUR, gpus=8)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    failure = detail(err.value, error_details_pb2.PreconditionFailure)
    by_type = {}
    for v in failure.violations:
        by_type.setdefault(v.type, []).append(v)
    assert [v.subject for v in by_type["RESERVATION_CONFLICT"]] == [f"reservation:{first.id}"]
    (window,) = by_type["EARLIEST_WINDOW"]
    # Two hours long, starting when the first reservation ends.
    assert window.subject.startswith("window:")
    earliest = await cluster.reserve(t + 3 * HOUR, t + 5 * HOUR, gpus=8)
    assert earliest.state == SCHEDULED
    # Back to back with the first is fine: windows are half-open.
    assert earliest.start_time == first.end_time


async def test_running_work_conflicts_until_its_hard_end(cluster: Cluster) -> None:
    t = cluster.now
    # 8 GPUs ending in 2 h, 8 with no hard end: a whole-cluster booking waits for neither.
    for max_duration in (int(2 * HOUR), 0):
        a = await cluster.alloc.Allocate(
            apb.AllocateRequest(
                tenant="org/b",
                count=1,
                shape=resources_pb2.Shape(gpus=8),
                max_duration_seconds=max_duration,
            )
        )
        assert a.allocation.state == apb.ALLOCATION_STATE_ALLOCATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cluster.reserve(t + HOUR, t + 2 * HOUR, gpus=8)
    failure = detail(err.value, error_details_pb2.PreconditionFailure)
    types = [v.type for v in failure.violations]
    assert "EARLIEST_WINDOW" in types
    # One node frees at the hard end: the earliest window starts there.
    r = await cluster.reserve(t + 2 * HOUR, t + 3 * HOUR, gpus=8)
    assert r.state == SCHEDULED
    # Nothing fits the whole cluster ever: work without a hard end holds 8 GPUs.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cluster.reserve(t + 5 * HOUR, t + 6 * HOUR, gpus=8, count=2)
    types = [v.type for v in detail(err.value, error_details_pb2.PreconditionFailure).violations]
    assert "NO_WINDOW_FITS" in types


async def test_dry_run_changes_nothing(cluster: Cluster) -> None:
    t = cluster.now
    answer = await cluster.resv.CreateReservation(
        cluster.request(t + HOUR, t + 2 * HOUR, dry_run=True)
    )
    assert answer.dry_run and answer.reservation.id == "" and answer.reservation.placements
    listed = await cluster.resv.ListReservations(rpb.ListReservationsRequest())
    assert not listed.reservations


async def test_request_id_is_idempotent(cluster: Cluster) -> None:
    t = cluster.now
    first = await cluster.reserve(t + HOUR, t + 2 * HOUR, request_id="train-1")
    again = await cluster.reserve(t + HOUR, t + 2 * HOUR, request_id="train-1")
    assert again == first
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cluster.reserve(t + HOUR, t + 3 * HOUR, request_id="train-1")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    listed = await cluster.resv.ListReservations(rpb.ListReservationsRequest())
    assert len(listed.reservations) == 1


@pytest.mark.parametrize(
    ("start", "end", "gpus", "field"),
    [
        (-2 * HOUR, -HOUR, 8, "end_time"),  # window in the past
        (-HOUR, HOUR, 8, "start_time"),  # starts in the past
        (2 * HOUR, HOUR, 8, "end_time"),  # end before start
        (HOUR, HOUR, 8, "end_time"),  # empty window
        (HOUR, HOUR + 31 * 86400, 8, "end_time"),  # too long
        (HOUR, 2 * HOUR, -1, "shape.gpus"),  # bad shape
        (HOUR, 2 * HOUR, 0, "shape"),  # asks for nothing
    ],
)
async def test_bad_input_is_invalid_argument(
    cluster: Cluster, start: float, end: float, gpus: int, field: str
) -> None:
    t = cluster.now
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cluster.reserve(t + start, t + end, gpus=gpus)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(err.value)


async def test_missing_window_and_unknown_ids(cluster: Cluster) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cluster.resv.CreateReservation(
            rpb.CreateReservationRequest(tenant="org/a", count=1, shape=resources_pb2.Shape(gpus=1))
        )
    assert {"start_time", "end_time"} <= set(field_violations(err.value))
    for call in (
        cluster.resv.GetReservation(rpb.GetReservationRequest(id="r-nope")),
        cluster.resv.CancelReservation(rpb.CancelReservationRequest(id="r-nope")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert detail(err.value, error_details_pb2.ResourceInfo).resource_name == "r-nope"


async def test_never_fits_is_failed_precondition(cluster: Cluster) -> None:
    t = cluster.now
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cluster.reserve(t + HOUR, t + 2 * HOUR, gpus=16)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    failure = detail(err.value, error_details_pb2.PreconditionFailure)
    assert failure.violations[0].type == "RESERVATION_NEVER_FITS"


async def test_clock_moves_states_and_watch_follows(cluster: Cluster) -> None:
    t = cluster.now
    r = await cluster.reserve(t + HOUR, t + 2 * HOUR)
    watch = cluster.resv.WatchReservations(
        rpb.WatchReservationsRequest(start_revision=r.revision, reservation_id=r.id)
    )
    created = await watch.read()
    assert created.type == rpb.RESERVATION_EVENT_TYPE_CREATED
    assert created.reservation.state == SCHEDULED
    await cluster.advance(HOUR - 1)
    assert (await cluster.get(r.id)).state == SCHEDULED
    await cluster.advance(1)
    assert (await cluster.get(r.id)).state == ACTIVE
    started = await watch.read()
    assert started.type == rpb.RESERVATION_EVENT_TYPE_STARTED
    assert started.reservation.state == ACTIVE and started.revision > created.revision
    await cluster.advance(HOUR)
    ended = await watch.read()
    assert ended.type == rpb.RESERVATION_EVENT_TYPE_ENDED and ended.reservation.state == ENDED
    assert ended.reservation.state_reason == "window over"
    watch.cancel()
    listed = await cluster.resv.ListReservations(rpb.ListReservationsRequest(states=[ENDED]))
    assert [x.id for x in listed.reservations] == [r.id]


async def test_list_filters_and_pages(cluster: Cluster) -> None:
    t = cluster.now
    ids = []
    for i in range(5):
        tenant = "org/a" if i % 2 == 0 else "org/b"
        r = await cluster.reserve(t + HOUR * (i + 1), t + HOUR * (i + 2), gpus=1, tenant=tenant)
        ids.append(r.id)
    seen: list[str] = []
    token = ""
    while True:
        page = await cluster.resv.ListReservations(
            rpb.ListReservationsRequest(page_size=2, page_token=token)
        )
        seen += [x.id for x in page.reservations]
        token = page.next_page_token
        if not token:
            break
    assert seen == ids
    own = await cluster.resv.ListReservations(rpb.ListReservationsRequest(tenant="org/b"))
    assert [x.id for x in own.reservations] == ids[1::2]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cluster.resv.ListReservations(
            rpb.ListReservationsRequest(tenant="org/a", page_token=page.next_page_token or "x")
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_reservations_survive_a_restart(tmp_path: Path) -> None:
    c = await Cluster(tmp_path).start()
    t = c.now
    kept = await c.reserve(t + HOUR, t + 2 * HOUR, gpus=8, count=2)
    cancelled = await c.reserve(t + 3 * HOUR, t + 4 * HOUR, gpus=1)
    await c.resv.CancelReservation(rpb.CancelReservationRequest(id=cancelled.id))
    await c.stop()
    clock = c.clock
    c = Cluster(tmp_path)
    c.clock = clock
    await c.start()
    try:
        assert (await c.get(kept.id)) == kept
        assert (await c.get(cancelled.id)).state == CANCELLED
        # Still guaranteed after the restart: a conflicting booking is refused...
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await c.reserve(t + HOUR, t + 2 * HOUR, gpus=1)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # ...and the clock still moves it (its timers were armed again).
        await c.advance(HOUR)
        assert (await c.get(kept.id)).state == ACTIVE
        inside = await settle(c, (await allocate(c, 8, count=2, reservation_id=kept.id)).id)
        assert inside.state == ALLOCATED
    finally:
        await c.stop()
    # Work inside it is still inside it after another restart, and ends with its window.
    c = Cluster(tmp_path)
    c.clock = clock
    await c.start()
    try:
        assert (await settle(c, inside.id)).placements == inside.placements
        with pytest.raises(grpc.aio.AioRpcError):  # its capacity is still booked
            await c.reserve(c.now + 60, c.now + 120, gpus=1)
        await c.advance(HOUR)
        assert (await settle(c, inside.id)).state == apb.ALLOCATION_STATE_EXPIRED
        assert (await c.get(kept.id)).state == ENDED
    finally:
        await c.stop()


def test_a_reservation_survives_kill_9(tmp_path: Path) -> None:
    """Answered means durable: CreateReservation, then kill -9, then it is there."""
    proc = ServerProcess(tmp_path / "rmgrpc.db").start()
    try:
        with grpc.insecure_channel(proc.target) as ch:
            stub = reservation_pb2_grpc.ReservationServiceStub(ch)
            t = time.time()
            made = stub.CreateReservation(
                rpb.CreateReservationRequest(
                    tenant="org/a",
                    count=1,
                    shape=resources_pb2.Shape(gpus=8),
                    start_time=stamp(t + HOUR),
                    end_time=stamp(t + 2 * HOUR),
                ),
                timeout=10,
            ).reservation
        proc.kill()
        proc.start()
        with grpc.insecure_channel(proc.target) as ch:
            stub = reservation_pb2_grpc.ReservationServiceStub(ch)
            got = stub.GetReservation(rpb.GetReservationRequest(id=made.id), timeout=10)
            assert got.reservation == made
    finally:
        proc.stop()


# -- using a reservation, and backfill --------------------------------------------------

PENDING = apb.ALLOCATION_STATE_PENDING
ALLOCATED = apb.ALLOCATION_STATE_ALLOCATED


async def allocate(
    c: Cluster, gpus: int, tenant: str = "org/a", count: int = 1, **kw: object
) -> apb.Allocation:
    shape = resources_pb2.Shape(gpus=gpus)
    answer = await c.alloc.Allocate(
        apb.AllocateRequest(tenant=tenant, count=count, shape=shape, **kw)  # type: ignore[arg-type]
    )
    return answer.allocation


async def settle(c: Cluster, aid: str) -> apb.Allocation:
    """Runs a scheduling pass, then reads the allocation."""
    assert c.running is not None
    await c.running.engine.schedule_now()
    return (await c.alloc.GetAllocation(apb.GetAllocationRequest(id=aid))).allocation


async def test_work_runs_inside_its_reservation_and_never_past_it(cluster: Cluster) -> None:
    t = cluster.now
    r = await cluster.reserve(t + HOUR, t + 2 * HOUR, gpus=8, tenant="org")
    # Another tenant's work with no hard end takes the other node.
    other = await allocate(cluster, 8, tenant="org/b")
    assert other.state == ALLOCATED
    assert other.placements[0].node_id != r.placements[0].node_id
    a = await allocate(cluster, 4, tenant="org/team", reservation_id=r.id)
    a = await settle(cluster, a.id)
    assert a.state == PENDING and "window begins" in a.pending_reason
    # Ordinary work with no hard end never gets the reserved node.
    blocked = await allocate(cluster, 8)
    blocked = await settle(cluster, blocked.id)
    assert blocked.state == PENDING and r.id in blocked.pending_reason
    await cluster.advance(HOUR)
    a = await settle(cluster, a.id)
    assert a.state == ALLOCATED
    assert a.placements[0].node_id == r.placements[0].node_id
    assert set(a.placements[0].gpu_indices) <= set(r.placements[0].gpu_indices)
    assert (await settle(cluster, blocked.id)).state == PENDING  # still kept out
    await cluster.advance(HOUR)
    a = await settle(cluster, a.id)
    assert a.state == apb.ALLOCATION_STATE_EXPIRED and a.state_reason == f"reservation {r.id} ended"
    # The window is over: the capacity is ordinary again.
    assert (await settle(cluster, blocked.id)).state == ALLOCATED


async def test_naming_a_reservation_is_checked(cluster: Cluster) -> None:
    t = cluster.now
    r = await cluster.reserve(t + HOUR, t + 2 * HOUR, gpus=4, tenant="org/a")
    cases = [
        ({"tenant": "org/b", "reservation_id": r.id}, grpc.StatusCode.PERMISSION_DENIED),
        ({"tenant": "org", "reservation_id": r.id}, grpc.StatusCode.PERMISSION_DENIED),
        ({"tenant": "org/a", "reservation_id": "r-nope"}, grpc.StatusCode.NOT_FOUND),
    ]
    for kw, code in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await allocate(cluster, 1, **kw)
        assert err.value.code() == code, kw
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await allocate(cluster, 8, tenant="org/a", reservation_id=r.id)  # never fits in 4
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await cluster.resv.CancelReservation(rpb.CancelReservationRequest(id=r.id))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await allocate(cluster, 1, tenant="org/a", reservation_id=r.id)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_cancelling_ends_waiting_and_running_work_inside(cluster: Cluster) -> None:
    t = cluster.now
    r = await cluster.reserve(t, t + HOUR, gpus=8)  # active at once
    assert r.state == ACTIVE
    running = await settle(cluster, (await allocate(cluster, 8, reservation_id=r.id)).id)
    waiting = await settle(cluster, (await allocate(cluster, 8, reservation_id=r.id)).id)
    assert (running.state, waiting.state) == (ALLOCATED, PENDING)
    assert "no room in reservation" in waiting.pending_reason
    await cluster.resv.CancelReservation(rpb.CancelReservationRequest(id=r.id))
    running = await settle(cluster, running.id)
    waiting = await settle(cluster, waiting.id)
    assert running.state == apb.ALLOCATION_STATE_EXPIRED
    assert waiting.state == apb.ALLOCATION_STATE_REJECTED
    assert waiting.state_reason == f"reservation {r.id} was cancelled"


@pytest.mark.parametrize(("max_duration", "backfills"), [(3599, True), (3600, True), (3601, False)])
async def test_backfill_at_the_boundary(
    cluster: Cluster, max_duration: int, backfills: bool
) -> None:
    t = cluster.now
    r = await cluster.reserve(t + HOUR, t + 2 * HOUR, gpus=8)
    await allocate(cluster, 8, tenant="org/b")  # the other node, for good
    a = await allocate(cluster, 8, max_duration_seconds=max_duration)
    a = await settle(cluster, a.id)
    if backfills:
        assert a.state == ALLOCATED and a.placements[0].node_id == r.placements[0].node_id
        # It ends (EXPIRED at its hard end) no later than the window begins; the
        # reservation's own work then gets its capacity.
        await cluster.advance(HOUR)
        inside = await settle(cluster, (await allocate(cluster, 8, reservation_id=r.id)).id)
        assert inside.state == ALLOCATED
    else:
        assert a.state == PENDING and "runs past that start" in a.pending_reason


# -- honoured when the cluster fills -----------------------------------------------------


async def test_honoured_when_the_cluster_fills_before_its_start(cluster: Cluster) -> None:
    t = cluster.now
    r = await cluster.reserve(t + HOUR, t + 2 * HOUR, gpus=8, tenant="org/a")
    # A flood of other work, with and without hard ends, quick decisions and passes.
    flood = [await allocate(cluster, 4, tenant="org/b") for _ in range(6)]
    flood += [
        await allocate(cluster, 2, tenant="org/c", max_duration_seconds=7200) for _ in range(4)
    ]
    assert cluster.running is not None
    await cluster.running.engine.schedule_now()
    for a in flood:
        got = await settle(cluster, a.id)
        assert all(p.node_id != r.placements[0].node_id for p in got.placements)
    await cluster.advance(HOUR)
    inside = await settle(cluster, (await allocate(cluster, 8, reservation_id=r.id)).id)
    assert inside.state == ALLOCATED


async def test_plans_made_before_a_reservation_are_refused_at_apply(cluster: Cluster) -> None:
    t = cluster.now
    assert cluster.running is not None
    engine = cluster.running.engine
    r = await cluster.reserve(t + HOUR, t + 2 * HOUR, gpus=8)
    node = r.placements[0].node_id
    await allocate(cluster, 8, tenant="org/b")  # the other node
    p = await settle(cluster, (await allocate(cluster, 8)).id)
    assert p.state == PENDING
    # A plan made on a snapshot without the reservation would put it on the booked GPUs.
    stale = Decisions(admissions=[Admission(p.id, (Placement(node, tuple(range(8))),))])
    kept, off = engine.scheduling._against_reservations(stale)
    assert kept.admissions == [] and off == [(p.id, f"GPU 0 of node {node} is reserved by {r.id}")]


async def test_window_start_preempts_work_that_started_after_acceptance(cluster: Cluster) -> None:
    t = cluster.now
    assert cluster.running is not None
    engine = cluster.running.engine
    r = await cluster.reserve(t + HOUR, t + 2 * HOUR, gpus=8)
    node = r.placements[0].node_id
    await allocate(cluster, 8, tenant="org/b")  # the other node
    p = await settle(cluster, (await allocate(cluster, 8, tenant="org/b")).id)
    assert p.state == PENDING
    # As if a stale plan had slipped through: placed on the booked GPUs, no hard end.
    await cluster.advance(60)
    with engine.committer.transaction() as txn:
        engine.scheduling.forget(p.id)
        engine.transitions.place(
            txn, engine.get_allocation(p.id), (Placement(node, tuple(range(8))),)
        )
    await engine.committer.wait(txn)
    await cluster.advance(HOUR - 60)
    p = await settle(cluster, p.id)
    assert p.state == apb.ALLOCATION_STATE_PREEMPTED and r.id in p.state_reason
    inside = await settle(cluster, (await allocate(cluster, 8, reservation_id=r.id)).id)
    assert inside.state == ALLOCATED


async def test_ended_reservations_are_forgotten_after_the_retention(cluster: Cluster) -> None:
    t = cluster.now
    old = await cluster.reserve(t + HOUR, t + 2 * HOUR, gpus=1)
    live = await cluster.reserve(t + 2 * HOUR, t + 30 * 86400, gpus=1)
    assert cluster.running is not None
    retention = cluster.running.engine.settings.allocation_retention_seconds
    await cluster.advance(2 * HOUR + retention + 1)
    await cluster.running.engine.compact()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cluster.get(old.id)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert (await cluster.get(live.id)).state == ACTIVE


async def test_backfill_and_use_with_passes_in_a_worker_process(tmp_path: Path) -> None:
    """The experimental process runner gets the reservations with its snapshot too."""
    c = await Cluster(tmp_path, pass_runner="process").start()
    try:
        t = c.now
        r = await c.reserve(t + HOUR, t + 2 * HOUR, gpus=8)
        await allocate(c, 8, tenant="org/b")
        late = await settle(c, (await allocate(c, 8, max_duration_seconds=3601)).id)
        early = await settle(c, (await allocate(c, 8, max_duration_seconds=3599)).id)
        assert (late.state, early.state) == (PENDING, ALLOCATED)
        await c.advance(HOUR)
        inside = await settle(c, (await allocate(c, 8, reservation_id=r.id)).id)
        assert inside.state == ALLOCATED
    finally:
        await c.stop()


@pytest.mark.parametrize("newer", [True, False])
async def test_window_start_books_again_away_from_a_lost_node(
    cluster: Cluster, newer: bool
) -> None:
    """The booked node is cordoned before the window: at its start the reservation is
    booked again on the other node, preempting work there only if it started after the
    reservation was accepted."""
    t = cluster.now
    if not newer:
        older = await allocate(cluster, 8, tenant="org/b")
    r = await cluster.reserve(t + HOUR, t + 2 * HOUR, gpus=8)
    if newer:
        await cluster.advance(60)
        older = await allocate(cluster, 8, tenant="org/b")
    assert older.state == ALLOCATED
    booked_on = r.placements[0].node_id
    assert older.placements[0].node_id != booked_on
    nodes = gpu_manager_pb2_grpc.GpuManagerServiceStub(cluster.channel)
    await nodes.CordonNode(gpu_manager_pb2.CordonNodeRequest(node_id=booked_on))
    await cluster.advance(2 * HOUR - (cluster.now - t) - HOUR)  # to the start
    got = await cluster.get(r.id)
    assert got.state == ACTIVE
    other = await settle(cluster, older.id)
    if newer:
        assert other.state == apb.ALLOCATION_STATE_PREEMPTED and r.id in other.state_reason
        assert got.placements[0].node_id == older.placements[0].node_id
        assert "booked again" in got.state_reason
        inside = await settle(cluster, (await allocate(cluster, 8, reservation_id=r.id)).id)
        assert inside.state == ALLOCATED
    else:
        assert other.state == ALLOCATED
        assert "cannot be honoured" in got.state_reason


async def test_watch_resumes_and_filters_by_tenant(cluster: Cluster) -> None:
    t = cluster.now
    mine = await cluster.reserve(t + HOUR, t + 2 * HOUR, gpus=1, tenant="org/a")
    await cluster.reserve(t + HOUR, t + 2 * HOUR, gpus=1, tenant="org/b")
    await cluster.resv.CancelReservation(rpb.CancelReservationRequest(id=mine.id))
    watch = cluster.resv.WatchReservations(
        rpb.WatchReservationsRequest(start_revision=1, tenant="org/a")
    )
    first = await watch.read()
    watch.cancel()
    assert (first.type, first.reservation.id) == (rpb.RESERVATION_EVENT_TYPE_CREATED, mine.id)
    # Reconnecting from the last revision seen + 1 gets exactly the rest: the cancel.
    watch = cluster.resv.WatchReservations(
        rpb.WatchReservationsRequest(start_revision=first.revision + 1, tenant="org/a")
    )
    rest = await watch.read()
    watch.cancel()
    assert rest.type == rpb.RESERVATION_EVENT_TYPE_ENDED
    assert (rest.reservation.id, rest.reservation.state) == (mine.id, CANCELLED)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cluster.resv.WatchReservations(
            rpb.WatchReservationsRequest(start_revision=10**9)
        ).read()
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
