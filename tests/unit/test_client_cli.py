"""`rmgrpcctl` and the blocking `Client` against a fake rmgrpc on a real gRPC server.

The fake records every request (and its metadata) and answers from canned data, so the
tests check what the CLI sends, what it prints, and how it reports errors.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from rmgrpc.v1 import (
    allocator_pb2,
    allocator_pb2_grpc,
    gpu_manager_pb2,
    gpu_manager_pb2_grpc,
    quota_pb2,
    quota_pb2_grpc,
    resources_pb2,
)
from rmgrpc_client import Client, InvalidArgumentError, NotFoundError, ResourceExhaustedError, _top
from rmgrpc_client._cliutil import value_actions
from rmgrpc_client._format import (
    TenantStatus,
    allocation_block,
    allocation_rows,
    format_bytes,
    human_duration,
    parse_bytes,
    queue_rows,
    table,
)
from rmgrpc_client._yaml import dump as yaml_dump
from rmgrpc_client.cli import build_parser, main

A = allocator_pb2
G = gpu_manager_pb2
Q = quota_pb2


def rich_status(code: int, text: str, *details: message.Message) -> grpc.Status:
    packed = []
    for detail in details:
        item = any_pb2.Any()
        item.Pack(detail)
        packed.append(item)
    return rpc_status.to_status(status_pb2.Status(code=code, message=text, details=packed))


def placed(alloc_id: str = "a-1", revision: int = 7) -> A.Allocation:
    return A.Allocation(
        id=alloc_id,
        tenant="org/team",
        count=2,
        state=A.ALLOCATION_STATE_ALLOCATED,
        shape=resources_pb2.Shape(gpus=4, gpu_model="H100", memory_bytes=64 << 30),
        placements=[
            resources_pb2.Placement(node_id="n1", gpu_indices=[0, 1, 2, 3]),
            resources_pb2.Placement(node_id="n2", gpu_indices=[4, 5, 6, 7]),
        ],
        revision=revision,
    )


class Fake(
    allocator_pb2_grpc.AllocatorServiceServicer,
    gpu_manager_pb2_grpc.GpuManagerServiceServicer,
    quota_pb2_grpc.QuotaServiceServicer,
):
    def __init__(self) -> None:
        self.requests: list[tuple[str, Any]] = []
        self.metadata: list[dict[str, str]] = []
        self.errors: dict[str, grpc.Status] = {}
        self.events: list[A.AllocationEvent] = []

    def _seen(self, name: str, request: Any, context: Any) -> None:
        self.requests.append((name, request))
        self.metadata.append(dict(context.invocation_metadata()))
        if name in self.errors:
            context.abort_with_status(self.errors[name])

    def last(self, name: str) -> Any:
        return [r for n, r in self.requests if n == name][-1]

    # AllocatorService
    def Allocate(self, request: Any, context: Any) -> Any:
        self._seen("Allocate", request, context)
        alloc = placed()
        alloc.request_id = request.request_id
        if request.dry_run:
            return A.AllocateResponse(
                allocation=alloc, preempted_allocation_ids=["v-1"], dry_run=True
            )
        return A.AllocateResponse(allocation=alloc)

    def GetAllocation(self, request: Any, context: Any) -> Any:
        self._seen("GetAllocation", request, context)
        return A.GetAllocationResponse(allocation=placed(request.id))

    def ListAllocations(self, request: Any, context: Any) -> Any:
        self._seen("ListAllocations", request, context)
        if request.page_token == "":
            return A.ListAllocationsResponse(
                allocations=[placed("a-1")], next_page_token="p2", revision=40
            )
        pending = A.Allocation(
            id="a-2",
            tenant="org",
            count=1,
            state=A.ALLOCATION_STATE_PENDING,
            shape=resources_pb2.Shape(gpus=8),
            pending_reason="2 nodes: 2 lack 8 free GPUs",
            queue_position=3,
            revision=39,
        )
        return A.ListAllocationsResponse(allocations=[pending], revision=41)

    def ReleaseAllocation(self, request: Any, context: Any) -> Any:
        self._seen("ReleaseAllocation", request, context)
        alloc = placed(request.id)
        alloc.state = A.ALLOCATION_STATE_RELEASED
        return A.ReleaseAllocationResponse(allocation=alloc)

    def RenewAllocation(self, request: Any, context: Any) -> Any:
        self._seen("RenewAllocation", request, context)
        return A.RenewAllocationResponse(allocation=placed(request.id))

    def WatchAllocations(self, request: Any, context: Any) -> Iterator[Any]:
        self._seen("WatchAllocations", request, context)
        yield from self.events
        context.abort(grpc.StatusCode.UNAVAILABLE, "bye")

    # GpuManagerService
    def _node(self, node_id: str = "n1", state: int = G.NODE_STATE_READY) -> G.Node:
        return G.Node(
            id=node_id,
            cpu_millis=64000,
            memory_bytes=512 << 30,
            labels={"zone": "a"},
            state=state,  # type: ignore[arg-type]
            allocated=resources_pb2.Resources(gpus=4, cpu_millis=8000, memory_bytes=64 << 30),
            gpus=[
                G.Gpu(
                    index=i,
                    model="H100",
                    memory_bytes=80 << 30,
                    health=G.GPU_HEALTH_HEALTHY,
                    node_id=node_id,
                    allocation_id="a-1" if i < 4 else "",
                )
                for i in range(8)
            ],
        )

    def ListNodes(self, request: Any, context: Any) -> Any:
        self._seen("ListNodes", request, context)
        return G.ListNodesResponse(nodes=[self._node("n1"), self._node("n2")], revision=3)

    def GetNode(self, request: Any, context: Any) -> Any:
        self._seen("GetNode", request, context)
        return G.GetNodeResponse(node=self._node(request.node_id))

    def ListGpus(self, request: Any, context: Any) -> Any:
        self._seen("ListGpus", request, context)
        return G.ListGpusResponse(gpus=self._node().gpus[:2])

    def CordonNode(self, request: Any, context: Any) -> Any:
        self._seen("CordonNode", request, context)
        return G.CordonNodeResponse(node=self._node(request.node_id, G.NODE_STATE_CORDONED))

    def UncordonNode(self, request: Any, context: Any) -> Any:
        self._seen("UncordonNode", request, context)
        return G.UncordonNodeResponse(node=self._node(request.node_id))

    def DrainNode(self, request: Any, context: Any) -> Any:
        self._seen("DrainNode", request, context)
        return G.DrainNodeResponse(
            node=self._node(request.node_id, G.NODE_STATE_DRAINING), allocation_ids=["a-1"]
        )

    # QuotaService
    def SetQuota(self, request: Any, context: Any) -> Any:
        self._seen("SetQuota", request, context)
        return Q.SetQuotaResponse(quota=request.quota)

    def GetQuota(self, request: Any, context: Any) -> Any:
        self._seen("GetQuota", request, context)
        return Q.GetQuotaResponse(
            quota=Q.Quota(tenant=request.tenant, limit=resources_pb2.Resources(gpus=16))
        )

    def ListQuotas(self, request: Any, context: Any) -> Any:
        self._seen("ListQuotas", request, context)
        return Q.ListQuotasResponse(
            quotas=[
                Q.Quota(
                    tenant="org",
                    guaranteed=resources_pb2.Resources(gpus=8),
                    weight=1,
                    budget=Q.Budget(amount=1000, period_seconds=86400),
                ),
                Q.Quota(tenant="org/team", parent="org", weight=2),
            ]
        )

    def DeleteQuota(self, request: Any, context: Any) -> Any:
        self._seen("DeleteQuota", request, context)
        return Q.DeleteQuotaResponse()

    def GetUsage(self, request: Any, context: Any) -> Any:
        self._seen("GetUsage", request, context)
        return Q.GetUsageResponse(
            usage=Q.TenantUsage(
                tenant=request.tenant,
                held=resources_pb2.Resources(gpus=4),
                running_allocations=1,
                fair_share=0.25,
                cost=12.5,
                budget_used_fraction=0.5,
            )
        )


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[Fake]:
    servicer = Fake()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    allocator_pb2_grpc.add_AllocatorServiceServicer_to_server(servicer, server)
    gpu_manager_pb2_grpc.add_GpuManagerServiceServicer_to_server(servicer, server)
    quota_pb2_grpc.add_QuotaServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setenv("RMGRPC_SERVER", f"127.0.0.1:{port}")
    monkeypatch.delenv("RMGRPC_TOKEN", raising=False)
    yield servicer
    server.stop(None)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- arguments --------------------------------------------------------------------------


def test_global_options_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RMGRPC_SERVER", "rm.example:7000")
    monkeypatch.setenv("RMGRPC_TOKEN", "t0k")
    args = build_parser().parse_args(["list"])
    assert (args.server, args.token, args.json) == ("rm.example:7000", "t0k", False)
    args = build_parser().parse_args(["--server", "h:1", "--token", "x", "--json", "list"])
    assert (args.server, args.token, args.json) == ("h:1", "x", True)


def test_bad_arguments_exit_2_with_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "allocate", "t", "--memory", "lots")[0] == 2
    assert run(capsys, "list", "--state", "sleeping")[0] == 2
    code, _, err = run(capsys, "allocate", "t", "--selector", "novalue")
    assert code == 2
    assert "KEY=VALUE" in err
    assert run(capsys)[0] == 2  # no command


def test_sizes() -> None:
    assert parse_bytes("64Gi") == 64 << 30
    assert parse_bytes("1.5Gi") == 3 << 29
    assert parse_bytes("2G") == 2 * 10**9
    assert parse_bytes("4096") == 4096
    assert format_bytes(64 << 30) == "64Gi"
    assert format_bytes(3 << 29) == "1.5Gi"
    assert format_bytes(100) == "100"


# -- allocations ------------------------------------------------------------------------


def test_allocate_sends_the_request_and_prints_the_allocation(
    fake: Fake, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        capsys,
        "--token",
        "s3cret",
        "allocate",
        "org/team",
        "-n",
        "2",
        "--gpus",
        "4",
        "--gpu-model",
        "H100",
        "--cpu-millis",
        "8000",
        "--memory",
        "64Gi",
        "--selector",
        "zone=a",
        "--priority",
        "5",
        "--lease",
        "300",
        "--request-id",
        "req-1",
    )
    assert (code, err) == (0, "")
    request = fake.last("Allocate")
    assert request.tenant == "org/team"
    assert request.count == 2
    assert request.shape == resources_pb2.Shape(
        gpus=4,
        gpu_model="H100",
        cpu_millis=8000,
        memory_bytes=64 << 30,
        node_selector={"zone": "a"},
    )
    assert (request.priority, request.lease_seconds, request.request_id) == (5, 300, "req-1")
    assert not request.dry_run
    assert fake.metadata[-1]["authorization"] == "Bearer s3cret"
    assert "state:      ALLOCATED" in out
    assert "placements: n1:0,1,2,3 n2:4,5,6,7" in out
    assert "shape:      4xH100 mem=64Gi" in out


def test_allocate_generates_a_request_id_and_dry_run_shows_preemptions(
    fake: Fake, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, "allocate", "org/team", "--gpus", "1")
    first = fake.last("Allocate").request_id
    run(capsys, "allocate", "org/team", "--gpus", "1")
    assert len(first) == 36
    assert fake.last("Allocate").request_id != first
    assert "authorization" not in fake.metadata[-1]

    code, out, _ = run(capsys, "allocate", "org/team", "--gpus", "1", "--dry-run")
    assert code == 0
    assert fake.last("Allocate").dry_run
    assert out.startswith("dry run: nothing changed\n")
    assert out.rstrip().endswith("would preempt: v-1")


def test_get_as_json(fake: Fake, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--json", "get", "a-9")
    assert code == 0
    doc = json.loads(out)
    assert doc["id"] == "a-9"
    assert doc["state"] == "ALLOCATION_STATE_ALLOCATED"
    # grpcurl's field names: snake_case as in the .proto
    assert doc["placements"][1] == {"node_id": "n2", "gpu_indices": [4, 5, 6, 7]}

    code, again, _ = run(capsys, "get", "a-9", "-o", "json")  # the flag after the command
    assert (code, again) == (0, out)


def test_list_walks_all_pages_and_prints_a_table(
    fake: Fake, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        capsys, "list", "--tenant", "org", "--state", "allocated", "--state", "PENDING"
    )
    assert code == 0
    requests = [r for n, r in fake.requests if n == "ListAllocations"]
    assert [r.page_token for r in requests] == ["", "p2"]
    assert list(requests[0].states) == [A.ALLOCATION_STATE_ALLOCATED, A.ALLOCATION_STATE_PENDING]
    assert requests[0].tenant == "org"
    header, row1, row2 = out.rstrip("\n").split("\n")
    assert header.split() == [
        "ID", "TENANT", "STATE", "POS", "REPLICAS", "SHAPE", "PLACEMENTS", "AGE", "START",
        "REASON",
    ]  # fmt: skip
    assert row1.split()[:5] == ["a-1", "org/team", "ALLOCATED", "-", "2"]
    assert "n1:0,1,2,3 n2:4,5,6,7" in row1
    assert row2.split()[:4] == ["a-2", "org", "PENDING", "3"]
    assert row2.endswith("2 nodes: 2 lack 8 free GPUs")
    assert header.index("STATE") == row1.index("ALLOCATED")  # columns line up

    code, out, _ = run(capsys, "--json", "list")
    # No --state and no --all: only what still holds or waits for capacity.
    assert list(fake.last("ListAllocations").states) == [
        A.ALLOCATION_STATE_PENDING, A.ALLOCATION_STATE_ALLOCATED, A.ALLOCATION_STATE_PREEMPTED,
    ]  # fmt: skip
    doc = json.loads(out)
    assert [a["id"] for a in doc["allocations"]] == ["a-1", "a-2"]
    assert doc["revision"] == "40"  # the first page's: watching from 41 misses nothing


def test_release_and_renew(fake: Fake, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "release", "a-1")
    assert code == 0
    assert "state:      RELEASED" in out
    run(capsys, "renew", "a-1", "--lease", "600")
    assert fake.last("RenewAllocation") == A.RenewAllocationRequest(id="a-1", lease_seconds=600)


def test_watch_prints_one_line_per_event_and_skips_progress(
    fake: Fake, capsys: pytest.CaptureFixture[str]
) -> None:
    ended = placed("a-1", 9)
    ended.state = A.ALLOCATION_STATE_RELEASED
    ended.state_reason = "released by owner"
    fake.events = [
        A.AllocationEvent(revision=7, type=A.ALLOCATION_EVENT_TYPE_PLACED, allocation=placed()),
        A.AllocationEvent(revision=8, type=A.ALLOCATION_EVENT_TYPE_PROGRESS),
        A.AllocationEvent(revision=9, type=A.ALLOCATION_EVENT_TYPE_ENDED, allocation=ended),
    ]
    code, out, _ = run(capsys, "watch", "--node", "n1", "--from-revision", "7", "--limit", "2")
    assert code == 0
    assert out.splitlines() == [
        "7 PLACED a-1 org/team ALLOCATED n1:0,1,2,3 n2:4,5,6,7",
        "9 ENDED a-1 org/team RELEASED n1:0,1,2,3 n2:4,5,6,7 (released by owner)",
    ]
    request = fake.last("WatchAllocations")
    assert (request.node_id, request.start_revision) == ("n1", 7)

    code, out, _ = run(capsys, "--json", "watch", "--from-revision", "7", "--limit", "2")
    docs = [json.loads(line) for line in out.splitlines()]
    assert [(d["revision"], d["type"]) for d in docs] == [
        ("7", "ALLOCATION_EVENT_TYPE_PLACED"),
        ("9", "ALLOCATION_EVENT_TYPE_ENDED"),
    ]


# -- nodes, quotas, usage ---------------------------------------------------------------


def test_node_commands(fake: Fake, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "nodes", "--state", "ready", "--label", "zone=a")
    assert code == 0
    assert list(fake.last("ListNodes").states) == [G.NODE_STATE_READY]
    assert dict(fake.last("ListNodes").label_selector) == {"zone": "a"}
    header, n1, _ = out.splitlines()
    assert header.split() == [
        "NODE", "STATE", "GPU-FREE", "GPU-TOTAL", "CPU-FREE", "MEM-FREE", "HEARTBEAT", "REASON",
    ]  # fmt: skip
    assert n1.split() == ["n1", "READY", "4", "8", "56", "448Gi", "-", "-"]

    code, out, _ = run(capsys, "node", "n2")
    assert "id:" in out and "n2" in out
    assert out.count("H100") == 8  # its GPU table

    run(capsys, "gpus", "--node", "n1", "--free")
    assert fake.last("ListGpus") == G.ListGpusRequest(node_id="n1", free_only=True)

    code, out, _ = run(capsys, "cordon", "n1", "--reason", "maintenance")
    assert fake.last("CordonNode") == G.CordonNodeRequest(node_id="n1", reason="maintenance")
    assert "state:" in out and "CORDONED" in out
    run(capsys, "uncordon", "n1")
    assert fake.last("UncordonNode").node_id == "n1"
    code, out, _ = run(capsys, "drain", "n1", "--grace", "30")
    assert fake.last("DrainNode").grace_seconds == 30
    assert out.rstrip().endswith("asked to leave: a-1")


def test_quota_commands(fake: Fake, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys,
        "quota",
        "set",
        "org/team",
        "--guaranteed-gpus",
        "8",
        "--limit-gpus",
        "16",
        "--limit-model-gpus",
        "H100=4",
        "--limit-memory",
        "1Ti",
        "--weight",
        "2",
        "--budget",
        "500",
        "--budget-period",
        "86400",
    )
    assert code == 0
    quota = fake.last("SetQuota").quota
    assert quota.tenant == "org/team"
    assert quota.guaranteed == resources_pb2.Resources(gpus=8)
    assert quota.limit == resources_pb2.Resources(
        gpus=16, memory_bytes=1 << 40, gpus_by_model={"H100": 4}
    )
    assert not quota.limit.HasField("cpu_millis")  # unset: unbounded
    assert (quota.weight, quota.budget.amount, quota.budget.period_seconds) == (2, 500, 86400)
    assert "limit:      gpus=16 H100=4 mem=1Ti" in out

    code, out, _ = run(capsys, "quota", "list")
    _, org, team = out.splitlines()
    assert org.split() == ["org", "-", "gpus=8", "unbounded", "1", "1000/86400s"]
    assert team.split() == ["org/team", "org", "-", "unbounded", "2", "-"]

    code, out, _ = run(capsys, "quota", "delete", "org/team")
    assert (code, out) == (0, "quota of org/team deleted\n")
    code, out, _ = run(capsys, "--json", "quota", "get", "org")
    assert json.loads(out) == {"tenant": "org", "limit": {"gpus": 16}}

    code, out, _ = run(capsys, "usage", "org/team")
    assert "held:" in out and "gpus=4" in out
    assert "budget used:" in out and "50%" in out


# -- errors -----------------------------------------------------------------------------


def test_server_error_prints_one_line_with_field_violations(
    fake: Fake, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.errors["Allocate"] = rich_status(
        code_pb2.INVALID_ARGUMENT,
        "invalid request",
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field="count", description="must be at least 1"
                ),
                error_details_pb2.BadRequest.FieldViolation(
                    field="shape.gpu_model", description="no node has model X1"
                ),
            ]
        ),
    )
    code, out, err = run(capsys, "allocate", "org/team", "-n", "0")
    assert code == 1
    assert out == ""
    assert err == (
        "error: INVALID_ARGUMENT: invalid request "
        "(count: must be at least 1; shape.gpu_model: no node has model X1)\n"
    )


def test_a_violation_already_in_the_message_is_not_repeated(
    fake: Fake, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.errors["Allocate"] = rich_status(
        code_pb2.INVALID_ARGUMENT,
        "invalid shape.gpus: must be between 0 and 64",
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field="shape.gpus", description="must be between 0 and 64"
                )
            ]
        ),
    )
    _, _, err = run(capsys, "allocate", "org/team", "--gpus", "100")
    assert err == "error: INVALID_ARGUMENT: invalid shape.gpus: must be between 0 and 64\n"


def test_quota_failure_is_in_the_error_line(fake: Fake, capsys: pytest.CaptureFixture[str]) -> None:
    fake.errors["Allocate"] = rich_status(
        code_pb2.RESOURCE_EXHAUSTED,
        "quota exceeded",
        error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(
                    subject="tenant:org/team", description="limit of 16 GPUs reached"
                )
            ]
        ),
    )
    _, _, err = run(capsys, "allocate", "org/team", "--gpus", "32")
    assert err == (
        "error: RESOURCE_EXHAUSTED: quota exceeded (tenant:org/team: limit of 16 GPUs reached)\n"
    )


def test_unreachable_server_is_one_line_not_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket_closed_port() as target:
        code, out, err = run(capsys, "--server", target, "--timeout", "5", "list")
    assert code == 2
    assert out == ""
    assert err == (
        f"error: cannot reach {target} — is the server running? set --server or RMGRPC_SERVER\n"
    )
    # The same wherever the flag stands, and with the address from the environment.
    with socket_closed_port() as target:
        assert run(capsys, "nodes", "--server", target)[0] == 2


class socket_closed_port:
    """A 127.0.0.1 port nothing listens on."""

    def __enter__(self) -> str:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return f"127.0.0.1:{s.getsockname()[1]}"

    def __exit__(self, *exc: object) -> None:
        pass


# -- the blocking client ----------------------------------------------------------------


def test_sync_client_calls_and_decodes_errors(fake: Fake) -> None:
    target = build_parser().parse_args(["list"]).server
    with Client(target, token="tok") as client:
        alloc = client.allocate("org/team", 2, gpus=4)
        assert alloc.state == A.ALLOCATION_STATE_ALLOCATED
        assert [a.id for a in client.list_allocations()] == ["a-1", "a-2"]
        page = client.list_allocations_page()
        assert (page.next_page_token, page.revision) == ("p2", 40)
        assert client.get_usage("org").fair_share == 0.25
        assert fake.metadata[-1]["authorization"] == "Bearer tok"

        fake.errors["GetAllocation"] = rich_status(
            code_pb2.NOT_FOUND,
            "allocation a-404 not found",
            error_details_pb2.ResourceInfo(resource_type="allocation", resource_name="a-404"),
        )
        with pytest.raises(NotFoundError) as caught:
            client.get_allocation("a-404")
        info = caught.value.resource_info
        assert info is not None and info.resource_name == "a-404"
        assert caught.value.code == grpc.StatusCode.NOT_FOUND
        assert str(caught.value) == "NOT_FOUND: allocation a-404 not found"

        fake.errors["SetQuota"] = rich_status(
            code_pb2.INVALID_ARGUMENT,
            "bad quota",
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field="quota.weight", description="must be > 0"
                    )
                ]
            ),
        )
        with pytest.raises(InvalidArgumentError) as bad:
            client.set_quota("org", weight=-1)
        assert [(v.field, v.description) for v in bad.value.field_violations] == [
            ("quota.weight", "must be > 0")
        ]
        assert not isinstance(bad.value, ResourceExhaustedError)


# -- daily-work conveniences ------------------------------------------------------------


def test_global_flags_are_accepted_in_any_position() -> None:
    parser = build_parser()
    for argv in (
        ["--server", "h:1", "-o", "yaml", "--no-headers", "list", "--tenant", "t"],
        ["list", "--server", "h:1", "-o", "yaml", "--tenant", "t", "--no-headers"],
        ["list", "--tenant", "t", "--no-headers", "--output", "yaml", "--server", "h:1"],
    ):
        args = parser.parse_args(argv)
        assert (args.server, args.output, args.no_headers, args.tenant) == (
            "h:1",
            "yaml",
            True,
            "t",
        )
    assert parser.parse_args(["quota", "list", "--token", "x"]).token == "x"  # nested action
    assert parser.parse_args(["--token", "a", "nodes"]).token == "a"  # before: kept


def test_every_flag_has_help_and_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    missing = [a.option_strings or a.dest for a in value_actions(build_parser()) if not a.help]
    assert missing == []
    code, out, _ = run(capsys, "allocate", "--help")
    assert code == 0
    assert re.search(r"--count COUNT\s+replicas \(a gang\) \(default: 1\)", out)
    assert "global options" in out  # --server and friends are listed after the command too
    code, out, _ = run(capsys, "--help")
    assert "(default: table)" in out
    assert "(default: False)" not in out  # a default that says nothing is left out


def test_human_durations() -> None:
    seconds = [0, 59, 119, 125, 600, 4000, 12000, 30 * 3600, 76 * 3600, 12 * 86400]
    assert [human_duration(s) for s in seconds] == [
        "0s", "59s", "119s", "2m5s", "10m", "66m", "3h20m", "30h", "3d4h", "12d",
    ]  # fmt: skip


def test_times_are_ages_not_utc_stamps() -> None:
    now = 1_800_000_000.0
    alloc = placed()
    alloc.create_time.FromSeconds(int(now) - 300)
    alloc.lease_expire_time.FromSeconds(int(now) + 120)
    rows = allocation_rows([alloc], now, wide=True)
    cells = dict(zip(rows.headers, rows.rows[0], strict=True))
    assert (cells["AGE"], cells["LEASE"], cells["POS"]) == ("5m", "in 2m", "-")
    text = allocation_block(alloc, now)
    assert re.search(r"^created: +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(5m ago\)$", text, re.M)
    assert re.search(r"^lease expires: +.* \(in 2m\)$", text, re.M)
    assert "Z" not in text  # no RFC 3339 UTC stamps with nanoseconds


def test_queue_is_in_admission_order() -> None:
    def pending(alloc_id: str, position: int, created_at: int) -> A.Allocation:
        return A.Allocation(
            id=alloc_id,
            tenant="t",
            state=A.ALLOCATION_STATE_PENDING,
            queue_position=position,
            create_revision=created_at,
        )

    now = 1_800_000_000.0
    rows = queue_rows(
        [pending("c", 0, 5), pending("b", 2, 3), pending("a", 1, 4), pending("d", 0, 2)], now
    )
    assert rows.headers[:2] == ("POS", "ID")
    # ranked ones by position, then the not-yet-ranked ones in arrival order
    assert [(r[0], r[1]) for r in rows.rows] == [("1", "a"), ("2", "b"), ("-", "d"), ("-", "c")]


def test_yaml_emitter() -> None:
    doc = {
        "allocations": [
            {
                "id": "a-1",
                "count": 2,
                "placements": [{"node_id": "n1", "gpu_indices": [0, 1]}],
                "revision": "40",
                "shape": {},
            }
        ],
        "dry_run": False,
        "pending_reason": "2 nodes: none fit",
        "note": None,
        "model": "yes",
        "empty": "",
        "ratio": 0.5,
        "tags": [],
    }
    assert yaml_dump(doc) == textwrap.dedent(
        """\
        allocations:
        - id: a-1
          count: 2
          placements:
          - node_id: n1
            gpu_indices:
            - 0
            - 1
          revision: "40"
          shape: {}
        dry_run: false
        pending_reason: "2 nodes: none fit"
        note: null
        model: "yes"
        empty: ""
        ratio: 0.5
        tags: []
        """
    )


def test_output_formats(fake: Fake, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "get", "a-9", "-o", "yaml")
    assert code == 0
    lines = out.splitlines()
    assert "id: a-9" in lines
    assert "state: ALLOCATION_STATE_ALLOCATED" in lines
    assert "- node_id: n1" in lines

    code, out, _ = run(capsys, "nodes", "--no-headers")
    assert [line.split()[0] for line in out.splitlines()] == ["n1", "n2"]

    code, out, _ = run(capsys, "-o", "wide", "nodes")
    header = out.splitlines()[0].split()
    assert {"MODELS", "CPU-TOTAL", "MEM-TOTAL", "LABELS"} <= set(header)
    assert out.splitlines()[1].split()[header.index("MODELS")] == "H100"


def test_release_several_ids(fake: Fake, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "release", "a-1", "a-2")
    assert (code, err) == (0, "")
    assert [r.id for n, r in fake.requests if n == "ReleaseAllocation"] == ["a-1", "a-2"]
    _, *rows = out.splitlines()
    assert [(r.split()[0], r.split()[2]) for r in rows] == [
        ("a-1", "RELEASED"),
        ("a-2", "RELEASED"),
    ]

    fake.errors["ReleaseAllocation"] = rich_status(code_pb2.NOT_FOUND, "no such allocation")
    code, out, err = run(capsys, "release", "x-1", "x-2")
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        "error: x-1: NOT_FOUND: no such allocation",
        "error: x-2: NOT_FOUND: no such allocation",
        "error: 2 of 2 allocation(s) not released",
    ]
    assert run(capsys, "release")[0] == 2  # nothing named


class Terminal(io.StringIO):
    """Standard input that claims to be a terminal, with the operator's answer in it."""

    def isatty(self) -> bool:
        return True


