"""The resumable allocation watch against a scripted AllocatorService on a real gRPC server.

The fake keeps an event log whose revisions skip numbers (revisions are global across
object kinds), serves it from `start_revision`, and injects the failures the real server
produces: dropped streams, slow-consumer cut-offs, compaction (OUT_OF_RANGE with
ErrorInfo), progress messages and duplicates.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from rmgrpc.v1 import allocator_pb2, allocator_pb2_grpc, resources_pb2
from rmgrpc_client import (
    AllocationWatch,
    AsyncClient,
    OutOfRangeError,
    PermissionDeniedError,
    Relisted,
    WatchItem,
    watch_allocations,
)

A = allocator_pb2
PLACED = A.ALLOCATION_EVENT_TYPE_PLACED
ENDED = A.ALLOCATION_EVENT_TYPE_ENDED
PROGRESS = A.ALLOCATION_EVENT_TYPE_PROGRESS


@dataclass
class Fault:
    """What the fake does on one WatchAllocations call before (or while) serving."""

    drop_after: int | None = None  # abort after sending this many events
    code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    resend_from: int | None = None  # ignore start_revision, serve from here (duplicates)
    progress_first: bool = False  # send PROGRESS at the current revision first
    fatal: grpc.StatusCode | None = None  # abort at once with this code


@dataclass
class FakeAllocator(allocator_pb2_grpc.AllocatorServiceServicer):
    log: list[A.AllocationEvent] = field(default_factory=list)
    oldest: int = 1  # oldest retained revision; older start revisions get OUT_OF_RANGE
    faults: list[Fault] = field(default_factory=list)
    watch_requests: list[A.WatchAllocationsRequest] = field(default_factory=list)
    allocations: dict[str, A.Allocation] = field(default_factory=dict)
    list_requests: list[A.ListAllocationsRequest] = field(default_factory=list)
    page_size: int = 2
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    streams_ended: int = 0

    @property
    def revision(self) -> int:
        return self.log[-1].revision if self.log else 0

    async def append(self, alloc_id: str, kind: int, *, gap: int = 1, node: str = "n1") -> None:
        state = A.ALLOCATION_STATE_ALLOCATED if kind == PLACED else A.ALLOCATION_STATE_RELEASED
        rev = self.revision + gap
        alloc = A.Allocation(
            id=alloc_id,
            tenant="org/team",
            state=state,
            revision=rev,
            placements=[resources_pb2.Placement(node_id=node, gpu_indices=[0])],
        )
        self.allocations[alloc_id] = alloc
        self.log.append(A.AllocationEvent(revision=rev, type=kind, allocation=alloc))
        async with self.changed:
            self.changed.notify_all()

    async def WatchAllocations(
        self, request: A.WatchAllocationsRequest, context: Any
    ) -> AsyncIterator[A.AllocationEvent]:
        self.watch_requests.append(request)
        context.add_done_callback(lambda _: self._finished())
        fault = self.faults.pop(0) if self.faults else Fault()
        if fault.fatal is not None:
            await context.abort(fault.fatal, "not allowed")
        start = request.start_revision or self.revision + 1
        if fault.resend_from is not None:
            start = fault.resend_from
        elif start < self.oldest:
            await context.abort_with_status(rpc_status.to_status(self._compacted(start)))
        if fault.progress_first:
            yield A.AllocationEvent(revision=self.revision, type=PROGRESS)
        sent = 0
        while True:
            for event in [e for e in self.log if e.revision >= start]:
                if fault.drop_after is not None and sent >= fault.drop_after:
                    await context.abort(fault.code, "stream dropped")
                yield event
                sent += 1
                start = event.revision + 1
            if fault.drop_after is not None and sent >= fault.drop_after:
                await context.abort(fault.code, "stream dropped")
            async with self.changed:
                await self.changed.wait_for(lambda s=start: self.revision >= s)

    def _finished(self) -> None:
        self.streams_ended += 1

    def _compacted(self, start: int) -> status_pb2.Status:
        info = error_details_pb2.ErrorInfo(
            reason="REVISION_COMPACTED",
            domain="rmgrpc",
            metadata={"oldest_revision": str(self.oldest), "current_revision": str(self.revision)},
        )
        detail = any_pb2.Any()
        detail.Pack(info)
        return status_pb2.Status(
            code=code_pb2.OUT_OF_RANGE,
            message=f"revision {start} has been compacted",
            details=[detail],
        )

    async def ListAllocations(
        self, request: A.ListAllocationsRequest, context: Any
    ) -> A.ListAllocationsResponse:
        self.list_requests.append(request)
        items = [
            a
            for a in self.allocations.values()
            if not request.node_id or any(p.node_id == request.node_id for p in a.placements)
        ]
        offset = int(request.page_token or 0)
        end = offset + self.page_size
        return A.ListAllocationsResponse(
            allocations=items[offset:end],
            next_page_token=str(end) if end < len(items) else "",
            revision=self.revision,
        )


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeAllocator, AsyncClient]]:
    servicer = FakeAllocator()
    server = grpc.aio.server()
    allocator_pb2_grpc.add_AllocatorServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = AsyncClient(f"127.0.0.1:{port}")
    yield servicer, client
    await client.close()
    await server.stop(None)


async def take(watch: AsyncIterator[WatchItem], n: int) -> list[WatchItem]:
    items: list[WatchItem] = []
    async with asyncio.timeout(5):
        async for item in watch:
            items.append(item)
            if len(items) == n:
                break
    return items


def revisions(items: list[WatchItem]) -> list[int]:
    return [i.revision for i in items]


FAST = {"backoff_initial": 0.001, "backoff_max": 0.01}


async def test_resumes_after_drops_and_yields_each_event_once_in_order(
    fake: tuple[FakeAllocator, AsyncClient],
) -> None:
    server, client = fake
    for i, gap in enumerate([1, 3, 1, 2, 5, 1]):
        await server.append(f"a{i}", PLACED, gap=gap)
    server.faults = [Fault(drop_after=2), Fault(drop_after=1), Fault(drop_after=0)]

    watch = watch_allocations(client, start_revision=1, **FAST)
    items = await take(watch, 6)
    await watch.aclose()

    assert items == server.log
    starts = [r.start_revision for r in server.watch_requests]
    # 2 events (rev 1, 4), then 1 (rev 5), then none, then the rest from rev 6.
    assert starts == [1, 5, 6, 6]
    assert watch.revision == server.revision


async def test_slow_consumer_cut_off_resumes_from_last_revision(
    fake: tuple[FakeAllocator, AsyncClient],
) -> None:
    server, client = fake
    for i in range(4):
        await server.append(f"a{i}", PLACED, gap=2)
    server.faults = [Fault(drop_after=3, code=grpc.StatusCode.RESOURCE_EXHAUSTED)]

    watch = watch_allocations(client, start_revision=1, **FAST)
    items = await take(watch, 4)
    await watch.aclose()

    assert revisions(items) == [2, 4, 6, 8]
    assert [r.start_revision for r in server.watch_requests] == [1, 7]


async def test_events_already_seen_are_dropped(fake: tuple[FakeAllocator, AsyncClient]) -> None:
    server, client = fake
    for i in range(5):
        await server.append(f"a{i}", PLACED)
    # The second stream replays from revision 1: revisions 1..3 must not come out again.
    server.faults = [Fault(drop_after=3), Fault(resend_from=1)]

    watch = watch_allocations(client, start_revision=1, **FAST)
    items = await take(watch, 5)
    await watch.aclose()

    assert revisions(items) == [1, 2, 3, 4, 5]


async def test_progress_moves_the_resume_point_but_is_not_yielded(
    fake: tuple[FakeAllocator, AsyncClient],
) -> None:
    server, client = fake
    await server.append("a0", PLACED, gap=10)  # revision 10
    server.faults = [Fault(progress_first=True, drop_after=0)]

    watch = watch_allocations(client, **FAST)  # from now: resume point unknown
    consumer = asyncio.create_task(take(watch, 1))
    async with asyncio.timeout(5):
        while len(server.watch_requests) < 2:
            await asyncio.sleep(0.005)
    await server.append("a1", PLACED, gap=2)  # revision 12
    items = await consumer
    await watch.aclose()

    assert revisions(items) == [12]
    # The progress at revision 10 made the resume point known: no relist, resume at 11.
    assert [r.start_revision for r in server.watch_requests] == [0, 11]
    assert server.list_requests == []


async def test_compacted_revision_relists_then_watches_from_list_revision(
    fake: tuple[FakeAllocator, AsyncClient],
) -> None:
    server, client = fake
    for i in range(5):
        await server.append(f"a{i}", PLACED, gap=2)  # revisions 2..10
    await server.append("a0", ENDED)  # revision 11
    server.oldest = 8

    watch = watch_allocations(client, start_revision=3, node_id="n1", **FAST)
    first = await take(watch, 1)
    await server.append("a5", PLACED)  # revision 12, after the list
    rest = await take(watch, 1)
    await watch.aclose()

    (relisted,) = first
    assert isinstance(relisted, Relisted)
    assert relisted.revision == 11
    assert sorted(a.id for a in relisted.allocations) == ["a0", "a1", "a2", "a3", "a4"]
    assert len(server.list_requests) == 3  # three pages of two
    assert all(r.node_id == "n1" for r in server.list_requests)
    assert revisions(rest) == [12]
    assert [r.start_revision for r in server.watch_requests] == [3, 12]


async def test_out_of_range_error_carries_error_info(
    fake: tuple[FakeAllocator, AsyncClient],
) -> None:
    server, client = fake
    for i in range(3):
        await server.append(f"a{i}", PLACED)
    server.oldest = 3

    with pytest.raises(OutOfRangeError) as caught:
        async for _ in client.watch_events(start_revision=1):
            pass

    info = caught.value.error_info
    assert info is not None
    assert info.reason == "REVISION_COMPACTED"
    assert dict(info.metadata) == {"oldest_revision": "3", "current_revision": "3"}
    assert caught.value.code == grpc.StatusCode.OUT_OF_RANGE


async def test_permission_denied_is_raised_not_retried(
    fake: tuple[FakeAllocator, AsyncClient],
) -> None:
    server, client = fake
    server.faults = [Fault(fatal=grpc.StatusCode.PERMISSION_DENIED)]

    watch = watch_allocations(client, start_revision=1, **FAST)
    with pytest.raises(PermissionDeniedError):
        await take(watch, 1)
    assert len(server.watch_requests) == 1


async def test_failure_before_any_revision_is_known_relists(
    fake: tuple[FakeAllocator, AsyncClient],
) -> None:
    server, client = fake
    await server.append("a0", PLACED, gap=4)
    server.faults = [Fault(drop_after=0)]

    watch = watch_allocations(client, **FAST)
    (relisted,) = await take(watch, 1)
    await server.append("a1", PLACED)
    (event,) = await take(watch, 1)
    await watch.aclose()

    assert isinstance(relisted, Relisted)
    assert relisted.revision == 4
    assert [a.id for a in relisted.allocations] == ["a0"]
    assert isinstance(event, A.AllocationEvent)
    assert event.revision == 5
    assert [r.start_revision for r in server.watch_requests] == [0, 5]


async def test_live_events_arrive_and_custom_relist_is_used(
    fake: tuple[FakeAllocator, AsyncClient],
) -> None:
    server, client = fake
    await server.append("a0", PLACED)
    server.oldest = 2  # start 1 is compacted
    calls = 0

    async def relist() -> Relisted:
        nonlocal calls
        calls += 1
        return Relisted((), server.revision)

    async with client.watch_allocations(start_revision=1, relist=relist, **FAST) as watch:
        (relisted,) = await take(watch, 1)
        await server.append("a1", ENDED)
        await server.append("a2", PLACED)
        items = await take(watch, 2)

    assert relisted == Relisted((), 1)
    assert calls == 1
    assert [(i.revision, i.type) for i in items if isinstance(i, A.AllocationEvent)] == [
        (2, ENDED),
        (3, PLACED),
    ]


async def test_closing_the_watch_cancels_the_stream(
    fake: tuple[FakeAllocator, AsyncClient],
) -> None:
    server, client = fake
    await server.append("a0", PLACED)
    watch = watch_allocations(client, start_revision=1, **FAST)
    await take(watch, 1)
    assert server.streams_ended == 0  # the fake never ends a stream by itself
    await watch.aclose()
    async with asyncio.timeout(5):
        while server.streams_ended == 0:
            await asyncio.sleep(0.005)


def test_negative_start_revision_is_refused() -> None:
    with pytest.raises(ValueError):
        watch_allocations(AsyncClient.__new__(AsyncClient), start_revision=-1)


async def test_backoff_grows_with_jitter_and_stays_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    delays: list[float] = []

    async def no_sleep(delay: float) -> None:
        delays.append(delay)

    watch = AllocationWatch(AsyncClient.__new__(AsyncClient), backoff_initial=0.2, backoff_max=5)
    monkeypatch.setattr(asyncio, "sleep", no_sleep)
    for failures in (0, 1, 2, 5000):  # 5000: hours of a server being away
        await watch._sleep_backoff(failures)
    assert 0.1 <= delays[0] <= 0.2
    assert 0.2 <= delays[1] <= 0.4
    assert 0.4 <= delays[2] <= 0.8
    assert 2.5 <= delays[3] <= 5
