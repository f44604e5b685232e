"""The engine without gRPC: deadlines stay one per live object, quick decisions respect
the fair order, reasons for waiting are events, and a revision means one content."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from rmgrpc import codec
from rmgrpc.clock import ManualClock
from rmgrpc.engine import Engine, GpuReport, scheduling
from rmgrpc.engine.passes import ThreadRunner
from rmgrpc.errors import Unavailable
from rmgrpc.gpu.simulated import simulated_nodes
from rmgrpc.model import Allocation, AllocationEventType, AllocationState, Event, EventKind, Shape
from rmgrpc.store import Store
from rmgrpc.v1 import allocator_pb2
from tests.conftest import make_settings


@pytest.fixture
async def engine_factory(tmp_path: Path) -> AsyncIterator[Any]:
    made: list[tuple[Engine, Store]] = []

    async def make(nodes: int = 2, gpus: int = 8, **overrides: Any) -> tuple[Engine, ManualClock]:
        clock = ManualClock()
        settings = make_settings(tmp_path, db=":memory:", **overrides)
        store = await Store.open(":memory:")
        engine = Engine(settings, store, clock)
        await engine.start(simulated_nodes(nodes, gpus, now=clock.now()))
        await engine.schedule_now()
        made.append((engine, store))
        return engine, clock

    yield make
    for engine, store in made:
        await engine.stop()
        await store.close()


def request(tenant: str = "t", gpus: int = 1, **kw: Any) -> Allocation:
    return Allocation(id="", tenant=tenant, count=kw.pop("count", 1), shape=Shape(gpus=gpus), **kw)


async def test_timers_hold_one_deadline_per_live_object(engine_factory: Any) -> None:
    """10,000 Allocate/Renew/Release cycles and 1,000 heartbeats leave one deadline per
    live object: a lease and a max duration per running allocation, a lease per node."""
    engine, clock = await engine_factory(nodes=2, gpus=8)
    # A registered node holds a lease (simulated ones never go DOWN).
    node = await engine.register_node(simulated_nodes(1, 8, now=clock.now())[0])

    async def cycle(i: int) -> None:
        a, _ = await engine.allocate(request(max_duration_seconds=3600), dry_run=False)
        await engine.renew(a.id, 60)
        await engine.release(a.id)

    for start in range(0, 10_000, 100):
        await asyncio.gather(*(cycle(i) for i in range(start, start + 100)))
    for _ in range(1_000):
        await engine.heartbeat(node.id, [GpuReport(0, None, None)])
    keep = [
        (await engine.allocate(request(max_duration_seconds=3600, lease_seconds=60), False))[0]
        for _ in range(3)
    ]
    assert all(a.state == AllocationState.ALLOCATED for a in keep)
    leased_nodes = sum(1 for n in engine.state.nodes.values() if n.lease_expire_time is not None)
    assert len(engine.timers) == 2 * len(keep) + leased_nodes
    assert engine.timers.heap_size <= 2 * len(engine.timers) + 64


async def test_leases_survive_a_wall_clock_step(engine_factory: Any) -> None:
    engine, clock = await engine_factory(default_lease_seconds=60)
    a, _ = await engine.allocate(request(), dry_run=False)
    clock.step(3600)
    engine.fire_timers()
    assert a.state == AllocationState.ALLOCATED
    clock.advance(61)
    engine.fire_timers()
    assert a.state == AllocationState.EXPIRED


async def test_quick_decisions_place_at_once_and_explain_a_wait(engine_factory: Any) -> None:
    engine, _ = await engine_factory(nodes=1, gpus=8)
    passes = engine.scheduling.passes
    a, _ = await engine.allocate(request(gpus=6), dry_run=False)
    assert a.state == AllocationState.ALLOCATED
    b, _ = await engine.allocate(request(gpus=4), dry_run=False)
    assert b.state == AllocationState.PENDING and "free GPUs" in b.pending_reason
    c, _ = await engine.allocate(request(gpus=2), dry_run=False)
    assert c.state == AllocationState.ALLOCATED  # a smaller request passes a blocked one
    assert engine.scheduling.passes == passes  # none of that needed a full pass


async def test_a_stream_of_arrivals_into_a_full_cluster_waits_for_the_refresh_gap(
    engine_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests answered PENDING at once ask only for a refresh pass (their position),
    which waits `REFRESH_GAP` (or twice the last pass) after the last one: a stream of
    arrivals must not run passes back to back (at 30,000 pending that kept a core busy
    and starved serving); an urgent request still cuts the wait short."""
    engine, _ = await engine_factory(nodes=1, gpus=8)
    await engine.allocate(request(gpus=8), dry_run=False)
    await engine.allocate(request(gpus=8), dry_run=False)
    await engine.schedule_now()
    monkeypatch.setattr(scheduling, "REFRESH_GAP", 3600.0)
    passes = engine.scheduling.passes
    waiting = []
    for _ in range(20):
        a, _ = await engine.allocate(request(gpus=1), dry_run=False)
        assert a.state == AllocationState.PENDING and a.pending_reason
        waiting.append(a)
        await _loop_turns(5)
    assert engine.scheduling.passes == passes
    assert all(engine.scheduling.position(a.id) == 0 for a in waiting)
    await engine.schedule_now()  # urgent
    assert engine.scheduling.passes == passes + 1
    assert sorted(engine.scheduling.position(a.id) for a in waiting) == list(range(2, 22))


