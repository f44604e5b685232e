"""Victim selection: whom to preempt so that one pending gang can run.

Three ways a pending request may take capacity from placed work (KAI's preempt and
reclaim actions, in our words):

- `PRIORITY`: from strictly lower-priority allocations. Its own tenant's go freely;
  another tenant's only while that tenant stays at or above its guarantee.
- `GUARANTEE`: the requester is under its guaranteed quota; it takes back from
  borrowers (any priority), never taking a victim tenant below its own guarantee.
- `FAIR_SHARE`: the requester stays at or under its fair share with the request; it takes
  from tenants of equal or lower priority that stay at or above their fair share after
  (who is more saturated never inverts, so equal borrowers do not trade GPUs back and forth).

Victims are the fewest, lowest-priority, most recently started allocations that make the
gang fit, chosen node by node, and checked by a trial placement with the victims removed
(a `Statement`, discarded afterwards). Allocations younger than the minimum runtime are
never victims.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rmgrpc.model import Allocation, AllocationState
from rmgrpc.scheduler.fairshare import Amount, Ledger, QuotaBlock
from rmgrpc.scheduler.placement import CapacityView, NodeCapacity, labels_match
from rmgrpc.scheduler.snapshot import Snapshot

# Nodes whose victim sets are compared per replica before the cheapest is taken: exact on
# small clusters, bounded work on large ones (Nomad likewise scores a limited sample).
SOLUTION_LIMIT = 64


class Mode(enum.Enum):
    PRIORITY = "higher priority"
    GUARANTEE = "guaranteed quota"
    FAIR_SHARE = "fair share"


@dataclass(slots=True)
class Victim:
    alloc: Allocation
    amount: Amount
    chain: tuple[str, ...]
    # Node id -> (GPU indices, CPU millis, memory bytes) the victim frees there.
    on_node: dict[str, tuple[list[int], int, int]] = field(default_factory=dict)
    # (GPUs, CPU millis, memory bytes) it frees in all.
    vec: tuple[int, int, int] = (0, 0, 0)

    @property
    def id(self) -> str:
        return self.alloc.id

    @property
    def tenant(self) -> str:
        return self.alloc.tenant

    @property
    def priority(self) -> int:
        return self.alloc.priority

    @property
    def start(self) -> float:
        a = self.alloc
        return a.allocate_time if a.allocate_time is not None else a.create_time


def victim_order(a: Allocation) -> tuple[int, float, int, str]:
    """Lowest priority first, then the most recently started (least work lost)."""
    start = a.allocate_time if a.allocate_time is not None else a.create_time
    return (a.priority, -start, -a.seq, a.id)


class VictimPool:
    """Every placed allocation that may be preempted this cycle, by node."""

    def __init__(self, snapshot: Snapshot, ledger: Ledger) -> None:
        now = snapshot.now
        min_runtime = snapshot.config.min_runtime_seconds
        eligible = []
        for a in snapshot.allocations.values():
            if a.state != AllocationState.ALLOCATED or not a.holds_capacity(now):
                continue
            start = a.allocate_time if a.allocate_time is not None else a.create_time
            if now - start < min_runtime:
                continue
            eligible.append(a)
        eligible.sort(key=victim_order)
        self.ordered: list[Victim] = []
        self.by_node: dict[str, list[Victim]] = {}
        for a in eligible:
            amt = Amount.of_placed(a, ledger.gpu_models)
            v = Victim(a, amt, ledger.tree.chain(a.tenant), vec=amt.vector())
            for p in a.placements:
                gpus, cpu, mem = v.on_node.get(p.node_id, ([], 0, 0))
                v.on_node[p.node_id] = (
                    gpus + list(p.gpu_indices),
                    cpu + a.shape.cpu_millis,
                    mem + a.shape.memory_bytes,
                )
            self.ordered.append(v)
            for nid in v.on_node:
                self.by_node.setdefault(nid, []).append(v)
        self.node_ids = sorted(self.by_node)
        # Chosen this cycle: never chosen twice.
        self.taken: set[str] = set()
        # (shape, models) -> nodes that could ever take one replica (state, labels, size).
        self._static: dict[tuple[object, ...], list[str]] = {}
        self.min_priority = min((v.priority for v in self.ordered), default=math.inf)

    def __len__(self) -> int:
        return len(self.ordered) - len(self.taken)

    def candidate_nodes(
        self, view: CapacityView, request: Allocation, models: tuple[str, ...] | None
    ) -> list[str]:
        """Nodes with victims on them that could host a replica if emptied (holds aside)."""
        key = (request.shape, models)
        got = self._static.get(key)
        if got is None:
            got = []
            for nid in self.node_ids:
                n = view.nodes.get(nid)
                if n is not None and _statically_fits(n, request, models):
                    got.append(nid)
            self._static[key] = got
        return got


class Tally:
    """What the victims chosen so far free, per tenant subtree: (GPUs, CPU, memory)."""

    def __init__(self) -> None:
        self.freed: dict[str, list[int]] = {}

    def add(self, v: Victim, sign: int = 1) -> None:
        g, c, m = v.vec
        for t in v.chain:
            cur = self.freed.get(t)
            if cur is None:
                cur = self.freed[t] = [0, 0, 0]
            cur[0] += sign * g
            cur[1] += sign * c
            cur[2] += sign * m


Accept = Callable[[Victim, Tally], bool]


def acceptor(ledger: Ledger, pool: VictimPool, request: Allocation, mode: Mode) -> Accept:
    """The mode's rule for whether `v` may be a victim, given those chosen so far."""
    tenant = request.tenant
    tchain = ledger.tree.chain(tenant)
    tset = set(tchain)
    ask = Amount.of_request(request)
    dims = (ask.gpus > 0, ask.cpu > 0, ask.mem > 0)
    fair = mode == Mode.FAIR_SHARE
    slacks: dict[str, tuple[float, float, float]] = {}
    under: dict[str, bool] = {}

    def accept(v: Victim, tally: Tally) -> bool:
        if v.id in pool.taken:
            return False
        if mode == Mode.PRIORITY:
            if v.priority >= request.priority:
                return False
            if v.tenant == tenant:
                return True
        elif mode == Mode.GUARANTEE:
            if v.tenant in tset:
                return False
        elif v.priority > request.priority or v.tenant in tset:
            return False
        vec = v.vec
        for y in v.chain:
            if y in tset:
                break  # common ancestors: their totals do not change
            sl = slacks.get(y)
            if sl is None:
                sl = slacks[y] = ledger.slack(y, dims, fair=fair)
            fr = tally.freed.get(y)
            for i in range(3):
                if vec[i] > 0 and vec[i] + (fr[i] if fr else 0) > sl[i]:
                    return False
        if fair:
            vset = v.chain
            for x in tchain:
                if x in vset:
                    break
                ok = under.get(x)
                if ok is None:
                    ok = under[x] = ledger.below_fair_share(x, ask)
                if not ok:
                    return False
        return True

    return accept


