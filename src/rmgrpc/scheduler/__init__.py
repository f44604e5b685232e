"""The scheduler core: pure and synchronous, a snapshot in and decisions out.

- `snapshot`: what goes in (`Snapshot`, `SchedulerConfig`) and comes out (`Decisions`, `DryRun`).
- `placement`: feasibility filters, bin-packing scores, the capacity view gangs go onto.
- `fairshare`: the tenant tree, quota limits and guarantees, weighted DRF, fair shares.
- `preemption`: whom to preempt so a pending gang can run.
- `cycle`: one scheduling pass (`run_cycle`) and `dry_run`.
- `simulate`: decisions applied to in-memory copies over time (tests, benchmark).

No I/O, no gRPC, no asyncio here; the engine owns time, state and persistence.
"""

from rmgrpc.scheduler.cycle import dry_run, run_cycle
from rmgrpc.scheduler.fairshare import TenantUsage, check_admissible, tenant_usage
from rmgrpc.scheduler.snapshot import (
    Admission,
    Decisions,
    DryRun,
    PendingStatus,
    Preemption,
    SchedulerConfig,
    Snapshot,
)

__all__ = [
    "Admission",
    "Decisions",
    "DryRun",
    "PendingStatus",
    "Preemption",
    "SchedulerConfig",
    "Snapshot",
    "TenantUsage",
    "check_admissible",
    "dry_run",
    "run_cycle",
    "tenant_usage",
]
