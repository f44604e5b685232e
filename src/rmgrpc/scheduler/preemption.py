"""Victim selection: whom to preempt so that one pending gang can run.

Three ways a pending request may take capacity from placed work (KAI's reclaim and
preempt actions, in our words), tried in this order:

- `GUARANTEE`: the requester stays within its guaranteed quota with the request. It
  reclaims from other tenants that borrow (hold above their own guarantee), at any
  priority. A victim's tenant (and each ancestor below the common one) must still be
  borrowing *before* that victim is taken, so one indivisible allocation may take its
  owner below its guarantee when it is what makes it borrow (a 9-GPU job against a
  guarantee of 3), but no more than that. Tried first: borrowed capacity is reclaimed
  before the tenant's own lower-priority work.
- `PRIORITY`: from strictly lower-priority allocations. Its own tenant's go freely;
  another tenant's only while that tenant stays at or above its guarantee.
- `FAIR_SHARE`: the requester stays at or under its fair share with the request; it takes
  from tenants of equal or lower priority that stay at or above their fair share after.

The requester's quota may narrow each (`Policy`): its own work (never / lower priority /
lower or newer at equal priority), other tenants' (never / lower priority / any), and
whether it may preempt other tenants when it would end up borrowing (up to a priority).

The search is global and bounded. Each replica needs a node where it fits once some
victims leave, and the request as a whole must fit under its tenant's and ancestors'
`limit` (victims inside the blocking subtree free quota). For every candidate node (the
placement filters that read only the node's class pass it: ready, not held, labels, GPU
model) the victims on it, plus, when quota binds, up to `QUOTA_CANDIDATES` victims
elsewhere in the subtree, are searched exactly by increasing size (`COMBINATIONS`
subsets per node at most, else greedily in victim order): the cheapest sufficient set
there. Nodes are visited by a lower bound on how many victims they need, then by their
best victim; once a solution is found, only nodes whose bound does not exceed it are
visited, at most `SEARCH_NODES` more. Sets compare by the fewest victims, then the lowest
(highest, then total) priority, then the newest (the oldest victim of the set started
last). A gang places its replicas one by one this way; finally every victim whose
removal still lets the whole request fit is dropped, most valuable first (minimality).
Fitting is always decided by `placement` itself: the filter chain on a trial copy of a
node, and a trial `place_gang` in a discarded `Statement` for the whole gang.
Allocations younger than the minimum runtime are never victims.
"""

from __future__ import annotations

import bisect
import enum
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from rmgrpc.model import (
    Allocation,
    AllocationState,
    BorrowingPreemption,
    Quota,
    ReclaimPolicy,
    WithinTenantPreemption,
)
from rmgrpc.scheduler.fairshare import DIMS, Amount, Ledger, QuotaBlock
from rmgrpc.scheduler.placement import (
    CapacityView,
    NodeCapacity,
    ReplicaRequest,
    feasible,
)
from rmgrpc.scheduler.snapshot import Snapshot

# After the first solution, how many more candidate nodes are searched per replica.
SEARCH_NODES = 32
# Subsets of one node's candidates tried before falling back to the greedy order.
COMBINATIONS = 256
# Victims off the node considered for freeing quota (first in victim order, then largest).
QUOTA_CANDIDATES = 12
# Feasibility checks one search may spend before it settles for the best found.
CHECK_BUDGET = 20_000
# Most victim sets a pool keeps for searches alike (`_Search._allowed`).
_ALLOWED_KEPT = 64


class Mode(enum.Enum):
    GUARANTEE = "guaranteed quota"
    PRIORITY = "higher priority"
    FAIR_SHARE = "fair share"


@dataclass(frozen=True, slots=True)
class Policy:
    """The requester's preemption policies (its own quota's, or the safe defaults)."""

    within: WithinTenantPreemption = WithinTenantPreemption.LOWER_PRIORITY
    reclaim: ReclaimPolicy = ReclaimPolicy.ANY
    borrowing: BorrowingPreemption = BorrowingPreemption.ALWAYS
    borrowing_max_priority: int = 0

    @staticmethod
    def of(quota: Quota | None) -> Policy:
        if quota is None:
            return Policy()
        return Policy(
            quota.within_tenant_preemption,
            quota.reclaim_from_others,
            quota.preemption_while_borrowing,
            quota.borrowing_max_priority,
        )


