"""A loaded server: Health/Check latency while a deep queue is scheduled again and again, and
Allocate throughput with 30,000 pending, each next to the same server's own baseline.

    python -m tests.bench.load_bench [--nodes 1000] [--pending 10000] [--more 20000]
                                     [--seconds 15] [--fill-limit 120] [--fill rpc|store]
                                     [--pass-runner process|thread]

One server with `--nodes` simulated nodes of 8 GPUs, driven only through gRPC by clients in
child processes (so the server's process only serves), never through the engine's API:

1. idle: Health/Check latency, probed open-loop at 50/s, before anything is allocated.
   Its p99 is the floor for steps 4 and 5: with 1,000 simulated nodes the server's 5-second
   background loops (simulated GPU metrics, gauges) hold the event loop for 0.1-1 s each.
2. empty queue: 1-GPU Allocates by 32 closed-loop callers until every GPU is taken (all
   placed at once: the queue stays empty). Their rate is the baseline of step 5.
3. `--pending` Allocates of 1/2/4/8 GPUs (8 tenants), all left PENDING, sent through gRPC
   with 128 in flight so the server coalesces them into few cycles.
4. churn: 4 callers each release the oldest running allocation and Allocate a new one, in
   a loop (so pending stays put, freed GPUs get placed, and every call causes a cycle),
   while another process probes Health/Check. Target p99 < 20 ms.
5. `--more` pending on top, then 32 callers Allocate 1-GPU requests (as in step 2; they
   join the queue) in a closed loop with Health/Check probed meanwhile: Allocate rate vs
   step 2 (target >= 0.5) and Health p99 (< 50 ms).

Filling is bounded by `--fill-limit` seconds per step; a step that runs out says how far
it got, and what follows measures the queue as it stands. `--fill store` writes the
pending requests of steps 3 and 5 straight into the database of the stopped server and
restarts it (same settings, same database), for servers too slow to fill through gRPC;
the step after a restart begins once the server's first pass has ranked the recovered
queue (how long that took is printed: the cost of a restart onto a deep queue).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import grpc

from rmgrpc.config import Settings
from rmgrpc.engine.scheduling import QUEUED
from rmgrpc.model import AllocationEventType, Event, EventKind
from rmgrpc.server import RunningServer, start
from rmgrpc.store import Store, Write
from rmgrpc.v1 import allocator_pb2 as pb
from rmgrpc.v1 import allocator_pb2_grpc
from rmgrpc.v1.resources_pb2 import Shape
from tests.bench.common import (
    bench_settings,
    child_spec,
    latency_text,
    percentile,
    probe_health,
    run_child,
)

T = TypeVar("T")
MODULE = "tests.bench.load_bench"
TENANTS = 8
# Far beyond any run: nothing may expire mid-measurement and free GPUs on its own.
LEASE_SECONDS = 6 * 3600
# Pending mix by index: mostly 1-GPU, some whole nodes, so cycles do real placement work.
MIX = (1, 1, 1, 1, 1, 1, 2, 2, 4, 8)
# Light enough not to be the load itself; 750 samples in 15 s still make a p99.
PROBE_RATE = 50.0
CALLERS = 32
IN_FLIGHT = 128
# Calls the server cancelled and this child retried.
cancelled = [0]


def _request(i: int, mix: bool) -> pb.AllocateRequest:
    gpus = MIX[i % len(MIX)] if mix else 1
    return pb.AllocateRequest(
        tenant=f"load/t{i % TENANTS}",
        # Makes a retry safe: the server answers a repeated request id with the first one.
        request_id=f"load-{i}",
        count=1,
        shape=Shape(gpus=gpus, cpu_millis=100 * gpus, memory_bytes=gpus << 20),
        lease_seconds=LEASE_SECONDS,
    )


def _channels(target: str, n: int) -> list[grpc.aio.Channel]:
    return [grpc.aio.insecure_channel(target) for _ in range(n)]


async def _retrying(call: Callable[[], Awaitable[T]]) -> T:
    """`call()`, again while the server cancels it before accepting it (grpc cancels calls
    left unaccepted for 30 s, which an overloaded server does: that counts in the latency,
    but must not end the run). Safe for Allocate (request ids) and Release (idempotent)."""
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise
            cancelled[0] += 1


async def _allocate(
    stub: allocator_pb2_grpc.AllocatorServiceStub, request: pb.AllocateRequest
) -> pb.Allocation:
    answer: pb.AllocateResponse = await _retrying(lambda: stub.Allocate(request))
    return answer.allocation


async def allocate(
    target: str, first: int, count: int, callers: int, mix: bool, limit: float
) -> dict[str, Any]:
    """`count` Allocates (numbered from `first`) by `callers` closed loops, for at most
    `limit` seconds. Ids in the order created, how many came back placed, latencies."""
    channels = _channels(target, min(callers, 16))
    stubs = [allocator_pb2_grpc.AllocatorServiceStub(ch) for ch in channels]
    for ch in channels:
        await ch.channel_ready()
    ids: list[str] = []
    latencies: list[float] = []
    placed = 0
    next_i = first
    end = first + count
    begin = time.perf_counter()
    deadline = begin + limit

    async def loop(w: int) -> None:
        nonlocal next_i, placed
        stub = stubs[w % len(stubs)]
        while next_i < end and time.perf_counter() < deadline:
            i = next_i
            next_i += 1
            t0 = time.perf_counter()
            a = await _allocate(stub, _request(i, mix))
            latencies.append(time.perf_counter() - t0)
            ids.append(a.id)
            placed += a.state == pb.ALLOCATION_STATE_ALLOCATED

    try:
        await asyncio.gather(*(loop(w) for w in range(callers)))
    finally:
        for ch in channels:
            await ch.close()
    return {
        "ids": ids,
        "placed": placed,
        "seconds": time.perf_counter() - begin,
        "latencies": latencies,
        "cancelled": cancelled[0],
    }


async def churn(
    target: str, ids: list[str], first: int, loops: int, seconds: float
) -> dict[str, Any]:
    """Release the oldest allocation, Allocate a new one, in `loops` concurrent loops."""
    channels = _channels(target, loops)
    stubs = [allocator_pb2_grpc.AllocatorServiceStub(ch) for ch in channels]
    queue = collections.deque(ids)
    released_running = released_pending = placed = 0
    next_i = first
    begin = time.perf_counter()

    async def loop(w: int) -> None:
        nonlocal released_running, released_pending, placed, next_i
        stub = stubs[w]
        while time.perf_counter() < begin + seconds and queue:
            release = pb.ReleaseAllocationRequest(id=queue.popleft())
            old: pb.ReleaseAllocationResponse = await _retrying(
                functools.partial(stub.ReleaseAllocation, release)
            )
            if old.allocation.state == pb.ALLOCATION_STATE_RELEASED:
                released_running += 1
            else:
                released_pending += 1
            i = next_i
            next_i += 1
            a = await _allocate(stub, _request(i, True))
            placed += a.state == pb.ALLOCATION_STATE_ALLOCATED
            queue.append(a.id)

    try:
        await asyncio.gather(*(loop(w) for w in range(loops)))
    finally:
        for ch in channels:
            await ch.close()
    return {
        "released_running": released_running,
        "released_pending": released_pending,
        "placed": placed,
        "seconds": time.perf_counter() - begin,
        "cancelled": cancelled[0],
    }


async def probe(target: str, rate: float, seconds: float, delay: float) -> dict[str, Any]:
    await asyncio.sleep(delay)
    latencies, failed = await probe_health(target, rate, seconds)
    return {"latencies": latencies, "failed": failed}


def _ms(samples: list[float], q: float) -> float:
    return percentile(samples, q) * 1000


def _health(probed: dict[str, Any]) -> str:
    failed = f"  {probed['failed']} FAILED (cancelled unaccepted)" if probed["failed"] else ""
    return f"Health/Check  {latency_text(probed['latencies'])}{failed}"


def _retried(got: dict[str, Any]) -> str:
    n = got["cancelled"]
    return f"; {n} calls cancelled unaccepted by the server and retried" if n else ""


async def bench(args: argparse.Namespace) -> dict[str, float]:
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        settings = bench_settings(
            tmp,
            simulated_nodes=args.nodes,
            simulated_gpus_per_node=8,
            pass_runner=args.pass_runner,
        )
        served = _Served(settings, await start(settings))
        target = served.target
        gpus = args.nodes * 8
        how = (
            "all through gRPC"
            if args.fill == "rpc"
            else "all through gRPC but the pending fills: written to the stopped server's "
            "database, then the server restarted on it"
        )
        print(
            f"{args.nodes} nodes x 8 GPUs; clients in child processes, {how}; "
            f"Health/Check probed open-loop at {PROBE_RATE:.0f}/s; "
            f"full passes in a worker {args.pass_runner}"
        )
        try:
            # 10 s: the server's 5-second background loops land in it twice.
            idle = await run_child(MODULE, _probe_spec(target, 10.0))
            out["idle_health_p99_ms"] = _ms(idle["latencies"], 99)
            print(f"idle        {_health(idle)}", flush=True)

            spec = {"mode": "allocate", "target": target, "first": 0, "count": gpus}
            spec |= {"callers": CALLERS, "mix": False, "limit": args.fill_limit}
            running = await run_child(MODULE, spec)
            empty_rate = len(running["ids"]) / running["seconds"]
            out["empty_queue_allocate_per_s"] = empty_rate
            out["empty_queue_allocate_p99_ms"] = _ms(running["latencies"], 99)
            print(
                f"empty queue Allocate {empty_rate:6.0f}/s by {CALLERS} callers "
                f"({running['placed']} of {gpus} GPUs placed in {running['seconds']:.1f} s)\n"
                f"            Allocate      {latency_text(running['latencies'])}"
                f"{_retried(running)}",
                flush=True,
            )

            reached = await served.add_pending(args.fill, gpus, args.pending, args.fill_limit)
            target = served.target
            quiet = await run_child(MODULE, _probe_spec(target, 10.0))
            print(
                f"quiet       {_health(quiet)}  ({reached} pending, nothing changing)", flush=True
            )

            # Case 2: cycles again and again over the deep queue.
            first = gpus + args.pending + args.more + 1_000_000  # clear of every fill index
            churn_spec = {"mode": "churn", "target": target, "ids": running["ids"]}
            churn_spec |= {"first": first, "loops": 4, "seconds": args.seconds + 2}
            churned, probed = await asyncio.gather(
                run_child(MODULE, churn_spec),
                run_child(MODULE, _probe_spec(target, args.seconds, delay=1.0)),
            )
            p99 = _ms(probed["latencies"], 99)
            out["churn_health_p99_ms"] = p99
            changes = churned["released_running"] + churned["released_pending"]
            print(
                f"churn       {_health(probed)}\n"
                f"            p99 = {p99 / out['idle_health_p99_ms']:.2f}x idle p99 "
                f"(target p99 < 20 ms); {reached} pending, "
                f"{changes / churned['seconds']:.1f} release+Allocate pairs/s "
                f"({churned['released_running']} running released, {churned['placed']} new "
                f"placed at once){_retried(churned)}",
                flush=True,
            )

            if args.more:
                reached = await served.add_pending(
                    args.fill, gpus + args.pending, args.more, args.fill_limit, reached
                )
                target = served.target
                spec = {"mode": "allocate", "target": target, "first": first + 500_000}
                spec |= {"count": 10**9, "callers": CALLERS, "mix": False, "limit": args.seconds}
                deep, probed = await asyncio.gather(
                    run_child(MODULE, spec),
                    run_child(MODULE, _probe_spec(target, args.seconds)),
                )
                rate = len(deep["ids"]) / deep["seconds"]
                out["deep_allocate_ratio"] = rate / empty_rate
                out["deep_health_p99_ms"] = _ms(probed["latencies"], 99)
                print(
                    f"deep queue  Allocate {rate:6.0f}/s by {CALLERS} callers with {reached} "
                    f"pending = {rate / empty_rate:.2f}x empty queue (target >= 0.5)\n"
                    f"            Allocate      {latency_text(deep['latencies'])}{_retried(deep)}\n"
                    f"            {_health(probed)}  (target p99 < 50 ms)",
                    flush=True,
                )
        finally:
            await served.server.stop(0)
    return out


class _Served:
    """The server under test; filling through its database restarts it (new port)."""

    def __init__(self, settings: Settings, server: RunningServer) -> None:
        self.settings = settings
        self.server = server

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    async def add_pending(
        self, how: str, first: int, count: int, limit: float, already: int = 0
    ) -> int:
        """Adds `count` pending Allocates; the queue depth after."""
        if how == "rpc":
            return await _fill(self.target, first, count, limit, already)
        t0 = time.perf_counter()
        await self.server.stop(0)
        await _seed_pending(self.settings.db, first, count)
        self.server = await start(self.settings)
        t1 = time.perf_counter()
        # What follows measures a server serving a deep queue, not one restarting: wait
        # for its first pass over the recovered queue (until then nothing is ranked), and
        # for the first reasons of every recovered request to be written (an RPC fill
        # answers each with its reason as it comes; a restart writes them all at once).
        ranked = await _ranked(self.target, limit)
        t2 = time.perf_counter()
        # Seeded requests that found free GPUs were placed by the first cycle: count again.
        depth, unexplained = await _count_pending(self.target)
        while unexplained and time.perf_counter() - t2 < limit:
            await asyncio.sleep(0.5)
            depth, unexplained = await _count_pending(self.target)
        print(
            f"fill        {count} PENDING written to the database, server restarted on it, "
            f"in {t1 - t0:.1f} s; its first pass ranked the queue "
            f"{'after' if ranked else 'not within'} {t2 - t1:.1f} s, every request had its "
            f"reason {'after' if not unexplained else 'not within'} "
            f"{time.perf_counter() - t1:.1f} s; {depth} pending now",
            flush=True,
        )
        return depth


async def _seed_pending(db: str, first: int, count: int) -> None:
    """Writes PENDING allocations as the engine would have (proto, CREATED event), for
    servers too slow to be filled through gRPC in time. Uses only the store and the API
    protos, so it does not depend on the engine's Python API."""
    store = await Store.open(db)
    try:
        revision = store.last_revision
        now = time.time()
        for chunk in range(first, first + count, 5000):
            events: list[Event] = []
            puts: list[tuple[EventKind, str, bytes]] = []
            for i in range(chunk, min(chunk + 5000, first + count)):
                revision += 1
                request = _request(i, True)
                msg = pb.Allocation(
                    id=f"a-seed{i:010x}",
                    tenant=request.tenant,
                    request_id=request.request_id,
                    count=request.count,
                    shape=request.shape,
                    lease_seconds=request.lease_seconds,
                    state=pb.ALLOCATION_STATE_PENDING,
                    pending_reason=QUEUED,
                    revision=revision,
                    create_revision=revision,
                )
                msg.create_time.FromNanoseconds(int(now * 1e9))
                data = msg.SerializeToString()
                kind = EventKind.ALLOCATION
                created = int(AllocationEventType.CREATED)
                events.append(Event(revision, kind, created, msg.id, now, data, msg.tenant))
                puts.append((kind, msg.id, data))
            await store.commit(Write(events=events, puts=puts))
    finally:
        await store.close()


