"""TelemetryService and /metrics against a real server after a scripted scenario.

The scenario: 2 nodes x 8 H100; `org/a` guaranteed 4 GPUs holds 2 x 2 GPUs, `org/b`
holds 4 GPUs and waits for a gang of 2 x 8 H100 it cannot get; then `sim-node-1` is
cordoned. Every figure is checked against what that scenario must give, and the
tenants' fair shares against GetUsage (one computation, two readers).
"""

from __future__ import annotations

import asyncio
import importlib
import io
import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from rmgrpc import telemetry
from rmgrpc.server import RunningServer, start
from rmgrpc.v1 import (
    allocator_pb2,
    allocator_pb2_grpc,
    gpu_manager_pb2,
    gpu_manager_pb2_grpc,
    quota_pb2,
    quota_pb2_grpc,
    resources_pb2,
    telemetry_pb2,
    telemetry_pb2_grpc,
)
from tests.conftest import make_settings
from tests.e2e.helpers import eventually, field_violations

GIB = 1 << 30
TELEMETRY = "rmgrpc.v1.TelemetryService"


@dataclass
class Scenario:
    a_ids: list[str]
    b_held: str
    b_pending: allocator_pb2.Allocation


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[RunningServer]:
    server = await start(
        make_settings(tmp_path, metrics_listen="127.0.0.1:0", metrics_refresh_seconds=0.05)
    )
    yield server
    await server.stop(0)


