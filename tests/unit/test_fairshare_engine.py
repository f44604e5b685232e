"""Fair share through the engine: decayed usage survives a restart (it is derived from the
durable allocations, nothing extra is written), and requests no node could ever host are
answered at once (REJECTED, or PENDING with the reason and placed once a node that fits
registers)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from rmgrpc import codec
from rmgrpc.clock import ManualClock
from rmgrpc.engine import Engine
from rmgrpc.gpu.simulated import simulated_nodes
from rmgrpc.model import Allocation, AllocationState, Quota, Resources, Shape
from rmgrpc.store import Store
from rmgrpc.v1 import quota_pb2, resources_pb2
from tests.conftest import make_settings

HALF = 3600.0


@pytest.fixture
async def engines(tmp_path: Path) -> AsyncIterator[Any]:
    """Starts engines on one database file; each start is a restart of the last."""
    made: list[tuple[Engine, Store]] = []

    async def start(clock: ManualClock, **overrides: Any) -> Engine:
        if made:
            await made[-1][0].stop()
            await made[-1][1].close()
        settings = make_settings(tmp_path, fair_share_half_life_seconds=HALF, **overrides)
        store = await Store.open(str(tmp_path / "rmgrpc.db"))
        engine = Engine(settings, store, clock)
        await engine.start(simulated_nodes(2, 8, now=clock.now()))
        made.append((engine, store))
        return engine

    yield start
    if made:
        await made[-1][0].stop()
        await made[-1][1].close()


def test_quota_rows_from_before_weight_presence_and_lending_limits_decode() -> None:
    """A stored quota written before `weight` had presence (never 0 then) and before
    `lending_limit` existed decodes to weight 1 and no lending limit."""
    old = quota_pb2.Quota(tenant="org", guaranteed=resources_pb2.Resources(gpus=4))
    old.ClearField("weight")
    q = codec.quota_from_proto(quota_pb2.Quota.FromString(old.SerializeToString()))
    assert q.weight == 1.0
    assert q.lending_limit == Resources()
    zero = codec.quota_to_proto(Quota("t", weight=0.0, lending_limit=Resources(gpus=1)))
    back = codec.quota_from_proto(quota_pb2.Quota.FromString(zero.SerializeToString()))
    assert (back.weight, back.lending_limit.gpus) == (0.0, 1)


def request(tenant: str, gpus: int, count: int = 1, model: str = "", **kw: Any) -> Allocation:
    shape = Shape(gpus=gpus, gpu_model=model)
    return Allocation(id="", tenant=tenant, count=count, shape=shape, **kw)


async def test_decayed_usage_survives_a_restart(engines: Any) -> None:
    """a holds 8 GPUs for one half-life and releases: its recent usage is 4 GPUs, and
    still 4 after a restart (then 2 one half-life later, on the fake clock)."""
    clock = ManualClock()
    engine = await engines(clock)
    a, _ = await engine.allocate(request("a", 8), dry_run=False)
    assert a.state == AllocationState.ALLOCATED
    clock.advance(HALF)
    await engine.release(a.id)
    usage, _ = await engine.usage("a")
    assert usage.recent.gpus == 4
    assert usage.half_life_seconds == HALF
    assert "recent usage" in usage.order_text

    engine = await engines(ManualClock(start=clock.now()))
    usage, _ = await engine.usage("a")
    assert usage.recent.gpus == 4
    engine.clock.advance(HALF)  # type: ignore[attr-defined]
    usage, _ = await engine.usage("a")  # same revision, but time moved: read afresh
    assert usage.recent.gpus == 2


async def test_never_fits_is_rejected_at_once(engines: Any) -> None:
    engine = await engines(ManualClock())
    a, _ = await engine.allocate(request("a", 16), dry_run=False)
    assert a.state == AllocationState.REJECTED
    assert a.state_reason.startswith("never fits: no registered node could ever host")
    assert "2 have fewer than 16 GPUs of one model in total" in a.state_reason
    assert "healthy" not in a.state_reason
    model, _ = await engine.allocate(request("a", 1, model="B200"), dry_run=False)
    assert model.state == AllocationState.REJECTED
    assert "2 have no B200 GPUs" in model.state_reason
    gang, _ = await engine.allocate(request("a", 8, count=3), dry_run=False)
    assert gang.state == AllocationState.REJECTED
    assert "could host only 2 of 3 replicas" in gang.state_reason
    # Same request_id, same answer; nothing was placed.
    again, _ = await engine.allocate(request("a", 16, request_id="r1"), dry_run=False)
    same, _ = await engine.allocate(request("a", 16, request_id="r1"), dry_run=False)
    assert same.id == again.id
    usage, _ = await engine.usage("a")
    assert usage.held.gpus == 0


async def test_never_fits_pending_waits_for_a_node_that_fits(engines: Any) -> None:
    """With never_fits = "pending" the request waits with the reason; a node that fits
    registering later is seen by the next pass, which places it."""
    clock = ManualClock()
    engine = await engines(clock, never_fits="pending")
    a, _ = await engine.allocate(request("a", 16), dry_run=False)
    assert a.state == AllocationState.PENDING
    assert a.pending_reason.startswith("never fits: no registered node could ever host")
    await engine.schedule_now()
    assert engine.get_allocation(a.id).pending_reason.startswith("never fits")
    big = simulated_nodes(1, 16, prefix="big", now=clock.now())[0]
    await engine.register_node(big)
    await engine.schedule_now()
    placed = engine.get_allocation(a.id)
    assert placed.state == AllocationState.ALLOCATED
    assert placed.placements[0].node_id == "big-0"
