"""The engine: every change to the cluster goes through here.

One path for every write: a command builds its own transaction (the state changed in
memory, an event per change taking the next revision, the objects to store), the store
commits it (group-committed with whatever else is queued) and only then do watchers see
it and the caller get its answer. The parts, one concern each:

- `txn`: transactions, revisions, commit waiters, what is durable;
- `recovery`: the read model rebuilt from the store on start;
- `timers`: keyed, cancellable deadlines on the monotonic clock;
- `transitions`: what placing, ending, preempting, losing work means, as events;
- `scheduling`: full passes off the event loop, quick decisions on it, the plan applier;
- `allocations`, `nodes`, `quotas`, `reservations`: the commands per resource;
- `core`: the wiring, the life cycle and the background loops.

The read model (`rmgrpc.state.ClusterState`) is what servicers read through.
"""

from rmgrpc.engine.allocations import AllocationCommands
from rmgrpc.engine.nodes import GpuReport, NodeCommands
from rmgrpc.engine.quotas import QuotaCommands
from rmgrpc.engine.reservations import ReservationCommands


class Engine(AllocationCommands, NodeCommands, QuotaCommands, ReservationCommands):
    """Owns the cluster state. Servicers call its methods; nothing else writes state."""


__all__ = ["Engine", "GpuReport"]
