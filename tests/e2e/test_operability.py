"""Operability of a real in-process server: the metrics port's /healthz and 404, and
background loops that outlive their own errors and forget removed nodes."""

from __future__ import annotations

import asyncio
import logging
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from rmgrpc import server as server_module
from rmgrpc import telemetry
from rmgrpc.engine import GpuReport
from rmgrpc.model import Gpu, GpuHealth, GpuMetrics, Node, NodeState
from rmgrpc.server import RunningServer, start
from tests.conftest import make_settings

LOCAL = socket.gethostname()


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[RunningServer]:
    server = await start(
        make_settings(
            tmp_path,
            metrics_listen="127.0.0.1:0",
            node_lease_seconds=1.0,
            heartbeat_interval_seconds=0.2,
        )
    )
    yield server
    await server.stop(0)


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read().decode()


async def aget(port: int, path: str) -> tuple[int, str]:
    return await asyncio.to_thread(get, port, path)


async def until(condition: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def cancelled_promptly(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 1.0)


# --- the metrics port ----------------------------------------------------------------


async def test_metrics_port_serves_metrics_healthz_and_404(running: RunningServer) -> None:
    assert running.metrics_server is not None
    port = running.metrics_server.port
    status, body = await aget(port, "/metrics")
    assert status == 200 and "rmgrpc_rpc_requests_total" in body
    assert await aget(port, "/healthz") == (200, "ok\n")
    assert (await aget(port, "/"))[0] == 404
    assert (await aget(port, "/v1/allocations"))[0] == 404
    # Shutdown flips gRPC health first; /healthz follows it while metrics keep flowing.
    await running.health.enter_graceful_shutdown()
    status, body = await aget(port, "/healthz")
    assert status == 503 and "NOT_SERVING" in body and body.count("\n") == 1
    assert (await aget(port, "/metrics"))[0] == 200


# --- the GPU metrics loop ------------------------------------------------------------


class FlakyNvml:
    """Stands in for NvmlInventory: its first `failures` samples raise."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def sample_async(self) -> dict[int, GpuMetrics]:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError("NVML hiccup")
        return {0: GpuMetrics(utilization_percent=42.0)}

    async def health_async(self) -> dict[int, GpuHealth]:
        return {0: GpuHealth.HEALTHY}


async def register_local(running: RunningServer) -> Node:
    node = Node(
        id=LOCAL,
        cpu_millis=1000,
        memory_bytes=1 << 30,
        gpus=[Gpu(index=0, uuid="GPU-local-0", model="H100", memory_bytes=80 << 30)],
        simulated=False,
    )
    return await running.engine.register_node(node)


async def test_nvml_failures_are_logged_once_and_the_local_node_keeps_its_lease(
    running: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    await register_local(running)
    nvml = FlakyNvml(failures=30)  # 30 x 0.05 s = 1.5 s of failures, longer than the lease
    loop = asyncio.create_task(
        server_module._gpu_metrics_loop(running.engine, nvml, 0.05)  # type: ignore[arg-type]
    )
    try:
        node = running.engine.state.nodes[LOCAL]
        while nvml.calls <= nvml.failures:
            assert node.state == NodeState.READY, "node went down while NVML was failing"
            await asyncio.sleep(0.02)
        await until(lambda: node.gpus[0].metrics is not None)
        assert node.gpus[0].metrics is not None
        assert node.gpus[0].metrics.utilization_percent == 42.0
        assert node.state == NodeState.READY
    finally:
        await cancelled_promptly(loop)
    failures = [r for r in caplog.records if "NVML failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None


async def test_gpu_metrics_loop_survives_a_failing_heartbeat(
    running: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    await register_local(running)
    real = running.engine.heartbeat
    calls: list[Sequence[GpuReport]] = []

    async def flaky(node_id: str, reports: Sequence[GpuReport]) -> Node:
        calls.append(reports)
        if len(calls) <= 3:
            raise RuntimeError("bug in heartbeat")
        return await real(node_id, reports)

    monkeypatch.setattr(running.engine, "heartbeat", flaky)
    loop = asyncio.create_task(
        server_module._gpu_metrics_loop(running.engine, FlakyNvml(0), 0.01)  # type: ignore[arg-type]
    )
    try:
        await until(lambda: len(calls) >= 6)
    finally:
        await cancelled_promptly(loop)
    assert all(len(r) == 1 for r in calls)


# --- the gauges loop -----------------------------------------------------------------


async def test_gauges_loop_survives_errors_and_forgets_removed_nodes(
    running: RunningServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    engine = running.engine
    metrics = telemetry.Metrics()
    real = metrics.set_node_counts
    calls = [0]

    def flaky(by_state: Any) -> None:
        calls[0] += 1
        if calls[0] <= 3:
            raise RuntimeError("bug in gauges")
        real(by_state)

    monkeypatch.setattr(metrics, "set_node_counts", flaky)
    # The server's own GPU metrics loop samples the simulated nodes as it starts.
    await until(lambda: all(g.metrics for n in engine.state.nodes.values() for g in n.gpus))
    loop = asyncio.create_task(server_module._gauges_loop(engine, metrics, 0.01))
    try:
        await until(lambda: metrics.registry.get_sample_value("rmgrpc_nodes", {"state": "READY"}))
        assert metrics.registry.get_sample_value("rmgrpc_nodes", {"state": "READY"}) == 2
        text = generate_latest(metrics.registry).decode()
        assert 'Hostname="sim-node-0"' in text and 'Hostname="sim-node-1"' in text

        # Removal at the state level: the loop notices the node is gone by itself.
        del engine.state.nodes["sim-node-1"]
        await until(
            lambda: 'Hostname="sim-node-1"' not in generate_latest(metrics.registry).decode()
        )
        assert 'Hostname="sim-node-0"' in generate_latest(metrics.registry).decode()
    finally:
        await cancelled_promptly(loop)
    failures = [r for r in caplog.records if "gauges failed" in r.getMessage()]
    assert len(failures) == 1, "a recurring failure must be rate-limited"
    assert failures[0].levelno == logging.ERROR
