"""Authentication, authorization and TLS through a real server.

The matrix runs every RPC of every served service under each role (admin, a tenant, an
agent, a viewer, no credentials, an unknown token) over TLS, and compares each cell with
the code written down for it. Around it: TLS and mutual TLS with the right and the wrong
certificates, certificate and token reloads without a restart, and a tenant's watch that
never shows a sibling's events.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rmgrpc.auth import hash_token
from rmgrpc.server import SERVICE_NAMES, RunningServer, start
from rmgrpc.v1 import (
    allocator_pb2,
    allocator_pb2_grpc,
    gpu_manager_pb2,
    gpu_manager_pb2_grpc,
    quota_pb2,
    quota_pb2_grpc,
    reservation_pb2,
    reservation_pb2_grpc,
    resources_pb2,
    telemetry_pb2,
    telemetry_pb2_grpc,
)
from rmgrpc_client import AsyncClient, Client, RmgrpcError
from tests.conftest import ServerProcess, free_port, make_settings
from tests.e2e.helpers import detail, eventually
from tests.e2e.test_grpcurl import GRPCURL

OK = grpc.StatusCode.OK
PD = grpc.StatusCode.PERMISSION_DENIED
NF = grpc.StatusCode.NOT_FOUND
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED

ROLES = ("admin", "tenant", "agent", "viewer", "none", "wrong")
TOKENS = {
    "admin": "admin-7b1f0c9e4d2a48e6a0c3",
    "tenant": "tenant-2c8e5a1d9f3b47c0b6e1",
    "agent": "agent-9d4b2e7f1a6c43d8e5b0",
    "viewer": "viewer-5e0a3c8b2d7f41e9c4a6",
    "wrong": "not-a-token-anyone-was-given",
}
TENANT = "org/a"
AGENT_NODE = "agent-node"


@dataclass
class Pki:
    """A throwaway CA, the server's certificate files and a client certificate."""

    ca: trustme.CA
    dir: Path
    cert_file: Path
    key_file: Path
    ca_file: Path

    def client_files(self, *names: str) -> tuple[str, str]:
        """A client certificate for `names` (its SANs) signed by this CA: (cert, key)."""
        cert = self.ca.issue_cert(*names)
        stem = self.dir / f"client-{names[0].replace('@', '_')}"
        cert_path, key_path = Path(f"{stem}.pem"), Path(f"{stem}.key")
        cert_path.write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
        key_path.write_bytes(cert.private_key_pem.bytes())
        return str(cert_path), str(key_path)

    def credentials(self, client: tuple[str, str] | None = None) -> grpc.ChannelCredentials:
        key = Path(client[1]).read_bytes() if client else None
        chain = Path(client[0]).read_bytes() if client else None
        return grpc.ssl_channel_credentials(self.ca_file.read_bytes(), key, chain)


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file, ca_file = (
        directory / "server.pem",
        directory / "server.key",
        directory / "ca.pem",
    )
    cert_file.write_bytes(b"".join(p.bytes() for p in server_cert.cert_chain_pems))
    key_file.write_bytes(server_cert.private_key_pem.bytes())
    ca_file.write_bytes(ca.cert_pem.bytes())
    return Pki(ca, directory, cert_file, key_file, ca_file)


def tokens_toml(tokens: dict[str, str], sans: dict[str, str] | None = None) -> str:
    """A tokens file for the roles named in `tokens` (and certificate SANs -> role)."""
    scope = {"tenant": f'tenant = "{TENANT}"', "agent": f'node = "{AGENT_NODE}"'}
    out = []
    for role, token in tokens.items():
        if role in ("none", "wrong"):
            continue
        base = "tenant" if role.startswith("tenant") else role
        out += [
            "[[principal]]",
            f'name = "{role}"',
            f'role = "{base}"',
            scope.get(base, ""),
            f'token_sha256 = "{hash_token(token)}"',
            "",
        ]
    for san, role in (sans or {}).items():
        out += ["[[principal]]", f'name = "cert-{role}"', f'role = "{role}"', f'san = "{san}"', ""]
    return "\n".join(out)


def metadata(role: str) -> tuple[tuple[str, str], ...]:
    token = TOKENS.get(role)
    return (("authorization", f"Bearer {token}"),) if token else ()


@dataclass
class Cluster:
    server: RunningServer
    channel: grpc.aio.Channel
    pki: Pki
    tokens_file: Path
    ids: dict[str, str] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"


async def _tls_server(tmp_path: Path, **overrides: Any) -> tuple[RunningServer, Pki, Path]:
    pki = make_pki(tmp_path / "pki")
    tokens_file = tmp_path / "tokens.toml"
    tokens_file.write_text(tokens_toml(TOKENS))
    settings = make_settings(
        tmp_path,
        tokens_file=str(tokens_file),
        cert_file=str(pki.cert_file),
        key_file=str(pki.key_file),
        watch_progress_seconds=0.5,
        **overrides,
    )
    return await start(settings), pki, tokens_file


