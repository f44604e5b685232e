"""RPC rates against one in-process server, next to the empty-RPC baseline of the same server.

    python -m tests.bench.rpc_bench [--seconds 3] [--clients 32] [--paced-seconds 5]
                                    [--in-process]

Each row: `--clients` concurrent callers (one channel each), each calling in a loop for
`--seconds`. The baseline is grpc.health.v1.Health/Check, which does no work: the price of
a round trip through grpc and the interceptors (measured first and last; the mean counts).
Then GetAllocation, ListAllocations with a full page of 100, and Allocate→Release (each
counted as one RPC: two commits, one scheduling cycle per pair). Then Allocate latency at
half that load: Allocate→Release pairs sent open-loop (on a fixed schedule, not waiting for
answers) at half the measured Allocate+Release RPC rate. Callers run in a child process by
default so the server's process spends its time serving, not calling (pass --in-process to
keep them here).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rmgrpc.server import start
from rmgrpc.v1 import allocator_pb2 as pb
from rmgrpc.v1 import allocator_pb2_grpc
from rmgrpc.v1.resources_pb2 import Shape
from tests.bench.common import bench_settings, child_spec, latency_text, percentile, run_child

KINDS = ("health", "get", "list100", "allocate+release")
# 16 nodes of 8 GPUs: room for the 32 closed-loop callers' GPUs and, open loop, for the
# pairs a stall piles up (an Allocate left PENDING would measure the queue, not the RPC).
NODES = 16
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
    """Calls per second over `clients` concurrent loops (Allocate→Release counts as two)."""
    per_call = 2 if kind == "allocate+release" else 1
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
                done += per_call

        await asyncio.gather(*(loop(c) for c in callers))
        return done / (time.perf_counter() - start_)
    finally:
        for ch in channels:
            await ch.close()


async def paced(target: str, rpc_rate: float, seconds: float, clients: int) -> dict[str, Any]:
    """Allocate→Release pairs sent on a fixed schedule so that Allocate+Release RPCs arrive
    at `rpc_rate`/s; the latency of each Allocate and each Release."""
    channels = [grpc.aio.insecure_channel(target) for _ in range(clients)]
    stubs = [allocator_pb2_grpc.AllocatorServiceStub(ch) for ch in channels]
    allocate_s: list[float] = []
    release_s: list[float] = []
    left_pending = 0

    async def pair(i: int) -> None:
        nonlocal left_pending
        stub = stubs[i % len(stubs)]
        request = pb.AllocateRequest(tenant=f"bench/p{i % clients}", count=1, shape=GPU)
        t0 = time.perf_counter()
        a = (await stub.Allocate(request)).allocation
        t1 = time.perf_counter()
        await stub.ReleaseAllocation(pb.ReleaseAllocationRequest(id=a.id))
        allocate_s.append(t1 - t0)
        release_s.append(time.perf_counter() - t1)
        left_pending += a.state != pb.ALLOCATION_STATE_ALLOCATED

    for stub in stubs:  # connect every channel first: handshakes are not what we measure
        with contextlib.suppress(grpc.aio.AioRpcError):  # NOT_FOUND still connects
            await stub.GetAllocation(pb.GetAllocationRequest(id="none"), timeout=5)
    try:
        pair_rate = rpc_rate / 2
        tasks: list[asyncio.Task[None]] = []
        begin = time.perf_counter()
        for i in range(max(1, int(pair_rate * seconds))):
            delay = begin + i / pair_rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(pair(i)))
        sent = time.perf_counter() - begin
        await asyncio.gather(*tasks)
        return {
            "allocate": allocate_s,
            "release": release_s,
            "pending": left_pending,
            "offered": 2 * len(tasks) / max(sent, 1e-9),
        }
    finally:
        for ch in channels:
            await ch.close()


async def bench(args: argparse.Namespace) -> dict[str, float]:
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        settings = bench_settings(tmp, simulated_nodes=NODES)
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
                f"{args.seconds:g} s per row; {NODES} nodes x 8 GPUs"
            )
            for kind in (*KINDS, "health"):
                if args.in_process:
                    rate = await calls(target, kind, ids, args.clients, args.seconds)
                else:
                    rate = await _in_child(target, kind, ids, args.clients, args.seconds)
                # Health/Check first and last: their mean is the baseline, their spread
                # shows how much the machine moved under the rows between them.
                rates["health_last" if kind in rates else kind] = rate
            rates["baseline"] = (rates["health"] + rates["health_last"]) / 2
            print(
                f"baseline: Health/Check {rates['health']:.0f} then {rates['health_last']:.0f}"
                f" calls/s, mean {rates['baseline']:.0f}"
            )
            print(f"{'rpc':<18}{'calls/s':>10}{'vs Health/Check':>17}")
            for kind in KINDS[1:]:
                ratio = rates[kind] / rates["baseline"]
                label, target_text = kind, ""
                if kind == "allocate+release":
                    label, target_text = "alloc→release RPCs", "  (target >= 0.60x)"
                print(f"{label:<18}{rates[kind]:>10.0f}{ratio:>16.2f}x{target_text}", flush=True)
            offered = rates["allocate+release"] / 2
            spec: dict[str, Any] = {"mode": "paced", "target": target, "rate": offered}
            spec |= {"seconds": args.paced_seconds, "clients": args.clients}
            got: dict[str, Any]
            if args.in_process:
                got = await paced(target, offered, args.paced_seconds, args.clients)
            else:
                got = await run_child("tests.bench.rpc_bench", spec)
            alloc_s: list[float] = got["allocate"]
            print(
                f"open loop at half the alloc→release rate ({got['offered']:.0f} RPC/s, "
                f"{args.paced_seconds:g} s; {got['pending']} Allocates left PENDING):"
            )
            print(f"  Allocate        {latency_text(alloc_s)}  (target p99 < 10 ms)")
            print(f"  Release         {latency_text(got['release'])}")
            rates["allocate_p50_ms"] = percentile(alloc_s, 50) * 1000
            rates["allocate_p99_ms"] = percentile(alloc_s, 99) * 1000
        finally:
            await server.stop(0)
    return rates


async def _in_child(target: str, kind: str, ids: list[str], clients: int, seconds: float) -> float:
    spec: dict[str, Any] = {"mode": "calls", "target": target, "kind": kind, "ids": ids}
    spec |= {"clients": clients, "seconds": seconds}
    return float((await run_child("tests.bench.rpc_bench", spec))["rate"])


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--child"]:
        spec = child_spec()
        result: dict[str, Any]
        if spec["mode"] == "paced":
            result = asyncio.run(
                paced(spec["target"], spec["rate"], spec["seconds"], spec["clients"])
            )
        else:
            rate = asyncio.run(
                calls(spec["target"], spec["kind"], spec["ids"], spec["clients"], spec["seconds"])
            )
            result = {"rate": rate}
        print(json.dumps(result), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--paced-seconds", type=float, default=5.0)
    parser.add_argument("--in-process", action="store_true")
    asyncio.run(bench(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
