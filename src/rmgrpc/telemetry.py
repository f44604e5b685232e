"""Prometheus metrics and OpenTelemetry tracing for the server.

`Metrics` owns its own registry rather than prometheus_client's global one, so several
servers (or tests) in one process never collide over metric names. `MetricsInterceptor`
counts and times every RPC and, when tracing is set up, wraps it in a span.
`setup_tracing` keeps its provider in this module instead of installing it globally,
because OpenTelemetry refuses to replace a global provider once set.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import IO, TYPE_CHECKING, Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    make_wsgi_app,
)

from rmgrpc.model import (
    AllocationEventType,
    AllocationState,
    Event,
    EventKind,
    GpuHealth,
    GpuMetrics,
    NodeState,
    Resources,
)
from rmgrpc.spans import LightTracerProvider
from rmgrpc.summary import current_view

if TYPE_CHECKING:
    from rmgrpc.config import Settings
    from rmgrpc.engine import Engine
    from rmgrpc.events import EventHub

log = logging.getLogger(__name__)

_LabelKey = TypeVar("_LabelKey", bound=tuple[str, ...])
T = TypeVar("T")

# RPCs range from sub-millisecond reads to long watch streams.
_RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60)
_CYCLE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1)


# Admission waits run from immediate to days on a busy cluster.
_WAIT_BUCKETS = (0.01, 0.1, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)

# DCGM exporter's label names, so per-GPU series join with its own (`UUID`, `Hostname`),
# plus who holds the GPU (like dcgm-exporter's pod/namespace labels on Kubernetes).
GPU_LABELS = ("gpu", "UUID", "modelName", "Hostname", "tenant", "allocation")
# Tenant gauges count the tenant with its subtree (as GetUsage and quotas do); `parent`
# is "" at the top, so `sum(x{parent=""})` counts everything once.
TENANT_LABELS = ("tenant", "parent")
# Resources in base units: GPUs, CPU cores, memory bytes.
RESOURCES = ("gpu", "cpu", "memory")


class Metrics:
    """Every metric the server exports, in one registry. Use the attributes directly."""

    def __init__(self) -> None:
        # `_created` samples double every counter's series and nobody graphs them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.rpc_requests = Counter(
            "rmgrpc_rpc_requests_total",
            "RPCs finished, by final status code.",
            ["service", "method", "code"],
            registry=r,
        )
        self.rpc_duration = Histogram(
            "rmgrpc_rpc_duration_seconds",
            "Time from an RPC's start to its end (a stream's whole life).",
            ["service", "method"],
            buckets=_RPC_BUCKETS,
            registry=r,
        )
        self.scheduling_cycle = Histogram(
            "rmgrpc_scheduling_cycle_seconds",
            "Time one scheduling pass takes.",
            buckets=_CYCLE_BUCKETS,
            registry=r,
        )
        self.scheduling_decisions = Counter(
            "rmgrpc_scheduling_decisions_total",
            "Scheduler decisions: admitted or preempted.",
            ["decision"],
            registry=r,
        )
        self.allocations = Gauge(
            "rmgrpc_allocations",
            "Live allocations by state: PENDING, ALLOCATED, PREEMPTED (in their grace).",
            ["state"],
            registry=r,
        )
        self.pending_allocations = Gauge(
            "rmgrpc_pending_allocations", "Allocations waiting in the queue.", registry=r
        )
        self.gpus = Gauge(
            "rmgrpc_gpus",
            "GPUs by model and status; each GPU in exactly one status (allocated, free, "
            "unhealthy: idle and unhealthy, unschedulable: idle on a node not READY), so "
            "sum by (model) is the total.",
            ["model", "status"],
            registry=r,
        )
        self.nodes = Gauge("rmgrpc_nodes", "Nodes by state.", ["state"], registry=r)
        self.cluster_capacity = Gauge(
            "rmgrpc_cluster_capacity",
            "What every registered node has (gpu: GPUs, cpu: cores, memory: bytes).",
            ["resource"],
            registry=r,
        )
        self.cluster_allocated = Gauge(
            "rmgrpc_cluster_allocated",
            "Held by live allocations (gpu: GPUs, cpu: cores, memory: bytes).",
            ["resource"],
            registry=r,
        )
        self.cluster_pending = Gauge(
            "rmgrpc_cluster_pending",
            "Asked for by pending allocations (gpu: GPUs, cpu: cores, memory: bytes).",
            ["resource"],
            registry=r,
        )
        self.watch_streams = Gauge("rmgrpc_watch_streams", "Open watch streams.", registry=r)
        self.watch_events_sent = Counter(
            "rmgrpc_watch_events_sent_total", "Events sent on watch streams.", registry=r
        )
        self.watch_streams_cut = Counter(
            "rmgrpc_watch_streams_cut_total",
            "Watch streams the server ended, by reason (e.g. slow consumer).",
            ["reason"],
            registry=r,
        )
        self.event_revision = Gauge(
            "rmgrpc_event_revision", "Latest revision in the event log.", registry=r
        )
        self.store_commit = Histogram(
            "rmgrpc_store_commit_seconds",
            "Time one store commit takes.",
            buckets=_COMMIT_BUCKETS,
            registry=r,
        )
        self.store_transactions = Counter(
            "rmgrpc_store_transactions_total", "Store transactions committed.", registry=r
        )
        # Per GPU, named like DCGM exporter's fields (DCGM_FI_DEV_GPU_UTIL, _FB_USED, ...).
        self.gpu_utilization = Gauge(
            "rmgrpc_gpu_utilization_percent", "GPU utilization (0-100).", GPU_LABELS, registry=r
        )
        self.gpu_memory_used = Gauge(
            "rmgrpc_gpu_memory_used_bytes", "GPU memory in use.", GPU_LABELS, registry=r
        )
        self.gpu_temperature = Gauge(
            "rmgrpc_gpu_temperature_celsius", "GPU temperature.", GPU_LABELS, registry=r
        )
        self.gpu_power = Gauge("rmgrpc_gpu_power_watts", "GPU power draw.", GPU_LABELS, registry=r)
        # Per tenant (with its subtree), like Kueue's cluster-queue gauges.
        per_resource = [*TENANT_LABELS, "resource"]
        self.tenant_guaranteed = Gauge(
            "rmgrpc_tenant_guaranteed",
            "Quota guarantee (gpu: GPUs, cpu: cores, memory: bytes).",
            per_resource,
            registry=r,
        )
        self.tenant_limit = Gauge(
            "rmgrpc_tenant_limit",
            "Quota limit, borrowing included; no series for a resource without limit.",
            per_resource,
            registry=r,
        )
        self.tenant_fair_share = Gauge(
            "rmgrpc_tenant_fair_share",
            "What the tenant deserves now by weighted fair share, in resources.",
            per_resource,
            registry=r,
        )
        self.tenant_held = Gauge(
            "rmgrpc_tenant_held", "Held by the tenant's live allocations.", per_resource, registry=r
        )
        self.tenant_pending = Gauge(
            "rmgrpc_tenant_pending",
            "Asked for by the tenant's pending allocations.",
            per_resource,
            registry=r,
        )
        self.tenant_fair_share_ratio = Gauge(
            "rmgrpc_tenant_fair_share_ratio",
            "Fair share as a fraction of the cluster, in the tenant's dominant resource.",
            TENANT_LABELS,
            registry=r,
        )
        self.tenant_dominant_share = Gauge(
            "rmgrpc_tenant_dominant_share",
            "Largest fraction of any resource of the cluster the tenant holds (DRF).",
            TENANT_LABELS,
            registry=r,
        )
        self.tenant_pending_allocations = Gauge(
            "rmgrpc_tenant_pending_allocations",
            "Allocations of the tenant waiting.",
            TENANT_LABELS,
            registry=r,
        )
        self.tenant_running_allocations = Gauge(
            "rmgrpc_tenant_running_allocations",
            "Allocations of the tenant holding capacity.",
            TENANT_LABELS,
            registry=r,
        )
        self.tenant_oldest_pending = Gauge(
            "rmgrpc_tenant_oldest_pending_seconds",
            "How long the tenant's oldest pending allocation has waited (0: none waits).",
            TENANT_LABELS,
            registry=r,
        )
        # Counters count the tenant's own allocations (not its subtree's): sums add up.
        self.tenant_admitted = Counter(
            "rmgrpc_tenant_admitted_total",
            "Allocations of the tenant placed (admitted) since the server started.",
            ["tenant"],
            registry=r,
        )
        self.tenant_admission_wait = Histogram(
            "rmgrpc_tenant_admission_wait_seconds",
            "Time from request to placement of the tenant's admitted allocations.",
            ["tenant"],
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.tenant_preempted_gpu_seconds = Counter(
            "rmgrpc_tenant_preempted_gpu_seconds_total",
            "GPU-seconds of work of the tenant's allocations that were preempted (run time x "
            "GPUs, lost when the work stopped).",
            ["tenant"],
            registry=r,
        )
        # Budgets (engine/cost.py): spend against each budgeted tenant's, subtree included.
        self.tenant_budget_spent = Gauge(
            "rmgrpc_tenant_budget_spent",
            "Cost spent by the tenant's subtree in its current budget period (as of the "
            "last accrual).",
            ["tenant"],
            registry=r,
        )
        self.tenant_budget_used_ratio = Gauge(
            "rmgrpc_tenant_budget_used_ratio",
            "Spent in the current budget period / the budget amount.",
            ["tenant"],
            registry=r,
        )
        self.budget_alerts = Counter(
            "rmgrpc_budget_alerts_total",
            "Budget alerts: spend crossed 50/75/90/100 % of a tenant's budget (once per "
            "threshold and period).",
            ["tenant", "threshold"],
            registry=r,
        )
        # Label sets last written by the set_* helpers, so a state or GPU that disappears
        # is removed instead of reporting its last value for ever.
        self._lock = threading.Lock()
        self._shown: dict[str, set[tuple[str, ...]]] = {}
        # Children made by `_set`, by id of their gauge, then label values.
        self._children: dict[int, dict[tuple[str, ...], Any]] = {}

    # --- helpers for callers that publish whole snapshots ------------------------------

    def observe_rpc(self, service: str, method: str, code: str, seconds: float) -> None:
        self.rpc_requests.labels(service, method, code).inc()
        self.rpc_duration.labels(service, method).observe(seconds)

    def set_allocation_counts(self, by_state: Mapping[str, int]) -> None:
        """Allocation counts by state name; states left out drop to 0."""
        self._publish("allocations", self.allocations, {(s,): n for s, n in by_state.items()}, 0)

    def set_node_counts(self, by_state: Mapping[str, int]) -> None:
        """Node counts by state name; states left out drop to 0."""
        self._publish("nodes", self.nodes, {(s,): n for s, n in by_state.items()}, 0)

    def set_gpu_counts(self, by_model_status: Mapping[tuple[str, str], int]) -> None:
        """GPU counts keyed by (model, status); combinations left out are removed."""
        self._publish("gpus", self.gpus, dict(by_model_status), None)

    def set_gpu_metrics(self, node_id: str, rows: Mapping[tuple[str, ...], GpuMetrics]) -> None:
        """One node's latest GPU samples, keyed by `GPU_LABELS` values (`Hostname` is
        `node_id`); series of GPUs gone, or now held by someone else, are removed."""
        shown_key = f"gpu:{node_id}"
        with self._lock:
            for key in self._shown.get(shown_key, set()) - rows.keys():
                self._remove_gpu(key)
            for key, m in rows.items():
                self._set(self.gpu_utilization, key, m.utilization_percent)
                self._set(self.gpu_temperature, key, m.temperature_celsius)
                self._set(self.gpu_power, key, m.power_watts)
                self._set(self.gpu_memory_used, key, m.memory_used_bytes)
            self._shown[shown_key] = set(rows)

    def forget_node(self, node_id: str) -> None:
        """Drop every series labelled with a removed node, whoever set it."""
        with self._lock:
            self._shown.pop(f"gpu:{node_id}", None)
            for gauge in self._per_node_gauges():
                # By label rather than from `_shown`: a series set directly through
                # `.labels()` must not outlive its node either.
                gauge.remove_by_labels({"Hostname": node_id})
                children = self._children.get(id(gauge), {})
                for key in [k for k in children if k[GPU_LABELS.index("Hostname")] == node_id]:
                    del children[key]

    def set_cluster(
        self,
        capacity: Mapping[str, float],
        allocated: Mapping[str, float],
        pending: Mapping[str, float],
    ) -> None:
        """Cluster totals by resource name (see `RESOURCES`)."""
        for gauge, values in (
            (self.cluster_capacity, capacity),
            (self.cluster_allocated, allocated),
            (self.cluster_pending, pending),
        ):
            for resource, value in values.items():
                gauge.labels(resource).set(value)

    def set_tenants(self, rows: Mapping[tuple[str, str], TenantFigures]) -> None:
        """Every tenant's gauges, keyed by (tenant, parent); tenants left out are removed."""
        per_resource = {
            "tenant_guaranteed": (self.tenant_guaranteed, "guaranteed"),
            "tenant_limit": (self.tenant_limit, "limit"),
            "tenant_fair_share": (self.tenant_fair_share, "fair_share"),
            "tenant_held": (self.tenant_held, "held"),
            "tenant_pending": (self.tenant_pending, "pending"),
        }
        for name, (gauge, attr) in per_resource.items():
            values: dict[tuple[str, ...], float] = {}
            for key, fig in rows.items():
                for resource, value in getattr(fig, attr).items():
                    values[(*key, resource)] = value
            self._publish(name, gauge, values, None)
        scalar = {
            "tenant_fair_share_ratio": (self.tenant_fair_share_ratio, "fair_share_ratio"),
            "tenant_dominant_share": (self.tenant_dominant_share, "dominant_share"),
            "tenant_pending_allocations": (self.tenant_pending_allocations, "pending_count"),
            "tenant_running_allocations": (self.tenant_running_allocations, "running_count"),
            "tenant_oldest_pending": (self.tenant_oldest_pending, "oldest_pending_seconds"),
        }
        for name, (gauge, attr) in scalar.items():
            self._publish(name, gauge, {k: getattr(f, attr) for k, f in rows.items()}, None)

    def forget_tenants(self, keep: Iterable[str]) -> None:
        """Drop the per-tenant counters of every tenant not in `keep` (bounded labels)."""
        kept = set(keep)
        with self._lock:
            shown = self._shown.get("tenant_counters", set())
            for (tenant,) in shown - {(t,) for t in kept}:
                for metric in (
                    self.tenant_admitted,
                    self.tenant_admission_wait,
                    self.tenant_preempted_gpu_seconds,
                ):
                    metric.remove_by_labels({"tenant": tenant})
            self._shown["tenant_counters"] = {k for k in shown if k[0] in kept}

    def admitted(self, tenant: str, wait_seconds: float) -> None:
        """One of `tenant`'s allocations was placed after waiting `wait_seconds`."""
        self.tenant_admitted.labels(tenant).inc()
        self.tenant_admission_wait.labels(tenant).observe(max(0.0, wait_seconds))
        self._counted(tenant)

    def preempted(self, tenant: str, gpu_seconds: float) -> None:
        """One of `tenant`'s allocations was preempted after `gpu_seconds` of GPU work."""
        self.tenant_preempted_gpu_seconds.labels(tenant).inc(max(0.0, gpu_seconds))
        self._counted(tenant)

    def budget_alert(self, tenant: str, percent: int) -> None:
        """Spend of `tenant`'s subtree crossed `percent` % of its budget."""
        self.budget_alerts.labels(tenant, str(percent)).inc()

    def set_budgets(self, spent: Mapping[str, tuple[float, float]]) -> None:
        """Per budgeted tenant: (spent this period, budget amount); others are dropped."""
        self._publish(
            "tenant_budget_spent",
            self.tenant_budget_spent,
            {(t,): s for t, (s, _) in spent.items()},
            None,
        )
        self._publish(
            "tenant_budget_used_ratio",
            self.tenant_budget_used_ratio,
            {(t,): s / a for t, (s, a) in spent.items()},
            None,
        )

    def _counted(self, tenant: str) -> None:
        with self._lock:
            self._shown.setdefault("tenant_counters", set()).add((tenant,))

    def _per_node_gauges(self) -> tuple[Gauge, ...]:
        # Every metric with a "Hostname" label; a new one must be added here so that
        # forget_node (and set_gpu_metrics) clear it.
        return (
            self.gpu_utilization,
            self.gpu_temperature,
            self.gpu_power,
            self.gpu_memory_used,
        )

    def _remove_gpu(self, key: tuple[str, ...]) -> None:
        for gauge in self._per_node_gauges():
            self._drop(gauge, key)

    def _set(self, gauge: Gauge, key: tuple[str, ...], value: float) -> None:
        # `labels()` validates and locks on every call, and a refresh sets thousands of
        # series: keep each child once made (callers hold `_lock`).
        children = self._children.setdefault(id(gauge), {})
        child = children.get(key)
        if child is None:
            child = children[key] = gauge.labels(*key)
        child.set(value)

    def _drop(self, gauge: Gauge, key: tuple[str, ...]) -> None:
        self._children.get(id(gauge), {}).pop(key, None)
        gauge.remove(*key)  # a no-op for a series already gone

    def _publish(
        self,
        name: str,
        gauge: Gauge,
        values: Mapping[_LabelKey, float],
        missing: float | None,
    ) -> None:
        # `missing` None removes vanished label sets; a number keeps them at that value
        # (a state with zero allocations is worth showing as 0).
        with self._lock:
            for key in self._shown.get(name, set()) - values.keys():
                if missing is None:
                    self._drop(gauge, key)
                else:
                    self._set(gauge, key, missing)
            for key, value in values.items():
                self._set(gauge, key, value)
            if missing is None:
                self._shown[name] = set(values)
            else:
                self._shown[name] = self._shown.get(name, set()) | set(values)


