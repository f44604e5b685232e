"""Start-time estimates at scale, next to one scheduling pass on the same data.

    python -m tests.bench.estimate_bench [--nodes 1000] [--pending 10000] [--running 5000]
                                         [--depth 200 1000] [--resolution 60]
                                         [--seed 7] [--repeat 3]

The scheduler benchmark's cluster and queue (`scheduler_bench.build_snapshot`: 1,000
nodes of 8 GPUs, three models, labels, quotas; 10,000 pending requests of mixed shapes),
with every running allocation given a hard end in the next 8 hours and every pending
request a `max_duration_seconds` (half an hour to 8 hours). One `run_cycle` is timed,
then `estimate_starts` on the same snapshot and decisions for each queue depth; the
ratio of the two is the figure to read, since the machine's load moves both alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time
from collections.abc import Callable, Sequence

from rmgrpc.model import AllocationState
from rmgrpc.scheduler.cycle import run_cycle
from rmgrpc.scheduler.estimate import Estimate, estimate_starts
from rmgrpc.scheduler.snapshot import SchedulerConfig, Snapshot
from tests.bench.scheduler_bench import build_snapshot

HOUR = 3600


def with_hard_ends(snap: Snapshot, seed: int) -> Snapshot:
    rng = random.Random(seed)
    allocs = {}
    for aid in sorted(snap.allocations):
        a = snap.allocations[aid]
        if a.state == AllocationState.ALLOCATED:
            a = dataclasses.replace(a, max_end_time=snap.now + rng.uniform(60, 8 * HOUR))
        else:
            a = dataclasses.replace(a, max_duration_seconds=rng.randrange(HOUR // 2, 8 * HOUR))
        allocs[aid] = a
    return dataclasses.replace(snap, allocations=allocs)


def _median(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Start-time estimates vs one scheduling pass.")
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--pending", type=int, default=10_000)
    ap.add_argument("--running", type=int, default=5_000)
    ap.add_argument("--depth", type=int, nargs="+", default=[200, 1000])
    ap.add_argument(
        "--resolution", type=float, nargs="+", default=[60.0], help="seconds; 0: every end"
    )
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)

    config = SchedulerConfig(min_runtime_seconds=60, preemption_grace_seconds=30)
    snap = with_hard_ends(
        build_snapshot(args.nodes, args.pending, args.running, args.seed, config), args.seed
    )
    print(
        f"cluster: {len(snap.nodes)} nodes; {args.pending} pending, {args.running} running "
        "with hard ends"
    )
    decisions = run_cycle(snap)  # also warms up
    cycle = _median(lambda: run_cycle(snap), args.repeat)
    print(
        f"run_cycle:        {cycle * 1000:8.1f} ms  (admitted {len(decisions.admissions)}, "
        f"pending {len(decisions.pending)})"
    )
    for res in args.resolution:
        for depth in args.depth:
            est: dict[str, Estimate] = {}

            def once(d: int = depth, r: float = res, out: dict[str, Estimate] = est) -> None:
                out.update(estimate_starts(snap, decisions, d, r))

            seconds = _median(once, args.repeat)
            known = sum(1 for e in est.values() if e.start_time is not None)
            print(
                f"estimate (first {depth:>6}, resolution {res:g} s): {seconds * 1000:8.1f} ms"
                f"  = {seconds / cycle:5.2f}x a pass; {known} with a start time"
            )


if __name__ == "__main__":
    main()
