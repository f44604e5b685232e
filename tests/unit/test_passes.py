"""Where passes run: the worker process's mirror gives the same decisions as a pass on the
full snapshot, through adds, changes and removals, a dead worker and a new state."""

from __future__ import annotations

import dataclasses
import os
import signal

import pytest

from rmgrpc import passworker
from rmgrpc.engine.passes import ProcessRunner, ThreadRunner, make_runner
from rmgrpc.model import Allocation, AllocationState, NodeState, Placement, Shape
from rmgrpc.scheduler import cycle as scheduler_cycle
from rmgrpc.scheduler.cycle import run_cycle
from rmgrpc.scheduler.result import EstimatePolicy, Summariser
from rmgrpc.scheduler.simulate import make_node
from rmgrpc.scheduler.snapshot import Decisions, PendingStatus, Snapshot
from rmgrpc.state import ClusterState
from rmgrpc.summary import ClusterView

NOW = 1_000.0


def _state(nodes: int = 3) -> ClusterState:
    state = ClusterState()
    for i in range(nodes):
        state.put_node(make_node(f"n{i}", gpus=4))
    return state


def _request(state: ClusterState, i: int, gpus: int, tenant: str = "org/a") -> Allocation:
    a = Allocation(
        id=f"a{i:03d}", tenant=tenant, count=1, shape=Shape.of(gpus), create_time=NOW, seq=i
    )
    state.add(a, NOW)
    return a


def _snapshot(state: ClusterState) -> Snapshot:
    return Snapshot(
        now=NOW,
        nodes=dict(state.frozen_nodes),
        allocations=dict(state.frozen),
        quotas=dict(state.quotas),
    )


def _expected(state: ClusterState) -> Decisions:
    return run_cycle(_snapshot(state))


async def _check(runner: ProcessRunner, state: ClusterState) -> None:
    want = _expected(state)
    got = await runner.run(state, lambda: _snapshot(state))
    assert got.plan.admissions == want.admissions
    assert got.plan.preemptions == want.preemptions
    assert got.positions == {aid: st.position for aid, st in want.pending.items()}
    assert not state.touched and not state.touched_nodes


async def test_the_worker_mirror_follows_every_kind_of_change() -> None:
    state = _state()
    runner = ProcessRunner()
    try:
        for i in range(8):
            _request(state, i, gpus=1 + i % 4)
        await _check(runner, state)  # everything sent
        # Place one (a change), cancel one (a removal), add some, cordon a node.
        placed = state.live["a000"]
        placed.state = AllocationState.ALLOCATED
        placed.placements = (Placement("n0", (0,)),)
        state.hold(placed)
        state.changed(placed)
        gone = state.live["a001"]
        gone.state = AllocationState.CANCELLED
        state.free(gone)
        state.changed(gone)
        for i in range(8, 12):
            _request(state, i, gpus=2, tenant="org/ab")
        node = state.nodes["n1"]
        state.put_node(dataclasses.replace(node, state=NodeState.CORDONED))
        await _check(runner, state)  # only the changes sent
        state.remove_node("n2")
        await _check(runner, state)
    finally:
        runner.close()


async def test_a_dead_worker_is_replaced_and_sent_everything() -> None:
    state = _state()
    runner = ProcessRunner()
    try:
        for i in range(5):
            _request(state, i, gpus=4)
        await _check(runner, state)
        assert runner._proc is not None
        os.kill(runner._proc.pid, signal.SIGKILL)
        runner._proc.wait()
        _request(state, 5, gpus=1)
        await _check(runner, state)
    finally:
        runner.close()


async def test_a_new_state_is_sent_whole() -> None:
    """After a restart the engine has another `ClusterState`: nothing of the old mirror
    may leak into the new one's passes."""
    runner = ProcessRunner()
    try:
        first = _state()
        for i in range(4):
            _request(first, i, gpus=4)
        await _check(runner, first)
        second = _state(nodes=1)
        _request(second, 9, gpus=1)
        await _check(runner, second)
    finally:
        runner.close()


async def test_thread_and_process_runners_agree() -> None:
    state = _state()
    for i in range(10):
        _request(state, i, gpus=1 + i % 3)
    thread, process = ThreadRunner(), ProcessRunner()
    try:
        a = await thread.run(state, lambda: _snapshot(state))
        for i in range(10):
            state.touched.add(f"a{i:03d}")
        b = await process.run(state, lambda: _snapshot(state))
        assert (a.plan, a.positions, a.reasons) == (b.plan, b.positions, b.reasons)
    finally:
        process.close()


async def test_the_worker_builds_the_cluster_summary_a_thread_would() -> None:
    """The gauges' cluster summary, built in the worker from its mirror (kept up to date
    by the same deltas as passes, before and after one), is the summary of the snapshot,
    labelled with the revision the server took it at."""
    state = _state()
    for i in range(12):
        _request(state, i, gpus=1 + i % 3, tenant=("org/a", "org/ab", "lab")[i % 3])
    runner = ProcessRunner()
    try:
        for step in range(3):
            got = await runner.view(state, lambda step=step: (_snapshot(state), 40 + step))
            assert got == ClusterView.of(_snapshot(state), 40 + step)
            if step == 0:
                await runner.run(state, lambda: _snapshot(state))
            else:
                _request(state, 100 + step, gpus=2, tenant="org/ab")
        assert got.pending_count > 0 and set(got.tenants) >= {"org/a", "org/ab", "lab"}
    finally:
        runner.close()