def _allocate(tenant: str, **shape: Any) -> allocator_pb2.AllocateRequest:
    return allocator_pb2.AllocateRequest(
        tenant=tenant,
        count=1,
        shape=resources_pb2.Shape(**shape),
        lease_seconds=600,
    )


def _reserve(tenant: str) -> reservation_pb2.CreateReservationRequest:
    """A small booking an hour from now (the server runs on the system clock)."""
    start = int(time.time()) + 3600
    return reservation_pb2.CreateReservationRequest(
        tenant=tenant,
        count=1,
        shape=resources_pb2.Shape(cpu_millis=100),
        start_time=Timestamp(seconds=start),
        end_time=Timestamp(seconds=start + 3600),
    )


def _node(node_id: str, **labels: str) -> gpu_manager_pb2.RegisterNodeRequest:
    return gpu_manager_pb2.RegisterNodeRequest(
        node_id=node_id, cpu_millis=8000, memory_bytes=32 << 30, labels=labels
    )


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    running, pki, tokens_file = await _tls_server(tmp_path)
    channel = grpc.aio.secure_channel(f"127.0.0.1:{running.port}", pki.credentials())
    c = Cluster(running, channel, pki, tokens_file)
    alloc = allocator_pb2_grpc.AllocatorServiceStub(channel)
    gpus = gpu_manager_pb2_grpc.GpuManagerServiceStub(channel)
    quotas = quota_pb2_grpc.QuotaServiceStub(channel)
    admin, agent = metadata("admin"), metadata("agent")
    await gpus.RegisterNode(_node(AGENT_NODE, pool="agent"), metadata=agent)
    await gpus.RegisterNode(_node("admin-node"), metadata=admin)
    for tenant in (TENANT, "org/b"):
        await quotas.SetQuota(
            quota_pb2.SetQuotaRequest(quota=quota_pb2.Quota(tenant=tenant)), metadata=admin
        )
    # "own" runs on the agent's node; "other" (a GPU) never can: the agent node has none.
    made = {
        "own": _allocate(TENANT, cpu_millis=500, node_selector={"pool": "agent"}),
        "other": _allocate("org/b", gpus=1),
        "own_release": _allocate(TENANT, cpu_millis=100),
        "other_release": _allocate("org/b", cpu_millis=100),
    }
    for key, request in made.items():
        answer = await alloc.Allocate(request, metadata=admin)
        assert answer.allocation.state == allocator_pb2.ALLOCATION_STATE_ALLOCATED, answer
        c.ids[key] = answer.allocation.id
    resv = reservation_pb2_grpc.ReservationServiceStub(channel)
    for key, tenant in (
        ("resv_own", TENANT),
        ("resv_other", "org/b"),
        ("resv_cancel_own", TENANT),
        ("resv_cancel_other", "org/b"),
    ):
        booked = await resv.CreateReservation(_reserve(tenant), metadata=admin)
        c.ids[key] = booked.reservation.id
    yield c
    await channel.close()
    await running.stop(0)


# -- the matrix ------------------------------------------------------------------------------


Builder = Callable[[str, dict[str, str]], Any]


@dataclass(frozen=True)
class Row:
    """One RPC under one situation: how to build its request (from the role and the ids
    made by the fixture) and the code each role gets; none/wrong get UNAUTHENTICATED."""

    service: str
    method: str
    label: str
    build: Builder
    admin: grpc.StatusCode
    tenant: grpc.StatusCode
    agent: grpc.StatusCode
    viewer: grpc.StatusCode
    stream: bool = False
    open: bool = False

    def expected(self, role: str) -> grpc.StatusCode:
        if role in ("none", "wrong"):
            return OK if self.open else UNAUTH
        code: grpc.StatusCode = getattr(self, role)
        return code


def _const(message: Any) -> Builder:
    return lambda role, ids: message


A, Q, G, T, R = (
    "rmgrpc.v1.AllocatorService",
    "rmgrpc.v1.QuotaService",
    "rmgrpc.v1.GpuManagerService",
    "rmgrpc.v1.TelemetryService",
    "rmgrpc.v1.ReservationService",
)
apb, gpb, qpb, tpb, rpb = allocator_pb2, gpu_manager_pb2, quota_pb2, telemetry_pb2, reservation_pb2


def _get(key: str) -> Builder:
    return lambda role, ids: apb.GetAllocationRequest(id=ids[key])


