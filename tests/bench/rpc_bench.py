"""RPC rates against one in-process server, next to the empty-RPC baseline of the same server.

    python -m tests.bench.rpc_bench [--seconds 3] [--clients 4] [--in-process]

Each row: `--clients` concurrent callers (one channel each), each calling in a loop for
`--seconds`. The baseline is grpc.health.v1.Health/Check, which does no work: the price of
a round trip through grpc and the interceptors. Then GetAllocation, ListAllocations with a
full page of 100, and an Allocate+Release pair (two RPCs, two commits, one scheduling
cycle). Callers run in a child process by default so the server's process spends its time
serving, not calling (pass --in-process to keep them here).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rmgrpc.server import start
from rmgrpc.v1 import allocator_pb2 as pb
from rmgrpc.v1 import allocator_pb2_grpc
from rmgrpc.v1.resources_pb2 import Shape
from tests.bench.common import bench_settings

KINDS = ("health", "get", "list100", "allocate+release")
GPU = Shape(gpus=1, cpu_millis=100, memory_bytes=1 << 20)


def _caller(
    channel: grpc.aio.Channel, kind: str, ids: list[str], w: int
) -> Callable[[], Awaitable[None]]:
    alloc = allocator_pb2_grpc.AllocatorServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    if kind == "health":
        request = health_pb2.HealthCheckRequest()

        async def call() -> None:
            await health.Check(request)

    elif kind == "get":
        get = pb.GetAllocationRequest(id=ids[w % len(ids)])

        async def call() -> None:
            await alloc.GetAllocation(get)

    elif kind == "list100":
        listing = pb.ListAllocationsRequest(tenant="bench/list", page_size=100)

        async def call() -> None:
            resp = await alloc.ListAllocations(listing)
            assert len(resp.allocations) == 100

    else:
        allocate = pb.AllocateRequest(tenant=f"bench/w{w}", count=1, shape=GPU)

        async def call() -> None:
            a = (await alloc.Allocate(allocate)).allocation
            assert a.state == pb.ALLOCATION_STATE_ALLOCATED
            await alloc.ReleaseAllocation(pb.ReleaseAllocationRequest(id=a.id))

    return call


async def calls(target: str, kind: str, ids: list[str], clients: int, seconds: float) -> float:
    """Calls per second over `clients` concurrent loops."""
    channels = [grpc.aio.insecure_channel(target) for _ in range(clients)]
    done = 0
    try:
        callers = [_caller(ch, kind, ids, w) for w, ch in enumerate(channels)]
        for call in callers:  # connect and warm up
            await call()
        start_ = time.perf_counter()
        deadline = start_ + seconds

        async def loop(call: Callable[[], Awaitable[None]]) -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await call()
                done += 1

        await asyncio.gather(*(loop(c) for c in callers))
        return done / (time.perf_counter() - start_)
    finally:
        for ch in channels:
            await ch.close()


async def bench(args: argparse.Namespace) -> dict[str, float]:
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        settings = bench_settings(tmp)
        server = await start(settings)
        target = f"127.0.0.1:{server.port}"
        try:
            async with grpc.aio.insecure_channel(target) as ch:
                stub = allocator_pb2_grpc.AllocatorServiceStub(ch)
                # 120 CPU-only allocations for the list (a full page of 100 and more) and
                # the gets.
                small = Shape(cpu_millis=10, memory_bytes=1 << 20)
                ids = []
                for _ in range(120):
                    resp = await stub.Allocate(
                        pb.AllocateRequest(tenant="bench/list", count=1, shape=small)
                    )
                    ids.append(resp.allocation.id)
            where = "this process" if args.in_process else "a child process"
            print(
                f"{args.clients} concurrent callers in {where}, one channel each, "
                f"{args.seconds:g} s per row"
            )
            print(f"{'rpc':<18}{'calls/s':>10}{'vs Health/Check':>17}")
            for kind in KINDS:
                if args.in_process:
                    rate = await calls(target, kind, ids, args.clients, args.seconds)
                else:
                    rate = await _in_child(target, kind, ids, args.clients, args.seconds)
                rates[kind] = rate
                ratio = rate / rates["health"]
                print(f"{kind:<18}{rate:>10.0f}{ratio:>16.2f}x", flush=True)
        finally:
            await server.stop(0)
    return rates


async def _in_child(target: str, kind: str, ids: list[str], clients: int, seconds: float) -> float:
    spec = json.dumps(
        {"target": target, "kind": kind, "ids": ids, "clients": clients, "seconds": seconds}
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.bench.rpc_bench",
        "--child",
        spec,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"bench child failed ({child.returncode}) on {kind}")
    return float(json.loads(out.decode().strip().splitlines()[-1])["rate"])


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--child"]:
        spec = json.loads(argv[1])
        rate = asyncio.run(
            calls(spec["target"], spec["kind"], spec["ids"], spec["clients"], spec["seconds"])
        )
        print(json.dumps({"rate": rate}), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--in-process", action="store_true")
    asyncio.run(bench(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
