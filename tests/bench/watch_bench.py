"""Watch fan-out: deliveries per second to N subscribers, and commit-to-delivery delay.

    python -m tests.bench.watch_bench [--subscribers 1,100,1000] [--seconds 4] [--writers 4]

One in-process server; a churn task does Allocate+Release as fast as it can (each pair
is three events: CREATED, PLACED, ENDED) while N subscribers, each with its own
WatchAllocations stream (a few streams per channel), read everything. The subscribers
run in a child process by default, so the server's process is not also paying for the
clients' decoding (pass --in-process to keep them in this one). Delay is each event's
`event_time` (stamped by the engine when the change is made, before its commit) to when
the subscriber has it, on the same machine's clock.

Baselines from the same run: the Allocate+Release rate with no subscriber, and the
delivery rate with one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import grpc

from rmgrpc.server import RunningServer, start
from rmgrpc.v1 import allocator_pb2 as pb
from rmgrpc.v1 import allocator_pb2_grpc
from rmgrpc.v1.resources_pb2 import Shape
from tests.bench.common import bench_settings

PROGRESS = pb.ALLOCATION_EVENT_TYPE_PROGRESS
STREAMS_PER_CHANNEL = 100
GOAL_DELIVERIES = 20_000
GOAL_P99_MS = 50.0


@dataclass
class Result:
    subscribers: int
    pairs_per_s: float
    events: int
    deliveries: int
    deliveries_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    cut_off: int


# -- subscribers ---------------------------------------------------------------------------


async def subscribe(
    target: str, n: int, start_revision: int, until: asyncio.Future[int]
) -> dict[str, Any]:
    """N streams from `start_revision`; each stops once past `until`. Returns the figures."""
    channels = [
        grpc.aio.insecure_channel(target) for _ in range(max(1, -(-n // STREAMS_PER_CHANNEL)))
    ]
    delays: list[float] = []
    counts = [0] * n
    first = [0.0]
    last = [0.0]
    errors: list[str] = []

    async def one(i: int) -> None:
        stub = allocator_pb2_grpc.AllocatorServiceStub(channels[i % len(channels)])
        call = stub.WatchAllocations(pb.WatchAllocationsRequest(start_revision=start_revision))
        sample = i % max(1, n // 100) == 0  # delays from about 100 of the streams
        try:
            async for ev in call:
                now = time.time()
                if ev.type != PROGRESS:
                    counts[i] += 1
                    if not first[0]:
                        first[0] = now
                    last[0] = max(last[0], now)
                    if sample:
                        t = ev.event_time
                        delays.append(now - (t.seconds + t.nanos * 1e-9))
                if until.done() and ev.revision >= until.result():
                    break
        except grpc.aio.AioRpcError as err:
            errors.append(f"{err.code().name}: {err.details()}")
        finally:
            call.cancel()

    try:
        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await asyncio.gather(*tasks)
    finally:
        for ch in channels:
            await ch.close()
    delays.sort()
    return {
        "deliveries": sum(counts),
        "min_per_stream": min(counts) if counts else 0,
        "seconds": (last[0] - first[0]) if first[0] else 0.0,
        "p50": _pct(delays, 0.50),
        "p99": _pct(delays, 0.99),
        "max": delays[-1] if delays else 0.0,
        "errors": errors[:5],
        "error_count": len(errors),
    }


def _pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def _child(target: str, n: int, start_revision: int) -> None:
    """Subscriber process: streams open at once; the final revision arrives on stdin."""
    until: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def read_final() -> None:
        line = await asyncio.to_thread(sys.stdin.readline)
        until.set_result(int(line))

    reader = asyncio.create_task(read_final())
    figures = await subscribe(target, n, start_revision, until)
    reader.cancel()
    print(json.dumps(figures), flush=True)


# -- the churn -------------------------------------------------------------------------------


async def churn(
    target: str, writers: int, seconds: float, pairs_per_s: float = 0.0
) -> tuple[int, float]:
    """Allocate+Release pairs from `writers` concurrent loops for `seconds`: (pairs, elapsed).

    As fast as they can, or paced to `pairs_per_s` in total."""
    shape = Shape(gpus=1, cpu_millis=100, memory_bytes=1 << 20)
    pairs = 0
    async with grpc.aio.insecure_channel(target) as ch:
        stub = allocator_pb2_grpc.AllocatorServiceStub(ch)
        started = time.perf_counter()
        deadline = started + seconds

        async def loop(w: int) -> None:
            nonlocal pairs
            mine = 0
            while time.perf_counter() < deadline:
                if pairs_per_s:
                    due = started + (mine * writers + w) / pairs_per_s
                    await asyncio.sleep(max(0.0, due - time.perf_counter()))
                mine += 1
                a = await stub.Allocate(
                    pb.AllocateRequest(tenant=f"org/w{w}", count=1, shape=shape)
                )
                await stub.ReleaseAllocation(pb.ReleaseAllocationRequest(id=a.allocation.id))
                pairs += 1

        await asyncio.gather(*(loop(w) for w in range(writers)))
        return pairs, time.perf_counter() - started


async def run_one(
    server: RunningServer,
    subscribers: int,
    seconds: float,
    writers: int,
    in_process: bool,
    pairs_per_s: float = 0.0,
) -> Result:
    target = f"127.0.0.1:{server.port}"
    hub = server.engine.hub
    start_revision = hub.revision + 1
    cut_before = hub.cut_off
    child: subprocess.Popen[str] | None = None
    task: asyncio.Task[dict[str, Any]] | None = None
    until: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    # The previous run's streams must be gone (their RPCs cancelled and unregistered), or
    # this run would count them as its own and start before its streams are open.
    drained = time.monotonic()
    while hub.watchers:
        if time.monotonic() - drained > 60:
            raise RuntimeError(f"{hub.watchers} streams of the previous run still open")
        await asyncio.sleep(0.05)
    if time.monotonic() - drained > 1.0:
        print(f"  (the previous run's streams took {time.monotonic() - drained:.1f} s to close)")
    if subscribers:
        if in_process:
            task = asyncio.create_task(subscribe(target, subscribers, start_revision, until))
        else:
            child = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.bench.watch_bench",
                    "--child",
                    target,
                    str(subscribers),
                    str(start_revision),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        deadline = time.monotonic() + 60
        while hub.watchers < subscribers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {hub.watchers} of {subscribers} streams opened")
            await asyncio.sleep(0.05)
    pairs, elapsed = await churn(target, writers, seconds, pairs_per_s)
    final = hub.revision
    while server.engine.revision != hub.revision:
        await asyncio.sleep(0.01)
        final = hub.revision
    events = final - start_revision + 1
    figures: dict[str, Any] = {"deliveries": 0, "seconds": 0.0, "p50": 0, "p99": 0, "max": 0}
    if task is not None:
        until.set_result(final)
        figures = await task
    elif child is not None:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(f"{final}\n")
        child.stdin.flush()
        out = await asyncio.to_thread(child.stdout.readline)
        child.wait(30)
        figures = json.loads(out)
    if figures.get("error_count"):
        print(f"  ! {figures['error_count']} streams failed: {figures['errors']}")
    seconds_delivering = figures["seconds"] or elapsed
    return Result(
        subscribers=subscribers,
        pairs_per_s=pairs / elapsed,
        events=events,
        deliveries=figures["deliveries"],
        deliveries_per_s=figures["deliveries"] / seconds_delivering if subscribers else 0.0,
        p50_ms=figures["p50"] * 1000,
        p99_ms=figures["p99"] * 1000,
        max_ms=figures["max"] * 1000,
        cut_off=hub.cut_off - cut_before,
    )


async def bench(args: argparse.Namespace) -> list[Result]:
    counts = [int(x) for x in args.subscribers.split(",")]
    results = []
    paced: Result | None = None
    with tempfile.TemporaryDirectory() as tmp:
        settings = bench_settings(tmp, watch_progress_seconds=1.0)
        server = await start(settings)
        try:
            where = "this process" if args.in_process else "a child process"
            print(
                f"{args.seconds:g} s of Allocate+Release from {args.writers} writers per run; "
                f"subscribers in {where}, {STREAMS_PER_CHANNEL} streams per channel"
            )
            header = (
                f"{'subscribers':>11}{'pairs/s':>10}{'events':>8}{'deliveries':>12}"
                f"{'deliv/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'cut':>5}"
            )
            print(header)
            for n in [0, *counts]:
                r = await run_one(server, n, args.seconds, args.writers, args.in_process)
                results.append(r)
                _row(r)
            if 100 in counts and not args.no_paced:
                # The same 100 streams offered exactly the goal's load, not saturated: the
                # delay a subscriber sees when the server keeps up.
                pace = GOAL_DELIVERIES / (3 * 100)
                print(f"paced at {pace:.0f} pairs/s = {GOAL_DELIVERIES} deliveries/s offered:")
                paced = await run_one(
                    server, 100, args.seconds, args.writers, args.in_process, pace
                )
                _row(paced)
        finally:
            await server.stop(0)
    base = results[0]
    one = next((r for r in results if r.subscribers == 1), None)
    print()
    for r in results[1:]:
        line = (
            f"{r.subscribers:>5} subscribers: write rate {r.pairs_per_s / base.pairs_per_s:.2f}x "
            f"of no-subscriber baseline"
        )
        if one is not None and r is not one:
            line += f", deliveries {r.deliveries_per_s / one.deliveries_per_s:.1f}x of 1 subscriber"
        print(line)
    hundred = next((r for r in results if r.subscribers == 100), None)
    if paced is not None:
        print(
            f"  paced 100 subscribers: {paced.deliveries_per_s:.0f} deliveries/s, "
            f"p99 {paced.p99_ms:.1f} ms"
        )
    if hundred is not None:
        ok = hundred.deliveries_per_s >= GOAL_DELIVERIES and hundred.p99_ms < GOAL_P99_MS
        print(
            f"goal (100 subscribers: >= {GOAL_DELIVERIES} deliveries/s, p99 < {GOAL_P99_MS:g} ms): "
            f"{'met' if ok else 'MISSED'} ({hundred.deliveries_per_s:.0f}/s, p99 "
            f"{hundred.p99_ms:.1f} ms)"
        )
    return results


def _row(r: Result) -> None:
    n = r.subscribers
    complete = r.deliveries == r.events * n
    print(
        f"{n:>11}{r.pairs_per_s:>10.0f}{r.events:>8}{r.deliveries:>12}"
        f"{r.deliveries_per_s:>10.0f}{r.p50_ms:>9.1f}{r.p99_ms:>9.1f}"
        f"{r.max_ms:>9.1f}{r.cut_off:>5}" + ("" if complete or not n else "  INCOMPLETE"),
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--child"]:
        target, n, start_revision = argv[1], int(argv[2]), int(argv[3])
        asyncio.run(_child(target, n, start_revision))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", default="1,100,1000")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--in-process", action="store_true")
    parser.add_argument("--no-paced", action="store_true", help="skip the paced 100 run")
    asyncio.run(bench(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