@pytest.fixture
async def ch(running: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield channel


def shape(gpus: int, model: str = "") -> resources_pb2.Shape:
    return resources_pb2.Shape(gpus=gpus, gpu_model=model, cpu_millis=1000, memory_bytes=GIB)


async def play(ch: grpc.aio.Channel) -> Scenario:
    alloc = allocator_pb2_grpc.AllocatorServiceStub(ch)
    quota = quota_pb2_grpc.QuotaServiceStub(ch)
    nodes = gpu_manager_pb2_grpc.GpuManagerServiceStub(ch)
    await quota.SetQuota(
        quota_pb2.SetQuotaRequest(
            quota=quota_pb2.Quota(
                tenant="org/a",
                guaranteed=resources_pb2.Resources(gpus=4),
                limit=resources_pb2.Resources(gpus=12),
                weight=2,
            )
        )
    )
    a_ids = []
    for _ in range(2):
        a = (
            await alloc.Allocate(
                allocator_pb2.AllocateRequest(tenant="org/a", count=1, shape=shape(2))
            )
        ).allocation
        assert a.state == allocator_pb2.ALLOCATION_STATE_ALLOCATED
        a_ids.append(a.id)
    held = (
        await alloc.Allocate(allocator_pb2.AllocateRequest(tenant="org/b", count=1, shape=shape(4)))
    ).allocation
    assert held.state == allocator_pb2.ALLOCATION_STATE_ALLOCATED
    waiting = (
        await alloc.Allocate(
            allocator_pb2.AllocateRequest(tenant="org/b", count=2, shape=shape(8, "H100"))
        )
    ).allocation
    assert waiting.state == allocator_pb2.ALLOCATION_STATE_PENDING
    await nodes.CordonNode(gpu_manager_pb2.CordonNodeRequest(node_id="sim-node-1", reason="t"))
    return Scenario(a_ids, held.id, waiting)


def check_summary(s: telemetry_pb2.ClusterSummary, sc: Scenario) -> None:
    assert (s.nodes_total, s.nodes_ready, s.nodes_cordoned) == (2, 1, 1)
    by_state = {gpu_manager_pb2.NodeState.Name(n.state): n.count for n in s.nodes_by_state}
    assert by_state["NODE_STATE_READY"] == 1 and by_state["NODE_STATE_CORDONED"] == 1
    assert sum(by_state.values()) == 2
    assert (s.capacity.gpus, s.allocated.gpus, s.pending.gpus) == (16, 8, 16)
    assert s.allocated.cpu_millis == 3000 and s.allocated.memory_bytes == 3 * GIB
    assert s.pending.cpu_millis == 2000
    # Only the READY node takes new work (all its GPUs are healthy).
    assert s.schedulable.gpus == 8
    assert s.utilization.gpus == pytest.approx(0.5)
    assert s.utilization.cpu == pytest.approx(3000 / s.capacity.cpu_millis)
    assert (s.allocations_running, s.allocations_pending) == (3, 1)
    (h100,) = s.models
    assert (h100.model, h100.total_gpus, h100.allocated_gpus, h100.pending_gpus) == (
        "H100",
        16,
        8,
        16,
    )
    assert (h100.healthy_gpus, h100.unhealthy_gpus, h100.allocated_fraction) == (16, 0, 0.5)
    assert h100.memory_total_bytes > 0
    tenants = {t.tenant: t for t in s.tenants}
    assert set(tenants) == {"org", "org/a", "org/b"}
    org, a, b = tenants["org"], tenants["org/a"], tenants["org/b"]
    assert (org.parent, a.parent, b.parent) == ("", "org", "org")
    assert (org.held.gpus, a.held.gpus, b.held.gpus) == (8, 4, 4)
    assert (a.guaranteed.gpus, a.limit.gpus, a.weight) == (4, 12, 2)
    assert (b.pending.gpus, b.pending_allocations, b.running_allocations) == (16, 1, 1)
    assert (a.pending_allocations, a.running_allocations) == (0, 2)
    assert not a.HasField("oldest_pending_create_time") and a.oldest_pending_seconds == 0
    assert b.oldest_pending_create_time == sc.b_pending.create_time
    assert org.oldest_pending_create_time == sc.b_pending.create_time
    assert b.oldest_pending_seconds >= 0
    assert s.revision > 0 and s.read_time.seconds > 0


async def test_cluster_summary_matches_the_scenario(
    running: RunningServer, ch: grpc.aio.Channel
) -> None:
    sc = await play(ch)
    telemetry = telemetry_pb2_grpc.TelemetryServiceStub(ch)
    s = (await telemetry.GetClusterSummary(telemetry_pb2.GetClusterSummaryRequest())).summary
    check_summary(s, sc)
    # Read at a durable revision: every write answered before is included.
    assert s.revision >= sc.b_pending.revision
    assert s.revision <= running.engine.revision
    # Fair shares are GetUsage's, at every level of the tree.
    quota = quota_pb2_grpc.QuotaServiceStub(ch)
    for t in s.tenants:
        usage = (await quota.GetUsage(quota_pb2.GetUsageRequest(tenant=t.tenant))).usage
        assert t.fair_share == pytest.approx(usage.fair_share), t.tenant
        assert t.held == usage.held and t.pending == usage.pending
    # grpcurl's view: the pinned names show as snake_case JSON.
    as_json = MessageToDict(s, preserving_proto_field_name=True)
    assert {"capacity", "allocated", "pending", "models", "tenants", "nodes_by_state"} <= set(
        as_json
    )


async def test_stream_cluster_metrics_paces_follows_changes_and_resumes(
    running: RunningServer, ch: grpc.aio.Channel
) -> None:
    sc = await play(ch)
    telemetry = telemetry_pb2_grpc.TelemetryServiceStub(ch)
    alloc = allocator_pb2_grpc.AllocatorServiceStub(ch)
    call = telemetry.StreamClusterMetrics(
        telemetry_pb2.StreamClusterMetricsRequest(interval_seconds=1)
    )
    stream = aiter(call)
    first = (await anext(stream)).summary
    check_summary(first, sc)
    # A change between two messages shows in the next one, at a later revision.
    await alloc.ReleaseAllocation(allocator_pb2.ReleaseAllocationRequest(id=sc.b_held))
    second = (await anext(stream)).summary
    assert second.revision > first.revision
    assert second.allocated.gpus == 4
    assert {t.tenant: t.held.gpus for t in second.tenants}["org/b"] == 0
    call.cancel()
    # Resuming from the last revision seen never goes back; max_messages ends the stream.
    resumed = [
        m.summary
        async for m in telemetry.StreamClusterMetrics(
            telemetry_pb2.StreamClusterMetricsRequest(
                interval_seconds=1, min_revision=second.revision, max_messages=1
            )
        )
    ]
    assert len(resumed) == 1 and resumed[0].revision >= second.revision


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"interval_seconds": -1}, "interval_seconds"),
        ({"interval_seconds": 3601}, "interval_seconds"),
        ({"min_revision": -5}, "min_revision"),
        ({"max_messages": -1}, "max_messages"),
    ],
)
async def test_stream_cluster_metrics_refuses_bad_bounds(
    ch: grpc.aio.Channel, request_fields: dict[str, int], field: str
) -> None:
    telemetry = telemetry_pb2_grpc.TelemetryServiceStub(ch)
    call = telemetry.StreamClusterMetrics(
        telemetry_pb2.StreamClusterMetricsRequest(**request_fields)  # type: ignore[arg-type]
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await anext(aiter(call))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(err.value)


async def test_stream_from_a_revision_this_server_never_reached_is_out_of_range(
    running: RunningServer, ch: grpc.aio.Channel
) -> None:
    telemetry = telemetry_pb2_grpc.TelemetryServiceStub(ch)
    ahead = running.engine.revision + 1000
    call = telemetry.StreamClusterMetrics(
        telemetry_pb2.StreamClusterMetricsRequest(interval_seconds=1, min_revision=ahead)
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await anext(aiter(call))
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert str(ahead) in (err.value.details() or "")


async def test_cost_report_is_served(ch: grpc.aio.Channel) -> None:
    """Served (tests/e2e/test_cost_service.py checks its figures): the whole range of a server
    that has accrued nothing yet is one empty report of today."""
    telemetry = telemetry_pb2_grpc.TelemetryServiceStub(ch)
    report = await telemetry.GetCostReport(telemetry_pb2.GetCostReportRequest())
    assert report.total_cost == 0 and report.end_time.seconds - report.start_time.seconds == 86400


async def test_telemetry_service_has_health_and_reflection(ch: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(ch)
    got = await health.Check(health_pb2.HealthCheckRequest(service=TELEMETRY))
    assert got.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(ch)

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for answer in stub.ServerReflectionInfo(requests()):
        names = {s.name for s in answer.list_services_response.service}
        assert TELEMETRY in names
        break
    await asyncio.sleep(0)


# --- /metrics after the same scenario ---------------------------------------------------


def scrape(running: RunningServer) -> dict[str, Metric]:
    assert running.metrics_server is not None
    url = f"http://127.0.0.1:{running.metrics_server.port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: dict[str, Metric], family: str, **labels: str) -> float | None:
    """The one sample of `family` whose labels include `labels`, or None."""
    found = [
        s.value
        for s in families[family].samples
        if s.name in (family, family + "_total") and labels.items() <= s.labels.items()
    ]
    assert len(found) <= 1, (family, labels, found)
    return found[0] if found else None


async def scraped(
    running: RunningServer, ok: Callable[[dict[str, Metric]], bool], timeout: float = 10.0
) -> dict[str, Metric]:
    """The first scrape for which `ok` holds (the gauges refresh every 50 ms here)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        fams = await asyncio.to_thread(scrape, running)
        if ok(fams):
            return fams
        # Not the whole scrape in the failure: it is thousands of samples.
        assert asyncio.get_running_loop().time() < deadline, "metrics never reached the state"
        await asyncio.sleep(0.05)


async def test_metrics_hold_every_family_with_the_scenario_values(
    running: RunningServer, ch: grpc.aio.Channel
) -> None:
    sc = await play(ch)
    fams = await scraped(
        running,
        lambda f: (
            value(f, "rmgrpc_allocations", state="PENDING") == 1
            and value(f, "rmgrpc_tenant_admitted", tenant="org/b") == 1
            and value(f, "rmgrpc_nodes", state="CORDONED") == 1
        ),
    )
    # Allocations by live state only.
    states = {s.labels["state"]: s.value for s in fams["rmgrpc_allocations"].samples}
    assert states == {"PENDING": 1, "ALLOCATED": 3, "PREEMPTED": 0}
    # GPUs: statuses partition the GPUs, no "total" beside its parts.
    gpus = {s.labels["status"]: s.value for s in fams["rmgrpc_gpus"].samples}
    assert "total" not in gpus and sum(gpus.values()) == 16 and gpus["allocated"] == 8
    assert value(fams, "rmgrpc_nodes", state="READY") == 1
    assert value(fams, "rmgrpc_cluster_capacity", resource="gpu") == 16
    assert value(fams, "rmgrpc_cluster_allocated", resource="gpu") == 8
    assert value(fams, "rmgrpc_cluster_allocated", resource="cpu") == 3
    assert value(fams, "rmgrpc_cluster_pending", resource="gpu") == 16
    # Per tenant (with its subtree), Kueue-like.
    a = {"tenant": "org/a", "parent": "org"}
    b = {"tenant": "org/b", "parent": "org"}
    assert value(fams, "rmgrpc_tenant_guaranteed", resource="gpu", **a) == 4
    assert value(fams, "rmgrpc_tenant_limit", resource="gpu", **a) == 12
    assert value(fams, "rmgrpc_tenant_limit", resource="cpu", **a) is None  # no limit
    assert value(fams, "rmgrpc_tenant_held", resource="gpu", **a) == 4
    assert value(fams, "rmgrpc_tenant_held", resource="gpu", tenant="org", parent="") == 8
    assert value(fams, "rmgrpc_tenant_pending", resource="gpu", **b) == 16
    assert value(fams, "rmgrpc_tenant_pending_allocations", **b) == 1
    assert value(fams, "rmgrpc_tenant_running_allocations", **a) == 2
    oldest = value(fams, "rmgrpc_tenant_oldest_pending_seconds", **b)
    assert oldest is not None and oldest >= 0
    assert value(fams, "rmgrpc_tenant_oldest_pending_seconds", **a) == 0
    quota = quota_pb2_grpc.QuotaServiceStub(ch)
    usage = (await quota.GetUsage(quota_pb2.GetUsageRequest(tenant="org/a"))).usage
    assert value(fams, "rmgrpc_tenant_fair_share_ratio", **a) == pytest.approx(usage.fair_share)
    assert value(fams, "rmgrpc_tenant_fair_share", resource="gpu", **a) is not None
    assert value(fams, "rmgrpc_tenant_dominant_share", **a) == pytest.approx(usage.dominant_share)
    # Counters: the tenant's own admissions, and how long each waited.
    assert value(fams, "rmgrpc_tenant_admitted", tenant="org/a") == 2
    waits = [
        s
        for s in fams["rmgrpc_tenant_admission_wait_seconds"].samples
        if s.name.endswith("_count") and s.labels["tenant"] == "org/a"
    ]
    assert [s.value for s in waits] == [2]
    assert fams["rmgrpc_tenant_preempted_gpu_seconds"].type == "counter"
    # Per GPU: DCGM's labels plus who holds it.
    held = [
        s
        for s in fams["rmgrpc_gpu_utilization_percent"].samples
        if s.labels["allocation"] == sc.b_held
    ]
    assert len(held) == 4
    assert {s.labels["tenant"] for s in held} == {"org/b"}
    assert {s.labels["modelName"] for s in held} == {"H100"}
    assert all(s.labels["UUID"] and s.labels["Hostname"].startswith("sim-node-") for s in held)
    for family in ("rmgrpc_gpu_memory_used_bytes", "rmgrpc_gpu_temperature_celsius"):
        assert len(fams[family].samples) == 16
    assert len(fams["rmgrpc_gpu_power_watts"].samples) == 16
    # No `_created` noise, and budget series only for tenants with a budget (none here).
    assert not any(s.name.endswith("_created") for f in fams.values() for s in f.samples)
    assert not any(f.samples for name, f in fams.items() if "budget" in name)

    # The waiting gang is admitted once the cluster is free: counted once, with its wait.
    alloc = allocator_pb2_grpc.AllocatorServiceStub(ch)
    nodes = gpu_manager_pb2_grpc.GpuManagerServiceStub(ch)
    await nodes.UncordonNode(gpu_manager_pb2.UncordonNodeRequest(node_id="sim-node-1"))
    for aid in [*sc.a_ids, sc.b_held]:
        await alloc.ReleaseAllocation(allocator_pb2.ReleaseAllocationRequest(id=aid))
    # The admitted counter follows events, the gauges their own loop: wait for both.
    fams = await scraped(
        running,
        lambda f: (
            value(f, "rmgrpc_tenant_admitted", tenant="org/b") == 2
            and value(f, "rmgrpc_allocations", state="PENDING") == 0
        ),
    )
    gang = (
        await alloc.GetAllocation(allocator_pb2.GetAllocationRequest(id=sc.b_pending.id))
    ).allocation
    assert gang.state == allocator_pb2.ALLOCATION_STATE_ALLOCATED
    waited = (gang.allocate_time.ToNanoseconds() - gang.create_time.ToNanoseconds()) / 1e9
    b_waits = {
        s.name: s.value
        for s in fams["rmgrpc_tenant_admission_wait_seconds"].samples
        if s.labels.get("tenant") == "org/b" and not s.name.endswith("_bucket")
    }
    assert b_waits["rmgrpc_tenant_admission_wait_seconds_count"] == 2
    assert b_waits["rmgrpc_tenant_admission_wait_seconds_sum"] >= waited > 0
    assert value(fams, "rmgrpc_allocations", state="PENDING") == 0
    assert value(fams, "rmgrpc_tenant_admitted", tenant="org/a") == 2  # not counted again


async def test_metrics_count_preempted_gpu_seconds_and_drop_gone_tenants(
    running: RunningServer, ch: grpc.aio.Channel
) -> None:
    await play(ch)
    alloc = allocator_pb2_grpc.AllocatorServiceStub(ch)
    # Only sim-node-0 is READY, and full: 4 GPUs (ops's fair share) at priority 100 must
    # preempt what runs there.
    urgent = await alloc.Allocate(
        allocator_pb2.AllocateRequest(tenant="ops", count=1, priority=100, shape=shape(4))
    )
    victims = list(urgent.preempted_allocation_ids)
    if not victims:
        got = await eventually(
            lambda: alloc.GetAllocation(
                allocator_pb2.GetAllocationRequest(id=urgent.allocation.id)
            ),
            lambda r: r.allocation.state == allocator_pb2.ALLOCATION_STATE_ALLOCATED,
        )
        assert got.allocation.state == allocator_pb2.ALLOCATION_STATE_ALLOCATED
        listing = await alloc.ListAllocations(
            allocator_pb2.ListAllocationsRequest(
                tenant="org", states=[allocator_pb2.ALLOCATION_STATE_PREEMPTED]
            )
        )
        victims = [a.id for a in listing.allocations]
    assert victims
    lost: dict[str, float] = {}
    for vid in victims:
        v = (await alloc.GetAllocation(allocator_pb2.GetAllocationRequest(id=vid))).allocation
        gpu_s = (v.end_time.ToNanoseconds() - v.allocate_time.ToNanoseconds()) / 1e9
        lost[v.tenant] = lost.get(v.tenant, 0.0) + gpu_s * v.count * v.shape.gpus
    fams = await scraped(
        running,
        lambda f: all(
            value(f, "rmgrpc_tenant_preempted_gpu_seconds", tenant=t) is not None for t in lost
        ),
    )
    for tenant, gpu_seconds in lost.items():
        got_s = value(fams, "rmgrpc_tenant_preempted_gpu_seconds", tenant=tenant)
        assert got_s == pytest.approx(gpu_seconds, abs=1e-3)
    # A tenant that is gone (its quota deleted, no work) leaves the gauges: labels stay bounded.
    quota = quota_pb2_grpc.QuotaServiceStub(ch)
    idle = {"tenant": "idle", "parent": ""}
    await quota.SetQuota(
        quota_pb2.SetQuotaRequest(
            quota=quota_pb2.Quota(tenant="idle", guaranteed=resources_pb2.Resources(gpus=1))
        )
    )
    await scraped(
        running, lambda f: value(f, "rmgrpc_tenant_guaranteed", resource="gpu", **idle) == 1
    )
    await quota.DeleteQuota(quota_pb2.DeleteQuotaRequest(tenant="idle"))
    fams = await scraped(
        running, lambda f: value(f, "rmgrpc_tenant_guaranteed", resource="gpu", **idle) is None
    )
    assert value(fams, "rmgrpc_tenant_oldest_pending_seconds", **idle) is None


# --- the dashboard and alert rules in deploy/ ---------------------------------------------

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan",
}  # fmt: skip


def series_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads.

    Strings, label matchers, ranges and grouping clauses are dropped first; what is left
    that looks like a name and is not a function call, a keyword or a number is a metric.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    text = re.sub(r"\boffset\s+\S+", " ", text)
    # Not inside a number or duration ("5m", "1e3").
    for m in re.finditer(r"(?<![A-Za-z0-9_:.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        following = text[m.end() :].lstrip()
        if following.startswith("(") or m.group().lower() in _KEYWORDS:
            continue
        names.add(m.group())
    return names


def exported_names(fams: dict[str, Metric]) -> set[str]:
    """Every series name a scrape's families can have, samples present or not."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    out = set()
    for f in fams.values():
        out.update(f.name + s for s in suffixes.get(f.type, ("",)))
        out.update(s.name for s in f.samples)
    return out


def dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "rmgrpc-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            m = re.fullmatch(r"label_values\((\w+),\s*\w+\)", query["query"])
            assert m, query
            exprs.append(m.group(1))
    return exprs


def alert_exprs() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rmgrpc-alerts.yaml").read_text())
    out = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["alert"] and rule["annotations"]["summary"], rule
            assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule
            out.append(rule["expr"])
    return out


def test_series_names_reads_metrics_and_nothing_else() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (tenant, le) (rate(rmgrpc_x_bucket{tenant=~"a|b"}[5m])))'
        " / on (tenant) group_left rmgrpc_y > bool 3 and rmgrpc_z offset 5m"
    )
    assert series_names(expr) == {"rmgrpc_x_bucket", "rmgrpc_y", "rmgrpc_z"}


async def test_dashboard_and_alerts_name_only_exported_series(
    running: RunningServer, ch: grpc.aio.Channel
) -> None:
    await play(ch)
    fams = await scraped(running, lambda f: value(f, "rmgrpc_nodes", state="CORDONED") == 1)
    exported = exported_names(fams)
    for source, exprs in (("dashboard", dashboard_exprs()), ("alerts", alert_exprs())):
        assert len(exprs) >= 10, source
        for expr in exprs:
            names = series_names(expr)
            assert names, (source, expr)
            assert names <= exported, (source, expr, names - exported)


# --- tracing settings refused at start-up -------------------------------------------------


def serve_once(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(sys.executable, "-m", "rmgrpc", "serve", "--listen", "127.0.0.1:0"),
            *("--db", str(tmp_path / "db"), "--metrics-listen", ""),
        ],
        env={**os.environ, "RMGRPC_NVML": "off", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_serve_refuses_otlp_without_the_extra(tmp_path: Path) -> None:
    try:
        importlib.import_module("opentelemetry.exporter.otlp.proto.grpc.trace_exporter")
    except ImportError:
        pass
    else:
        pytest.skip("the otlp extra is installed here")
    done = serve_once(tmp_path, {"RMGRPC_TRACING": "otlp"})
    assert done.returncode == 1
    assert "pip install 'rmgrpc[otlp]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_refuses_an_unwritable_tracing_file(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "spans.jsonl"
    done = serve_once(tmp_path, {"RMGRPC_TRACING": "console", "RMGRPC_TRACING_FILE": str(missing)})
    assert done.returncode == 1
    assert "cannot write spans to tracing_file" in done.stderr
    assert "Traceback" not in done.stderr


async def test_each_rpc_and_each_scheduling_pass_is_a_span(tmp_path: Path) -> None:
    """Spans per RPC and per pass: a release that frees room for waiting work runs a pass,
    whose span counts what it admitted; the RPCs' spans carry their status codes."""
    out = io.StringIO()
    provider = telemetry.setup_tracing("console", out=out)
    assert provider is not None
    server = await start(make_settings(tmp_path, simulated_nodes=1))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            alloc = allocator_pb2_grpc.AllocatorServiceStub(channel)
            request = allocator_pb2.AllocateRequest(tenant="t", count=1, shape=shape(8))
            first = (await alloc.Allocate(request)).allocation
            waiting = (await alloc.Allocate(request)).allocation
            assert waiting.state == allocator_pb2.ALLOCATION_STATE_PENDING
            await alloc.ReleaseAllocation(allocator_pb2.ReleaseAllocationRequest(id=first.id))
            get = allocator_pb2.GetAllocationRequest(id=waiting.id)
            await eventually(
                lambda: alloc.GetAllocation(get),
                lambda r: r.allocation.state == allocator_pb2.ALLOCATION_STATE_ALLOCATED,
            )
            with pytest.raises(grpc.aio.AioRpcError):
                await alloc.GetAllocation(allocator_pb2.GetAllocationRequest(id="a-missing"))
    finally:
        await server.stop(0)
        provider.force_flush()
        telemetry.setup_tracing("none")
    spans = [json.loads(line) for line in out.getvalue().splitlines()]
    rpcs = [
        (s["name"].rsplit("/", 1)[1], s["attributes"]["rpc.grpc.status_code"])
        for s in spans
        if s["name"].startswith("rmgrpc.v1.AllocatorService/")
    ]
    assert rpcs[:3] == [("Allocate", "OK"), ("Allocate", "OK"), ("ReleaseAllocation", "OK")]
    assert rpcs[-1] == ("GetAllocation", "NOT_FOUND")
    passes = [s["attributes"] for s in spans if s["name"] == "rmgrpc.scheduling_cycle"]
    assert any(p["rmgrpc.admitted"] == 1 for p in passes), passes
