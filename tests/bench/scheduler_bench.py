"""One full scheduling cycle at scale, next to a naive scheduler on the same input.

    python -m tests.bench.scheduler_bench [--case queue preemption] [--nodes 1000]
                                          [--pending N] [--running N] [--seed 7]
                                          [--repeat 3] [--no-baseline]

Cases (both by default; --pending/--running override a case's own numbers):
  queue       10,000 pending, nothing running.
  preemption  10,000 pending and 5,000 1-GPU allocations running, all held by tenants
              with no guarantee at the lowest priority, so pending work of higher
              priority and of tenants under their guarantee must preempt (target < 1 s).

10,000 pending requests of mixed shapes (1/2/4/8-GPU, multi-node gangs, CPU-only; some
naming a GPU model, some a node selector) from tenants with quotas, onto 1,000 nodes of
8 GPUs (three models, zone and network labels). The baseline is what one writes first:
requests in arrival order, each replica scanning every node for the first that fits,
no index, no memo. It decides the same requests but none of fair share, preemption or
explanations, so it is a floor for work per request rather than a twin.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rmgrpc.model import (
    Allocation,
    AllocationState,
    GpuHealth,
    Node,
    NodeState,
    Placement,
    Quota,
    Resources,
    Shape,
)
from rmgrpc.scheduler.cycle import run_cycle
from rmgrpc.scheduler.simulate import make_node
from rmgrpc.scheduler.snapshot import SchedulerConfig, Snapshot

GIB = 1024**3
MODELS = (("H100", 0.4), ("A100", 0.4), ("L4", 0.2))
ZONES = ("a", "b", "c", "d")
TENANTS = (
    "org1/train",
    "org1/infer",
    "org1/research",
    "org2/train",
    "org2/infer",
    "lab",
    "batch",
    "adhoc",
)


def build_cluster(n_nodes: int, rng: random.Random) -> dict[str, Node]:
    nodes: dict[str, Node] = {}
    for i in range(n_nodes):
        r = rng.random()
        acc = 0.0
        model = MODELS[-1][0]
        for m, p in MODELS:
            acc += p
            if r < acc:
                model = m
                break
        labels = {"zone": ZONES[i % len(ZONES)]}
        if model == "H100" and i % 3 == 0:
            labels["net"] = "ib"
        node = make_node(
            f"node-{i:05d}",
            8,
            model,
            cpu_millis=96_000,
            memory_bytes=1024 * GIB,
            labels=labels,
        )
        if i % 97 == 0:
            node.state = NodeState.CORDONED
        if i % 53 == 0:
            node.gpus[7].health = GpuHealth.UNHEALTHY
        nodes[node.id] = node
    return nodes


def build_quotas(n_nodes: int) -> dict[str, Quota]:
    gpus = n_nodes * 8
    return {
        "org1": Quota("org1", limit=Resources(gpus=gpus // 2), weight=2.0),
        "org1/train": Quota(
            "org1/train", guaranteed=Resources(gpus=gpus // 10), limit=Resources(gpus=gpus // 3)
        ),
        "org1/infer": Quota(
            "org1/infer",
            guaranteed=Resources(gpus=gpus // 20),
            limit=Resources(gpus=gpus // 4, gpus_by_model={"L4": gpus // 10}),
        ),
        "org2": Quota("org2", limit=Resources(gpus=gpus // 3), weight=1.0),
        "lab": Quota("lab", guaranteed=Resources(gpus=gpus // 20), weight=1.0),
        "batch": Quota("batch", limit=Resources(gpus=gpus // 5), weight=0.5),
    }


def random_shape(rng: random.Random) -> tuple[Shape, int]:
    r = rng.random()
    model = rng.choice(("H100", "A100", "L4", "", "")) if r < 0.88 else ""
    selector: dict[str, str] = {}
    if rng.random() < 0.2:
        selector["zone"] = rng.choice(ZONES)
    if r < 0.45:
        gpus, count = 1, 1
    elif r < 0.60:
        gpus, count = 2, 1
    elif r < 0.70:
        gpus, count = 4, 1
    elif r < 0.80:
        gpus, count = 8, 1
    elif r < 0.85:
        gpus, count = 8, rng.choice((2, 4))
        model = "H100"
        if rng.random() < 0.5:
            selector = {"net": "ib"}
    elif r < 0.88:
        gpus, count = 1, rng.choice((2, 4, 8))
    else:
        gpus, count = 0, rng.choice((1, 2))
    cpu = (gpus * 8 or 4) * 1000
    mem = (gpus * 64 or 16) * GIB
    return Shape.of(gpus, model, cpu, mem, selector), count


# Who holds the running work in the preemption case: no guarantee among them, so lab and
# org1's tenants sit under their guarantees and may preempt them, as may higher priorities.
VICTIMS = ("batch", "adhoc", "org2/train", "org2/infer")


@dataclass(frozen=True)
class Case:
    pending: int
    running: int
    running_tenants: tuple[str, ...] = TENANTS
    running_priorities: tuple[int, ...] = (0, 0, 0, 10)
    target_seconds: float | None = None


CASES = {
    "queue": Case(pending=10_000, running=0),
    "preemption": Case(
        pending=10_000,
        running=5_000,
        running_tenants=VICTIMS,
        running_priorities=(0,),
        target_seconds=1.0,
    ),
}


def build_snapshot(
    n_nodes: int,
    n_pending: int,
    n_running: int,
    seed: int,
    config: SchedulerConfig,
    running_tenants: Sequence[str] = TENANTS,
    running_priorities: Sequence[int] = (0, 0, 0, 10),
) -> Snapshot:
    rng = random.Random(seed)
    nodes = build_cluster(n_nodes, rng)
    allocations: dict[str, Allocation] = {}
    now = 1_000_000.0
    seq = 0
    # Running work, placed first-fit on 1-GPU slots of READY nodes.
    ready = [n for n in nodes.values() if n.state == NodeState.READY]
    slots = [(n, g) for n in ready for g in n.gpus if g.health == GpuHealth.HEALTHY and g.index < 6]
    rng.shuffle(slots)
    for i in range(min(n_running, len(slots))):
        node, gpu = slots[i]
        seq += 1
        a = Allocation(
            id=f"run-{i:06d}",
            tenant=rng.choice(running_tenants),
            count=1,
            shape=Shape.of(1, gpu.model, 4000, 32 * GIB),
            priority=rng.choice(running_priorities),
            state=AllocationState.ALLOCATED,
            placements=(Placement(node.id, (gpu.index,)),),
            create_time=now - 3600,
            allocate_time=now - rng.uniform(0, 3600),
            seq=seq,
        )
        allocations[a.id] = a
    for i in range(n_pending):
        seq += 1
        shape, count = random_shape(rng)
        a = Allocation(
            id=f"req-{i:06d}",
            tenant=rng.choice(TENANTS),
            count=count,
            shape=shape,
            priority=rng.choice((0, 0, 0, 0, 5, 10)),
            create_time=now - rng.uniform(0, 600),
            seq=seq,
        )
        allocations[a.id] = a
    return Snapshot(
        now=now, nodes=nodes, allocations=allocations, quotas=build_quotas(n_nodes), config=config
    )


# ---------------------------------------------------------------------------------------
# The naive baseline.


def naive_cycle(snapshot: Snapshot) -> tuple[int, int]:
    """First fit in arrival order, every replica scanning every node. (admitted, pending)."""
    now = snapshot.now
    free_gpus: dict[str, dict[int, str]] = {}
    cpu: dict[str, int] = {}
    mem: dict[str, int] = {}
    for nid, n in snapshot.nodes.items():
        free_gpus[nid] = {g.index: g.model for g in n.gpus if g.health == GpuHealth.HEALTHY}
        cpu[nid] = n.cpu_millis
        mem[nid] = n.memory_bytes
    held: dict[str, int] = {}

    def charge(tenant: str, gpus: int) -> None:
        t = tenant
        while t:
            held[t] = held.get(t, 0) + gpus
            t = t.rpartition("/")[0]

    for a in snapshot.allocations.values():
        if a.holds_capacity(now):
            for p in a.placements:
                for i in p.gpu_indices:
                    free_gpus[p.node_id].pop(i, None)
                cpu[p.node_id] -= a.shape.cpu_millis
                mem[p.node_id] -= a.shape.memory_bytes
            charge(a.tenant, a.total_gpus)
    pending = sorted(
        (a for a in snapshot.allocations.values() if a.state == AllocationState.PENDING),
        key=lambda a: (a.seq, a.id),
    )
    node_list = [snapshot.nodes[nid] for nid in sorted(snapshot.nodes)]
    admitted = 0
    for a in pending:
        s = a.shape
        ok = True
        t = a.tenant
        while t:
            q = snapshot.quotas.get(t)
            lim = q.limit.gpus if q is not None else None
            if lim is not None and held.get(t, 0) + a.total_gpus > lim:
                ok = False
            t = t.rpartition("/")[0]
        if not ok:
            continue
        taken: list[tuple[str, list[int]]] = []
        for _ in range(a.count):
            found = False
            for n in node_list:
                nid = n.id
                if n.state != NodeState.READY:
                    continue
                if any(n.labels.get(k) != v for k, v in s.node_selector):
                    continue
                if cpu[nid] < s.cpu_millis or mem[nid] < s.memory_bytes:
                    continue
                idx = [i for i, m in free_gpus[nid].items() if not s.gpu_model or m == s.gpu_model]
                if len(idx) < s.gpus:
                    continue
                got = sorted(idx)[: s.gpus]
                for i in got:
                    del free_gpus[nid][i]
                cpu[nid] -= s.cpu_millis
                mem[nid] -= s.memory_bytes
                taken.append((nid, got))
                found = True
                break
            if not found:
                ok = False
                break
        if not ok:
            for nid, got in taken:
                for i in got:
                    free_gpus[nid][i] = snapshot.nodes[nid].gpus[i].model
                cpu[nid] += s.cpu_millis
                mem[nid] += s.memory_bytes
            continue
        charge(a.tenant, a.total_gpus)
        admitted += 1
    return admitted, len(pending) - admitted


# ---------------------------------------------------------------------------------------


def _median_times(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Median wall seconds, and median CPU seconds of this process: on a shared machine
    the wall time counts other processes' turns, the CPU time much less so."""
    times = []
    cpu = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        c0 = time.process_time()
        fn()
        cpu.append(time.process_time() - c0)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), statistics.median(cpu)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="One full scheduling cycle vs a naive baseline.")
    ap.add_argument("--case", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--pending", type=int, default=None, help="overrides the case's")
    ap.add_argument("--running", type=int, default=None, help="1-GPU allocations placed")
    ap.add_argument("--max-preemptions", type=int, default=8)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=3, help="cycles timed; the median is shown")
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args(argv)

    config = SchedulerConfig(
        min_runtime_seconds=60,
        preemption_grace_seconds=30,
        max_preemptions_per_cycle=args.max_preemptions,
    )
    for name in args.case:
        case = CASES[name]
        pending = case.pending if args.pending is None else args.pending
        running = case.running if args.running is None else args.running
        print(f"-- case {name}")
        run_case(args, config, case, pending, running)


