"""Dev mode vs production: `rmgrpc serve` simulates nodes only when asked (`--dev`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from rmgrpc.v1 import gpu_manager_pb2, gpu_manager_pb2_grpc
from tests.conftest import free_port


def _serve(
    db: Path, *flags: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    # The operator's environment, minus any inventory setting the test runner may carry.
    base = {k: v for k, v in os.environ.items() if k != "RMGRPC_SIMULATED_NODES"}
    argv = [sys.executable, "-m", "rmgrpc", "serve", "--listen", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(
        [*argv, "--db", str(db), "--metrics-listen", "", *flags],
        env={**base, "RMGRPC_NVML": "off", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"127.0.0.1:{port}"
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("server did not start listening within 30 s")


async def _nodes(target: str) -> list[gpu_manager_pb2.Node]:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = gpu_manager_pb2_grpc.GpuManagerServiceStub(ch)
        return list((await stub.ListNodes(gpu_manager_pb2.ListNodesRequest())).nodes)


@pytest.mark.parametrize(
    ("flags", "env", "expected"),
    [
        ((), {}, 0),  # production: only real nodes (agents, NVML)
        (("--dev",), {}, 4),  # what `make run` starts
        (("--dev",), {"RMGRPC_SIMULATED_NODES": "1"}, 1),  # the environment still wins
    ],
    ids=["plain", "dev", "dev-with-env"],
)
async def test_simulated_nodes_only_when_asked(
    tmp_path: Path, flags: tuple[str, ...], env: dict[str, str], expected: int
) -> None:
    proc, target = _serve(tmp_path / "rm.db", *flags, env=env)
    try:
        nodes = await _nodes(target)
        assert len(nodes) == expected
        assert all(n.simulated for n in nodes)
    finally:
        proc.kill()
        proc.wait(10)


async def test_a_restart_without_dev_removes_the_simulated_nodes(tmp_path: Path) -> None:
    """A database first served in dev mode, then in production, keeps no fake node on
    which work without a selector could land."""
    db = tmp_path / "rm.db"
    proc, target = _serve(db, "--dev")
    try:
        assert len(await _nodes(target)) == 4
    finally:
        proc.terminate()
        proc.wait(20)
    proc, target = _serve(db)
    try:
        assert await _nodes(target) == []
    finally:
        proc.kill()
        proc.wait(10)
