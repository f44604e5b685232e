"""Wiring: store, engine, services, health, reflection, metrics and shutdown.

`serve()` runs one rmgrpc server until SIGTERM/SIGINT: health flips to
NOT_SERVING first, in-flight RPCs get the grace period, watch streams end,
then the store drains its last commits and closes.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rmgrpc import limits, reflection, security, telemetry
from rmgrpc.clock import Clock, SystemClock
from rmgrpc.config import Settings
from rmgrpc.engine import Engine, GpuReport
from rmgrpc.gcpolicy import GcPolicy
from rmgrpc.gpu.nvml import NvmlInventory
from rmgrpc.gpu.simulated import simulated_metrics, simulated_nodes
from rmgrpc.model import Node
from rmgrpc.scheduler.result import PassResult
from rmgrpc.services.allocator import AllocatorService
from rmgrpc.services.gpu_manager import GpuManagerService
from rmgrpc.services.quota import QuotaService
from rmgrpc.services.reservation import ReservationService
from rmgrpc.services.telemetry import TelemetryService
from rmgrpc.store import Store, StoreError
from rmgrpc.v1 import (
    allocator_pb2,
    allocator_pb2_grpc,
    gpu_manager_pb2,
    gpu_manager_pb2_grpc,
    quota_pb2,
    quota_pb2_grpc,
    reservation_pb2,
    reservation_pb2_grpc,
    telemetry_pb2,
    telemetry_pb2_grpc,
)

log = logging.getLogger("rmgrpc")

T = TypeVar("T")

SERVICE_NAMES = [
    allocator_pb2.DESCRIPTOR.services_by_name["AllocatorService"].full_name,
    gpu_manager_pb2.DESCRIPTOR.services_by_name["GpuManagerService"].full_name,
    quota_pb2.DESCRIPTOR.services_by_name["QuotaService"].full_name,
    telemetry_pb2.DESCRIPTOR.services_by_name["TelemetryService"].full_name,
    reservation_pb2.DESCRIPTOR.services_by_name["ReservationService"].full_name,
]


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    """Server options: the transport limits of `settings` (see `limits.py`)."""
    # One process per port: a second server must fail to bind, not share it.
    return [*limits.grpc_options(settings), ("grpc.so_reuseport", 0)]


class StartupError(Exception):
    """Start-up failed for a reason an operator can fix; the message says which."""


@dataclass
class RunningServer:
    """A started server and what it owns; `stop()` takes it down in order."""

    server: grpc.aio.Server
    engine: Engine
    store: Store
    health: health.aio.HealthServicer
    port: int
    metrics: telemetry.Metrics
    metrics_server: telemetry.MetricsServer | None
    tasks: list[asyncio.Task[None]]
    nvml: NvmlInventory | None = None
    protection: security.Security | None = None

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        # Watch streams never end on their own: close them so stop() need not wait the grace,
        # and give them a moment to send their resume status before gRPC cancels calls.
        self.engine.hub.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0
        while self.engine.hub.watchers and loop.time() < deadline:
            await asyncio.sleep(0.01)
        await self.server.stop(grace)
        for task in self.tasks:
            task.cancel()
        if self.nvml is not None:
            self.nvml.close()
        await self.engine.stop()
        await self.store.close()
        if self.metrics_server is not None:
            self.metrics_server.close()


def inventory(settings: Settings, clock: Clock) -> tuple[list[Node], NvmlInventory | None]:
    """The simulated nodes of the config, plus this machine's GPUs when NVML works."""
    nodes = simulated_nodes(
        settings.simulated_nodes,
        settings.simulated_gpus_per_node,
        gpu_model=settings.simulated_gpu_model,
        cpu_millis=settings.simulated_cpu_millis,
        memory_bytes=settings.simulated_memory_bytes,
        now=clock.now(),
    )
    nvml = NvmlInventory.probe(settings.health_policy()) if settings.nvml == "auto" else None
    if nvml is not None:
        local = nvml.discover(socket.gethostname())
        log.info("NVML: %d local GPUs on %s", len(local.gpus), local.id)
        nodes.append(local)
    return nodes, nvml


