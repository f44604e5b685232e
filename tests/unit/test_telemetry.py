"""Metrics registry, the /metrics endpoint, the RPC metrics interceptor and tracing set-up."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import logging
import re
import socket
import sys
import types
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import StatusCode
from prometheus_client import REGISTRY, generate_latest

from rmgrpc import telemetry
from rmgrpc.config import ConfigError, load_settings
from rmgrpc.events import EventHub
from rmgrpc.model import (
    Allocation,
    AllocationEventType,
    AllocationState,
    Event,
    EventKind,
    GpuMetrics,
    Resources,
    Shape,
)
from rmgrpc.telemetry import Metrics, MetricsInterceptor, setup_tracing, start_metrics_server

HEALTH = "grpc.health.v1.Health"


def sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float | None:
    return metrics.registry.get_sample_value(name, labels or {})


# --- registry and helpers -------------------------------------------------------------


def test_metrics_use_their_own_registry() -> None:
    a, b = Metrics(), Metrics()  # a second set must not clash with the first
    a.watch_events_sent.inc(3)
    assert sample(a, "rmgrpc_watch_events_sent_total") == 3
    assert sample(b, "rmgrpc_watch_events_sent_total") == 0
    assert b"rmgrpc_" not in generate_latest(REGISTRY)


def test_allocation_counts_drop_missing_states_to_zero() -> None:
    m = Metrics()
    m.set_allocation_counts({"PENDING": 2, "ALLOCATED": 5})
    m.set_allocation_counts({"ALLOCATED": 4})
    assert sample(m, "rmgrpc_allocations", {"state": "PENDING"}) == 0
    assert sample(m, "rmgrpc_allocations", {"state": "ALLOCATED"}) == 4


def test_gpu_counts_remove_vanished_models() -> None:
    m = Metrics()
    m.set_gpu_counts({("H100", "free"): 8, ("A100", "free"): 4})
    m.set_gpu_counts({("H100", "free"): 8, ("H100", "allocated"): 3})
    assert sample(m, "rmgrpc_gpus", {"model": "A100", "status": "free"}) is None
    assert sample(m, "rmgrpc_gpus", {"model": "H100", "status": "allocated"}) == 3


def gpu_key(node: str, index: int, tenant: str = "", allocation: str = "") -> tuple[str, ...]:
    """A per-GPU label set in `telemetry.GPU_LABELS` order."""
    return (str(index), f"GPU-{node}-{index}", "H100", node, tenant, allocation)


def gpu_labels(node: str, index: int, tenant: str = "", allocation: str = "") -> dict[str, str]:
    return dict(zip(telemetry.GPU_LABELS, gpu_key(node, index, tenant, allocation), strict=True))


def test_gpu_metrics_per_node_and_forget() -> None:
    m = Metrics()
    m.set_gpu_metrics(
        "n1",
        {
            gpu_key("n1", 0, "org/a", "a-1"): GpuMetrics(
                utilization_percent=50, temperature_celsius=60, power_watts=300
            ),
            gpu_key("n1", 1): GpuMetrics(memory_used_bytes=1024),
        },
    )
    held = gpu_labels("n1", 0, "org/a", "a-1")
    assert sample(m, "rmgrpc_gpu_utilization_percent", held) == 50
    assert sample(m, "rmgrpc_gpu_power_watts", held) == 300
    assert sample(m, "rmgrpc_gpu_memory_used_bytes", gpu_labels("n1", 1)) == 1024
    # The holder changed (released): the old series goes, the idle one takes its place.
    m.set_gpu_metrics("n1", {gpu_key("n1", 0): GpuMetrics(utilization_percent=10)})
    assert sample(m, "rmgrpc_gpu_utilization_percent", held) is None
    assert sample(m, "rmgrpc_gpu_utilization_percent", gpu_labels("n1", 0)) == 10
    assert sample(m, "rmgrpc_gpu_memory_used_bytes", gpu_labels("n1", 1)) is None
    m.forget_node("n1")
    assert sample(m, "rmgrpc_gpu_utilization_percent", gpu_labels("n1", 0)) is None


def test_no_created_series_and_budget_series_only_for_budgeted_tenants() -> None:
    m = Metrics()
    m.observe_rpc(HEALTH, "Check", "OK", 0.01)
    m.admitted("org/a", 3.0)
    text = generate_latest(m.registry).decode()
    samples = [line for line in text.splitlines() if not line.startswith("#")]
    assert "_created" not in text and not any("budget" in line for line in samples)
    assert 'rmgrpc_tenant_admitted_total{tenant="org/a"} 1.0' in text
    m.set_budgets({"org": (30.0, 120.0), "lab": (1.0, 10.0)})
    assert sample(m, "rmgrpc_tenant_budget_used_ratio", {"tenant": "org"}) == 0.25
    assert sample(m, "rmgrpc_tenant_budget_spent", {"tenant": "lab"}) == 1.0
    m.set_budgets({"org": (60.0, 120.0)})  # lab's budget was removed: its series go
    assert sample(m, "rmgrpc_tenant_budget_used_ratio", {"tenant": "org"}) == 0.5
    assert sample(m, "rmgrpc_tenant_budget_spent", {"tenant": "lab"}) is None


def test_tenant_series_follow_the_tenants_published() -> None:
    m = Metrics()
    fig = telemetry.TenantFigures(
        guaranteed={"gpu": 4.0, "cpu": 0.0, "memory": 0.0},
        limit={"gpu": 8.0},
        held={"gpu": 2.0, "cpu": 1.0, "memory": 0.0},
        pending_count=1,
        oldest_pending_seconds=7.0,
    )
    m.set_tenants({("org/a", "org"): fig, ("org/b", "org"): telemetry.TenantFigures()})
    a = {"tenant": "org/a", "parent": "org"}
    assert sample(m, "rmgrpc_tenant_guaranteed", {**a, "resource": "gpu"}) == 4
    assert sample(m, "rmgrpc_tenant_limit", {**a, "resource": "gpu"}) == 8
    assert sample(m, "rmgrpc_tenant_limit", {**a, "resource": "cpu"}) is None
    assert sample(m, "rmgrpc_tenant_oldest_pending_seconds", a) == 7
    m.admitted("org/a", 1.0)
    m.preempted("org/b", 12.5)
    m.set_tenants({("org/a", "org"): fig})
    b = {"tenant": "org/b", "parent": "org"}
    assert sample(m, "rmgrpc_tenant_pending_allocations", b) is None
    # Counters stay while the tenant is still known (retained allocations), then go.
    m.forget_tenants({"org/a", "org/b"})
    assert sample(m, "rmgrpc_tenant_preempted_gpu_seconds_total", {"tenant": "org/b"}) == 12.5
    m.forget_tenants({"org/a"})
    assert sample(m, "rmgrpc_tenant_preempted_gpu_seconds_total", {"tenant": "org/b"}) is None
    assert sample(m, "rmgrpc_tenant_admitted_total", {"tenant": "org/a"}) == 1


def test_admissions_and_preemptions_are_counted_once_from_the_published_events() -> None:
    """The counters follow the log: each allocation PLACED after the publisher was made
    counts once as admitted (with its wait), even when it ended before the refresh; one
    that ENDED PREEMPTED adds its GPU-seconds; work placed before (recovered) and
    events of other kinds count nothing; a second refresh counts nothing again."""

    async def no_events(after: int, limit: int) -> list[Event]:
        return []

    hub = EventHub(no_events, last_revision=0, oldest_revision=1)
    m = Metrics()
    publisher = telemetry.StatePublisher(m, hub)

    def alloc(aid: str, tenant: str, state: AllocationState, **kw: Any) -> Allocation:
        shape = Shape(gpus=2)
        return Allocation(id=aid, tenant=tenant, count=1, shape=shape, state=state, **kw)

    allocations = {
        "run": alloc("run", "org/a", AllocationState.ALLOCATED, create_time=10, allocate_time=13),
        "gone": alloc(
            "gone",
            "org/a",
            AllocationState.RELEASED,
            create_time=10,
            allocate_time=11,
            end_time=12,
        ),
        "victim": alloc(
            "victim",
            "org/ab",
            AllocationState.PREEMPTED,
            create_time=0,
            allocate_time=20,
            end_time=50,
        ),
        "old": alloc("old", "org/ab", AllocationState.ALLOCATED, create_time=0, allocate_time=1),
        "wait": alloc("wait", "org/a", AllocationState.PENDING, create_time=10),
    }
    engine = types.SimpleNamespace(state=types.SimpleNamespace(allocations=allocations))
    placed, ended, updated = (
        AllocationEventType.PLACED,
        AllocationEventType.ENDED,
        AllocationEventType.UPDATED,
    )
    script = [
        ("run", placed),
        ("gone", placed),
        ("gone", ended),
        ("victim", placed),
        ("victim", ended),
        ("wait", updated),
        ("old", updated),
    ]
    hub.publish(
        [
            Event(rev, EventKind.ALLOCATION, kind, aid, 0.0, b"")
            for rev, (aid, kind) in enumerate(script, start=1)
        ]
    )
    hub.publish([Event(8, EventKind.NODE, placed, "run", 0.0, b"")])  # not an allocation
    for _ in range(2):  # the second refresh has nothing new to count
        publisher._count_transitions(engine)  # type: ignore[arg-type]
        assert sample(m, "rmgrpc_tenant_admitted_total", {"tenant": "org/a"}) == 2
        assert sample(m, "rmgrpc_tenant_admitted_total", {"tenant": "org/ab"}) == 1
        waits = {"tenant": "org/a"}
        assert sample(m, "rmgrpc_tenant_admission_wait_seconds_sum", waits) == 4
        victim = {"tenant": "org/ab"}
        assert sample(m, "rmgrpc_tenant_preempted_gpu_seconds_total", victim) == 60
        assert sample(m, "rmgrpc_tenant_preempted_gpu_seconds_total", {"tenant": "org/a"}) in (
            None,
            0,
        )


def test_resource_values_in_base_units() -> None:
    r = Resources(gpus=2, cpu_millis=1500, memory_bytes=1 << 30)
    assert telemetry.resource_values(r) == {"gpu": 2, "cpu": 1.5, "memory": 1 << 30}
    assert telemetry.resource_values(Resources(gpus=1), all_dims=False) == {"gpu": 1}
    assert telemetry.resource_values(Resources()) == {"gpu": 0, "cpu": 0, "memory": 0}


# --- /metrics endpoint ----------------------------------------------------------------


def test_metrics_endpoint_serves_all_metric_names() -> None:
    m = Metrics()
    m.observe_rpc(HEALTH, "Check", "OK", 0.01)
    m.scheduling_decisions.labels("admitted").inc()
    m.event_revision.set(42)
    server = start_metrics_server(m, "127.0.0.1", 0)
    try:
        assert server.port > 0
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read().decode()
    finally:
        server.close()
    for name in (
        "rmgrpc_rpc_requests_total",
        "rmgrpc_rpc_duration_seconds",
        "rmgrpc_scheduling_cycle_seconds",
        "rmgrpc_scheduling_decisions_total",
        "rmgrpc_allocations",
        "rmgrpc_pending_allocations",
        "rmgrpc_gpus",
        "rmgrpc_nodes",
        "rmgrpc_watch_streams",
        "rmgrpc_watch_events_sent_total",
        "rmgrpc_watch_streams_cut_total",
        "rmgrpc_event_revision",
        "rmgrpc_store_commit_seconds",
        "rmgrpc_store_transactions_total",
        "rmgrpc_gpu_utilization_percent",
        "rmgrpc_gpu_temperature_celsius",
        "rmgrpc_gpu_power_watts",
        "rmgrpc_gpu_memory_used_bytes",
        "rmgrpc_cluster_capacity",
        "rmgrpc_cluster_allocated",
        "rmgrpc_cluster_pending",
        "rmgrpc_tenant_guaranteed",
        "rmgrpc_tenant_limit",
        "rmgrpc_tenant_fair_share",
        "rmgrpc_tenant_fair_share_ratio",
        "rmgrpc_tenant_held",
        "rmgrpc_tenant_pending",
        "rmgrpc_tenant_pending_allocations",
        "rmgrpc_tenant_running_allocations",
        "rmgrpc_tenant_oldest_pending_seconds",
        "rmgrpc_tenant_admitted_total",
        "rmgrpc_tenant_admission_wait_seconds",
        "rmgrpc_tenant_preempted_gpu_seconds_total",
    ):
        assert f"# TYPE {name}" in body or f"# HELP {name}" in body, name
    assert "rmgrpc_event_revision 42.0" in body
    assert 'rmgrpc_scheduling_decisions_total{decision="admitted"} 1.0' in body


def test_metrics_endpoint_on_busy_port_raises_oserror() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            start_metrics_server(Metrics(), "127.0.0.1", taken.getsockname()[1])


def test_forget_node_removes_every_series_of_that_node_only() -> None:
    m = Metrics()
    full = GpuMetrics(utilization_percent=1, temperature_celsius=2, power_watts=3)
    m.set_gpu_metrics("a", {gpu_key("a", 0): full})
    m.set_gpu_metrics("b", {gpu_key("b", 0): full, gpu_key("b", 1): full})
    m.gpu_memory_used.labels(*gpu_key("b", 7)).set(1)  # set directly, not through set_*
    assert 'Hostname="b"' in generate_latest(m.registry).decode()
    m.forget_node("b")
    text = generate_latest(m.registry).decode()
    assert 'Hostname="b"' not in text
    assert sample(m, "rmgrpc_gpu_power_watts", gpu_labels("a", 0)) == 3
    m.forget_node("b")  # twice, or for a node never seen: no error
    m.forget_node("never")
    m.set_gpu_metrics("b", {gpu_key("b", 0): full})  # a node that comes back is shown again
    assert sample(m, "rmgrpc_gpu_utilization_percent", gpu_labels("b", 0)) == 1


class Http:
    """Starts metrics servers (`start`) and requests from the last one (`http(path)`)."""

    def __init__(self) -> None:
        self.servers: list[telemetry.MetricsServer] = []

    def start(self, metrics: Metrics, health: telemetry.HealthCheck | None = None) -> None:
        self.servers.append(start_metrics_server(metrics, "127.0.0.1", 0, health=health))

    def __call__(
        self, path: str, *, method: str = "GET", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        url = f"http://127.0.0.1:{self.servers[-1].port}{path}"
        request = urllib.request.Request(url, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            with error:
                return error.code, dict(error.headers), error.read()


@pytest.fixture
def http() -> Iterator[Http]:
    client = Http()
    yield client
    for server in client.servers:
        server.close()


def test_metrics_server_routes_metrics_healthz_and_404(http: Http) -> None:
    m = Metrics()
    m.event_revision.set(7)
    http.start(m)
    status, headers, body = http("/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert b"rmgrpc_event_revision 7.0" in body
    assert http("/healthz")[0::2] == (200, b"ok\n")
    head = http("/healthz", method="HEAD")
    assert head[0] == 200 and head[2] == b""
    for path in ("/", "/metricsx", "/metrics/extra", "/healthz/x", "/favicon.ico"):
        status, _, body = http(path)
        assert status == 404, path
        assert b"/metrics" in body
    status, headers, _ = http("/healthz", method="POST")
    assert status == 405 and "GET" in headers["Allow"]


def test_metrics_keeps_prometheus_filtering_and_negotiation(http: Http) -> None:
    m = Metrics()
    m.event_revision.set(7)
    m.watch_streams.set(2)
    http.start(m)
    _, _, body = http("/metrics?name[]=rmgrpc_event_revision")
    assert b"rmgrpc_event_revision 7.0" in body and b"rmgrpc_watch_streams" not in body
    _, headers, body = http("/metrics", headers={"Accept-Encoding": "gzip"})
    assert headers.get("Content-Encoding") == "gzip"
    assert b"rmgrpc_watch_streams 2.0" in gzip.decompress(body)
    _, headers, body = http(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_healthz_follows_the_health_check(http: Http) -> None:
    reason: list[str | None] = [None]
    http.start(Metrics(), health=lambda: reason[0])
    assert http("/healthz")[0] == 200
    reason[0] = "shutting down\nsecond line"
    status, _, body = http("/healthz")
    assert status == 503 and body == b"shutting down second line\n"
    assert http("/metrics")[0] == 200  # metrics keep flowing while unhealthy


def test_healthz_with_a_broken_check_is_503_not_500(http: Http) -> None:
    def broken() -> str | None:
        raise RuntimeError("boom")

    http.start(Metrics(), health=broken)
    status, _, body = http("/healthz")
    assert status == 503 and b"boom" in body and body.count(b"\n") == 1


async def test_grpc_health_check_follows_the_servicer() -> None:
    servicer = health.aio.HealthServicer()
    check = telemetry.grpc_health_check(servicer)
    assert check() is None  # a new servicer serves ""
    await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    reason = check()
    assert reason is not None and "NOT_SERVING" in reason
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert check() is None
    assert "SERVICE_UNKNOWN" in (telemetry.grpc_health_check(servicer, "x.Y")() or "")
    await servicer.enter_graceful_shutdown()
    assert "NOT_SERVING" in (check() or "")


def test_rate_limited_log_logs_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limited = telemetry.RateLimitedLog(logging.getLogger("t"), every=60.0, clock=lambda: now[0])
    logged = []
    for t in (0.0, 1.0, 2.0, 59.0, 60.0, 61.0, 130.0):
        now[0] = t
        try:
            raise ValueError(f"failure at {t}")
        except ValueError:
            logged.append(limited.exception("loop failed"))
    assert logged == [True, False, False, False, True, False, True]
    records = [r for r in caplog.records if r.name == "t"]
    assert len(records) == 3 and all(r.exc_info for r in records)
    assert "3 more since the last report" in records[1].getMessage()
    assert "1 more since the last report" in records[2].getMessage()


# --- interceptor on a real grpc.aio server --------------------------------------------


class _Demo(grpc.GenericRpcHandler):  # type: ignore[misc]
    """A tiny service: an async-generator stream that aborts after one message."""

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if details.method == "/demo.Demo/Count":
            return grpc.unary_stream_rpc_method_handler(self.count)
        return None

    async def count(self, request: bytes, context: aio.ServicerContext) -> AsyncIterator[bytes]:
        yield b"1"
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "stop")


@pytest.fixture
async def served() -> AsyncIterator[tuple[Metrics, aio.Channel, health.aio.HealthServicer]]:
    metrics = Metrics()
    server = aio.server(interceptors=[MetricsInterceptor(metrics)])
    servicer = health.aio.HealthServicer()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers([_Demo()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield metrics, channel, servicer
    finally:
        await channel.close()
        await server.stop(None)


@pytest.mark.parametrize("exporter", ["none", "console"])
async def test_interceptor_counts_ok_and_failed_unary_calls(
    served: tuple[Metrics, aio.Channel, health.aio.HealthServicer],
    exporter: str,
    no_tracing: None,
) -> None:
    # Counted alike whether the call runs inside a span or not (no span when tracing is off).
    setup_tracing(exporter, out=io.StringIO())
    metrics, channel, _ = served
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    await stub.Check(health_pb2.HealthCheckRequest(service=""))
    with pytest.raises(aio.AioRpcError) as failed:
        await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND

    ok = {"service": HEALTH, "method": "Check", "code": "OK"}
    not_found = {**ok, "code": "NOT_FOUND"}
    # The client can hold the failed answer before the server's handler has unwound
    # (and been counted): give it a moment, bounded.
    for _ in range(100):
        if sample(metrics, "rmgrpc_rpc_requests_total", not_found) == 1:
            break
        await asyncio.sleep(0.01)
    assert sample(metrics, "rmgrpc_rpc_requests_total", ok) == 2
    assert sample(metrics, "rmgrpc_rpc_requests_total", not_found) == 1
    timing = {"service": HEALTH, "method": "Check"}
    assert sample(metrics, "rmgrpc_rpc_duration_seconds_count", timing) == 3


async def test_interceptor_counts_server_streams(
    served: tuple[Metrics, aio.Channel, health.aio.HealthServicer],
) -> None:
    metrics, channel, servicer = served
    # Health.Watch is a coroutine that writes with context.write(); end it from the server.
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
    first = await watch.read()
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    await servicer.enter_graceful_shutdown()
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()

    # An async-generator stream that aborts after its first message.
    count = channel.unary_stream("/demo.Demo/Count")(b"")
    assert await count.read() == b"1"
    with pytest.raises(aio.AioRpcError) as failed:
        await count.read()
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    labels = {"service": "demo.Demo", "method": "Count", "code": "FAILED_PRECONDITION"}
    assert sample(metrics, "rmgrpc_rpc_requests_total", labels) == 1
    # The cancelled watch is counted once the server sees the cancellation.
    for _ in range(100):
        if sample(metrics, "rmgrpc_rpc_requests_total", _watch("CANCELLED")):
            break
        await asyncio.sleep(0.01)
    assert sample(metrics, "rmgrpc_rpc_requests_total", _watch("CANCELLED")) == 1


def _watch(code: str) -> dict[str, str]:
    return {"service": HEALTH, "method": "Watch", "code": code}


async def test_unknown_method_passes_through(
    served: tuple[Metrics, aio.Channel, health.aio.HealthServicer],
) -> None:
    metrics, channel, _ = served
    with pytest.raises(aio.AioRpcError) as failed:
        await channel.unary_unary("/demo.Demo/Nope")(b"")
    assert failed.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "Nope" not in generate_latest(metrics.registry).decode()


# --- tracing --------------------------------------------------------------------------


@pytest.fixture
def no_tracing() -> Iterator[None]:
    yield
    setup_tracing("none")


@pytest.mark.parametrize("exporter", ["", "none", "None "])
def test_tracing_off(exporter: str, no_tracing: None) -> None:
    assert setup_tracing(exporter) is None
    with telemetry.tracer().start_as_current_span("x") as span:
        assert not span.get_span_context().is_valid


def test_tracing_console_exports_spans_and_can_be_set_up_twice(no_tracing: None) -> None:
    out = io.StringIO()
    first = setup_tracing("console", out=out)
    assert isinstance(first, TracerProvider)
    second = setup_tracing("console", out=out)  # replaces the first without error
    assert isinstance(second, TracerProvider) and second is not first
    with telemetry.tracer().start_as_current_span("scheduling-cycle") as span:
        assert span.get_span_context().is_valid
    second.force_flush()
    assert [json.loads(line)["name"] for line in out.getvalue().splitlines()] == [
        "scheduling-cycle"
    ]


def test_tracing_otlp_without_the_extra_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, no_tracing: None
) -> None:
    # Whether or not the real exporter is installed, point at a module that does not exist.
    monkeypatch.setattr(telemetry, "_OTLP_EXPORTERS", {"grpc": "rmgrpc_no_such_otlp_exporter"})
    with pytest.raises(telemetry.TracingError, match=r"pip install 'rmgrpc\[otlp\]'"):
        setup_tracing("otlp")
    assert telemetry.tracer() is not None  # nothing half set up


class FakeOtlpModule(types.ModuleType):
    """Stands in for an OTLP exporter module: records how its exporter was made."""

    def __init__(self) -> None:
        super().__init__("fake_otlp")
        self.made: list[dict[str, str]] = []
        module = self

        class OTLPSpanExporter(SpanExporter):
            def __init__(self, **kwargs: str) -> None:
                module.made.append(kwargs)

            def export(self, spans: Any) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        self.OTLPSpanExporter = OTLPSpanExporter


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_tracing_otlp_uses_the_configured_endpoint_and_protocol(
    monkeypatch: pytest.MonkeyPatch, no_tracing: None, protocol: str
) -> None:
    fake = FakeOtlpModule()
    monkeypatch.setitem(sys.modules, f"fake_otlp_{protocol}", fake)
    monkeypatch.setattr(
        telemetry, "_OTLP_EXPORTERS", {p: f"fake_otlp_{p}" for p in ("grpc", "http/protobuf")}
    )
    provider = setup_tracing("otlp", endpoint="http://collector:4317", protocol=protocol)
    assert isinstance(provider, TracerProvider)
    assert fake.made == [{"endpoint": "http://collector:4317"}]
    setup_tracing("otlp", protocol=protocol)  # no endpoint: the exporter's own default
    assert fake.made[-1] == {}
    with pytest.raises(telemetry.TracingError, match="otlp_protocol"):
        setup_tracing("otlp", protocol="thrift")


def test_tracing_console_writes_one_json_line_per_span_to_a_file(
    tmp_path: Path, no_tracing: None
) -> None:
    path = tmp_path / "spans.jsonl"
    provider = setup_tracing("console", file=str(path))
    assert provider is not None
    for name in ("first", "second"):
        with telemetry.tracer().start_as_current_span(name):
            pass
    provider.force_flush()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["name"] for line in lines] == ["first", "second"]


def test_a_console_span_line_carries_the_spans_identity_times_status_and_events(
    no_tracing: None,
) -> None:
    """The compact line keeps OpenTelemetry's `to_json` keys for what a span carries, so
    a line leads to its trace, its parent and its outcome."""
    out = io.StringIO()
    provider = setup_tracing("console", out=out)
    assert provider is not None
    tracer = telemetry.tracer()
    with (
        tracer.start_as_current_span("parent") as parent,
        tracer.start_as_current_span("child", attributes={"n": 3}) as child,
    ):
        child.add_event("note", {"why": "x"})
        child.set_status(StatusCode.ERROR, "DEADLINE_EXCEEDED")
    provider.force_flush()
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert (first["name"], second["name"]) == ("child", "parent")
    ctx = child.get_span_context()
    assert first["context"] == {
        "trace_id": f"0x{ctx.trace_id:032x}",
        "span_id": f"0x{ctx.span_id:016x}",
    }
    assert first["parent_id"] == f"0x{parent.get_span_context().span_id:016x}"
    assert second["parent_id"] is None
    assert first["status"] == {"status_code": "ERROR", "description": "DEADLINE_EXCEEDED"}
    assert first["attributes"] == {"n": 3}
    assert [(e["name"], e["attributes"]) for e in first["events"]] == [("note", {"why": "x"})]
    assert first["start_time"] <= first["end_time"]
    assert first["start_time"].endswith("Z")
    assert "events" not in second


def test_tracing_samples_the_configured_share_of_traces(no_tracing: None) -> None:
    out = io.StringIO()
    provider = setup_tracing("console", out=out, sample_ratio=0.0)
    assert provider is not None
    with telemetry.tracer().start_as_current_span("dropped") as span:
        assert not span.is_recording()
    provider.force_flush()
    assert out.getvalue() == ""
    with pytest.raises(telemetry.TracingError, match="tracing_sample_ratio"):
        setup_tracing("console", out=out, sample_ratio=1.5)


def test_tracing_console_to_an_unwritable_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(telemetry.TracingError, match="cannot write spans to tracing_file"):
        setup_tracing("console", file=str(tmp_path / "no-such-dir" / "spans.jsonl"))


def test_settings_refuse_an_unknown_otlp_protocol() -> None:
    with pytest.raises(ConfigError, match="otlp_protocol"):
        load_settings(None, env={"RMGRPC_OTLP_PROTOCOL": "udp"})


def test_log_lines_are_logfmt_with_the_trace_id_inside_a_span(no_tracing: None) -> None:
    out = io.StringIO()
    logger = logging.getLogger("rmgrpc.test_logfmt")
    handler = logging.StreamHandler(out)
    handler.setFormatter(telemetry.LogfmtFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.warning("node %s DOWN", "n1")
        provider = setup_tracing("console", out=io.StringIO())
        assert provider is not None
        with telemetry.tracer().start_as_current_span("rpc") as span:
            logger.info("quota of tenant %s set", "org/a")
            trace_id = format(span.get_span_context().trace_id, "032x")
        try:
            raise RuntimeError("boom\nsecond line")
        except RuntimeError:
            logger.exception("refresh failed")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    first, second, third = out.getvalue().splitlines()
    assert re.fullmatch(
        r'time=\S+Z level=warning logger=rmgrpc\.test_logfmt msg="node n1 DOWN"', first
    )
    assert 'msg="quota of tenant org/a set"' in second
    assert f"trace_id={trace_id} span_id=" in second
    assert "trace_id" not in first
    # A traceback stays on its one line, escaped.
    assert third.startswith("time=") and 'exc="Traceback' in third and "\\n" in third


def test_tracing_unknown_exporter_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown trace exporter"):
        setup_tracing("zipkin")


async def test_interceptor_records_rpc_spans(
    served: tuple[Metrics, aio.Channel, health.aio.HealthServicer], no_tracing: None
) -> None:
    _, channel, _ = served
    out = io.StringIO()
    provider = setup_tracing("console", out=out)
    assert provider is not None
    stub = health_pb2_grpc.HealthStub(channel)
    await stub.Check(health_pb2.HealthCheckRequest(service=""))
    with pytest.raises(aio.AioRpcError):
        await stub.Check(health_pb2.HealthCheckRequest(service="missing"))
    # The client can hold the failed answer before the server's handler has unwound
    # (and ended its span): give it a moment, bounded.
    for _ in range(100):
        provider.force_flush()
        if len(out.getvalue().splitlines()) >= 2:
            break
        await asyncio.sleep(0.01)
    spans = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(s["name"], s["attributes"]["rpc.grpc.status_code"]) for s in spans] == [
        (f"{HEALTH}/Check", "OK"),
        (f"{HEALTH}/Check", "NOT_FOUND"),
    ]
    assert spans[1]["status"]["status_code"] == "ERROR"
