"""Placement: feasibility filters, bin-packing scores, and the capacity view gangs go onto.

Nomad's two phases, in our words. *Feasibility* is a chain of tiny named filters
(`FILTERS`), each answering "can this node take one replica?"; a filter that rejects a
node counts one under its own name, and a pending request's explanation is those counts
("16 nodes: 12 have fewer than 4 free H100 GPUs, 2 cordoned, 2 lack label zone=a").
The same chain decides placement: `find_node` accepts a node only once every filter has
passed it, so the reason a request waits can never disagree with the placer. As in
Nomad, the filters that read only a node's class (state, hold, labels, GPU models) run
once per class of alike nodes and are cached; the rest run per candidate node.
*Ranking* prefers the node a replica fills best, so the least capacity is stranded: the
fewest free GPUs left (small requests pack onto busy nodes, whole nodes stay whole for
whole-node requests), then the least CPU and memory left.

`CapacityView` is the scheduler's scratch copy of what is free. It indexes schedulable
nodes by free GPU count per model (and per node selector, built on first use), so a
placement walks the best-fitting buckets instead of every node (the index only
pre-selects; the chain accepts), and it remembers, per
cycle, that a request signature did not fit: capacity only shrinks during a pass unless
something is released, which bumps a generation number. Every change is journaled, so a
`Statement` can try "what if these victims were gone?" and discard it for free (KAI's
statements).
"""

from __future__ import annotations

import bisect
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from rmgrpc.model import Allocation, GpuHealth, Node, NodeState, Placement, Shape

GIB = 1024**3

# How many feasible nodes of the best-fitting GPU bucket are scored before one is chosen.
CANDIDATE_LIMIT = 4

# Most requests' class verdicts a view keeps (one short list each).
_VERDICTS_KEPT = 4096
# A class verdict not worked out yet (compared by identity).
_UNJUDGED = "(not judged yet)"


# ---------------------------------------------------------------------------------------
# Words for amounts, shared by the explanations of placement and quota.


def gpus_text(n: int, model: str = "", adjective: str = "") -> str:
    """'1 GPU', '4 free H100 GPUs'."""
    words = [str(n)]
    if adjective:
        words.append(adjective)
    if model:
        words.append(model)
    words.append("GPU" if n == 1 else "GPUs")
    return " ".join(words)


def cpu_text(millis: int) -> str:
    return f"{millis / 1000:g} CPU" if millis % 100 == 0 else f"{millis}m CPU"


def memory_text(nbytes: int) -> str:
    if nbytes >= GIB // 10 or nbytes == 0:
        return f"{nbytes / GIB:.3g} GiB memory"
    return f"{nbytes / 1024**2:.3g} MiB memory"


def shape_text(shape: Shape) -> str:
    """What one replica needs, e.g. '4 H100 GPUs, 16 CPU, 64 GiB memory (zone=a)'."""
    parts = []
    if shape.gpus:
        parts.append(gpus_text(shape.gpus, shape.gpu_model))
    if shape.cpu_millis:
        parts.append(cpu_text(shape.cpu_millis))
    if shape.memory_bytes:
        parts.append(memory_text(shape.memory_bytes))
    text = ", ".join(parts) or "nothing"
    if shape.node_selector:
        text += " (" + ",".join(f"{k}={v}" for k, v in shape.node_selector) + ")"
    return text


# ---------------------------------------------------------------------------------------
# The scratch state of one node.


