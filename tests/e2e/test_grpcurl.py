"""What operators type: grpcurl against `rmgrpc serve`, with reflection and no proto files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServerProcess

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
pytestmark = pytest.mark.skipif(GRPCURL is None, reason="grpcurl binary not installed")


def grpcurl(
    target: str,
    *args: str,
    data: dict[str, Any] | None = None,
    check: bool = True,
    flags: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    cmd = [str(GRPCURL), "-plaintext", *flags]
    if data is not None:
        cmd += ["-d", json.dumps(data)]
    cmd += [target, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def messages(text: str) -> list[dict[str, Any]]:
    """grpcurl prints one pretty JSON object per message, back to back."""
    decoder = json.JSONDecoder()
    out, i = [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return out
        obj, i = decoder.raw_decode(text, i)
        out.append(obj)


def test_list_and_describe(server_process: ServerProcess) -> None:
    services = grpcurl(server_process.target, "list").stdout.split()
    for name in (
        "rmgrpc.v1.AllocatorService",
        "rmgrpc.v1.GpuManagerService",
        "rmgrpc.v1.QuotaService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    ):
        assert name in services
    methods = grpcurl(server_process.target, "list", "rmgrpc.v1.AllocatorService").stdout
    for rpc in (
        "Allocate",
        "GetAllocation",
        "ListAllocations",
        "ReleaseAllocation",
        "RenewAllocation",
        "WatchAllocations",
    ):
        assert f"rmgrpc.v1.AllocatorService.{rpc}" in methods
    described = grpcurl(server_process.target, "describe", "rmgrpc.v1.AllocateRequest").stdout
    for field in (
        "tenant",
        "request_id",
        "count",
        "shape",
        "priority",
        "lease_seconds",
        "max_duration_seconds",
        "reservation_id",
        "dry_run",
    ):
        assert f" {field} = " in described
    v1 = grpcurl(server_process.target, "describe", "grpc.reflection.v1.ServerReflection").stdout
    assert "ServerReflectionInfo" in v1


def test_allocate_get_release_watch_session(server_process: ServerProcess) -> None:
    t = server_process.target
    allocated = messages(
        grpcurl(
            t,
            "rmgrpc.v1.AllocatorService/Allocate",
            data={
                "tenant": "ml/research",
                "request_id": "job-42",
                "count": 2,
                "shape": {
                    "gpus": 4,
                    "gpu_model": "H100",
                    "cpu_millis": 16000,
                    "memory_bytes": 68719476736,
                },
                "lease_seconds": 600,
            },
        ).stdout
    )[0]["allocation"]
    assert allocated["state"] == "ALLOCATION_STATE_ALLOCATED"
    assert len(allocated["placements"]) == 2
    assert all(len(p["gpu_indices"]) == 4 for p in allocated["placements"])

    got = messages(
        grpcurl(t, "rmgrpc.v1.AllocatorService/GetAllocation", data={"id": allocated["id"]}).stdout
    )[0]["allocation"]
    assert got["id"] == allocated["id"] and got["tenant"] == "ml/research"

    listed = messages(
        grpcurl(t, "rmgrpc.v1.AllocatorService/ListAllocations", data={"tenant": "ml"}).stdout
    )[0]
    assert [a["id"] for a in listed["allocations"]] == [allocated["id"]]
    assert int(listed["revision"]) >= int(allocated["revision"])

    released = messages(
        grpcurl(
            t, "rmgrpc.v1.AllocatorService/ReleaseAllocation", data={"id": allocated["id"]}
        ).stdout
    )[0]["allocation"]
    assert released["state"] == "ALLOCATION_STATE_RELEASED"

    # The stream never ends by itself: -max-time bounds it, and grpcurl then exits non-zero.
    watched = grpcurl(
        t,
        "rmgrpc.v1.AllocatorService/WatchAllocations",
        data={"startRevision": 1},
        check=False,
        flags=("-max-time", "2"),
    )
    events = [
        m for m in messages(watched.stdout) if m.get("type") != "ALLOCATION_EVENT_TYPE_PROGRESS"
    ]
    assert [e["type"] for e in events] == [
        "ALLOCATION_EVENT_TYPE_CREATED",
        "ALLOCATION_EVENT_TYPE_PLACED",
        "ALLOCATION_EVENT_TYPE_ENDED",
    ]
    assert all(e["allocation"]["id"] == allocated["id"] for e in events)
    revisions = [int(e["revision"]) for e in events]
    assert revisions == sorted(revisions)


def test_bad_input_and_missing_through_grpcurl(server_process: ServerProcess) -> None:
    t = server_process.target
    bad = grpcurl(
        t, "rmgrpc.v1.AllocatorService/Allocate", data={"tenant": "", "count": 0}, check=False
    )
    assert bad.returncode != 0
    assert "InvalidArgument" in bad.stderr
    missing = grpcurl(
        t, "rmgrpc.v1.AllocatorService/GetAllocation", data={"id": "a-nope"}, check=False
    )
    assert "NotFound" in missing.stderr


def test_health_overall_and_per_service(server_process: ServerProcess) -> None:
    t = server_process.target
    overall = messages(grpcurl(t, "grpc.health.v1.Health/Check").stdout)[0]
    assert overall["status"] == "SERVING"
    for service in (
        "rmgrpc.v1.AllocatorService",
        "rmgrpc.v1.GpuManagerService",
        "rmgrpc.v1.QuotaService",
    ):
        one = messages(grpcurl(t, "grpc.health.v1.Health/Check", data={"service": service}).stdout)[
            0
        ]
        assert one["status"] == "SERVING"
    unknown = grpcurl(t, "grpc.health.v1.Health/Check", data={"service": "nope"}, check=False)
    assert "NotFound" in unknown.stderr