def test_release_all_of_a_tenant_asks_first(
    fake: Fake, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def released() -> list[str]:
        return [r.id for n, r in fake.requests if n == "ReleaseAllocation"]

    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # a script: no one to ask
    code, _, err = run(capsys, "release", "--tenant", "org", "--all")
    assert code == 2 and "add --yes" in err
    monkeypatch.setattr("sys.stdin", Terminal("n\n"))
    code, out, err = run(capsys, "release", "--tenant", "org", "--all")
    assert code == 1 and "release 2 allocation(s) of org and its subtree? [y/N]" in out
    assert err == "error: aborted; nothing released\n"
    assert released() == []

    monkeypatch.setattr("sys.stdin", Terminal("y\n"))
    assert run(capsys, "release", "--tenant", "org", "--all")[0] == 0
    assert released() == ["a-1", "a-2"]
    assert fake.last("ListAllocations").tenant == "org"
    assert run(capsys, "release", "--tenant", "org", "--all", "-y")[0] == 0  # no question
    assert released() == ["a-1", "a-2"] * 2
    assert run(capsys, "release", "a-1", "--all", "--tenant", "org")[0] == 2  # ids and --all


def test_tenants_table_and_json(fake: Fake, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "tenants")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == [
        "TENANT", "WEIGHT", "GUARANTEED", "LIMIT", "HELD", "PENDING", "FAIR-SHARE",
        "RUNNING", "WAITING", "OLDEST-WAIT",
    ]  # fmt: skip
    # tenants with a quota or a live allocation, parents first
    assert [r.split()[0] for r in rows] == ["org", "org/team"]
    assert rows[1].split()[:7] == ["org/team", "2", "0", "none", "4", "0", "25%"]
    code, out, _ = run(capsys, "tenants", "org/team", "-o", "json")
    doc = json.loads(out)
    assert [t["tenant"] for t in doc["tenants"]] == ["org/team"]
    assert doc["tenants"][0]["usage"]["running_allocations"] == 1
    assert doc["tenants"][0]["quota"]["weight"] == 2


def test_top_renders_one_frame(fake: Fake, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "top", "--once")
    assert code == 0
    for title in ("Nodes", "Tenants", "Queue (admission order)"):
        assert title in out
    assert "a-2" in out  # the pending allocation is in the queue


def test_top_frame_in_a_recording_terminal() -> None:
    fake = Fake()
    now = 1_800_000_000.0
    waiting = A.Allocation(
        id="a-7", tenant="org/team", state=A.ALLOCATION_STATE_PENDING, queue_position=1,
        pending_reason="2 nodes: 2 lack 8 free GPUs",
    )  # fmt: skip
    waiting.create_time.FromSeconds(int(now) - 90)
    snap = _top.Snapshot(
        server="rm:50051",
        read_at=now,
        nodes=[fake._node("n1"), fake._node("n2", G.NODE_STATE_CORDONED)],
        tenants=[
            TenantStatus(
                tenant="org/team",
                usage=Q.TenantUsage(tenant="org/team", fair_share=0.5),
                oldest_pending=now - 90,
            )
        ],
        pending=[waiting],
        running=2,
    )
    console = Console(record=True, width=160, color_system=None)
    console.print(_top.render(snap))
    text = console.export_text()
    assert "GPUs 8 held, 8 free of 16" in text
    assert "allocations 2 running, 1 pending" in text
    assert re.search(r"n2\s+CORDONED\s+4\s+8", text)
    assert re.search(r"org/team\s+1\s+0\s+none\s+0\s+0\s+50%\s+0\s+0\s+90s", text)
    assert re.search(r"1\s+a-7\s+org/team.*2 nodes: 2 lack 8 free GPUs", text)


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_bash_completion(capsys: pytest.CaptureFixture[str]) -> None:
    code, script, _ = run(capsys, "completion", "bash")
    assert code == 0

    def complete(*words: str) -> list[str]:
        probe = (
            script
            + f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
            + '_rmgrpcctl; printf "%s\\n" "${COMPREPLY[@]}"\n'
        )
        done = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True)
        return done.stdout.split()

    assert complete("rmgrpcctl", "qu") == ["queue", "quota"]
    assert complete("rmgrpcctl", "quota", "") == ["delete", "get", "list", "set"]
    assert complete("rmgrpcctl", "--server", "h:1", "list", "--st") == ["--state"]
    assert "allocated" in complete("rmgrpcctl", "list", "--state", "")
    assert "cordoned" in complete("rmgrpcctl", "nodes", "--state", "")
    assert complete("rmgrpcctl", "nodes", "-o", "w") == ["wide"]
    assert complete("rmgrpcctl", "completion", "")[:2] == ["bash", "zsh"]

    code, zsh, _ = run(capsys, "completion", "zsh")
    assert zsh.startswith("#compdef rmgrpcctl\n") and "bashcompinit" in zsh