async def _ranked(target: str, limit: float) -> bool:
    """Waits (at most `limit` s) until a pass has ranked the pending queue."""
    deadline = time.monotonic() + limit
    async with grpc.aio.insecure_channel(target) as channel:
        stub = allocator_pb2_grpc.AllocatorServiceStub(channel)
        request = pb.ListAllocationsRequest(states=[pb.ALLOCATION_STATE_PENDING], page_size=1)
        while time.monotonic() < deadline:
            page = await stub.ListAllocations(request)
            if not page.allocations or page.allocations[0].queue_position > 0:
                return True
            await asyncio.sleep(0.1)
    return False


async def _count_pending(target: str) -> tuple[int, int]:
    """How many are pending, and how many of them still wait for their first reason."""
    pending = unexplained = 0
    token = ""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = allocator_pb2_grpc.AllocatorServiceStub(channel)
        while True:
            page = await stub.ListAllocations(
                pb.ListAllocationsRequest(
                    states=[pb.ALLOCATION_STATE_PENDING], page_size=1000, page_token=token
                )
            )
            pending += len(page.allocations)
            unexplained += sum(a.pending_reason == QUEUED for a in page.allocations)
            token = page.next_page_token
            if not token:
                return pending, unexplained


async def _fill(target: str, first: int, count: int, limit: float, already: int = 0) -> int:
    """Adds `count` pending Allocates through gRPC (bounded by `limit` s); the queue depth."""
    spec = {"mode": "allocate", "target": target, "first": first, "count": count}
    spec |= {"callers": IN_FLIGHT, "mix": True, "limit": limit}
    got = await run_child(MODULE, spec)
    n = len(got["ids"])
    reached: int = already + n - got["placed"]
    cut = "" if n == count else f" (stopped at the {limit:g} s bound: {n} of {count})"
    print(
        f"fill        {n} Allocates via gRPC, {IN_FLIGHT} in flight, in {got['seconds']:.1f} s "
        f"= {n / got['seconds']:.0f}/s{cut}; {reached} pending now{_retried(got)}",
        flush=True,
    )
    return reached


