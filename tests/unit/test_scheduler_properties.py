"""Properties of the scheduler over random clusters and request streams (hypothesis).

Each example builds a cluster and quotas, then runs a stream of steps (submissions,
time passing, work finishing, nodes cordoned, GPUs failing), applying every cycle's
decisions to the simulator's own copies, and checks after each cycle that:

- no GPU is in two live allocations, and no node's CPU or memory is over capacity;
- no tenant, nor any ancestor, holds more than its limit;
- gangs are whole: count replicas, each on one READY node that matches the shape;
- no victim ran less than the minimum runtime; at most max_preemptions per cycle;
- every pending allocation has a reason and positions are 1..n;
- the same snapshot gives the same decisions; dry_run changes nothing.

Plus: a tenant under its guarantee gets it within one cycle (preempting borrowers), and
two tenants flooding the cluster converge to within one GPU of their weighted fair share.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rmgrpc.model import (
    Allocation,
    AllocationState,
    GpuHealth,
    NodeState,
    Quota,
    Resources,
    Shape,
)
from rmgrpc.scheduler.cycle import dry_run, run_cycle
from rmgrpc.scheduler.fairshare import Ledger, TenantTree
from rmgrpc.scheduler.simulate import GIB, Simulator, apply_decisions, make_node
from rmgrpc.scheduler.snapshot import Decisions, SchedulerConfig

SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

TENANTS = ("a", "b", "org/x", "org/y")
MODELS = ("H100", "A100")


# ---------------------------------------------------------------------------------------
# Strategies.


@st.composite
def clusters(draw: st.DrawFn) -> list:  # type: ignore[type-arg]
    n = draw(st.integers(1, 6))
    nodes = []
    for i in range(n):
        node = make_node(
            f"n{i}",
            draw(st.sampled_from((0, 2, 4, 8, 8))),
            draw(st.sampled_from(MODELS)),
            cpu_millis=draw(st.sampled_from((8_000, 32_000))),
            memory_bytes=draw(st.sampled_from((64, 256))) * GIB,
            labels={"zone": draw(st.sampled_from("ab"))},
            state=draw(
                st.sampled_from((NodeState.READY,) * 5 + (NodeState.CORDONED, NodeState.DOWN))
            ),
        )
        if node.gpus and draw(st.integers(0, 5)) == 0:
            node.gpus[draw(st.integers(0, len(node.gpus) - 1))].health = GpuHealth.UNHEALTHY
        nodes.append(node)
    return nodes


def maybe(draw: st.DrawFn, values: st.SearchStrategy[int]) -> int | None:
    return draw(st.one_of(st.none(), values))


@st.composite
def quota_sets(draw: st.DrawFn) -> list[Quota]:
    out = []
    for t in ("a", "b", "org", "org/x"):
        if draw(st.booleans()):
            continue
        limit = Resources(
            gpus=maybe(draw, st.integers(0, 16)),
            cpu_millis=maybe(draw, st.sampled_from((4_000, 16_000, 64_000))),
            gpus_by_model=draw(
                st.one_of(st.just({}), st.fixed_dictionaries({"H100": st.integers(0, 8)}))
            ),
        )
        guaranteed = Resources(gpus=maybe(draw, st.integers(0, 8)))
        out.append(
            Quota(
                t, guaranteed=guaranteed, limit=limit, weight=draw(st.sampled_from((0.5, 1.0, 3.0)))
            )
        )
    return out


@st.composite
def configs(draw: st.DrawFn) -> SchedulerConfig:
    return SchedulerConfig(
        default_limit=Resources(gpus=draw(st.sampled_from((None, 6)))),
        min_runtime_seconds=draw(st.sampled_from((0.0, 30.0))),
        max_preemptions_per_cycle=draw(st.sampled_from((1, 3, 8))),
        preemption_grace_seconds=draw(st.sampled_from((0.0, 20.0))),
        starvation_seconds=draw(st.sampled_from((0.0, 60.0))),
        max_held_gangs=draw(st.sampled_from((0, 1, 2))),
    )


@dataclass
class Submit:
    tenant: str
    shape: Shape
    count: int
    priority: int
    duration: int


shapes = st.builds(
    lambda g, model, cpu, mem, zone: Shape.of(g, model if g else "", cpu, mem * GIB, zone),
    st.sampled_from((0, 1, 1, 2, 4, 8)),
    st.sampled_from(("", "", "H100", "A100")),
    st.sampled_from((0, 1_000, 4_000)),
    st.sampled_from((0, 8, 32)),
    st.sampled_from(({}, {}, {"zone": "a"})),
)
submits = st.builds(
    Submit,
    st.sampled_from(TENANTS),
    shapes,
    st.integers(1, 3),
    st.integers(0, 2),
    st.sampled_from((0, 30, 90)),
)


@dataclass
class Step:
    submits: list[Submit]
    advance: int
    finish: int | None
    cordon: int | None
    break_gpu: int | None


steps = st.builds(
    Step,
    st.lists(submits, max_size=4),
    st.sampled_from((0, 5, 20, 40)),
    st.one_of(st.none(), st.integers(0, 50)),
    st.one_of(st.none(), st.integers(0, 10)),
    st.one_of(st.none(), st.integers(0, 50)),
)


# ---------------------------------------------------------------------------------------
# Invariants.


def check_capacity(s: Simulator) -> None:
    seen: dict[tuple[str, int], str] = {}
    cpu: dict[str, int] = {}
    mem: dict[str, int] = {}
    for a in s.live():
        for p in a.placements:
            for i in p.gpu_indices:
                key = (p.node_id, i)
                assert key not in seen, f"GPU {key} held by {seen[key]} and {a.id}"
                seen[key] = a.id
            cpu[p.node_id] = cpu.get(p.node_id, 0) + a.shape.cpu_millis
            mem[p.node_id] = mem.get(p.node_id, 0) + a.shape.memory_bytes
    for nid, used in cpu.items():
        assert used <= s.nodes[nid].cpu_millis, f"CPU over capacity on {nid}"
    for nid, used in mem.items():
        assert used <= s.nodes[nid].memory_bytes, f"memory over capacity on {nid}"


def check_limits(s: Simulator) -> None:
    tree = TenantTree(s.quotas, [a.tenant for a in s.allocations.values()], s.config)
    held: dict[str, list[int]] = {}
    by_model: dict[tuple[str, str], int] = {}
    for a in s.live():
        model_of = {g.index: g.model for g in s.nodes[a.placements[0].node_id].gpus}
        for t in tree.chain(a.tenant):
            h = held.setdefault(t, [0, 0, 0])
            h[0] += a.total_gpus
            h[1] += a.count * a.shape.cpu_millis
            h[2] += a.count * a.shape.memory_bytes
            for p in a.placements:
                model_of = {g.index: g.model for g in s.nodes[p.node_id].gpus}
                for i in p.gpu_indices:
                    by_model[(t, model_of[i])] = by_model.get((t, model_of[i]), 0) + 1
    for t, (g, c, m) in held.items():
        lim = tree.limit(t)
        assert lim.gpus is None or g <= lim.gpus, f"{t} holds {g} GPUs over limit {lim.gpus}"
        assert lim.cpu_millis is None or c <= lim.cpu_millis, f"{t} over CPU limit"
        assert lim.memory_bytes is None or m <= lim.memory_bytes, f"{t} over memory limit"
        for model, cap in lim.gpus_by_model.items():
            assert by_model.get((t, model), 0) <= cap, f"{t} over its {model} limit"


def check_decisions(s: Simulator, before: dict[str, Allocation], d: Decisions) -> None:
    cfg = s.config
    pending_ids = {aid for aid, a in before.items() if a.state == AllocationState.PENDING}
    admitted = [x.allocation_id for x in d.admissions]
    assert len(set(admitted)) == len(admitted)
    assert set(admitted) <= pending_ids
    assert set(d.pending) == pending_ids - set(admitted)
    assert sorted(st.position for st in d.pending.values()) == list(range(1, len(d.pending) + 1))
    assert all(st.reason for st in d.pending.values())
    assert len(d.preemptions) <= cfg.max_preemptions_per_cycle
    for p in d.preemptions:
        v = before[p.allocation_id]
        assert v.state == AllocationState.ALLOCATED
        assert v.allocate_time is not None
        assert s.now - v.allocate_time >= cfg.min_runtime_seconds
        assert p.preemptor_id in pending_ids
    for adm in d.admissions:
        a = before[adm.allocation_id]
        assert len(adm.placements) == a.count, "gang not whole"
        for pl in adm.placements:
            node = s.nodes[pl.node_id]
            assert node.schedulable
            assert all(node.labels.get(k) == v for k, v in a.shape.node_selector)
            assert len(pl.gpu_indices) == a.shape.gpus == len(set(pl.gpu_indices))
            gpus = {g.index: g for g in node.gpus}
            models = {gpus[i].model for i in pl.gpu_indices}
            assert len(models) <= 1
            if a.shape.gpu_model:
                assert models <= {a.shape.gpu_model}
            assert all(gpus[i].health == GpuHealth.HEALTHY for i in pl.gpu_indices)


def perturb(s: Simulator, step: Step) -> None:
    for sub in step.submits:
        s.submit(sub.tenant, sub.shape, sub.count, priority=sub.priority, duration=sub.duration)
    running = sorted(a.id for a in s.allocations.values() if a.state == AllocationState.ALLOCATED)
    if step.finish is not None and running:
        s.finish(running[step.finish % len(running)])
    nodes = sorted(s.nodes)
    if step.cordon is not None and step.cordon < len(nodes):
        n = s.nodes[nodes[step.cordon]]
        n.state = NodeState.READY if n.state != NodeState.READY else NodeState.CORDONED
    if step.break_gpu is not None:
        all_gpus = [(nid, g) for nid in nodes for g in s.nodes[nid].gpus]
        if all_gpus:
            all_gpus[step.break_gpu % len(all_gpus)][1].health = GpuHealth.UNHEALTHY
    s.advance(step.advance)


@SETTINGS
@given(clusters(), quota_sets(), configs(), st.lists(steps, min_size=1, max_size=8))
def test_safety_over_random_streams(nodes, quotas, config, stream) -> None:  # type: ignore[no-untyped-def]
    s = Simulator(nodes, quotas, config)
    for i, step in enumerate(stream):
        perturb(s, step)
        snap = s.snapshot()
        frozen = copy.deepcopy(snap)
        d = run_cycle(snap)
        assert run_cycle(frozen) == d, "same snapshot, different decisions"
        assert snap == frozen, "run_cycle changed its input"
        if i % 3 == 0 and step.submits:
            sub = step.submits[0]
            probe = Allocation("probe", sub.tenant, sub.count, sub.shape, priority=sub.priority)
            dry_run(snap, probe)
            assert snap == frozen, "dry_run changed the snapshot"
            assert probe.state == AllocationState.PENDING and probe.placements == ()
        before = {aid: copy.copy(a) for aid, a in s.allocations.items()}
        apply_decisions(s.allocations, d, s.now, s.config, s.nodes)
        check_decisions(s, before, d)
        s.advance(0)  # drop victims whose (zero) grace is over
        check_capacity(s)
        check_limits(s)


# ---------------------------------------------------------------------------------------
# Guarantees are honoured within one cycle.


@SETTINGS
@given(
    st.integers(1, 4),
    st.lists(st.integers(0, 8), min_size=3, max_size=3),
    st.lists(st.tuples(st.sampled_from("pqr"), st.integers(1, 12)), min_size=1, max_size=4),
    st.lists(st.tuples(st.sampled_from("pqr"), st.integers(1, 8)), min_size=1, max_size=3),
)
def test_tenant_under_guarantee_gets_it_within_one_cycle(
    n_nodes: int,
    guarantees: list[int],
    first: list[tuple[str, int]],
    then: list[tuple[str, int]],
) -> None:
    capacity = n_nodes * 8
    # Guarantees that the cluster can honour together.
    scale = min(1.0, capacity / max(1, sum(guarantees)))
    g = {t: int(x * scale) for t, x in zip("pqr", guarantees, strict=True)}
    quotas = [Quota(t, guaranteed=Resources(gpus=g[t])) for t in "pqr"]
    cfg = SchedulerConfig(
        min_runtime_seconds=0, preemption_grace_seconds=0, max_preemptions_per_cycle=1000
    )
    s = Simulator([make_node(f"n{i}") for i in range(n_nodes)], quotas, cfg)
    one = Shape.of(1, cpu_millis=100)
    for t, n in first:
        for _ in range(n):
            s.submit(t, one)
    s.step()
    s.advance(10)
    for t, n in then:
        for _ in range(n):
            s.submit(t, one)
    held = {t: s.held_gpus(t) for t in "pqr"}
    demand = {t: held[t] + sum(1 for a in s.pending() if a.tenant == t) for t in "pqr"}
    s.step()
    for t in "pqr":
        assert s.running_gpus(t) >= min(g[t], demand[t]), (t, g, held, demand)


# ---------------------------------------------------------------------------------------
# Fair-share convergence.


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.sampled_from((1, 2, 3)), st.sampled_from((1, 2, 3)), st.booleans())
def test_two_floods_converge_to_weighted_fair_share(
    n_nodes: int, wa: int, wb: int, a_first: bool
) -> None:
    cfg = SchedulerConfig(min_runtime_seconds=0, preemption_grace_seconds=10)
    s = Simulator(
        [make_node(f"n{i}") for i in range(n_nodes)],
        [Quota("a", weight=wa), Quota("b", weight=wb)],
        cfg,
    )
    one = Shape.of(1, cpu_millis=100)
    order = ("a", "b") if a_first else ("b", "a")
    for _ in range(40):
        s.submit(order[0], one)
    s.step()
    for _ in range(40):
        s.submit(order[1], one)
    for _ in range(12):
        s.advance(10)
        s.step()
    total = n_nodes * 8
    fair_a = total * wa / (wa + wb)
    assert s.running_gpus("a") + s.running_gpus("b") == total
    assert abs(s.running_gpus("a") - fair_a) < 1 + 1e-9, (s.running_gpus("a"), fair_a)
    assert s.history[-1].preemptions == []  # settled, no storm
    led = Ledger(s.snapshot())
    assert abs(led.fair["a"][0] - fair_a) < 1e-6