async def test_after_capacity_frees_the_queue_goes_first(engine_factory: Any) -> None:
    """Freed capacity unsettles the queue: a newcomer waits for the pass, which gives the
    GPUs to the request that waited longer."""
    engine, _ = await engine_factory(nodes=1, gpus=8)
    a, _ = await engine.allocate(request(gpus=8), dry_run=False)
    waiting, _ = await engine.allocate(request(gpus=8), dry_run=False)
    assert waiting.state == AllocationState.PENDING
    await engine.release(a.id)
    newcomer, _ = await engine.allocate(request(gpus=8), dry_run=False)
    assert waiting.state == AllocationState.ALLOCATED
    assert newcomer.state == AllocationState.PENDING


async def test_an_unsettled_queue_still_answers_at_once_what_cannot_fit(
    engine_factory: Any,
) -> None:
    """While the queue is not settled, a request that fits waits for the pass (the free
    capacity may be owed to older work), but one that cannot fit takes nothing from
    anyone and is answered PENDING at once: otherwise a steady stream of arrivals into
    a full cluster would keep the queue unsettled and every answer waiting a pass."""
    engine, _ = await engine_factory(nodes=1, gpus=8)
    await engine.allocate(request(gpus=6), dry_run=False)
    waiting, _ = await engine.allocate(request(gpus=4), dry_run=False)
    assert waiting.state == AllocationState.PENDING
    sched = engine.scheduling
    sched.changed()  # as a node or quota change does
    assert not sched.settled
    too_big = dataclasses.replace(request(gpus=4), id="x1", seq=1_000_000)
    fits = dataclasses.replace(request(gpus=2), id="x2", seq=1_000_001)
    assert isinstance(sched.decide(too_big), str)
    assert sched.decide(fits) is None
    await engine.schedule_now()
    assert sched.settled
    # The trial that found it fitting left the quick view as it was.
    placed = sched.decide(fits)
    assert isinstance(placed, tuple) and sum(len(p.gpu_indices) for p in placed) == 2


async def test_higher_priority_waits_for_the_pass_that_preempts_for_it(
    engine_factory: Any,
) -> None:
    engine, _ = await engine_factory(nodes=1, gpus=8, preemption_grace_seconds=30.0)
    low, _ = await engine.allocate(request(gpus=8, priority=0), dry_run=False)
    high, _ = await engine.allocate(request(gpus=8, priority=5), dry_run=False)
    assert low.state == AllocationState.PREEMPTED and low.preempted_by == high.id
    assert high.state == AllocationState.PENDING and "grace" in high.pending_reason


