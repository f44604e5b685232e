"""Speed-ups of the scheduler core must not change a single decision.

Each case below is a scheduler bench snapshot at a tenth of its scale (100 nodes, 1,000
pending): the bench's `queue` (nothing running) and `preemption` (500 low-priority
victims of tenants without a guarantee) cases, and `mixed` (500 running of every
tenant, some at priority 10), with several seeds, preemption grace 0 and 30 s, and a
per-cycle preemption limit of 8 and 64. The full `Decisions` of one cycle
(admissions with placements, preemptions with reasons, reservations, held nodes, and
every pending request's reason and position) are written out canonically and hashed;
the hash must equal the one recorded here.

When a change is *meant* to change decisions, regenerate the digests and say why in the
commit:

    .venv/bin/python -m tests.unit.test_scheduler_decisions_digest
"""

from __future__ import annotations

import hashlib
import sys

import pytest

from rmgrpc.scheduler.cycle import run_cycle
from rmgrpc.scheduler.snapshot import Decisions, SchedulerConfig, Snapshot
from tests.bench.scheduler_bench import CASES, Case, build_snapshot

NODES = 100
PENDING = 1_000
RUNNING = 500

# (case, seed, grace seconds, max preemptions per cycle) -> sha256 of the decisions.
DIGESTS: dict[tuple[str, int, float, int], str] = {
    ("queue", 1, 0.0, 8): "b02e95d46fd2416fbfdb92bb99c3a6a3b7e3fb6c2c31e5be8360e5997d45330b",
    ("queue", 2, 0.0, 8): "75d34ecad5408ed04eadde3befba7147959c81997a7f803b1c0c1b04b3d3d0ed",
    ("queue", 3, 0.0, 8): "aa00b63aaaa8b8b8275d74d1eb0bfc0e0a876215bfc813f454ded7d200b3e283",
    ("preemption", 1, 0.0, 8): "1e3f1819741396be594a74bc799823a1779af7417ecb0bb999a19935feff5da6",
    ("preemption", 1, 0.0, 64): "4b45f514159273ed56fb7e57cc2b1cc4e653cf4b6765d4e015fbd3a901943f22",
    ("preemption", 1, 30.0, 8): "19c9e91f812767fd7e5fa4bb3041628f2644d1b4d233eb3315753a7c6b5a2a4a",
    ("preemption", 1, 30.0, 64): "b33a9f85fb3bb608c0fd74beeae7d886384c044be7956358fb63e79e9bfefdb9",
    ("preemption", 2, 0.0, 8): "6d0e3d8c926e8dfdfd675deed2a651e8530d620e8f1247e3c5ce93fe19047835",
    ("preemption", 2, 0.0, 64): "a9100211b78d90c7558b13d4e55111f46c4cd6beb49537b7b929a08a0048022f",
    ("preemption", 2, 30.0, 8): "7c3555ef9803406bb26a6cfc6cc8ca932656c6318c60618d4744f945069906f5",
    ("preemption", 2, 30.0, 64): "c813dd6e46b2170e6e2d9423c9dc1114e42c23651d1f2e7d5cf30ccc9f923fab",
    ("preemption", 3, 0.0, 8): "adaaceb5568f99d484b603a0dd46261565c39a2d22a7c8d4de66992b518422a2",
    ("preemption", 3, 0.0, 64): "aee309dc8ae91ed6c3b502760416b3f96ff26c8882ff9104b0e309f83c907bc4",
    ("preemption", 3, 30.0, 8): "a41ceb517d4717ea81dff48f8d7c45a487c30d9e50d13f9aff0dd251719e7bfd",
    ("preemption", 3, 30.0, 64): "cbf50cb52b57008ebd18a7570d7221e6ebf5160ee960723ad5f6d7f01b5ca1f0",
    ("mixed", 1, 0.0, 8): "a0af533f5d95d43a5f4304b0dd9dd658b269755b84ab3e1c5094830e08b863bd",
    ("mixed", 1, 30.0, 8): "7cf2eb3643c55e7d1a259fd8b6c6774fe6aee04e51aa2c5f485e78242fcad603",
    ("mixed", 2, 0.0, 8): "395e7966c731f2a7e7377dcb290ff1c2cf858bd5b6cf1dada7bb058df0b0dd72",
    ("mixed", 2, 30.0, 8): "dd49cb9587991456e970f0339dac6dbf215d600be6159a0b83f9174b88b6c768",
}


# Running work of every tenant, some of it at a priority pending work cannot preempt.
MIXED = Case(pending=PENDING, running=RUNNING)


def snapshot_for(case: str, seed: int, grace: float, max_preemptions: int) -> Snapshot:
    c = MIXED if case == "mixed" else CASES[case]
    config = SchedulerConfig(
        min_runtime_seconds=60,
        preemption_grace_seconds=grace,
        max_preemptions_per_cycle=max_preemptions,
    )
    return build_snapshot(
        NODES,
        PENDING,
        RUNNING if c.running else 0,
        seed,
        config,
        c.running_tenants,
        c.running_priorities,
    )


def canonical(d: Decisions) -> str:
    """Every decision, one per line, in the order the cycle made them (order matters:
    the engine applies them in it); pending requests by id."""
    lines = [f"admit {a.allocation_id} {a.placements!r}" for a in d.admissions]
    lines += [f"preempt {p.allocation_id} {p.preemptor_id} {p.reason}" for p in d.preemptions]
    lines += [f"reserve {r!r}" for r in d.reserved]
    lines += [f"hold {g} {nodes!r}" for g, nodes in sorted(d.held_nodes.items())]
    lines += [f"pending {aid} {st.position} {st.reason}" for aid, st in sorted(d.pending.items())]
    return "\n".join(lines)


def digest(d: Decisions) -> str:
    return hashlib.sha256(canonical(d).encode()).hexdigest()


CASE_KEYS = [
    *[("queue", seed, 0.0, 8) for seed in (1, 2, 3)],  # nothing runs: grace and limit idle
    *[
        ("preemption", seed, grace, limit)
        for seed in (1, 2, 3)
        for grace in (0.0, 30.0)
        for limit in (8, 64)
    ],
    *[("mixed", seed, grace, 8) for seed in (1, 2) for grace in (0.0, 30.0)],
]


@pytest.mark.parametrize("key", CASE_KEYS, ids=lambda k: "-".join(str(x) for x in k))
def test_decisions_are_unchanged(key: tuple[str, int, float, int]) -> None:
    d = run_cycle(snapshot_for(*key))
    # The cases must exercise what they guard: work admitted and left waiting, and
    # (in the preemption case) victims chosen.
    assert d.admissions and d.pending
    if key[0] != "queue":
        assert d.preemptions
    assert digest(d) == DIGESTS[key], f"decisions changed for {key}"


def main() -> None:
    """Print the digests table for pasting above (only when a change is intended)."""
    print("DIGESTS: dict[tuple[str, int, float, int], str] = {")
    for key in CASE_KEYS:
        print(f"    {key!r}: {digest(run_cycle(snapshot_for(*key)))!r},")
    print("}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
