"""Placement: filters and their counters, bin-packing, the index, statements, holds."""

from __future__ import annotations

from collections.abc import Iterable

from rmgrpc.model import Allocation, AllocationState, GpuHealth, Node, NodeState, Placement, Shape
from rmgrpc.scheduler.placement import (
    FILTERS,
    CapacityView,
    ReplicaRequest,
    feasible,
    memory_text,
    nodes_to_hold,
    place_gang,
    shape_text,
)
from rmgrpc.scheduler.simulate import GIB, make_node


def view_of(*nodes: Node, holding: Iterable[Allocation] = ()) -> CapacityView:
    return CapacityView({n.id: n for n in nodes}, holding)


def placed(aid: str, node: str, gpus: tuple[int, ...], cpu: int = 0, mem: int = 0) -> Allocation:
    return Allocation(
        id=aid,
        tenant="t",
        count=1,
        shape=Shape.of(len(gpus), cpu_millis=cpu, memory_bytes=mem),
        state=AllocationState.ALLOCATED,
        placements=(Placement(node, gpus),),
        allocate_time=0.0,
    )


def gpus_on(placements: tuple[Placement, ...] | None) -> list[tuple[str, tuple[int, ...]]]:
    assert placements is not None
    return [(p.node_id, p.gpu_indices) for p in placements]


class TestFilters:
    def test_chain_order_and_names(self) -> None:
        names = [name for name, _ in FILTERS]
        assert names == [
            "node_ready",
            "not_held",
            "selector",
            "gpu_model",
            "gpus_free",
            "cpu",
            "memory",
        ]

    def test_each_filter_rejects_with_its_counter(self) -> None:
        cordoned = make_node("c", state=NodeState.CORDONED)
        assert feasible(view_of(cordoned).nodes["c"], ReplicaRequest(Shape.of(1))) == "cordoned"
        n = view_of(make_node("n", 8, "A100", labels={"zone": "b"})).nodes["n"]
        assert (
            feasible(n, ReplicaRequest(Shape.of(1, node_selector={"zone": "a"})))
            == "lack label zone=a"
        )
        assert feasible(n, ReplicaRequest(Shape.of(1, "H100"))) == "have no H100 GPUs"
        # A node that is simply too small is not blamed on GPU health (issue 9).
        assert (
            feasible(n, ReplicaRequest(Shape.of(9, "A100")))
            == "have fewer than 9 A100 GPUs in total"
        )
        assert feasible(n, ReplicaRequest(Shape.of(0, cpu_millis=100_000))) == (
            "have less than 100 CPU in total"
        )
        assert feasible(n, ReplicaRequest(Shape.of(8, "A100"))) is None

    def test_free_gpus_cpu_and_memory_after_holding(self) -> None:
        node = make_node("n", 8, cpu_millis=10_000, memory_bytes=10 * GIB)
        v = view_of(node, holding=[placed("x", "n", (0, 1, 2, 3, 4), 9_000, 9 * GIB)])
        n = v.nodes["n"]
        assert feasible(n, ReplicaRequest(Shape.of(4))) == "have fewer than 4 free GPUs"
        assert feasible(n, ReplicaRequest(Shape.of(3, cpu_millis=2000))) == "lack 2 CPU free"
        assert feasible(n, ReplicaRequest(Shape.of(3, memory_bytes=2 * GIB))) == (
            f"lack {memory_text(2 * GIB)} free"
        )
        assert feasible(n, ReplicaRequest(Shape.of(3, cpu_millis=1000))) is None

    def test_unhealthy_gpus_are_never_placed(self) -> None:
        node = make_node("n", 2)
        node.gpus[0].health = GpuHealth.UNHEALTHY
        v = view_of(node)
        assert gpus_on(v.place_gang(Shape.of(1), 1)) == [("n", (1,))]
        assert v.place_gang(Shape.of(1), 1) is None
        assert v.explain(Shape.of(1), 1).counters == {"have no free GPU": 1}