@dataclass(slots=True)
class TenantFigures:
    """One tenant's gauge values; the resource maps are keyed by `RESOURCES` names."""

    guaranteed: dict[str, float] = field(default_factory=dict)
    limit: dict[str, float] = field(default_factory=dict)
    fair_share: dict[str, float] = field(default_factory=dict)
    held: dict[str, float] = field(default_factory=dict)
    pending: dict[str, float] = field(default_factory=dict)
    fair_share_ratio: float = 0.0
    dominant_share: float = 0.0
    pending_count: int = 0
    running_count: int = 0
    oldest_pending_seconds: float = 0.0


def resource_values(r: Resources, *, all_dims: bool = True) -> dict[str, float]:
    """`r` by `RESOURCES` name in base units; unset dimensions are 0, or left out when
    `all_dims` is False (a limit's unset dimension means no limit, not 0)."""
    out: dict[str, float] = {}
    for name, value, scale in (
        ("gpu", r.gpus, 1.0),
        ("cpu", r.cpu_millis, 1000.0),
        ("memory", r.memory_bytes, 1.0),
    ):
        if value is not None:
            out[name] = value / scale
        elif all_dims:
            out[name] = 0.0
    return out


class StatePublisher:
    """Publishes the cluster into `Metrics` from the gauges loop, never from an RPC.

    Gauges come from `summary.current_view` (what GetClusterSummary reports) and a pass
    over the GPUs for their holders and samples. Admissions and preemptions are counted
    from the event log as published (`EventHub.listeners`): each PLACED or ENDED event
    names an allocation to look at in the next refresh, so neither the Allocate path nor
    a refresh pays for the depth of the queue (a walk over every live allocation took
    ~150 ms of the event loop each refresh at 38,000). Only what is committed after the
    publisher is made counts, like any counter that starts at 0 with its process.
    """

    def __init__(self, metrics: Metrics, hub: EventHub) -> None:
        self.metrics = metrics
        # Allocations placed / ended since the last refresh, by the events published.
        self._placed: set[str] = set()
        self._ended: set[str] = set()
        hub.listeners.append(self._follow)
        self._nodes: set[str] = set()
        self._seen = {"transactions": 0, "delivered": 0, "cut": 0}

    def _follow(self, events: Sequence[Event]) -> None:
        for e in events:
            if e.kind == EventKind.ALLOCATION:
                if e.type == AllocationEventType.PLACED:
                    self._placed.add(e.object_id)
                elif e.type == AllocationEventType.ENDED:
                    self._ended.add(e.object_id)

    async def refresh(self, engine: Engine) -> None:
        """One refresh of every gauge and counter kept here."""
        m = self.metrics
        counts_now = {
            "transactions": engine.store.transactions_committed,
            "delivered": engine.hub.delivered,
            "cut": engine.hub.cut_off,
        }
        m.store_transactions.inc(counts_now["transactions"] - self._seen["transactions"])
        m.watch_events_sent.inc(counts_now["delivered"] - self._seen["delivered"])
        m.watch_streams_cut.labels(reason="slow_consumer").inc(
            counts_now["cut"] - self._seen["cut"]
        )
        self._seen = counts_now
        m.watch_streams.set(engine.hub.watchers)
        m.event_revision.set(engine.hub.revision)
        # First: it empties what the listener gathered, whatever fails after it.
        self._count_transitions(engine)

        view = await current_view(engine, background=True)
        m.set_allocation_counts(
            {"PENDING": view.pending_count, "ALLOCATED": view.running, "PREEMPTED": view.leaving}
        )
        m.set_node_counts({s.name: n for s, n in view.nodes_by_state.items()})
        m.set_cluster(
            resource_values(view.capacity),
            resource_values(view.allocated),
            resource_values(view.pending),
        )
        rows: dict[tuple[str, str], TenantFigures] = {}
        for name, t in view.tenants.items():
            u = t.usage
            oldest = t.oldest_pending_create_time
            rows[(name, t.parent)] = TenantFigures(
                guaranteed=resource_values(u.guaranteed),
                limit=resource_values(u.limit, all_dims=False),
                fair_share=resource_values(u.fair_share_resources),
                held=resource_values(u.held),
                pending=resource_values(u.pending),
                fair_share_ratio=u.fair_share,
                dominant_share=u.dominant_share,
                pending_count=u.pending_count,
                running_count=u.running,
                oldest_pending_seconds=max(0.0, view.read_time - oldest) if oldest else 0.0,
            )
        m.set_tenants(rows)
        now = engine.clock.now()
        budgets = {t: engine.cost.budget_spend(t, now) for t in engine.state.quotas}
        m.set_budgets({t: sa for t, sa in budgets.items() if sa[1] > 0})
        await self._gpus(engine)
        state = engine.state
        m.forget_tenants(set(state.by_tenant) | set(state.quotas) | set(view.tenants))

    async def _gpus(self, engine: Engine) -> None:
        state = engine.state
        m = self.metrics
        gpus: dict[tuple[str, str], int] = {}
        current: set[str] = set()
        async for node in _yielding(list(state.nodes.values()), 4):
            current.add(node.id)
            rows: dict[tuple[str, ...], GpuMetrics] = {}
            for g in node.gpus:
                holder = state.holder_of(node.id, g.index)
                if holder is not None:
                    status = "allocated"
                elif g.health == GpuHealth.UNHEALTHY:
                    status = "unhealthy"
                elif node.state != NodeState.READY:
                    status = "unschedulable"
                else:
                    status = "free"
                gpus[(g.model, status)] = gpus.get((g.model, status), 0) + 1
                if g.metrics is not None:
                    aid, tenant = holder or ("", "")
                    rows[(str(g.index), g.uuid, g.model, node.id, tenant, aid)] = g.metrics
            # Even when empty: that drops series of GPUs the node no longer reports.
            m.set_gpu_metrics(node.id, rows)
        for gone in self._nodes - current:
            m.forget_node(gone)
        self._nodes = current
        m.set_gpu_counts(gpus)

    def _count_transitions(self, engine: Engine) -> None:
        allocations = engine.state.allocations
        m = self.metrics
        placed, self._placed = self._placed, set()
        ended, self._ended = self._ended, set()
        for aid in placed:
            a = allocations.get(aid)
            if a is not None and a.allocate_time is not None:
                m.admitted(a.tenant, a.allocate_time - a.create_time)
        for aid in ended:
            a = allocations.get(aid)
            if a is None or a.state != AllocationState.PREEMPTED:
                continue
            if a.allocate_time is not None and a.end_time is not None:
                m.preempted(a.tenant, (a.end_time - a.allocate_time) * a.total_gpus)


