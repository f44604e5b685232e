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
import logging
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from socketserver import ThreadingMixIn
from typing import IO, Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from rmgrpc.model import GpuMetrics

log = logging.getLogger(__name__)

_LabelKey = TypeVar("_LabelKey", bound=tuple[str, ...])

# RPCs range from sub-millisecond reads to long watch streams.
_RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60)
_CYCLE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1)


class Metrics:
    """Every metric the server exports, in one registry. Use the attributes directly."""

    def __init__(self) -> None:
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
            "rmgrpc_allocations", "Allocations by state.", ["state"], registry=r
        )
        self.pending_allocations = Gauge(
            "rmgrpc_pending_allocations", "Allocations waiting in the queue.", registry=r
        )
        self.gpus = Gauge(
            "rmgrpc_gpus",
            "GPUs by model and status (total, allocated, unhealthy).",
            ["model", "status"],
            registry=r,
        )
        self.nodes = Gauge("rmgrpc_nodes", "Nodes by state.", ["state"], registry=r)
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
        self.budget_used_ratio = Gauge(
            "rmgrpc_budget_used_ratio",
            "Share of the current budget period's budget spent, per tenant (1 = all).",
            ["tenant"],
            registry=r,
        )
        self.budget_alerts = Counter(
            "rmgrpc_budget_alerts_total",
            "Budget alerts raised, by threshold percent.",
            ["tenant", "threshold"],
            registry=r,
        )
        per_gpu = ["node", "gpu"]
        self.gpu_utilization = Gauge(
            "rmgrpc_gpu_utilization_percent", "GPU utilization.", per_gpu, registry=r
        )
        self.gpu_temperature = Gauge(
            "rmgrpc_gpu_temperature_celsius", "GPU temperature.", per_gpu, registry=r
        )
        self.gpu_power = Gauge("rmgrpc_gpu_power_watts", "GPU power draw.", per_gpu, registry=r)
        self.gpu_memory_used = Gauge(
            "rmgrpc_gpu_memory_used_bytes", "GPU memory in use.", per_gpu, registry=r
        )
        # Label sets last written by the set_* helpers, so a state or GPU that disappears
        # is removed instead of reporting its last value for ever.
        self._lock = threading.Lock()
        self._shown: dict[str, set[tuple[str, ...]]] = {}

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

    def set_gpu_metrics(self, node_id: str, by_index: Mapping[int, GpuMetrics]) -> None:
        """One node's latest GPU sample; GPUs it no longer has are removed."""
        keys = {(node_id, str(i)): m for i, m in by_index.items()}
        shown_key = f"gpu:{node_id}"
        with self._lock:
            for key in self._shown.get(shown_key, set()) - keys.keys():
                self._remove_gpu(key)
            for key, m in keys.items():
                self.gpu_utilization.labels(*key).set(m.utilization_percent)
                self.gpu_temperature.labels(*key).set(m.temperature_celsius)
                self.gpu_power.labels(*key).set(m.power_watts)
                self.gpu_memory_used.labels(*key).set(m.memory_used_bytes)
            self._shown[shown_key] = set(keys)

    def forget_node(self, node_id: str) -> None:
        """Drop every series labelled with a removed node, whoever set it."""
        with self._lock:
            self._shown.pop(f"gpu:{node_id}", None)
            for gauge in self._per_node_gauges():
                # By label rather than from `_shown`: a series set directly through
                # `.labels()` must not outlive its node either.
                gauge.remove_by_labels({"node": node_id})

    def _per_node_gauges(self) -> tuple[Gauge, ...]:
        # Every metric with a "node" label; a new one must be added here so that
        # forget_node (and set_gpu_metrics) clear it.
        return (
            self.gpu_utilization,
            self.gpu_temperature,
            self.gpu_power,
            self.gpu_memory_used,
        )

    def _remove_gpu(self, key: tuple[str, ...]) -> None:
        for gauge in self._per_node_gauges():
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
                    gauge.remove(*key)
                else:
                    gauge.labels(*key).set(missing)
            for key, value in values.items():
                gauge.labels(*key).set(value)
            if missing is None:
                self._shown[name] = set(values)
            else:
                self._shown[name] = self._shown.get(name, set()) | set(values)


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
_provider_lock = threading.Lock()

_OTLP_EXPORTERS = (
    "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
)


def setup_tracing(exporter: str, *, out: IO[str] | None = None) -> TracerProvider | None:
    """Set up span export: "" or "none" (off), "console" (to `out`, default stdout), "otlp".

    Returns the provider (call `.shutdown()` on it at exit to flush), or None when tracing
    is off. Calling again replaces, and shuts down, the previous provider.
    """
    global _provider
    kind = exporter.strip().lower()
    span_exporter: SpanExporter | None
    if kind in ("", "none"):
        span_exporter = None
    elif kind == "console":
        span_exporter = ConsoleSpanExporter(out=out or sys.stdout)
    elif kind == "otlp":
        span_exporter = _otlp_exporter()
    else:
        raise ValueError(f"unknown trace exporter {exporter!r}: use none, console or otlp")

    provider: TracerProvider | None = None
    if span_exporter is not None:
        provider = TracerProvider(resource=Resource.create({"service.name": "rmgrpc"}))
        provider.add_span_processor(BatchSpanProcessor(span_exporter))
    with _provider_lock:
        previous, _provider = _provider, provider
    if previous is not None:
        previous.shutdown()
    return provider


def _otlp_exporter() -> SpanExporter | None:
    # The OTLP exporter is an optional extra; import it by name so that neither the
    # package nor its type stubs are needed unless someone asks for OTLP.
    for module_name in _OTLP_EXPORTERS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        exporter: SpanExporter = module.OTLPSpanExporter()
        return exporter
    log.warning(
        "OTLP tracing requested but opentelemetry-exporter-otlp is not installed: tracing off"
    )
    return None


def tracer() -> trace.Tracer:
    """The "rmgrpc" tracer: from `setup_tracing`'s provider, else the global (no-op) one."""
    provider = _provider
    if provider is not None:
        return provider.get_tracer("rmgrpc")
    return trace.get_tracer("rmgrpc")


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
        span: trace.Span,
        context: aio.ServicerContext[Any, Any],
        service: str,
        method: str,
        start: float,
        error: BaseException | None,
    ) -> None:
        code = _status_name(context, error)
        self._metrics.observe_rpc(service, method, code, time.perf_counter() - start)
        span.set_attribute("rpc.grpc.status_code", code)
        if code != "OK":
            span.set_status(trace.StatusCode.ERROR, code)

    def _span(self, service: str, method: str) -> trace.Span:
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
            # Current for the handler's await, so spans it opens (store, scheduler) nest.
            with trace.use_span(
                span, end_on_exit=True, record_exception=False, set_status_on_exception=False
            ):
                try:
                    response = await behavior(request, context)
                except BaseException as error:
                    self._finish(span, context, service, method, start, error)
                    raise
                self._finish(span, context, service, method, start, None)
                return response

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
                span.end()

        return wrapped