class TestBinPacking:
    def test_small_requests_pack_onto_one_node_leaving_a_whole_node(self) -> None:
        v = view_of(make_node("n1"), make_node("n2"))
        for _ in range(4):
            assert v.place_gang(Shape.of(1), 1) is not None
        assert {p.node_id for p in v.place_gang(Shape.of(1), 3) or ()} == {"n1"}
        assert gpus_on(v.place_gang(Shape.of(8), 1))[0][0] == "n2"

    def test_prefers_the_node_it_fills_best(self) -> None:
        v = view_of(
            make_node("a"),
            make_node("b"),
            make_node("c"),
            holding=[placed("x", "b", (0, 1, 2, 3, 4, 5)), placed("y", "c", (0, 1, 2, 3))],
        )
        # b has 2 free, c has 4 free: a 2-GPU request fills b exactly.
        assert gpus_on(v.place_gang(Shape.of(2), 1)) == [("b", (6, 7))]
        # Next best fit for 3: c (4 free) rather than the empty a.
        assert gpus_on(v.place_gang(Shape.of(3), 1)) == [("c", (4, 5, 6))]

    def test_cpu_tiebreak_packs_the_fuller_node(self) -> None:
        v = view_of(
            make_node("a", cpu_millis=64_000),
            make_node("b", cpu_millis=64_000),
            holding=[placed("x", "b", (), 32_000)],
        )
        assert gpus_on(v.place_gang(Shape.of(1, cpu_millis=1000), 1))[0][0] == "b"

    def test_replica_gpus_stay_on_one_node_and_gangs_spread(self) -> None:
        v = view_of(make_node("a", 4), make_node("b", 4))
        assert v.place_gang(Shape.of(5), 1) is None
        got = gpus_on(v.place_gang(Shape.of(4), 2))
        assert sorted(got) == [("a", (0, 1, 2, 3)), ("b", (0, 1, 2, 3))]

    def test_gang_is_all_or_nothing(self) -> None:
        v = view_of(make_node("a", 8), make_node("b", 8), holding=[placed("x", "b", (0,))])
        assert v.place_gang(Shape.of(8), 2) is None
        # Nothing was taken by the failed attempt.
        assert v.nodes["a"].free_count("H100") == 8
        assert v.nodes["b"].free_count("H100") == 7

    def test_gpu_model_and_selector(self) -> None:
        v = view_of(
            make_node("a", 8, "A100", labels={"zone": "a"}),
            make_node("b", 8, "H100", labels={"zone": "b"}),
            make_node("c", 8, "H100", labels={"zone": "a"}),
        )
        got = v.place_gang(Shape.of(2, "H100", node_selector={"zone": "a"}), 1)
        assert gpus_on(got) == [("c", (0, 1))]
        assert gpus_on(v.place_gang(Shape.of(8, "A100"), 1)) == [("a", tuple(range(8)))]
        assert v.place_gang(Shape.of(1, "A100"), 1) is None

    def test_modelless_replica_takes_one_model(self) -> None:
        node = make_node("m", 4, "A100")
        node.gpus += [
            type(node.gpus[0])(index=4 + i, uuid=f"m-h{i}", model="H100", memory_bytes=0)
            for i in range(2)
        ]
        v = view_of(node)
        assert gpus_on(v.place_gang(Shape.of(2), 1)) == [("m", (4, 5))]  # best fit: H100 x2
        assert v.place_gang(Shape.of(3), 1) is not None  # three A100
        assert v.place_gang(Shape.of(2), 1) is None  # one A100 left, no H100
        assert v.place_gang(Shape.of(1), 1, models=("H100",)) is None

    def test_cpu_only_prefers_nodes_without_free_gpus(self) -> None:
        v = view_of(make_node("a"), make_node("b"), make_node("cpu", 0))
        assert gpus_on(v.place_gang(Shape.of(0, cpu_millis=1000), 1)) == [("cpu", ())]
        v2 = view_of(make_node("a"), make_node("b"), holding=[placed("x", "b", tuple(range(8)))])
        assert gpus_on(v2.place_gang(Shape.of(0, cpu_millis=1000), 1)) == [("b", ())]

    def test_cordoned_nodes_take_no_work_but_their_holders_count(self) -> None:
        v = view_of(make_node("a", state=NodeState.DRAINING), make_node("b"))
        got = v.place_gang(Shape.of(8), 1)
        assert gpus_on(got)[0][0] == "b"
        assert v.place_gang(Shape.of(1), 1) is None


class TestIndexAndMemo:
    def test_index_scan_is_bounded(self) -> None:
        nodes = [make_node(f"n{i:03d}") for i in range(200)]
        v = view_of(*nodes)
        for _ in range(100):
            assert v.place_gang(Shape.of(1), 1) is not None
        # Best fit walks only the fullest bucket: a few nodes per request, not 200.
        assert v.visited < 100 * 10

    def test_no_fit_is_remembered_until_capacity_grows(self) -> None:
        a = placed("x", "n", tuple(range(8)))
        v = view_of(make_node("n"), holding=[a])
        assert v.place_gang(Shape.of(1), 1) is None
        visited = v.visited
        assert v.place_gang(Shape.of(1), 1) is None
        assert v.visited == visited  # answered from memory
        v.release(a)
        assert v.place_gang(Shape.of(1), 1) is not None

    def test_statement_discard_restores_everything(self) -> None:
        a = placed("x", "n", (0, 1, 2, 3), 4000, 4 * GIB)
        v = view_of(make_node("n"), holding=[a])
        before = (v.nodes["n"].free["H100"][:], v.nodes["n"].cpu_free, v.nodes["n"].mem_free)
        assert v.place_gang(Shape.of(8), 1) is None
        st = v.statement()
        v.release(a)
        inner = v.statement()
        assert v.place_gang(Shape.of(8), 1) is not None
        inner.discard()
        assert v.nodes["n"].free_count("H100") == 8
        st.discard()
        after = (v.nodes["n"].free["H100"][:], v.nodes["n"].cpu_free, v.nodes["n"].mem_free)
        assert after == before
        # What was known not to fit before the trial is known again after it.
        visited = v.visited
        assert v.place_gang(Shape.of(8), 1) is None
        assert v.visited == visited

    def test_statement_commit_keeps_changes(self) -> None:
        v = view_of(make_node("n"))
        st = v.statement()
        assert place_gang(v, Shape.of(3), 1) is not None
        st.commit()
        assert v.nodes["n"].free_count("H100") == 5
        assert v.fits(Shape.of(5), 1)
        assert v.nodes["n"].free_count("H100") == 5