async def test_the_worker_runs_at_a_lower_priority_than_the_server() -> None:
    """Where cores are short the kernel serves RPCs before a long pass."""
    state = _state()
    _request(state, 0, gpus=1)
    runner = ProcessRunner()
    try:
        await runner.run(state, lambda: _snapshot(state))
        assert runner._proc is not None
        ours = os.getpriority(os.PRIO_PROCESS, 0)
        worker = os.getpriority(os.PRIO_PROCESS, runner._proc.pid)
        assert worker == min(19, ours + passworker.WORKER_NICENESS)
    finally:
        runner.close()


def test_unknown_runner_is_refused() -> None:
    with pytest.raises(ValueError, match="pass_runner"):
        make_runner("fork")


def test_results_name_only_changed_reasons() -> None:
    summarise = Summariser()

    def decisions(**reasons: str) -> Decisions:
        pending = {aid: PendingStatus(r, i + 1) for i, (aid, r) in enumerate(reasons.items())}
        return Decisions(pending=pending)

    first = summarise(decisions(a="full", b="full"))
    assert first.reasons == {"a": "full", "b": "full"}
    assert first.positions == {"a": 1, "b": 2} and first.pending == 2
    second = summarise(decisions(b="full", a="over quota", c="full"))
    assert second.reasons == {"a": "over quota", "c": "full"}
    assert second.positions == {"b": 1, "a": 2, "c": 3}
    summarise.forget()
    assert summarise(decisions(b="full")).reasons == {"b": "full"}
    assert summarise(decisions(b="full")).plan.pending == {}


async def test_a_dry_run_shares_the_mirror_with_passes() -> None:
    """A dry run in the worker consumes the same change marks as passes: the pass after
    it still sees every change."""
    state = _state(nodes=2)
    runner = ProcessRunner()
    try:
        _request(state, 0, gpus=4)
        probe = Allocation(id="probe", tenant="org/a", count=1, shape=Shape.of(2), seq=99)
        got = await runner.dry_run(state, lambda: _snapshot(state), probe)
        want = scheduler_cycle.dry_run(_snapshot(state), probe)
        assert got == want and got.placements
        _request(state, 1, gpus=4)
        await _check(runner, state)
    finally:
        runner.close()


def test_new_allocations_reach_the_mirror_in_creation_order() -> None:
    """The mirror must iterate as the snapshot does: the core reads creation order from
    it (a mirror in another order once let a tenant's GPUs pass its limit)."""
    state = _state()
    runner = ProcessRunner()
    runner._delta(state, _snapshot(state))  # the first, full delta
    ids = [_request(state, i, gpus=1).id for i in range(20, 40)]
    state.touched = set(reversed(ids))  # a set's order is not the creation order
    delta = runner._delta(state, _snapshot(state))
    assert list(delta.allocations) == ids


def test_change_marks_are_kept_only_for_a_mirror_and_bounded() -> None:
    """Without a worker process nothing is recorded; with one, a server whose passes are
    rare drops the marks past a bound and sends the mirror everything next time."""
    state = _state()
    _request(state, 0, gpus=1)
    assert not state.touched and not state.touched_nodes
    runner = ProcessRunner()
    assert runner._delta(state, _snapshot(state)).full
    a = state.live["a000"]
    for _ in range(5000):
        state.changed(a)
    assert len(state.touched) == 1
    for i in range(1, 4200):
        _request(state, i, gpus=1)
        a = state.live[f"a{i:03d}"]
        a.state = AllocationState.CANCELLED
        state.free(a)
    assert state.touched_overflow and len(state.touched) < 4200
    assert runner._delta(state, _snapshot(state)).full
    assert not state.touched_overflow


async def test_a_thread_runner_hands_estimates_over_after_the_pass() -> None:
    """Estimates (seconds of work at a deep queue) never hold up a pass's result: they are
    made afterwards, one at a time, and handed to the sink; without a sink, inline."""
    state = _state()
    for i in range(20):
        _request(state, i, gpus=1)
    got: list[dict[str, tuple[float | None, str]]] = []
    policy = EstimatePolicy(depth=50, every=60.0)
    runner = ThreadRunner(policy, on_estimates=got.append)
    first = await runner.run(state, lambda: _snapshot(state))
    assert first.estimates is None and first.pending == 8
    await runner.run(state, lambda: _snapshot(state))  # not due again within `every`
    await runner.estimates_made()
    assert len(got) == 1 and set(got[0]) == set(first.positions)
    inline = await ThreadRunner(policy).run(state, lambda: _snapshot(state))
    assert inline.estimates == got[0]


def test_the_worker_ends_quietly_when_the_server_is_gone_before_its_answer() -> None:
    """A server that stops while a pass runs closes its end: the worker's answer meets a
    broken pipe, and it ends without a traceback on the server's stderr."""

    class Gone:
        def __init__(self) -> None:
            self.asked = False

        def recv(self) -> tuple[str, object]:
            if self.asked:
                raise EOFError
            self.asked = True
            return ("pass", object())  # not a Delta: the worker answers with an error

        def send(self, answer: object) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    conn = Gone()
    passworker.serve(conn)  # type: ignore[arg-type]
    assert conn.asked
