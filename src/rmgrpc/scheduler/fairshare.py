"""Fair share: the tenant tree, quota limits and guarantees, weighted DRF, fair-share numbers.

A tenant's usage is counted over its subtree (a parent's quota bounds its children).
`Ledger` keeps, for one pass, what every tenant holds, what it is about to give back
(preempted allocations still in their grace) and what it asks for; the cycle updates it
as it admits and preempts, so the order of the queue (weighted dominant share) is
recomputed as the pass goes.

Fair share is computed top-down over the tree, KAI-style: at each level the capacity the
parent got is split among the children with demand, first up to each child's guarantee,
then the rest by weight (water-filling), never above a child's demand or limit. A
tenant's own allocations beside its children count as one more child of weight 1. A
child of weight 0 gets only what its weighted siblings leave (their demand met).

The queue is ordered the same way, level by level (Kueue's hierarchical tournament):
a tenant's *order key* is the score of each of its ancestors from the root down, then
its own (and, for a parent with children, its own work's, as that extra child).
Comparing keys compares two tenants at the first level where their ancestors differ,
that is between siblings, so siblings divide their parent's entitlement by weight
whatever happens below them. A level's score is its dominant share (DRF) of
max(held now, recent usage) above its guarantee, over its weight; weight 0 sorts after
every weighted sibling. The queue itself (`FairQueue`) runs this as a tournament and
scores each level with the candidate request admitted, as Kueue does.

*Recent usage* is what the subtree held, averaged with an exponential half-life (Slurm's
PriorityDecayHalfLife): a tenant that just burst keeps its place at the back for a while
after its work ends, and an idle one gets its turn.

A quota's `lending_limit` caps how much of its idle guarantee others may borrow: the
rest of the guarantee stays free for the tenant's subtree even while it is idle.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from rmgrpc.model import Allocation, AllocationState, Node, Quota, Resources, parent_of
from rmgrpc.scheduler.placement import cpu_text, gpus_text, memory_text
from rmgrpc.scheduler.snapshot import SchedulerConfig, Snapshot

EPS = 1e-9
# Dimensions of an amount, in the order fair-share vectors use.
DIMS = ("gpus", "cpu", "mem")


class Amount:
    """A mutable amount of capacity, with GPUs also counted per model where known."""

    __slots__ = ("cpu", "gpus", "mem", "models")

    def __init__(
        self, gpus: int = 0, cpu: int = 0, mem: int = 0, models: dict[str, int] | None = None
    ) -> None:
        self.gpus = gpus
        self.cpu = cpu
        self.mem = mem
        self.models: dict[str, int] = models if models is not None else {}

    @staticmethod
    def of_request(alloc: Allocation) -> Amount:
        s = alloc.shape
        n = max(alloc.count, 0)
        models = {s.gpu_model: n * s.gpus} if s.gpu_model and s.gpus else {}
        return Amount(n * s.gpus, n * s.cpu_millis, n * s.memory_bytes, models)

    @staticmethod
    def of_placed(alloc: Allocation, gpu_models: Mapping[str, Mapping[int, str]]) -> Amount:
        """What a placed allocation holds, GPUs counted by the model they really are."""
        if not alloc.placements:
            return Amount.of_request(alloc)
        s = alloc.shape
        amt = Amount(
            0, s.cpu_millis * len(alloc.placements), s.memory_bytes * len(alloc.placements)
        )
        for p in alloc.placements:
            amt.gpus += len(p.gpu_indices)
            models = gpu_models.get(p.node_id, {})
            for i in p.gpu_indices:
                m = models.get(i, s.gpu_model)
                if m:
                    amt.models[m] = amt.models.get(m, 0) + 1
        return amt

    def add(self, other: Amount, sign: int = 1) -> None:
        self.gpus += sign * other.gpus
        self.cpu += sign * other.cpu
        self.mem += sign * other.mem
        for m, v in other.models.items():
            self.models[m] = self.models.get(m, 0) + sign * v

    def minus(self, other: Amount | None) -> Amount:
        out = self.copy()
        if other is not None:
            out.add(other, -1)
        return out

    def copy(self) -> Amount:
        return Amount(self.gpus, self.cpu, self.mem, dict(self.models))

    def vector(self) -> tuple[int, int, int]:
        return (self.gpus, self.cpu, self.mem)

    def is_zero(self) -> bool:
        return not (self.gpus or self.cpu or self.mem)

    def to_resources(self) -> Resources:
        return Resources(
            gpus=self.gpus,
            cpu_millis=self.cpu,
            memory_bytes=self.mem,
            gpus_by_model={m: v for m, v in sorted(self.models.items()) if v},
        )

    def __repr__(self) -> str:
        return f"Amount(gpus={self.gpus}, cpu={self.cpu}, mem={self.mem}, models={self.models})"


def _limit_dims(r: Resources) -> tuple[int | None, int | None, int | None]:
    return (r.gpus, r.cpu_millis, r.memory_bytes)


def _any_bound(r: Resources) -> bool:
    return r.gpus is not None or r.cpu_millis is not None or r.memory_bytes is not None


def running_weight(held_for: float, decay: float) -> float:
    """How much of an allocation's amount counts in recent usage after holding it for
    `held_for` seconds (`decay` = ln 2 / half-life): 1 - e^(-decay * held_for)."""
    return -math.expm1(-decay * max(0.0, held_for))


class UsageHistory:
    """Recent usage of work that already ended, per tenant; kept by the engine.

    Recent usage is Slurm's decayed usage as an average rate: what a tenant held at time
    u counts at time t with weight k·e^(-k(t-u)), k = ln 2 / half-life. An interval
    [start, end] of holding `amount` thus counts amount·(e^(-k(t-end)) - e^(-k(t-start))),
    which only decays once it ended: one number per tenant and resource, scaled as time
    passes. It is derived from durable data (the allocations' placed and end times), so
    a restart rebuilds it by replaying the retained ended allocations; nothing is
    written for it. Pure: the caller passes the times.
    """

    def __init__(self, half_life_seconds: float) -> None:
        self.decay = math.log(2) / half_life_seconds if half_life_seconds > 0 else 0.0
        # Tenant -> (time of the value, value per resource).
        self._acc: dict[str, tuple[float, list[float]]] = {}

    def ended(self, tenant: str, amount: Sequence[float], start: float, end: float) -> None:
        """`tenant` held `amount` (GPUs, CPU millis, memory bytes) from `start` to `end`."""
        if not self.decay or end <= start:
            return
        part = running_weight(end - start, self.decay)
        at, cur = self._acc.get(tenant, (end, [0.0, 0.0, 0.0]))
        if end < at:  # an interval that ended before the last one: decay it, not the sum
            part *= math.exp(-self.decay * (at - end))
            end = at
        scale = math.exp(-self.decay * (end - at))
        self._acc[tenant] = (end, [c * scale + a * part for c, a in zip(cur, amount, strict=True)])

    def values(self, now: float) -> dict[str, tuple[float, float, float]]:
        """Every tenant's recent usage of ended work as of `now` (negligible ones dropped)."""
        out: dict[str, tuple[float, float, float]] = {}
        for t, (at, cur) in self._acc.items():
            f = math.exp(-self.decay * max(0.0, now - at))
            v = (cur[0] * f, cur[1] * f, cur[2] * f)
            if v[0] > 1e-6 or v[1] > 1e-3 or v[2] > 1.0:
                out[t] = v
        return out


def _amount_text(dim: str, v: float, model: str = "") -> str:
    if dim == "gpus":
        return gpus_text(int(v), model)
    if dim == "cpu":
        return cpu_text(int(v))
    return memory_text(int(v))


# ---------------------------------------------------------------------------------------
# The tenant tree.


class TenantTree:
    """Parents, children and effective quotas of every tenant the pass knows about."""

    def __init__(
        self, quotas: Mapping[str, Quota], tenants: Iterable[str], config: SchedulerConfig
    ) -> None:
        self.quotas = quotas
        self.config = config
        self.parent: dict[str, str] = {}
        self._chain: dict[str, tuple[str, ...]] = {}
        for t in sorted(set(quotas) | set(tenants)):
            self._add(t)
        children: dict[str, list[str]] = {}
        for t, p in self.parent.items():
            children.setdefault(p, []).append(t)
        self.children: dict[str, list[str]] = {p: sorted(c) for p, c in children.items()}
        self.roots: list[str] = self.children.get("", [])

    def _parent_of(self, t: str) -> str:
        q = self.quotas.get(t)
        if q is not None and q.parent:
            return q.parent
        return parent_of(t)

    def _add(self, t: str) -> None:
        seen: list[str] = []
        while t and t not in self.parent:
            p = self._parent_of(t)
            if p in seen or p == t:  # a loop in explicit parents: cut it here
                p = ""
            self.parent[t] = p
            seen.append(t)
            t = p

    def chain(self, t: str) -> tuple[str, ...]:
        """The tenant and its ancestors, nearest first."""
        c = self._chain.get(t)
        if c is None:
            if t not in self.parent:
                self._add(t)
            out: list[str] = []
            x = t
            while x and len(out) <= len(self.parent):
                out.append(x)
                x = self.parent.get(x, "")
            c = tuple(out)
            self._chain[t] = c
        return c

    def limit(self, t: str) -> Resources:
        q = self.quotas.get(t)
        return q.limit if q is not None else self.config.default_limit

    def guaranteed(self, t: str) -> Resources:
        q = self.quotas.get(t)
        return q.guaranteed if q is not None else Resources()

    def has_explicit_guarantee(self, t: str) -> bool:
        return t in self.quotas

    def lending_limit(self, t: str) -> Resources:
        q = self.quotas.get(t)
        return q.lending_limit if q is not None else Resources()

    def weight(self, t: str) -> float:
        q = self.quotas.get(t)
        w = q.weight if q is not None else self.config.default_weight
        return w if w > 0 else 0.0


# ---------------------------------------------------------------------------------------
# Quota reasons.


@dataclass(frozen=True, slots=True)
class QuotaBlock:
    """Admitting the request would take `tenant` over its limit in one dimension."""

    tenant: str
    requester: str
    dim: str
    model: str
    held: int
    limit: int
    need: int

    def text(self) -> str:
        held = _amount_text(self.dim, self.held, self.model)
        limit = _amount_text(self.dim, self.limit, self.model)
        need = _amount_text(self.dim, self.need, self.model)
        held_n = held.split(" ", 1)[0]
        if self.tenant == self.requester:
            return (
                f"over quota of tenant {self.tenant}: holds {held_n} of limit {limit}, asks {need}"
            )
        return (
            f"parent quota `{self.tenant}` full: its subtree holds {held_n} of limit {limit}, "
            f"tenant {self.requester} asks {need}"
        )


# ---------------------------------------------------------------------------------------
# The ledger of one pass.


# Most answers a ledger remembers per memo (`Ledger.within_guarantee`, `queue_score`).
_MEMO_KEPT = 4096


class Ledger:
    """Per-tenant (subtree) held, leaving and pending amounts, fair shares, and quota checks."""

    def __init__(self, snapshot: Snapshot, *, total: Amount | None = None) -> None:
        self.snapshot = snapshot
        self.config = snapshot.config
        now = snapshot.now
        allocs = list(snapshot.allocations.values())
        self.tree = TenantTree(snapshot.quotas, (a.tenant for a in allocs), snapshot.config)
        self.gpu_models: dict[str, dict[int, str]] = {
            nid: {g.index: g.model for g in n.gpus} for nid, n in snapshot.nodes.items()
        }
        self.held: dict[str, Amount] = {}
        self.leaving: dict[str, Amount] = {}
        self.pending: dict[str, Amount] = {}
        self.own_held: dict[str, Amount] = {}
        self.own_pending: dict[str, Amount] = {}
        self.running: dict[str, int] = {}
        # What each allocation holding capacity holds (`Amount.of_placed`), by id: victim
        # search reuses it. Never changed once built.
        self.placed: dict[str, Amount] = {}
        self.waiting: dict[str, int] = {}
        # Scores by tenant (and by tenant's own work), dropped when its usage changes.
        self._scores: dict[str, tuple[int, float]] = {}
        self._own_scores: dict[str, tuple[int, float]] = {}
        self._vecs: dict[str, tuple[int, int, int]] = {}
        self._own_vecs: dict[str, tuple[int, int, int]] = {}
        # `effective` by tenant, dropped with `_vecs` (read-only to its users).
        self._effs: dict[str, Amount] = {}
        # Usage versions: bumped for a tenant whenever its subtree's held or leaving
        # amounts change (and, in `_own_ver`, its own held). Memoized answers that read
        # only those amounts (`within_guarantee`, `queue_score`) stay valid while the
        # versions they were computed at hold: the queue asks the same few request
        # classes over and over between admissions.
        self._ver: dict[str, int] = {}
        self._own_ver: dict[str, int] = {}
        self._within_memo: dict[tuple[object, ...], tuple[tuple[int, ...], bool]] = {}
        self._guarantees: dict[str, bool] = {}
        self._limits: dict[str, bool] = {}
        self._score_memo: dict[
            tuple[str, bool, tuple[int, int, int]], tuple[int, tuple[int, int, float, float]]
        ] = {}
        # Everything held, whoever holds it (tenants may join the tree later).
        self.held_total = Amount()
        # (tenant, own) -> (recent usage, guarantee, weight): fixed for the pass.
        self._static: dict[
            tuple[str, bool], tuple[tuple[float, float, float], tuple[int, int, int], float]
        ] = {}
        # Recent (decayed) usage, of the subtree and of a tenant's own work.
        self.half_life = self.config.fair_share_half_life_seconds
        self.recent: dict[str, list[float]] = {}
        self.own_recent: dict[str, list[float]] = {}
        decay = math.log(2) / self.half_life if self.half_life > 0 else 0.0
        # Amounts and counts are summed per tenant first, then carried up each tenant's
        # chain once: thousands of allocations of a handful of tenants walk the tree a
        # handful of times, not once each. Sound: integer sums in any grouping are the
        # same, and tenants are taken in the order of their first allocation, so every
        # table gets its keys in the order the walk per allocation gave them
        # (test_scheduler_shortcuts compares with that walk). Recent usage is a float sum
        # and stays per allocation, in the same order.
        held_by: dict[str, Amount] = {}
        leaving_by: dict[str, Amount] = {}
        running_by: dict[str, int] = {}
        waiting_by: dict[str, int] = {}
        for a in sorted(allocs, key=lambda a: a.id):
            if a.holds_capacity(now):
                amt = self.placed[a.id] = Amount.of_placed(a, self.gpu_models)
                self._bump(held_by, a.tenant, amt)
                if a.state == AllocationState.PREEMPTED:
                    self._bump(leaving_by, a.tenant, amt)
                running_by[a.tenant] = running_by.get(a.tenant, 0) + 1
                if decay:
                    start = a.allocate_time if a.allocate_time is not None else a.create_time
                    self._add_recent(a.tenant, amt.vector(), running_weight(now - start, decay))
            elif a.state == AllocationState.PENDING:
                self._bump(self.own_pending, a.tenant, Amount.of_request(a))
                waiting_by[a.tenant] = waiting_by.get(a.tenant, 0) + 1
        for tenant, amt in held_by.items():
            self.add_held(tenant, amt)
        for tenant, amt in leaving_by.items():
            self.add_leaving(tenant, amt)
        for tenant, n in running_by.items():
            for t in self.tree.chain(tenant):
                self.running[t] = self.running.get(t, 0) + n
        for tenant, amt in self.own_pending.items():
            for t in self.tree.chain(tenant):
                self._bump(self.pending, t, amt)
                self.waiting[t] = self.waiting.get(t, 0) + waiting_by[tenant]
        if decay:
            for t, vec in sorted(snapshot.ended_usage.items()):
                self._add_recent(t, vec, 1.0)
        self.lenders = sorted(t for t, q in snapshot.quotas.items() if _any_bound(q.lending_limit))
        self.total = total if total is not None else cluster_total(snapshot)
        # (index, capacity) of the resources the cluster has any of.
        self._dims = [(i, c) for i, c in enumerate(self.total.vector()) if c > 0]
        # A parent's own work's share beside its children (filled by `fair_shares`).
        self.own_fair: dict[str, Vec] = {}
        self.fair = fair_shares(self)
        # Resources the tenants together ask more of than the cluster has: fair share
        # only arbitrates those (where everyone can have what it asks, nobody reclaims).
        demand = [0, 0, 0]
        for t in self.tree.roots:
            d = self.effective(t).vector()
            p = (self.pending.get(t) or Amount()).vector()
            for i in range(3):
                demand[i] += d[i] + p[i]
        tot = self.total.vector()
        self.contended = (demand[0] > tot[0], demand[1] > tot[1], demand[2] > tot[2])

    # -- bookkeeping ------------------------------------------------------------------

    @staticmethod
    def _bump(table: dict[str, Amount], t: str, amt: Amount, sign: int = 1) -> None:
        cur = table.get(t)
        if cur is None:
            cur = table[t] = Amount()
        cur.add(amt, sign)

    def _add_recent(self, tenant: str, vec: Sequence[float], factor: float) -> None:
        for table, who in ((self.own_recent, (tenant,)), (self.recent, self.tree.chain(tenant))):
            for t in who:
                cur = table.get(t)
                if cur is None:
                    cur = table[t] = [0.0, 0.0, 0.0]
                for i in range(3):
                    cur[i] += vec[i] * factor

    def add_held(self, tenant: str, amt: Amount, sign: int = 1) -> None:
        self.held_total.add(amt, sign)
        self._bump(self.own_held, tenant, amt, sign)
        self._own_scores.pop(tenant, None)
        self._own_vecs.pop(tenant, None)
        self._own_ver[tenant] = self._own_ver.get(tenant, 0) + 1
        for t in self.tree.chain(tenant):
            self._bump(self.held, t, amt, sign)
            self._scores.pop(t, None)
            self._vecs.pop(t, None)
            self._effs.pop(t, None)
            self._ver[t] = self._ver.get(t, 0) + 1

    def add_leaving(self, tenant: str, amt: Amount, sign: int = 1) -> None:
        for t in self.tree.chain(tenant):
            self._bump(self.leaving, t, amt, sign)
            self._scores.pop(t, None)
            self._vecs.pop(t, None)
            self._effs.pop(t, None)
            self._ver[t] = self._ver.get(t, 0) + 1

    def held_of(self, t: str) -> Amount:
        return self.held.get(t) or Amount()

    def effective(self, t: str) -> Amount:
        """Held minus what is already leaving (preempted, in grace)."""
        return self.held_of(t).minus(self.leaving.get(t))

    def _effective_kept(self, t: str) -> Amount:
        """`effective`, kept until the tenant's usage changes, for hot read-only checks
        (the queue asks `within_guarantee` at every pop)."""
        got = self._effs.get(t)
        if got is None:
            got = self._effs[t] = self.effective(t)
        return got

    # -- ordering -------------------------------------------------------------------------

    def dominant_share(self, t: str) -> float:
        eff = self.effective(t).vector()
        tot = self.total.vector()
        return max((e / c for e, c in zip(eff, tot, strict=True) if c > 0), default=0.0)

    def weighted_dominant_share(self, t: str) -> float:
        w = self.tree.weight(t)
        ds = self.dominant_share(t)
        if w <= 0:
            return float("inf") if ds > 0 else 0.0
        return ds / w

    def recent_of(self, t: str, *, own: bool = False) -> tuple[float, float, float]:
        """Recent (decayed) usage: (GPUs, CPU millis, memory bytes) averaged over time."""
        r = (self.own_recent if own else self.recent).get(t)
        return (r[0], r[1], r[2]) if r else (0.0, 0.0, 0.0)

    def order_usage(self, t: str, *, own: bool = False) -> tuple[float, float, float]:
        """What a level is ordered by: per resource, the larger of held now (minus what
        is leaving) and recent usage."""
        eff = (self.own_held.get(t) or Amount()).vector() if own else self.effective(t).vector()
        r = self.recent_of(t, own=own)
        return (max(eff[0], r[0]), max(eff[1], r[1]), max(eff[2], r[2]))

    def _shares(self, t: str, own: bool, ask: tuple[int, int, int]) -> tuple[int, float, float]:
        """(weight-0 tier, share now, share with `ask` admitted) of one level, over its
        weight. Hot (every queue pop re-scores a chain): written out per resource."""
        cache = self._own_vecs if own else self._vecs
        held = cache.get(t)
        if held is None:
            h = (self.own_held if own else self.held).get(t)
            x = None if own else self.leaving.get(t)
            if h is None:
                held = (0, 0, 0)
            elif x is None:
                held = (h.gpus, h.cpu, h.mem)
            else:
                held = (h.gpus - x.gpus, h.cpu - x.cpu, h.mem - x.mem)
            cache[t] = held
        st = self._static.get((t, own))
        if st is None:
            r = self.recent_of(t, own=own)
            g = (0, 0, 0) if own else _limit_dims(self.tree.guaranteed(t))
            w = 1.0 if own else self.tree.weight(t)
            st = self._static[(t, own)] = (r, (g[0] or 0, g[1] or 0, g[2] or 0), w)
        r, g, w = st
        now = after = -math.inf
        # Over the resources the level uses, asks or is guaranteed: one it neither uses
        # nor is promised says nothing about it (and would pin every share at 0).
        for i, c in self._dims:
            have = held[i]
            use = have if have > r[i] else r[i]
            if use > 0 or g[i]:
                v = (use - g[i]) / c
                if v > now:
                    now = v
            have += ask[i]
            use = have if have > r[i] else r[i]
            if use > 0 or g[i]:
                v = (use - g[i]) / c
                if v > after:
                    after = v
        if now == -math.inf:
            now = 0.0
        if after == -math.inf:
            after = 0.0
        if w <= 0:
            return (1, now, after)  # weight 0: after every weighted sibling
        return (0, now / w, after / w)

    def _level_score(self, t: str, own: bool) -> tuple[int, float]:
        tier, now, _ = self._shares(t, own, (0, 0, 0))
        return (tier, now)

    def queue_score(
        self, t: str, own: bool, ask: tuple[int, int, int]
    ) -> tuple[int, int, float, float]:
        """`_queue_score`, remembered per (level, ask) until the level's usage changes."""
        ver = (self._own_ver if own else self._ver).get(t, 0)
        key = (t, own, ask)
        got = self._score_memo.get(key)
        if got is not None and got[0] == ver:
            return got[1]
        score = self._queue_score(t, own, ask)
        if len(self._score_memo) >= _MEMO_KEPT:
            self._score_memo.clear()  # a long-lived ledger (the engine's) stays bounded
        self._score_memo[key] = (ver, score)
        return score

    def _queue_score(
        self, t: str, own: bool, ask: tuple[int, int, int]
    ) -> tuple[int, int, float, float]:
        """How the queue compares one level: (weight-0 tier, 0 while below its fair share
        in what `ask` asks for, else 1; share with `ask` admitted, share now), the shares
        over the weight. Serving levels below their fair share first (Balinski and Young's
        quota rule) keeps each within one allocation of it as a parent's capacity fills."""
        tier, now, after = self._shares(t, own, ask)
        fs = self.own_fair.get(t) if own else self.fair.get(t)
        below = 1
        if fs is not None:
            held = self._own_vecs[t] if own else self._vecs[t]
            below = 0
            for i in range(3):
                if ask[i] > 0 and held[i] >= fs[i] - EPS:
                    below = 1
                    break
        return (tier, below, after, now)

    def order_score(self, t: str, *, own: bool = False) -> tuple[int, float]:
        """One level's score: (0, dominant share above the guarantee / weight), or
        (1, share) for weight 0. Lower goes first among siblings."""
        cache = self._own_scores if own else self._scores
        got = cache.get(t)
        if got is None:
            got = cache[t] = self._level_score(t, own)
        return got

    def order_key(self, t: str) -> tuple[tuple[int, float], ...]:
        """Each level's score from the root down to `t` (then its own work's when it also
        has children): comparing two keys compares the tenants where their ancestors
        part, as the queue's tournament (`FairQueue`) does. Lower goes first."""
        chain = self.tree.chain(t)
        key = [self.order_score(x) for x in reversed(chain)]
        if t in self.tree.children:
            key.append(self.order_score(t, own=True))
        return tuple(key)

    # -- quota ----------------------------------------------------------------------------

    def limit_block(
        self, tenant: str, amt: Amount, freed: Mapping[str, Amount] | None = None
    ) -> QuotaBlock | None:
        """The first tenant on the chain whose limit `amt` would break, or None."""
        return next(self.limit_breaches(tenant, amt, freed), None)

    def limit_breaches(
        self, tenant: str, amt: Amount, freed: Mapping[str, Amount] | None = None
    ) -> Iterator[QuotaBlock]:
        """Every limit on the chain `amt` would break (with `freed` given back per
        tenant), nearest tenant first; per tenant its resources in `DIMS` order, then
        its per-model GPU limits by model."""
        for t in self.tree.chain(tenant):
            if not self._limited(t):
                continue  # nothing bounded: no amount could break it
            lim = self.tree.limit(t)
            held = self.held_of(t)
            if freed is not None and t in freed:
                held = held.minus(freed[t])
            for dim, have, ask, cap in zip(
                DIMS, held.vector(), amt.vector(), _limit_dims(lim), strict=True
            ):
                if cap is not None and ask > 0 and have + ask > cap:
                    yield QuotaBlock(t, tenant, dim, "", have, cap, ask)
            for m, ask in sorted(amt.models.items()):
                cap = lim.gpus_by_model.get(m)
                have = held.models.get(m, 0)
                if cap is not None and ask > 0 and have + ask > cap:
                    yield QuotaBlock(t, tenant, "gpus", m, have, cap, ask)

    def _limited(self, t: str) -> bool:
        """Whether `t`'s limit bounds anything (a resource or a GPU model). Most levels of
        a tree bound nothing (no quota, or a guarantee only); `limit_block` skips them
        without reading what they hold. Quotas are fixed for a ledger, as in `_static`."""
        got = self._limits.get(t)
        if got is None:
            lim = self.tree.limit(t)
            got = self._limits[t] = _any_bound(lim) or bool(lim.gpus_by_model)
        return got

    def kept_idle(self, t: str) -> tuple[int, int, int]:
        """Guarantee `t` does not lend while idle: guaranteed minus lending limit minus
        what its subtree holds, per resource (0 where no lending limit is set)."""
        g = _limit_dims(self.tree.guaranteed(t))
        lend = _limit_dims(self.tree.lending_limit(t))
        held = self.held_of(t).vector()
        out = [0, 0, 0]
        for i in range(3):
            if g[i] is not None and lend[i] is not None:
                out[i] = max(0, (g[i] or 0) - (lend[i] or 0) - held[i])
        return (out[0], out[1], out[2])

    def lending_block(self, tenant: str, amt: Amount) -> str | None:
        """Why admitting `amt` for `tenant` would take capacity another tenant's lending
        limit keeps for it, or None. Capacity kept for an ancestor (or the tenant
        itself) is the tenant's to use."""
        if not self.lenders:
            return None
        mine = set(self.tree.chain(tenant))
        kept = [0, 0, 0]
        keepers: list[list[str]] = [[], [], []]
        for y in self.lenders:
            if y in mine:
                continue
            k = self.kept_idle(y)
            for i in range(3):
                if k[i] > 0:
                    kept[i] += k[i]
                    keepers[i].append(y)
        if not any(kept):
            return None
        held = self.held_total.vector()
        tot = self.total.vector()
        ask = amt.vector()
        for i, dim in enumerate(DIMS):
            free = tot[i] - held[i]
            if ask[i] > 0 and kept[i] > 0 and free - ask[i] < kept[i]:
                who = ", ".join(keepers[i])
                return (
                    f"capacity kept idle for the guarantee of {who} (beyond its lending "
                    f"limit): {_amount_text(dim, kept[i])} of {_amount_text(dim, max(free, 0))} "
                    f"free is kept, tenant {tenant} asks {_amount_text(dim, ask[i])}"
                )
        return None

    def allowed_models(
        self, tenant: str, gpus: int, cluster_models: Iterable[str]
    ) -> tuple[str, ...] | None:
        """For a request naming no GPU model: the models per-model limits still allow.

        None when no limit on the chain is per model (every model is allowed).
        """
        chain = self.tree.chain(tenant)
        limited = [t for t in chain if self.tree.limit(t).gpus_by_model]
        if not limited or gpus <= 0:
            return None
        out = []
        for m in cluster_models:
            ok = True
            for t in limited:
                cap = self.tree.limit(t).gpus_by_model.get(m)
                if cap is not None and self.held_of(t).models.get(m, 0) + gpus > cap:
                    ok = False
                    break
            if ok:
                out.append(m)
        return tuple(out)

    def within_guarantee(self, tenant: str, amt: Amount) -> bool:
        """`_within_guarantee`, remembered per (tenant, amount) until the usage of a
        tenant on its chain changes (the queue asks it at every pop)."""
        if not self._guarantees_something(tenant):
            return False
        chain = self.tree.chain(tenant)
        vers = tuple(self._ver.get(t, 0) for t in chain)
        key = (tenant, amt.gpus, amt.cpu, amt.mem, *sorted(amt.models.items()))
        got = self._within_memo.get(key)
        if got is not None and got[0] == vers:
            return got[1]
        ok = self._within_guarantee(tenant, amt)
        if len(self._within_memo) >= _MEMO_KEPT:
            self._within_memo.clear()
        self._within_memo[key] = (vers, ok)
        return ok

    def _guarantees_something(self, tenant: str) -> bool:
        """Whether the tenant's own quota guarantees a positive amount of anything. Only
        that can make `_within_guarantee` true (its `explicit` is set at the tenant's own
        level alone), so for every other tenant (most, in a typical tree) the answer is
        False whatever anyone holds: no usage versions, no memo. Quotas are fixed for a
        ledger, as in `_static`."""
        got = self._guarantees.get(tenant)
        if got is None:
            g = self.tree.guaranteed(tenant)
            got = self.tree.has_explicit_guarantee(tenant) and (
                any(c is not None and c > 0 for c in _limit_dims(g))
                or any(c > 0 for c in g.gpus_by_model.values())
            )
            self._guarantees[tenant] = got
        return got

    def _within_guarantee(self, tenant: str, amt: Amount) -> bool:
        """Does the request fit inside the tenant's guarantee (and its ancestors' explicit ones)?"""
        chain = self.tree.chain(tenant)
        explicit = False
        for i, t in enumerate(chain):
            if not self.tree.has_explicit_guarantee(t):
                continue
            g = self.tree.guaranteed(t)
            eff = self._effective_kept(t)
            for have, ask, cap in zip(eff.vector(), amt.vector(), _limit_dims(g), strict=True):
                if ask > 0 and cap is not None:
                    if i == 0:
                        explicit = explicit or cap > 0
                    if have + ask > cap:
                        return False
            for m, ask in amt.models.items():
                cap = g.gpus_by_model.get(m)
                if cap is not None and ask > 0:
                    if i == 0:
                        explicit = explicit or cap > 0
                    if eff.models.get(m, 0) + ask > cap:
                        return False
        return explicit

    def slack(
        self, tenant: str, dims: tuple[bool, bool, bool], *, fair: bool
    ) -> tuple[float, float, float]:
        """How much may leave `tenant` per resource and leave it at or above its guarantee
        (and, when `fair`, its fair share in the contended resources among `dims`).

        GPUs are whole: a fair share of 1.33 GPUs is kept as 1. Otherwise a subtree over
        its share by several GPUs, spread one above a fractional share per child (three
        children at 2 against 1.33 each), could give nothing back: no child's excess is a
        whole allocation. The requester must stay at or under its own share, so what
        leaves a victim at its rounded-down share never comes back to it by fair share."""
        eff = self.effective(tenant).vector()
        g = _limit_dims(self.tree.guaranteed(tenant))
        fs = self.fair.get(tenant, (0.0, 0.0, 0.0))
        out = [float("inf")] * 3
        for i in range(3):
            cap = g[i]
            if cap is not None:
                out[i] = eff[i] - cap
            if fair and dims[i] and self.contended[i]:
                due = math.floor(fs[i] + EPS) if i == 0 else fs[i]
                out[i] = min(out[i], eff[i] - due + EPS)
        return (out[0], out[1], out[2])

    def below_fair_share(self, tenant: str, amt: Amount) -> bool:
        """Would the tenant still be at or under its fair share with the request admitted?"""
        eff = self._effective_kept(tenant).vector()
        fs = self.fair.get(tenant, (0.0, 0.0, 0.0))
        ask = amt.vector()
        dims = [i for i in range(3) if ask[i] > 0 and self.contended[i]]
        if not dims:
            return False
        return all(eff[i] + ask[i] <= fs[i] + EPS for i in dims)


def cluster_total(snapshot: Snapshot) -> Amount:
    """Capacity that can be shared: READY nodes, plus what is held on the others."""
    total = Amount()
    for n in snapshot.nodes.values():
        if n.schedulable:
            total.add(_node_amount(n))
    gpu_models = {nid: {g.index: g.model for g in n.gpus} for nid, n in snapshot.nodes.items()}
    for a in snapshot.allocations.values():
        if not a.holds_capacity(snapshot.now):
            continue
        for p in a.placements:
            node = snapshot.nodes.get(p.node_id)
            if node is not None and not node.schedulable:
                one = Amount(len(p.gpu_indices), a.shape.cpu_millis, a.shape.memory_bytes)
                for i in p.gpu_indices:
                    m = gpu_models[p.node_id].get(i, "")
                    if m:
                        one.models[m] = one.models.get(m, 0) + 1
                total.add(one)
    return total


def _node_amount(n: Node) -> Amount:
    from rmgrpc.model import GpuHealth

    amt = Amount(0, n.cpu_millis, n.memory_bytes)
    for g in n.gpus:
        if g.health == GpuHealth.HEALTHY:
            amt.gpus += 1
            amt.models[g.model] = amt.models.get(g.model, 0) + 1
    return amt


# ---------------------------------------------------------------------------------------
# Fair shares, top-down.


Vec = tuple[float, float, float]


def water_fill(
    available: float, members: list[tuple[str, float, float, float]]
) -> dict[str, float]:
    """Split `available` among (key, guaranteed, cap, weight): guarantees first, then by weight.

    Nobody gets more than its cap (its demand, bounded by its limit). When the
    guarantees alone exceed what is available they are scaled down together.
    """
    share: dict[str, float] = {}
    for key, guar, cap, _ in members:
        share[key] = max(0.0, min(guar, cap))
    given = sum(share.values())
    if given > available:
        scale = available / given if given > 0 else 0.0
        return {k: v * scale for k, v in share.items()}
    remaining = available - given
    active = [(k, cap, w) for k, _, cap, w in members if share[k] < cap - EPS and w > 0]
    while remaining > EPS and active:
        wsum = sum(w for _, _, w in active)
        capped = []
        handed = 0.0
        for k, cap, w in active:
            room = cap - share[k]
            offer = remaining * w / wsum
            if offer >= room - EPS:
                share[k] = cap
                handed += room
                capped.append(k)
            else:
                share[k] += offer
                handed += offer
        remaining -= handed
        if not capped:
            break
        active = [(k, cap, w) for k, cap, w in active if k not in capped]
    idle = [(k, 0.0, cap - share[k], 1.0) for k, _, cap, w in members if w <= 0]
    if remaining > EPS and not active and idle:
        # Weight 0: only what the weighted members leave, split evenly among them.
        for k, extra in water_fill(remaining, idle).items():
            share[k] += extra
    return share


def fair_shares(ledger: Ledger) -> dict[str, Vec]:
    """Each tenant's fair share (GPUs, CPU millis, memory bytes) of the cluster now."""
    tree = ledger.tree
    out: dict[str, Vec] = {}

    def demand(t: str, own: bool) -> Vec:
        if own:
            held = ledger.own_held.get(t) or Amount()
            pend = ledger.own_pending.get(t) or Amount()
            eff = held.vector()
        else:
            eff = ledger.effective(t).vector()
            pend = ledger.pending.get(t) or Amount()
        p = pend.vector()
        return (float(eff[0] + p[0]), float(eff[1] + p[1]), float(eff[2] + p[2]))

    def split(parent: str, avail: Vec) -> None:
        kids = tree.children.get(parent, [])
        members: list[tuple[str, Vec, Vec, float]] = []
        for t in kids:
            d = demand(t, own=False)
            lim = _limit_dims(tree.limit(t))
            c = [d[i] if lim[i] is None else min(d[i], float(lim[i] or 0)) for i in range(3)]
            gd = _limit_dims(tree.guaranteed(t))
            guar = (float(gd[0] or 0), float(gd[1] or 0), float(gd[2] or 0))
            members.append((t, guar, (c[0], c[1], c[2]), tree.weight(t)))
        if parent and kids:
            d = demand(parent, own=True)
            if any(d):
                members.append(("", (0.0, 0.0, 0.0), d, 1.0))
        shares: list[dict[str, float]] = []
        for i in range(3):
            shares.append(water_fill(avail[i], [(k, g[i], c[i], w) for k, g, c, w in members]))
        for t in kids:
            v = (shares[0][t], shares[1][t], shares[2][t])
            out[t] = v
            if t in tree.children:
                split(t, v)
        if "" in shares[0]:
            ledger.own_fair[parent] = (shares[0][""], shares[1][""], shares[2][""])

    total = ledger.total.vector()
    # What lending limits keep idle is nobody else's to share.
    kept = [0, 0, 0]
    for y in ledger.lenders:
        k = ledger.kept_idle(y)
        for i in range(3):
            kept[i] += k[i]
    split("", (float(total[0] - kept[0]), float(total[1] - kept[1]), float(total[2] - kept[2])))
    return out


# ---------------------------------------------------------------------------------------
# The queue: a tournament down the tenant tree.


# (-priority, 0 if inside its guarantee else 1, level score, arrival seq, time, id)
QueueKey = tuple[int, int, tuple[int, int, float, float], int, float, str]


class FairQueue:
    """Pending requests in the hierarchical fair order (Kueue's fair-sharing tournament).

    Every tenant node keeps a heap of its members: its children's subtrees and its own
    requests. A member's key is its best request's priority and guarantee standing, then
    members still below their fair share (GetUsage's) before the others, then the
    member's weighted dominant share *with that request admitted* (Kueue's rule, a
    weighted fair queue's finish tag: a weight-3 tenant gets three 1-GPU requests in
    before a weight-1 sibling's second, where comparing shares before admission would
    alternate them while both start at 0), on a tie the share now (the one further below
    its due first), then arrival. So at each node siblings compete by their own shares,
    and what is best in a subtree climbs to the root. A change of one tenant's queue or
    usage re-keys only its chain (siblings' scores do not depend on it): a pop costs
    O(depth · log width).
    """

    def __init__(
        self,
        ledger: Ledger,
        pending: Iterable[Allocation],
        amount: Callable[[Allocation], Amount],
        order: Callable[[Allocation], tuple[int, int, float, str]],
    ) -> None:
        self.ledger = ledger
        self.tree = ledger.tree
        self.amount = amount
        self.queues: dict[str, deque[Allocation]] = {}
        for a in pending:
            self.queues.setdefault(a.tenant, deque()).append(a)
        for t in self.queues:
            self.queues[t] = deque(sorted(self.queues[t], key=order))
        # Node -> heap of (key, version, member, tenant whose request it is); "" is the
        # root above every top-level tenant, and the member "" a tenant's own requests.
        self.heaps: dict[str, list[tuple[QueueKey, int, str, str]]] = {}
        self.versions: dict[tuple[str, str], int] = {}
        # Tenants whose head was taken and who were not re-keyed since (the caller
        # usually re-keys them itself as it admits; otherwise the next pop does).
        self._dirty: list[str] = []
        for t in sorted(self.queues):
            self.touch(t)

    def _set(self, node: str, member: str, key: QueueKey | None, tenant: str) -> None:
        v = self.versions.get((node, member), 0) + 1
        self.versions[(node, member)] = v
        if key is not None:
            heapq.heappush(self.heaps.setdefault(node, []), (key, v, member, tenant))

    def _top(self, node: str) -> tuple[QueueKey, int, str, str] | None:
        heap = self.heaps.get(node)
        while heap:
            top = heap[0]
            if self.versions.get((node, top[2])) == top[1]:
                return top
            heapq.heappop(heap)
        return None

    def touch(self, tenant: str) -> None:
        """`tenant`'s queue or usage changed: re-key it and its ancestors."""
        if tenant in self._dirty:
            self._dirty.remove(tenant)
        led = self.ledger
        q = self.queues.get(tenant)
        if q:
            head = q[0]
            ask = self.amount(head)
            inside = 0 if led.within_guarantee(tenant, ask) else 1
            own = (
                led.queue_score(tenant, True, ask.vector())
                if tenant in self.tree.children
                else (0, 0, 0.0, 0.0)
            )
            key = (-head.priority, inside, own, head.seq, head.create_time, head.id)
            self._set(tenant, "", key, tenant)
        else:
            self._set(tenant, "", None, tenant)
        for x in self.tree.chain(tenant):
            parent = self.tree.parent.get(x, "")
            top = self._top(x)
            if top is None:
                self._set(parent, x, None, "")
                continue
            k, _, _, who = top
            ask_v = self.amount(self.queues[who][0]).vector()
            self._set(parent, x, (k[0], k[1], led.queue_score(x, False, ask_v), *k[3:]), who)

    def pop(self) -> Allocation | None:
        """The next request in the fair order (taken out of the queue), or None."""
        while self._dirty:
            self.touch(self._dirty[0])
        top = self._top("")
        if top is None:
            return None
        tenant = top[3]
        q = self.queues[tenant]
        a = q.popleft()
        if q:
            self._dirty.append(tenant)
        else:
            self.touch(tenant)  # no entry may name an empty queue, even for a moment
        return a


# ---------------------------------------------------------------------------------------
# Usage, for GetUsage and metrics.


@dataclass(slots=True)
class TenantUsage:
    """What a tenant (with its subtree) holds, asks, may hold and deserves right now."""

    tenant: str
    held: Resources = field(default_factory=Resources)
    pending: Resources = field(default_factory=Resources)
    guaranteed: Resources = field(default_factory=Resources)
    limit: Resources = field(default_factory=Resources)
    # Held above the guarantee, per resource.
    borrowed: Resources = field(default_factory=Resources)
    # Largest fraction of the cluster held in any resource (DRF), and that over the weight.
    dominant_share: float = 0.0
    weighted_dominant_share: float = 0.0
    # The fair share as a fraction of the cluster (the dominant resource of the share).
    fair_share: float = 0.0
    # The fair share in resources (GPUs, CPU millis, memory bytes).
    fair_share_resources: Resources = field(default_factory=Resources)
    weight: float = 1.0
    # Allocations holding capacity, and allocations pending.
    running: int = 0
    pending_count: int = 0
    # Recent usage (decayed with the configured half-life; zero when decay is off).
    recent: Resources = field(default_factory=Resources)
    half_life_seconds: float = 0.0
    # The score the queue orders the tenant by among its siblings (lower first), and
    # the same in words an operator can check.
    order_score: float = 0.0
    order_text: str = ""
    lending_limit: Resources = field(default_factory=Resources)


def _usage(ledger: Ledger, tenant: str) -> TenantUsage:
    tree = ledger.tree
    held = ledger.held_of(tenant)
    g = tree.guaranteed(tenant)
    borrowed = Amount(
        max(0, held.gpus - (g.gpus or 0)),
        max(0, held.cpu - (g.cpu_millis or 0)),
        max(0, held.mem - (g.memory_bytes or 0)),
        {
            m: held.models.get(m, 0) - v
            for m, v in g.gpus_by_model.items()
            if held.models.get(m, 0) > v
        },
    )
    fs = ledger.fair.get(tenant, (0.0, 0.0, 0.0))
    recent = ledger.recent_of(tenant)
    score = ledger.order_score(tenant)[1]
    tot = ledger.total.vector()
    fair_frac = max((f / c for f, c in zip(fs, tot, strict=True) if c > 0), default=0.0)
    return TenantUsage(
        tenant=tenant,
        held=held.to_resources(),
        pending=(ledger.pending.get(tenant) or Amount()).to_resources(),
        guaranteed=g,
        limit=tree.limit(tenant),
        borrowed=borrowed.to_resources(),
        dominant_share=ledger.dominant_share(tenant),
        weighted_dominant_share=ledger.weighted_dominant_share(tenant),
        fair_share=fair_frac,
        fair_share_resources=Resources(
            gpus=int(fs[0] + EPS), cpu_millis=int(fs[1] + EPS), memory_bytes=int(fs[2] + EPS)
        ),
        weight=tree.weight(tenant),
        running=ledger.running.get(tenant, 0),
        pending_count=ledger.waiting.get(tenant, 0),
        recent=Resources(
            gpus=round(recent[0]), cpu_millis=round(recent[1]), memory_bytes=round(recent[2])
        ),
        half_life_seconds=ledger.half_life,
        order_score=score,
        order_text=order_text(ledger, tenant),
        lending_limit=tree.lending_limit(tenant),
    )


def order_text(ledger: Ledger, tenant: str) -> str:
    """The tenant's order score spelled out, e.g. "ordered among the children of org by
    (6 GPUs held - 4 guaranteed) / 32 GPUs / weight 1 = 0.0625 (lower goes first)"."""
    tree = ledger.tree
    parent = tree.parent.get(tenant, "")
    among = f"the children of {parent}" if parent else "the top-level tenants"
    use = ledger.order_usage(tenant)
    eff = ledger.effective(tenant).vector()
    g = _limit_dims(tree.guaranteed(tenant))
    tot = ledger.total.vector()
    best, dim = -math.inf, -1
    for i in range(3):
        if tot[i] > 0 and (use[i] > 0 or g[i]) and (use[i] - (g[i] or 0)) / tot[i] > best:
            best, dim = (use[i] - (g[i] or 0)) / tot[i], i
    if dim < 0:
        return f"ordered among {among} by nothing used or guaranteed = 0 (lower goes first)"
    name = DIMS[dim]
    amount = f"{use[dim]:.3g} GPUs" if name == "gpus" else _amount_text(name, use[dim])
    recent = use[dim] > eff[dim] + EPS
    what = f"{amount} {'of recent usage' if recent else 'held'}"
    if g[dim]:
        what = f"({what} - {_amount_text(name, g[dim] or 0)} guaranteed)"
    w = tree.weight(tenant)
    tier, score = ledger.order_score(tenant)
    text = f"ordered among {among} by {what} / {_amount_text(name, tot[dim])} in the cluster"
    if tier:
        return text + f" = {score:.4g}, after every weighted sibling (weight 0)"
    return text + f" / weight {w:g} = {score:.4g} (lower goes first)"


def tenant_usage(snapshot: Snapshot, tenant: str) -> TenantUsage:
    """Usage of one tenant and its subtree (a tenant nobody has heard of uses nothing)."""
    return usage_from(Ledger(snapshot), tenant)


def usage_from(ledger: Ledger, tenant: str) -> TenantUsage:
    """`tenant_usage` on a ledger already built (one ledger answers many tenants)."""
    ledger.tree.chain(tenant)
    return _usage(ledger, tenant)


def all_tenant_usage(snapshot: Snapshot) -> dict[str, TenantUsage]:
    """Usage of every tenant the snapshot knows (quotas, allocations and their ancestors)."""
    ledger = Ledger(snapshot)
    return {t: _usage(ledger, t) for t in sorted(ledger.tree.parent)}


# ---------------------------------------------------------------------------------------
# Admission control.


def check_admissible(
    snapshot: Snapshot, request: Allocation, cluster_models: Sequence[str] | None = None
) -> str | None:
    """Why `request` can never be admitted under the current limits, or None.

    "Never": its total alone exceeds the limit of its tenant or an ancestor, whatever
    else is running.
    """
    tree = TenantTree(snapshot.quotas, (request.tenant,), snapshot.config)
    amt = Amount.of_request(request)
    if cluster_models is None:
        cluster_models = sorted({g.model for n in snapshot.nodes.values() for g in n.gpus})
    for t in tree.chain(request.tenant):
        lim = tree.limit(t)
        who = f"tenant {t}" if t == request.tenant else f"parent quota `{t}`"
        for dim, ask, cap in zip(DIMS, amt.vector(), _limit_dims(lim), strict=True):
            if cap is not None and ask > cap:
                return (
                    f"request needs {_amount_text(dim, ask)} in total but {who} allows at most "
                    f"{_amount_text(dim, cap)}"
                )
        model = request.shape.gpu_model
        if model and amt.gpus:
            cap = lim.gpus_by_model.get(model)
            if cap is not None and amt.gpus > cap:
                return (
                    f"request needs {gpus_text(amt.gpus, model)} in total but {who} allows at "
                    f"most {gpus_text(cap, model)}"
                )
        elif amt.gpus and lim.gpus_by_model and cluster_models:
            caps = [lim.gpus_by_model.get(m) for m in cluster_models]
            if all(c is not None and amt.gpus > c for c in caps):
                return (
                    f"request needs {gpus_text(amt.gpus)} in total but {who} allows at most "
                    f"{max(c or 0 for c in caps)} of any one GPU model"
                )
    return None