def _probe_spec(target: str, seconds: float, delay: float = 0.0) -> dict[str, Any]:
    return {
        "mode": "probe",
        "target": target,
        "rate": PROBE_RATE,
        "seconds": seconds,
        "delay": delay,
    }


def _child() -> None:
    spec = child_spec()
    mode = spec.pop("mode")
    runners: dict[str, Callable[..., Coroutine[Any, Any, dict[str, Any]]]] = {
        "allocate": allocate,
        "churn": churn,
        "probe": probe,
    }
    result = asyncio.run(runners[mode](**spec))
    print(json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--child"]:
        _child()
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--pending", type=int, default=10_000)
    parser.add_argument("--more", type=int, default=20_000, help="pending added for step 5")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of steps 4 and 5")
    parser.add_argument(
        "--fill",
        choices=("rpc", "store"),
        default="rpc",
        help="how pending work is added: Allocate RPCs (bounded by --fill-limit), or written "
        "to the database of the stopped server, which is then restarted (for servers too "
        "slow to fill through gRPC)",
    )
    parser.add_argument("--fill-limit", type=float, default=120.0, help="bound per fill step")
    parser.add_argument(
        "--pass-runner",
        choices=("process", "thread"),
        default="process",
        help="where the server runs full scheduling passes ([scheduler] pass_runner)",
    )
    asyncio.run(bench(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