async def test_a_changed_reason_is_an_event_and_a_revision_has_one_content(
    engine_factory: Any,
) -> None:
    """What Get shows at revision N is what event N carries (queue position aside, which
    is status); a watcher learns why its allocation waits."""
    engine, _ = await engine_factory(nodes=1, gpus=8)
    big, _ = await engine.allocate(request(gpus=8), dry_run=False)
    waiting = [(await engine.allocate(request(gpus=8), dry_run=False))[0] for _ in range(3)]
    await engine.release(big.id)  # unsettles: the pass re-explains the ones left
    await engine.schedule_now()
    events = await engine.store.read_events(0, 10_000)
    by_rev: dict[int, Event] = {e.revision: e for e in events}
    for a in waiting:
        shown = codec.allocation_to_proto(a, engine.state.uuid_of)
        stored = allocator_pb2.Allocation.FromString(by_rev[shown.revision].data)
        assert stored.queue_position == 0
        shown.queue_position = 0
        assert shown == stored
    updated = [e for e in events if e.kind == EventKind.ALLOCATION and e.object_id == waiting[1].id]
    reasons = [allocator_pb2.Allocation.FromString(e.data).pending_reason for e in updated]
    # Created with the quick decision's reason; the pass after the release found another
    # (it now waits behind the one placed first) and wrote it as an UPDATED event.
    assert [e.type for e in updated] == [1, 3], reasons
    assert reasons[0] != reasons[1] == waiting[1].pending_reason
    assert waiting[0].state == AllocationState.ALLOCATED
    assert engine.scheduling.position(waiting[1].id) == 1
    assert engine.scheduling.position(waiting[2].id) == 2


async def test_a_failed_commit_fails_every_waiter_at_once(tmp_path: Path) -> None:
    """The database file is deleted under the server: the commit fails, its caller and
    everyone waiting for a later revision get UNAVAILABLE at once, and no later write is
    acknowledged."""
    clock = ManualClock()
    settings = make_settings(tmp_path)
    store = await Store.open(settings.db)
    engine = Engine(settings, store, clock)
    await engine.start(simulated_nodes(1, 8, now=clock.now()))
    try:
        a, _ = await engine.allocate(request(gpus=8), dry_run=False)
        os.remove(settings.db)
        reader = asyncio.create_task(engine.wait_committed(engine.revision + 1))
        with pytest.raises(Unavailable):
            await engine.release(a.id)
        with pytest.raises(Unavailable):
            await asyncio.wait_for(reader, 5)
        assert engine.failed is not None
        with pytest.raises(Unavailable):
            await engine.allocate(request(), dry_run=False)
    finally:
        await engine.stop()
        with contextlib.suppress(Exception):
            await store.close()


async def test_a_cordon_is_seen_by_the_next_quick_decision(engine_factory: Any) -> None:
    engine, _ = await engine_factory(nodes=2, gpus=8)
    a, _ = await engine.allocate(request(gpus=1), dry_run=False)
    first = a.placements[0].node_id
    await engine.cordon(first, "maintenance")
    for _ in range(3):
        b, _ = await engine.allocate(request(gpus=1), dry_run=False)
        assert b.state == AllocationState.ALLOCATED and b.placements[0].node_id != first


