"""The pure reservation core: booking a window against what occupies capacity over time,
and the earliest window that fits. Scenario tests, then properties (hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from rmgrpc.model import (
    Allocation,
    AllocationState,
    Gpu,
    Node,
    NodeState,
    Placement,
    Reservation,
    ReservationState,
    Shape,
)
from rmgrpc.scheduler import Snapshot, run_cycle
from rmgrpc.scheduler import reservations as core

H = 3600.0


def node(node_id: str, gpus: int = 8, model: str = "H100", **labels: str) -> Node:
    return Node(
        id=node_id,
        cpu_millis=64_000,
        memory_bytes=512 << 30,
        labels=dict(labels),
        gpus=[Gpu(i, f"{node_id}-{i}", model, 80 << 30) for i in range(gpus)],
    )


def nodes(*ns: Node) -> dict[str, Node]:
    return {n.id: n for n in ns}


def running(aid: str, node_id: str, gpus: tuple[int, ...], max_end: float | None) -> Allocation:
    return Allocation(
        id=aid,
        tenant="t",
        count=1,
        shape=Shape.of(gpus=len(gpus)),
        state=AllocationState.ALLOCATED,
        placements=(Placement(node_id, gpus),),
        max_end_time=max_end,
    )


def booked(rid: str, node_id: str, gpus: tuple[int, ...], start: float, end: float) -> Reservation:
    return Reservation(
        id=rid,
        tenant="t",
        shape=Shape.of(gpus=len(gpus)),
        count=1,
        start_time=start,
        end_time=end,
        placements=(Placement(node_id, gpus),),
    )


def test_books_whole_gang_best_fit_first() -> None:
    cluster = nodes(node("a"), node("b"))
    # Node b has 4 GPUs occupied for ever: a 4-GPU booking fills b's remaining 4 first.
    busy = core.occupied([running("x", "b", (0, 1, 2, 3), None)], [], 0.0)
    b = core.book(cluster, busy, Shape.of(gpus=4), 1, H, 2 * H)
    assert b.placements == (Placement("b", (4, 5, 6, 7)),)
    # 3 x 4 GPUs: b's 4 and a's 8.
    b = core.book(cluster, busy, Shape.of(gpus=4), 3, H, 2 * H)
    assert sorted(p.node_id for p in b.placements) == ["a", "a", "b"]
    # 4 x 4 do not fit: nothing is booked and the conflict is named.
    b = core.book(cluster, busy, Shape.of(gpus=4), 4, H, 2 * H)
    assert not b.ok and b.conflicts == ("allocation:x",)


def test_hard_end_frees_capacity_and_no_hard_end_never_does() -> None:
    cluster = nodes(node("a"))
    ends = core.occupied([running("x", "a", tuple(range(8)), 2 * H)], [], 0.0)
    assert not core.book(cluster, ends, Shape.of(gpus=8), 1, H, 3 * H).ok
    assert core.book(cluster, ends, Shape.of(gpus=8), 1, 2 * H, 3 * H).ok  # half-open
    assert core.earliest_window(cluster, ends, Shape.of(gpus=8), 1, H, 2 * H) == (
        2 * H,
        core.Booking(placements=(Placement("a", tuple(range(8))),)),
    )
    forever = core.occupied([running("y", "a", tuple(range(8)), None)], [], 0.0)
    assert not core.book(cluster, forever, Shape.of(gpus=8), 1, 100 * H, 101 * H).ok
    assert core.earliest_window(cluster, forever, Shape.of(gpus=8), 1, H, H) is None


def test_reservations_conflict_only_when_windows_overlap() -> None:
    cluster = nodes(node("a"))
    busy = core.occupied([], [booked("r1", "a", tuple(range(8)), H, 3 * H)], 0.0)
    shape = Shape.of(gpus=1)
    assert not core.book(cluster, busy, shape, 1, 2 * H, 4 * H).ok
    assert core.book(cluster, busy, shape, 1, 0.0, H).ok
    assert core.book(cluster, busy, shape, 1, 3 * H, 4 * H).ok
    start, _ = core.earliest_window(cluster, busy, shape, 1, 2 * H, 2 * H) or (None, None)
    assert start == 3 * H
    # A cancelled or ended reservation occupies nothing.
    gone = booked("r2", "a", tuple(range(8)), H, 3 * H)
    gone.state = ReservationState.CANCELLED
    assert core.occupied([], [gone], 0.0) == []


def test_filters_selector_model_state_health() -> None:
    sick = node("c", zone="x")
    sick.gpus[0].cordoned = True
    cluster = nodes(node("a", zone="x", model="A100"), node("b", zone="y"), sick)
    cluster["b"].state = NodeState.CORDONED
    h100_x = Shape.of(gpus=8, gpu_model="H100", node_selector={"zone": "x"})
    b = core.book(cluster, [], h100_x, 1, H, 2 * H)
    assert b.never  # a's GPUs are A100, b is cordoned, c has only 7 usable H100
    b = core.book(cluster, [], Shape.of(gpus=7, gpu_model="H100"), 1, H, 2 * H)
    assert b.placements == (Placement("c", (1, 2, 3, 4, 5, 6, 7)),)
    assert core.earliest_window(cluster, [], h100_x, 1, H, H) is None


def test_allocations_inside_a_reservation_are_counted_by_it() -> None:
    inside = running("x", "a", (0,), None)
    inside.reservation_id = "r1"
    assert core.occupied([inside], [], 0.0) == []


def test_preempted_victim_occupies_until_grace_end() -> None:
    victim = running("v", "a", (0, 1), None)
    victim.state = AllocationState.PREEMPTED
    victim.grace_end_time = 30.0
    (b,) = core.occupied([victim], [], 0.0)
    assert (b.start, b.end) == (0.0, 30.0)
    assert core.occupied([victim], [], 30.0) == []


# -- properties ----------------------------------------------------------------------

_items = st.lists(
    st.tuples(
        st.sampled_from(["a", "b"]),
        st.integers(0, 7),  # first GPU
        st.integers(1, 4),  # GPUs
        st.integers(0, 20),  # start (hours)
        st.integers(1, 10),  # length (hours)
        st.booleans(),  # an allocation (from 0, to start+length or forever) or a booking
        st.booleans(),  # an allocation with no hard end
    ),
    max_size=8,
)


def _busy(items: list[tuple[str, int, int, int, int, bool, bool]]) -> list[core.Busy]:
    out = []
    for i, (nid, first, n, start, length, is_alloc, forever) in enumerate(items):
        gpus = tuple(range(first, min(8, first + n)))
        if is_alloc:
            end = core.FOREVER if forever else (start + length) * H
            out.append(core.Busy(f"allocation:{i}", nid, gpus, 0, 0, 0.0, end))
        else:
            out.append(
                core.Busy(f"reservation:{i}", nid, gpus, 0, 0, start * H, (start + length) * H)
            )
    return out


@settings(max_examples=150, deadline=None)
@given(_items, st.integers(1, 8), st.integers(1, 3), st.integers(0, 24), st.integers(1, 8))
def test_a_booking_never_overlaps_what_occupies_its_window(
    items: list[tuple[str, int, int, int, int, bool, bool]],
    gpus: int,
    count: int,
    start_h: int,
    length_h: int,
) -> None:
    cluster = nodes(node("a"), node("b"))
    busy = _busy(items)
    start, end = start_h * H, (start_h + length_h) * H
    b = core.book(cluster, busy, Shape.of(gpus=gpus), count, start, end)
    if not b.ok:
        return
    assert len(b.placements) == count
    taken = [(p.node_id, i) for p in b.placements for i in p.gpu_indices]
    assert len(taken) == len(set(taken)) == gpus * count  # no GPU booked twice
    for x in busy:
        if x.overlaps(start, end):
            assert not {(x.node_id, i) for i in x.gpu_indices} & set(taken)


@settings(max_examples=150, deadline=None)
@given(_items, st.integers(1, 8), st.integers(1, 3), st.integers(0, 24), st.integers(1, 8))
def test_earliest_window_fits_and_nothing_earlier_does(
    items: list[tuple[str, int, int, int, int, bool, bool]],
    gpus: int,
    count: int,
    start_h: int,
    length_h: int,
) -> None:
    cluster = nodes(node("a"), node("b"))
    busy = _busy(items)
    shape, start, length = Shape.of(gpus=gpus), start_h * H, length_h * H
    found = core.earliest_window(cluster, busy, shape, count, start, length)
    # Every whole hour from the start up to the answer (or a day past every end) is
    # refused: the candidates the core tries are the only starts where things change.
    last = max([x.end for x in busy if x.end < core.FOREVER], default=0.0) + 24 * H
    stop = found[0] if found is not None else last
    t = start
    while t < stop:
        assert not core.book(cluster, busy, shape, count, t, t + length).ok, t
        t += H
    if found is not None:
        at, booking = found
        assert at >= start and booking.ok
        assert core.book(cluster, busy, shape, count, at, at + length) == booking


# -- in a scheduling pass ------------------------------------------------------------

NOW = 1_000_000.0


def pending(
    aid: str, gpus: int, max_duration: int = 0, reservation_id: str = "", seq: int = 1
) -> Allocation:
    return Allocation(
        id=aid,
        tenant="org/a",
        count=1,
        shape=Shape.of(gpus=gpus),
        max_duration_seconds=max_duration,
        reservation_id=reservation_id,
        seq=seq,
        create_time=NOW,
    )


def _pass(allocs: list[Allocation], *reservations: Reservation) -> dict[str, tuple[Placement, ...]]:
    snap = Snapshot(
        now=NOW,
        nodes=nodes(node("a"), node("b")),
        allocations={a.id: a for a in allocs},
        quotas={},
        reservations={r.id: r for r in reservations},
    )
    decisions = run_cycle(snap)
    return {adm.allocation_id: adm.placements for adm in decisions.admissions}


def test_pass_keeps_reserved_capacity_for_the_reservation() -> None:
    r = booked("r1", "a", tuple(range(8)), NOW + H, NOW + 2 * H)
    busy_b = running("x", "b", tuple(range(8)), None)
    # No hard end: never on the reserved node, even an hour before the window.
    assert _pass([busy_b, pending("p", 8)], r) == {}
    # The window has begun: nothing ordinary may take it, however short.
    active = booked("r1", "a", tuple(range(8)), NOW - 1, NOW + H)
    active.state = ReservationState.ACTIVE
    assert _pass([busy_b, pending("p", 8, max_duration=10)], active) == {}
    # Work naming it runs inside it, and only there.
    got = _pass([busy_b, pending("in", 4, reservation_id="r1")], active)
    assert got == {"in": (Placement("a", (0, 1, 2, 3)),)}
    # Before its window, work naming it waits.
    assert _pass([busy_b, pending("in", 4, reservation_id="r1")], r) == {}


def test_backfill_one_second_either_side_of_the_start() -> None:
    r = booked("r1", "a", tuple(range(8)), NOW + H, NOW + 2 * H)
    busy_b = running("x", "b", tuple(range(8)), None)
    before = pending("short", 8, max_duration=int(H) - 1)
    after = pending("long", 8, max_duration=int(H) + 1, seq=0)  # first in the queue
    got = _pass([busy_b, after, before], r)
    assert set(got) == {"short"} and got["short"][0].node_id == "a"
    # Ending exactly at the start is fine: the window is half-open.
    assert set(_pass([busy_b, pending("edge", 8, max_duration=int(H))], r)) == {"edge"}


def test_backfill_leaves_the_rest_reserved() -> None:
    r = booked("r1", "a", tuple(range(8)), NOW + H, NOW + 2 * H)
    busy_b = running("x", "b", tuple(range(8)), None)
    got = _pass([busy_b, pending("short", 2, max_duration=60), pending("forever", 2, seq=2)], r)
    assert set(got) == {"short"}  # the forever one may not use the other 6


_requests = st.lists(
    st.tuples(
        st.integers(1, 8),  # GPUs
        st.sampled_from([0, 60, int(H) - 1, int(H), int(H) + 1, int(3 * H)]),  # max duration
        st.sampled_from(["", "r1", "r2"]),  # reservation named
    ),
    max_size=10,
)


@settings(max_examples=150, deadline=None)
@given(_requests, st.integers(-1, 2), st.integers(1, 8), st.integers(0, 8))
def test_a_pass_never_breaks_a_reservation(
    requests: list[tuple[int, int, str]], start_h: int, r1_gpus: int, r2_gpus: int
) -> None:
    """Whatever is pending, a pass places work on reserved GPUs only inside its own
    reservation during the window, or as backfill that ends by the start."""
    r1 = booked("r1", "a", tuple(range(r1_gpus)), NOW + start_h * H, NOW + (start_h + 2) * H)
    r2 = booked("r2", "b", tuple(range(8 - r2_gpus, 8)), NOW + H, NOW + 4 * H)
    if r1.start_time <= NOW:
        r1.state = ReservationState.ACTIVE
    allocs = [
        pending(f"p{i}", gpus, max_duration=d, reservation_id=rid, seq=i + 1)
        for i, (gpus, d, rid) in enumerate(requests)
    ]
    placed = _pass(allocs, r1, r2)
    reserved = core.Reserved({"r1": r1, "r2": r2}, nodes(node("a"), node("b")), [], NOW)
    by_id = {a.id: a for a in allocs}
    taken: set[tuple[str, int]] = set()
    for aid, placements in placed.items():
        a = by_id[aid]
        assert reserved.conflict(a, placements) is None, (aid, placements)
        for p in placements:
            for i in p.gpu_indices:
                assert (p.node_id, i) not in taken
                taken.add((p.node_id, i))
        if a.reservation_id:
            r = r1 if a.reservation_id == "r1" else r2
            assert r.start_time <= NOW  # only inside the window
