"""The plan applier: decisions made on a snapshot are re-checked against the state as
it is at apply time (Nomad's plan applier), so a plan made on old data never holds a GPU
twice, lands on a node that went away, or revives a cancelled request."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from rmgrpc.model import Allocation, AllocationState, NodeState, Placement, Shape
from rmgrpc.scheduler.apply import apply_plan
from rmgrpc.scheduler.cycle import run_cycle
from rmgrpc.scheduler.simulate import make_node
from rmgrpc.scheduler.snapshot import Admission, Decisions, Preemption, SchedulerConfig, Snapshot
from rmgrpc.state import ClusterState

CONFIG = SchedulerConfig(min_runtime_seconds=0, preemption_grace_seconds=0)


def _state(nodes: int = 2, gpus: int = 4) -> ClusterState:
    state = ClusterState()
    for i in range(nodes):
        state.put_node(make_node(f"n{i}", gpus=gpus))
    return state


def _pending(state: ClusterState, aid: str, gpus: int, seq: int, **kw: object) -> Allocation:
    a = Allocation(
        id=aid, tenant="t", count=1, shape=Shape(gpus=gpus, cpu_millis=100), seq=seq, **kw
    )  # type: ignore[arg-type]
    state.add(a, 0.0)
    return a


def _placed(
    state: ClusterState, aid: str, node: str, gpus: tuple[int, ...], seq: int
) -> Allocation:
    a = Allocation(
        id=aid, tenant="t", count=1, shape=Shape(gpus=len(gpus), cpu_millis=100), seq=seq,
        state=AllocationState.ALLOCATED, placements=(Placement(node, gpus),), allocate_time=0.0,
    )  # fmt: skip
    state.add(a, 0.0)
    return a


def test_a_gpu_taken_since_the_snapshot_is_refused() -> None:
    state = _state()
    a = _pending(state, "a", 2, 1)
    plan = Decisions(admissions=[Admission("a", (Placement("n0", (0, 1)),))])
    _placed(state, "b", "n0", (1,), 2)  # placed between the snapshot and the apply
    applied = apply_plan(state, plan, 10.0, CONFIG)
    assert applied.placed == [] and applied.refused[0][0] == "a"
    assert a.state == AllocationState.PENDING and state.holders[("n0", 1)] == "b"


def test_a_node_cordoned_since_is_refused_and_a_cancelled_request_stays_ended() -> None:
    state = _state()
    _pending(state, "a", 1, 1)
    c = _pending(state, "c", 1, 2)
    plan = Decisions(
        admissions=[
            Admission("a", (Placement("n0", (0,)),)),
            Admission("c", (Placement("n1", (0,)),)),
        ]
    )
    state.nodes["n0"].state = NodeState.CORDONED
    c.state = AllocationState.CANCELLED
    state.free(c)
    applied = apply_plan(state, plan, 10.0, CONFIG)
    assert [r[0] for r in applied.refused] == ["a"]
    assert applied.placed == [] and c.state == AllocationState.CANCELLED
    assert state.holders == {}


def test_a_victim_is_spared_when_its_preemptor_is_gone() -> None:
    state = _state()
    v = _placed(state, "v", "n0", (0, 1, 2, 3), 1)
    p = _pending(state, "p", 4, 2, priority=5)
    plan = Decisions(
        preemptions=[Preemption("v", "p", "priority")],
        admissions=[Admission("p", (Placement("n0", (0, 1, 2, 3)),))],
    )
    p.state = AllocationState.CANCELLED
    state.free(p)
    applied = apply_plan(state, plan, 10.0, CONFIG)
    assert applied.preempted == [] and v.state == AllocationState.ALLOCATED


def test_quota_is_rechecked_when_asked() -> None:
    state = _state()
    _pending(state, "a", 1, 1)
    plan = Decisions(admissions=[Admission("a", (Placement("n0", (0,)),))])
    applied = apply_plan(state, plan, 10.0, CONFIG, quota_ok=lambda a, p: False)
    assert applied.placed == [] and applied.refused == [("a", "its tenant's quota changed")]


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.integers(1, 4), min_size=1, max_size=12),
    st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3)), max_size=6),
    st.sets(st.integers(0, 2), max_size=2),
    st.data(),
)
def test_a_stale_plan_never_holds_a_gpu_twice(
    sizes: list[int], meanwhile: list[tuple[int, int]], cordoned: set[int], data: st.DataObject
) -> None:
    """Property: whatever changed between the snapshot and the apply (GPUs taken by quick
    decisions, nodes cordoned, requests cancelled), every GPU has at most one holder and
    every placement applied sits on a READY node."""
    state = _state(nodes=3, gpus=4)
    for i, g in enumerate(sizes):
        _pending(state, f"p{i}", g, i + 1)
    snap = Snapshot(
        now=10.0,
        nodes={k: dataclasses.replace(n) for k, n in state.nodes.items()},
        allocations={k: dataclasses.replace(a) for k, a in state.live.items()},
        quotas={},
        config=CONFIG,
    )
    plan = run_cycle(snap)
    seq = 100
    for node, gpu in meanwhile:
        if (f"n{node}", gpu) not in state.holders:
            seq += 1
            _placed(state, f"q{seq}", f"n{node}", (gpu,), seq)
    for n in cordoned:
        state.nodes[f"n{n}"].state = NodeState.CORDONED
    for a in list(state.live.values()):
        if a.state == AllocationState.PENDING and data.draw(st.booleans()):
            a.state = AllocationState.CANCELLED
            state.free(a)
    apply_plan(state, plan, 10.0, CONFIG)
    seen: dict[tuple[str, int], str] = {}
    for a in state.live.values():
        if a.state != AllocationState.ALLOCATED:
            continue
        for p in a.placements:
            for i in p.gpu_indices:
                assert (p.node_id, i) not in seen, f"GPU {p.node_id}/{i} held twice"
                seen[(p.node_id, i)] = a.id
            if a.id.startswith("p"):
                assert state.nodes[p.node_id].state == NodeState.READY
    assert seen == state.holders
