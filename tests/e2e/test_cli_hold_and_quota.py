"""`rmgrpcctl` against a real server: `quota set` changes only the flags given (an
update mask) and honours `--etag`; `allocate --hold` keeps its allocation (with a lease
it renews) until Ctrl-C, then releases it."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import signal
import sys
from collections.abc import AsyncIterator

import pytest

from rmgrpc.server import RunningServer
from rmgrpc.v1 import allocator_pb2 as pb
from rmgrpc.v1.resources_pb2 import Resources
from rmgrpc_client import AsyncClient
from rmgrpc_client.cli import HOLD_LEASE_SECONDS, main

TENANT = "team/a"


@pytest.fixture
async def rm(server: RunningServer) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        yield client


async def ctl(server: RunningServer, *argv: str) -> tuple[int, str, str]:
    """Runs `rmgrpcctl` in a thread (it runs its own event loop) and captures output."""
    out, err = io.StringIO(), io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return main(["--server", f"127.0.0.1:{server.port}", *argv])

    code = await asyncio.to_thread(run)
    return code, out.getvalue(), err.getvalue()


async def test_quota_set_changes_only_the_flags_given(
    server: RunningServer, rm: AsyncClient
) -> None:
    code, _, err = await ctl(
        server, "quota", "set", TENANT, "--guaranteed-gpus", "8", "--limit-gpus", "16",
        "--limit-cpu-millis", "64000", "--budget", "100", "--budget-period", "3600",
    )  # fmt: skip
    assert (code, err) == (0, "")
    code, out, err = await ctl(server, "--json", "quota", "set", TENANT, "--weight", "3")
    assert (code, err) == (0, "")
    q = await rm.get_quota(TENANT)
    assert q.weight == 3 and json.loads(out)["weight"] == 3
    assert (q.guaranteed.gpus, q.limit.gpus, q.limit.cpu_millis) == (8, 16, 64000)
    assert (q.budget.amount, q.budget.period_seconds) == (100, 3600)

    # Only the amount: the period stays.
    assert (await ctl(server, "quota", "set", TENANT, "--budget", "250"))[0] == 0
    q = await rm.get_quota(TENANT)
    assert (q.budget.amount, q.budget.period_seconds) == (250, 3600)

    # Nothing to change is a mistake, not a silent rewrite.
    code, _, err = await ctl(server, "quota", "set", TENANT)
    assert code != 0 and "nothing to change" in err
    assert (await rm.get_quota(TENANT)).revision == q.revision

    # --replace is the old blind replace.
    assert (await ctl(server, "quota", "set", TENANT, "--replace", "--weight", "2"))[0] == 0
    q = await rm.get_quota(TENANT)
    assert q.weight == 2 and not q.guaranteed.HasField("gpus") and not q.HasField("budget")


async def test_quota_set_with_a_stale_etag_fails_and_changes_nothing(
    server: RunningServer, rm: AsyncClient
) -> None:
    read = await rm.update_quota(TENANT, guaranteed=Resources(gpus=2))
    await rm.update_quota(TENANT, weight=5)  # someone else, meanwhile
    code, _, err = await ctl(
        server, "quota", "set", TENANT, "--guaranteed-gpus", "4", "--etag", read.etag
    )
    assert code == 1 and "FAILED_PRECONDITION" in err and "changed since it was read" in err
    q = await rm.get_quota(TENANT)
    assert (q.guaranteed.gpus, q.weight) == (2, 5)
    code, _, _ = await ctl(
        server, "quota", "set", TENANT, "--guaranteed-gpus", "4", "--etag", q.etag
    )
    assert code == 0 and (await rm.get_quota(TENANT)).guaranteed.gpus == 4


async def _hold(server: RunningServer, *flags: str) -> asyncio.subprocess.Process:
    """`rmgrpcctl --json allocate team/a --gpus 1 --hold …` as a process of its own."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rmgrpc_client.cli", "--server", f"127.0.0.1:{server.port}",
        "--json", "allocate", TENANT, "--gpus", "1", "--hold", *flags,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def _held_id(proc: asyncio.subprocess.Process) -> str:
    """The id the holding CLI announces on stderr once its allocation is placed."""
    assert proc.stderr is not None
    async with asyncio.timeout(30):
        note = (await proc.stderr.readline()).decode()
    assert note.startswith("holding a-"), note
    return note.split()[1].rstrip(":")


async def test_allocate_hold_keeps_it_until_ctrl_c_then_releases(
    server: RunningServer, rm: AsyncClient
) -> None:
    proc = await _hold(server)
    try:
        alloc_id = await _held_id(proc)
        held = await rm.get_allocation(alloc_id)
        assert held.state == pb.ALLOCATION_STATE_ALLOCATED
        assert held.lease_seconds == HOLD_LEASE_SECONDS  # a lease the CLI keeps alive
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
        assert proc.returncode == 0, err
        assert json.loads(out)["id"] == alloc_id
        assert f"{alloc_id} released" in err.decode()
        assert (await rm.get_allocation(alloc_id)).state == pb.ALLOCATION_STATE_RELEASED
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_allocate_hold_ends_with_an_error_when_the_allocation_ends(
    server: RunningServer, rm: AsyncClient
) -> None:
    proc = await _hold(server, "--lease", "3")  # a short lease: it checks every second
    try:
        alloc_id = await _held_id(proc)
        await rm.release(alloc_id)  # ended by someone else (as a preemption would)
        async with asyncio.timeout(30):
            _, err = await proc.communicate()
        assert proc.returncode == 1
        assert f"allocation {alloc_id} is RELEASED" in err.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
