"""Where full scheduling passes run: a worker process (the default) or a worker thread.

The process runner is the default since the core was shown order-independent
(`tests/unit/test_order_independence.py`: shuffled snapshots give identical decisions;
its mirror once took new allocations in a set's order, which with an order-dependent
core let a tenant pass its limit). On the load bench it is what keeps Health/Check p99
under 20 ms while a 10,000-deep queue is scheduled again and again, and Allocate at
0.7-1.4x its empty-queue rate with 30,000 pending (the thread runner: 26 ms and 0.30x).
The worker runs at nice +10 (`passworker.WORKER_NICENESS`): where cores are short, the
kernel serves RPCs before a long pass.

`[scheduler] pass_runner` chooses:

- `process`: `rmgrpc.passworker` in a child process, which mirrors nodes and live
  allocations; each pass sends only what changed since the last (the read model notes
  what it touches, see `ClusterState.touched`). The pass gets a core of its own instead
  of holding the GIL against the event loop, which is what keeps RPC latency flat while
  a deep queue is scheduled. If the child dies it is started again and sent everything.
- `thread`: `asyncio.to_thread` in the server's own process; no child to start, which
  suits embedding the engine (the simulator, unit tests).

Either way the engine receives a `PassResult`. Pickling, sending and receiving happen in
a worker thread too, so the event loop never waits on them.

The runner also builds the cluster summary (`summary.ClusterView.of`) for readers that can
wait (the metrics gauges): at 30,000 pending it is ~0.3 s of pure Python, which in a
thread of the server's process held the GIL against the event loop every refresh and
made the worst Health/Check latencies of the deep-queue bench.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Protocol

from rmgrpc.model import Allocation
from rmgrpc.passworker import Delta, snapshot_rest
from rmgrpc.scheduler import cycle as scheduler_cycle
from rmgrpc.scheduler.result import EstimatePolicy, PassResult, Summariser
from rmgrpc.scheduler.snapshot import Decisions, DryRun, Snapshot
from rmgrpc.state import ClusterState
from rmgrpc.summary import ClusterView

log = logging.getLogger("rmgrpc.engine")

RUNNERS = ("process", "thread")


SnapshotTaker = Callable[[], Snapshot]
# A snapshot and the revision it was taken at.
ViewTaker = Callable[[], tuple[Snapshot, int]]


class PassRunner(Protocol):
    async def run(self, state: ClusterState, take: SnapshotTaker) -> PassResult:
        """One full pass on the snapshot `take()` makes of `state` when the runner is
        ready for it (so nothing changes between the snapshot and what is sent)."""
        ...

    async def dry_run(self, state: ClusterState, take: SnapshotTaker, probe: Allocation) -> DryRun:
        """What `probe` would get on the snapshot `take()` makes."""
        ...

    async def view(self, state: ClusterState, take: ViewTaker) -> ClusterView:
        """The cluster summary of the snapshot `take()` makes (with its revision)."""
        ...

    async def estimates_made(self) -> None:
        """Until estimates begun after the last pass (if any) are handed over."""
        ...

    def close(self) -> None: ...


EstimatesSink = Callable[[dict[str, tuple[float | None, str]]], None]


class ThreadRunner:
    """Passes in a worker thread. With `on_estimates`, start-time estimates (seconds of
    work at a deep queue) are made after the pass in a thread of their own, one at a time,
    and handed to `on_estimates` on the event loop: the pass's waiters never wait for
    them. Without it they are made inline and carried by the pass's result."""

    def __init__(
        self, estimates: EstimatePolicy | None = None, on_estimates: EstimatesSink | None = None
    ) -> None:
        self._summarise = Summariser(estimates)
        self._state: ClusterState | None = None
        self._on_estimates = on_estimates
        self._estimating: asyncio.Task[None] | None = None

    async def run(self, state: ClusterState, take: SnapshotTaker) -> PassResult:
        if state is not self._state:
            self._state = state
            self._summarise.forget()
        snap = take()
        later = self._on_estimates is not None
        # One estimate at a time: while one runs, passes do not ask whether another is due.
        idle = self._estimating is None or self._estimating.done()

        def work() -> tuple[PassResult, Decisions | None]:
            started = time.perf_counter()
            decisions = scheduler_cycle.run_cycle(snap)
            seconds = time.perf_counter() - started
            if not later:
                return self._summarise(decisions, seconds, snap), None
            due = idle and self._summarise.estimate_due(decisions, snap.now)
            return self._summarise(decisions, seconds), decisions if due else None

        result, due = await asyncio.to_thread(work)
        if due is not None:
            self._estimating = asyncio.create_task(self._estimate(snap, due))
        return result

    async def _estimate(self, snap: Snapshot, decisions: Decisions) -> None:
        try:
            made = await asyncio.to_thread(self._summarise.estimate, snap, decisions)
        except Exception:
            log.exception("start-time estimates failed; trying again after a later pass")
            return
        assert self._on_estimates is not None
        self._on_estimates(made)

    async def dry_run(self, state: ClusterState, take: SnapshotTaker, probe: Allocation) -> DryRun:
        return await asyncio.to_thread(scheduler_cycle.dry_run, take(), probe)

    async def view(self, state: ClusterState, take: ViewTaker) -> ClusterView:
        snap, revision = take()
        return await asyncio.to_thread(ClusterView.of, snap, revision)

    async def estimates_made(self) -> None:
        task = self._estimating
        if task is not None:
            await asyncio.shield(task)

    def close(self) -> None:
        if self._estimating is not None:
            self._estimating.cancel()


