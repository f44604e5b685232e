"""`rmgrpcctl` against a real rmgrpc server on 127.0.0.1: what an operator types in a
day's work, what it prints, its JSON, and its exit codes.

The server runs in this process (2 simulated nodes of 8 GPUs); each CLI call runs in a
worker thread with its own event loop, as the installed command would.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from rmgrpc.server import RunningServer
from rmgrpc_client import _top
from rmgrpc_client._async_client import AsyncClient
from rmgrpc_client.cli import main
from tests.e2e.helpers import eventually


class Cli:
    """Runs `rmgrpcctl` against the test's server and returns (exit code, stdout, stderr)."""

    def __init__(self, server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
        self.target = f"127.0.0.1:{server.port}"
        self.capsys = capsys

    async def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = await asyncio.to_thread(main, [*argv, "--server", self.target])
        out, err = self.capsys.readouterr()
        return code, out, err

    async def ok(self, *argv: str) -> str:
        code, out, err = await self(*argv)
        assert (code, err) == (0, ""), f"rmgrpcctl {' '.join(argv)}: {code} {err}"
        return out

    async def json(self, *argv: str) -> Any:
        return json.loads(await self.ok(*argv, "-o", "json"))


@pytest.fixture
def cli(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(server, capsys)


def table(text: str) -> list[dict[str, str]]:
    """A CLI table as dicts by header; cells are split on runs of two or more spaces, so
    the last column (REASON) may hold single spaces."""
    header, *rows = text.rstrip("\n").split("\n")
    names = header.split()
    return [dict(zip(names, re.split(r"\s{2,}", row.strip()), strict=False)) for row in rows]


async def allocate(cli: Cli, tenant: str, gpus: int) -> dict[str, Any]:
    doc: dict[str, Any] = await cli.json("allocate", tenant, "--gpus", str(gpus))
    return doc


async def test_a_day_of_work(cli: Cli) -> None:
    out = await cli.ok("quota", "set", "org/team", "--guaranteed-gpus", "4", "--limit-gpus", "16")
    assert "guaranteed: gpus=4" in out
    team = await allocate(cli, "org/team", 8)
    demo = await allocate(cli, "demo", 8)
    waiting = await allocate(cli, "org/team", 8)
    assert [a["state"] for a in (team, demo)] == ["ALLOCATION_STATE_ALLOCATED"] * 2
    assert waiting["state"] == "ALLOCATION_STATE_PENDING"
    # grpcurl's field names, snake_case, in -o json
    assert {"request_id", "create_time", "create_revision"} <= set(team)
    assert {"node_id", "gpu_indices"} <= set(team["placements"][0])

    rows = table(await cli.ok("list"))
    assert {(r["ID"], r["STATE"]) for r in rows} == {
        (team["id"], "ALLOCATED"),
        (demo["id"], "ALLOCATED"),
        (waiting["id"], "PENDING"),
    }
    assert all(re.fullmatch(r"\d+s", r["AGE"]) for r in rows)

    async def queued() -> list[dict[str, str]]:
        return table(await cli.ok("queue"))

    # The next scheduling pass ranks it: position 1, with a reason a person can act on.
    (head,) = await eventually(queued, lambda rows: bool(rows) and rows[0]["POS"] == "1")
    assert (head["ID"], head["TENANT"], head["SHAPE"]) == (waiting["id"], "org/team", "8xgpu")
    assert re.fullmatch(r"\d+s", head["WAITING"]) and head["REASON"] != "-"

    nodes = table(await cli.ok("nodes"))
    assert [(n["STATE"], n["GPU-FREE"], n["GPU-TOTAL"]) for n in nodes] == [("READY", "0", "8")] * 2
    assert all(n["HEARTBEAT"].endswith("ago") for n in nodes)

    tenants = {r["TENANT"]: r for r in table(await cli.ok("tenants"))}
    assert list(tenants) == ["demo", "org", "org/team"]
    assert (tenants["org/team"]["GUARANTEED"], tenants["org/team"]["LIMIT"]) == ("4", "16")
    assert (tenants["org/team"]["HELD"], tenants["org/team"]["PENDING"]) == ("8", "8")
    assert (tenants["demo"]["HELD"], tenants["demo"]["OLDEST-WAIT"]) == ("8", "-")
    assert re.fullmatch(r"\d+s", tenants["org/team"]["OLDEST-WAIT"])
    doc = await cli.json("tenants", "org")
    assert [t["tenant"] for t in doc["tenants"]] == ["org", "org/team"]

    # Releasing demo's makes room: the waiting one is placed; ended ones leave `list`.
    out = await cli.ok("release", demo["id"])
    assert re.search(r"^state: +RELEASED$", out, re.M)
    await eventually(
        lambda: cli.json("get", waiting["id"]),
        lambda a: a["state"] == "ALLOCATION_STATE_ALLOCATED",
    )
    live = {r["ID"] for r in table(await cli.ok("list"))}
    assert live == {team["id"], waiting["id"]}
    every = {r["ID"]: r["STATE"] for r in table(await cli.ok("list", "--all"))}
    assert every[demo["id"]] == "RELEASED"
    assert await cli.ok("queue", "--no-headers") == ""

    # All of a tenant's at once, without the question in a script.
    rows = table(await cli.ok("release", "--tenant", "org", "--all", "--yes"))
    assert {(r["ID"], r["STATE"]) for r in rows} == {
        (team["id"], "RELEASED"),
        (waiting["id"], "RELEASED"),
    }
    assert "allocations" not in await cli.json("list", "--tenant", "org")


async def test_mistakes_get_hints_and_exit_codes(cli: Cli) -> None:
    await allocate(cli, "org/team", 1)
    code, out, err = await cli("usage", "org/tema")
    assert (code, out) == (1, "")
    assert err == "error: no such tenant 'org/tema' (did you mean org/team?)\n"
    code, _, err = await cli("list", "--tenant", "org/teem")
    assert code == 1 and "did you mean org/team?" in err
    code, _, err = await cli("tenants", "orgg")
    assert code == 1 and "no such tenant 'orgg'" in err and "org" in err
    assert "held:" in await cli.ok("usage", "org")  # a parent of a known tenant is known

    code, out, err = await cli("get", "a-missing")
    assert (code, out) == (1, "")
    assert err.startswith("error: NOT_FOUND: ")
    code, _, err = await cli("allocate", "no such/ten ant!", "--gpus", "1")
    assert code == 1 and err.startswith("error: INVALID_ARGUMENT: ") and err.count("\n") == 1
    code, _, err = await cli("list", "--state", "sleeping")
    assert code == 2 and "choose from" in err


async def test_top_once_and_yaml(cli: Cli) -> None:
    a = await allocate(cli, "org/team", 2)
    out = await cli.ok("top", "--once")
    for title in ("Nodes", "Tenants", "Queue (admission order)"):
        assert title in out
    assert "org/team" in out and "GPUs 2 held, 14 free of 16" in out
    # Into a pipe, the queue's reasons are not folded at rich's default 80 columns.
    await allocate(cli, "org/team", 8)
    waiting = await allocate(cli, "org/team", 8)
    reason = (
        await eventually(
            lambda: cli.json("get", waiting["id"]), lambda a: bool(a.get("pending_reason"))
        )
    )["pending_reason"]
    assert len(reason) > 60
    out = await cli.ok("top", "--once")
    assert any(reason[:100] in line for line in out.splitlines()), out

    out = await cli.ok("get", a["id"], "-o", "yaml")
    assert f"id: {a['id']}" in out.splitlines()
    assert "state: ALLOCATION_STATE_ALLOCATED" in out.splitlines()


async def test_top_live_view_refreshes_on_the_alternate_screen(
    cli: Cli, server: RunningServer
) -> None:
    await allocate(cli, "org/team", 2)
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120, height=50)
    async with AsyncClient(cli.target) as client:
        await _top.run(client, cli.target, interval=0, once=False, console=console, frames=2)
    shown = screen.getvalue()
    assert shown.startswith("\x1b[?1049h")  # full screen: the alternate buffer, like top
    assert shown.rstrip().endswith("\x1b[?1049l")  # and the terminal restored after
    assert shown.count("Queue (admission order)") == 2  # the first frame and one refresh


async def test_readme_tables_have_the_columns_the_cli_prints(cli: Cli) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## The CLI: `rmgrpcctl`") :]
    shown = re.findall(r"^\$ rmgrpcctl (.+)\n(.+)\n", section, re.M)
    assert {command for command, _ in shown} >= {"tenants", "queue", "nodes"}
    await allocate(cli, "ml/research", 1)
    for command, header in shown:
        printed = await cli.ok(*command.split())
        assert printed.splitlines()[0].split() == header.split(), command


async def test_node_work_cordon_gpus_drain_with_requeue_and_quota_etag(cli: Cli) -> None:
    """An operator's node chores: pin one bad GPU out, drain a node (one job opted out of
    requeueing: only the other is replaced), and read a quota's etag for a safe update."""
    node, other = (n["id"] for n in (await cli.json("nodes"))["nodes"])
    out = await cli.ok("cordon", node, "--gpu", "3", "--gpu", "5", "--reason", "fan noise")
    gpus = {g.get("index", 0): g for g in (await cli.json("node", node))["gpus"]}
    assert {i for i, g in gpus.items() if g["health"] != "GPU_HEALTH_HEALTHY"} == {3, 5}
    assert re.search(r"^state: +READY$", out, re.M)  # the node itself stays schedulable
    await cli.ok("uncordon", node, "--gpu", "5")
    gpus = {g.get("index", 0): g for g in (await cli.json("node", node))["gpus"]}
    assert {i for i, g in gpus.items() if g["health"] != "GPU_HEALTH_HEALTHY"} == {3}

    # Both nodes' free GPUs, so the two jobs land on `node` only if it is the only room.
    filler = await cli.json("allocate", "ops", "--gpus", "8")
    assert filler["placements"][0]["node_id"] == other
    keep = await cli.json("allocate", "org/team", "--gpus", "4")
    gone = await cli.json("allocate", "org/team", "--gpus", "2", "--no-requeue")
    assert gone["no_requeue"] is True and "no_requeue" not in keep
    out = await cli.ok("drain", node, "--grace", "1")
    asked = re.search(r"^asked to leave: (.+)$", out, re.M)
    assert asked and set(asked.group(1).split(", ")) == {keep["id"], gone["id"]}
    requeued = re.search(r"^requeued as: +(\S+)$", out, re.M)
    assert requeued, out
    replacement = await cli.json("get", requeued.group(1))
    assert replacement["requeued_from"] == keep["id"]
    code, _, err = await cli("allocate", "org/team", "--gpus", "1", "--no-requeue", "--dry-run")
    assert code == 1 and "--no-requeue and --dry-run" in err

    await cli.ok("quota", "set", "org/team", "--limit-gpus", "16")
    etag = (await cli.json("quota", "get", "org/team"))["etag"]
    assert re.search(rf"^etag: +{re.escape(etag)}$", await cli.ok("quota", "get", "org/team"), re.M)
