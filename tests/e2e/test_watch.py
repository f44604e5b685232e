"""WatchAllocations through a real in-process server: order, exactly-once, resume, compaction,
progress and backpressure.

The reference for every comparison is the store's event log itself (what `kill -9` would
leave behind), read with `engine.store.read_events` and filtered here with predicates
written against the decoded allocation, independently of the hub's own `WatchFilter`.
"""

from __future__ import annotations

import asyncio
import random
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from rmgrpc.events import EventHub, WatchFilter
from rmgrpc.model import Event, EventKind
from rmgrpc.server import RunningServer, start
from rmgrpc.v1 import allocator_pb2 as pb
from rmgrpc.v1 import allocator_pb2_grpc
from rmgrpc.v1.resources_pb2 import Shape
from tests.conftest import make_settings
from tests.e2e.helpers import detail

PROGRESS = pb.ALLOCATION_EVENT_TYPE_PROGRESS
TENANTS = ("org/a", "org/b", "org/a/x", "other")
NODES = ("sim-node-0", "sim-node-1")
# Long enough that nothing expires mid-test; with a lease, a renewal writes an event.
LEASE = 3600

Stub = allocator_pb2_grpc.AllocatorServiceStub
Key = tuple[int, int, pb.Allocation]
Predicate = Callable[[pb.Allocation], bool]


# -- fixtures and helpers ------------------------------------------------------------------