async def _yielding(items: Iterable[T], every: int) -> AsyncIterator[T]:
    """`items`, handing the event loop back every `every` of them: a refresh over thousands
    of GPUs or allocations must not hold RPCs up for its whole length."""
    for i, item in enumerate(items):
        if i and i % every == 0:
            await asyncio.sleep(0)
        yield item


# --- the /metrics endpoint -----------------------------------------------------------


HealthCheck = Callable[[], str | None]
"""Says whether the server is healthy: None if it is, else a one-line reason."""


def _always_healthy() -> str | None:
    return None


def grpc_health_check(servicer: Any, service: str = "") -> HealthCheck:
    """A `HealthCheck` following `servicer`'s (a grpc_health HealthServicer) status of `service`.

    It runs on the HTTP thread, so it only reads the status map (a dict lookup, atomic
    under the GIL) instead of calling the servicer's coroutines on the event loop.
    """

    def check() -> str | None:
        status = getattr(servicer, "_server_status", {}).get(service)
        if status == health_pb2.HealthCheckResponse.SERVING:
            return None
        name = (
            health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            if status is not None
            else "SERVICE_UNKNOWN"
        )
        return f"gRPC health of service {service!r} is {name}"

    return check


def _text_response(
    start_response: StartResponse,
    status: str,
    body: str,
    *,
    head: bool = False,
    headers: list[tuple[str, str]] | None = None,
) -> Iterable[bytes]:
    data = body.encode()
    start_response(
        status,
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"),
            *(headers or []),
        ],
    )
    # wsgiref writes whatever the app returns, HEAD included: send headers only.
    return [b""] if head else [data]