MATRIX: list[Row] = [
    # AllocatorService
    Row(A, "Allocate", "own tenant", _const(_allocate(TENANT, cpu_millis=100)), OK, OK, PD, PD),
    Row(A, "Allocate", "other tenant", _const(_allocate("org/b", cpu_millis=100)), OK, PD, PD, PD),
    Row(
        A,
        "Allocate",
        "in another tenant's reservation",
        lambda role, ids: apb.AllocateRequest(
            tenant=TENANT,
            count=1,
            shape=resources_pb2.Shape(cpu_millis=100),
            reservation_id=ids["resv_other"],
        ),
        PD,  # the admin sees it, but org/a is not in org/b's subtree
        NF,  # a tenant may not learn it exists
        PD,
        PD,
    ),
    Row(A, "GetAllocation", "own (on the agent's node)", _get("own"), OK, OK, OK, OK),
    Row(A, "GetAllocation", "other tenant's", _get("other"), OK, NF, NF, OK),
    Row(A, "ListAllocations", "no filter", _const(apb.ListAllocationsRequest()), OK, OK, OK, OK),
    Row(
        A,
        "ListAllocations",
        "other tenant",
        _const(apb.ListAllocationsRequest(tenant="org/b")),
        OK,
        PD,
        OK,  # an agent's list is narrowed to its node
        OK,
    ),
    Row(
        A,
        "RenewAllocation",
        "own",
        lambda role, ids: apb.RenewAllocationRequest(id=ids["own"]),
        OK,
        OK,
        OK,  # an agent renews what runs on its node
        PD,
    ),
    Row(
        A,
        "RenewAllocation",
        "other tenant's",
        lambda role, ids: apb.RenewAllocationRequest(id=ids["other"]),
        OK,
        NF,
        NF,  # not on its node: as if it did not exist
        PD,
    ),
    Row(
        A,
        "ReleaseAllocation",
        "own",
        lambda role, ids: apb.ReleaseAllocationRequest(id=ids["own_release"]),
        OK,
        OK,
        PD,
        PD,
    ),
    Row(
        A,
        "ReleaseAllocation",
        "other tenant's",
        lambda role, ids: apb.ReleaseAllocationRequest(id=ids["other_release"]),
        OK,
        NF,
        PD,
        PD,
    ),
    Row(
        A,
        "WatchAllocations",
        "no filter",
        _const(apb.WatchAllocationsRequest(start_revision=1)),
        OK,
        OK,
        OK,
        OK,
        stream=True,
    ),
    Row(
        A,
        "WatchAllocations",
        "other tenant",
        _const(apb.WatchAllocationsRequest(start_revision=1, tenant="org/b")),
        OK,
        PD,
        OK,  # narrowed to the agent's node
        OK,
        stream=True,
    ),
    # QuotaService
    Row(
        Q,
        "SetQuota",
        "a tenant's",
        _const(qpb.SetQuotaRequest(quota=qpb.Quota(tenant="org/c"))),
        OK,
        PD,
        PD,
        PD,
    ),
    Row(Q, "GetQuota", "own", _const(qpb.GetQuotaRequest(tenant=TENANT)), OK, OK, PD, OK),
    Row(Q, "GetQuota", "other tenant", _const(qpb.GetQuotaRequest(tenant="org/b")), OK, PD, PD, OK),
    Row(Q, "ListQuotas", "all", _const(qpb.ListQuotasRequest()), OK, OK, PD, OK),
    Row(Q, "GetUsage", "own", _const(qpb.GetUsageRequest(tenant=TENANT)), OK, OK, PD, OK),
    Row(Q, "GetUsage", "other tenant", _const(qpb.GetUsageRequest(tenant="org/b")), OK, PD, PD, OK),
    Row(
        Q,
        "DeleteQuota",
        "a tenant's",
        _const(qpb.DeleteQuotaRequest(tenant="org/c")),
        OK,
        PD,
        PD,
        PD,
    ),
    # GpuManagerService
    Row(
        G,
        "RegisterNode",
        "own node",
        lambda role, ids: _node(AGENT_NODE, pool="agent") if role == "agent" else _node("node-2"),
        OK,
        PD,
        OK,
        PD,
    ),
    Row(G, "RegisterNode", "another node", _const(_node("intruder-node")), OK, PD, PD, PD),
    Row(
        G,
        "Heartbeat",
        "own node",
        lambda role, ids: gpb.HeartbeatRequest(
            node_id=AGENT_NODE if role == "agent" else "admin-node"
        ),
        OK,
        PD,
        OK,
        PD,
    ),
    Row(
        G,
        "Heartbeat",
        "another node",
        _const(gpb.HeartbeatRequest(node_id="admin-node")),
        OK,
        PD,
        PD,
        PD,
    ),
    Row(
        G, "GetNode", "the agent's", _const(gpb.GetNodeRequest(node_id=AGENT_NODE)), OK, PD, OK, OK
    ),
    Row(G, "GetNode", "another", _const(gpb.GetNodeRequest(node_id="sim-node-0")), OK, PD, PD, OK),
    Row(G, "ListNodes", "all", _const(gpb.ListNodesRequest()), OK, PD, PD, OK),
    Row(
        G,
        "ListGpus",
        "the agent's node",
        _const(gpb.ListGpusRequest(node_id=AGENT_NODE)),
        OK,
        PD,
        OK,
        OK,
    ),
    Row(G, "ListGpus", "all", _const(gpb.ListGpusRequest()), OK, PD, PD, OK),
    Row(
        G,
        "CordonNode",
        "a node",
        _const(gpb.CordonNodeRequest(node_id="sim-node-1")),
        OK,
        PD,
        PD,
        PD,
    ),
    Row(
        G,
        "UncordonNode",
        "a node",
        _const(gpb.UncordonNodeRequest(node_id="sim-node-1")),
        OK,
        PD,
        PD,
        PD,
    ),
    Row(
        G,
        "DrainNode",
        "an empty node",
        _const(gpb.DrainNodeRequest(node_id="intruder-node")),
        OK,
        PD,
        PD,
        PD,
    ),
    # TelemetryService
    Row(T, "GetClusterSummary", "all", _const(tpb.GetClusterSummaryRequest()), OK, PD, PD, OK),
    Row(
        T,
        "StreamClusterMetrics",
        "one message",
        _const(tpb.StreamClusterMetricsRequest(interval_seconds=1, max_messages=1)),
        OK,
        PD,
        PD,
        OK,
        stream=True,
    ),
    # A tenant asking for every tenant gets its own subtree's report.
    Row(T, "GetCostReport", "all tenants", _const(tpb.GetCostReportRequest()), OK, OK, PD, OK),
    Row(
        T,
        "GetCostReport",
        "other tenant",
        _const(tpb.GetCostReportRequest(tenant="org/b")),
        OK,
        PD,
        PD,
        OK,
    ),
    # ReservationService
    Row(R, "CreateReservation", "own tenant", lambda r, i: _reserve(TENANT), OK, OK, PD, PD),
    Row(R, "CreateReservation", "other tenant", lambda r, i: _reserve("org/b"), OK, PD, PD, PD),
    Row(
        R,
        "GetReservation",
        "own",
        lambda role, ids: rpb.GetReservationRequest(id=ids["resv_own"]),
        OK,
        OK,
        PD,
        OK,
    ),
    Row(
        R,
        "GetReservation",
        "other tenant's",
        lambda role, ids: rpb.GetReservationRequest(id=ids["resv_other"]),
        OK,
        NF,
        PD,
        OK,
    ),
    Row(
        R,
        "GetReservation",
        "unknown id",
        _const(rpb.GetReservationRequest(id="r-1")),
        NF,
        NF,
        PD,
        NF,
    ),
    Row(R, "ListReservations", "all", _const(rpb.ListReservationsRequest()), OK, OK, PD, OK),
    Row(
        R,
        "ListReservations",
        "other tenant",
        _const(rpb.ListReservationsRequest(tenant="org/b")),
        OK,
        PD,
        PD,
        OK,
    ),
    Row(
        R,
        "CancelReservation",
        "own",
        lambda role, ids: rpb.CancelReservationRequest(id=ids["resv_cancel_own"]),
        OK,
        OK,
        PD,
        PD,
    ),
    Row(
        R,
        "CancelReservation",
        "other tenant's",
        lambda role, ids: rpb.CancelReservationRequest(id=ids["resv_cancel_other"]),
        OK,
        NF,
        PD,
        PD,
    ),
    Row(
        R,
        "WatchReservations",
        "no filter",
        _const(rpb.WatchReservationsRequest(start_revision=1)),
        OK,
        OK,
        PD,
        OK,
        stream=True,
    ),
    Row(
        R,
        "CancelReservation",
        "unknown id",
        _const(rpb.CancelReservationRequest(id="r-1")),
        NF,
        NF,
        PD,
        PD,
    ),
]