def run_case(
    args: argparse.Namespace, config: SchedulerConfig, case: Case, pending: int, running: int
) -> None:
    t0 = time.perf_counter()
    snap = build_snapshot(
        args.nodes,
        pending,
        running,
        args.seed,
        config,
        case.running_tenants,
        case.running_priorities,
    )
    build = time.perf_counter() - t0
    gpus = sum(len(n.gpus) for n in snap.nodes.values())
    print(
        f"cluster: {len(snap.nodes)} nodes, {gpus} GPUs; {pending} pending, "
        f"{running} running; {len(snap.quotas)} quotas (built in {build:.2f} s)"
    )

    d = run_cycle(snap)  # also warms up
    seconds, cpu_seconds = _median_times(lambda: run_cycle(snap), args.repeat)
    decided = len(d.admissions) + len(d.pending)
    target = ""
    if case.target_seconds is not None:
        target = f"  (target < {case.target_seconds * 1000:.0f} ms)"
    print(
        f"rmgrpc cycle:   {seconds * 1000:8.1f} ms  {decided / seconds:10.0f} decisions/s  "
        f"admitted {len(d.admissions)}, preempted {len(d.preemptions)}, "
        f"pending {len(d.pending)} (each with a reason and position){target}"
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    print(f"  cpu time:     {cpu_seconds * 1000:8.1f} ms  (load average {load:.1f})")
    if running and not d.preemptions:
        print("                (no preemption happened: this case does not measure it)")
    again = run_cycle(snap)
    same = again.admissions == d.admissions and again.pending == d.pending
    print(f"deterministic:  {'yes' if same else 'NO'}")
    if args.no_baseline:
        return
    t0 = time.perf_counter()
    admitted, waiting = naive_cycle(snap)
    base_seconds = time.perf_counter() - t0
    print(
        f"naive baseline: {base_seconds * 1000:8.1f} ms  "
        f"{(admitted + waiting) / base_seconds:10.0f} decisions/s  "
        f"admitted {admitted}, pending {waiting} (no reasons, no fair share)"
    )
    print(f"speed-up:       {base_seconds / seconds:8.1f}x")


if __name__ == "__main__":
    main()
