"""The scheduling pass worker: a child process that runs full passes for the server.

    python -m rmgrpc.passworker FD

A full pass over a deep queue is seconds of pure Python. Run in a thread of the server's
process it holds the GIL against the event loop, and every RPC waits behind it; run here
it has a core of its own. The worker keeps a mirror of what passes read (nodes and live
allocations), so each pass request carries only what changed since the last one, plus
the time, quotas and settings; it answers with a compact `PassResult`.

Speaks pickled messages over the socket inherited as FD (a
`multiprocessing.connection.Connection`): `("pass", Delta)` → `("ok", PassResult)`,
`("dry_run", Delta)` → `("ok", DryRun)` for `Delta.probe`, `("view", Delta)` → `("ok",
ClusterView)` (its revision left 0: the server knows it), or `("error", text)`.
It exits when the server closes the socket (or dies), so it never
outlives it. Only the server's own process writes to the socket: nothing untrusted is
unpickled.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from rmgrpc.model import Allocation, Node
from rmgrpc.scheduler.cycle import dry_run, run_cycle
from rmgrpc.scheduler.result import EstimatePolicy, PassResult, Summariser
from rmgrpc.scheduler.snapshot import DryRun, Snapshot
from rmgrpc.summary import ClusterView

T = TypeVar("T")

# Added to the worker's nice value at its start (lower priority than the server).
WORKER_NICENESS = 10


@dataclass(slots=True)
class Delta:
    """What changed since the worker's last pass (everything when `full`)."""

    full: bool
    nodes: dict[str, Node | None] = field(default_factory=dict)
    allocations: dict[str, Allocation | None] = field(default_factory=dict)
    # Every other field of the `Snapshot` (time, quotas, settings, ...), by name.
    rest: dict[str, Any] = field(default_factory=dict)
    # For a dry run: the request to try.
    probe: Allocation | None = None
    # How start-time estimates are made (the server's settings).
    estimates: EstimatePolicy = field(default_factory=EstimatePolicy)


def apply_delta(nodes: dict[str, Node], allocations: dict[str, Allocation], delta: Delta) -> None:
    """Brings a mirror up to date with `delta` (None marks what is gone)."""
    if delta.full:
        nodes.clear()
        allocations.clear()
    _merge(nodes, delta.nodes)
    _merge(allocations, delta.allocations)


def _merge(mirror: dict[str, T], changes: dict[str, T | None]) -> None:
    for key, value in changes.items():
        if value is None:
            mirror.pop(key, None)
        else:
            mirror[key] = value


def serve(conn: Connection) -> None:
    nodes: dict[str, Node] = {}
    allocations: dict[str, Allocation] = {}
    summarise = Summariser()
    while True:
        try:
            kind, delta = conn.recv()
        except (EOFError, OSError):
            return  # the server went away
        try:
            if delta.full:
                summarise.forget()
            summarise.estimates = delta.estimates
            apply_delta(nodes, allocations, delta)
            snap = Snapshot(nodes=nodes, allocations=allocations, **delta.rest)
            result: PassResult | DryRun | ClusterView
            if kind == "pass":
                started = time.perf_counter()
                decisions = run_cycle(snap)
                result = summarise(decisions, time.perf_counter() - started, snap)
            elif kind == "dry_run":
                if delta.probe is None:
                    raise ValueError("a dry run needs a probe")
                result = dry_run(snap, delta.probe)
            elif kind == "view":
                result = ClusterView.of(snap, 0)
            else:
                raise ValueError(f"unknown request {kind!r}")
        except Exception:
            # The mirror may be half updated: the server resends everything next time.
            nodes.clear()
            allocations.clear()
            answer: tuple[str, object] = ("error", traceback.format_exc())
        else:
            answer = ("ok", result)
        try:
            conn.send(answer)
        except OSError:
            return  # the server went away (stopped) while this pass ran


def snapshot_rest(snap: Snapshot) -> dict[str, Any]:
    """Every field of `snap` but the mirrored nodes and allocations."""
    return {
        f.name: getattr(snap, f.name)
        for f in dataclasses.fields(snap)
        if f.name not in ("nodes", "allocations")
    }


if __name__ == "__main__":
    # Serving first: where cores are short, the kernel runs the server's event loop (and
    # its clients) before a long pass, as Slurm's backfill yields to RPCs. Without it the
    # deep-queue bench's worst Health/Check latencies were the server waiting for a core.
    os.nice(WORKER_NICENESS)
    serve(Connection(int(sys.argv[1])))
