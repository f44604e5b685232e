"""Shared fixtures: an rmgrpc server in this process (fast, clock injectable) or in a
subprocess (for grpcurl, signals and kill -9), always on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from rmgrpc.config import Settings, load_settings
from rmgrpc.server import RunningServer, start


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "db": str(tmp_path / "rmgrpc.db"),
        "metrics_listen": "",
        "simulated_nodes": 2,
        "simulated_gpus_per_node": 8,
        "nvml": "off",
        "preemption_grace_seconds": 0.0,
        "min_runtime_seconds": 0.0,
        # In-process servers are many and short-lived here: passes in a thread, no child
        # process each. The default (a worker process) runs wherever a test starts the
        # real `rmgrpc serve` (ServerProcess: crash, signal and grpcurl tests) or asks.
        "pass_runner": "thread",
    }
    base.update(overrides)
    return load_settings(None, env={}, overrides=base)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    running = await start(make_settings(tmp_path))
    yield running
    await running.stop(0)


@pytest.fixture
async def channel(server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


def nobody_runner() -> tuple[list[str], str] | None:
    """(`runuser -u nobody -- env PYTHONDONTWRITEBYTECODE=1`, a system Python of this
    version) when we are root and both are here: a real non-root process for permission
    checks, since root ignores permission bits (and the venv's interpreter may sit under
    /root, out of nobody's reach)."""
    if os.geteuid() != 0 or not shutil.which("runuser"):
        return None
    python = shutil.which(
        f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/bin"
    )
    if python is None:
        return None
    return ["runuser", "-u", "nobody", "--", "env", "PYTHONDONTWRITEBYTECODE=1"], python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`rmgrpc serve` in a subprocess, as an operator runs it."""

    def __init__(self, db: Path, env: dict[str, str] | None = None, port: int | None = None):
        self.db = db
        self.port = port or free_port()
        self.env = {
            **os.environ,
            "RMGRPC_NVML": "off",
            "RMGRPC_SIMULATED_NODES": "2",
            **(env or {}),
        }
        self.proc: subprocess.Popen[str] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rmgrpc",
                "serve",
                "--listen",
                self.target,
                "--db",
                str(self.db),
                "--metrics-listen",
                "",
            ],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited: {self.proc.stderr.read() if self.proc.stderr else ''}"
                )
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise RuntimeError("server did not start listening within 30 s")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(20)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path / "rmgrpc.db").start()
    yield proc
    proc.stop()