async def test_first_reasons_of_a_large_queue_go_in_slices_with_the_loop_free_between(
    engine_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A queue first seen all at once (after a restart, or a burst written straight into
    the store) gets its first reasons in transactions of at most REASON_SLICE, with other
    work of the event loop running between them, until every one is written."""
    monkeypatch.setattr(scheduling, "REASON_SLICE", 5)
    engine, _ = await engine_factory(nodes=1, gpus=8)
    await engine.allocate(request(gpus=8), dry_run=False)
    waiting = [(await engine.allocate(request(gpus=2), dry_run=False))[0] for _ in range(12)]
    sched = engine.scheduling
    # As after a restart onto a queue no pass has explained: a fresh runner, and reasons
    # that say only "queued".
    sched.runner = ThreadRunner()
    for a in waiting:
        engine.state.live[a.id].pending_reason = scheduling.QUEUED
    written: list[int] = []
    between: list[int] = []
    write = sched._write_reasons

    def counting(txn: Any) -> bool:
        before = sum(a.pending_reason != scheduling.QUEUED for a in waiting)
        more = write(txn)
        written.append(sum(a.pending_reason != scheduling.QUEUED for a in waiting) - before)
        asyncio.get_running_loop().call_soon(lambda: between.append(len(written)))
        return more

    monkeypatch.setattr(sched, "_write_reasons", counting)
    sched.changed()
    await engine.schedule_now()
    await _slices_written(engine)
    slices = [n for n in written if n]
    assert sum(slices) == 12 and max(slices) <= 5 and len(slices) >= 3, written
    # Another callback ran after each slice before the next one began.
    assert between[: len(written) - 1] == list(range(1, len(written))), (between, written)
    events = await engine.store.read_events(0, 10_000)
    updated = {e.object_id for e in events if e.type == 3}
    assert updated >= {a.id for a in waiting}


async def _slices_written(engine: Engine) -> None:
    """Until the slices of reasons that follow a pass's first are written and durable
    (each a callback of its own, after a pause as long as the slice before took)."""
    async with asyncio.timeout(5):
        while engine.scheduling.next_slice is not None:
            await asyncio.sleep(0.001)
    await engine.wait_committed()


async def test_a_stop_cancels_the_reason_slices_still_to_come(
    engine_factory: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Slices after a pause must not outlive the engine: one firing after a stop would
    commit to a closed store (logged as a store failure, the server shutting down)."""
    monkeypatch.setattr(scheduling, "REASON_SLICE", 1)
    engine, _ = await engine_factory(nodes=1, gpus=8)
    await engine.allocate(request(gpus=8), dry_run=False)
    waiting = [(await engine.allocate(request(gpus=2), dry_run=False))[0] for _ in range(6)]
    with engine.committer.transaction() as txn:
        engine.scheduling._statuses(txn, {a.id: "later" for a in waiting})
    assert engine.scheduling.next_slice is not None
    await engine.stop()
    assert engine.scheduling.next_slice is None
    written = [a.pending_reason for a in waiting].count("later")
    assert written < len(waiting)  # the stop came before the last slice
    await asyncio.sleep(0.05)
    assert [a.pending_reason for a in waiting].count("later") == written
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


async def _reasons_given(engine: Engine, reasons: dict[str, str]) -> int:
    """Hands `reasons` to the scheduler as a pass's changed reasons; how many UPDATED
    events that writes (the first slice and the slices that follow it)."""
    before = engine.revision
    with engine.committer.transaction() as txn:
        engine.scheduling._statuses(txn, reasons)
    await _slices_written(engine)
    events = await engine.store.read_events(before, 10_000)
    return sum(e.type == AllocationEventType.UPDATED for e in events)


async def test_an_arrival_answered_pending_at_once_has_the_reason_the_next_pass_gives(
    engine_factory: Any,
) -> None:
    """A request that cannot fit is answered PENDING at once with the filter chain's
    reason; a pass ends the same reason with where the tenant stands against its fair
    share. The quick answer ends it the same way (as of the last pass), so the next pass
    finds nothing to rewrite: one event per arrival, not two (at 800 arrivals a second
    into a full cluster the second ones were a thousand writes a pass). Sibling tenant
    names keep their own notes."""
    engine, _ = await engine_factory(nodes=2, gpus=8)
    for tenant in ("org/a", "org/ab"):
        await engine.allocate(request(tenant, gpus=8), dry_run=False)
    for tenant in ("org/a", "org/ab"):
        await engine.allocate(request(tenant, gpus=1), dry_run=False)
    await engine.schedule_now()  # a pass: the tenants' share notes
    before = engine.revision
    arrivals = []
    for tenant, gpus in [("org/a", 1), ("org/ab", 2), ("org/a", 4), ("org/ab", 1)]:
        a, _ = await engine.allocate(request(tenant, gpus=gpus), dry_run=False)
        assert a.state == AllocationState.PENDING
        assert a.pending_reason.endswith(f"; tenant {tenant} holds 8 GPUs, fair share 8")
        arrivals.append((a, a.pending_reason))
    await engine.schedule_now()
    await _slices_written(engine)
    assert [a.pending_reason for a, _ in arrivals] == [r for _, r in arrivals]
    events = await engine.store.read_events(before, 10_000)
    updated = [e.object_id for e in events if e.type == AllocationEventType.UPDATED]
    assert not set(updated) & {a.id for a, _ in arrivals}, updated


async def test_changed_reasons_are_written_once_per_interval_and_budget_per_pass(
    engine_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reason that keeps changing is written at most once per REASON_EVERY per request
    (on the engine's clock) and at most REASON_BUDGET per pass, in slices; the change
    written when due is the latest; a request forgotten meanwhile is dropped."""
    monkeypatch.setattr(scheduling, "REASON_BUDGET", 3)
    monkeypatch.setattr(scheduling, "REASON_SLICE", 2)
    engine, clock = await engine_factory(nodes=1, gpus=8)
    await engine.allocate(request(gpus=8), dry_run=False)
    waiting = [(await engine.allocate(request(gpus=2), dry_run=False))[0] for _ in range(5)]
    await engine.schedule_now()
    assert all(a.pending_reason not in ("", scheduling.QUEUED) for a in waiting)
    sched = engine.scheduling
    for a in waiting:  # as if each had just been written
        sched._reason_at[a.id] = clock.now()

    assert await _reasons_given(engine, {a.id: "r1" for a in waiting}) == 0  # not due yet
    clock.advance(scheduling.REASON_EVERY - 1)
    assert await _reasons_given(engine, {a.id: "r2" for a in waiting}) == 0
    clock.advance(1)
    # All due: this pass's budget writes 3 of the 5, the latest reason each.
    assert await _reasons_given(engine, {}) == 3
    first = [a for a in waiting if a.pending_reason == "r2"]
    assert len(first) == 3
    # The next pass writes the other two; the three just written wait their interval.
    assert await _reasons_given(engine, {a.id: "r3" for a in first}) == 2
    assert [a.pending_reason for a in waiting] == ["r2"] * 5
    clock.advance(scheduling.REASON_EVERY)
    sched.forget(first[0].id)  # placed or released meanwhile
    assert await _reasons_given(engine, {}) == 2
    assert [a.pending_reason for a in first] == ["r2", "r3", "r3"]


async def test_a_pass_giving_the_reason_already_written_drops_an_older_change(
    engine_factory: Any,
) -> None:
    """A change held back by the rate limit is dropped when a newer pass gives the reason
    the allocation already has: the newest pass is what the reason must say, what was
    already said is not written again, and nothing is left queued for it (a deep queue's
    passes name thousands of such reasons: each queued one cost a look later)."""
    engine, clock = await engine_factory(nodes=1, gpus=8)
    await engine.allocate(request(gpus=8), dry_run=False)
    a, _ = await engine.allocate(request(gpus=2), dry_run=False)
    await engine.schedule_now()
    said = a.pending_reason
    sched = engine.scheduling
    sched._reason_at[a.id] = clock.now()  # as if just written
    assert await _reasons_given(engine, {a.id: "changed"}) == 0  # not due yet
    assert sched._changes == {a.id: "changed"}
    assert await _reasons_given(engine, {a.id: said}) == 0
    assert not sched._changes
    clock.advance(scheduling.REASON_EVERY)
    assert await _reasons_given(engine, {}) == 0
    assert a.pending_reason == said


async def _waiting_behind_a_full_node(
    engine_factory: Any, n: int
) -> tuple[Engine, ManualClock, list[Allocation]]:
    """One node of 8 GPUs held whole, and `n` 2-GPU requests waiting, explained by a pass."""
    engine, clock = await engine_factory(nodes=1, gpus=8)
    await engine.allocate(request(gpus=8), dry_run=False)
    waiting = [(await engine.allocate(request(gpus=2), dry_run=False))[0] for _ in range(n)]
    await engine.schedule_now()
    return engine, clock, waiting


async def test_a_slice_of_reasons_looks_at_a_bounded_number_of_entries(
    engine_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Due changes of requests that ended since cost no write but still cost a look: one
    slice looks at no more than 4 x REASON_SLICE of them (a pass apply once popped
    thousands in one turn of the event loop), and the rest follow in later slices."""
    monkeypatch.setattr(scheduling, "REASON_SLICE", 2)
    engine, clock, waiting = await _waiting_behind_a_full_node(engine_factory, 30)
    sched = engine.scheduling
    for a in waiting:
        sched._reason_at[a.id] = clock.now()
    sched._absorbing = iter({a.id: "changed" for a in waiting}.items())
    sched._absorb()
    for a in waiting[:-1]:
        await engine.release(a.id)  # ended: their due changes are stale entries
    clock.advance(scheduling.REASON_EVERY)
    sched._budget = scheduling.REASON_BUDGET
    before = len(sched._due)
    with engine.committer.transaction() as txn:
        assert sched._write_reasons(txn)  # more to look at
    assert before - len(sched._due) == 8
    while True:
        with engine.committer.transaction() as txn:
            if not sched._write_reasons(txn):
                break
    assert waiting[-1].pending_reason == "changed"


async def _loop_turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_a_pass_s_changed_reasons_are_taken_in_slices_and_a_newer_pass_supersedes(
    engine_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deep queue's pass names tens of thousands of changed reasons: they are taken in
    ABSORB_SLICE at a time, one turn of the event loop each, until all are written. What
    an older pass left untaken is dropped when a newer pass's reasons arrive (those are
    every difference from a newer snapshot)."""
    monkeypatch.setattr(scheduling, "ABSORB_SLICE", 3)
    engine, _, waiting = await _waiting_behind_a_full_node(engine_factory, 10)
    sched = engine.scheduling
    for a in waiting:  # as if no pass had explained them yet
        a.pending_reason = scheduling.QUEUED

    with engine.committer.transaction() as txn:
        sched._statuses(txn, {a.id: "first pass" for a in waiting})
    # Only the first slice was taken in before the event loop got its turn back.
    assert [a.pending_reason for a in waiting].count("first pass") == 3
    await _slices_written(engine)
    assert [a.pending_reason for a in waiting] == ["first pass"] * 10

    for a in waiting:
        a.pending_reason = scheduling.QUEUED
    with engine.committer.transaction() as txn:
        sched._statuses(txn, {a.id: "older" for a in waiting})
        sched._statuses(txn, {a.id: "newer" for a in waiting[8:]})
    await _slices_written(engine)
    reasons = [a.pending_reason for a in waiting]
    assert reasons == ["older"] * 3 + [scheduling.QUEUED] * 5 + ["newer"] * 2


async def test_a_grace_over_by_the_clock_is_handled_before_the_pass_looks(
    engine_factory: Any,
) -> None:
    """The timer loop may fire a grace deadline late (the loop was busy); a pass taken in
    between must not plan onto GPUs the state still counts as held (the apply would refuse
    the plan and leave the preemptor waiting, unranked, a pass longer)."""
    engine, clock = await engine_factory(nodes=1, gpus=8, preemption_grace_seconds=30.0)
    low, _ = await engine.allocate(request(gpus=8, priority=0), dry_run=False)
    high, _ = await engine.allocate(request(gpus=8, priority=5), dry_run=False)
    assert low.state == AllocationState.PREEMPTED and high.state == AllocationState.PENDING
    clock.advance(31)  # past the grace; the timer loop has not run since
    await engine.schedule_now()
    assert high.state == AllocationState.ALLOCATED, high.pending_reason
    assert not engine.state.holds(low)


@pytest.mark.parametrize("turns", range(4))
async def test_stop_ends_every_loop_even_when_a_wake_up_lands_with_the_cancel(
    tmp_path: Path, turns: int
) -> None:
    """A server stop cancels the engine's loops and waits for them. A deadline armed a
    loop turn or two before the stop (a pass preempting with a grace, a heartbeat) wakes
    the timer loop as the cancel lands; waited on with `asyncio.wait_for`, Python 3.11
    swallowed that cancel, the timer loop went on, and the stop hung (a whole CI run)."""
    clock = ManualClock()
    store = await Store.open(":memory:")
    engine = Engine(make_settings(tmp_path, db=":memory:"), store, clock)
    await engine.start(simulated_nodes(1, 8, now=clock.now()))
    await asyncio.sleep(0.05)
    loops = list(engine._tasks)
    engine._timer_wake.set()
    engine.scheduling._kick.set()
    for _ in range(turns):
        await asyncio.sleep(0)
    try:
        await engine.stop()
        assert all(t.done() for t in loops), [t.get_name() for t in loops if not t.done()]
    finally:
        for t in loops:
            t.cancel()
        await store.close()