def metrics_app(metrics: Metrics, health: HealthCheck | None = None) -> WSGIApplication:
    """The WSGI app behind the metrics port: `/metrics`, `/healthz`, 404 elsewhere.

    `/metrics` is prometheus_client's own app (content negotiation, gzip, `name[]=`
    filtering). `/healthz` answers 200 "ok", or 503 with `health`'s reason.
    """
    prometheus = make_wsgi_app(metrics.registry)
    check = health or _always_healthy

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        if path == "/metrics":
            body: Iterable[bytes] = prometheus(environ, start_response)
            return body
        if path != "/healthz":
            return _text_response(
                start_response, "404 Not Found", "not found: try /metrics or /healthz\n"
            )
        if method not in ("GET", "HEAD"):
            return _text_response(
                start_response,
                "405 Method Not Allowed",
                "use GET or HEAD\n",
                headers=[("Allow", "GET, HEAD")],
            )
        try:
            reason = check()
        except Exception as exc:
            # A broken check must read as unhealthy, not as a 500 with a traceback.
            log.debug("health check raised", exc_info=True)
            reason = f"health check failed: {exc!r}"
        if reason is None:
            return _text_response(start_response, "200 OK", "ok\n", head=method == "HEAD")
        one_line = " ".join(str(reason).split()) or "unhealthy"
        return _text_response(
            start_response, "503 Service Unavailable", one_line + "\n", head=method == "HEAD"
        )

    return app


