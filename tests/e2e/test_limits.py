"""Limits against any client, through a real server: each limit exceeded gets its clear
refusal (never UNKNOWN), pages are bounded in bytes, input that is well formed but
wrong is refused, and the server's memory stays bounded while clients push every limit.
"""

from __future__ import annotations

import asyncio
import base64
import math
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from rmgrpc.server import RunningServer, start
from rmgrpc.v1 import (
    allocator_pb2 as apb,
)
from rmgrpc.v1 import (
    allocator_pb2_grpc,
    gpu_manager_pb2_grpc,
    quota_pb2_grpc,
)
from rmgrpc.v1 import (
    gpu_manager_pb2 as gpb,
)
from rmgrpc.v1 import (
    quota_pb2 as qpb,
)
from rmgrpc.v1.resources_pb2 import Resources, Shape
from tests.conftest import ServerProcess, make_settings
from tests.e2e.helpers import detail, eventually, field_violations

Code = grpc.StatusCode
REPO = Path(__file__).resolve().parents[2]


class Stubs:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.alloc = allocator_pb2_grpc.AllocatorServiceStub(channel)
        self.gpu = gpu_manager_pb2_grpc.GpuManagerServiceStub(channel)
        self.quota = quota_pb2_grpc.QuotaServiceStub(channel)


async def serving(tmp_path: Path, **overrides: Any) -> RunningServer:
    return await start(make_settings(tmp_path, **overrides))


def connect(port: int, **options: int) -> grpc.aio.Channel:
    # Its own connection (not the process-wide subchannel pool): per-connection limits.
    opts = [("grpc.use_local_subchannel_pool", 1), *options.items()]
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=opts)


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def quota_failure(err: grpc.aio.AioRpcError) -> list[str]:
    return [v.subject for v in detail(err, error_details_pb2.QuotaFailure).violations]


def precondition(err: grpc.aio.AioRpcError) -> error_details_pb2.PreconditionFailure.Violation:
    return detail(err, error_details_pb2.PreconditionFailure).violations[0]


def gpus_req(tenant: str, gpus: int = 1, **kw: Any) -> apb.AllocateRequest:
    return apb.AllocateRequest(
        tenant=tenant, count=kw.pop("count", 1), shape=Shape(gpus=gpus, cpu_millis=100), **kw
    )


async def first_event(stream: Any) -> apb.AllocationEvent:
    async for event in stream:
        return event  # type: ignore[no-any-return]
    raise AssertionError("stream ended without an event")


# -- sizes of messages, strings, lists and maps --------------------------------------------


async def test_a_message_over_the_size_limit_is_resource_exhausted(tmp_path: Path) -> None:
    running = await serving(tmp_path, max_message_bytes=65536, max_page_bytes=65536)
    try:
        async with connect(running.port) as ch:
            s = Stubs(ch)
            huge = gpb.RegisterNodeRequest(node_id="n1", labels={"k": "v" * 70_000})
            err = await refused(s.gpu.RegisterNode(huge, timeout=10))
            assert err.code() == Code.RESOURCE_EXHAUSTED
            # The connection is still good for a request of proper size.
            ok = await s.gpu.ListNodes(gpb.ListNodesRequest(), timeout=10)
            assert len(ok.nodes) == 2
    finally:
        await running.stop(0)