@dataclass(slots=True)
class Victim:
    alloc: Allocation
    amount: Amount
    chain: tuple[str, ...]
    # Node id -> (GPU indices, CPU millis, memory bytes) the victim frees there (tuples:
    # thousands of victims live through the pass, and tuples of numbers leave the
    # garbage collector's sight where lists would be scanned by every full collection).
    on_node: dict[str, tuple[tuple[int, ...], int, int]] = field(default_factory=dict)
    # (GPUs, CPU millis, memory bytes) it frees in all.
    vec: tuple[int, int, int] = (0, 0, 0)
    # The allocation's id, read in hot loops (a plain field, not a property).
    id: str = field(init=False)

    def __post_init__(self) -> None:
        self.id = self.alloc.id

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


def set_cost(vs: Sequence[Victim]) -> tuple[int, int, int, float, int, tuple[str, ...]]:
    """Fewest, then lowest priority (highest, then in total), then newest (the set whose
    oldest victim started last, then arrived last); ids break ties. Only non-empty sets
    are ever compared."""
    return (
        len(vs),
        max(v.priority for v in vs),
        sum(v.priority for v in vs),
        -min(v.start for v in vs),
        -min(v.alloc.seq for v in vs),
        tuple(sorted(v.id for v in vs)),
    )


class AllowedVictims:
    """The victims one search may take, in victim order (shared, never changed, by the
    searches that allow the same).

    Built from an earlier set (`parent`, the pool's last one) when it allows a subset of
    it, as a set does once victims are taken: a node none of whose victims left has the
    same allowed victims, so it keeps the parent's list and running sums, and only the
    nodes of the victims that left are worked out again (test_scheduler_shortcuts
    compares with sets built from scratch).
    """

    __slots__ = ("_by_node", "_dirty", "_parent", "_sums", "ids", "victims")

    def __init__(self, victims: list[Victim], parent: AllowedVictims | None = None) -> None:
        self.victims = victims
        self.ids = {v.id for v in victims}
        self._by_node: tuple[dict[str, list[Victim]], list[str]] | None = None
        self._sums: dict[str, tuple[list[int], list[int], list[int]]] = {}
        # Nodes of the parent's victims this set leaves out (None: not derived).
        self._dirty: set[str] | None = None
        self._parent: AllowedVictims | None = None
        if parent is not None and victims and self.ids <= parent.ids:
            dirty = {nid for v in parent.victims if v.id not in self.ids for nid in v.on_node}
            self._dirty = dirty
            self._parent = parent
            self._sums = {nid: got for nid, got in parent._sums.items() if nid not in dirty}

    def sums_on(self, nid: str) -> tuple[list[int], list[int], list[int]]:
        """Per resource (GPUs, CPU, memory), the running sums of what the node's victims
        free there, largest first: `[0, top one, top two, ...]` (`_Search._bound`)."""
        got = self._sums.get(nid)
        if got is None:
            on = self.by_node()[0][nid]
            sizes = (
                [len(v.on_node[nid][0]) for v in on],
                [v.on_node[nid][1] for v in on],
                [v.on_node[nid][2] for v in on],
            )
            out = []
            for vals in sizes:
                acc = [0]
                for val in sorted(vals, reverse=True):
                    acc.append(acc[-1] + val)
                out.append(acc)
            got = self._sums[nid] = (out[0], out[1], out[2])
        return got

    def by_node(self) -> tuple[dict[str, list[Victim]], list[str]]:
        """The victims by node (in victim order), and those nodes in id order: what each
        replica's search ranks, grouped once."""
        if self._by_node is None:
            parent, dirty = self._parent, self._dirty
            self._parent = None  # used once: no chain of sets kept alive
            if parent is not None and dirty is not None and parent._by_node is not None:
                on, nodes = dict(parent._by_node[0]), parent._by_node[1]
                for nid in dirty:
                    kept = [v for v in on.get(nid, ()) if v.id in self.ids]
                    if kept:
                        on[nid] = kept
                    else:
                        on.pop(nid, None)
                self._by_node = (on, [nid for nid in nodes if nid in on])
            else:
                on = {}
                for v in self.victims:
                    for nid in v.on_node:
                        on.setdefault(nid, []).append(v)
                self._by_node = (on, sorted(on))
        return self._by_node


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
            amt = ledger.placed.get(a.id)
            if amt is None:
                amt = Amount.of_placed(a, ledger.gpu_models)
            v = Victim(a, amt, ledger.tree.chain(a.tenant), vec=amt.vector())
            for p in a.placements:
                gpus, cpu, mem = v.on_node.get(p.node_id, ((), 0, 0))
                v.on_node[p.node_id] = (
                    gpus + tuple(p.gpu_indices),
                    cpu + a.shape.cpu_millis,
                    mem + a.shape.memory_bytes,
                )
            self.ordered.append(v)
            for nid in v.on_node:
                self.by_node.setdefault(nid, []).append(v)
        # Victims alike for `_Search._admissible` (tenant, priority, amount freed), so a
        # search decides once per class, not per victim: class id per victim of `ordered`,
        # and each class's (tenant, priority, members in victim order). A rule there that
        # reads more of another tenant's victim must widen this key
        # (tests/unit/test_scheduler_speedups.py compares with judging one by one).
        ids: dict[tuple[str, int, tuple[int, int, int]], int] = {}
        self.class_of: list[int] = []
        self.classes: list[tuple[str, int, list[Victim]]] = []
        for v in self.ordered:
            key = (v.tenant, v.priority, v.vec)
            cid = ids.get(key)
            if cid is None:
                cid = ids[key] = len(self.classes)
                self.classes.append((v.tenant, v.priority, []))
            self.classes[cid][2].append(v)
            self.class_of.append(cid)
        # Verdicts of `_Search._allowed` (per class, taken count, own tenant's) -> answer.
        self.allowed_memo: dict[tuple[object, ...], AllowedVictims] = {}
        # The last non-empty set built: the next one is derived from it when it can be.
        self.last_allowed: AllowedVictims | None = None
        # Chosen this cycle: never chosen twice.
        self.taken: set[str] = set()
        self.min_priority = min((v.priority for v in self.ordered), default=math.inf)

    def __len__(self) -> int:
        return len(self.ordered) - len(self.taken)