# Health and reflection stay open for probes and tooling.
OPEN_ROWS = [
    Row(
        "grpc.health.v1.Health",
        "Check",
        "overall",
        _const(health_pb2.HealthCheckRequest()),
        OK,
        OK,
        OK,
        OK,
        open=True,
    ),
    Row(
        "grpc.reflection.v1alpha.ServerReflection",
        "ServerReflectionInfo",
        "list services",
        _const(reflection_pb2.ServerReflectionRequest(list_services="")),
        OK,
        OK,
        OK,
        OK,
        open=True,
    ),
]

_STUBS: dict[str, Callable[[grpc.aio.Channel], Any]] = {
    A: allocator_pb2_grpc.AllocatorServiceStub,
    Q: quota_pb2_grpc.QuotaServiceStub,
    G: gpu_manager_pb2_grpc.GpuManagerServiceStub,
    T: telemetry_pb2_grpc.TelemetryServiceStub,
    R: reservation_pb2_grpc.ReservationServiceStub,
    "grpc.health.v1.Health": health_pb2_grpc.HealthStub,
    "grpc.reflection.v1alpha.ServerReflection": reflection_pb2_grpc.ServerReflectionStub,
}


async def call_code(channel: grpc.aio.Channel, row: Row, role: str, ids: dict[str, str]) -> Any:
    """The status code the server answers `row` with under `role` (for a stream: the
    code of its first message, OK when one arrives)."""
    method = getattr(_STUBS[row.service](channel), row.method)
    request = row.build(role, ids)
    try:
        if row.service.endswith("ServerReflection"):
            call = method(iter([request]), metadata=metadata(role), timeout=10)
            await call.read()
            call.cancel()
        elif row.stream:
            call = method(request, metadata=metadata(role), timeout=10)
            first = await call.read()
            call.cancel()
            assert first is not grpc.aio.EOF or row.method == "StreamClusterMetrics"
        else:
            await method(request, metadata=metadata(role), timeout=10)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return OK


