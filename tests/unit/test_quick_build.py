"""The quick view and ledger are built off the event loop, from the state's frozen
copies, and what is taken and given back while they are built is followed when they are
installed: the result equals a view and ledger built on the spot."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from rmgrpc.engine import scheduling
from rmgrpc.model import AllocationState
from tests.e2e.test_invariants import check_quick_ledger, check_quick_view
from tests.unit.test_quick_view import request, started


def gated_builds(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Builds in worker threads wait for the returned event before they begin (views
    built on the event loop, as the checks build them, do not)."""
    gate = threading.Event()
    real = scheduling.CapacityView

    def gated(*args: Any) -> Any:
        if threading.current_thread() is not threading.main_thread():
            assert gate.wait(10)
        return real(*args)

    monkeypatch.setattr(scheduling, "CapacityView", gated)
    return gate


async def test_what_changes_while_the_view_is_built_is_followed_when_it_is_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with started(tmp_path, 1, min_runtime_seconds=0.0, preemption_grace_seconds=30.0) as (
        eng,
        clock,
    ):
        sched = eng.scheduling
        a, _ = await eng.allocate(request(4), dry_run=False)
        b, _ = await eng.allocate(request(4), dry_run=False)
        high, _ = await eng.allocate(request(4, priority=5), dry_run=False)
        await eng.schedule_now()
        victim = a if a.state == AllocationState.PREEMPTED else b
        kept = b if victim is a else a
        assert victim.state == AllocationState.PREEMPTED and sched.state.holds(victim)
        waiting, _ = await eng.allocate(request(4), dry_run=False)
        assert waiting.state == AllocationState.PENDING

        # A node changed: view and ledger go; the next build is held at its start.
        sched.changed()
        gate = gated_builds(monkeypatch)
        build = sched._start_build()
        assert build.ledger

        # Meanwhile: the victim's grace ends (its GPUs go to `high`), `kept` is released
        # and the next pass places `waiting` there.
        clock.advance(31)
        eng.fire_timers()
        await eng.schedule_now()
        assert high.state == AllocationState.ALLOCATED
        await eng.release(kept.id)
        await eng.schedule_now()
        assert waiting.state == AllocationState.ALLOCATED
        assert sched._quick is None and len(build.ops) >= 4

        gate.set()
        await asyncio.wait_for(build.done, 10)
        assert sched._quick is not None and sched._build is None
        check_quick_view(eng)
        check_quick_ledger(eng)
        assert sched._leaving_ids == set()


async def test_a_build_made_stale_by_a_node_change_is_not_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with started(tmp_path, 1) as (eng, _):
        sched = eng.scheduling
        await eng.allocate(request(2), dry_run=False)
        sched.changed()
        gate = gated_builds(monkeypatch)
        stale = sched._start_build()
        sched.changed()  # the copies it was made from are out of date
        gate.set()
        await asyncio.wait_for(stale.done, 10)
        assert sched._quick is None
        # The next request builds again, and is decided on what is current.
        placed, _ = await eng.allocate(request(2), dry_run=False)
        assert placed.state == AllocationState.ALLOCATED
        assert sched._quick is not None
        check_quick_view(eng)
        check_quick_ledger(eng)