class TestExplain:
    def test_counters_name_every_reason(self) -> None:
        nodes = [make_node(f"f{i:02d}", labels={"zone": "a"}) for i in range(12)]
        nodes += [
            make_node(f"c{i}", labels={"zone": "a"}, state=NodeState.CORDONED) for i in (0, 1)
        ]
        nodes += [make_node(f"z{i}", labels={"zone": "b"}) for i in (0, 1)]
        holding = [placed(f"x{i}", f"f{i:02d}", tuple(range(5))) for i in range(12)]
        v = view_of(*nodes, holding=holding)
        shape = Shape.of(4, "H100", node_selector={"zone": "a"})
        assert v.place_gang(shape, 1) is None
        ex = v.explain(shape, 1)
        assert ex.counters == {
            "have fewer than 4 free H100 GPUs": 12,
            "cordoned": 2,
            "lack label zone=a": 2,
        }
        assert ex.text() == (
            "no node with 4 free H100 GPUs (zone=a): 16 nodes: 12 have fewer than 4 free "
            "H100 GPUs, 2 cordoned, 2 lack label zone=a"
        )

    def test_gang_room_is_reported(self) -> None:
        v = view_of(make_node("a"), make_node("b"), holding=[placed("x", "b", (0,))])
        ex = v.explain(Shape.of(8), 2)
        assert ex.fitting_nodes == 1 and ex.replica_room == 1
        assert ex.text().startswith("room for only 1 of 2 replicas of 8 GPUs")

    def test_no_nodes(self) -> None:
        assert view_of().explain(Shape.of(1), 1).text() == "no nodes are registered"

    def test_shape_text(self) -> None:
        s = Shape.of(4, "H100", 16_000, 64 * GIB, {"zone": "a"})
        assert shape_text(s) == "4 H100 GPUs, 16 CPU, 64 GiB memory (zone=a)"


class TestHolds:
    def test_held_nodes_refuse_others_but_not_the_gang(self) -> None:
        v = view_of(make_node("a"), make_node("b"))
        v.hold(["a"], "gang", priority=0)
        assert gpus_on(v.place_gang(Shape.of(8), 1, owner="other"))[0][0] == "b"
        assert v.place_gang(Shape.of(1), 1, owner="other") is None
        assert "1 held for starving gang gang" in v.explain(Shape.of(1), 1, owner="x").text()
        # Higher priority than the gang may still use it.
        assert v.place_gang(Shape.of(1), 1, owner="urgent", priority=5) is not None
        assert v.place_gang(Shape.of(7), 1, owner="gang") is not None

    def test_a_second_hold_is_explained_and_placed_alike(self) -> None:
        v = view_of(make_node("a"), make_node("b"), make_node("c"))
        v.hold(["a"], "gang", priority=0)
        assert v.explain(Shape.of(8), 3).counters == {"held for starving gang gang": 1}
        # The same gang now holds two nodes: both the reason and the placer see it.
        v.hold(["a", "b"], "gang", priority=0)
        ex = v.explain(Shape.of(8), 2)
        assert ex.counters == {"held for starving gang gang": 2}
        assert ex.fitting_nodes == 1
        assert v.place_gang(Shape.of(8), 2) is None
        assert gpus_on(v.place_gang(Shape.of(8), 1))[0][0] == "c"

    def test_nodes_to_hold_prefers_free_and_soon_free_nodes(self) -> None:
        busy_forever = placed("x", "a", (0, 1))
        ends_soon = placed("y", "b", (0, 1, 2, 3, 4, 5))
        ends_soon.max_end_time = 500.0
        v = view_of(
            make_node("a"),
            make_node("b"),
            make_node("c"),
            make_node("d", 4),
            holding=[busy_forever, ends_soon],
        )
        assert nodes_to_hold(v, Shape.of(8), 2, owner="g") == ("c", "b")
        assert nodes_to_hold(v, Shape.of(8), 4, owner="g") is None