def served(service: str) -> bool:
    return service in SERVICE_NAMES or service.startswith("grpc.")


async def test_every_role_on_every_rpc(cluster: Cluster) -> None:
    """The whole matrix: every row under every role, answered with exactly the expected code."""
    rows = [r for r in [*MATRIX, *OPEN_ROWS] if served(r.service)]
    mismatches = []
    unimplemented = []
    for row in rows:
        for role in ROLES:  # admin first
            got = await call_code(cluster.channel, row, role, cluster.ids)
            if role == "admin" and got == UNIMPLEMENTED:
                # A method whose handler is still a stub: listed, and its row skipped.
                unimplemented.append(f"{row.service.rsplit('.', 1)[-1]}/{row.method}")
                break
            if got != row.expected(role):
                mismatches.append(
                    f"{row.service.rsplit('.', 1)[-1]}/{row.method} ({row.label}) as {role}: "
                    f"expected {row.expected(role).name}, got {got.name}"
                )
    assert not mismatches, "\n".join(mismatches)
    # Every RPC of every served rmgrpc service has at least one row.
    for service in SERVICE_NAMES:
        stub_methods = {
            m.name
            for m in _descriptor(service).methods  # type: ignore[attr-defined]
        }
        covered = {r.method for r in MATRIX if r.service == service}
        assert stub_methods <= covered, f"{service}: no matrix row for {stub_methods - covered}"
    assert len(rows) - len(set(unimplemented)) > 30  # the matrix really ran


async def test_matrix_rows_not_served_yet(cluster: Cluster) -> None:
    """Lists (as a skip) the matrix rows this build cannot check: a service not registered,
    or a method still answering UNIMPLEMENTED."""
    missing = sorted({r.service for r in MATRIX if not served(r.service)})
    for row in MATRIX:
        if (
            served(row.service)
            and not row.stream
            and row.method.startswith("Get")
            and await call_code(cluster.channel, row, "viewer", cluster.ids) == UNIMPLEMENTED
        ):
            missing.append(f"{row.service}/{row.method}")
    if missing:
        pytest.skip(f"not served by this build, so not checked: {', '.join(missing)}")


def _descriptor(service: str) -> Any:
    from google.protobuf import descriptor_pool

    return descriptor_pool.Default().FindServiceByName(service)


