"""Reservations as operators drive them: grpcurl (reflection, no proto files) and
`rmgrpcctl reserve | reservations | reservation get|cancel`, against a real server on
127.0.0.1 (2 simulated nodes of 8 GPUs, the system clock: windows are an hour ahead)."""

from __future__ import annotations

import asyncio
import re
import shlex
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from rmgrpc.server import RunningServer
from rmgrpc_client._reservations import parse_time
from tests.e2e.test_cli import Cli, table
from tests.e2e.test_grpcurl import GRPCURL, grpcurl, messages


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(int(t), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
def cli(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(server, capsys)


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl binary not installed")
async def test_grpcurl_create_get_list_watch_cancel(server: RunningServer) -> None:
    target = f"127.0.0.1:{server.port}"

    async def call(*args: str, **kw: object) -> str:
        proc = await asyncio.to_thread(grpcurl, target, *args, **kw)  # type: ignore[arg-type]
        return proc.stdout

    services = (await call("list")).split()
    assert "rmgrpc.v1.ReservationService" in services
    health = await call(
        "grpc.health.v1.Health/Check", data={"service": "rmgrpc.v1.ReservationService"}
    )
    assert messages(health)[0]["status"] == "SERVING"
    start = time.time() + 3600
    body = {
        "tenant": "org/a",
        "count": 2,
        "shape": {"gpus": 4, "node_selector": {}},
        "start_time": rfc3339(start),
        "end_time": rfc3339(start + 7200),
    }
    (created,) = messages(await call("rmgrpc.v1.ReservationService/CreateReservation", data=body))
    r = created["reservation"]
    assert r["state"] == "RESERVATION_STATE_SCHEDULED" and len(r["placements"]) == 2
    (got,) = messages(
        await call("rmgrpc.v1.ReservationService/GetReservation", data={"id": r["id"]})
    )
    assert got["reservation"] == r
    (listed,) = messages(
        await call(
            "rmgrpc.v1.ReservationService/ListReservations",
            data={"tenant": "org", "states": ["RESERVATION_STATE_SCHEDULED"]},
        )
    )
    assert [x["id"] for x in listed["reservations"]] == [r["id"]]
    watched = await asyncio.to_thread(
        grpcurl,
        target,
        "rmgrpc.v1.ReservationService/WatchReservations",
        data={"start_revision": int(r["revision"])},
        check=False,
        flags=("-max-time", "1"),
    )
    events = messages(watched.stdout)
    assert events and events[0]["type"] == "RESERVATION_EVENT_TYPE_CREATED"
    (cancelled,) = messages(
        await call("rmgrpc.v1.ReservationService/CancelReservation", data={"id": r["id"]})
    )
    assert cancelled["reservation"]["state"] == "RESERVATION_STATE_CANCELLED"
    # A window in the past: INVALID_ARGUMENT with the field named.
    body["start_time"], body["end_time"] = rfc3339(start - 7200), rfc3339(start - 5400)
    bad = await asyncio.to_thread(
        grpcurl, target, "rmgrpc.v1.ReservationService/CreateReservation", data=body, check=False
    )
    assert bad.returncode != 0 and "InvalidArgument" in bad.stderr and "end_time" in bad.stderr


async def test_cli_reserve_list_get_cancel(cli: Cli) -> None:
    out = await cli.ok(
        "reserve", "org/a", "--gpus", "8", "-n", "2", "--start", "+1h", "--end", "+2h"
    )
    assert "scheduled" in out
    rid = next(line.split()[1] for line in out.splitlines() if line.startswith("id:"))
    rows = table(await cli.ok("reservations"))
    assert [(r["ID"], r["STATE"], r["TENANT"]) for r in rows] == [(rid, "scheduled", "org/a")]
    as_json = await cli.json("reservation", "get", rid)
    assert as_json["id"] == rid and len(as_json["placements"]) == 2
    # The cluster is booked for that hour: a second booking is refused, naming the first
    # and the earliest window that fits, and exits 1.
    code, _, err = await cli(
        "reserve", "org/b", "--gpus", "1", "--start", "+1h", "--duration", "600"
    )
    assert code == 1 and "FAILED_PRECONDITION" in err and rid in err and "earliest window" in err
    dry = await cli.json("reserve", "org/b", "--gpus", "1", "--start", "+3h", "--duration", "600",
                         "--dry-run")  # fmt: skip
    assert dry["dry_run"] and dry["reservation"]["placements"]
    out = await cli.ok("reservation", "cancel", rid)
    assert "cancelled" in out
    assert table(await cli.ok("reservations", "--state", "scheduled")) == []
    code, _, err = await cli("reserve", "org/a", "--gpus", "1", "--start", "+1h")
    assert code == 2 and "--end or --duration" in err


async def test_cli_use_a_reservation(cli: Cli) -> None:
    """A window that begins now: work naming it runs in its GPUs at once."""
    booked = await cli.json("reserve", "org", "--gpus", "4", "--start", "now", "--duration", "600")
    r = booked["reservation"]
    assert r["state"] == "RESERVATION_STATE_ACTIVE"
    alloc = await cli.json("allocate", "org/a", "--gpus", "4", "--reservation", r["id"])
    assert alloc["state"] == "ALLOCATION_STATE_ALLOCATED"
    assert alloc["placements"][0]["gpu_indices"] == r["placements"][0]["gpu_indices"]
    code, _, err = await cli("allocate", "org2", "--gpus", "1", "--reservation", r["id"])
    assert code == 1 and "PERMISSION_DENIED" in err


def test_parse_time() -> None:
    assert parse_time("now", 100.0) == 100.0
    assert parse_time("+90m", 100.0) == 100.0 + 5400
    assert parse_time("+2h", 0.0) == 7200 and parse_time("+1d", 0.0) == 86400
    assert parse_time("+30", 0.0) == 30
    assert parse_time("2026-12-24T08:00:00Z") == datetime(2026, 12, 24, 8, tzinfo=UTC).timestamp()
    with pytest.raises(ValueError):
        parse_time("tomorrow")


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl binary not installed")
async def test_readme_reservation_examples_run(server: RunningServer) -> None:
    """The README's Reservations grpcurl examples, with the dates moved to an hour ahead."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = re.search(r"## Reservations\n.*?```sh\n(.*?)```", text, re.S)
    assert section, "README lost its Reservations examples"
    commands, pending = [], ""
    for line in section.group(1).splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += (" " if pending else "") + line.rstrip().removesuffix("\\").rstrip()
        if not line.rstrip().endswith("\\") and pending.count("'") % 2 == 0:
            commands.append(pending)
            pending = ""
    assert len(commands) == 6
    start = time.time() + 3600
    rid = ""
    for command in commands:
        command = command.replace("2026-12-24T08:00:00Z", rfc3339(start))
        command = command.replace("2026-12-24T12:00:00Z", rfc3339(start + 4 * 3600))
        argv = shlex.split(command.replace("127.0.0.1:50051", f"127.0.0.1:{server.port}"))
        argv = [str(GRPCURL)] + [a.replace("r-5f0c2a9e1b7d4c3a", rid) for a in argv[1:]]
        if "Watch" in command:
            argv[1:1] = ["-max-time", "1"]
        proc = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True)
        if "Watch" in command:
            assert "RESERVATION_EVENT_TYPE_CREATED" in proc.stdout, proc.stderr
            continue
        assert proc.returncode == 0, f"{command}\n{proc.stderr}"
        found = re.search(r'"id": "(r-[0-9a-f]+)"', proc.stdout)
        rid = rid or (found.group(1) if found else "")
    assert rid
