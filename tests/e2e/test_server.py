"""The server as a process: start-up errors, inventory, health, restart and shutdown."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rmgrpc.server import start
from rmgrpc.v1 import allocator_pb2 as pb
from rmgrpc.v1 import allocator_pb2_grpc, gpu_manager_pb2, gpu_manager_pb2_grpc
from rmgrpc.v1.resources_pb2 import Shape
from tests.conftest import ServerProcess, free_port, make_settings


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rmgrpc", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "RMGRPC_NVML": "off", **(env or {})},
    )


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    return lines[-1]


def test_bad_flag_is_one_line(tmp_path: Path) -> None:
    err = one_line_error(run_cli("serve", "--listen", "nowhere", "--db", str(tmp_path / "x.db")))
    assert "listen must be HOST:PORT" in err


def test_bad_environment_value_is_one_line(tmp_path: Path) -> None:
    proc = run_cli("serve", "--db", str(tmp_path / "x.db"), env={"RMGRPC_SIMULATED_NODES": "many"})
    assert "simulated_nodes" in one_line_error(proc)


def test_busy_port_is_one_line(tmp_path: Path, server_process: ServerProcess) -> None:
    proc = run_cli(
        "serve",
        "--listen",
        server_process.target,
        "--db",
        str(tmp_path / "b.db"),
        "--metrics-listen",
        "",
    )
    assert "cannot listen on" in one_line_error(proc)


def test_unreadable_database_is_one_line(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    proc = run_cli(
        "serve",
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--db",
        str(garbage),
        "--metrics-listen",
        "",
    )
    assert "garbage.db" in one_line_error(proc)


def test_config_prints_every_default() -> None:
    out = run_cli("config").stdout
    assert "[server]" in out and 'listen = "127.0.0.1:50051"' in out
    assert "simulated_nodes = 0" in out


async def test_simulated_inventory_is_sized_by_environment(tmp_path: Path) -> None:
    proc = ServerProcess(
        tmp_path / "inv.db",
        env={"RMGRPC_SIMULATED_NODES": "3", "RMGRPC_SIMULATED_GPUS_PER_NODE": "4"},
    ).start()
    try:
        async with grpc.aio.insecure_channel(proc.target) as ch:
            nodes = (
                await gpu_manager_pb2_grpc.GpuManagerServiceStub(ch).ListNodes(
                    gpu_manager_pb2.ListNodesRequest()
                )
            ).nodes
        assert len(nodes) == 3
        assert all(len(n.gpus) == 4 and n.simulated for n in nodes)
        assert all(n.state == gpu_manager_pb2.NODE_STATE_READY for n in nodes)
    finally:
        proc.stop()


async def test_empty_inventory(tmp_path: Path) -> None:
    running = await start(make_settings(tmp_path, simulated_nodes=0))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            nodes = await gpu_manager_pb2_grpc.GpuManagerServiceStub(ch).ListNodes(
                gpu_manager_pb2.ListNodesRequest()
            )
            assert not nodes.nodes
            a = await allocator_pb2_grpc.AllocatorServiceStub(ch).Allocate(
                pb.AllocateRequest(tenant="t", count=1, shape=Shape(gpus=1))
            )
            assert a.allocation.state == pb.ALLOCATION_STATE_PENDING
            assert a.allocation.pending_reason
    finally:
        await running.stop(0)


async def test_restart_keeps_state_and_revisions_continue(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    running = await start(settings)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        stub = allocator_pb2_grpc.AllocatorServiceStub(ch)
        kept = (
            await stub.Allocate(
                pb.AllocateRequest(tenant="t", count=1, shape=Shape(gpus=3), request_id="keep")
            )
        ).allocation
        gone = (
            await stub.Allocate(pb.AllocateRequest(tenant="t", count=1, shape=Shape(gpus=1)))
        ).allocation
        await stub.ReleaseAllocation(pb.ReleaseAllocationRequest(id=gone.id))
        before = await stub.ListAllocations(pb.ListAllocationsRequest())
    await running.stop(0)

    running = await start(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = allocator_pb2_grpc.AllocatorServiceStub(ch)
            after = await stub.ListAllocations(pb.ListAllocationsRequest())
            assert after.revision == before.revision
            assert [(a.id, a.state, list(a.placements)) for a in after.allocations] == [
                (a.id, a.state, list(a.placements)) for a in before.allocations
            ]
            again = (
                await stub.Allocate(
                    pb.AllocateRequest(tenant="t", count=1, shape=Shape(gpus=3), request_id="keep")
                )
            ).allocation
            assert again.id == kept.id
            # The freed GPU is free again, the kept ones are not.
            gm = gpu_manager_pb2_grpc.GpuManagerServiceStub(ch)
            free = (await gm.ListGpus(gpu_manager_pb2.ListGpusRequest(free_only=True))).gpus
            assert len(free) == 16 - 3
            fresh = (
                await stub.Allocate(pb.AllocateRequest(tenant="t", count=1, shape=Shape(gpus=1)))
            ).allocation
            events = stub.WatchAllocations(pb.WatchAllocationsRequest(start_revision=1))
            revisions = []
            async for ev in events:
                revisions.append(ev.revision)
                if ev.allocation.id == fresh.id and ev.type == pb.ALLOCATION_EVENT_TYPE_PLACED:
                    break
            events.cancel()
            assert revisions == sorted(set(revisions))
            assert fresh.revision > before.revision
    finally:
        await running.stop(0)


async def test_health_goes_not_serving_when_shutdown_begins(tmp_path: Path) -> None:
    running = await start(make_settings(tmp_path))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        ok = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert ok.status == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service="rmgrpc.v1.AllocatorService"))
        first = await anext(aiter(watch))
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.create_task(running.stop(2))
        second = await asyncio.wait_for(anext(aiter(watch)), 5)
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await stopping


def test_sigterm_stops_cleanly_and_keeps_answered_work(tmp_path: Path) -> None:
    proc = ServerProcess(tmp_path / "term.db").start()

    async def allocate() -> str:
        async with grpc.aio.insecure_channel(proc.target) as ch:
            a = await allocator_pb2_grpc.AllocatorServiceStub(ch).Allocate(
                pb.AllocateRequest(tenant="t", count=1, shape=Shape(gpus=2))
            )
            return a.allocation.id

    allocation_id = asyncio.run(allocate())
    assert proc.terminate() == 0
    assert proc.proc is not None and proc.proc.stderr is not None
    assert "Traceback" not in proc.proc.stderr.read()
    proc = ServerProcess(tmp_path / "term.db", port=free_port()).start()
    try:

        async def get() -> int:
            async with grpc.aio.insecure_channel(proc.target) as ch:
                got = await allocator_pb2_grpc.AllocatorServiceStub(ch).GetAllocation(
                    pb.GetAllocationRequest(id=allocation_id)
                )
                return got.allocation.state

        assert asyncio.run(get()) == pb.ALLOCATION_STATE_ALLOCATED
    finally:
        proc.stop()


@pytest.mark.parametrize("flag", ["--nonsense", "--listen"])
def test_unknown_or_incomplete_flags_fail_fast(flag: str) -> None:
    proc = run_cli("serve", flag)
    assert proc.returncode == 2


async def test_metrics_endpoint_reports_rpcs_and_cycles(tmp_path: Path) -> None:
    import urllib.request

    running = await start(make_settings(tmp_path, metrics_listen="127.0.0.1:0"))
    try:
        assert running.metrics_server is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            await allocator_pb2_grpc.AllocatorServiceStub(ch).Allocate(
                pb.AllocateRequest(tenant="t", count=1, shape=Shape(gpus=1))
            )
        url = f"http://127.0.0.1:{running.metrics_server.port}/metrics"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
        text = body.decode()
        assert 'rmgrpc_rpc_requests_total{code="OK",method="Allocate"' in text
        assert "rmgrpc_scheduling_cycle_seconds_count" in text
    finally:
        await running.stop(0)


async def test_shrinking_the_simulated_inventory_removes_nodes(tmp_path: Path) -> None:
    running = await start(make_settings(tmp_path, simulated_nodes=3))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        stub = allocator_pb2_grpc.AllocatorServiceStub(ch)
        gang = (
            await stub.Allocate(pb.AllocateRequest(tenant="t", count=3, shape=Shape(gpus=8)))
        ).allocation
        assert gang.state == pb.ALLOCATION_STATE_ALLOCATED
    await running.stop(0)
    running = await start(make_settings(tmp_path, simulated_nodes=2))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            nodes = (
                await gpu_manager_pb2_grpc.GpuManagerServiceStub(ch).ListNodes(
                    gpu_manager_pb2.ListNodesRequest()
                )
            ).nodes
            assert sorted(n.id for n in nodes) == ["sim-node-0", "sim-node-1"]
            lost = (
                await allocator_pb2_grpc.AllocatorServiceStub(ch).GetAllocation(
                    pb.GetAllocationRequest(id=gang.id)
                )
            ).allocation
            assert lost.state == pb.ALLOCATION_STATE_LOST
            assert "sim-node-2" in lost.state_reason
    finally:
        await running.stop(0)


def test_second_server_on_the_same_database_is_refused(server_process: ServerProcess) -> None:
    proc = run_cli(
        "serve",
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--db",
        str(server_process.db),
        "--metrics-listen",
        "",
    )
    assert "in use by another rmgrpc process" in one_line_error(proc)