async def test_lists_maps_and_strings_past_their_bounds_are_invalid_argument(
    tmp_path: Path,
) -> None:
    running = await serving(
        tmp_path, max_labels=4, max_gpus_per_node=4, max_page_size=10, max_quota_models=3
    )
    labels = {f"k{i}": "v" for i in range(5)}
    try:
        async with connect(running.port) as ch:
            s = Stubs(ch)
            cases: list[tuple[Any, str]] = [
                (s.gpu.RegisterNode(gpb.RegisterNodeRequest(node_id="n", labels=labels)), "labels"),
                (
                    s.gpu.RegisterNode(
                        gpb.RegisterNodeRequest(
                            node_id="n", gpus=[gpb.Gpu(index=i, model="H100") for i in range(5)]
                        )
                    ),
                    "gpus",
                ),
                (
                    s.gpu.Heartbeat(
                        gpb.HeartbeatRequest(
                            node_id="sim-node-0", gpus=[gpb.GpuStatus(index=i) for i in range(5)]
                        )
                    ),
                    "gpus",
                ),
                (
                    s.alloc.Allocate(
                        apb.AllocateRequest(
                            tenant="t", count=1, shape=Shape(gpus=1, node_selector=labels)
                        )
                    ),
                    "shape.node_selector",
                ),
                (
                    s.quota.SetQuota(
                        qpb.SetQuotaRequest(
                            quota=qpb.Quota(
                                tenant="t",
                                limit=Resources(gpus_by_model={f"M{i}": 1 for i in range(4)}),
                            )
                        )
                    ),
                    "quota.limit.gpus_by_model",
                ),
                (s.alloc.ListAllocations(apb.ListAllocationsRequest(page_size=11)), "page_size"),
                (s.gpu.ListNodes(gpb.ListNodesRequest(page_size=11)), "page_size"),
                (s.gpu.ListGpus(gpb.ListGpusRequest(page_size=11)), "page_size"),
                (s.quota.ListQuotas(qpb.ListQuotasRequest(page_size=11)), "page_size"),
                (s.alloc.Allocate(gpus_req("t" * 300)), "tenant"),
                (s.gpu.GetNode(gpb.GetNodeRequest(node_id="n" * 300)), "node_id"),
                (
                    s.gpu.CordonNode(
                        gpb.CordonNodeRequest(node_id="sim-node-0", reason="r" * 2000)
                    ),
                    "reason",
                ),
            ]
            for call, field in cases:
                err = await refused(call)
                assert err.code() == Code.INVALID_ARGUMENT, (field, err.details())
                assert field in field_violations(err), (field, field_violations(err))
            # Nothing was changed by any of them.
            nodes = await s.gpu.ListNodes(gpb.ListNodesRequest())
            assert sorted(n.id for n in nodes.nodes) == ["sim-node-0", "sim-node-1"]
            assert all(n.state == gpb.NODE_STATE_READY for n in nodes.nodes)
            assert not (await s.quota.ListQuotas(qpb.ListQuotasRequest())).quotas
    finally:
        await running.stop(0)


async def test_a_quota_with_thirty_thousand_models_is_refused(server: RunningServer) -> None:
    async with connect(server.port) as ch:
        models = {f"model-{i}": 1 for i in range(30_000)}
        request = qpb.SetQuotaRequest(
            quota=qpb.Quota(tenant="t", limit=Resources(gpus_by_model=models))
        )
        err = await refused(Stubs(ch).quota.SetQuota(request, timeout=30))
        assert err.code() == Code.INVALID_ARGUMENT
        assert "at most 64 models" in field_violations(err)["quota.limit.gpus_by_model"]


# -- pending allocations -----------------------------------------------------------------


async def test_pending_allocations_are_bounded_per_tenant_and_in_total(tmp_path: Path) -> None:
    running = await serving(
        tmp_path, simulated_nodes=1, max_pending_per_tenant=3, max_pending_total=5
    )
    try:
        async with connect(running.port) as ch:
            s = Stubs(ch)
            full = await s.alloc.Allocate(gpus_req("fill", 8))
            assert full.allocation.state == apb.ALLOCATION_STATE_ALLOCATED
            a_ids = []
            for i in range(3):
                r = await s.alloc.Allocate(gpus_req("a", request_id=f"a{i}"))
                assert r.allocation.state == apb.ALLOCATION_STATE_PENDING
                a_ids.append(r.allocation.id)
            err = await refused(s.alloc.Allocate(gpus_req("a")))
            assert err.code() == Code.RESOURCE_EXHAUSTED
            assert quota_failure(err) == ["tenant:a"]
            assert "max_pending_per_tenant=3" in err.details()
            # A retry of a request already made is still answered, and a dry run is free.
            again = await s.alloc.Allocate(gpus_req("a", request_id="a0"))
            assert again.allocation.id == a_ids[0]
            dry = await s.alloc.Allocate(gpus_req("a", dry_run=True))
            assert dry.dry_run and dry.allocation.state == apb.ALLOCATION_STATE_PENDING
            for _ in range(2):
                await s.alloc.Allocate(gpus_req("b"))
            err = await refused(s.alloc.Allocate(gpus_req("c")))
            assert err.code() == Code.RESOURCE_EXHAUSTED
            assert quota_failure(err) == ["server"]
            # Cancelling one makes room again.
            await s.alloc.ReleaseAllocation(apb.ReleaseAllocationRequest(id=a_ids[1]))
            r = await s.alloc.Allocate(gpus_req("c"))
            assert r.allocation.state == apb.ALLOCATION_STATE_PENDING
            listed = await s.alloc.ListAllocations(
                apb.ListAllocationsRequest(states=[apb.ALLOCATION_STATE_PENDING])
            )
            assert len(listed.allocations) == 5
    finally:
        await running.stop(0)


