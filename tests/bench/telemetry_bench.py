"""What metrics and tracing cost Allocate: its throughput with them on, next to off.

    python -m tests.bench.telemetry_bench [--seconds 5] [--clients 32] [--rounds 2]

Off: no /metrics endpoint, no tracing (the gauges refresh at its default 5 s: it cannot be
turned off). On: tracing with a span per RPC and per scheduling cycle exported (console
exporter to /dev/null: every span is recorded, batched and serialised), the gauges
refreshed every second (5x the default) and /metrics scraped every 5 s (3x Prometheus's
usual 15 s). Each row is
Allocate→Release pairs from `--clients` callers in a child process (rpc_bench's loop);
off and on alternate `--rounds` times so drift on a shared machine hits both alike.
Target: on within 10 % of off (ratio >= 0.90).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import urllib.request
from typing import Any

from rmgrpc import telemetry
from rmgrpc.server import start
from tests.bench.common import bench_settings, run_child

NODES = 16


async def _scrape_every(port: int, seconds: float) -> None:
    url = f"http://127.0.0.1:{port}/metrics"

    def get() -> None:
        with urllib.request.urlopen(url, timeout=5) as response:
            response.read()

    while True:
        await asyncio.to_thread(get)
        await asyncio.sleep(seconds)


async def one_run(on: bool, seconds: float, clients: int) -> float:
    """Allocate+Release RPCs per second against a fresh server, telemetry `on` or off."""
    with tempfile.TemporaryDirectory() as tmp:
        extra: dict[str, Any] = {"simulated_nodes": NODES}
        if on:
            extra |= {"metrics_listen": "127.0.0.1:0", "metrics_refresh_seconds": 1.0}
        settings = bench_settings(tmp, **extra)
        provider = telemetry.setup_tracing("console", file="/dev/null") if on else None
        server = await start(settings)
        scraper = None
        try:
            if server.metrics_server is not None:
                scraper = asyncio.create_task(_scrape_every(server.metrics_server.port, 5.0))
            spec: dict[str, Any] = {
                "mode": "calls",
                "target": f"127.0.0.1:{server.port}",
                "kind": "allocate+release",
                "ids": [],
                "clients": clients,
                "seconds": seconds,
            }
            return float((await run_child("tests.bench.rpc_bench", spec))["rate"])
        finally:
            if scraper is not None:
                scraper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await scraper
            await server.stop(0)
            if provider is not None:
                telemetry.setup_tracing("none")


async def bench(args: argparse.Namespace) -> dict[str, float]:
    print(
        f"Allocate→Release RPCs/s, {args.clients} callers in a child process, "
        f"{args.seconds:g} s per row, {NODES} nodes x 8 GPUs"
    )
    off: list[float] = []
    on: list[float] = []
    for _ in range(args.rounds):
        for flag, rates in ((False, off), (True, on)):
            rate = await one_run(flag, args.seconds, args.clients)
            rates.append(rate)
            print(f"  telemetry {'on ' if flag else 'off'}  {rate:8.0f} RPC/s", flush=True)
    ratio = statistics.mean(on) / statistics.mean(off)
    print(
        f"mean off {statistics.mean(off):.0f}, on {statistics.mean(on):.0f} RPC/s: "
        f"on/off = {ratio:.2f}  (target >= 0.90)"
    )
    return {"off": statistics.mean(off), "on": statistics.mean(on), "ratio": ratio}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    asyncio.run(bench(parser.parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