def _statically_fits(n: NodeCapacity, request: Allocation, models: Sequence[str] | None) -> bool:
    s = request.shape
    if not n.schedulable:
        return False
    if not labels_match(n.labels, s.node_selector):
        return False
    if n.cpu_total < s.cpu_millis or n.mem_total < s.memory_bytes:
        return False
    if s.gpus > 0:
        ms = _models(n, request, models)
        if not any(n.healthy_by_model.get(m, 0) >= s.gpus for m in ms):
            return False
    return True


def _models(n: NodeCapacity, request: Allocation, models: Sequence[str] | None) -> list[str]:
    s = request.shape
    if s.gpu_model:
        return [s.gpu_model] if models is None or s.gpu_model in models else []
    present = sorted(n.healthy_by_model)
    return present if models is None else [m for m in present if m in models]


def _cheapest_on_node(
    n: NodeCapacity,
    request: Allocation,
    models: Sequence[str] | None,
    candidates: Sequence[Victim],
    skip: set[str],
    accept: Accept,
    tally: Tally,
    room: int,
) -> list[Victim] | None:
    """The first victims (in victim order) on `n` that make one replica fit there."""
    s = request.shape
    ms = _models(n, request, models)
    counts = {m: n.free_count(m) for m in ms}
    cpu = n.cpu_free
    mem = n.mem_free

    def fits() -> bool:
        if cpu < s.cpu_millis or mem < s.memory_bytes:
            return False
        return s.gpus <= 0 or any(c >= s.gpus for c in counts.values())

    acc: list[Victim] = []
    ok = fits()
    for v in candidates:
        if ok or len(acc) >= room:
            break
        if v.id in skip or not accept(v, tally):
            continue
        tally.add(v)
        acc.append(v)
        gpus, c, m = v.on_node[n.id]
        cpu += c
        mem += m
        for i in gpus:
            if i in n.healthy:
                model = n.gpu_models[i]
                if model in counts:
                    counts[model] += 1
        ok = fits()
    for v in acc:
        tally.add(v, -1)
    return acc if ok and acc else None


