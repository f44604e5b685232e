"""What the server benchmarks share: the server's settings, latency figures, client children."""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rmgrpc.config import Settings, load_settings


def bench_settings(tmp: str | Path, **overrides: Any) -> Settings:
    """An in-process server on a free port: 4 simulated nodes of 8 GPUs, no metrics, quiet."""
    base: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "db": str(Path(tmp) / "bench.db"),
        "metrics_listen": "",
        "nvml": "off",
        "simulated_nodes": 4,
        "simulated_gpus_per_node": 8,
        "log_level": "warning",
    }
    return load_settings(None, env={}, overrides={**base, **overrides})


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; NaN when there are no samples."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def latency_text(seconds: Sequence[float]) -> str:
    """`p50 / p99 / max` in ms, and how many samples they are from."""
    ms = [s * 1000 for s in seconds]
    return (
        f"p50 {percentile(ms, 50):7.1f}  p99 {percentile(ms, 99):7.1f}  "
        f"max {max(ms, default=math.nan):7.1f} ms  (n={len(ms)})"
    )


async def probe_health(target: str, rate: float, seconds: float) -> tuple[list[float], int]:
    """Health/Check latencies, calls sent open-loop at `rate`/s for `seconds`; and how many
    failed (counted in the latencies at the time they took to fail).

    Open loop: each call starts on schedule whether or not earlier ones have answered, so a
    server that stalls is charged for every call that waits on it (no coordinated omission).
    """
    latencies: list[float] = []
    failed = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest()
        await stub.Check(request)  # connect first: the handshake is not what we measure

        async def one() -> None:
            nonlocal failed
            t0 = time.perf_counter()
            try:
                await stub.Check(request)
            except grpc.aio.AioRpcError:
                failed += 1  # e.g. CANCELLED: left unaccepted too long by a busy server
            latencies.append(time.perf_counter() - t0)

        tasks: list[asyncio.Task[None]] = []
        begin = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = begin + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return latencies, failed


async def run_child(module: str, spec: Mapping[str, Any]) -> Any:
    """Runs `python -m module --child` with `spec` as JSON on stdin; its last stdout line,
    parsed. Clients live in a child process so the server's process only serves (and stdin,
    not argv, since specs carry thousands of ids)."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        "--child",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await child.communicate(json.dumps(spec).encode())
    if child.returncode != 0:
        raise RuntimeError(f"bench child {module} failed ({child.returncode}): {spec.get('mode')}")
    return json.loads(out.decode().strip().splitlines()[-1])


def child_spec() -> Any:
    """The spec a child was started with (see run_child)."""
    return json.loads(sys.stdin.read())