@pytest.mark.skipif(shutil.which("zsh") is None, reason="no zsh")
def test_zsh_completion(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The zsh script registers the function through bashcompinit, and the function
    answers under zsh as under bash. It is called as bashcompinit's `compgen -F` calls it
    (sh emulation, 0-based arrays); zsh then keeps the words that start with the one
    being typed, as its own matching does."""
    code, script, _ = run(capsys, "completion", "zsh")
    assert code == 0

    def complete(*words: str) -> list[str]:
        probe = (
            script
            + 'print -r -- "$_comps[rmgrpcctl]"\n'
            + "emulate sh; setopt kshglob noshglob braceexpand\n"
            + f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
            + '_rmgrpcctl; printf "%s\\n" "${COMPREPLY[@]}"\n'
        )
        done = subprocess.run(
            ["zsh", "-f", "-c", probe],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "HOME": str(tmp_path)},  # compinit writes its dump there
        )
        registered, *offered = done.stdout.splitlines()
        assert registered == "_bash_complete -o default -F _rmgrpcctl", done.stdout
        return [w for w in offered if w.startswith(words[-1])]

    assert complete("rmgrpcctl", "qu") == ["queue", "quota"]
    assert complete("rmgrpcctl", "quota", "") == ["delete", "get", "list", "set"]
    assert complete("rmgrpcctl", "--server", "h:1", "list", "--st") == ["--state"]
    assert "allocated" in complete("rmgrpcctl", "list", "--state", "")
    assert complete("rmgrpcctl", "nodes", "-o", "w") == ["wide"]


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@given(st.integers(min_value=0, max_value=400 * 86400))
def test_human_duration_never_overstates_and_loses_little(seconds: int) -> None:
    text = human_duration(seconds)
    parts = re.findall(r"(\d+)([smhd])", text)
    assert "".join(n + u for n, u in parts) == text  # e.g. 3h20m, nothing else
    shown = sum(int(n) * _UNITS[u] for n, u in parts)
    last_unit = _UNITS[parts[-1][1]]
    # Rounds down to its last unit: never more than the truth, never a unit less.
    assert shown <= seconds < shown + last_unit
    assert len(parts) <= 2


_cell = st.text(alphabet="abcXYZ019-/:%.", min_size=1, max_size=12)


@given(
    st.integers(min_value=1, max_value=5).flatmap(
        lambda n: st.tuples(
            st.lists(_cell, min_size=n, max_size=n),
            st.lists(st.lists(_cell, min_size=n, max_size=n), max_size=6),
        )
    )
)
def test_table_columns_line_up(headers_rows: tuple[list[str], list[list[str]]]) -> None:
    headers, rows = headers_rows
    lines = table(headers, rows).split("\n")
    assert len(lines) == 1 + len(rows)
    starts = [m.start() for m in re.finditer(r"\S+", lines[0])]
    for line, cells in zip(lines[1:], rows, strict=True):
        # every cell begins where its header does, and reads back unchanged
        assert [line[s:].split(" ", 1)[0] for s in starts] == cells
    bare = table(headers, rows, header=False)
    assert [line.split() for line in bare.split("\n") if line] == rows  # --no-headers