class _QuietHandler(WSGIRequestHandler):
    # wsgiref logs every request to stderr; scrapes every few seconds would flood it.
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    # A slow scraper must not hold up /healthz probes; daemon threads never block exit.
    daemon_threads = True


class MetricsServer:
    """A running metrics HTTP endpoint (`/metrics`, `/healthz`). `port` is the bound port."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        self.port: int = int(httpd.server_port)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(
    metrics: Metrics, host: str, port: int, *, health: HealthCheck | None = None
) -> MetricsServer:
    """Serve `metrics_app(metrics, health)` on host:port from a daemon thread.

    Port 0 picks a free port (see `.port`). A port already in use raises OSError.
    """
    # Like prometheus_client's start_http_server: pick the family from the host, so
    # "::1" or "[::]" binds IPv6.
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class Server(_ThreadingWSGIServer):
        address_family = family

    httpd = make_server(
        str(sockaddr[0]), port, metrics_app(metrics, health), Server, handler_class=_QuietHandler
    )
    thread = threading.Thread(target=httpd.serve_forever, name="rmgrpc-metrics", daemon=True)
    thread.start()
    return MetricsServer(httpd, thread)


class RateLimitedLog:
    """Logs a recurring failure at most once per `every` seconds.

    For background loops that retry every second or so: a permanent failure then logs
    once a minute (saying how many were skipped) instead of flooding the log.
    """

    def __init__(
        self,
        logger: logging.Logger,
        every: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._every = every
        self._clock = clock
        self._last: float | None = None
        self._skipped = 0

    def exception(self, message: str) -> bool:
        """Log `message` with the current exception, unless one was logged recently.

        Returns whether it logged.
        """
        now = self._clock()
        if self._last is not None and now - self._last < self._every:
            self._skipped += 1
            return False
        skipped = f" ({self._skipped} more since the last report)" if self._skipped else ""
        self._logger.exception("%s%s", message, skipped)
        self._last, self._skipped = now, 0
        return True


# --- tracing -------------------------------------------------------------------------

_provider: TracerProvider | None = None
# The provider's tracer, made once: `get_tracer` builds a new one (and its scope) per call.
_tracer: trace.Tracer | None = None
_trace_file: IO[str] | None = None
_provider_lock = threading.Lock()

# By `otlp_protocol`; both ship in the `otlp` extra (pip install 'rmgrpc[otlp]').
_OTLP_EXPORTERS = {
    "grpc": "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
    "http/protobuf": "opentelemetry.exporter.otlp.proto.http.trace_exporter",
}


class TracingError(ValueError):
    """Tracing cannot be set up as configured; the message says what to change."""


def _iso(ns: int | None) -> str | None:
    """Nanoseconds since the epoch as UTC ISO 8601 to the microsecond."""
    if ns is None:
        return None
    seconds, rest = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{rest // 1000:06d}Z"


# One encoder for every line: `json.dumps` with options builds a new one per call.
_SPAN_JSON = json.JSONEncoder(separators=(",", ":"), default=str)


def span_line(span: ReadableSpan) -> str:
    """One span as one compact JSON line, with `ReadableSpan.to_json`'s keys for what a
    span of rmgrpc carries (name, context, kind, parent_id, times, status, attributes,
    events) but not the resource, which is the same on every line. `to_json` costs about
    five times as much (it rebuilds and indents the resource for each span), and it runs
    in the export thread, which takes the GIL from the event loop serving RPCs."""
    ctx = span.context
    parent = span.parent
    status = span.status
    line: dict[str, Any] = {
        "name": span.name,
        "context": {
            "trace_id": f"0x{ctx.trace_id:032x}" if ctx else None,
            "span_id": f"0x{ctx.span_id:016x}" if ctx else None,
        },
        "kind": str(span.kind),
        "parent_id": f"0x{parent.span_id:016x}" if parent else None,
        "start_time": _iso(span.start_time),
        "end_time": _iso(span.end_time),
        "status": {"status_code": status.status_code.name},
        "attributes": dict(span.attributes or {}),
    }
    if status.description:
        line["status"]["description"] = status.description
    if span.events:
        line["events"] = [
            {"name": e.name, "timestamp": _iso(e.timestamp), "attributes": dict(e.attributes or {})}
            for e in span.events
        ]
    return _SPAN_JSON.encode(line) + "\n"


def setup_tracing(
    exporter: str,
    *,
    out: IO[str] | None = None,
    file: str = "",
    endpoint: str = "",
    protocol: str = "grpc",
    sample_ratio: float = 1.0,
) -> TracerProvider | None:
    """Set up span export: "" or "none" (off), "console" or "otlp".

    console: one JSON object per span per line, to `out`, else appended to `file`, else
    stdout (the log goes to stderr, so spans never interleave with log lines).
    otlp: to `endpoint` (empty: the exporter's own default and OTEL_EXPORTER_OTLP_*
    variables) over `protocol` ("grpc" or "http/protobuf"); needs the `otlp` extra.
    `sample_ratio` (0..1) of new traces are recorded; a span inside a sampled trace
    always is (parent-based), so a trace is never half there.

    Returns the provider (call `.shutdown()` on it at exit to flush), or None when tracing
    is off. Calling again replaces, and shuts down, the previous provider. Raises
    TracingError for a setting that cannot work, rather than tracing silently off.
    """
    global _provider, _tracer, _trace_file
    if not 0.0 <= sample_ratio <= 1.0:
        raise TracingError(f"tracing_sample_ratio must be in [0, 1], got {sample_ratio}")
    kind = exporter.strip().lower()
    span_exporter: SpanExporter | None
    opened: IO[str] | None = None
    if kind in ("", "none"):
        span_exporter = None
    elif kind == "console":
        if out is None and file:
            try:
                opened = out = open(file, "a", encoding="utf-8")  # noqa: SIM115 (kept open)
            except OSError as exc:
                raise TracingError(
                    f"cannot write spans to tracing_file {file!r}: {exc.strerror}"
                ) from None
        span_exporter = ConsoleSpanExporter(out=out or sys.stdout, formatter=span_line)
    elif kind == "otlp":
        span_exporter = _otlp_exporter(endpoint, protocol)
    else:
        raise TracingError(f"unknown trace exporter {exporter!r}: use none, console or otlp")

    provider: TracerProvider | None = None
    if span_exporter is not None:
        provider = LightTracerProvider(
            resource=Resource.create({"service.name": "rmgrpc"}),
            # Every trace at 1.0: ALWAYS_ON skips the ratio test per span.
            sampler=ParentBased(
                ALWAYS_ON if sample_ratio >= 1.0 else TraceIdRatioBased(sample_ratio)
            ),
        )
        provider.add_span_processor(BatchSpanProcessor(span_exporter))
    with _provider_lock:
        previous, _provider = _provider, provider
        _tracer = provider.get_tracer("rmgrpc") if provider is not None else None
        previous_file, _trace_file = _trace_file, opened
    if previous is not None:
        previous.shutdown()
    if previous_file is not None:
        previous_file.close()
    return provider


def setup_tracing_from(settings: Settings) -> TracerProvider | None:
    """`setup_tracing` with the `[telemetry]` settings."""
    return setup_tracing(
        settings.tracing,
        file=settings.tracing_file,
        endpoint=settings.otlp_endpoint,
        protocol=settings.otlp_protocol,
        sample_ratio=settings.tracing_sample_ratio,
    )


def _otlp_exporter(endpoint: str, protocol: str) -> SpanExporter:
    module_name = _OTLP_EXPORTERS.get(protocol)
    if module_name is None:
        raise TracingError(f"unknown otlp_protocol {protocol!r}: use grpc or http/protobuf")
    # An optional extra: imported by name so that neither the package nor its type stubs
    # are needed unless someone asks for OTLP.
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise TracingError(
            "tracing = otlp needs the OTLP exporter, which is not installed: "
            "pip install 'rmgrpc[otlp]' (or set tracing to none or console)"
        ) from None
    kwargs = {"endpoint": endpoint} if endpoint else {}
    exporter: SpanExporter = module.OTLPSpanExporter(**kwargs)
    return exporter


def tracing_on() -> bool:
    """Whether spans are recorded anywhere: set up here, or by a global provider."""
    return _tracer is not None or not isinstance(
        trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
    )


def tracer() -> trace.Tracer:
    """The "rmgrpc" tracer: from `setup_tracing`'s provider, else the global (no-op) one."""
    current = _tracer
    if current is not None:
        return current
    return trace.get_tracer("rmgrpc")


