"""The quick view is followed in place, not rebuilt, when a pass moves its holds: what it
sets aside for preemptors stays what a view built afresh would set aside as holders come
and go (a victim's freed GPUs go to the preemptor waiting for them, not to a newcomer),
and what a preemptor or held gang no longer needs goes back when it stops waiting."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rmgrpc.clock import ManualClock
from rmgrpc.engine import Engine
from rmgrpc.gpu.simulated import simulated_nodes
from rmgrpc.model import Allocation, AllocationState, Placement, Shape
from rmgrpc.scheduler.placement import CapacityView, SetAsides
from rmgrpc.scheduler.result import PassResult
from rmgrpc.store import Store
from tests.conftest import make_settings
from tests.e2e.test_invariants import check_quick_view

NODES = simulated_nodes(2, 8, cpu_millis=16_000, memory_bytes=64)
BY_ID = {n.id: n for n in NODES}


def free_of(view: CapacityView) -> dict[str, tuple[object, ...]]:
    return {
        nid: ({m: tuple(v) for m, v in n.free.items()}, n.cpu_free, n.mem_free)
        for nid, n in view.nodes.items()
    }


# One step: ("take", node, gpus, cpu, mem) a new holder; ("give", k) the k-th holder
# leaves; ("drop", k) the k-th preemptor stops waiting.
step = st.one_of(
    st.tuples(
        st.just("take"),
        st.sampled_from(sorted(BY_ID)),
        st.sets(st.integers(0, 7), max_size=3),
        st.integers(0, 6_000),
        st.integers(0, 24),
    ),
    st.tuples(st.just("give"), st.integers(0, 20)),
    st.tuples(st.just("drop"), st.integers(0, 3)),
)
aside = st.tuples(
    st.integers(0, 3),
    st.sampled_from(sorted(BY_ID)),
    st.sets(st.integers(0, 7), max_size=4),
    st.integers(0, 8_000),
    st.integers(0, 32),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(step, max_size=4), st.lists(aside, max_size=5), st.lists(step, max_size=12))
def test_set_asides_followed_in_place_equal_a_fresh_build(
    before: list[tuple[Any, ...]], asides: list[tuple[Any, ...]], after: list[tuple[Any, ...]]
) -> None:
    """Holders take and give back, preemptors stop waiting, in any order: the followed
    view has free, per node, what a view built afresh over the same holders and the
    set-asides still standing has (GPUs by model, CPU, memory)."""
    holders: list[Allocation] = []
    waiting = [f"p{i}" for i in range(4)]

    def holder(nid: str, gpus: set[int], cpu: int, mem: int) -> Allocation | None:
        held = {i for a in holders for p in a.placements if p.node_id == nid for i in p.gpu_indices}
        cpu_left = BY_ID[nid].cpu_millis - sum(a.shape.cpu_millis for a in holders_on(nid))
        mem_left = BY_ID[nid].memory_bytes - sum(a.shape.memory_bytes for a in holders_on(nid))
        gpus -= held  # the state never hands one GPU to two holders
        if cpu > cpu_left or mem > mem_left:
            return None
        shape = Shape(gpus=len(gpus), cpu_millis=cpu, memory_bytes=mem)
        a = Allocation(f"h{len(holders)}", "t", 1, shape, state=AllocationState.ALLOCATED)
        a.placements = (Placement(nid, tuple(sorted(gpus))),)
        return a

    def holders_on(nid: str) -> list[Allocation]:
        return [a for a in holders if a.placements[0].node_id == nid]

    def run(steps: list[tuple[Any, ...]], on: SetAsides | None) -> None:
        for s in steps:
            if s[0] == "take":
                a = holder(s[1], set(s[2]), s[3], s[4])
                if a is None:
                    continue
                holders.append(a)
                if on is not None:
                    p = a.placements[0]
                    on.take(p.node_id, p.gpu_indices, a.shape.cpu_millis, a.shape.memory_bytes)
            elif s[0] == "give" and holders:
                a = holders.pop(s[1] % len(holders))
                if on is not None:
                    p = a.placements[0]
                    on.give(p.node_id, p.gpu_indices, a.shape.cpu_millis, a.shape.memory_bytes)
            elif s[0] == "drop" and on is not None:
                owner = f"p{s[1]}"
                if owner in waiting:
                    waiting.remove(owner)
                    on.drop(owner)

    run(before, None)
    followed = SetAsides(CapacityView(BY_ID, holders))
    for k, nid, gpus, cpu, mem in asides:
        followed.add(f"p{k}", nid, sorted(gpus), cpu, mem)
    run(after, followed)

    fresh = SetAsides(CapacityView(BY_ID, holders))
    for k, nid, gpus, cpu, mem in asides:
        if f"p{k}" in waiting:
            fresh.add(f"p{k}", nid, sorted(gpus), cpu, mem)
    assert free_of(followed.view) == free_of(fresh.view)


def test_a_give_tops_the_set_aside_up_to_what_it_wanted() -> None:
    """GPUs a holder frees go to the set-aside that wanted them, and CPU only up to what it
    wanted; the rest stays free."""
    [node] = simulated_nodes(1, 8, cpu_millis=16_000, memory_bytes=64)
    x = Allocation("x", "t", 1, Shape(gpus=2, cpu_millis=10_000, memory_bytes=0))
    x.placements = (Placement(node.id, (6, 7)),)
    view = CapacityView({node.id: node}, [x])
    asides = SetAsides(view)
    asides.add("p", node.id, (5, 6, 7), 8_000, 0)
    n = view.nodes[node.id]
    assert (n.free["H100"], n.cpu_free) == ([0, 1, 2, 3, 4], 0)  # only 6 000 CPU was free
    asides.give(node.id, (6, 7), 10_000, 0)
    assert (n.free["H100"], n.cpu_free) == ([0, 1, 2, 3, 4], 8_000)
    assert asides.drop("p")
    assert (n.free["H100"], n.cpu_free) == (list(range(8)), 16_000)
    assert not asides and not asides.drop("p")


# -- through the engine ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def started(
    tmp_path: Path, nodes: int, **overrides: Any
) -> AsyncIterator[tuple[Engine, ManualClock]]:
    """An engine on `nodes` simulated nodes of 8 GPUs, on a manual clock."""
    clock = ManualClock()
    store = await Store.open(":memory:")
    eng = Engine(make_settings(tmp_path, db=":memory:", **overrides), store, clock)
    await eng.start(simulated_nodes(nodes, 8, now=clock.now()))
    await eng.schedule_now()
    try:
        yield eng, clock
    finally:
        await eng.stop()
        await store.close()


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[tuple[Engine, ManualClock]]:
    """One node of 8 GPUs; preemption only after 60 s of running, with a 30 s grace."""
    async with started(
        tmp_path,
        1,
        min_runtime_seconds=60.0,
        preemption_grace_seconds=30.0,
        starvation_seconds=3600.0,
    ) as got:
        yield got


def followed_as_built(eng: Engine) -> None:
    """The quick view stands (followed, not dropped) and equals one built afresh."""
    assert eng.scheduling._quick is not None
    check_quick_view(eng)


def request(gpus: int, priority: int = 0, tenant: str = "t") -> Allocation:
    return Allocation(id="", tenant=tenant, count=1, shape=Shape(gpus=gpus), priority=priority)


async def waiting_preemptor(eng: Engine, clock: ManualClock) -> tuple[Allocation, Allocation]:
    """`victim` holds GPUs 0-5; `preemptor` (8 GPUs, higher priority) was seen by a pass
    that could not preempt yet (the victim had not run 60 s). The queue is settled."""
    victim, _ = await eng.allocate(request(6), dry_run=False)
    assert victim.placements[0].gpu_indices == (0, 1, 2, 3, 4, 5)
    preemptor, _ = await eng.allocate(request(8, priority=5), dry_run=False)
    assert preemptor.state == AllocationState.PENDING
    await eng.schedule_now()
    assert eng.scheduling.settled
    clock.advance(61)
    return victim, preemptor


async def test_gpus_a_holder_frees_go_to_the_preemptor_waiting_for_them(
    engine: tuple[Engine, ManualClock],
) -> None:
    """A pass preempts the victim and sets GPUs 6 and 7 aside for the preemptor, but a
    quick decision took GPU 6 while the pass ran. When that allocation ends, GPU 6 goes
    to the set-aside (as a fresh build would give it), not to the next newcomer."""
    eng, clock = engine
    victim, preemptor = await waiting_preemptor(eng, clock)
    sched = eng.scheduling
    run = sched.runner.run
    early: list[Allocation] = []

    async def run_then_place(*args: Any) -> PassResult:
        result = await run(*args)
        if not early:  # decided on the snapshot; placed before the plan is applied
            early.append((await eng.allocate(request(1), dry_run=False))[0])
        return result

    sched.runner.run = run_then_place  # type: ignore[method-assign]
    assert sched._quick is not None
    view = sched._quick[0]
    await eng.schedule_now()
    assert sched._quick is not None and sched._quick[0] is view  # followed, not rebuilt
    [x] = early
    assert x.state == AllocationState.ALLOCATED and x.placements[0].gpu_indices == (6,)
    assert victim.state == AllocationState.PREEMPTED and victim.preempted_by == preemptor.id
    followed_as_built(eng)

    await eng.release(x.id)
    followed_as_built(eng)
    await eng.schedule_now()  # the preemptor still waits for the victim's grace
    assert sched.settled and preemptor.state == AllocationState.PENDING
    newcomer, _ = await eng.allocate(request(1), dry_run=False)
    assert newcomer.state == AllocationState.PENDING, newcomer.placements
    followed_as_built(eng)

    clock.advance(30)  # the grace ends
    eng.fire_timers()
    await eng.schedule_now()
    assert preemptor.state == AllocationState.ALLOCATED
    assert preemptor.placements[0].gpu_indices == tuple(range(8))
    followed_as_built(eng)


async def test_a_cancelled_preemptor_leaves_its_set_aside_to_the_queue(
    engine: tuple[Engine, ManualClock],
) -> None:
    """A preemptor cancelled while GPUs stand set aside for it: they are free again in the
    quick view, and the queue is unsettled, so the request that waited for them gets them
    from the next pass before any newcomer can."""
    eng, clock = engine
    _, preemptor = await waiting_preemptor(eng, clock)
    sched = eng.scheduling
    await eng.schedule_now()  # preempts the victim; GPUs 6 and 7 are set aside
    assert sched._asides is not None and sched._asides.owns(preemptor.id)
    waiter, _ = await eng.allocate(request(2), dry_run=False)
    assert waiter.state == AllocationState.PENDING
    assert sched.settled
    epoch = sched.epoch

    await eng.release(preemptor.id)
    assert preemptor.state == AllocationState.CANCELLED
    assert not sched._asides.owns(preemptor.id)
    followed_as_built(eng)
    assert sched.epoch > epoch  # unsettled: a newcomer that fits now waits for the pass
    await eng.schedule_now()
    assert waiter.state == AllocationState.ALLOCATED
    assert waiter.placements[0].gpu_indices == (6, 7)
    followed_as_built(eng)


async def test_holds_for_starving_gangs_move_in_place(tmp_path: Path) -> None:
    """A pass holds nodes for a starving gang, the gang is cancelled, the next pass holds
    for another: the quick view follows each (the same view, never rebuilt), and it
    holds what a fresh build would hold."""
    async with started(tmp_path, 2, starvation_seconds=10.0) as (eng, clock):
        sched = eng.scheduling
        for _ in range(2):
            busy, _ = await eng.allocate(request(6), dry_run=False)
            assert busy.state == AllocationState.ALLOCATED
        first, _ = await eng.allocate(request(4, tenant="g1"), dry_run=False)
        second, _ = await eng.allocate(request(4, tenant="g2"), dry_run=False)
        assert first.state == second.state == AllocationState.PENDING
        await eng.schedule_now()
        assert sched._quick is not None
        view = sched._quick[0]
        assert not view.holders

        clock.advance(11)  # both gangs starve; one may hold nodes at a time
        await eng.schedule_now()
        assert sched._quick is not None and sched._quick[0] is view
        assert set(view.holders) == {first.id}
        followed_as_built(eng)

        epoch = sched.epoch
        cancelling = asyncio.ensure_future(eng.release(first.id))
        await asyncio.sleep(0)  # the release has begun; no pass has run since
        assert first.state == AllocationState.CANCELLED
        assert not view.holders  # lifted at once, not by the next pass
        assert sched.epoch > epoch  # and the queue unsettled: the nodes may serve others
        followed_as_built(eng)
        await cancelling

        await eng.schedule_now()
        assert sched._quick is not None and sched._quick[0] is view
        assert set(view.holders) == {second.id}
        followed_as_built(eng)
