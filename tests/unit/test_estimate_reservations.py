"""Start-time estimates that see reservations: capacity reserved from a window's start
is not the queue's (only backfill ending by then may use it), and work naming a
reservation starts inside it once its window begins and leaves when it ends."""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rmgrpc.model import AllocationState, Placement, Reservation, ReservationState, Shape
from rmgrpc.scheduler.cycle import run_cycle
from rmgrpc.scheduler.estimate import Estimate, estimate_starts
from rmgrpc.scheduler.simulate import Simulator, apply_decisions, make_node
from rmgrpc.scheduler.snapshot import SchedulerConfig, Snapshot

CONFIG = SchedulerConfig(
    preemption_grace_seconds=0.0, min_runtime_seconds=0.0, max_preemptions_per_cycle=0
)


def booked(rid: str, node: str, gpus: tuple[int, ...], start: float, end: float) -> Reservation:
    return Reservation(
        id=rid,
        tenant="t",
        shape=Shape(gpus=len(gpus)),
        count=1,
        start_time=start,
        end_time=end,
        state=ReservationState.SCHEDULED,
        placements=(Placement(node, gpus),),
    )


class World:
    """A simulator whose passes see reservations (the simulator's own do not)."""

    def __init__(self, sim: Simulator, reservations: list[Reservation]) -> None:
        self.sim = sim
        self.reservations = {r.id: r for r in reservations}

    def snapshot(self) -> Snapshot:
        live = {k: r for k, r in self.reservations.items() if self.sim.now < r.end_time}
        return dataclasses.replace(self.sim.snapshot(), reservations=live)

    def _window_ends(self) -> None:
        """What the engine does when a window ends: work inside it expires, work still
        waiting for it is rejected."""
        sim = self.sim
        for aid in sorted(sim.allocations):
            a = sim.allocations[aid]
            r = self.reservations.get(a.reservation_id)
            if r is None or sim.now < r.end_time:
                continue
            a.state = (
                AllocationState.EXPIRED
                if a.state == AllocationState.ALLOCATED
                else AllocationState.REJECTED
            )
            sim.ended[aid] = sim.allocations.pop(aid)

    def step(self) -> dict[str, Estimate]:
        """One pass now, applied; the estimates made on it."""
        self._window_ends()
        snap = self.snapshot()
        decisions = run_cycle(snap)
        estimates = estimate_starts(snap, decisions, 100)
        sim = self.sim
        apply_decisions(sim.allocations, decisions, sim.now, sim.config, sim.nodes)
        return estimates

    def run_to_the_end(self) -> dict[str, float]:
        """Passes at every hard end and window start or end, earliest first, until
        nothing waits: when each allocation was placed."""
        sim = self.sim
        for _ in range(1_000):
            if not sim.pending():
                break
            times = [
                e
                for a in sim.allocations.values()
                if a.state == AllocationState.ALLOCATED and (e := a.max_end_time) is not None
            ]
            times += [
                t
                for r in self.reservations.values()
                for t in (r.start_time, r.end_time)
                if t > sim.now
            ]
            if not times:
                break
            sim.advance(min(times) - sim.now)
            self.step()
        every = {**sim.ended, **sim.allocations}
        return {aid: a.allocate_time for aid, a in every.items() if a.allocate_time is not None}


def test_reserved_capacity_and_work_inside_a_reservation_are_estimated() -> None:
    sim = Simulator([make_node("n0", 8)], config=CONFIG)
    now = sim.now
    busy = sim.submit("t", Shape(gpus=8), duration=10)
    sim.step()
    assert sim.allocations[busy.id].state == AllocationState.ALLOCATED
    world = World(sim, [booked("r1", "n0", tuple(range(8)), now + 50, now + 200)])
    big = sim.submit("u", Shape(gpus=8), duration=100).id  # would run into the window
    short = sim.submit("u", Shape(gpus=4), duration=40).id  # backfills: ends at +50
    inside = sim.submit("t", Shape(gpus=4), duration=100)
    inside.reservation_id = "r1"
    est = world.step()
    assert est[short].start_time == now + 10
    assert est[inside.id].start_time == now + 50
    assert "in reservation r1" in est[inside.id].reason
    assert est[big].start_time == now + 200  # the reservation's capacity comes back then
    assert "the end of reservation r1" in est[big].reason
    actual = world.run_to_the_end()
    for aid in (big, short, inside.id):
        assert est[aid].start_time == actual[aid], aid