# --- structured logs -----------------------------------------------------------------


class LogfmtFormatter(logging.Formatter):
    """One logfmt line per record: `time=… level=… logger=… msg="…"`, then `trace_id=…
    span_id=…` when logged inside a span, then `exc="…"` with a traceback (newlines
    escaped: a record is always exactly one line, whatever it carries)."""

    def format(self, record: logging.LogRecord) -> str:
        pairs = [
            ("time", _utc(record)),
            ("level", record.levelname.lower()),
            ("logger", record.name),
            ("msg", record.getMessage()),
        ]
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            pairs.append(("trace_id", format(context.trace_id, "032x")))
            pairs.append(("span_id", format(context.span_id, "016x")))
        if record.exc_info:
            pairs.append(("exc", self.formatException(record.exc_info)))
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in pairs)


def _utc(record: logging.LogRecord) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{stamp}.{int(record.msecs):03d}Z"


def _logfmt_value(value: str) -> str:
    if value and not any(c in value for c in ' ="\\\n\r\t'):
        return value
    escaped = (
        value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    )
    return f'"{escaped}"'


def setup_logging(level: str, stream: IO[str] | None = None) -> None:
    """Root logging to `stream` (default stderr) in logfmt lines at `level`."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


# --- the RPC interceptor -------------------------------------------------------------


def _status_name(context: aio.ServicerContext[Any, Any], error: BaseException | None) -> str:
    if error is None or isinstance(error, aio.AbortError):
        # After abort() or set_code() the context holds the code; None means OK.
        code = context.code()
        if code is None:
            return "UNKNOWN" if error is not None else "OK"
        return code.name if isinstance(code, grpc.StatusCode) else str(code)
    # A client that cancels (or whose deadline passes) surfaces in the handler as
    # CancelledError, or as GeneratorExit in a stream the server stops iterating.
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    return "UNKNOWN"


_HANDLER_KINDS: tuple[tuple[str, Callable[..., grpc.RpcMethodHandler]], ...] = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)


def _split_method(full_method: str) -> tuple[str, str]:
    # "/rmgrpc.v1.AllocatorService/Allocate" → ("rmgrpc.v1.AllocatorService", "Allocate")
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service or "unknown", method or full_method


# grpc ships no type stubs, so its base class is Any to mypy.
class MetricsInterceptor(aio.ServerInterceptor):  # type: ignore[misc]
    """Counts and times every RPC by service, method and final status code.

    When tracing is set up, each RPC also gets a server span named after its method.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        service, method = _split_method(handler_call_details.method)
        for kind, rebuild in _HANDLER_KINDS:
            behavior = getattr(handler, kind)
            if behavior is None:
                continue
            wrapped = self._wrap(behavior, service, method)
            if wrapped is None:
                return handler
            return rebuild(
                wrapped,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _wrap(self, behavior: Callable[..., Any], service: str, method: str) -> Any:
        # Keep the handler's own flavour: grpc.aio treats an async generator (responses
        # yielded) differently from a coroutine (responses sent with context.write, or
        # one returned). A plain sync handler runs in grpc's thread pool; wrapping it in a
        # coroutine would move it onto the event loop, so it is left alone (None).
        if inspect.isasyncgenfunction(behavior):
            return self._wrap_async_gen(behavior, service, method)
        if inspect.iscoroutinefunction(behavior):
            return self._wrap_coroutine(behavior, service, method)
        return None

    def _finish(
        self,
        span: trace.Span | None,
        context: aio.ServicerContext[Any, Any],
        service: str,
        method: str,
        start: float,
        error: BaseException | None,
    ) -> None:
        code = _status_name(context, error)
        self._metrics.observe_rpc(service, method, code, time.perf_counter() - start)
        if span is None:
            return
        span.set_attribute("rpc.grpc.status_code", code)
        if code != "OK":
            span.set_status(trace.StatusCode.ERROR, code)

    def _span(self, service: str, method: str) -> trace.Span | None:
        """The RPC's span; None when tracing is off (no span made, none made current: a
        few per cent of a cheap RPC's cost)."""
        if not tracing_on():
            return None
        return tracer().start_span(
            f"{service}/{method}",
            kind=trace.SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
            # Aborts are ordinary answers here, not crashes: record the code, not a trace.
            record_exception=False,
            set_status_on_exception=False,
        )

    def _wrap_coroutine(
        self, behavior: Callable[..., Awaitable[Any]], service: str, method: str
    ) -> Callable[[Any, aio.ServicerContext[Any, Any]], Awaitable[Any]]:
        async def wrapped(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            start = time.perf_counter()
            span = self._span(service, method)
            # Current for the handler's await, so spans it opens nest and its log lines
            # carry the trace id (attached by hand: `use_span` costs a generator more).
            token = None if span is None else otel_context.attach(trace.set_span_in_context(span))
            failed: BaseException | None = None
            try:
                return await behavior(request, context)
            except BaseException as error:
                failed = error
                raise
            finally:
                self._finish(span, context, service, method, start, failed)
                if span is not None and token is not None:
                    otel_context.detach(token)
                    span.end()

        return wrapped

    def _wrap_async_gen(
        self, behavior: Callable[..., AsyncIterator[Any]], service: str, method: str
    ) -> Callable[[Any, aio.ServicerContext[Any, Any]], AsyncIterator[Any]]:
        async def wrapped(
            request: Any, context: aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            start = time.perf_counter()
            # Not made current: a context attached across `yield` may be detached from
            # another context when the stream is closed, which OpenTelemetry rejects.
            span = self._span(service, method)
            try:
                async for response in behavior(request, context):
                    yield response
            except BaseException as error:
                self._finish(span, context, service, method, start, error)
                raise
            else:
                self._finish(span, context, service, method, start, None)
            finally:
                if span is not None:
                    span.end()

        return wrapped