def _cost(vs: Sequence[Victim], nid: str) -> tuple[int, int, float, str]:
    return (len(vs), max(v.priority for v in vs), -min(v.start for v in vs), nid)


def select_victims(
    view: CapacityView,
    ledger: Ledger,
    pool: VictimPool,
    request: Allocation,
    mode: Mode,
    *,
    models: tuple[str, ...] | None,
    budget: int,
    prechosen: Sequence[Victim] = (),
) -> list[Victim] | None:
    """Victims that let `request` be placed whole, or None. Leaves `view` as it was."""
    if budget <= 0:
        return None
    accept = acceptor(ledger, pool, request, mode)
    tally = Tally()
    chosen: list[Victim] = []
    ids: set[str] = set()
    st = view.statement()
    try:
        for v in prechosen:
            tally.add(v)
            chosen.append(v)
            ids.add(v.id)
            view.release(v.alloc)
        for _ in range(max(request.count, 0)):
            if view.place_gang(
                request.shape, 1, owner=request.id, priority=request.priority, models=models
            ):
                continue
            best: list[Victim] | None = None
            best_cost: tuple[int, int, float, str] | None = None
            room = budget - len(chosen)
            solutions = 0
            for nid in pool.candidate_nodes(view, request, models):
                n = view.nodes[nid]
                if n.held_for and n.blocks(request.id, request.priority):
                    continue
                acc = _cheapest_on_node(
                    n, request, models, pool.by_node[nid], ids, accept, tally, room
                )
                if acc is None:
                    continue
                cost = _cost(acc, nid)
                if best_cost is None or cost < best_cost:
                    best, best_cost = acc, cost
                    if cost[0] == 1 and cost[1] == pool.min_priority:
                        break  # one victim of the lowest priority: cannot do better
                solutions += 1
                if solutions >= SOLUTION_LIMIT:
                    break
            if best is None:
                return None
            for v in best:
                tally.add(v)
                chosen.append(v)
                ids.add(v.id)
                view.release(v.alloc)
            if not view.place_gang(
                request.shape, 1, owner=request.id, priority=request.priority, models=models
            ):
                return None
        if not chosen:
            return None
    finally:
        st.discard()
    return _minimize(view, request, models, chosen, len(prechosen))


def _minimize(
    view: CapacityView,
    request: Allocation,
    models: tuple[str, ...] | None,
    chosen: list[Victim],
    keep: int,
) -> list[Victim] | None:
    """Drop victims the gang turns out not to need (the most valuable first)."""
    out = list(chosen)
    optional = sorted(out[keep:], key=lambda v: victim_order(v.alloc), reverse=True)
    for v in optional:
        trial = [x for x in out if x is not v]
        if _fits_without(view, request, models, trial):
            out = trial
    if not _fits_without(view, request, models, out):
        return None
    return out


def _fits_without(
    view: CapacityView,
    request: Allocation,
    models: tuple[str, ...] | None,
    victims: Sequence[Victim],
) -> bool:
    st = view.statement()
    try:
        for v in victims:
            view.release(v.alloc)
        return (
            view.place_gang(
                request.shape,
                request.count,
                owner=request.id,
                priority=request.priority,
                models=models,
            )
            is not None
        )
    finally:
        st.discard()


def quota_victims(
    ledger: Ledger,
    pool: VictimPool,
    request: Allocation,
    block: QuotaBlock,
    budget: int,
) -> list[Victim] | None:
    """Lower-priority allocations inside the full subtree that bring the request under its limit."""
    accept = acceptor(ledger, pool, request, Mode.PRIORITY)
    ask = Amount.of_request(request)
    tally = Tally()
    freed: dict[str, Amount] = {}
    out: list[Victim] = []
    for v in pool.ordered:
        if len(out) >= budget:
            return None
        if block.tenant not in v.chain or not accept(v, tally):
            continue
        tally.add(v)
        for t in v.chain:
            freed.setdefault(t, Amount()).add(v.amount)
        out.append(v)
        if ledger.limit_block(request.tenant, ask, freed) is None:
            return out
    return None


def reason_for(mode: Mode, request: Allocation, victim: Victim) -> str:
    if mode == Mode.PRIORITY:
        why = f"priority {request.priority} over {victim.priority}"
    elif mode == Mode.GUARANTEE:
        why = f"tenant {request.tenant} reclaims its guaranteed quota from borrower {victim.tenant}"
    else:
        why = (
            f"tenant {request.tenant} is below its fair share and tenant {victim.tenant} "
            "above its own"
        )
    return f"preempted for {request.id} ({why})"
