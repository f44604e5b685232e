"""Fair share: the tenant tree, quota limits and guarantees, weighted DRF, fair-share numbers.

A tenant's usage is counted over its subtree (a parent's quota bounds its children).
`Ledger` keeps, for one pass, what every tenant holds, what it is about to give back
(preempted allocations still in their grace) and what it asks for; the cycle updates it
as it admits and preempts, so the order of the queue (weighted dominant share) is
recomputed as the pass goes.

Fair share is computed top-down over the tree, KAI-style: at each level the capacity the
parent got is split among the children with demand, first up to each child's guarantee,
then the rest by weight (water-filling), never above a child's demand or limit. A
tenant's own allocations beside its children count as one more child of weight 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
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
        self.waiting: dict[str, int] = {}
        for a in sorted(allocs, key=lambda a: a.id):
            if a.holds_capacity(now):
                amt = Amount.of_placed(a, self.gpu_models)
                self.add_held(a.tenant, amt)
                if a.state == AllocationState.PREEMPTED:
                    self.add_leaving(a.tenant, amt)
                for t in self.tree.chain(a.tenant):
                    self.running[t] = self.running.get(t, 0) + 1
            elif a.state == AllocationState.PENDING:
                amt = Amount.of_request(a)
                self._bump(self.own_pending, a.tenant, amt)
                for t in self.tree.chain(a.tenant):
                    self._bump(self.pending, t, amt)
                    self.waiting[t] = self.waiting.get(t, 0) + 1
        self.total = total if total is not None else cluster_total(snapshot)
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

    def add_held(self, tenant: str, amt: Amount, sign: int = 1) -> None:
        self._bump(self.own_held, tenant, amt, sign)
        for t in self.tree.chain(tenant):
            self._bump(self.held, t, amt, sign)

    def add_leaving(self, tenant: str, amt: Amount, sign: int = 1) -> None:
        for t in self.tree.chain(tenant):
            self._bump(self.leaving, t, amt, sign)

    def held_of(self, t: str) -> Amount:
        return self.held.get(t) or Amount()

    def effective(self, t: str) -> Amount:
        """Held minus what is already leaving (preempted, in grace)."""
        return self.held_of(t).minus(self.leaving.get(t))

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

    # -- quota ----------------------------------------------------------------------------

    def limit_block(
        self, tenant: str, amt: Amount, freed: Mapping[str, Amount] | None = None
    ) -> QuotaBlock | None:
        """The first tenant on the chain whose limit `amt` would break, or None."""
        for t in self.tree.chain(tenant):
            lim = self.tree.limit(t)
            held = self.held_of(t)
            if freed is not None and t in freed:
                held = held.minus(freed[t])
            for dim, have, ask, cap in zip(
                DIMS, held.vector(), amt.vector(), _limit_dims(lim), strict=True
            ):
                if cap is not None and ask > 0 and have + ask > cap:
                    return QuotaBlock(t, tenant, dim, "", have, cap, ask)
            for m, ask in sorted(amt.models.items()):
                cap = lim.gpus_by_model.get(m)
                have = held.models.get(m, 0)
                if cap is not None and ask > 0 and have + ask > cap:
                    return QuotaBlock(t, tenant, "gpus", m, have, cap, ask)
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
        """Does the request fit inside the tenant's guarantee (and its ancestors' explicit ones)?"""
        chain = self.tree.chain(tenant)
        explicit = False
        for i, t in enumerate(chain):
            if not self.tree.has_explicit_guarantee(t):
                continue
            g = self.tree.guaranteed(t)
            eff = self.effective(t)
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
        (and, when `fair`, its fair share in the contended resources among `dims`)."""
        eff = self.effective(tenant).vector()
        g = _limit_dims(self.tree.guaranteed(tenant))
        fs = self.fair.get(tenant, (0.0, 0.0, 0.0))
        out = [float("inf")] * 3
        for i in range(3):
            cap = g[i]
            if cap is not None:
                out[i] = eff[i] - cap
            if fair and dims[i] and self.contended[i]:
                out[i] = min(out[i], eff[i] - fs[i] + EPS)
        return (out[0], out[1], out[2])

    def below_fair_share(self, tenant: str, amt: Amount) -> bool:
        """Would the tenant still be at or under its fair share with the request admitted?"""
        eff = self.effective(tenant).vector()
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

    total = ledger.total.vector()
    split("", (float(total[0]), float(total[1]), float(total[2])))
    return out


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
    )


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