# -- watch streams -----------------------------------------------------------------------


async def open_watches(s: Stubs, n: int) -> list[Any]:
    streams = []
    for _ in range(n):
        stream = s.alloc.WatchAllocations(apb.WatchAllocationsRequest(start_revision=1))
        await first_event(stream)  # established: the server holds its slot
        streams.append(stream)
    return streams


async def test_watch_streams_are_bounded_per_principal_and_freed_on_close(
    tmp_path: Path,
) -> None:
    running = await serving(tmp_path, max_watch_streams_per_principal=3)
    try:
        async with connect(running.port) as ch:
            s = Stubs(ch)
            await s.alloc.Allocate(gpus_req("t"))
            streams = await open_watches(s, 3)
            err = await refused(
                first_event(s.alloc.WatchAllocations(apb.WatchAllocationsRequest()))
            )
            assert err.code() == Code.RESOURCE_EXHAUSTED
            assert quota_failure(err) == ["principal:ipv4:127.0.0.1"]
            assert "max_watch_streams_per_principal" in err.details()
            streams[0].cancel()

            async def reopen() -> bool:
                try:
                    streams.extend(await open_watches(s, 1))
                    return True
                except grpc.aio.AioRpcError as e:
                    assert e.code() == Code.RESOURCE_EXHAUSTED
                    return False

            await eventually(reopen, bool)
            for stream in streams:
                stream.cancel()
    finally:
        await running.stop(0)


async def test_watch_streams_are_bounded_in_total(tmp_path: Path) -> None:
    running = await serving(tmp_path, max_watch_streams=2, max_watch_streams_per_principal=50)
    try:
        async with connect(running.port) as ch:
            s = Stubs(ch)
            await s.alloc.Allocate(gpus_req("t"))
            streams = await open_watches(s, 2)
            err = await refused(
                first_event(s.alloc.WatchAllocations(apb.WatchAllocationsRequest()))
            )
            assert err.code() == Code.RESOURCE_EXHAUSTED
            assert quota_failure(err) == ["server"]
            for stream in streams:
                stream.cancel()
    finally:
        await running.stop(0)


async def test_streams_per_connection_are_capped_other_connections_unaffected(
    tmp_path: Path,
) -> None:
    running = await serving(tmp_path, max_concurrent_streams=2)
    try:
        async with connect(running.port) as ch, connect(running.port) as other:
            s = Stubs(ch)
            await s.alloc.Allocate(gpus_req("t"))
            streams = await open_watches(s, 2)
            # A third call on the same connection waits for a free stream, while another
            # connection is served at once...
            queued = asyncio.ensure_future(s.gpu.ListNodes(gpb.ListNodesRequest(), timeout=30))
            ok = await Stubs(other).gpu.ListNodes(gpb.ListNodesRequest(), timeout=10)
            assert len(ok.nodes) == 2
            assert not queued.done()
            # ...and runs once one of the two streams ends.
            streams[0].cancel()
            assert len((await queued).nodes) == 2
            streams[1].cancel()
    finally:
        await running.stop(0)


# -- pages bounded by bytes --------------------------------------------------------------


LONG_LABELS = {f"{'p' * 250}/label-{i:03d}-{'x' * 50}": "v" * 63 for i in range(64)}