class NodeCapacity:
    """What one node has free, as the current pass sees it."""

    __slots__ = (
        "cls",
        "cpu_free",
        "cpu_total",
        "end_time",
        "free",
        "gpu_models",
        "healthy",
        "healthy_by_model",
        "held_for",
        "held_priority",
        "held_until",
        "id",
        "indexes",
        "labels",
        "mem_free",
        "mem_total",
        "schedulable",
        "state",
        "total_by_model",
    )

    def __init__(self, node: Node) -> None:
        self.id = node.id
        self.labels: Mapping[str, str] = node.labels
        self.state = node.state
        self.schedulable = node.schedulable
        self.cpu_total = node.cpu_millis
        self.mem_total = node.memory_bytes
        self.cpu_free = node.cpu_millis
        self.mem_free = node.memory_bytes
        self.gpu_models: dict[int, str] = {g.index: g.model for g in node.gpus}
        self.healthy: frozenset[int] = frozenset(
            g.index for g in node.gpus if g.health == GpuHealth.HEALTHY
        )
        self.healthy_by_model: dict[str, int] = {}
        # Every GPU by model, healthy or not: what the node could offer once all heal.
        self.total_by_model: dict[str, int] = {}
        for g in node.gpus:
            self.total_by_model[g.model] = self.total_by_model.get(g.model, 0) + 1
        # Model -> sorted indices of healthy GPUs nobody holds.
        self.free: dict[str, list[int]] = {}
        for g in sorted(node.gpus, key=lambda g: g.index):
            if g.index in self.healthy:
                self.healthy_by_model[g.model] = self.healthy_by_model.get(g.model, 0) + 1
                self.free.setdefault(g.model, []).append(g.index)
        # Latest time a current holder is known to end (inf: unknown); for starving gangs.
        self.end_time = 0.0
        # Set when the node is held for a starving gang: only it (or higher priority) may use it.
        self.held_for = ""
        self.held_priority = 0
        # Conservative backfill: work whose hard end comes no later than this (the
        # earliest the held gang could start) may still use the held node.
        self.held_until = -math.inf
        self.indexes: list[_Index] = []
        # Id of the node's class in its view (`_class_key`), set by the view.
        self.cls = -1

    def free_count(self, model: str) -> int:
        lst = self.free.get(model)
        return len(lst) if lst else 0

    @property
    def total_free(self) -> int:
        return sum(len(v) for v in self.free.values())

    def blocks(self, owner: str, priority: int, end: float = math.inf) -> bool:
        """Whether a hold for a starving gang keeps this request off the node: all of its
        priority or lower but work whose hard end (`end`, if placed now) comes no later
        than the gang could start anyway (conservative backfill)."""
        return (
            bool(self.held_for)
            and self.held_for != owner
            and priority <= self.held_priority
            and end > self.held_until
        )

    def trial(self, released: Iterable[tuple[Sequence[int], int, int]]) -> NodeCapacity:
        """A detached copy with `released` (GPU indices, CPU, memory) given back: what the
        node would have free if those holders left. The filters judge it as they judge the
        node (victim search asks "would it fit here without these?" thousands of times, and
        a copy is cheaper than a journaled change to the view)."""
        t = self._copy()
        for gpus, cpu, mem in released:
            t.cpu_free += cpu
            t.mem_free += mem
            for i in gpus:
                if i not in self.healthy:
                    continue  # an unhealthy GPU frees nothing usable (as in `_change`)
                lst = t.free.setdefault(self.gpu_models[i], [])
                pos = bisect.bisect_left(lst, i)
                if pos == len(lst) or lst[pos] != i:
                    lst.insert(pos, i)
        return t

    def _copy(self) -> NodeCapacity:
        """A detached copy (its own free lists, in no index). Every slot written out: a
        loop over `__slots__` costs several times more, and trials are the victim
        search's inner loop (test_scheduler_speedups checks that no slot is missed)."""
        t = NodeCapacity.__new__(NodeCapacity)
        t.cls = self.cls
        t.cpu_free = self.cpu_free
        t.cpu_total = self.cpu_total
        t.end_time = self.end_time
        t.free = {m: list(v) for m, v in self.free.items()}
        t.gpu_models = self.gpu_models
        t.healthy = self.healthy
        t.healthy_by_model = self.healthy_by_model
        t.held_for = self.held_for
        t.held_priority = self.held_priority
        t.held_until = self.held_until
        t.id = self.id
        t.indexes = []
        t.labels = self.labels
        t.mem_free = self.mem_free
        t.mem_total = self.mem_total
        t.schedulable = self.schedulable
        t.state = self.state
        t.total_by_model = self.total_by_model
        return t

    def replicas_fit(self, shape: Shape, models: Sequence[str] | None, *, empty: bool) -> int:
        """How many replicas of `shape` fit on this node now (or once `empty`).

        Counts, it does not judge: at least 1 on every node the filter chain passes, and
        each replica placed here lowers it by exactly 1, so the sum over passing nodes is
        how many replicas the placer can place.
        """
        cpu = self.cpu_total if empty else self.cpu_free
        mem = self.mem_total if empty else self.mem_free
        room = math.inf
        if shape.cpu_millis > 0:
            room = min(room, max(cpu, 0) // shape.cpu_millis)
        if shape.memory_bytes > 0:
            room = min(room, max(mem, 0) // shape.memory_bytes)
        if shape.gpus > 0:
            counts = self.healthy_by_model if empty else {m: len(v) for m, v in self.free.items()}
            best = 0
            for m in _models_for(shape, models, counts):
                best += counts.get(m, 0) // shape.gpus
            room = min(room, best)
        # A shape asking for nothing (the API refuses it) fits without bound.
        return sys.maxsize if room == math.inf else int(room)


def _models_for(shape: Shape, models: Sequence[str] | None, present: Iterable[str]) -> list[str]:
    if shape.gpu_model:
        return [shape.gpu_model] if models is None or shape.gpu_model in models else []
    if models is None:
        return sorted(present)
    return [m for m in models if m in present]


def labels_match(labels: Mapping[str, str], selector: tuple[tuple[str, str], ...]) -> bool:
    return all(labels.get(k) == v for k, v in selector)


# ---------------------------------------------------------------------------------------
# Feasibility: the filter chain. Each filter returns None (the node passes) or the name
# of the counter to bump ("cordoned", "lack label zone=a", ...).


@dataclass(frozen=True, slots=True)
class ReplicaRequest:
    """One replica as the filters see it."""

    shape: Shape
    # The allocation asking: a node held for it is not held against it.
    owner: str = ""
    priority: int = 0
    # GPU models the tenant's quota still allows when the shape names none (None: any).
    models: tuple[str, ...] | None = None
    # Its hard end if placed now (inf: none): what a hold's conservative backfill reads.
    end: float = math.inf


Filter = Callable[[NodeCapacity, ReplicaRequest], str | None]


def node_ready(node: NodeCapacity, req: ReplicaRequest) -> str | None:
    return None if node.schedulable else node.state.name.lower()


def not_held(node: NodeCapacity, req: ReplicaRequest) -> str | None:
    if node.blocks(req.owner, req.priority, req.end):
        return f"held for starving gang {node.held_for}"
    return None


def selector_matches(node: NodeCapacity, req: ReplicaRequest) -> str | None:
    for k, v in req.shape.node_selector:
        if node.labels.get(k) != v:
            return f"lack label {k}={v}"
    return None


def gpu_model_present(node: NodeCapacity, req: ReplicaRequest) -> str | None:
    g = req.shape.gpus
    if g <= 0:
        return None
    models = _models_for(req.shape, req.models, node.healthy_by_model)
    if any(node.healthy_by_model.get(m, 0) >= g for m in models):
        return None
    # A node that is simply too small says so: "healthy" only where health is the cause.
    why = gpus_ever(node, req)
    if why is not None:
        return why
    if req.shape.gpu_model:
        return f"have fewer than {gpus_text(g, req.shape.gpu_model, 'healthy')}"
    if req.models is not None and not models and node.healthy_by_model:
        return "have only GPU models the tenant's quota excludes"
    return f"have fewer than {gpus_text(g, '', 'healthy')}"


# Static filters: what a node could never offer, whatever frees, heals or changes state.
# A request every registered node rejects with one of these never fits (`never_fits`).


def gpus_ever(node: NodeCapacity, req: ReplicaRequest) -> str | None:
    g = req.shape.gpus
    if g <= 0:
        return None
    model = req.shape.gpu_model
    if model:
        have = node.total_by_model.get(model, 0)
        if have == 0:
            return f"have no {model} GPUs"
        if have < g:
            return f"have fewer than {gpus_text(g, model)} in total"
        return None
    if max(node.total_by_model.values(), default=0) < g:
        return f"have fewer than {gpus_text(g)} of one model in total"
    return None


def cpu_ever(node: NodeCapacity, req: ReplicaRequest) -> str | None:
    if node.cpu_total < req.shape.cpu_millis:
        return f"have less than {cpu_text(req.shape.cpu_millis)} in total"
    return None


def memory_ever(node: NodeCapacity, req: ReplicaRequest) -> str | None:
    if node.mem_total < req.shape.memory_bytes:
        return f"have less than {memory_text(req.shape.memory_bytes)} in total"
    return None


STATIC_FILTERS: tuple[tuple[str, Filter], ...] = (
    ("selector", selector_matches),
    ("gpus", gpus_ever),
    ("cpu", cpu_ever),
    ("memory", memory_ever),
)


def replicas_ever(node: NodeCapacity, shape: Shape) -> int:
    """Replicas of `shape` the node could take empty with every GPU healthy."""
    room = math.inf
    if shape.cpu_millis > 0:
        room = min(room, node.cpu_total // shape.cpu_millis)
    if shape.memory_bytes > 0:
        room = min(room, node.mem_total // shape.memory_bytes)
    if shape.gpus > 0:
        models = [shape.gpu_model] if shape.gpu_model else list(node.total_by_model)
        room = min(room, sum(node.total_by_model.get(m, 0) // shape.gpus for m in models))
    return sys.maxsize if room == math.inf else int(room)


# The filters on free capacity each rest on a yes/no predicate the placer calls directly:
# it rejects most of the nodes it visits, and should not write a reason for each.
Predicate = Callable[[NodeCapacity, ReplicaRequest], bool]


def has_free_gpus(node: NodeCapacity, req: ReplicaRequest) -> bool:
    g = req.shape.gpus
    if g <= 0:
        return True
    # `_models_for` written out: the placer asks this of every node it scores.
    model = req.shape.gpu_model
    if model:
        return (req.models is None or model in req.models) and node.free_count(model) >= g
    if req.models is None:
        return any(len(lst) >= g for lst in node.free.values())
    return any(node.free_count(m) >= g for m in req.models)


def has_free_cpu(node: NodeCapacity, req: ReplicaRequest) -> bool:
    return node.cpu_free >= req.shape.cpu_millis


def has_free_memory(node: NodeCapacity, req: ReplicaRequest) -> bool:
    return node.mem_free >= req.shape.memory_bytes


def gpus_free(node: NodeCapacity, req: ReplicaRequest) -> str | None:
    if has_free_gpus(node, req):
        return None
    g = req.shape.gpus
    if g == 1:
        return f"have no free {req.shape.gpu_model + ' ' if req.shape.gpu_model else ''}GPU"
    return f"have fewer than {gpus_text(g, req.shape.gpu_model, 'free')}"


def cpu_free(node: NodeCapacity, req: ReplicaRequest) -> str | None:
    if has_free_cpu(node, req):
        return None
    if node.cpu_total < req.shape.cpu_millis:
        return f"have less than {cpu_text(req.shape.cpu_millis)} in total"
    return f"lack {cpu_text(req.shape.cpu_millis)} free"


def memory_free(node: NodeCapacity, req: ReplicaRequest) -> str | None:
    if has_free_memory(node, req):
        return None
    if node.mem_total < req.shape.memory_bytes:
        return f"have less than {memory_text(req.shape.memory_bytes)} in total"
    return f"lack {memory_text(req.shape.memory_bytes)} free"


# Cheapest and most telling first, as Nomad orders its checkers.
FILTERS: tuple[tuple[str, Filter], ...] = (
    ("node_ready", node_ready),
    ("not_held", not_held),
    ("selector", selector_matches),
    ("gpu_model", gpu_model_present),
    ("gpus_free", gpus_free),
    ("cpu", cpu_free),
    ("memory", memory_free),
)


# The first four read only what `_class_key` holds, which no take or give changes: the
# view runs them once per class of alike nodes and caches the verdict. The rest read free
# capacity, which every take changes: they run on each candidate node.
CLASS_FILTERS = FILTERS[:4]
NODE_FILTERS = FILTERS[4:]

# Each node filter's predicate, in the order the placer tries them: the index already
# pre-selected on free GPUs, so CPU and memory are what reject there.
PREDICATES: dict[Filter, Predicate] = {
    cpu_free: has_free_cpu,
    memory_free: has_free_memory,
    gpus_free: has_free_gpus,
}
if set(PREDICATES) != {check for _, check in NODE_FILTERS}:
    raise RuntimeError("every node filter needs its predicate in PREDICATES")
_PLACE_CHECKS: tuple[Predicate, ...] = tuple(PREDICATES.values())
# The class filters but the hold: what `replica_timeline` judges a node by.
_CLASS_CHECKS = tuple(f for f in CLASS_FILTERS if f[1] is not not_held)
# gpus_free reads only free GPU counts (besides the class), so `explain` runs it once per
# group of nodes alike in those; CPU and memory per node.
_GPU_FILTERS = NODE_FILTERS[:1]
_RESOURCE_FILTERS = NODE_FILTERS[1:]


def _class_key(n: NodeCapacity) -> tuple[object, ...]:
    """Everything CLASS_FILTERS read: nodes with equal keys get equal verdicts."""
    return (
        n.state,
        n.held_for,
        n.held_priority,
        n.held_until,
        tuple(sorted(n.labels.items())),
        tuple(sorted(n.healthy_by_model.items())),
        tuple(sorted(n.total_by_model.items())),
    )


def rejection(
    filters: Iterable[tuple[str, Filter]], node: NodeCapacity, req: ReplicaRequest
) -> str | None:
    """The first of `filters` that rejects the node: its counter name, or None."""
    for _, check in filters:
        why = check(node, req)
        if why is not None:
            return why
    return None


def feasible(node: NodeCapacity, req: ReplicaRequest) -> str | None:
    """Run the whole chain; the first rejecting filter's counter name, or None."""
    return rejection(FILTERS, node, req)


# ---------------------------------------------------------------------------------------
# Ranking: bin-packing scores. Lower is better; the GPU fit is ranked by walking the
# index's fullest buckets first.


def leftover_score(node: NodeCapacity, shape: Shape) -> float:
    """Fraction of CPU plus fraction of memory the node would have left: pack tightly."""
    score = 0.0
    if node.cpu_total > 0:
        score += (node.cpu_free - shape.cpu_millis) / node.cpu_total
    if node.mem_total > 0:
        score += (node.mem_free - shape.memory_bytes) / node.mem_total
    return score


def gpu_leftover(node: NodeCapacity, shape: Shape, model: str) -> int:
    """Free GPUs of the model the node would have left (stranded GPUs)."""
    return node.free_count(model) - shape.gpus


# ---------------------------------------------------------------------------------------
# Explanations.


def _agree(n: int, phrase: str) -> str:
    """Counter names are written for many nodes ("have", "lack"); one node "has"."""
    if n == 1:
        if phrase.startswith("have "):
            return "has " + phrase[5:]
        if phrase.startswith("lack "):
            return "lacks " + phrase[5:]
    return phrase


@dataclass(slots=True)
class Explanation:
    """Why a gang does not fit: Nomad-style filter counters over every node."""

    shape: Shape
    count: int
    nodes: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    # Nodes passing every filter, and how many replicas they could take together.
    fitting_nodes: int = 0
    replica_room: int = 0
    # Set when no registered node could ever host the gang: the whole explanation.
    never: str = ""

    def counters_text(self) -> str:
        parts = [
            f"{n} {_agree(n, name)}"
            for name, n in sorted(self.counters.items(), key=lambda kv: (-kv[1], kv[0]))
        ]
        if self.fitting_nodes:
            parts.append(f"{self.fitting_nodes} could take {self.replica_room} in all")
        noun = "node" if self.nodes == 1 else "nodes"
        return f"{self.nodes} {noun}: " + ", ".join(parts)

    def text(self) -> str:
        if self.never:
            return self.never
        if self.nodes == 0:
            return "no nodes are registered"
        need = shape_text(self.shape)
        if self.fitting_nodes:
            return (
                f"room for only {self.replica_room} of {self.count} replicas of {need}; "
                + self.counters_text()
            )
        if self.shape.gpus:
            head = (
                f"no node with {gpus_text(self.shape.gpus, self.shape.gpu_model, 'free')}"
                + (f", {cpu_text(self.shape.cpu_millis)}" if self.shape.cpu_millis else "")
                + (f", {memory_text(self.shape.memory_bytes)}" if self.shape.memory_bytes else "")
            )
        else:
            head = f"no node with {need} free"
        if self.shape.node_selector and self.shape.gpus:
            head += " (" + ",".join(f"{k}={v}" for k, v in self.shape.node_selector) + ")"
        return f"{head}: " + self.counters_text()


# ---------------------------------------------------------------------------------------
# The index and the view.


class _Index:
    """Schedulable nodes matching one node selector, bucketed by free GPUs.

    Buckets are insertion-ordered dicts used as ordered sets, so iteration order is a
    pure function of the operations applied: deterministic for the same snapshot.
    """

    __slots__ = ("by_model", "by_total", "selector")

    def __init__(self, selector: tuple[tuple[str, str], ...], max_by_model: Mapping[str, int]):
        self.selector = selector
        self.by_model: dict[str, list[dict[str, None]]] = {
            m: [{} for _ in range(mx + 1)] for m, mx in max_by_model.items()
        }
        self.by_total: list[dict[str, None]] = [{} for _ in range(sum(max_by_model.values()) + 1)]

    def add(self, node: NodeCapacity) -> None:
        for m, lst in node.free.items():
            self.by_model[m][len(lst)][node.id] = None
        self._total_bucket(node.total_free)[node.id] = None

    def _total_bucket(self, n: int) -> dict[str, None]:
        while n >= len(self.by_total):
            self.by_total.append({})
        return self.by_total[n]

    def move_model(self, nid: str, model: str, old: int, new: int) -> None:
        buckets = self.by_model[model]
        del buckets[old][nid]
        buckets[new][nid] = None

    def move_total(self, nid: str, old: int, new: int) -> None:
        del self.by_total[old][nid]
        self._total_bucket(new)[nid] = None


_TAKE = 0
_GIVE = 1


class CapacityView:
    """Free capacity of every node during one pass; changes are journaled and undoable."""

    def __init__(self, nodes: Mapping[str, Node], holding: Iterable[Allocation] = ()) -> None:
        self.nodes: dict[str, NodeCapacity] = {}
        for nid in sorted(nodes):
            self.nodes[nid] = NodeCapacity(nodes[nid])
        for a in holding:
            self._hold_existing(a)
        self._setup()

    @classmethod
    def of_copies(cls, nodes: Mapping[str, NodeCapacity]) -> CapacityView:
        """A view over detached node copies (`NodeCapacity._copy`, made while no node was
        held), which it takes over: what another view had free when they were copied,
        without building every node and taking every holder's capacity again."""
        view = cls.__new__(cls)
        view.nodes = {}
        for nid in sorted(nodes):
            n = view.nodes[nid] = nodes[nid]
            n.cls = -1  # the class id was the other view's
        view._setup()
        return view

    def _setup(self) -> None:
        """Everything a view keeps beside its nodes: models, indexes, memos, classes."""
        max_by_model: dict[str, int] = {}
        for n in self.nodes.values():
            for m, c in n.healthy_by_model.items():
                max_by_model[m] = max(max_by_model.get(m, 0), c)
        self.max_by_model = max_by_model
        self.models: tuple[str, ...] = tuple(sorted(max_by_model))
        self.max_gpus = max(max_by_model.values(), default=0)
        self._indexes: dict[tuple[tuple[str, str], ...], _Index] = {}
        self._journal: list[tuple[int, NodeCapacity, tuple[int, ...], int, int]] = []
        self._depth = 0
        # Bumped whenever capacity grows; a remembered "did not fit" is valid for one value.
        self.generation = 0
        self._no_fit: dict[tuple[object, ...], int] = {}
        self.holders: dict[str, tuple[str, ...]] = {}
        # Nodes, by id, that scans visited: a measure of the index's work.
        self.visited = 0
        # (CPU millis, memory bytes) of CPU-only requests -> nodes seen without that much
        # CPU or memory free. CPU-only scans start at the nodes with the fewest free GPUs,
        # which fill up with CPU-only work first: without this every later one walks past
        # them all again. A node leaves every set when its capacity grows (`_grew`).
        self._short: dict[tuple[int, int], set[str]] = {}
        # Class id -> its members grouped by free GPU counts, valid while `_changes` is.
        self._changes = 0
        self._groups: dict[int, list[list[NodeCapacity]]] = {}
        self._groups_at = 0
        # Classes of alike nodes (`_class_key`) and their members, by class id.
        self._class_ids: dict[tuple[object, ...], int] = {}
        self._class_nodes: list[list[NodeCapacity]] = []
        for n in self.nodes.values():
            self._classify(n)
        # Request key -> CLASS_FILTERS verdict per class id; holds change classes and clear it.
        self._verdicts: dict[tuple[object, ...], list[str | None]] = {}
        # (shape, count) -> why it never fits, or None.
        self._never: dict[tuple[Shape, int], str | None] = {}
        # The nodes grouped by what the static filters read (`static_groups`), on first use.
        self._static_groups: list[tuple[NodeCapacity, int]] | None = None

    # -- building -------------------------------------------------------------------

    def _hold_existing(self, a: Allocation) -> None:
        end = a.grace_end_time if a.grace_end_time is not None else a.max_end_time
        for p in a.placements:
            n = self.nodes.get(p.node_id)
            if n is None:
                continue
            n.cpu_free -= a.shape.cpu_millis
            n.mem_free -= a.shape.memory_bytes
            for i in p.gpu_indices:
                lst = n.free.get(n.gpu_models.get(i, ""))
                if lst is not None and i in lst:
                    lst.remove(i)
            n.end_time = max(n.end_time, end if end is not None else math.inf)

    def index(self, selector: tuple[tuple[str, str], ...]) -> _Index:
        idx = self._indexes.get(selector)
        if idx is None:
            idx = _Index(selector, self.max_by_model)
            # Pre-selection by the chain's own filters for state and labels.
            probe = ReplicaRequest(Shape(node_selector=selector))
            for n in self.nodes.values():
                if node_ready(n, probe) is None and selector_matches(n, probe) is None:
                    idx.add(n)
                    n.indexes.append(idx)
            self._indexes[selector] = idx
        return idx

    # -- classes of alike nodes -----------------------------------------------------------

    def _classify(self, n: NodeCapacity) -> None:
        """File `n` under its class, moving it out of its old one."""
        if n.cls >= 0:
            self._class_nodes[n.cls].remove(n)
        key = _class_key(n)
        cid = self._class_ids.get(key)
        if cid is None:
            cid = self._class_ids[key] = len(self._class_nodes)
            self._class_nodes.append([])
        self._class_nodes[cid].append(n)
        n.cls = cid
        self._changes += 1

    def _gpu_groups(self, cid: int) -> list[list[NodeCapacity]]:
        """A class's members grouped by free GPU counts: all `gpus_free` reads but the class."""
        if self._groups_at != self._changes:
            self._groups.clear()
            self._groups_at = self._changes
        got = self._groups.get(cid)
        if got is None:
            by: dict[tuple[tuple[str, int], ...], list[NodeCapacity]] = {}
            for n in self._class_nodes[cid]:
                key = tuple(sorted((m, len(v)) for m, v in n.free.items()))
                by.setdefault(key, []).append(n)
            got = self._groups[cid] = list(by.values())
        return got

    def _class_verdicts(self, req: ReplicaRequest) -> list[str | None]:
        """CLASS_FILTERS' verdict by class id, `_UNJUDGED` until `_judge` runs them (on one
        member of the class): a placement only looks at classes its index buckets hold."""
        # Owner, priority and hard end only matter against a hold (`not_held`): requests
        # alike share one list, as they share a remembered no-fit (`_key`).
        holds = self.holders
        key = (
            req.shape,
            req.models,
            req.owner if req.owner in holds else "",
            req.priority if holds else 0,
            self.end_key(req.end) if holds else (),
        )
        got = self._verdicts.get(key)
        if got is None:
            if len(self._verdicts) >= _VERDICTS_KEPT:
                self._verdicts.clear()  # the engine's quick view lives long: stay bounded
            got = self._verdicts[key] = [_UNJUDGED] * len(self._class_nodes)
        return got

    def _judge(self, verdicts: list[str | None], cid: int, req: ReplicaRequest) -> str | None:
        why = verdicts[cid] = rejection(CLASS_FILTERS, self._class_nodes[cid][0], req)
        return why

    def class_rejection(self, node_id: str, req: ReplicaRequest) -> str | None:
        """CLASS_FILTERS' verdict on one node (cached per class of alike nodes): could the
        node ever take a replica, whatever it has free (state, hold, labels, GPU models)?"""
        n = self.nodes[node_id]
        verdicts = self._class_verdicts(req)
        why = verdicts[n.cls]
        if why is _UNJUDGED:
            why = self._judge(verdicts, n.cls, req)
        return why

    def class_passing(self, node_ids: Iterable[str], req: ReplicaRequest) -> list[str]:
        """Those of `node_ids` in the view whose class CLASS_FILTERS pass, in order
        (`class_rejection` of each, with the verdict list looked up once)."""
        nodes = self.nodes
        verdicts = self._class_verdicts(req)
        out = []
        for nid in node_ids:
            n = nodes.get(nid)
            if n is None:
                continue
            why = verdicts[n.cls]
            if why is _UNJUDGED:
                why = self._judge(verdicts, n.cls, req)
            if why is None:
                out.append(nid)
        return out

    # -- changes ----------------------------------------------------------------------

    def _change(self, n: NodeCapacity, indices: Sequence[int], take: bool) -> None:
        self._changes += 1
        before: dict[str, int] = {}
        old_total = n.total_free if n.indexes else 0
        for i in indices:
            if i not in n.healthy:
                continue
            m = n.gpu_models[i]
            lst = n.free[m]
            before.setdefault(m, len(lst))
            pos = bisect.bisect_left(lst, i)
            present = pos < len(lst) and lst[pos] == i
            if take and present:
                del lst[pos]
            elif not take and not present:
                lst.insert(pos, i)
        if n.indexes and before:
            new_total = n.total_free
            for idx in n.indexes:
                for m, old in before.items():
                    new = len(n.free[m])
                    if new != old:
                        idx.move_model(n.id, m, old, new)
                if new_total != old_total:
                    idx.move_total(n.id, old_total, new_total)

    def take(self, node_id: str, indices: Sequence[int], cpu: int, mem: int) -> None:
        n = self.nodes[node_id]
        self._take(n, tuple(indices), cpu, mem)

    def _take(self, n: NodeCapacity, indices: tuple[int, ...], cpu: int, mem: int) -> None:
        self._change(n, indices, take=True)
        n.cpu_free -= cpu
        n.mem_free -= mem
        self._journal.append((_TAKE, n, indices, cpu, mem))

    def give(self, node_id: str, indices: Sequence[int], cpu: int, mem: int) -> None:
        """Return capacity (a victim leaving); capacity grows, so forget every no-fit."""
        n = self.nodes.get(node_id)
        if n is None:
            return
        self._change(n, indices, take=False)
        n.cpu_free += cpu
        n.mem_free += mem
        self._grew(n)
        self._journal.append((_GIVE, n, tuple(indices), cpu, mem))
        self.generation += 1

    def release(self, alloc: Allocation) -> None:
        """Give back everything an allocation holds."""
        for p in alloc.placements:
            self.give(p.node_id, p.gpu_indices, alloc.shape.cpu_millis, alloc.shape.memory_bytes)

    def statement(self) -> Statement:
        return Statement(self)

    def _rollback(self, mark: int) -> None:
        journal = self._journal
        while len(journal) > mark:
            op, n, indices, cpu, mem = journal.pop()
            if op == _TAKE:
                self._change(n, indices, take=False)
                n.cpu_free += cpu
                n.mem_free += mem
                self._grew(n)
            else:
                self._change(n, indices, take=True)
                n.cpu_free -= cpu
                n.mem_free -= mem

    # -- holds for starving gangs -------------------------------------------------------

    def hold(
        self, node_ids: Sequence[str], owner: str, priority: int, until: float = -math.inf
    ) -> None:
        """Hold nodes for starving gang `owner` against work of its priority or lower, but
        work ending by `until` (the earliest the gang could start; -inf: unknown)."""
        for nid in node_ids:
            n = self.nodes[nid]
            n.held_for = owner
            n.held_priority = priority
            n.held_until = until
            self._classify(n)
        self.holders[owner] = tuple(node_ids)
        self._verdicts.clear()

    def lift_holds(self) -> None:
        """Lifts every hold for starving gangs: others may use those nodes now, so what
        did not fit while they were held is forgotten."""
        if not self.holders:
            return
        for nodes in self.holders.values():
            for nid in nodes:
                n = self.nodes[nid]
                n.held_for = ""
                n.held_priority = 0
                n.held_until = -math.inf
                self._classify(n)
        self.holders.clear()
        self._verdicts.clear()
        self.generation += 1

    def never_fits(self, shape: Shape, count: int) -> str | None:
        """`never_fits_text` over every node of the view, remembered per request shape
        (nodes come and go only with a new view)."""
        key = (shape, count)
        if key not in self._never:
            if len(self._never) >= _VERDICTS_KEPT:
                self._never.clear()
            if self._static_groups is None:
                self._static_groups = static_groups(self.nodes.values())
            self._never[key] = _never_fits_grouped(self._static_groups, shape, count)
        return self._never[key]

    # -- placing --------------------------------------------------------------------------

    def end_key(self, end: float) -> tuple[bool, ...]:
        """What a hard end means against the holds: whether it ends in time for each.
        Requests alike but for their ends then share remembered verdicts and no-fits."""
        return tuple(
            end <= self.nodes[held[0]].held_until for held in self.holders.values() if held
        )

    def _key(
        self,
        shape: Shape,
        count: int,
        owner: str,
        priority: int,
        models: tuple[str, ...] | None,
        end: float = math.inf,
    ) -> tuple[object, ...]:
        if self.holders:
            owner = owner if owner in self.holders else ""
            return (shape, count, models, owner, priority, self.end_key(end))
        return (shape, count, models)

    def find_node(
        self,
        shape: Shape,
        *,
        owner: str = "",
        priority: int = 0,
        models: tuple[str, ...] | None = None,
    ) -> tuple[NodeCapacity, str] | None:
        """The best node for one replica, and the GPU model to take there."""
        req = ReplicaRequest(shape, owner, priority, models)
        return self._find(req, self._class_verdicts(req))

    def _find(
        self, req: ReplicaRequest, verdicts: list[str | None]
    ) -> tuple[NodeCapacity, str] | None:
        """Walk the index's best-fitting buckets; accept only nodes the whole chain passes.

        The index pre-selects (schedulable, selector, enough free GPUs of a model); a node
        is scored only once its class passed CLASS_FILTERS (`verdicts`) and it passed
        NODE_FILTERS itself (their predicates), as `explain` counts them.
        """
        shape = req.shape
        idx = self.index(shape.node_selector)
        nodes = self.nodes
        # Unpacked for speed: a predicate added to PREDICATES fails here, not silently.
        check1, check2, check3 = _PLACE_CHECKS
        g = shape.gpus
        best: NodeCapacity | None = None
        best_model = ""
        best_score = math.inf
        if g <= 0:
            # CPU-only: nodes with the fewest free GPUs first, so GPUs are not stranded.
            short = self._short_for(shape)
            for bucket in idx.by_total:
                found = 0
                for nid in bucket:
                    if nid in short:
                        continue  # known to lack CPU or memory for it: it would fail
                    n = nodes[nid]
                    self.visited += 1
                    why = verdicts[n.cls]
                    if why is _UNJUDGED:
                        why = self._judge(verdicts, n.cls, req)
                    if why is not None:
                        continue
                    if not (check1(n, req) and check2(n, req) and check3(n, req)):
                        short.add(nid)
                        continue
                    s = leftover_score(n, shape)
                    if s < best_score:
                        best, best_score = n, s
                    found += 1
                    if found >= CANDIDATE_LIMIT:
                        break
                if best is not None:
                    return best, ""
            return None
        model_list = _models_for(shape, req.models, self.models)
        for c in range(g, self.max_gpus + 1):
            found = 0
            for m in model_list:
                buckets = idx.by_model.get(m)
                if buckets is None or c >= len(buckets):
                    continue
                for nid in buckets[c]:
                    n = nodes[nid]
                    self.visited += 1
                    why = verdicts[n.cls]
                    if why is _UNJUDGED:
                        why = self._judge(verdicts, n.cls, req)
                    if why is not None or not (
                        check1(n, req) and check2(n, req) and check3(n, req)
                    ):
                        continue
                    s = leftover_score(n, shape)
                    if s < best_score:
                        best, best_model, best_score = n, m, s
                    found += 1
                    if found >= CANDIDATE_LIMIT:
                        break
                if found >= CANDIDATE_LIMIT:
                    break
            if best is not None:
                return best, best_model
        return None

    def _short_for(self, shape: Shape) -> set[str]:
        """The nodes known to lack the CPU or memory of a CPU-only `shape` (`_short`)."""
        key = (shape.cpu_millis, shape.memory_bytes)
        got = self._short.get(key)
        if got is None:
            if len(self._short) >= _VERDICTS_KEPT:
                self._short.clear()
            got = self._short[key] = set()
        return got

    def _grew(self, n: NodeCapacity) -> None:
        """`n` has more free than before: it may fit what it lacked room for."""
        for short in self._short.values():
            short.discard(n.id)

    def place_gang(
        self,
        shape: Shape,
        count: int,
        *,
        owner: str = "",
        priority: int = 0,
        models: tuple[str, ...] | None = None,
        end: float = math.inf,
    ) -> tuple[Placement, ...] | None:
        """Place `count` replicas whole, taking their capacity; None (nothing taken) if not.
        `end`: the gang's hard end if placed now, for holds' conservative backfill."""
        key = self._key(shape, count, owner, priority, models, end)
        if self._no_fit.get(key) == self.generation:
            return None
        req = ReplicaRequest(shape, owner, priority, models, end)
        verdicts = self._class_verdicts(req)  # takes do not change classes
        mark = len(self._journal)
        placements: list[Placement] = []
        g = shape.gpus
        for _ in range(count):
            found = self._find(req, verdicts)
            if found is None:
                self._rollback(mark)
                # Only outside trials: a trial's capacity is not the pass's capacity.
                if self._depth == 0:
                    self._no_fit[key] = self.generation
                return None
            n, model = found
            indices = tuple(n.free[model][:g]) if g > 0 else ()
            self._take(n, indices, shape.cpu_millis, shape.memory_bytes)
            placements.append(Placement(n.id, indices))
        if self._depth == 0:
            self._journal.clear()
        return tuple(placements)

    def fits(
        self,
        shape: Shape,
        count: int,
        *,
        owner: str = "",
        priority: int = 0,
        models: tuple[str, ...] | None = None,
        end: float = math.inf,
    ) -> bool:
        """Would the gang fit now? Changes nothing."""
        st = self.statement()
        try:
            return (
                self.place_gang(
                    shape, count, owner=owner, priority=priority, models=models, end=end
                )
                is not None
            )
        finally:
            st.discard()

    def explain(
        self,
        shape: Shape,
        count: int,
        *,
        owner: str = "",
        priority: int = 0,
        models: tuple[str, ...] | None = None,
        end: float = math.inf,
    ) -> Explanation:
        """Run the filter chain over every node and count who rejected it and why.

        The same verdicts and filters `find_node` accepts nodes by: a node counted as
        fitting is one the placer may choose.
        """
        req = ReplicaRequest(shape, owner, priority, models, end)
        ex = Explanation(
            shape, count, nodes=len(self.nodes), never=self.never_fits(shape, count) or ""
        )
        counters = ex.counters
        verdicts = self._class_verdicts(req)
        for cid, members in enumerate(self._class_nodes):
            if not members:
                continue  # emptied by holds
            why = verdicts[cid]
            if why is _UNJUDGED:
                why = self._judge(verdicts, cid, req)
            if why is not None:
                counters[why] = counters.get(why, 0) + len(members)
                continue
            # gpus_free once per group of alike free GPU counts, the rest per node.
            for group in self._gpu_groups(cid):
                why = rejection(_GPU_FILTERS, group[0], req)
                if why is not None:
                    counters[why] = counters.get(why, 0) + len(group)
                    continue
                for n in group:
                    why = rejection(_RESOURCE_FILTERS, n, req)
                    if why is None:
                        ex.fitting_nodes += 1
                        ex.replica_room += n.replicas_fit(shape, models, empty=False)
                    else:
                        counters[why] = counters.get(why, 0) + 1
        return ex


def _static_key(n: NodeCapacity) -> tuple[object, ...]:
    """Everything STATIC_FILTERS and `replicas_ever` read: equal keys, equal answers."""
    return (
        tuple(sorted(n.labels.items())),
        tuple(sorted(n.total_by_model.items())),
        n.cpu_total,
        n.mem_total,
    )


def static_groups(nodes: Iterable[NodeCapacity]) -> list[tuple[NodeCapacity, int]]:
    """Nodes alike for `never_fits_text`, as (one of them, how many): a cluster of
    thousands of nodes has a handful of kinds, and each request shape asks them all."""
    first: dict[tuple[object, ...], NodeCapacity] = {}
    counts: dict[tuple[object, ...], int] = {}
    for n in nodes:
        key = _static_key(n)
        first.setdefault(key, n)
        counts[key] = counts.get(key, 0) + 1
    return [(n, counts[key]) for key, n in first.items()]


def never_fits_text(nodes: Iterable[NodeCapacity], shape: Shape, count: int) -> str | None:
    """Why no registered node, in any state, could ever host the gang (every GPU healthy,
    nothing else running), or None. With no node registered at all nothing is decided:
    the first agent to register may bring the right one."""
    return _never_fits_grouped(static_groups(nodes), shape, count)


def _never_fits_grouped(
    groups: Iterable[tuple[NodeCapacity, int]], shape: Shape, count: int
) -> str | None:
    """`never_fits_text` over nodes grouped by `static_groups`."""
    req = ReplicaRequest(shape)
    ex = Explanation(shape, count)
    room = 0
    for n, k in groups:
        ex.nodes += k
        why = rejection(STATIC_FILTERS, n, req)
        if why is not None:
            ex.counters[why] = ex.counters.get(why, 0) + k
            continue
        r = replicas_ever(n, shape)
        if r > 0:
            ex.fitting_nodes += k
            ex.replica_room += r * k
        room += r * k
    if ex.nodes == 0 or room >= count:
        return None
    need = shape_text(shape)
    if ex.fitting_nodes:
        head = (
            f"never fits: the registered nodes could host only {ex.replica_room} of "
            f"{count} replicas of {need} even if empty"
        )
    else:
        head = f"never fits: no registered node could ever host one replica of {need}"
    return f"{head}; " + ex.counters_text()


class Statement:
    """A tentative set of changes to a view: `commit()` keeps them, `discard()` undoes them.

    Statements nest; the view's generation is restored on discard, so what was known
    not to fit before the trial is known again after it.
    """

    __slots__ = ("_done", "_generation", "_mark", "view")

    def __init__(self, view: CapacityView) -> None:
        self.view = view
        self._mark = len(view._journal)
        self._generation = view.generation
        self._done = False
        view._depth += 1

    def commit(self) -> None:
        if self._done:
            return
        self._done = True
        self.view._depth -= 1
        if self.view._depth == 0:
            self.view._journal.clear()

    def discard(self) -> None:
        if self._done:
            return
        self._done = True
        self.view._rollback(self._mark)
        self.view.generation = self._generation
        self.view._depth -= 1


@dataclass(slots=True)
class _Aside:
    """One set-aside: what a preemptor wanted on a node, and what of it the view took."""

    owner: str
    wanted_gpus: tuple[int, ...]
    wanted_cpu: int
    wanted_mem: int
    gpus: tuple[int, ...] = ()
    cpu: int = 0
    mem: int = 0


class SetAsides:
    """Capacity set aside for preemptors on a view that outlives the pass that set it
    aside (the engine's quick view), kept as a view built afresh would have it.

    A fresh build takes, per set-aside in the pass's order, the wanted GPUs free at that
    moment and the wanted CPU and memory up to what is free. Holders come and go after
    that, so each change of a node with set-asides is made with them lifted, and they are
    applied again in order: GPUs a victim frees go to the preemptor that wanted them (as
    a fresh build would give them), instead of staying free for any newcomer. Set-asides
    only ever touch their own node, so the other nodes are left alone.
    """

    __slots__ = ("_by_node", "_owners", "view")

    def __init__(self, view: CapacityView) -> None:
        self.view = view
        self._by_node: dict[str, list[_Aside]] = {}
        # Owner -> the nodes it has set-asides on.
        self._owners: dict[str, dict[str, None]] = {}

    def __bool__(self) -> bool:
        return bool(self._by_node)

    def owns(self, owner: str) -> bool:
        return owner in self._owners

    def on(self, node_id: str) -> bool:
        """Does any set-aside stand on `node_id`?"""
        return node_id in self._by_node

    def add(self, owner: str, node_id: str, gpus: Sequence[int], cpu: int, mem: int) -> None:
        """Set aside for `owner` on `node_id` (after every set-aside added before)."""
        n = self.view.nodes.get(node_id)
        if n is None:
            return
        aside = _Aside(owner, tuple(gpus), cpu, mem)
        self._by_node.setdefault(node_id, []).append(aside)
        self._owners.setdefault(owner, {})[node_id] = None
        self._apply(n, aside)

    def take(self, node_id: str, indices: Sequence[int], cpu: int, mem: int) -> None:
        """A holder takes capacity on `node_id` (`CapacityView.take`, set-asides kept)."""
        self._change(node_id, indices, cpu, mem, self.view.take)

    def give(self, node_id: str, indices: Sequence[int], cpu: int, mem: int) -> None:
        """A holder gives capacity back on `node_id`: set-asides there are topped up."""
        self._change(node_id, indices, cpu, mem, self.view.give)

    def drop(self, owner: str) -> bool:
        """`owner` no longer waits: what its set-asides took goes back (to later
        set-asides on the same nodes first). True if it had any."""
        nodes = self._owners.pop(owner, None)
        if nodes is None:
            return False
        for nid in nodes:
            asides = self._by_node[nid]
            self._lift(nid, asides)
            kept = [a for a in asides if a.owner != owner]
            if kept:
                self._by_node[nid] = kept
                self._reapply(nid, kept)
            else:
                del self._by_node[nid]
        return True

    def clear(self) -> None:
        """Every set-aside goes, and what each took goes back."""
        for nid, asides in self._by_node.items():
            self._lift(nid, asides)
        self._by_node.clear()
        self._owners.clear()

    def _change(
        self,
        node_id: str,
        indices: Sequence[int],
        cpu: int,
        mem: int,
        change: Callable[[str, Sequence[int], int, int], None],
    ) -> None:
        asides = self._by_node.get(node_id)
        if asides is None:
            change(node_id, indices, cpu, mem)
            return
        self._lift(node_id, asides)
        change(node_id, indices, cpu, mem)
        self._reapply(node_id, asides)

    def _apply(self, n: NodeCapacity, a: _Aside) -> None:
        # What a fresh build takes: the wanted GPUs free now, CPU and memory up to free.
        free = tuple(i for i in a.wanted_gpus if any(i in lst for lst in n.free.values()))
        cpu = min(a.wanted_cpu, n.cpu_free)
        mem = min(a.wanted_mem, n.mem_free)
        self.view.take(n.id, free, cpu, mem)
        a.gpus, a.cpu, a.mem = free, cpu, mem

    def _lift(self, node_id: str, asides: Sequence[_Aside]) -> None:
        for a in reversed(asides):
            self.view.give(node_id, a.gpus, a.cpu, a.mem)
            a.gpus, a.cpu, a.mem = (), 0, 0

    def _reapply(self, node_id: str, asides: Sequence[_Aside]) -> None:
        n = self.view.nodes[node_id]
        for a in asides:
            self._apply(n, a)


def place_gang(
    view: CapacityView,
    shape: Shape,
    count: int,
    *,
    owner: str = "",
    priority: int = 0,
    models: tuple[str, ...] | None = None,
) -> tuple[Placement, ...] | None:
    """Place one gang on a capacity view (taking the capacity), or None if it does not fit."""
    return view.place_gang(shape, count, owner=owner, priority=priority, models=models)


def nodes_to_hold(
    view: CapacityView,
    shape: Shape,
    count: int,
    *,
    owner: str,
    priority: int = 0,
    models: tuple[str, ...] | None = None,
) -> tuple[str, ...] | None:
    """Nodes to hold for a starving gang: those that could host it soonest and most cheaply.

    A node's cost is when its current holders are known to end (unknown: last), then how
    many of the GPUs the gang could use are busy. Nodes are taken in that order until,
    once empty, they could host every replica. None when even the whole cluster could not.
    """
    req = ReplicaRequest(shape, owner, priority, models)
    verdicts = view._class_verdicts(req)
    ranked: list[tuple[tuple[float, int, str], int]] = []
    for n in view.nodes.values():
        # The class filters (ready, hold, labels, enough healthy GPUs), as for placing.
        why = verdicts[n.cls]
        if why is _UNJUDGED:
            why = view._judge(verdicts, n.cls, req)
        if why is not None:
            continue
        # Stricter than `not_held`: never take over another gang's hold, even with a higher
        # priority, or two starving gangs could keep each other waiting.
        if n.held_for and n.held_for != owner:
            continue
        room = n.replicas_fit(shape, models, empty=True)
        if room <= 0:
            continue
        busy = 0
        for m in _models_for(shape, models, n.healthy_by_model):
            busy += n.healthy_by_model.get(m, 0) - n.free_count(m)
        ranked.append(((n.end_time, busy, n.id), room))
    ranked.sort()
    chosen: list[str] = []
    total = 0
    for (_, _, nid), room in ranked:
        chosen.append(nid)
        total += room
        if total >= count:
            return tuple(chosen)
    return None


# Capacity one holder keeps on a node until it leaves: (hard end, inf if none; GPU
# indices; CPU millis; memory bytes).
Held = tuple[float, Sequence[int], int, int]


# How many replicas of a shape fit on one node now, and how many more at each hard end
# as its holders leave: (room now, ((hard end, replicas gained), ...) by end).
Timeline = tuple[int, tuple[tuple[float, int], ...]]


def replica_timeline(
    node: Node | NodeCapacity,
    held: Sequence[Held],
    shape: Shape,
    models: tuple[str, ...] | None = None,
) -> Timeline | None:
    """`node`'s `Timeline` for `shape` with `held` taken from it; None when the class
    filters reject the node (its hold aside: holds come and go with each pass). A
    `NodeCapacity` given must be as built, nothing taken (it is copied, not changed)."""
    n = node._copy() if isinstance(node, NodeCapacity) else NodeCapacity(node)
    req = ReplicaRequest(shape, models=models)
    if rejection(_CLASS_CHECKS, n, req) is not None:
        return None
    on = sorted(held, key=lambda h: h[0])
    for _, gpus, cpu, mem in on:
        n.cpu_free -= cpu
        n.mem_free -= mem
        for i in gpus:
            lst = n.free.get(n.gpu_models.get(i, ""))
            if lst is not None and i in lst:
                lst.remove(i)
    room = first = n.replicas_fit(shape, models, empty=False)
    gains: list[tuple[float, int]] = []
    for end, gpus, cpu, mem in on:
        if end == math.inf:
            break
        n = n.trial([(gpus, cpu, mem)])
        grown = n.replicas_fit(shape, models, empty=False)
        if grown != room:
            gains.append((end, grown - room))
            room = grown
    return first, tuple(gains)


def start_from(timelines: Iterable[Timeline | None], count: int, now: float) -> float | None:
    """The first time the nodes' timelines together make room for `count` replicas."""
    total = 0
    gains: list[tuple[float, int]] = []
    for tl in timelines:
        if tl is not None:
            total += tl[0]
            gains.extend(tl[1])
    if total >= count:
        return now
    gains.sort()
    for end, gain in gains:
        total += gain
        if total >= count:
            return max(now, end)
    return None


def earliest_start(
    nodes: Mapping[str, Node],
    held: Mapping[str, Sequence[Held]],
    shape: Shape,
    count: int,
    *,
    now: float,
    models: tuple[str, ...] | None = None,
) -> float | None:
    """The earliest time the gang could fit if nothing new were placed and every holder
    left at its hard end: `now` if it fits on what is free, else the hard end after which
    it would, or None if no known end frees enough (work without a hard end holds it).

    Counted over the whole cluster, not only the nodes held for the gang: the gang may
    start on any mix of nodes. New placements only take capacity, so this is a lower
    bound on when the gang can start, and work on its held nodes that ends by then is
    gone before the gang could use them (conservative backfill). Replicas are counted
    per node as `replicas_fit` counts them, on every node the class filters pass (holds
    aside: another gang's hold lifts once it is placed, and more nodes only lower the
    bound); capacity nobody in `held` holds (set aside for a preemptor or a
    reservation) counts as free, which only lowers it too.
    """
    return start_from(
        (replica_timeline(nodes[nid], held.get(nid, ()), shape, models) for nid in sorted(nodes)),
        count,
        now,
    )


def node_state_text(state: NodeState) -> str:
    return state.name.lower()