async def _yielding(items: Iterable[T], every: int = 64) -> AsyncIterator[T]:
    """`items`, handing the event loop back every `every` of them: a refresh over thousands
    of GPUs or allocations must not hold RPCs up for its whole length."""
    for i, item in enumerate(items):
        if i and i % every == 0:
            await asyncio.sleep(0)
        yield item


async def _gpu_metrics_loop(engine: Engine, nvml: NvmlInventory | None, every: float) -> None:
    """Refreshes GPU metrics: sampled through NVML for the local node (reported like an
    agent's heartbeat, so its health changes are events), simulated for simulated nodes."""
    local = socket.gethostname()
    # Each step fails on its own and is retried next round: a dead task would stop the
    # local node's heartbeat, and its lease lapsing would lose the work on it.
    simulated_errors = telemetry.RateLimitedLog(log)
    sample_errors = telemetry.RateLimitedLog(log)
    heartbeat_errors = telemetry.RateLimitedLog(log)
    while True:
        try:
            now = engine.clock.now()
            busy: dict[str, set[int]] = {}
            for node_id, index in engine.state.holders:
                busy.setdefault(node_id, set()).add(index)
            async for node in _yielding(list(engine.state.nodes.values()), 4):
                if node.simulated:
                    samples = simulated_metrics(node, now, busy.get(node.id, set()))
                    for gpu in node.gpus:
                        gpu.metrics = samples.get(gpu.index, gpu.metrics)
        except Exception:
            simulated_errors.exception("refreshing simulated GPU metrics failed; retrying")
        if nvml is not None and local in engine.state.nodes:
            reports: list[GpuReport] = []
            try:
                samples = await nvml.sample_async()
                health = await nvml.health_async()
                reports = [
                    GpuReport(index=i, health=health.get(i), metrics=m) for i, m in samples.items()
                ]
            except Exception:
                # The host is up even if NVML is not: heartbeat anyway (no reports, so
                # GPU health and metrics keep their last values) to keep its lease.
                sample_errors.exception("sampling local GPUs through NVML failed; retrying")
            try:
                await engine.heartbeat(local, reports)
            except Exception:
                heartbeat_errors.exception("local node heartbeat failed; retrying")
        await asyncio.sleep(every)


def _record_cycle(metrics: telemetry.Metrics) -> Callable[[float, PassResult], None]:
    def observe(seconds: float, result: PassResult) -> None:
        plan = result.plan
        metrics.scheduling_cycle.observe(seconds)
        metrics.scheduling_decisions.labels(decision="admitted").inc(len(plan.admissions))
        metrics.scheduling_decisions.labels(decision="preempted").inc(len(plan.preemptions))
        metrics.pending_allocations.set(result.pending)

    return observe


async def _gauges_loop(engine: Engine, metrics: telemetry.Metrics, every: float) -> None:
    """Refreshes the gauges, and the counters kept by the store and the hub, every `every` s
    (see `telemetry.StatePublisher`: RPCs never update these themselves)."""
    publisher = telemetry.StatePublisher(metrics, engine.hub)
    errors = telemetry.RateLimitedLog(log)
    while True:
        try:
            await publisher.refresh(engine)
        except Exception:
            errors.exception("refreshing metrics gauges failed; retrying")
        await asyncio.sleep(every)