def test_work_inside_a_reservation_leaves_when_its_window_ends() -> None:
    """Its hard end runs past the window: the capacity frees at the window's end."""
    sim = Simulator([make_node("n0", 8)], config=CONFIG)
    now = sim.now
    world = World(sim, [booked("r1", "n0", tuple(range(8)), now, now + 30)])
    inside = sim.submit("t", Shape(gpus=8), duration=1000)
    inside.reservation_id = "r1"
    world.step()
    assert sim.allocations[inside.id].state == AllocationState.ALLOCATED
    after = sim.submit("u", Shape(gpus=8), duration=10).id
    late = sim.submit("t", Shape(gpus=8), duration=10)
    late.reservation_id = "r1"
    gone = sim.submit("t", Shape(gpus=1), duration=10)
    gone.reservation_id = "r-cancelled"
    est = world.step()
    assert est[after].start_time == now + 30
    # Still waiting when the window ends: the engine rejects it then.
    assert est[late.id].start_time is None
    assert est[late.id].reason.startswith("unknown: reservation r1 ends at ")
    assert est[gone.id] == Estimate(None, "unknown: reservation r-cancelled is over or cancelled")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    nodes=st.lists(st.sampled_from([4, 8]), min_size=1, max_size=3),
    running=st.lists(
        st.tuples(st.integers(1, 8), st.sampled_from([0, 10, 25, 40, 70])), max_size=6
    ),
    windows=st.lists(
        st.tuples(st.integers(0, 2), st.integers(1, 4), st.sampled_from([0, 15, 30, 60])),
        max_size=3,
    ),
    waiting=st.lists(
        st.tuples(
            st.sampled_from(["t", "u"]),
            st.integers(1, 8),
            st.integers(1, 2),
            st.sampled_from([0, 10, 15, 30, 45, 100]),
            st.sampled_from(["", "r0", "r1", "r2"]),
        ),
        min_size=1,
        max_size=6,
    ),
    starvation=st.sampled_from([0.0, 1e9]),
)
@example(  # a gang naming a reservation gets no nodes held: it waits for its window
    nodes=[8],
    running=[(5, 10)],
    windows=[(0, 3, 0)],
    waiting=[("t", 2, 2, 0, "r0"), ("t", 1, 1, 0, "")],
    starvation=0.0,
)
@example(  # work waiting for its reservation gets no nodes held: it waits for the window
    nodes=[8],
    running=[],
    windows=[(0, 1, 60)],
    waiting=[("t", 1, 1, 0, ""), ("t", 1, 1, 0, ""), ("t", 1, 2, 0, "r0"), ("t", 3, 2, 0, "")],
    starvation=1e9,
)
@example(  # work still waiting when its window ends is rejected: no longer in the fair order
    nodes=[8],
    running=[],
    windows=[(0, 1, 0), (0, 3, 0)],
    waiting=[
        ("t", 1, 1, 0, ""),
        ("t", 1, 1, 0, "r0"),
        ("t", 3, 2, 0, "r0"),
        ("u", 6, 1, 0, ""),
        ("t", 2, 2, 0, ""),
    ],
    starvation=1e9,
)
@example(  # a pass indexes its view after withholding: best-fit ties go by node order
    nodes=[4, 4, 8],
    running=[(3, 10), (2, 0), (3, 10), (4, 25)],
    windows=[(0, 1, 0)],
    waiting=[("t", 1, 2, 0, ""), ("t", 1, 2, 0, ""), ("t", 4, 2, 0, "")],
    starvation=1e9,
)
def test_estimates_with_reservations_are_never_later_than_the_actual_start(
    nodes: list[int],
    running: list[tuple[int, int]],
    windows: list[tuple[int, int, int]],
    waiting: list[tuple[str, int, int, int, str]],
    starvation: float,
) -> None:
    """Random clusters, running work, reservations booked on GPUs free at their start
    (as accepted ones are) and a queue that names some of them; no new arrivals: every
    estimated start is a real start no later than the estimate, "unknown" never starts."""
    config = dataclasses.replace(CONFIG, starvation_seconds=starvation)
    sim = Simulator([make_node(f"n{i}", g) for i, g in enumerate(nodes)], config=config)
    now = sim.now
    for gpus, duration in running:
        sim.submit("run", Shape(gpus=gpus), duration=duration)
    sim.step()
    for a in list(sim.allocations.values()):
        if a.state == AllocationState.PENDING:
            del sim.allocations[a.id]
    # Book on GPUs nobody holds, each GPU for one window at most.
    taken = {
        (p.node_id, i)
        for a in sim.allocations.values()
        for p in a.placements
        for i in p.gpu_indices
    }
    reservations = []
    for k, (node, gpus, start) in enumerate(windows):
        nid = f"n{node % len(nodes)}"
        free = [i for i in range(nodes[node % len(nodes)]) if (nid, i) not in taken]
        if len(free) < gpus:
            continue
        pick = tuple(free[:gpus])
        taken.update((nid, i) for i in pick)
        reservations.append(booked(f"r{k}", nid, pick, now + start, now + start + 60))
    world = World(sim, reservations)
    ids = []
    for tenant, gpus, count, duration, rid in waiting:
        a = sim.submit(tenant, Shape(gpus=gpus), count, duration=duration)
        if rid in world.reservations and tenant == "t":
            a.reservation_id = rid
        ids.append(a.id)
    est = world.step()
    actual = world.run_to_the_end()
    for aid in ids:
        if aid not in est:
            continue  # placed by the pass itself
        e = est[aid]
        if e.start_time is None:
            assert aid not in actual, (aid, e)
        else:
            assert aid in actual and e.start_time <= actual[aid], (aid, e, actual.get(aid))