class _Search:
    """One request, one mode: the cheapest victim set, or None."""

    def __init__(
        self,
        view: CapacityView,
        ledger: Ledger,
        pool: VictimPool,
        request: Allocation,
        mode: Mode,
        models: tuple[str, ...] | None,
        block: QuotaBlock | None,
        policy: Policy,
    ) -> None:
        self.view = view
        self.ledger = ledger
        self.pool = pool
        self.request = request
        self.mode = mode
        self.models = models
        self.block = block
        self.policy = policy
        self.req = ReplicaRequest(request.shape, request.id, request.priority, models)
        self.ask = Amount.of_request(request)
        self.tchain = ledger.tree.chain(request.tenant)
        self.tset = set(self.tchain)
        # Would the requester end above its guarantee? Then the borrowing policy applies.
        self.borrowing = not ledger.within_guarantee(request.tenant, self.ask)
        dims = (self.ask.gpus > 0, self.ask.cpu > 0, self.ask.mem > 0)
        fair = mode == Mode.FAIR_SHARE
        self._dims = dims
        self._fair = fair
        self._slack: dict[str, tuple[float, float, float]] = {}
        self._alone: dict[tuple[str, tuple[int, int, int]], bool] = {}
        # The pool is in victim order (lowest priority first): stop at the first victim
        # no rule of this mode could accept by priority.
        top = self._max_victim_priority()
        self._allowed_set = self._allowed(top)
        self.allowed: list[Victim] = self._allowed_set.victims
        self.allowed_ids = self._allowed_set.ids
        self.chosen: list[Victim] = []
        self.checks = 0

    # -- who may be a victim ------------------------------------------------------------

    def _max_victim_priority(self) -> float:
        p = self.request.priority
        if self.mode == Mode.GUARANTEE:
            return p - 1 if self.policy.reclaim == ReclaimPolicy.LOWER_PRIORITY else math.inf
        return p  # priority mode: lower (or equal and newer, own work); fair share: equal

    def _admissible(self, v: Victim) -> bool:
        """The mode's and the policies' rule for one victim on its own."""
        if v.id in self.pool.taken:
            return False
        r = self.request
        pol = self.policy
        if v.tenant == r.tenant:
            if self.mode != Mode.PRIORITY:
                return False  # reclaim and fair share take from other tenants only
            if pol.within == WithinTenantPreemption.NEVER:
                return False
            if v.priority < r.priority:
                return True
            return (
                pol.within == WithinTenantPreemption.LOWER_OR_NEWER_EQUAL_PRIORITY
                and v.priority == r.priority
                and (v.alloc.seq, v.alloc.create_time) > (r.seq, r.create_time)
            )
        if self.mode == Mode.GUARANTEE and (v.tenant in self.tset or r.tenant in v.chain):
            return False  # its own subtree's work is not "borrowed from others"
        if pol.reclaim == ReclaimPolicy.NEVER:
            return False
        if pol.reclaim == ReclaimPolicy.LOWER_PRIORITY and v.priority >= r.priority:
            return False
        if self.mode == Mode.PRIORITY and v.priority >= r.priority:
            return False
        if self.mode == Mode.FAIR_SHARE and v.priority > r.priority:
            return False
        if self.borrowing and not self._inside_own_tree(v):
            if pol.borrowing == BorrowingPreemption.NEVER:
                return False
            if (
                pol.borrowing == BorrowingPreemption.UP_TO_PRIORITY
                and v.priority > pol.borrowing_max_priority
            ):
                return False
        # Alone it must already respect its tenants' guarantees (alike victims of one
        # tenant get the same answer: remember it).
        key = (v.tenant, v.vec)
        ok = self._alone.get(key)
        if ok is None:
            ok = self._alone[key] = self._tenants_ok([v])
        return ok

    def _allowed(self, top: float) -> AllowedVictims:
        """The pool's victims `_admissible` accepts, in victim order, none above `top`.

        Decided once per class of alike victims (`VictimPool.classes`: tenant, priority,
        amount), on the class's first member not taken yet; the requester's own tenant's
        one by one (the equal-priority rule reads each one's arrival). Searches that
        reach the same verdicts share one answer (`VictimPool.allowed_memo`).
        """
        pool = self.pool
        taken = pool.taken
        tenant = self.request.tenant
        verdict: list[bool | None] = []
        own: list[str] = []
        for t, priority, members in pool.classes:
            if priority > top:
                verdict.append(False)
            elif t == tenant:
                verdict.append(None)  # per victim
                own.extend(v.id for v in members if self._admissible(v))
            else:
                first = next((v for v in members if v.id not in taken), None)
                verdict.append(first is not None and self._admissible(first))
        key = (tuple(verdict), len(taken), tuple(own))
        got = pool.allowed_memo.get(key)
        if got is not None:
            return got
        own_ok = set(own)
        out = []
        for v, cid in zip(pool.ordered, pool.class_of, strict=True):
            ok = verdict[cid]
            if ok is None:
                ok = v.id in own_ok
            elif ok:
                ok = v.id not in taken
            if ok:
                out.append(v)
        if len(pool.allowed_memo) >= _ALLOWED_KEPT:
            pool.allowed_memo.clear()
        got = pool.allowed_memo[key] = AllowedVictims(out, pool.last_allowed)
        if out:  # an empty set has nothing to hand on
            pool.last_allowed = got
        return got

    def _inside_own_tree(self, v: Victim) -> bool:
        return v.tenant in self.tset or self.request.tenant in v.chain

    def _slack_of(self, y: str) -> tuple[float, float, float]:
        sl = self._slack.get(y)
        if sl is None:
            sl = self._slack[y] = self.ledger.slack(y, self._dims, fair=self._fair)
        return sl

    def _tenants_ok(self, vs: Iterable[Victim]) -> bool:
        """What the set takes from each victim tenant subtree (below the common ancestor
        with the requester) respects its guarantee, or, reclaiming, its borrowing, in
        each resource the request asks for."""
        sums: dict[str, list[int]] = {}
        tops: dict[str, list[int]] = {}
        for v in vs:
            if v.tenant == self.request.tenant:
                continue
            for y in v.chain:
                if y in self.tset:
                    break  # common ancestors: their totals do not change
                s = sums.setdefault(y, [0, 0, 0])
                m = tops.setdefault(y, [0, 0, 0])
                for i in range(3):
                    s[i] += v.vec[i]
                    m[i] = max(m[i], v.vec[i])
        reclaim = self.mode == Mode.GUARANTEE
        dims = self._dims
        for y, s in sums.items():
            sl = self._slack_of(y)
            m = tops[y]
            for i in range(3):
                # Judged only in what the request asks for (as Kueue, in the resources
                # the incoming workload needs): a CPU guarantee does not shield GPU work
                # from a GPU-only ask.
                if s[i] <= 0 or not dims[i]:
                    continue
                if reclaim:
                    # Still borrowing before the last (largest) victim is taken.
                    if s[i] - m[i] >= sl[i]:
                        return False
                elif s[i] > sl[i]:
                    return False
        return True

    # -- what fits ------------------------------------------------------------------------

    def _quota_ok(self, vs: Iterable[Victim]) -> bool:
        """The whole request fits its tenant's and ancestors' limits with `vs` gone (the
        first replica carries this, before anything is chosen)."""
        freed: dict[str, Amount] = {}
        for v in vs:
            for t in v.chain:
                cur = freed.get(t)
                if cur is None:
                    cur = freed[t] = Amount()
                cur.add(v.amount)
        return self.ledger.limit_block(self.request.tenant, self.ask, freed) is None

    def _ok(self, vs: Sequence[Victim], node: NodeCapacity | None, quota: bool) -> bool:
        self.checks += 1
        if node is not None:
            released = [v.on_node[node.id] for v in vs if node.id in v.on_node]
            if feasible(node.trial(released), self.req) is not None:
                return False
        if quota and not self._quota_ok(vs):
            return False
        return self._tenants_ok(itertools.chain(self.chosen, vs))

    def _whole_ok(self, vs: Sequence[Victim]) -> bool:
        """The whole gang places with `vs` gone, within quota and guarantees."""
        st = self.view.statement()
        try:
            for v in vs:
                self.view.release(v.alloc)
            placed = self.view.place_gang(
                self.request.shape,
                self.request.count,
                owner=self.request.id,
                priority=self.request.priority,
                models=self.models,
            )
        finally:
            st.discard()
        if placed is None:
            return False
        return (self.block is None or self._quota_ok(vs)) and self._tenants_ok(vs)

    # -- the search -----------------------------------------------------------------------

    def _cheapest(
        self, cands: Sequence[Victim], node: NodeCapacity | None, quota: bool, lower: int
    ) -> list[Victim] | None:
        """The cheapest sufficient subset of `cands`: exact by increasing size, bounded."""
        tried = 0
        for k in range(max(lower, 1), len(cands) + 1):
            best: tuple[Victim, ...] | None = None
            for combo in itertools.combinations(cands, k):
                tried += 1
                if tried > COMBINATIONS or self.checks > CHECK_BUDGET:
                    break
                if self._ok(combo, node, quota) and (
                    best is None or set_cost(combo) < set_cost(best)
                ):
                    best = combo
            if best is not None:
                return list(best)
            if tried > COMBINATIONS or self.checks > CHECK_BUDGET:
                break
        # Too many to try them all: take them in victim order, skipping any that would
        # break a guarantee, then drop those not needed.
        acc: list[Victim] = []
        for v in cands:
            if not self._tenants_ok(itertools.chain(self.chosen, acc, [v])):
                continue
            acc.append(v)
            if self._ok(acc, node, quota):
                for x in sorted(acc, key=lambda x: victim_order(x.alloc), reverse=True):
                    trial = [y for y in acc if y is not x]
                    if trial and self._ok(trial, node, quota):
                        acc = trial
                return acc
        return None

    def _quota_bound(self, cands: Sequence[Victim]) -> int:
        """Fewest of `cands` whose removal could bring every limit the request breaks
        back within bounds: per limit on its chain (a resource, or a GPU model), the
        largest victims inside that subtree summed until they cover the excess. A lower
        bound, so the exact search starts there rather than spending its budget on sets
        too small to free the quota (and falling back to a greedy answer with more
        victims than needed). More than `len(cands)` when no subset can."""
        need = 1
        for b in self.ledger.limit_breaches(self.request.tenant, self.ask):
            over = b.held + b.need - b.limit
            inside = [v for v in cands if b.tenant in v.chain]
            if b.model:
                gives = [v.amount.models.get(b.model, 0) for v in inside]
            else:
                i = DIMS.index(b.dim)
                gives = [v.amount.vector()[i] for v in inside]
            got, k = 0, 0
            for g in sorted(gives, reverse=True):
                if got >= over:
                    break
                got += g
                k += 1
            need = max(need, k if got >= over else len(cands) + 1)
        return need

    def _lower_bound(self, n: NodeCapacity, cands: Sequence[Victim]) -> float:
        """Fewest of `cands` that could cover what one replica lacks on `n` (counting
        free GPUs of every model together, so never more than truly needed)."""
        s = self.request.shape
        lack = (s.gpus - n.total_free, s.cpu_millis - n.cpu_free, s.memory_bytes - n.mem_free)
        need = 0
        nid = n.id
        for i, x in enumerate(lack):
            if x <= 0:
                continue  # most nodes lack only GPUs: sort only what is lacking
            if i == 0:
                vals = sorted((len(v.on_node[nid][0]) for v in cands), reverse=True)
            elif i == 1:
                vals = sorted((v.on_node[nid][1] for v in cands), reverse=True)
            else:
                vals = sorted((v.on_node[nid][2] for v in cands), reverse=True)
            got, k = 0, 0
            for val in vals:
                if got >= x:
                    break
                got += val
                k += 1
            if got < x:
                return math.inf
            need = max(need, k)
        return need

    def _bound(self, n: NodeCapacity, sums: tuple[list[int], list[int], list[int]]) -> float:
        """`_lower_bound` over all the node's allowed victims, from their running sums
        (`AllowedVictims.sums_on`, built once per node): the fewest whose sum covers
        each lacking resource, by bisection instead of a sort per replica and node."""
        s = self.request.shape
        lack = (s.gpus - n.total_free, s.cpu_millis - n.cpu_free, s.memory_bytes - n.mem_free)
        need = 0
        for x, acc in zip(lack, sums, strict=True):
            if x <= 0:
                continue
            k = bisect.bisect_left(acc, x)
            if k == len(acc):
                return math.inf
            need = max(need, k)
        return need

    def _quota_candidates(self, exclude: set[str]) -> list[Victim]:
        assert self.block is not None
        # The topmost tenant on the chain whose limit binds: victims anywhere in its
        # subtree free quota there (the nearest one's subtree alone may not be enough).
        top = self.block.tenant
        above = self.ledger.tree.parent.get(top, "")
        while above:
            b = self.ledger.limit_block(above, self.ask)
            if b is None:
                break
            top = b.tenant
            above = self.ledger.tree.parent.get(top, "")
        inside = [v for v in self.allowed if top in v.chain and v.id not in exclude]
        if not inside:
            inside = [v for v in self.allowed if self.tset & set(v.chain) and v.id not in exclude]
        first = inside[:QUOTA_CANDIDATES]
        largest = sorted(inside, key=lambda v: (-v.vec[0], -v.vec[1], -v.vec[2]))
        seen = {v.id for v in first}
        out = list(first)
        for v in largest[: QUOTA_CANDIDATES // 3]:
            if v.id not in seen:
                out.append(v)
                seen.add(v.id)
        out.sort(key=lambda v: victim_order(v.alloc))
        return out

    def _replica(self, first: bool) -> list[Victim] | None:
        """Victims (beyond those chosen) that let one more replica be placed."""
        view = self.view
        quota = first and self.block is not None
        taken = {v.id for v in self.chosen}
        best: list[Victim] | None = None

        def consider(got: list[Victim] | None) -> None:
            nonlocal best
            if got is not None and (best is None or set_cost(got) < set_cost(best)):
                best = got

        if view.fits(
            self.request.shape,
            1,
            owner=self.request.id,
            priority=self.request.priority,
            models=self.models,
        ):
            if not quota:
                return []
            cands = self._quota_candidates(taken)
            consider(self._cheapest(cands, None, True, self._quota_bound(cands)))
        qc = self._quota_candidates(taken) if quota else []
        ranked: list[tuple[float, tuple[int, float, int, str], str, list[Victim]]] = []
        # The nodes that hold allowed victims and whose class passes the placement filters.
        allowed_on, allowed_nodes = self._allowed_set.by_node()
        for nid in view.class_passing(allowed_nodes, self.req):
            on = allowed_on[nid]
            if taken:
                on = [v for v in on if v.id not in taken]
                if not on:
                    continue
            if len(on) == len(allowed_on[nid]):
                lb = self._bound(view.nodes[nid], self._allowed_set.sums_on(nid))
            else:
                lb = self._lower_bound(view.nodes[nid], on)
            if lb == math.inf:
                continue
            ranked.append((lb, victim_order(on[0].alloc), nid, on))
        ranked.sort(key=lambda r: (r[0], r[1], r[2]))
        after = 0
        for lb, _, nid, on in ranked:
            if best is not None:
                if lb > len(best) or after >= SEARCH_NODES:
                    break
                after += 1
            if self.checks > CHECK_BUDGET:
                break
            cands = on
            if quota:
                ids = {v.id for v in on}
                cands = sorted(
                    on + [v for v in qc if v.id not in ids], key=lambda v: victim_order(v.alloc)
                )
                lb = max(lb, self._quota_bound(cands))
            consider(self._cheapest(cands, view.nodes[nid], quota, int(lb)))
        return best

    def run(self, budget: int) -> list[Victim] | None:
        r = self.request
        view = self.view
        st = view.statement()
        try:
            for i in range(max(r.count, 0)):
                got = self._replica(i == 0)
                if got is None:
                    return None
                for v in got:
                    self.chosen.append(v)
                    view.release(v.alloc)
                if (
                    view.place_gang(r.shape, 1, owner=r.id, priority=r.priority, models=self.models)
                    is None
                ):
                    return None
        finally:
            st.discard()
        out = list(self.chosen)
        self.chosen = []
        if not out:
            return None
        # Minimality: drop each victim the whole request turns out not to need.
        for v in sorted(out, key=lambda v: victim_order(v.alloc), reverse=True):
            trial = [x for x in out if x is not v]
            if trial and self._whole_ok(trial):
                out = trial
        if len(out) > budget or not self._whole_ok(out):
            return None
        return out


def select_victims(
    view: CapacityView,
    ledger: Ledger,
    pool: VictimPool,
    request: Allocation,
    mode: Mode,
    *,
    models: tuple[str, ...] | None,
    budget: int,
    block: QuotaBlock | None = None,
    policy: Policy | None = None,
) -> list[Victim] | None:
    """Victims that let `request` be placed whole (and, when `block` says its quota binds,
    fit under its limits), or None. Leaves `view` as it was."""
    if budget <= 0:
        return None
    if policy is None:
        policy = Policy.of(ledger.snapshot.quotas.get(request.tenant))
    search = _Search(view, ledger, pool, request, mode, models, block, policy)
    if not search.allowed:
        return None
    return search.run(budget)


def borrowers(ledger: Ledger, tenant: str) -> list[tuple[str, int]]:
    """Other tenants holding GPUs above their own guarantee: (tenant, GPUs borrowed)."""
    tset = set(ledger.tree.chain(tenant))
    out = []
    for t, own in sorted(ledger.own_held.items()):
        if own.gpus <= 0 or t in tset or tenant in ledger.tree.chain(t):
            continue
        g = ledger.tree.guaranteed(t).gpus or 0
        over = ledger.effective(t).gpus - g
        if over > 0:
            out.append((t, over))
    return out


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