async def test_a_list_of_large_allocations_is_paged_by_bytes(tmp_path: Path) -> None:
    running = await serving(tmp_path)
    try:
        async with connect(running.port) as ch:
            s = Stubs(ch)
            await s.gpu.RegisterNode(
                gpb.RegisterNodeRequest(
                    node_id="labelled",
                    cpu_millis=1_000_000,
                    memory_bytes=1 << 40,
                    labels=LONG_LABELS,
                )
            )
            for _ in range(101):
                r = await s.alloc.Allocate(
                    apb.AllocateRequest(
                        tenant="big", count=1, shape=Shape(cpu_millis=1, node_selector=LONG_LABELS)
                    )
                )
                assert r.allocation.state == apb.ALLOCATION_STATE_ALLOCATED
            assert r.allocation.ByteSize() > 20_000
            # A client that takes at most 1.5 MiB per message lists them all, by pages.
            async with connect(
                running.port, **{"grpc.max_receive_message_length": 3 << 19}
            ) as small:
                listed: list[str] = []
                token = ""
                pages = 0
                while True:
                    page = await Stubs(small).alloc.ListAllocations(
                        apb.ListAllocationsRequest(tenant="big", page_size=1000, page_token=token)
                    )
                    assert page.ByteSize() <= (1 << 20) + 1024
                    listed += [a.id for a in page.allocations]
                    pages += 1
                    token = page.next_page_token
                    if not token:
                        break
                assert len(set(listed)) == 101 and pages >= 3
            # And the CLI lists them with its defaults.
            env = {**os.environ, "RMGRPC_SERVER": f"127.0.0.1:{running.port}"}
            proc = await asyncio.create_subprocess_exec(
                str(REPO / ".venv/bin/rmgrpcctl"),
                "--json",
                "list",
                "--tenant",
                "big",
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            out, errout = await proc.communicate()
            assert proc.returncode == 0, errout.decode()
            assert out.decode().count('"tenant": "big"') == 101
    finally:
        await running.stop(0)


# -- well formed but wrong ---------------------------------------------------------------


async def test_duplicate_gpu_uuids_and_a_uuid_of_another_node_are_refused(
    server: RunningServer,
) -> None:
    async with connect(server.port) as ch:
        s = Stubs(ch)
        twice = gpb.RegisterNodeRequest(
            node_id="agent-1",
            gpus=[
                gpb.Gpu(index=0, uuid="GPU-x", model="H100"),
                gpb.Gpu(index=1, uuid="GPU-x", model="H100"),
            ],
        )
        err = await refused(s.gpu.RegisterNode(twice))
        assert err.code() == Code.INVALID_ARGUMENT
        assert "gpus[1].uuid" in field_violations(err)

        theirs = (await s.gpu.ListGpus(gpb.ListGpusRequest(node_id="sim-node-0"))).gpus[0].uuid
        stolen = gpb.RegisterNodeRequest(
            node_id="agent-2", gpus=[gpb.Gpu(index=0, uuid=theirs, model="H100")]
        )
        err = await refused(s.gpu.RegisterNode(stolen))
        assert err.code() == Code.FAILED_PRECONDITION
        v = precondition(err)
        assert v.type == "GPU_UUID_IN_USE" and "sim-node-0" in v.description
        missing = await refused(s.gpu.GetNode(gpb.GetNodeRequest(node_id="agent-2")))
        assert missing.code() == Code.NOT_FOUND

        # A node re-registering its own GPUs is fine.
        own = gpb.RegisterNodeRequest(
            node_id="agent-3", gpus=[gpb.Gpu(index=0, uuid="GPU-own", model="H100")]
        )
        await s.gpu.RegisterNode(own)
        await s.gpu.RegisterNode(own)


async def test_nan_infinite_and_negative_metrics_are_refused(server: RunningServer) -> None:
    async with connect(server.port) as ch:
        s = Stubs(ch)
        await s.gpu.RegisterNode(
            gpb.RegisterNodeRequest(node_id="agent", gpus=[gpb.Gpu(index=0, model="H100")])
        )
        good = gpb.GpuMetrics(utilization_percent=50, temperature_celsius=60, power_watts=300)
        await s.gpu.Heartbeat(
            gpb.HeartbeatRequest(node_id="agent", gpus=[gpb.GpuStatus(index=0, metrics=good)])
        )
        bad = gpb.GpuMetrics(
            utilization_percent=math.nan,
            temperature_celsius=math.inf,
            power_watts=-1,
            memory_used_bytes=-5,
            ecc_errors=-1,
        )
        err = await refused(
            s.gpu.Heartbeat(
                gpb.HeartbeatRequest(node_id="agent", gpus=[gpb.GpuStatus(index=0, metrics=bad)])
            )
        )
        assert err.code() == Code.INVALID_ARGUMENT
        fields = field_violations(err)
        for name in (
            "utilization_percent",
            "temperature_celsius",
            "power_watts",
            "memory_used_bytes",
            "ecc_errors",
        ):
            assert f"gpus[0].metrics.{name}" in fields
        assert "finite" in fields["gpus[0].metrics.utilization_percent"]
        node = (await s.gpu.GetNode(gpb.GetNodeRequest(node_id="agent"))).node
        assert node.gpus[0].metrics.utilization_percent == 50  # unchanged


async def test_an_infinite_budget_and_guarantees_outside_the_parent_are_refused(
    server: RunningServer,
) -> None:
    async with connect(server.port) as ch:
        s = Stubs(ch)

        def set_quota(tenant: str, **kw: Any) -> Any:
            return s.quota.SetQuota(qpb.SetQuotaRequest(quota=qpb.Quota(tenant=tenant, **kw)))

        for amount in (math.inf, math.nan, -1.0):
            err = await refused(set_quota("org", budget=qpb.Budget(amount=amount)))
            assert err.code() == Code.INVALID_ARGUMENT
            assert "quota.budget.amount" in field_violations(err)

        await set_quota("org", limit=Resources(gpus=4, gpus_by_model={"H100": 2}))
        err = await refused(set_quota("org/team", guaranteed=Resources(gpus=8)))
        assert err.code() == Code.INVALID_ARGUMENT
        assert "parent 'org'" in field_violations(err)["quota.guaranteed.gpus"]
        err = await refused(set_quota("org/team", guaranteed=Resources(gpus_by_model={"H100": 3})))
        assert "quota.guaranteed.gpus_by_model['H100']" in field_violations(err)
        await set_quota("org/team", guaranteed=Resources(gpus=2))
        # Nor may the parent's limit drop below a child's guarantee.
        err = await refused(set_quota("org", limit=Resources(gpus=1)))
        assert "child 'org/team'" in field_violations(err)["quota.limit.gpus"]
        kept = (await s.quota.GetQuota(qpb.GetQuotaRequest(tenant="org"))).quota
        assert kept.limit.gpus == 4


async def test_a_request_id_reused_with_another_body_is_refused(server: RunningServer) -> None:
    async with connect(server.port) as ch:
        s = Stubs(ch)
        first = (await s.alloc.Allocate(gpus_req("t", 1, request_id="job-1"))).allocation
        err = await refused(s.alloc.Allocate(gpus_req("t", 2, request_id="job-1")))
        assert err.code() == Code.FAILED_PRECONDITION
        v = precondition(err)
        assert v.type == "REQUEST_ID_REUSED" and v.subject == "request_id:job-1"
        assert "shape.gpus" in v.description and first.id in v.description
        err = await refused(s.alloc.Allocate(gpus_req("t", 1, request_id="job-1", priority=5)))
        assert "priority" in precondition(err).description
        err = await refused(
            s.alloc.Allocate(gpus_req("t", 1, request_id="job-1", lease_seconds=60))
        )
        assert "lease_seconds" in precondition(err).description
        # The same body, or the same asked as a dry run, answers the first allocation.
        same = (await s.alloc.Allocate(gpus_req("t", 1, request_id="job-1"))).allocation
        assert same.id == first.id
        dry = await s.alloc.Allocate(gpus_req("t", 1, request_id="job-1", dry_run=True))
        assert dry.allocation.id == first.id
        # Another tenant's request_id is its own.
        other = (await s.alloc.Allocate(gpus_req("u", 2, request_id="job-1"))).allocation
        assert other.id != first.id
        listed = await s.alloc.ListAllocations(apb.ListAllocationsRequest(tenant="t"))
        assert [a.id for a in listed.allocations] == [first.id]


async def test_a_start_revision_past_the_current_one_is_refused(server: RunningServer) -> None:
    async with connect(server.port) as ch:
        s = Stubs(ch)
        listed = await s.alloc.ListAllocations(apb.ListAllocationsRequest())
        ahead = listed.revision + 100
        err = await refused(
            first_event(s.alloc.WatchAllocations(apb.WatchAllocationsRequest(start_revision=ahead)))
        )
        assert err.code() == Code.FAILED_PRECONDITION
        assert precondition(err).type == "REVISION_NOT_YET_ISSUED"
        # The list's revision + 1 is where a watch starts, and is fine.
        stream = s.alloc.WatchAllocations(
            apb.WatchAllocationsRequest(start_revision=listed.revision + 1)
        )
        made = (await s.alloc.Allocate(gpus_req("t"))).allocation
        assert (await first_event(stream)).allocation.id == made.id
        stream.cancel()


def _nested_token() -> str:
    return base64.urlsafe_b64encode(b'{"k":' + b"[" * 50_000 + b"]" * 50_000 + b"}").decode()


async def test_crafted_page_tokens_are_invalid_argument_on_every_list(
    server: RunningServer,
) -> None:
    async with connect(server.port) as ch:
        s = Stubs(ch)
        issued = (
            await s.gpu.ListGpus(gpb.ListGpusRequest(page_size=1))
        ).next_page_token  # a real token, for another query
        assert issued
        lists: list[Callable[[str], Any]] = [
            lambda t: s.alloc.ListAllocations(apb.ListAllocationsRequest(page_token=t)),
            lambda t: s.gpu.ListNodes(gpb.ListNodesRequest(page_token=t)),
            lambda t: s.gpu.ListGpus(gpb.ListGpusRequest(page_token=t, free_only=True)),
            lambda t: s.quota.ListQuotas(qpb.ListQuotasRequest(page_token=t)),
        ]
        for token in (_nested_token(), issued, "x" * 100_000, "%%%", "AAAA"):
            for call in lists:
                err = await refused(call(token))
                assert err.code() == Code.INVALID_ARGUMENT
                assert "page_token" in field_violations(err)
        # A token still pages the query it was issued for.
        rest = await s.gpu.ListGpus(gpb.ListGpusRequest(page_size=1, page_token=issued))
        assert len(rest.gpus) == 1


async def test_undecodable_request_bytes_are_invalid_argument(server: RunningServer) -> None:
    async with connect(server.port) as ch:
        for method in (
            "/rmgrpc.v1.AllocatorService/Allocate",
            "/rmgrpc.v1.GpuManagerService/Heartbeat",
            "/rmgrpc.v1.QuotaService/SetQuota",
        ):
            call = ch.unary_unary(method)
            for raw in (b"\xff\xff\xff", b"\x0a\x05ab", b"\x0a\x02\xc3\x28"):
                err = await refused(call(raw, timeout=10))
                assert err.code() == Code.INVALID_ARGUMENT, (method, raw, err.details())
                assert "request" in field_violations(err)
        stream = ch.unary_stream("/rmgrpc.v1.AllocatorService/WatchAllocations")
        err = await refused(first_event(stream(b"\xff\xff", timeout=10)))
        assert err.code() == Code.INVALID_ARGUMENT


# -- memory stays bounded, and dead clients free their streams ---------------------------


async def server_process(db: Path, env: dict[str, str]) -> ServerProcess:
    """`rmgrpc serve` in a subprocess whose output is read (and dropped) as it comes: a
    full pipe would block the server's logging, and with it the server."""
    proc = await asyncio.to_thread(ServerProcess(db, env=env).start)
    assert proc.proc is not None
    for pipe in (proc.proc.stdout, proc.proc.stderr):
        if pipe is not None:
            threading.Thread(target=lambda p=pipe: [None for _ in p], daemon=True).start()
    return proc


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_memory_stays_bounded_at_the_limits(tmp_path: Path) -> None:
    env = {
        "RMGRPC_MAX_PENDING_PER_TENANT": "100",
        "RMGRPC_MAX_PENDING_TOTAL": "300",
        "RMGRPC_MAX_WATCH_STREAMS_PER_PRINCIPAL": "60",
        "RMGRPC_MAX_WATCH_STREAMS": "60",
    }
    proc = await server_process(tmp_path / "rmgrpc.db", env)
    try:
        assert proc.proc is not None
        pid = proc.proc.pid
        async with connect(proc.port) as ch:
            s = Stubs(ch)
            # Large pending requests: 64 selector labels each, for a node that is full.
            selector = {f"k{i:02d}": "v" * 60 for i in range(64)}
            await s.gpu.RegisterNode(
                gpb.RegisterNodeRequest(
                    node_id="labelled", labels=selector, gpus=[gpb.Gpu(index=0, model="H100")]
                )
            )
            shape = Shape(gpus=1, node_selector=selector)
            placed = await s.alloc.Allocate(
                apb.AllocateRequest(tenant="fill", count=1, shape=shape)
            )
            assert placed.allocation.state == apb.ALLOCATION_STATE_ALLOCATED
            before = rss_kb(pid)
            held = 0
            refusals: set[str] = set()
            for i in range(400):
                try:
                    await s.alloc.Allocate(
                        apb.AllocateRequest(tenant=f"t{i % 4}", count=1, shape=shape)
                    )
                    held += 1
                except grpc.aio.AioRpcError as err:
                    assert err.code() == Code.RESOURCE_EXHAUSTED
                    refusals.update(quota_failure(err))
            assert held == 300 and refusals == {"server"}
            streams = []
            for _ in range(80):
                stream = s.alloc.WatchAllocations(apb.WatchAllocationsRequest(start_revision=1))
                try:
                    await first_event(stream)
                    streams.append(stream)
                except grpc.aio.AioRpcError as err:
                    assert err.code() == Code.RESOURCE_EXHAUSTED
            assert len(streams) == 60
            after = rss_kb(pid)
            print(f"server RSS {before} kB before, {after} kB at the limits")
            assert after - before < 150_000, (before, after)
            for stream in streams:
                stream.cancel()
            # Still serving.
            nodes = await s.gpu.ListNodes(gpb.ListNodesRequest(), timeout=10)
            assert len(nodes.nodes) == 3
    finally:
        proc.stop()


WATCHER = """
import sys, grpc
from rmgrpc.v1 import allocator_pb2 as pb, allocator_pb2_grpc
ch = grpc.insecure_channel(sys.argv[1])
stream = allocator_pb2_grpc.AllocatorServiceStub(ch).WatchAllocations(
    pb.WatchAllocationsRequest(start_revision=1))
next(stream)
print("watching", flush=True)
for _ in stream:
    pass
"""


async def test_a_frozen_client_loses_its_stream_to_keepalive(tmp_path: Path) -> None:
    env = {
        "RMGRPC_MAX_WATCH_STREAMS_PER_PRINCIPAL": "1",
        "RMGRPC_KEEPALIVE_TIME_SECONDS": "1",
        "RMGRPC_KEEPALIVE_TIMEOUT_SECONDS": "1",
    }
    proc = await server_process(tmp_path / "rmgrpc.db", env)
    watcher: subprocess.Popen[str] | None = None
    try:
        async with connect(proc.port) as ch:
            s = Stubs(ch)
            await s.alloc.Allocate(gpus_req("t"))
            watcher = subprocess.Popen(
                [sys.executable, "-c", WATCHER, proc.target],
                stdout=subprocess.PIPE,
                text=True,
                cwd=REPO,
            )
            assert watcher.stdout is not None
            line = await asyncio.to_thread(watcher.stdout.readline)
            assert line.strip() == "watching"
            err = await refused(
                first_event(s.alloc.WatchAllocations(apb.WatchAllocationsRequest()))
            )
            assert err.code() == Code.RESOURCE_EXHAUSTED
            # Frozen: its socket stays open but it answers no ping. Keepalive must notice
            # and close the connection, which frees the frozen client's slot.
            watcher.send_signal(signal.SIGSTOP)

            async def try_watch() -> bool:
                stream = s.alloc.WatchAllocations(apb.WatchAllocationsRequest(start_revision=1))
                try:
                    await first_event(stream)
                except grpc.aio.AioRpcError as e:
                    assert e.code() == Code.RESOURCE_EXHAUSTED
                    return False
                stream.cancel()
                return True

            await eventually(try_watch, bool, timeout=30)
    finally:
        if watcher is not None:
            watcher.kill()
            watcher.wait(10)
        proc.stop()