class PassWorkerError(Exception):
    """The worker process failed a pass (its traceback is the message)."""


class ProcessRunner:
    def __init__(self, estimates: EstimatePolicy | None = None) -> None:
        self._estimates = estimates or EstimatePolicy()
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        # The state the worker mirrors; another object (a restart) means a full resend.
        self._state: ClusterState | None = None
        # One exchange at a time on the socket (a pass and a dry run may overlap).
        self._lock = asyncio.Lock()

    def _start(self) -> Connection:
        ours, theirs = socket.socketpair()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "rmgrpc.passworker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self._conn = Connection(os.dup(ours.fileno()))
        ours.close()
        self._state = None
        log.debug("scheduling pass worker started (pid %d)", self._proc.pid)
        return self._conn

    def _delta(self, state: ClusterState, snap: Snapshot) -> Delta:
        """What the worker lacks of `snap`; the touched marks are consumed."""
        full = state is not self._state or state.touched_overflow
        state.mirrored = True
        state.touched_overflow = False
        nodes = snap.nodes if full else {n: snap.nodes.get(n) for n in sorted(state.touched_nodes)}
        # In creation order, so new entries join the mirror in the order they joined the
        # read model: the mirror iterates exactly as the snapshot does.
        order = sorted(
            state.touched, key=lambda aid: (a.seq if (a := snap.allocations.get(aid)) else 0, aid)
        )
        allocs = snap.allocations if full else {a: snap.allocations.get(a) for a in order}
        state.touched.clear()
        state.touched_nodes.clear()
        self._state = state
        return Delta(
            full=full,
            nodes=dict(nodes),
            allocations=dict(allocs),
            rest=snapshot_rest(snap),
            estimates=self._estimates,
        )

    def _exchange(self, request: str, delta: Delta) -> tuple[str, object]:
        conn = self._conn if self._conn is not None else self._start()
        conn.send((request, delta))
        reply: tuple[str, object] = conn.recv()
        return reply

    async def _ask(
        self, request: str, state: ClusterState, take: SnapshotTaker, probe: Allocation | None
    ) -> object:
        async with self._lock:
            # Snapshot and delta together, with no await between: what the worker is
            # sent is exactly what changed up to the snapshot.
            snap = take()
            delta = self._delta(state, snap)
            delta.probe = probe
            try:
                kind, body = await asyncio.to_thread(self._exchange, request, delta)
            except (EOFError, OSError) as exc:
                # The worker died (killed, out of memory): start another, send it all.
                log.warning("scheduling pass worker lost (%s); starting another", exc)
                self.close()
                delta.full = True
                delta.nodes, delta.allocations = dict(snap.nodes), dict(snap.allocations)
                self._state = state
                kind, body = await asyncio.to_thread(self._exchange, request, delta)
            if kind != "ok":
                self._state = None  # the worker dropped its mirror: send it all next time
                raise PassWorkerError(str(body))
            return body

    async def run(self, state: ClusterState, take: SnapshotTaker) -> PassResult:
        body = await self._ask("pass", state, take, None)
        assert isinstance(body, PassResult)
        return body

    async def dry_run(self, state: ClusterState, take: SnapshotTaker, probe: Allocation) -> DryRun:
        body = await self._ask("dry_run", state, take, probe)
        assert isinstance(body, DryRun)
        return body

    async def view(self, state: ClusterState, take: ViewTaker) -> ClusterView:
        """Built in the worker from its mirror: no GIL held against the event loop."""
        revision = 0

        def snap() -> Snapshot:
            nonlocal revision
            taken, revision = take()
            return taken

        body = await self._ask("view", state, snap, None)
        assert isinstance(body, ClusterView)
        body.revision = revision
        return body

    async def estimates_made(self) -> None:
        return None  # made in the worker with the pass, returned with its result

    def close(self) -> None:
        conn, proc = self._conn, self._proc
        self._conn = self._proc = None
        self._state = None
        if conn is not None:
            conn.close()  # the worker sees EOF and exits
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def make_runner(
    kind: str, estimates: EstimatePolicy | None = None, on_estimates: EstimatesSink | None = None
) -> PassRunner:
    """`on_estimates`: where a thread runner hands estimates it made after a pass (the
    process runner makes them in its worker, right after the pass, and returns them with
    the pass's result)."""
    if kind == "thread":
        return ThreadRunner(estimates, on_estimates)
    if kind == "process":
        return ProcessRunner(estimates)
    raise ValueError(f"pass_runner must be one of {', '.join(RUNNERS)}, not {kind!r}")