async def test_a_hidden_allocation_looks_like_a_missing_one(cluster: Cluster) -> None:
    """A tenant learns nothing from another tenant's allocation id: the answer is the one
    an id that never existed gets (same code, same detail shape)."""
    stub = allocator_pb2_grpc.AllocatorServiceStub(cluster.channel)
    answers = []
    for allocation_id in (cluster.ids["other"], "a-doesnotexist"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetAllocation(
                apb.GetAllocationRequest(id=allocation_id), metadata=metadata("tenant")
            )
        info = detail(caught.value, error_details_pb2.ResourceInfo)
        answers.append(
            (
                caught.value.code(),
                info.resource_type,
                info.resource_name == allocation_id,
                (caught.value.details() or "").replace(allocation_id, "ID"),
            )
        )
    assert answers[0] == answers[1]
    assert answers[0][0] == NF


async def test_permission_denied_names_principal_and_action(cluster: Cluster) -> None:
    stub = quota_pb2_grpc.QuotaServiceStub(cluster.channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SetQuota(
            qpb.SetQuotaRequest(quota=qpb.Quota(tenant=TENANT)), metadata=metadata("tenant")
        )
    assert caught.value.code() == PD
    info = detail(caught.value, error_details_pb2.ErrorInfo)
    assert info.reason == "PERMISSION_DENIED"
    assert info.metadata["principal"] == f"tenant:tenant[{TENANT}]"
    assert info.metadata["action"] == "/rmgrpc.v1.QuotaService/SetQuota"


# -- watch narrowing -------------------------------------------------------------------------


async def _events_until(call: Any, last_id: str) -> list[allocator_pb2.AllocationEvent]:
    seen = []
    while True:
        event = await asyncio.wait_for(call.read(), 10)
        assert event is not grpc.aio.EOF
        if event.type == apb.ALLOCATION_EVENT_TYPE_PROGRESS:
            continue
        seen.append(event)
        if event.allocation.id == last_id:
            return seen


@pytest.mark.parametrize("asked", ["", "org", TENANT])
async def test_tenant_watch_is_narrowed_to_its_subtree(cluster: Cluster, asked: str) -> None:
    """Whatever tenant filter a tenant asks for (none, its parent, itself), it gets its
    own subtree's events and no one else's — "org/ab" (a sibling whose name starts like
    it) included."""
    stub = allocator_pb2_grpc.AllocatorServiceStub(cluster.channel)
    admin = metadata("admin")
    start_revision = (
        await stub.ListAllocations(apb.ListAllocationsRequest(), metadata=admin)
    ).revision
    call = stub.WatchAllocations(
        apb.WatchAllocationsRequest(start_revision=start_revision + 1, tenant=asked),
        metadata=metadata("tenant"),
    )
    made = []
    for tenant in ("org/ab", "org", "org/b", f"{TENANT}/x", TENANT):
        answer = await stub.Allocate(_allocate(tenant, cpu_millis=10), metadata=admin)
        made.append((tenant, answer.allocation.id))
    events = await _events_until(call, made[-1][1])
    call.cancel()
    tenants = {e.allocation.tenant for e in events}
    assert tenants == {f"{TENANT}/x", TENANT}, tenants
    listed = await stub.ListAllocations(
        apb.ListAllocationsRequest(tenant=asked), metadata=metadata("tenant")
    )
    assert listed.allocations
    assert all(a.tenant in (TENANT, f"{TENANT}/x") for a in listed.allocations)


async def test_tenant_watch_of_a_sibling_is_refused(cluster: Cluster) -> None:
    stub = allocator_pb2_grpc.AllocatorServiceStub(cluster.channel)
    call = stub.WatchAllocations(
        apb.WatchAllocationsRequest(tenant="org/ab"), metadata=metadata("tenant")
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == PD


# -- tokens: revoke and reload ---------------------------------------------------------------


async def test_revoked_token_is_refused_at_once_and_open_streams_go_on(cluster: Cluster) -> None:
    stub = allocator_pb2_grpc.AllocatorServiceStub(cluster.channel)
    quotas = quota_pb2_grpc.QuotaServiceStub(cluster.channel)
    await quotas.GetUsage(qpb.GetUsageRequest(tenant=TENANT), metadata=metadata("tenant"))
    watch = stub.WatchAllocations(apb.WatchAllocationsRequest(), metadata=metadata("tenant"))
    first = await asyncio.wait_for(watch.read(), 10)  # the stream is open (a progress)
    assert first is not grpc.aio.EOF

    fresh = {**TOKENS, "tenant": "tenant-rotated-0e7d3f6a1b2c"}
    cluster.tokens_file.write_text(tokens_toml(fresh))
    assert cluster.server.protection is not None
    cluster.server.protection.reload()

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await quotas.GetUsage(qpb.GetUsageRequest(tenant=TENANT), metadata=metadata("tenant"))
    assert caught.value.code() == UNAUTH
    rotated = (("authorization", f"Bearer {fresh['tenant']}"),)
    await quotas.GetUsage(qpb.GetUsageRequest(tenant=TENANT), metadata=rotated)
    # The stream opened with the revoked token was not dropped: it still gets events.
    made = await stub.Allocate(_allocate(TENANT, cpu_millis=10), metadata=rotated)
    events = await _events_until(watch, made.allocation.id)
    assert events[-1].allocation.tenant == TENANT
    watch.cancel()


async def test_a_bad_tokens_file_keeps_the_previous_one(cluster: Cluster) -> None:
    cluster.tokens_file.write_text("[[principal]]\nname = 'x'\nrole = 'wizard'\n")
    assert cluster.server.protection is not None
    cluster.server.protection.reload()
    quotas = quota_pb2_grpc.QuotaServiceStub(cluster.channel)
    await quotas.ListQuotas(qpb.ListQuotasRequest(), metadata=metadata("viewer"))


def test_sighup_reloads_tokens_without_a_restart(tmp_path: Path) -> None:
    """`kill -HUP`: a new token works and a removed one is refused, same process."""
    tokens_file = tmp_path / "tokens.toml"
    tokens_file.write_text(tokens_toml({"viewer": TOKENS["viewer"]}))
    proc = ServerProcess(
        tmp_path / "rmgrpc.db", env={"RMGRPC_TOKENS_FILE": str(tokens_file)}
    ).start()
    try:
        assert proc.proc is not None
        pid = proc.proc.pid

        def code(token: str) -> grpc.StatusCode:
            with grpc.insecure_channel(proc.target) as channel:
                stub = gpu_manager_pb2_grpc.GpuManagerServiceStub(channel)
                try:
                    stub.ListNodes(
                        gpb.ListNodesRequest(),
                        metadata=(("authorization", f"Bearer {token}"),),
                        timeout=10,
                    )
                except grpc.RpcError as error:
                    return error.code()  # type: ignore[attr-defined, no-any-return]
            return OK

        assert code(TOKENS["viewer"]) == OK
        assert code(TOKENS["admin"]) == UNAUTH
        tokens_file.write_text(tokens_toml({"admin": TOKENS["admin"]}))

        def reload_then_call() -> grpc.StatusCode:
            # Sent again while polling: one sent before the server installed its handler
            # (the port opens first) is ignored.
            os.kill(pid, signal.SIGHUP)
            return code(TOKENS["admin"])

        asyncio.run(
            eventually(lambda: asyncio.to_thread(reload_then_call), lambda c: c == OK, timeout=20)
        )
        assert code(TOKENS["viewer"]) == UNAUTH
        assert proc.proc.poll() is None and proc.proc.pid == pid
    finally:
        proc.stop()


# -- TLS and mutual TLS ----------------------------------------------------------------------


async def _health(channel: grpc.aio.Channel) -> Any:
    try:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return OK


async def test_tls_needs_a_client_that_trusts_the_server(cluster: Cluster) -> None:
    assert await _health(cluster.channel) == OK
    async with grpc.aio.insecure_channel(cluster.target) as plain:
        assert await _health(plain) == grpc.StatusCode.UNAVAILABLE
    stranger = make_pki(cluster.pki.dir / "stranger")
    async with grpc.aio.secure_channel(cluster.target, stranger.credentials()) as wrong_ca:
        assert await _health(wrong_ca) == grpc.StatusCode.UNAVAILABLE


async def test_certificates_reload_without_a_restart(cluster: Cluster) -> None:
    """New files in place (a renewed certificate from a new CA): new connections use them."""
    renewed = make_pki(cluster.pki.dir / "renewed")
    for new, old in (
        (renewed.cert_file, cluster.pki.cert_file),
        (renewed.key_file, cluster.pki.key_file),
    ):
        staged = old.with_suffix(".new")
        staged.write_bytes(new.read_bytes())
        os.replace(staged, old)
    async with grpc.aio.secure_channel(cluster.target, renewed.credentials()) as channel:
        assert await _health(channel) == OK
    async with grpc.aio.secure_channel(cluster.target, cluster.pki.credentials()) as channel:
        assert await _health(channel) == grpc.StatusCode.UNAVAILABLE


@pytest.fixture
async def mtls(tmp_path: Path) -> AsyncIterator[tuple[RunningServer, Pki]]:
    pki = make_pki(tmp_path / "pki")
    tokens_file = tmp_path / "tokens.toml"
    tokens_file.write_text(tokens_toml(TOKENS, sans={"viewer.example.com": "viewer"}))
    settings = make_settings(
        tmp_path,
        tokens_file=str(tokens_file),
        cert_file=str(pki.cert_file),
        key_file=str(pki.key_file),
        client_ca_file=str(pki.ca_file),
    )
    running = await start(settings)
    yield running, pki
    await running.stop(0)


async def test_mutual_tls(mtls: tuple[RunningServer, Pki], tmp_path: Path) -> None:
    running, pki = mtls
    target = f"127.0.0.1:{running.port}"
    viewer_cert = pki.client_files("viewer.example.com")
    unmapped_cert = pki.client_files("nobody.example.com")
    stranger = make_pki(tmp_path / "stranger")
    foreign_cert = stranger.client_files("viewer.example.com")
    # Signed by another CA, for the same name: refused in the handshake.
    foreign = grpc.ssl_channel_credentials(
        pki.ca_file.read_bytes(),
        Path(foreign_cert[1]).read_bytes(),
        Path(foreign_cert[0]).read_bytes(),
    )
    for credentials in (pki.credentials(), foreign):
        async with grpc.aio.secure_channel(target, credentials) as channel:
            assert await _health(channel) == grpc.StatusCode.UNAVAILABLE

    async def codes(client: tuple[str, str], role: str) -> list[Any]:
        out = []
        async with grpc.aio.secure_channel(target, pki.credentials(client)) as channel:
            out.append(await _health(channel))
            stub = gpu_manager_pb2_grpc.GpuManagerServiceStub(channel)
            for call in (
                stub.ListNodes(gpb.ListNodesRequest(), metadata=metadata(role)),
                stub.CordonNode(
                    gpb.CordonNodeRequest(node_id="sim-node-0"), metadata=metadata(role)
                ),
            ):
                try:
                    await call
                    out.append(OK)
                except grpc.aio.AioRpcError as error:
                    out.append(error.code())
        return out

    # The certificate's SAN maps to the viewer principal: reads, no writes.
    assert await codes(viewer_cert, "none") == [OK, OK, PD]
    # A good certificate nobody is mapped to: authenticated transport, no principal.
    assert await codes(unmapped_cert, "none") == [OK, UNAUTH, UNAUTH]
    # A token on top of a certificate speaks for the caller.
    assert await codes(viewer_cert, "admin") == [OK, OK, OK]


# -- the tools honour --token and the TLS flags ----------------------------------------------


async def _run(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_cli_with_token_and_tls(cluster: Cluster) -> None:
    cli = [sys.executable, "-m", "rmgrpc_client.cli", "--server", cluster.target]
    tls = ["--tls-ca", str(cluster.pki.ca_file)]
    rc, out, err = await _run(*cli, *tls, "nodes", env={"RMGRPC_TOKEN": TOKENS["viewer"]})
    assert rc == 0, err
    assert AGENT_NODE in out
    rc, out, err = await _run(*cli, *tls, "--token", TOKENS["tenant"], "nodes")
    assert rc == 1 and "PERMISSION_DENIED" in err
    rc, out, err = await _run(*cli, *tls, "nodes", env={"RMGRPC_TOKEN": ""})
    assert rc == 1 and "UNAUTHENTICATED" in err


async def test_agent_with_token_and_tls(cluster: Cluster, tmp_path: Path) -> None:
    """The example agent registers and heartbeats its node over TLS with its token."""
    node_id = "agent-node"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "rmgrpc_client.agent",
        "--server",
        cluster.target,
        "--tls-ca",
        str(cluster.pki.ca_file),
        "--node-id",
        node_id,
        "--simulated-gpus",
        "2",
        "--label",
        "pool=agent",
        "--state-file",
        str(tmp_path / "agent.json"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "RMGRPC_TOKEN": TOKENS["agent"]},
    )
    try:
        stub = gpu_manager_pb2_grpc.GpuManagerServiceStub(cluster.channel)
        node = await eventually(
            lambda: stub.GetNode(gpb.GetNodeRequest(node_id=node_id), metadata=metadata("admin")),
            lambda answer: len(answer.node.gpus) == 2,
            timeout=30,
        )
        assert node.node.id == node_id
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)


# -- safe defaults ---------------------------------------------------------------------------


def test_no_auth_on_a_public_address_refuses_to_start(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rmgrpc",
            "serve",
            "--listen",
            f"0.0.0.0:{free_port()}",
            "--db",
            str(tmp_path / "x.db"),
            "--metrics-listen",
            "",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "RMGRPC_NVML": "off"},
    )
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    assert "without authentication" in lines[-1] and "--insecure" in lines[-1]


# -- the README's Security examples ------------------------------------------------------------


def _security_commands() -> list[list[str]]:
    """The grpcurl and rmgrpcctl lines of the README's Security section, as argv."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = re.search(r"## Security\n(.*?)\n## ", text, re.S)
    assert section, "README lost its Security section"
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section.group(1), re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(("grpcurl", "rmgrpcctl")):
                commands.append(shlex.split(line))
    return commands


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl binary not installed")
async def test_readme_security_examples_run(cluster: Cluster) -> None:
    commands = _security_commands()
    assert len(commands) >= 3
    for argv in commands:
        argv = [
            a.replace("rm.example.com:50051", f"localhost:{cluster.server.port}")
            .replace("$RMGRPC_TOKEN", TOKENS["admin"])
            .replace("ml/research", TENANT)
            for a in argv
        ]
        argv = [str(cluster.pki.ca_file) if a == "ca.pem" else a for a in argv]
        if argv[0] == "grpcurl":
            argv[0] = str(GRPCURL)
        else:
            argv[:1] = [sys.executable, "-m", "rmgrpc_client.cli"]
        rc, out, err = await _run(*argv)
        assert rc == 0, f"{argv}\n{err}"
        assert out.strip()


async def test_python_clients_with_token_and_tls(cluster: Cluster) -> None:
    """`Client` and `AsyncClient` take the token and the TLS files themselves."""

    def sync_calls() -> tuple[str, str]:
        with Client(cluster.target, token=TOKENS["agent"], tls_ca=str(cluster.pki.ca_file)) as rm:
            node = rm.get_node(AGENT_NODE)
            try:
                rm.get_node("sim-node-0")
            except RmgrpcError as error:
                return node.id, error.code.name
        return node.id, "OK"

    assert await asyncio.to_thread(sync_calls) == (AGENT_NODE, "PERMISSION_DENIED")
    async with AsyncClient(
        cluster.target, token=TOKENS["viewer"], tls_ca=str(cluster.pki.ca_file)
    ) as rm:
        assert AGENT_NODE in [n.id async for n in rm.list_nodes()]


async def test_agent_watch_shows_only_its_nodes_allocations(cluster: Cluster) -> None:
    stub = allocator_pb2_grpc.AllocatorServiceStub(cluster.channel)
    call = stub.WatchAllocations(
        apb.WatchAllocationsRequest(start_revision=1), metadata=metadata("agent")
    )
    events = []
    while True:
        event = await asyncio.wait_for(call.read(), 10)
        assert event is not grpc.aio.EOF
        if event.type == apb.ALLOCATION_EVENT_TYPE_PROGRESS:
            break  # caught up
        events.append(event)
    call.cancel()
    seen = {e.allocation.id for e in events}
    assert cluster.ids["own"] in seen and cluster.ids["other"] not in seen
    assert all(any(p.node_id == AGENT_NODE for p in e.allocation.placements) for e in events)