async def start(settings: Settings, clock: Clock | None = None) -> RunningServer:
    """Opens the store, rebuilds the state and starts serving; raises StartupError."""
    clock = clock or SystemClock()
    try:
        protection = security.from_settings(settings)
    except security.SecurityError as exc:
        raise StartupError(str(exc)) from None
    # Scheduling passes run in a worker thread: have it hand the GIL back every 1 ms
    # (Python's default is 5 ms), so RPCs and commits wait for it at most that long.
    sys.setswitchinterval(0.001)
    try:
        store = await Store.open(settings.db, synchronous=settings.sqlite_synchronous.upper())
    except StoreError as exc:
        raise StartupError(str(exc)) from None
    metrics = telemetry.Metrics()
    metrics_server = None
    engine = Engine(settings, store, clock)
    try:
        engine.cycle_observers.append(_record_cycle(metrics))
        engine.commit_observers.append(metrics.store_commit.observe)
        engine.cost.alert_observers.append(lambda a: metrics.budget_alert(a.tenant, a.percent))
        nodes, nvml = inventory(settings, clock)
        try:
            await engine.start(nodes)
        except StoreError as exc:
            # An undecodable row found while loading: one line, like the store's own.
            raise StartupError(str(exc)) from None

        server = grpc.aio.server(
            # The decode guard is outermost: nothing behind it ever sees undecodable bytes.
            interceptors=[
                limits.DecodeGuard(),
                telemetry.MetricsInterceptor(metrics),
                *protection.interceptors(),
            ],
            options=grpc_options(settings),
        )
        allocator_pb2_grpc.add_AllocatorServiceServicer_to_server(AllocatorService(engine), server)
        gpu_manager_pb2_grpc.add_GpuManagerServiceServicer_to_server(
            GpuManagerService(engine), server
        )
        quota_pb2_grpc.add_QuotaServiceServicer_to_server(QuotaService(engine), server)
        telemetry_pb2_grpc.add_TelemetryServiceServicer_to_server(TelemetryService(engine), server)
        reservation_pb2_grpc.add_ReservationServiceServicer_to_server(
            ReservationService(engine), server
        )
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable(server, [*SERVICE_NAMES, health.SERVICE_NAME])
        for name in ["", *SERVICE_NAMES]:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        try:
            port = protection.add_port(server, settings.listen)
        except RuntimeError as exc:
            raise StartupError(f"cannot listen on {settings.listen}: {exc}") from None
        if port == 0:
            raise StartupError(f"cannot listen on {settings.listen}: address in use or invalid")
        if settings.metrics_listen:
            host, _, mport = settings.metrics_listen.rpartition(":")
            try:
                metrics_server = telemetry.start_metrics_server(
                    metrics, host, int(mport), health=telemetry.grpc_health_check(health_servicer)
                )
            except OSError as exc:
                raise StartupError(
                    f"cannot serve metrics on {settings.metrics_listen}: {exc.strerror}"
                ) from None
        await server.start()
    except BaseException:
        if metrics_server is not None:
            metrics_server.close()
        await engine.stop()
        await store.close()
        raise
    if protection.notice:
        log.info("%s", protection.notice)
    tasks = [
        asyncio.create_task(GcPolicy().run(), name="rmgrpc-gc"),
        asyncio.create_task(_gauges_loop(engine, metrics, settings.metrics_refresh_seconds)),
        asyncio.create_task(
            _gpu_metrics_loop(engine, nvml, min(5.0, settings.heartbeat_interval_seconds))
        ),
    ]
    return RunningServer(
        server,
        engine,
        store,
        health_servicer,
        port,
        metrics,
        metrics_server,
        tasks,
        nvml,
        protection=protection,
    )


async def serve(settings: Settings) -> int:
    """Runs until SIGTERM or SIGINT; returns the process exit code."""
    try:
        tracing = telemetry.setup_tracing_from(settings)
    except telemetry.TracingError as exc:
        raise StartupError(str(exc)) from None
    # SIGHUP's default is to end the process: until the reload handler is in place (the
    # port is open before that), a SIGHUP is ignored rather than fatal.
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: None)
    running = await start(settings)
    host = settings.listen.rpartition(":")[0]
    print(f"rmgrpc serving on {host}:{running.port}", flush=True)
    if running.metrics_server is not None:
        print(
            f"rmgrpc metrics on http://{settings.metrics_listen.rpartition(':')[0]}:"
            f"{running.metrics_server.port}/metrics",
            flush=True,
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if running.protection is not None:
        # Reread tokens without a restart: open streams keep going, new calls see the change.
        loop.add_signal_handler(signal.SIGHUP, running.protection.reload)
    failed = asyncio.create_task(_watch_engine(running.engine))
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait({failed, waiter}, return_when=asyncio.FIRST_COMPLETED)
    log.info("shutting down (grace %.1f s)", settings.shutdown_grace_seconds)
    await running.stop(settings.shutdown_grace_seconds)
    if tracing is not None:
        tracing.shutdown()  # flushes the spans still batched
    failed.cancel()
    waiter.cancel()
    return 1 if running.engine.failed is not None else 0


async def _watch_engine(engine: Engine) -> None:
    while engine.failed is None:
        await asyncio.sleep(0.5)
