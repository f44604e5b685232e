"""The read model's indexes agree with a brute-force scan, whatever the history."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from rmgrpc.model import Allocation, AllocationState, Placement, Shape
from rmgrpc.scheduler.simulate import make_node
from rmgrpc.state import ClusterState, in_subtree

TENANTS = ["org", "org/a", "org/ab", "org2", "org/a/x"]


def test_subtree_never_matches_a_sibling_prefix() -> None:
    assert in_subtree("org/a", "org") and in_subtree("org/a/x", "org/a")
    assert not in_subtree("org/ab", "org/a") and not in_subtree("org2", "org")
    assert in_subtree("anything", "")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(TENANTS), st.integers(0, 3), st.integers(0, 2)), max_size=40)
)
def test_indexes_match_a_scan(ops: list[tuple[str, int, int]]) -> None:
    state = ClusterState()
    for n in ("n0", "n1"):
        state.put_node(make_node(n, gpus=4))
    seq = 0
    free_gpus = {("n0", i) for i in range(4)} | {("n1", i) for i in range(4)}
    for tenant, gpus, action in ops:
        live = list(state.live.values())
        if action == 0 or not live:
            seq += 1
            chosen = sorted(free_gpus)[:gpus] if gpus and len(free_gpus) >= gpus else []
            node = chosen[0][0] if chosen else "n0"
            chosen = [c for c in chosen if c[0] == node]
            a = Allocation(
                id=f"a{seq}", tenant=tenant, count=1, shape=Shape(gpus=len(chosen), cpu_millis=100),
                seq=seq,
            )  # fmt: skip
            if chosen:
                a.state = AllocationState.ALLOCATED
                a.placements = (Placement(node, tuple(i for _, i in chosen)),)
                free_gpus -= set(chosen)
            state.add(a, 0.0)
        elif action == 1:
            a = live[gpus % len(live)]
            for p in a.placements:
                free_gpus |= {(p.node_id, i) for i in p.gpu_indices}
            a.state = AllocationState.RELEASED
            state.free(a)
        else:
            ended = [x for x in state.allocations.values() if x.state.terminal]
            if ended:
                state.forget(ended[0])
        # holders and per-node totals
        held = [a for a in state.live.values() if a.state == AllocationState.ALLOCATED]
        assert [a.id for a in state.holding()] == [a.id for a in held if a.placements]
        assert set(state.holders) == {
            (p.node_id, i) for a in held for p in a.placements for i in p.gpu_indices
        }
        for n in ("n0", "n1"):
            want = sum(len(p.gpu_indices) for a in held for p in a.placements if p.node_id == n)
            assert state.totals_of(n).gpus == want
            assert {a.id for a in state.on_node(n)} == {
                a.id for a in held if any(p.node_id == n for p in a.placements)
            }
        # creation order and subtrees
        everything = sorted(state.allocations.values(), key=lambda a: a.seq)
        assert [a.id for a in state.in_order()] == [a.id for a in everything]
        mid = everything[len(everything) // 2].seq if everything else 0
        assert [a.id for a in state.in_order(mid)] == [a.id for a in everything if a.seq > mid]
        for root in TENANTS:
            assert [a.id for a in state.of_subtree(root)] == [
                a.id for a in everything if in_subtree(a.tenant, root)
            ]
        assert set(state.frozen) == set(state.live)