class Servers:
    """In-process servers on one database; `restart()` keeps the data, loses the memory."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.overrides: dict[str, Any] = {}
        self.running: RunningServer | None = None

    async def start(self, **overrides: Any) -> RunningServer:
        self.overrides = {"watch_progress_seconds": 0.2, **overrides}
        self.running = await start(make_settings(self.tmp_path, **self.overrides))
        return self.running

    async def restart(self) -> RunningServer:
        assert self.running is not None
        await self.running.stop(0)
        self.running = None
        return await self.start(**self.overrides)

    async def close(self) -> None:
        if self.running is not None:
            await self.running.stop(0)
            self.running = None


@pytest.fixture
async def servers(tmp_path: Path) -> AsyncIterator[Servers]:
    s = Servers(tmp_path)
    yield s
    await s.close()


def target(server: RunningServer) -> str:
    return f"127.0.0.1:{server.port}"


def shape(gpus: int) -> Shape:
    return Shape(gpus=gpus, cpu_millis=100, memory_bytes=1 << 20)


class Churn:
    """Allocates, renews and releases at random (seeded) from several tenants, holding a few
    allocations at a time so both nodes get work. (One that has to wait is PENDING and
    released all the same: a CANCELLED event.)"""

    def __init__(self, stub: Stub, seed: int, hold: int = 5, max_gpus: int = 2) -> None:
        self.stub = stub
        self.rng = random.Random(seed)
        self.hold = hold
        self.max_gpus = max_gpus
        self.held: list[str] = []
        self.done = 0

    async def step(self) -> None:
        r = self.rng.random()
        if len(self.held) < self.hold and (r < 0.55 or not self.held):
            tenant = self.rng.choice(TENANTS)
            resp = await self.stub.Allocate(
                pb.AllocateRequest(
                    tenant=tenant,
                    count=1,
                    shape=shape(self.rng.randint(1, self.max_gpus)),
                    lease_seconds=LEASE,  # with a lease, each renewal is an event
                )
            )
            self.held.append(resp.allocation.id)
        elif r < 0.7:
            chosen = self.rng.choice(self.held)
            try:
                await self.stub.RenewAllocation(pb.RenewAllocationRequest(id=chosen))
            except grpc.aio.AioRpcError as err:
                # Fair-share reclaim may have preempted it: that is an event too.
                if err.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                self.held.remove(chosen)
        else:
            victim = self.held.pop(self.rng.randrange(len(self.held)))
            await self.stub.ReleaseAllocation(pb.ReleaseAllocationRequest(id=victim))
        self.done += 1

    async def run(self, ops: int) -> None:
        for _ in range(ops):
            await self.step()

    async def finish(self) -> None:
        while self.held:
            await self.stub.ReleaseAllocation(pb.ReleaseAllocationRequest(id=self.held.pop()))


async def settled(server: RunningServer) -> int:
    """The final revision once every emitted event is committed (and so published)."""
    engine = server.engine
    for _ in range(200):
        if engine.revision == engine.hub.revision:
            return engine.hub.revision
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine at {engine.revision}, hub stuck at {engine.hub.revision}")


async def log_keys(
    server: RunningServer,
    keep: Predicate | None = None,
    after: int = 0,
    upto: int | None = None,
) -> list[Key]:
    """The allocation events of the store's log (after < revision <= upto), filtered by
    `keep`. Compare a stream read up to `final` with `upto=final`: a later pass may commit
    more (a pending reason written after the queue settled) once `final` was taken."""
    out: list[Key] = []
    for e in await server.engine.store.read_events(after, 10**7):
        if e.kind != EventKind.ALLOCATION or (upto is not None and e.revision > upto):
            continue
        a = pb.Allocation.FromString(e.data)
        if keep is None or keep(a):
            out.append((e.revision, e.type, a))
    return out


def keys(events: list[pb.AllocationEvent], upto: int | None = None) -> list[Key]:
    return [
        (e.revision, e.type, e.allocation)
        for e in events
        if e.type != PROGRESS and (upto is None or e.revision <= upto)
    ]


def same(got: list[Key], want: list[Key]) -> None:
    """Equal, with a readable message: revisions first, then the payloads."""
    got_revs = [k[0] for k in got]
    want_revs = [k[0] for k in want]
    assert got_revs == sorted(set(got_revs)), "out of order or duplicated"
    missing = sorted(set(want_revs) - set(got_revs))
    extra = sorted(set(got_revs) - set(want_revs))
    assert not missing and not extra, f"missing {missing[:10]}, extra {extra[:10]}"
    assert got == want


def by_tenant(t: str) -> Predicate:
    return lambda a: a.tenant == t or a.tenant.startswith(t + "/")


def by_node(n: str) -> Predicate:
    return lambda a: any(p.node_id == n for p in a.placements)


def by_id(i: str) -> Predicate:
    return lambda a: a.id == i


async def read_until(
    stub: Stub,
    request: pb.WatchAllocationsRequest,
    final: asyncio.Future[int],
    timeout: float = 30.0,
) -> list[pb.AllocationEvent]:
    """Everything one stream delivers (progress included) until it passes `final`'s revision.

    Filtered streams learn they have passed it from a PROGRESS message.
    """
    out: list[pb.AllocationEvent] = []
    call = stub.WatchAllocations(request)
    try:
        async with asyncio.timeout(timeout):
            async for ev in call:
                out.append(ev)
                if final.done() and ev.revision >= final.result():
                    break
    finally:
        call.cancel()
    return out


async def status_of(call: Any) -> grpc.aio.AioRpcError:
    """Drains a stream that must end with an error; returns the error."""
    try:
        async with asyncio.timeout(30):
            async for _ in call:
                pass
    except grpc.aio.AioRpcError as err:
        return err
    raise AssertionError("stream ended without an error")


# -- order, exactly once, filters ------------------------------------------------------------


FILTERS: list[tuple[str, dict[str, str], Callable[[str], Predicate | None]]] = [
    ("all", {}, lambda _: None),
    ("tenant org", {"tenant": "org"}, lambda _: by_tenant("org")),
    ("tenant org/a", {"tenant": "org/a"}, lambda _: by_tenant("org/a")),
    ("tenant other", {"tenant": "other"}, lambda _: by_tenant("other")),
    ("node 0", {"node_id": NODES[0]}, lambda _: by_node(NODES[0])),
    ("node 1", {"node_id": NODES[1]}, lambda _: by_node(NODES[1])),
    ("allocation", {"allocation_id": "MINE"}, lambda mine: by_id(mine)),
]


async def test_every_filter_gets_its_events_in_order_exactly_once_under_churn(
    servers: Servers,
) -> None:
    server = await servers.start()
    async with grpc.aio.insecure_channel(target(server)) as ch:
        stub = Stub(ch)
        churn = Churn(stub, seed=1)
        await churn.run(40)
        mine = await stub.Allocate(
            pb.AllocateRequest(tenant="org/b", count=1, shape=shape(1), lease_seconds=LEASE)
        )
        mine_id = mine.allocation.id
        final: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def churn_with_mine() -> None:
            for i in range(160):
                await churn.step()
                if i in (20, 60):
                    await stub.RenewAllocation(pb.RenewAllocationRequest(id=mine_id))
                if i == 100:
                    await stub.ReleaseAllocation(pb.ReleaseAllocationRequest(id=mine_id))
            await churn.finish()

        churning = asyncio.create_task(churn_with_mine())
        await asyncio.sleep(0.05)  # open the streams mid-churn: catch-up races live events
        readers = []
        for _, fields, _ in FILTERS:
            f = {k: (mine_id if v == "MINE" else v) for k, v in fields.items()}
            request = pb.WatchAllocationsRequest(start_revision=1, **f)
            readers.append(asyncio.create_task(read_until(stub, request, final)))
        await churning
        final.set_result(await settled(server))
        results = await asyncio.gather(*readers)

    end = final.result()
    everything = await log_keys(server, upto=end)
    assert {p.node_id for _, _, a in everything for p in a.placements} == set(NODES)
    for (name, _, predicate), got in zip(FILTERS, results, strict=True):
        keep = predicate(mine_id)
        want = [k for k in everything if keep is None or keep(k[2])]
        assert want, name
        same(keys(got, upto=end), want)
    mine_events = [t for _, t, _ in keys(results[-1], upto=end)]
    assert mine_events == [
        pb.ALLOCATION_EVENT_TYPE_CREATED,
        pb.ALLOCATION_EVENT_TYPE_PLACED,
        pb.ALLOCATION_EVENT_TYPE_UPDATED,
        pb.ALLOCATION_EVENT_TYPE_UPDATED,
        pb.ALLOCATION_EVENT_TYPE_ENDED,
    ]


@pytest.mark.parametrize("source", ["ring", "store"])
async def test_replay_from_the_past_continues_live_without_gap_or_duplicate(
    servers: Servers, source: str
) -> None:
    server = await servers.start()
    async with grpc.aio.insecure_channel(target(server)) as ch:
        first = Churn(Stub(ch), seed=2)
        await first.run(150)
        await first.finish()
    if source == "store":
        # A restarted server has an empty ring: the past comes from SQLite. Small batches so
        # the catch-up needs several reads, racing the live churn below.
        server = await servers.restart()
        server.engine.hub._batch = 37
    history = server.engine.hub.revision
    final: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    async with grpc.aio.insecure_channel(target(server)) as ch:
        stub = Stub(ch)
        churn = Churn(stub, seed=3)
        churning = asyncio.create_task(churn.run(150))
        await asyncio.sleep(0.02)
        starts = [1, history // 3, history - 1]
        readers = [
            asyncio.create_task(
                read_until(stub, pb.WatchAllocationsRequest(start_revision=s), final)
            )
            for s in starts
        ]
        await churning
        await churn.finish()
        final.set_result(await settled(server))
        results = await asyncio.gather(*readers)
    everything = await log_keys(server, upto=final.result())
    assert final.result() > history + 100
    for start_revision, got in zip(starts, results, strict=True):
        same(keys(got, upto=final.result()), [k for k in everything if k[0] >= start_revision])


async def test_list_then_watch_from_list_revision_plus_one_misses_nothing(
    servers: Servers,
) -> None:
    server = await servers.start()
    final: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    async with grpc.aio.insecure_channel(target(server)) as ch:
        stub = Stub(ch)
        churns = [Churn(stub, seed=10 + i, hold=3) for i in range(3)]
        await asyncio.gather(*(c.run(20) for c in churns))
        churning = asyncio.gather(*(c.run(120) for c in churns))
        snapshots: list[tuple[pb.ListAllocationsResponse, asyncio.Task[Any]]] = []
        for _ in range(6):
            # Concurrent writers: some of them are between emit and commit right now.
            await asyncio.sleep(0.03)
            listed = await stub.ListAllocations(pb.ListAllocationsRequest(page_size=1000))
            assert not listed.next_page_token
            request = pb.WatchAllocationsRequest(start_revision=listed.revision + 1)
            snapshots.append((listed, asyncio.create_task(read_until(stub, request, final))))
        await churning
        final.set_result(await settled(server))
        last = await stub.ListAllocations(pb.ListAllocationsRequest(page_size=1000))
        assert last.revision == final.result()
        streams = await asyncio.gather(*(reader for _, reader in snapshots))
    everything = await log_keys(server, upto=final.result())
    for (listed, _), delivered in zip(snapshots, streams, strict=True):
        got = keys(delivered, upto=final.result())
        same(got, [k for k in everything if k[0] > listed.revision])
        # The list plus the events after it rebuild the final state exactly.
        state = {a.id: a for a in listed.allocations}
        for _, _, a in got:
            state[a.id] = a
        assert state == {a.id: a for a in last.allocations}


async def test_list_answers_only_durable_state(servers: Servers) -> None:
    server = await servers.start()
    store = server.store
    commit = store._transaction
    gate = asyncio.Event()

    async def held(*args: Any) -> None:
        await gate.wait()
        await commit(*args)

    async with grpc.aio.insecure_channel(target(server)) as ch:
        stub = Stub(ch)
        durable = server.engine.hub.revision
        store._transaction = held  # type: ignore[method-assign,assignment]
        allocating = asyncio.ensure_future(
            stub.Allocate(pb.AllocateRequest(tenant="org/a", count=1, shape=shape(1)))
        )
        async with asyncio.timeout(5):
            while server.engine.revision == durable:
                await asyncio.sleep(0.01)
        listing = asyncio.ensure_future(stub.ListAllocations(pb.ListAllocationsRequest()))
        await asyncio.sleep(0.2)
        answered_early = listing.done()
        gate.set()
        await allocating
        listed = await listing
        store._transaction = commit  # type: ignore[method-assign]
    # Either it waited for the commit, or it answered only what was durable then.
    assert not answered_early or (listed.revision <= durable and not listed.allocations)


async def test_catch_up_that_reads_past_the_published_head_delivers_each_event_once(
    servers: Servers,
) -> None:
    """The store's read connection sees a commit before the writer task has published it
    (COMMIT runs in aiosqlite's thread; `on_commit` runs when the loop resumes the writer).
    A catch-up read landing in that window returns events the hub has not published yet;
    when they are published the watcher, now live, must not get them a second time.
    Widened here by holding `on_commit` back."""
    server = await servers.start()
    async with grpc.aio.insecure_channel(target(server)) as ch:
        await Churn(Stub(ch), seed=12).run(20)
    server = await servers.restart()  # empty ring: catch-up reads the store
    store = server.store
    publish = store.on_commit
    assert publish is not None
    held_back: list[list[Any]] = []
    store.on_commit = lambda events: held_back.append(list(events))
    final: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    async with grpc.aio.insecure_channel(target(server)) as ch:
        stub = Stub(ch)
        start_revision = server.engine.hub.revision - 5
        await stub.Allocate(pb.AllocateRequest(tenant="org/a", count=1, shape=shape(1)))
        assert held_back and server.engine.hub.revision < store.last_revision
        reader = asyncio.create_task(
            read_until(stub, pb.WatchAllocationsRequest(start_revision=start_revision), final)
        )
        await asyncio.sleep(0.1)  # it has caught up from the store, past the hub's head
        store.on_commit = publish
        for events in held_back:
            publish(events)
        await Churn(stub, seed=13).run(10)
        final.set_result(await settled(server))
        got = keys(await reader, upto=final.result())
    same(got, await log_keys(server, after=start_revision - 1, upto=final.result()))


@pytest.mark.parametrize("seed", [7, 8])
async def test_random_disconnects_and_resumes_see_the_log_exactly(
    servers: Servers, seed: int
) -> None:
    server = await servers.start()
    rng = random.Random(seed)
    final: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    clients: list[tuple[dict[str, str], Predicate | None]] = [
        ({}, None),
        ({"tenant": "org"}, by_tenant("org")),
        ({"tenant": "org/a"}, by_tenant("org/a")),
        ({"node_id": NODES[0]}, by_node(NODES[0])),
        ({"node_id": NODES[1]}, by_node(NODES[1])),
    ]
    reconnects = 0

    async def client(fields: dict[str, str]) -> list[pb.AllocationEvent]:
        nonlocal reconnects
        seen: list[pb.AllocationEvent] = []
        next_revision = 1
        async with grpc.aio.insecure_channel(target(server)) as ch:
            stub = Stub(ch)
            while not (final.done() and next_revision > final.result()):
                call = stub.WatchAllocations(
                    pb.WatchAllocationsRequest(start_revision=next_revision, **fields)
                )
                budget = rng.randint(1, 40)
                async with asyncio.timeout(30):
                    async for ev in call:
                        if ev.type != PROGRESS:
                            seen.append(ev)
                        # A progress message moves the resume point too.
                        next_revision = ev.revision + 1
                        budget -= 1
                        if budget <= 0 or (final.done() and next_revision > final.result()):
                            break
                call.cancel()
                reconnects += 1
                await asyncio.sleep(rng.random() * 0.01)
        return seen

    async with grpc.aio.insecure_channel(target(server)) as ch:
        stub = Stub(ch)
        churns = [Churn(stub, seed=seed * 100 + i, hold=3) for i in range(2)]
        readers = [asyncio.create_task(client(f)) for f, _ in clients]
        await asyncio.gather(*(c.run(150) for c in churns))
        await asyncio.gather(*(c.finish() for c in churns))
        final.set_result(await settled(server))
        results = await asyncio.gather(*readers)
    everything = await log_keys(server, upto=final.result())
    assert reconnects > 40
    for (_, keep), got in zip(clients, results, strict=True):
        same(keys(got, upto=final.result()), [k for k in everything if keep is None or keep(k[2])])


# -- compaction ------------------------------------------------------------------------------


async def test_compacted_revision_is_out_of_range_then_relist_and_watch_sees_the_rest(
    servers: Servers,
) -> None:
    server = await servers.start(retention_max_events=5)
    async with grpc.aio.insecure_channel(target(server)) as ch:
        stub = Stub(ch)
        churn = Churn(stub, seed=4)
        await churn.run(60)
        await server.engine.compact()
        hub = server.engine.hub
        assert hub.oldest_revision == hub.revision - 4

        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.WatchAllocations(pb.WatchAllocationsRequest(start_revision=1)):
                pass
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
        info = detail(err.value, error_details_pb2.ErrorInfo)
        assert info.reason == "REVISION_COMPACTED"
        assert info.metadata["oldest_revision"] == str(hub.oldest_revision)
        assert info.metadata["current_revision"] == str(hub.revision)
        # The oldest retained revision itself is still fine.
        first = await anext(
            aiter(stub.WatchAllocations(pb.WatchAllocationsRequest(start_revision=hub.revision)))
        )
        assert first.revision == hub.revision

        listed = await stub.ListAllocations(pb.ListAllocationsRequest(page_size=1000))
        final: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        reader = asyncio.create_task(
            read_until(stub, pb.WatchAllocationsRequest(start_revision=listed.revision + 1), final)
        )
        await churn.run(40)
        await churn.finish()
        final.set_result(await settled(server))
        got = keys(await reader, upto=final.result())
    same(got, await log_keys(server, after=listed.revision, upto=final.result()))
    assert len(got) > 40


async def test_compaction_during_a_catch_up_from_the_store_is_out_of_range(
    servers: Servers,
) -> None:
    """The hub itself, no gRPC in between: a watcher catching up from the store in batches
    whose next batch has been compacted away fails with RevisionCompacted, not a gap."""
    from rmgrpc.errors import RevisionCompacted

    server = await servers.start(retention_max_events=5)
    async with grpc.aio.insecure_channel(target(server)) as ch:
        await Churn(Stub(ch), seed=14).run(40)
    server = await servers.restart()  # empty ring: the past comes from the store
    hub = server.engine.hub
    hub._batch = 10
    watch = hub.watch(WatchFilter(), 1, 5.0)
    got = [await anext(watch) for _ in range(3)]
    revisions = [e.revision for e in got]
    assert revisions == sorted(set(revisions)) and revisions[-1] < hub.revision - 10
    await server.engine.compact()
    with pytest.raises(RevisionCompacted) as err:
        async with asyncio.timeout(10):
            while True:
                await anext(watch)
    assert err.value.oldest == hub.oldest_revision
    await watch.aclose()


async def test_streams_end_unavailable_with_the_resume_revision_on_shutdown(
    servers: Servers,
) -> None:
    server = await servers.start()
    async with grpc.aio.insecure_channel(target(server)) as ch:
        stub = Stub(ch)
        await Churn(stub, seed=15).run(10)
        head = await settled(server)
        call = stub.WatchAllocations(pb.WatchAllocationsRequest(start_revision=head - 2))
        seen = [await call.read() for _ in range(3)]
        assert seen[-1].revision == head
        await servers.close()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async with asyncio.timeout(10):
                while await call.read() is not grpc.aio.EOF:
                    pass
        err = raised.value
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert f"start_revision={head + 1}" in (err.details() or "")


# -- the hub itself, no gRPC in between ------------------------------------------------------


def _hub_with_log(n: int, batch: int) -> tuple[EventHub, list[Event]]:
    async def no_store(after: int, limit: int) -> list[Event]:
        raise AssertionError("everything is in the ring")

    hub = EventHub(no_store, last_revision=0, oldest_revision=1, catch_up_batch=batch)
    log = [
        Event(r, EventKind.ALLOCATION, 1, f"a{r % 7}", 0.0, b"x" * 64, TENANTS[r % 4], ())
        for r in range(1, n + 1)
    ]
    hub.publish(log)
    return hub, log


@pytest.mark.parametrize("tenant", ["", "org"])
async def test_catch_up_from_the_ring_in_batches_is_exact_at_every_boundary(tenant: str) -> None:
    hub, log = _hub_with_log(3000, batch=100)
    for first in (1, 2, 99, 100, 101, 1499, 1500, 1501, 2900, 2999, 3000):
        want = [
            e.revision
            for e in log
            if e.revision >= first
            and (not tenant or e.tenant == tenant or e.tenant.startswith(tenant + "/"))
        ]
        watch = hub.watch(WatchFilter(tenant=tenant), first, 5.0)
        got = [(await anext(watch)).revision for _ in want]  # type: ignore[union-attr]
        assert got == want, first
        # Then live, with nothing repeated or skipped at the seam.
        nxt = Event(hub.revision + 1, EventKind.ALLOCATION, 1, "live", 0.0, b"", "org/a", ())
        hub.publish([nxt])
        assert (await anext(watch)).revision == nxt.revision  # type: ignore[union-attr]
        await watch.aclose()
        log.append(nxt)


async def test_watchers_far_behind_hold_one_batch_each_not_the_ring() -> None:
    hub, _ = _hub_with_log(30_000, batch=1000)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        watches = [hub.watch(WatchFilter(), 1 + i, 5.0) for i in range(40)]
        for w in watches:
            await anext(w)
        per_watcher = (tracemalloc.get_traced_memory()[0] - before) / len(watches)
    finally:
        tracemalloc.stop()
    for w in watches:
        await w.aclose()
    # One batch is 1000 references (8 KB); the whole ring would be 30,000 (240 KB).
    assert per_watcher < 40_000, per_watcher


async def test_client_library_relists_transparently_after_compaction(servers: Servers) -> None:
    from rmgrpc_client import AsyncClient, Relisted

    server = await servers.start(retention_max_events=5)
    async with grpc.aio.insecure_channel(target(server)) as ch:
        stub = Stub(ch)
        churn = Churn(stub, seed=5)
        await churn.run(40)
        await server.engine.compact()
        async with AsyncClient(target(server)) as client:
            watch = client.watch_allocations(start_revision=1)
            relisted = await anext(watch)
            assert isinstance(relisted, Relisted)
            listed = await stub.ListAllocations(pb.ListAllocationsRequest(page_size=1000))
            assert relisted.revision == listed.revision
            assert list(relisted.allocations) == list(listed.allocations)
            await churn.run(30)
            await churn.finish()
            end = await settled(server)
            got: list[pb.AllocationEvent] = []
            async with asyncio.timeout(20):
                while watch.revision < end:
                    item = await anext(watch)
                    assert not isinstance(item, Relisted)
                    got.append(item)
            await watch.aclose()
    same(keys(got, upto=end), await log_keys(server, after=relisted.revision, upto=end))


# -- progress --------------------------------------------------------------------------------


async def test_idle_streams_get_progress_with_the_current_revision(servers: Servers) -> None:
    server = await servers.start(watch_progress_seconds=0.2)
    async with grpc.aio.insecure_channel(target(server)) as ch:
        stub = Stub(ch)
        await Churn(stub, seed=6).run(10)
        rev = await settled(server)
        everything = stub.WatchAllocations(pb.WatchAllocationsRequest())
        nobody = stub.WatchAllocations(pb.WatchAllocationsRequest(tenant="nobody"))
        first = await everything.read()
        assert (first.type, first.revision) == (PROGRESS, rev)
        assert not first.HasField("allocation")

        # Work arrives: the unfiltered stream gets the events, then progress at the new head;
        # the stream that matches nothing gets only progress, moving forward.
        await Churn(stub, seed=7).run(10)
        rev2 = await settled(server)
        events = []
        while True:
            ev = await everything.read()
            if ev.type == PROGRESS:
                break
            events.append(ev)
        assert events and ev.revision == rev2 and events[-1].revision <= rev2
        seen: list[int] = []
        async with asyncio.timeout(10):
            while not seen or seen[-1] < rev2:
                ev = await nobody.read()
                assert ev.type == PROGRESS
                seen.append(ev.revision)
        assert seen == sorted(seen) and seen[0] >= rev
        everything.cancel()
        nobody.cancel()


# -- backpressure ----------------------------------------------------------------------------


def watch_buffer_probe(hub: EventHub) -> list[int]:
    """Wraps `hub.publish` to record the largest per-subscriber buffer after every event.

    A commit publishes its events in one call, and a buffer that overflows inside that call
    is cleared before the call returns; publishing them one by one (which the hub treats
    the same) lets the probe see the buffer full."""
    peaks: list[int] = []
    publish = hub.publish

    def recording(events: Any) -> None:
        for event in events:
            publish([event])
            peaks.append(max((len(s.buffer) for s in hub._all()), default=0))

    hub.publish = recording  # type: ignore[method-assign]
    return peaks


# Without this the client grows its HTTP/2 receive window by BDP probing to several MB:
# measured, a stream that is never read then absorbs ~25,000 events (about 18 s of churn
# here) in flow-control windows before the server-side generator blocks at all. With the
# window fixed at 64 KiB a few hundred events fill it.
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0)]


async def _slow_watcher_is_cut_off_and_resumes(
    server: RunningServer, slow_options: list[tuple[str, Any]], writers: int
) -> None:
    hub = server.engine.hub
    # A watcher whose buffer overflows falls back to catch-up; it is cut once it lags this
    # far behind (the default, 65,536, would take minutes of churn here).
    hub._max_lag_events = 64
    peaks = watch_buffer_probe(hub)
    final: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    async with (
        grpc.aio.insecure_channel(target(server)) as ch,
        grpc.aio.insecure_channel(target(server), options=slow_options) as slow_ch,
    ):
        stub = Stub(ch)
        start_revision = hub.revision + 1
        # It reads through all the churn it takes to fill the slow one's transport windows.
        fast = asyncio.create_task(
            read_until(
                stub, pb.WatchAllocationsRequest(start_revision=start_revision), final, 180.0
            )
        )
        slow = Stub(slow_ch).WatchAllocations(
            pb.WatchAllocationsRequest(start_revision=start_revision)
        )
        await slow.initial_metadata()
        churns = [Churn(stub, seed=20 + i, hold=2, max_gpus=1) for i in range(writers)]

        async def churn(c: Churn) -> None:
            async with asyncio.timeout(120):
                while hub.cut_off == 0:
                    await c.step()
            await c.run(20)  # and a little after the cut

        await asyncio.gather(*(churn(c) for c in churns))
        await asyncio.gather(*(c.finish() for c in churns))
        final.set_result(await settled(server))

        # The slow reader finally reads: what the transport held, then the cut-off status.
        before: list[pb.AllocationEvent] = []
        try:
            async with asyncio.timeout(60):
                async for ev in slow:
                    before.append(ev)
            raise AssertionError("slow stream was not cut off")
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            info = detail(err, error_details_pb2.ErrorInfo)
            assert info.reason == "WATCHER_TOO_SLOW"
            resume = int(info.metadata["resume_revision"])
        assert before and resume == before[-1].revision + 1
        after = await read_until(stub, pb.WatchAllocationsRequest(start_revision=resume), final)
        fast_got = keys(await fast, upto=final.result())

    want = await log_keys(server, after=start_revision - 1, upto=final.result())
    same(fast_got, want)
    same(keys(before) + keys(after, upto=final.result()), want)
    assert hub.cut_off == 1
    assert peaks and max(peaks) <= server.engine.settings.watch_buffer_events
    assert max(peaks) >= server.engine.settings.watch_buffer_events - 1  # it did fill up


async def test_slow_watcher_is_cut_off_with_resume_revision_and_loses_nothing(
    servers: Servers,
) -> None:
    server = await servers.start(watch_buffer_events=16)
    await _slow_watcher_is_cut_off_and_resumes(server, SMALL_WINDOW, writers=2)


@pytest.mark.slow
async def test_slow_watcher_with_default_channel_windows_is_cut_off_too(
    servers: Servers,
) -> None:
    server = await servers.start(watch_buffer_events=16)
    await _slow_watcher_is_cut_off_and_resumes(server, [], writers=4)


# -- many streams ----------------------------------------------------------------------------


async def test_a_thousand_idle_streams_are_cheap_and_cleaned_up(servers: Servers) -> None:
    server = await servers.start(watch_progress_seconds=30.0)
    hub = server.engine.hub
    async with grpc.aio.insecure_channel(target(server)) as ch:
        stub = Stub(ch)
        calls = [
            stub.WatchAllocations(pb.WatchAllocationsRequest(tenant=f"t{i % 50}"))
            for i in range(1000)
        ]
        async with asyncio.timeout(30):
            while hub.watchers < 1000:
                await asyncio.sleep(0.02)
        assert hub.watchers == 1000

        fresh = stub.WatchAllocations(pb.WatchAllocationsRequest(tenant="t7"))
        async with asyncio.timeout(10):
            while hub.watchers < 1001:
                await asyncio.sleep(0.01)
        resp = await stub.Allocate(pb.AllocateRequest(tenant="t7", count=1, shape=shape(1)))
        async with asyncio.timeout(10):
            ev = await fresh.read()
            assert ev.allocation.id == resp.allocation.id
            # One of the thousand, with the same filter, got it too.
            ev7 = await calls[7].read()
            assert ev7.allocation.id == resp.allocation.id

        for c in [*calls, fresh]:
            c.cancel()
        async with asyncio.timeout(10):
            while hub.watchers:
                await asyncio.sleep(0.02)
    assert hub.watchers == 0
    assert not hub._rest and not hub._by_tenant and not hub._by_node and not hub._by_object


async def test_watch_from_the_next_revision_starts_there_and_past_it_is_refused(
    servers: Servers,
) -> None:
    server = await servers.start()
    async with grpc.aio.insecure_channel(target(server)) as ch:
        stub = Stub(ch)
        head = await settled(server)
        # Past the next revision: one this server never issued (another cluster, a lost
        # database): refused, so the client lists again rather than waits for it.
        err = await status_of(
            stub.WatchAllocations(pb.WatchAllocationsRequest(start_revision=head + 3))
        )
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        failure = detail(err, error_details_pb2.PreconditionFailure)
        assert failure.violations[0].type == "REVISION_NOT_YET_ISSUED"
        call = stub.WatchAllocations(pb.WatchAllocationsRequest(start_revision=head + 1))
        await call.initial_metadata()
        await asyncio.sleep(0.05)
        churn = Churn(stub, seed=9)
        await churn.run(4)
        end = await settled(server)
        got: list[pb.AllocationEvent] = []
        async with asyncio.timeout(10):
            while not got or got[-1].revision < end:
                ev = await call.read()
                if ev.type != PROGRESS:
                    got.append(ev)
        call.cancel()
    same(keys(got, upto=end), await log_keys(server, after=head, upto=end))


async def test_bad_watch_requests_are_invalid_argument(servers: Servers) -> None:
    server = await servers.start()
    async with grpc.aio.insecure_channel(target(server)) as ch:
        stub = Stub(ch)
        for request, field in [
            (pb.WatchAllocationsRequest(start_revision=-1), "start_revision"),
            (pb.WatchAllocationsRequest(tenant="bad tenant!"), "tenant"),
            (pb.WatchAllocationsRequest(node_id="bad node!"), "node_id"),
        ]:
            err = await status_of(stub.WatchAllocations(request))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, field


# -- bursts ----------------------------------------------------------------------------------


async def test_a_scheduling_burst_larger_than_the_buffer_reaches_a_prompt_watcher_whole(
    servers: Servers,
) -> None:
    """One cycle places 64 queued allocations at once: one commit of more matching events
    than a watcher's buffer (16) holds. The watcher falls back to catch-up instead of being
    cut off, then rejoins live."""
    server = await servers.start(watch_buffer_events=16, simulated_nodes=8)
    hub = server.engine.hub
    sizes: list[int] = []
    publish = hub.publish

    def recording(events: Any) -> None:
        sizes.append(len(events))
        publish(events)

    hub.publish = recording  # type: ignore[method-assign]
    final: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    async with grpc.aio.insecure_channel(target(server)) as ch:
        stub = Stub(ch)
        # Every GPU of the 8 nodes, then 64 single-GPU requests queued behind it.
        blocker = await stub.Allocate(pb.AllocateRequest(tenant="org/a", count=8, shape=shape(8)))
        for _ in range(64):
            await stub.Allocate(pb.AllocateRequest(tenant="org/a", count=1, shape=shape(1)))
        start_revision = await settled(server) + 1
        reader = asyncio.create_task(
            read_until(stub, pb.WatchAllocationsRequest(start_revision=start_revision), final)
        )
        async with asyncio.timeout(10):
            while hub.watchers < 1:
                await asyncio.sleep(0.01)
        sizes.clear()
        await stub.ReleaseAllocation(pb.ReleaseAllocationRequest(id=blocker.allocation.id))
        placed = pb.ALLOCATION_EVENT_TYPE_PLACED
        async with asyncio.timeout(10):
            while sum(t == placed for _, t, _ in await log_keys(server, after=start_revision)) < 64:
                await asyncio.sleep(0.02)
        # Then live again: a later change still arrives.
        await Churn(stub, seed=30).run(5)
        final.set_result(await settled(server))
        got = keys(await reader, upto=final.result())
    same(got, await log_keys(server, after=start_revision - 1, upto=final.result()))
    assert max(sizes) > 16, sizes  # a real burst: one commit larger than the buffer
    assert hub.fell_back >= 1 and hub.cut_off == 0
