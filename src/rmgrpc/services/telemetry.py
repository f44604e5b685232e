"""rmgrpc.v1.TelemetryService: the cluster as a whole, read at a durable revision.

The numbers come from `rmgrpc.summary` (the same view the Prometheus gauges publish);
this module only validates, paces streams and encodes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from rmgrpc import auth, authorize, codec
from rmgrpc.cost import Amounts
from rmgrpc.engine import Engine
from rmgrpc.engine.cost import report
from rmgrpc.model import NodeState, parent_of
from rmgrpc.services import validate as val
from rmgrpc.services.status import Context as Ctx
from rmgrpc.services.status import stream, unary
from rmgrpc.summary import ClusterView, current_view
from rmgrpc.v1 import quota_pb2, telemetry_pb2, telemetry_pb2_grpc

DEFAULT_INTERVAL_SECONDS = 5
MIN_INTERVAL_SECONDS = 1
MAX_INTERVAL_SECONDS = 3600

# Latest time a Timestamp may carry (9999-12-31T23:59:59Z).
_MAX_SECONDS = 253_402_300_799


def summary_to_proto(view: ClusterView) -> telemetry_pb2.ClusterSummary:
    """The wire form of a view."""
    by_state = view.nodes_by_state
    gpu_u, cpu_u, mem_u = view.utilization()
    out = telemetry_pb2.ClusterSummary(
        nodes_total=sum(by_state.values()),
        nodes_ready=by_state.get(NodeState.READY, 0),
        nodes_cordoned=by_state.get(NodeState.CORDONED, 0),
        nodes_draining=by_state.get(NodeState.DRAINING, 0),
        nodes_down=by_state.get(NodeState.DOWN, 0),
        capacity=codec.resources_to_proto(view.capacity),
        allocated=codec.resources_to_proto(view.allocated),
        pending=codec.resources_to_proto(view.pending),
        schedulable=codec.resources_to_proto(view.schedulable),
        reserved=codec.resources_to_proto(view.reserved.active),
        reserved_upcoming=codec.resources_to_proto(view.reserved.upcoming),
        utilization=telemetry_pb2.ResourceUtilization(gpus=gpu_u, cpu=cpu_u, memory=mem_u),
        allocations_pending=view.pending_count,
        allocations_running=view.running,
        mean_gpu_utilization_percent=view.mean_gpu_utilization_percent,
        revision=view.revision,
        nodes_by_state=[
            telemetry_pb2.NodeStateCount(state=int(s), count=n)  # type: ignore[arg-type]
            for s, n in sorted(by_state.items())
        ],
        models=[
            telemetry_pb2.ModelSummary(
                model=m.model,
                total_gpus=m.total,
                allocated_gpus=m.allocated,
                healthy_gpus=m.healthy,
                unhealthy_gpus=m.unhealthy,
                pending_gpus=m.pending,
                allocated_fraction=m.allocated_fraction,
                mean_utilization_percent=m.mean_utilization_percent,
                memory_total_bytes=m.memory_total_bytes,
                memory_used_bytes=m.memory_used_bytes,
            )
            for m in view.models.values()
        ],
    )
    stamp = codec.ts(view.read_time)
    if stamp is not None:
        out.read_time.CopyFrom(stamp)
    for name, t in view.tenants.items():
        u = t.usage
        msg = out.tenants.add(
            tenant=name,
            parent=t.parent,
            held=codec.resources_to_proto(u.held),
            pending=codec.resources_to_proto(u.pending),
            guaranteed=codec.resources_to_proto(u.guaranteed),
            limit=codec.resources_to_proto(u.limit),
            fair_share=u.fair_share,
            fair_share_resources=codec.resources_to_proto(u.fair_share_resources),
            dominant_share=u.dominant_share,
            weight=u.weight,
            running_allocations=u.running,
            pending_allocations=u.pending_count,
            reserved=codec.resources_to_proto(t.reserved.active),
            reserved_upcoming=codec.resources_to_proto(t.reserved.upcoming),
        )
        created = codec.ts(t.oldest_pending_create_time)
        if created is not None and t.oldest_pending_create_time is not None:
            msg.oldest_pending_create_time.CopyFrom(created)
            msg.oldest_pending_seconds = max(0.0, view.read_time - t.oldest_pending_create_time)
    return out


class TelemetryService(telemetry_pb2_grpc.TelemetryServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @unary
    async def GetClusterSummary(
        self, request: telemetry_pb2.GetClusterSummaryRequest, context: Ctx
    ) -> telemetry_pb2.GetClusterSummaryResponse:
        view = await current_view(self.engine)
        return telemetry_pb2.GetClusterSummaryResponse(summary=summary_to_proto(view))

    @stream
    async def StreamClusterMetrics(
        self, request: telemetry_pb2.StreamClusterMetricsRequest, context: Ctx
    ) -> AsyncIterator[telemetry_pb2.StreamClusterMetricsResponse]:
        v = val.Violations()
        interval = request.interval_seconds or DEFAULT_INTERVAL_SECONDS
        v.int_range("interval_seconds", interval, MIN_INTERVAL_SECONDS, MAX_INTERVAL_SECONDS)
        v.check(request.min_revision >= 0, "min_revision", "must be >= 0")
        v.check(request.max_messages >= 0, "max_messages", "must be >= 0 (0: no end)")
        v.raise_if_any()
        loop = asyncio.get_running_loop()
        if request.min_revision > self.engine.revision:
            # A client resuming against a server that is behind it (a restored database):
            # wait up to one interval for it, rather than show an older cluster.
            deadline = loop.time() + interval
            while request.min_revision > self.engine.revision:
                if loop.time() >= deadline:
                    await context.abort(
                        grpc.StatusCode.OUT_OF_RANGE,
                        f"min_revision {request.min_revision} is ahead of this server's "
                        f"revision {self.engine.revision}: resume with min_revision <= "
                        f"{self.engine.revision} or read GetClusterSummary first",
                    )
                await asyncio.sleep(0.05)
        sent = 0
        while True:
            started = loop.time()
            view = await current_view(self.engine)
            yield telemetry_pb2.StreamClusterMetricsResponse(summary=summary_to_proto(view))
            sent += 1
            if request.max_messages and sent >= request.max_messages:
                return
            # Paced from the start of each read, so a slow read does not stretch the period.
            await asyncio.sleep(max(0.0, interval - (loop.time() - started)))

    @unary
    async def GetCostReport(
        self, request: telemetry_pb2.GetCostReportRequest, context: Ctx
    ) -> telemetry_pb2.GetCostReportResponse:
        v = val.Violations()
        v.tenant("tenant", request.tenant, required=False)
        start = _time(v, "start_time", request)
        end = _time(v, "end_time", request)
        now = self.engine.clock.now()
        if start is not None and end is not None:
            v.check(start < end, "end_time", "must be after start_time")
        elif start is not None:
            v.check(start < now, "start_time", "must be in the past when end_time is unset")
        v.raise_if_any()
        # A tenant principal sees its own subtree (asking for none or a wider one).
        tenant = authorize.tenant_scope(auth.current(), request.tenant)
        engine = self.engine
        costs = engine.cost
        got = report(costs.ledger, tenant, start, now if end is None else end)
        out = telemetry_pb2.GetCostReportResponse(total_cost=got.total.cost)
        for name in sorted(got.subtree):
            sub, own = got.subtree[name], got.own.get(name, Amounts())
            quota = engine.state.quotas.get(name)
            budget = quota.budget if quota is not None else None
            spent, amount = costs.budget_spend(name, now)
            out.tenants.add(
                tenant=name,
                parent="" if name == tenant else parent_of(name),
                cost=sub.cost,
                gpu_hours=sub.gpu_hours,
                cpu_core_hours=sub.cpu_core_hours,
                memory_gib_hours=sub.memory_gib_hours,
                own_cost=own.cost,
                budget_amount=amount,
                budget_period_seconds=budget.period_seconds if budget is not None else 0,
                budget_period=quota_pb2.BudgetPeriod.ValueType(
                    budget.period if budget is not None else 0
                ),
                budget_spent=spent,
            )
        for model in sorted(got.models):
            m = got.models[model]
            out.models.add(model=model, cost=m.cost, gpu_hours=m.gpu_hours)
        for day in sorted(got.days):
            d = got.days[day]
            out.days.add(day=codec.ts(day), cost=d.cost, gpu_hours=d.gpu_hours)
        for field, seconds in (
            ("start_time", got.start),
            ("end_time", got.end),
            ("accrued_through", costs.accrued_through or None),
        ):
            stamp = codec.ts(seconds)
            if stamp is not None:
                getattr(out, field).CopyFrom(stamp)
        return out


def _time(
    v: val.Violations, field: str, request: telemetry_pb2.GetCostReportRequest
) -> float | None:
    """The request's timestamp `field` in seconds, None when unset; a violation when it is
    not a valid time."""
    if not request.HasField(field):  # type: ignore[arg-type]
        return None
    stamp: Timestamp = getattr(request, field)
    ok = 0 <= stamp.seconds <= _MAX_SECONDS and 0 <= stamp.nanos <= 999_999_999
    v.check(ok, field, "must be a time between 1970-01-01 and 9999-12-31 (UTC)")
    return stamp.seconds + stamp.nanos / 1e9 if ok else None
