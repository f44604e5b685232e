"""What a node agent must start and stop, decided from allocation events and lists.

`Reconciler` is pure: no I/O, no clock, no gRPC. It keeps the set of allocations this
node has started and the last revision it has applied, and turns each event (or, after a
relist, the whole list) into `Start`/`Stop` actions. It is level-based: an allocation is
started when it is ALLOCATED with a placement on this node and has not been started yet,
and stopped when it was started and no longer is — so each action happens once however
events are repeated, and a relist converges whatever was missed. `AgentState` is what an
agent persists between runs so that a restart repeats nothing.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from rmgrpc.v1 import allocator_pb2

_STATE_VERSION = 1


@dataclass(frozen=True, slots=True)
class Start:
    """Start the work of `allocation_id` on this node's GPUs `gpu_indices`."""

    allocation_id: str
    tenant: str
    gpu_indices: tuple[int, ...]
    revision: int

    def describe(self) -> str:
        gpus = ",".join(map(str, self.gpu_indices)) or "none"
        return (
            f"start {self.allocation_id} tenant={self.tenant} gpus={gpus} "
            f"(revision {self.revision})"
        )


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop the work of `allocation_id`; `reason` says why (its end state, or that it left)."""

    allocation_id: str
    reason: str
    revision: int

    def describe(self) -> str:
        return f"stop {self.allocation_id} ({self.reason}) (revision {self.revision})"


Action = Start | Stop


@dataclass(slots=True)
class AgentState:
    """What survives an agent restart: the node, the last applied revision, and the
    allocations whose work it has started."""

    node_id: str
    revision: int = 0
    started: set[str] = field(default_factory=set)

    def save(self, path: Path) -> None:
        """Write atomically (temp file, fsync, rename): a crash leaves the old or the new."""
        path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps(
            {
                "version": _STATE_VERSION,
                "node_id": self.node_id,
                "revision": self.revision,
                "started": sorted(self.started),
            },
            indent=2,
        )
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(body + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path, node_id: str) -> AgentState | None:
        """The state saved at `path`, or None when there is none yet. Raises ValueError
        for a file that is not an agent state, or belongs to another node."""
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not an agent state file ({error})") from None
        if not isinstance(raw, dict) or raw.get("version") != _STATE_VERSION:
            raise ValueError(f"{path}: not an agent state file (version {_STATE_VERSION})")
        if raw.get("node_id") != node_id:
            raise ValueError(f"{path}: state of node {raw.get('node_id')!r}, not {node_id!r}")
        return cls(node_id, int(raw["revision"]), {str(i) for i in raw["started"]})


class Reconciler:
    """Turns allocation events and relists into start/stop actions, exactly once each."""

    def __init__(self, node_id: str, state: AgentState | None = None) -> None:
        self.node_id = node_id
        self._state = AgentState(node_id)
        if state is not None:
            self._state.revision = state.revision
            self._state.started = set(state.started)

    @property
    def revision(self) -> int:
        """The last revision applied; resume a watch at ``revision + 1``."""
        return self._state.revision

    @property
    def started(self) -> frozenset[str]:
        """The allocations whose work is running here."""
        return frozenset(self._state.started)

    def state(self) -> AgentState:
        """A copy of the state to persist."""
        return AgentState(self.node_id, self._state.revision, set(self._state.started))

    def on_event(self, event: allocator_pb2.AllocationEvent) -> list[Action]:
        """Apply one event; events at or below `revision` were applied already: no action."""
        if event.revision <= self._state.revision:
            return []
        self._state.revision = event.revision
        if event.type == allocator_pb2.ALLOCATION_EVENT_TYPE_PROGRESS:
            return []
        return self._converge(event.allocation, event.revision)

    def on_relist(
        self, allocations: Iterable[allocator_pb2.Allocation], revision: int
    ) -> list[Action]:
        """Apply a complete list of this node's allocations read at `revision`: start what
        is live here and not started, stop what is started and no longer live here."""
        live = {a.id: a for a in allocations if self._live_here(a)}
        actions: list[Action] = []
        for alloc_id in sorted(self._state.started - live.keys()):
            self._state.started.discard(alloc_id)
            actions.append(Stop(alloc_id, "no longer placed here", revision))
        for alloc_id in sorted(live.keys() - self._state.started):
            actions += self._converge(live[alloc_id], revision)
        self._state.revision = max(self._state.revision, revision)
        return actions

    def advance(self, revision: int) -> None:
        """Note that every event up to `revision` has been seen (e.g. watch progress)."""
        self._state.revision = max(self._state.revision, revision)

    def _live_here(self, alloc: allocator_pb2.Allocation) -> bool:
        return alloc.state == allocator_pb2.ALLOCATION_STATE_ALLOCATED and any(
            p.node_id == self.node_id for p in alloc.placements
        )

    def _converge(self, alloc: allocator_pb2.Allocation, revision: int) -> list[Action]:
        running = alloc.id in self._state.started
        if self._live_here(alloc) and not running:
            self._state.started.add(alloc.id)
            gpus = tuple(
                i for p in alloc.placements if p.node_id == self.node_id for i in p.gpu_indices
            )
            return [Start(alloc.id, alloc.tenant, gpus, revision)]
        if running and not self._live_here(alloc):
            self._state.started.discard(alloc.id)
            return [Stop(alloc.id, _why_not_here(alloc), revision)]
        return []


def _why_not_here(alloc: allocator_pb2.Allocation) -> str:
    if alloc.state == allocator_pb2.ALLOCATION_STATE_ALLOCATED:
        return "moved off this node"
    name = allocator_pb2.AllocationState.Name(alloc.state).removeprefix("ALLOCATION_STATE_")
    return name.lower() + (f": {alloc.state_reason}" if alloc.state_reason else "")
