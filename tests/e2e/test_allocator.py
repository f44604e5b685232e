"""AllocatorService through a real server and generated async stubs."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2

from rmgrpc import codec
from rmgrpc.server import RunningServer
from rmgrpc.v1 import allocator_pb2 as pb
from rmgrpc.v1 import allocator_pb2_grpc, gpu_manager_pb2, gpu_manager_pb2_grpc
from rmgrpc.v1.resources_pb2 import Shape
from tests.e2e.helpers import detail, eventually, field_violations

ALLOCATED = pb.ALLOCATION_STATE_ALLOCATED
PENDING = pb.ALLOCATION_STATE_PENDING


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> allocator_pb2_grpc.AllocatorServiceStub:
    return allocator_pb2_grpc.AllocatorServiceStub(channel)


def req(tenant: str = "team-a", count: int = 1, gpus: int = 1, **kw: object) -> pb.AllocateRequest:
    shape = kw.pop("shape", None) or Shape(gpus=gpus, cpu_millis=1000, memory_bytes=1 << 30)
    return pb.AllocateRequest(tenant=tenant, count=count, shape=shape, **kw)  # type: ignore[arg-type]


async def test_allocate_places_get_list_release(
    stub: allocator_pb2_grpc.AllocatorServiceStub,
) -> None:
    resp = await stub.Allocate(req(gpus=4, request_id="r1"))
    a = resp.allocation
    assert a.state == ALLOCATED
    assert a.id and a.tenant == "team-a" and a.revision > 0
    assert len(a.placements) == 1 and len(a.placements[0].gpu_indices) == 4
    assert len(set(a.placements[0].gpu_indices)) == 4
    assert all(u.startswith("GPU-") for u in a.placements[0].gpu_uuids)
    assert a.HasField("allocate_time")
    assert not a.HasField("lease_expire_time") and a.lease_seconds == 0  # no lease unless asked

    got = (await stub.GetAllocation(pb.GetAllocationRequest(id=a.id))).allocation
    assert got == a

    listed = await stub.ListAllocations(pb.ListAllocationsRequest(tenant="team-a"))
    assert [x.id for x in listed.allocations] == [a.id]
    assert listed.revision >= a.revision

    released = (await stub.ReleaseAllocation(pb.ReleaseAllocationRequest(id=a.id))).allocation
    assert released.state == pb.ALLOCATION_STATE_RELEASED
    assert released.revision > a.revision
    again = (await stub.ReleaseAllocation(pb.ReleaseAllocationRequest(id=a.id))).allocation
    assert again == released  # idempotent: same answer, nothing new


async def test_answers_reusing_the_events_message_are_what_a_fresh_build_gives(
    server: RunningServer, stub: allocator_pb2_grpc.AllocatorServiceStub
) -> None:
    """Allocate and Release answer with the message their event encoded (work no longer
    pending has no status to add): the same as building the answer afresh; a PENDING
    answer is built with its status (its position is not in the event)."""
    engine = server.engine

    def fresh(aid: str) -> pb.Allocation:
        a = engine.state.allocations[aid]
        sched = engine.scheduling
        return codec.allocation_to_proto(
            a,
            engine.state.uuid_of,
            position=sched.positions.get(aid),
            estimate=sched.estimates.get(aid),
        )

    placed = (await stub.Allocate(req(gpus=8))).allocation
    assert (
        placed.state == ALLOCATED
        and engine.transitions.encoded(engine.state.allocations[placed.id]) is not None
    )
    assert placed == fresh(placed.id)
    waiting = (await stub.Allocate(req(gpus=8, count=2))).allocation
    assert waiting.state == pb.ALLOCATION_STATE_PENDING
    released = (await stub.ReleaseAllocation(pb.ReleaseAllocationRequest(id=placed.id))).allocation
    assert released.state == pb.ALLOCATION_STATE_RELEASED and released == fresh(placed.id)
    got = (await stub.GetAllocation(pb.GetAllocationRequest(id=placed.id))).allocation
    assert got == released


async def test_best_fit_packs_onto_the_fullest_node(
    stub: allocator_pb2_grpc.AllocatorServiceStub,
) -> None:
    first = (await stub.Allocate(req(gpus=3))).allocation
    second = (await stub.Allocate(req(gpus=2))).allocation
    # The second fits on the node the first already uses: keep the other node whole.
    assert second.placements[0].node_id == first.placements[0].node_id
    assert not set(first.placements[0].gpu_indices) & set(second.placements[0].gpu_indices)
    whole = (await stub.Allocate(req(gpus=8))).allocation
    assert whole.state == ALLOCATED
    assert whole.placements[0].node_id != first.placements[0].node_id


async def test_gang_is_whole_or_pending_then_admitted_when_capacity_frees(
    stub: allocator_pb2_grpc.AllocatorServiceStub,
) -> None:
    blocker = (await stub.Allocate(req(gpus=1))).allocation
    gang = (await stub.Allocate(req(count=2, gpus=8))).allocation
    assert gang.state == PENDING
    assert not gang.placements
    assert gang.pending_reason
    # The position is status, set by the next scheduling pass (0 until ranked).
    await eventually(
        lambda: stub.GetAllocation(pb.GetAllocationRequest(id=gang.id)),
        lambda r: r.allocation.queue_position == 1,
    )
    await stub.ReleaseAllocation(pb.ReleaseAllocationRequest(id=blocker.id))
    placed = await eventually(
        lambda: stub.GetAllocation(pb.GetAllocationRequest(id=gang.id)),
        lambda r: r.allocation.state == ALLOCATED,
    )
    nodes = sorted(p.node_id for p in placed.allocation.placements)
    assert len(nodes) == 2 and nodes[0] != nodes[1]
    assert all(len(p.gpu_indices) == 8 for p in placed.allocation.placements)


async def test_pending_requests_are_admitted_in_arrival_order(
    stub: allocator_pb2_grpc.AllocatorServiceStub,
) -> None:
    full = (await stub.Allocate(req(count=2, gpus=8))).allocation
    assert full.state == ALLOCATED
    waiting = [(await stub.Allocate(req(gpus=8))).allocation for _ in range(3)]
    assert [w.state for w in waiting] == [PENDING] * 3

    async def positions() -> list[int]:
        got = [await stub.GetAllocation(pb.GetAllocationRequest(id=w.id)) for w in waiting]
        return [g.allocation.queue_position for g in got]

    # Positions are status, set by the next scheduling pass (0 until ranked).
    await eventually(positions, lambda p: p == [1, 2, 3])
    await stub.ReleaseAllocation(pb.ReleaseAllocationRequest(id=full.id))
    await eventually(
        lambda: stub.GetAllocation(pb.GetAllocationRequest(id=waiting[1].id)),
        lambda r: r.allocation.state == ALLOCATED,
    )
    states = [
        (await stub.GetAllocation(pb.GetAllocationRequest(id=w.id))).allocation.state
        for w in waiting
    ]
    assert states == [ALLOCATED, ALLOCATED, PENDING]


async def test_repeated_request_id_returns_first_answer(
    stub: allocator_pb2_grpc.AllocatorServiceStub,
) -> None:
    first = (await stub.Allocate(req(gpus=2, request_id="same"))).allocation
    again = (await stub.Allocate(req(gpus=2, request_id="same"))).allocation
    assert again.id == first.id
    both = await asyncio.gather(*(stub.Allocate(req(gpus=1, request_id="burst")) for _ in range(5)))
    assert len({r.allocation.id for r in both}) == 1
    listed = await stub.ListAllocations(pb.ListAllocationsRequest())
    assert len(listed.allocations) == 2
    # Another tenant's request_id is its own.
    other = (await stub.Allocate(req(tenant="team-b", gpus=1, request_id="same"))).allocation
    assert other.id != first.id


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (req(count=0), "count"),
        (req(tenant=""), "tenant"),
        (req(tenant="bad tenant!"), "tenant"),
        (req(gpus=-1), "shape.gpus"),
        (req(gpus=100_000), "shape.gpus"),
        (req(shape=Shape(cpu_millis=-5)), "shape.cpu_millis"),
        (req(shape=Shape(memory_bytes=1 << 62)), "shape.memory_bytes"),
        (req(shape=Shape()), "shape"),
        (req(lease_seconds=-1), "lease_seconds"),
        (req(max_duration_seconds=-1), "max_duration_seconds"),
        (req(request_id="x" * 300), "request_id"),
        (req(tenant="t" * 300), "tenant"),
        (req(count=10**9), "count"),
        (
            req(shape=Shape(gpus=1, node_selector={"bad key!": "v"})),
            "shape.node_selector['bad key!']",
        ),
        (req(shape=Shape(cpu_millis=1, gpu_model="H100")), "shape.gpu_model"),
    ],
)
async def test_bad_allocate_is_invalid_argument_and_changes_nothing(
    stub: allocator_pb2_grpc.AllocatorServiceStub, request_: pb.AllocateRequest, field: str
) -> None:
    before = await stub.ListAllocations(pb.ListAllocationsRequest())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Allocate(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(err.value)
    after = await stub.ListAllocations(pb.ListAllocationsRequest())
    assert after.revision == before.revision
    assert list(after.allocations) == list(before.allocations)


async def test_every_bad_field_is_reported_at_once(
    stub: allocator_pb2_grpc.AllocatorServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Allocate(pb.AllocateRequest(tenant="", count=0, shape=Shape(gpus=-2)))
    assert {"tenant", "count", "shape.gpus"} <= set(field_violations(err.value))


async def test_unknown_enum_and_bad_page_token_in_list(
    stub: allocator_pb2_grpc.AllocatorServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListAllocations(pb.ListAllocationsRequest(states=[42]))  # type: ignore[list-item]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "states[0]" in field_violations(err.value)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListAllocations(pb.ListAllocationsRequest(page_token="garbage"))
    assert "page_token" in field_violations(err.value)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListAllocations(pb.ListAllocationsRequest(page_size=-1))
    assert "page_size" in field_violations(err.value)


async def test_missing_allocation_is_not_found_with_resource_info(
    stub: allocator_pb2_grpc.AllocatorServiceStub,
) -> None:
    for call in (
        stub.GetAllocation(pb.GetAllocationRequest(id="a-missing")),
        stub.ReleaseAllocation(pb.ReleaseAllocationRequest(id="a-missing")),
        stub.RenewAllocation(pb.RenewAllocationRequest(id="a-missing")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        info = detail(err.value, error_details_pb2.ResourceInfo)
        assert info.resource_type == "allocation" and info.resource_name == "a-missing"


async def test_unknown_reservation_is_not_found(
    stub: allocator_pb2_grpc.AllocatorServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Allocate(req(reservation_id="r-nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_renew_extends_and_unrenewed_lease_expires(
    stub: allocator_pb2_grpc.AllocatorServiceStub,
) -> None:
    a = (await stub.Allocate(req(lease_seconds=1))).allocation
    renewed = await stub.RenewAllocation(pb.RenewAllocationRequest(id=a.id, lease_seconds=2))
    r = renewed.allocation
    assert r.lease_seconds == 2
    assert r.lease_expire_time.ToNanoseconds() > a.lease_expire_time.ToNanoseconds()
    expired = await eventually(
        lambda: stub.GetAllocation(pb.GetAllocationRequest(id=a.id)),
        lambda x: x.allocation.state == pb.ALLOCATION_STATE_EXPIRED,
        timeout=10,
    )
    assert "lease" in expired.allocation.state_reason
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.RenewAllocation(pb.RenewAllocationRequest(id=a.id))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_max_duration_expires(stub: allocator_pb2_grpc.AllocatorServiceStub) -> None:
    a = (await stub.Allocate(req(max_duration_seconds=1))).allocation
    assert a.HasField("max_end_time")
    done = await eventually(
        lambda: stub.GetAllocation(pb.GetAllocationRequest(id=a.id)),
        lambda x: x.allocation.state == pb.ALLOCATION_STATE_EXPIRED,
    )
    assert "max_duration" in done.allocation.state_reason


async def test_dry_run_answers_and_changes_nothing(
    stub: allocator_pb2_grpc.AllocatorServiceStub,
) -> None:
    before = await stub.ListAllocations(pb.ListAllocationsRequest())
    fits = await stub.Allocate(req(gpus=8, dry_run=True))
    assert fits.dry_run and fits.allocation.state == ALLOCATED
    assert len(fits.allocation.placements[0].gpu_indices) == 8
    # 3 x 8 GPUs on 2 nodes of 8 could never fit: a dry run says it would be rejected.
    too_big = await stub.Allocate(req(count=3, gpus=8, dry_run=True))
    assert too_big.allocation.state == pb.ALLOCATION_STATE_REJECTED
    assert too_big.allocation.state_reason.startswith("never fits")
    after = await stub.ListAllocations(pb.ListAllocationsRequest())
    assert after.revision == before.revision and not after.allocations


async def test_list_filters_and_pages(stub: allocator_pb2_grpc.AllocatorServiceStub) -> None:
    ids = [(await stub.Allocate(req(tenant="org/a", gpus=1))).allocation.id for _ in range(5)]
    ids += [(await stub.Allocate(req(tenant="org/b", gpus=1))).allocation.id for _ in range(2)]
    other = (await stub.Allocate(req(tenant="elsewhere", gpus=1))).allocation
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.ListAllocations(
            pb.ListAllocationsRequest(tenant="org", page_size=3, page_token=token)
        )
        assert len(page.allocations) <= 3
        seen += [a.id for a in page.allocations]
        token = page.next_page_token
        if not token:
            break
    assert seen == ids  # the subtree of "org", in arrival order, each once
    only_b = await stub.ListAllocations(pb.ListAllocationsRequest(tenant="org/b"))
    assert [a.id for a in only_b.allocations] == ids[5:]
    node = other.placements[0].node_id
    on_node = await stub.ListAllocations(pb.ListAllocationsRequest(node_id=node))
    assert other.id in [a.id for a in on_node.allocations]
    assert all(any(p.node_id == node for p in a.placements) for a in on_node.allocations)
    pending_only = await stub.ListAllocations(pb.ListAllocationsRequest(states=[PENDING]))
    assert not pending_only.allocations


async def test_gpu_listing_shows_holders(
    server: RunningServer, channel: grpc.aio.Channel, stub: allocator_pb2_grpc.AllocatorServiceStub
) -> None:
    a = (await stub.Allocate(req(gpus=2))).allocation
    gm = gpu_manager_pb2_grpc.GpuManagerServiceStub(channel)
    gpus = (await gm.ListGpus(gpu_manager_pb2.ListGpusRequest())).gpus
    held = {(g.node_id, g.index) for g in gpus if g.allocation_id == a.id}
    assert held == {(p.node_id, i) for p in a.placements for i in p.gpu_indices}
    free = (await gm.ListGpus(gpu_manager_pb2.ListGpusRequest(free_only=True))).gpus
    assert len(free) == 16 - 2
    node = await gm.GetNode(gpu_manager_pb2.GetNodeRequest(node_id=a.placements[0].node_id))
    assert node.node.allocated.gpus == 2


async def test_watch_replays_then_follows_with_filters(
    stub: allocator_pb2_grpc.AllocatorServiceStub,
) -> None:
    a = (await stub.Allocate(req(tenant="w/one", gpus=1))).allocation
    b = (await stub.Allocate(req(tenant="w/two", gpus=1))).allocation
    stream = stub.WatchAllocations(pb.WatchAllocationsRequest(start_revision=1, tenant="w/one"))
    events = []
    async for ev in stream:
        if ev.type == pb.ALLOCATION_EVENT_TYPE_PROGRESS:
            continue
        events.append(ev)
        if ev.allocation.id == a.id and ev.type == pb.ALLOCATION_EVENT_TYPE_PLACED:
            break
    assert [e.type for e in events] == [
        pb.ALLOCATION_EVENT_TYPE_CREATED,
        pb.ALLOCATION_EVENT_TYPE_PLACED,
    ]
    assert all(e.allocation.tenant == "w/one" for e in events)
    revs = [e.revision for e in events]
    assert revs == sorted(revs) and len(set(revs)) == len(revs)
    # Live: the release arrives on the same stream.
    await stub.ReleaseAllocation(pb.ReleaseAllocationRequest(id=a.id))
    await stub.ReleaseAllocation(pb.ReleaseAllocationRequest(id=b.id))
    async for ev in stream:
        if ev.type == pb.ALLOCATION_EVENT_TYPE_PROGRESS:
            continue
        assert ev.allocation.id == a.id
        assert ev.type == pb.ALLOCATION_EVENT_TYPE_ENDED
        assert ev.allocation.state == pb.ALLOCATION_STATE_RELEASED
        break
    stream.cancel()


async def test_watch_by_allocation_and_node(
    stub: allocator_pb2_grpc.AllocatorServiceStub,
) -> None:
    a = (await stub.Allocate(req(gpus=8))).allocation
    node = a.placements[0].node_id
    by_node = stub.WatchAllocations(pb.WatchAllocationsRequest(start_revision=1, node_id=node))
    first = await anext(aiter(by_node))
    assert first.allocation.id == a.id and first.type == pb.ALLOCATION_EVENT_TYPE_PLACED
    by_node.cancel()
    by_id = stub.WatchAllocations(pb.WatchAllocationsRequest(start_revision=1, allocation_id=a.id))
    kinds = []
    async for ev in by_id:
        kinds.append(ev.type)
        if len(kinds) == 2:
            break
    assert kinds == [pb.ALLOCATION_EVENT_TYPE_CREATED, pb.ALLOCATION_EVENT_TYPE_PLACED]
    by_id.cancel()


async def test_watch_rejects_negative_start(stub: allocator_pb2_grpc.AllocatorServiceStub) -> None:
    stream = stub.WatchAllocations(pb.WatchAllocationsRequest(start_revision=-1))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stream:
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "start_revision" in field_violations(err.value)
