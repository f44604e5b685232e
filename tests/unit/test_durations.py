"""Hard durations through the engine on a manual clock: the configured default and limit,
the hard end counted from placement, and expiry as an EXPIRED event with its reason."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from rmgrpc.clock import ManualClock
from rmgrpc.config import ConfigError
from rmgrpc.engine import Engine
from rmgrpc.errors import InvalidArgument
from rmgrpc.gpu.simulated import simulated_nodes
from rmgrpc.model import Allocation, AllocationEventType, AllocationState, EventKind, Shape
from rmgrpc.services.allocator import allocation_request
from rmgrpc.store import Store
from rmgrpc.v1 import allocator_pb2
from rmgrpc.v1.resources_pb2 import Shape as ShapePb
from tests.conftest import make_settings

HOUR = 3600


@pytest.fixture
async def engine_factory(tmp_path: Path) -> AsyncIterator[Any]:
    made: list[tuple[Engine, Store]] = []

    async def make(nodes: int = 1, gpus: int = 8, **overrides: Any) -> tuple[Engine, ManualClock]:
        clock = ManualClock()
        store = await Store.open(":memory:")
        engine = Engine(make_settings(tmp_path, db=":memory:", **overrides), store, clock)
        await engine.start(simulated_nodes(nodes, gpus, now=clock.now()))
        await engine.schedule_now()
        made.append((engine, store))
        return engine, clock

    yield make
    for engine, store in made:
        await engine.stop()
        await store.close()


def request(gpus: int = 8, **kw: Any) -> Allocation:
    return Allocation(id="", tenant="t", count=1, shape=Shape(gpus=gpus), **kw)


async def events_of(engine: Engine, allocation_id: str) -> list[allocator_pb2.AllocationEvent]:
    await engine.wait_committed()
    return [
        allocator_pb2.AllocationEvent(
            revision=e.revision,
            type=e.type,  # type: ignore[arg-type]
            allocation=allocator_pb2.Allocation.FromString(e.data),
        )
        for e in await engine.store.read_events(0, 10_000)
        if e.kind == EventKind.ALLOCATION and e.object_id == allocation_id
    ]


async def test_the_default_duration_expires_work_at_its_hard_end(engine_factory: Any) -> None:
    engine, clock = await engine_factory(default_max_duration_seconds=2 * HOUR)
    a, _ = await engine.allocate(request(), dry_run=False)
    assert a.state == AllocationState.ALLOCATED and a.max_duration_seconds == 2 * HOUR
    assert a.max_end_time == clock.now() + 2 * HOUR
    clock.advance(2 * HOUR - 1)
    assert not engine.fire_timers()
    assert a.state == AllocationState.ALLOCATED
    clock.advance(1)
    assert engine.fire_timers()
    assert a.state == AllocationState.EXPIRED
    assert a.state_reason == f"ran past max_duration_seconds ({2 * HOUR} s)"
    events = await events_of(engine, a.id)
    last = events[-1]
    assert int(last.type) == AllocationEventType.ENDED
    assert last.allocation.state == allocator_pb2.ALLOCATION_STATE_EXPIRED
    assert last.allocation.state_reason == a.state_reason
    # Every event of a placed allocation names its hard end.
    placed = [e for e in events if e.allocation.placements]
    assert placed and all(e.allocation.max_end_time.seconds == int(a.max_end_time) for e in placed)


async def test_an_asked_duration_wins_over_the_default(engine_factory: Any) -> None:
    engine, clock = await engine_factory(default_max_duration_seconds=8 * HOUR)
    a, _ = await engine.allocate(request(max_duration_seconds=60), dry_run=False)
    assert a.max_duration_seconds == 60
    clock.advance(60)
    engine.fire_timers()
    assert a.state == AllocationState.EXPIRED


async def test_the_hard_end_counts_from_placement_not_from_the_request(
    engine_factory: Any,
) -> None:
    """Time spent PENDING is not run time: the frees-at time estimates rest on."""
    engine, clock = await engine_factory(default_max_duration_seconds=HOUR)
    first, _ = await engine.allocate(request(), dry_run=False)
    second, _ = await engine.allocate(request(), dry_run=False)
    assert second.state == AllocationState.PENDING and second.max_end_time is None
    clock.advance(HOUR)
    engine.fire_timers()
    await engine.schedule_now()
    assert first.state == AllocationState.EXPIRED
    assert second.state == AllocationState.ALLOCATED
    assert second.max_end_time == clock.now() + HOUR
    clock.advance(HOUR - 1)
    engine.fire_timers()
    assert second.state == AllocationState.ALLOCATED
    clock.advance(1)
    engine.fire_timers()
    assert second.state == AllocationState.EXPIRED


async def test_no_default_means_no_hard_end(engine_factory: Any) -> None:
    engine, clock = await engine_factory()
    a, _ = await engine.allocate(request(), dry_run=False)
    assert a.max_duration_seconds == 0 and a.max_end_time is None
    clock.advance(400 * 86400)
    engine.fire_timers()
    assert a.state == AllocationState.ALLOCATED


async def test_the_limit_is_the_default_when_no_default_is_set(engine_factory: Any) -> None:
    """Slurm's rule: a job with no time limit gets the partition's MaxTime."""
    engine, _ = await engine_factory(max_allowed_duration_seconds=4 * HOUR)
    a, _ = await engine.allocate(request(), dry_run=False)
    assert a.max_duration_seconds == 4 * HOUR and a.max_end_time is not None


def test_a_request_above_the_limit_is_refused_naming_it() -> None:
    msg = allocator_pb2.AllocateRequest(
        tenant="t", count=1, shape=ShapePb(gpus=1), max_duration_seconds=4 * HOUR + 1
    )
    with pytest.raises(InvalidArgument) as err:
        allocation_request(msg, 86400, max_duration_seconds=4 * HOUR)
    [violation] = err.value.violations
    assert violation.field == "max_duration_seconds"
    assert "max_allowed_duration_seconds" in violation.description
    assert str(4 * HOUR) in violation.description
    msg.max_duration_seconds = 4 * HOUR
    assert allocation_request(msg, 86400, max_duration_seconds=4 * HOUR).max_duration_seconds == (
        4 * HOUR
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"default_max_duration_seconds": -1}, "default_max_duration_seconds"),
        ({"max_allowed_duration_seconds": 400 * 86400}, "max_allowed_duration_seconds"),
        (
            {"default_max_duration_seconds": 10, "max_allowed_duration_seconds": 5},
            "default_max_duration_seconds must be <= max_allowed_duration_seconds",
        ),
    ],
)
def test_bad_duration_settings_stop_start_up(
    tmp_path: Path, overrides: dict[str, int], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        make_settings(tmp_path, **overrides)
