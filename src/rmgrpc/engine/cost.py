"""Cost accrual and budgets: what each tenant spent, kept durable through engine txns.

Accrual: an allocation costs from its placement (`allocate_time`) until it gives its
capacity back, never past its `max_end_time`: its end for RELEASED/EXPIRED/LOST; for
PREEMPTED the end of its grace period (it holds the GPUs until then), charged in full
when it is preempted, since that end is known then. `tick` (every
`cost_accrual_interval_seconds` of the injectable clock) charges every ALLOCATED
allocation up to now and writes the changed ledger rows, budget counters and the
watermark `accrued_through` in one txn; an allocation's final charge goes into the txn
that ends it. After a restart (kill -9 included) the next tick charges running work from
the stored watermark, so no time is lost; reports lag by at most one interval.

Stored as objects (the store's generic table, in the same txns as events): `COST` rows
keyed `[tenant, model, day]` (the ledger: spend and resource-hours per UTC day), one
`COST` row `accrued_through`, and per budgeted tenant a `BUDGET` object: its subtree's
spend in the current period and the highest alert sent in it. Crossing 50/75/90/100 % of
a budget appends a `BUDGET` event (type = the percentage, data a `BudgetAlert`, streamed
by WatchAllocations with `budget_alerts`) once per period and tells `alert_observers`
(the metric). A spent budget with `stop_running` ends its subtree's
running work (EXPIRED) at the tick that finds it spent.

Budgets count spend from when they are set (or their period changes); an amount of 0
means no budget. A period is `period_seconds` long from the epoch, or a calendar day, ISO
week or month in UTC (`Budget.period`)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from rmgrpc import codec, cost
from rmgrpc.cost import Amounts, BudgetLeft, Held, Period, ancestors
from rmgrpc.engine.txn import Txn
from rmgrpc.errors import QuotaExceeded, QuotaViolation
from rmgrpc.model import Allocation, AllocationState, BudgetPeriod, EventKind
from rmgrpc.state import in_subtree
from rmgrpc.store import LoadedState, StoreError
from rmgrpc.v1 import quota_pb2

if TYPE_CHECKING:
    from rmgrpc.engine.core import EngineCore

log = logging.getLogger("rmgrpc.engine")

WATERMARK = "accrued_through"

LedgerKey = tuple[str, str, float]  # tenant, GPU model ('' for none), UTC day start

_RUNNING_OR_PREEMPTED = (AllocationState.ALLOCATED, AllocationState.PREEMPTED)


@dataclass(slots=True)
class BudgetSpend:
    """A budgeted tenant's subtree spend in its current period."""

    tenant: str
    period_seconds: int
    period_start: float
    spent: float = 0.0
    # Highest threshold (percent) alerted in this period; 0: none yet.
    alerted: int = 0
    # The calendar period (a `BudgetPeriod` value; 0: `period_seconds` applies). Rows
    # stored before calendar periods lack it: 0.
    calendar: int = 0

    @property
    def period(self) -> Period:
        return Period(self.period_seconds, BudgetPeriod(self.calendar))

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()


@dataclass(frozen=True, slots=True)
class Alert:
    tenant: str
    percent: int
    spent: float
    amount: float


class Costs:
    """The cost ledger and budget counters of one engine."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.prices = core.settings.price_table()
        self.interval = core.settings.cost_accrual_interval_seconds
        self.ledger: dict[LedgerKey, Amounts] = {}
        self.budgets: dict[str, BudgetSpend] = {}
        # Every ALLOCATED allocation is charged up to here (durably, with this value).
        self.accrued_through = 0.0
        # Allocations charged past the watermark (by a final charge or since the tick).
        self._accrued: dict[str, float] = {}
        # What each running allocation holds, priced (its placement does not change while
        # it runs): a tick over many allocations then costs little per allocation.
        self._held: dict[str, tuple[list[Held], float]] = {}
        self._dirty_rows: set[LedgerKey] = set()
        self._dirty_budgets: set[str] = set()
        self._alerts: list[Alert] = []
        # Each budget's current period start as of the last tick: when one moves on, work
        # the scheduler held back for that budget may start.
        self._periods: dict[str, float] = {}
        # Told of each alert once its txn is built (metrics).
        self.alert_observers: list[Callable[[Alert], None]] = []

    # -- start ---------------------------------------------------------------------------

    def load(self, loaded: LoadedState, path: str) -> None:
        """The ledger, the budget counters and the watermark as stored; StoreError (one
        line) for a row that does not decode."""
        for kind in (EventKind.COST, EventKind.BUDGET):
            for object_id, data in loaded.objects.get(kind, {}).items():
                try:
                    self._load(kind, object_id, data)
                except (ValueError, TypeError) as exc:
                    raise StoreError(
                        f"database {path}: stored {kind.value} {object_id!r} cannot be "
                        f"decoded ({exc}); restore a backup, or move the file away to start "
                        "empty"
                    ) from None

    def _load(self, kind: EventKind, object_id: str, data: bytes) -> None:
        doc = json.loads(data)
        if kind == EventKind.BUDGET:
            spend = BudgetSpend(**doc)
            self.budgets[spend.tenant] = spend
        elif object_id == WATERMARK:
            self.accrued_through = float(doc)
        else:
            tenant, model, day = json.loads(object_id)
            self.ledger[(str(tenant), str(model), float(day))] = Amounts(*map(float, doc))

    async def loop(self) -> None:
        """Ticks every interval of the engine's clock (checked each second, so a manual
        clock moved by a test is followed too)."""
        clock = self.core.clock
        due = clock.monotonic() + self.interval
        while True:
            await asyncio.sleep(min(1.0, max(0.0, due - clock.monotonic())))
            if clock.monotonic() < due:
                continue
            due = clock.monotonic() + self.interval
            try:
                txn = self.tick()
                await self.core.committer.wait(txn)
            except Exception as exc:
                if self.core.failed is not None:
                    return  # the store failed: the server is stopping
                log.exception("cost accrual failed; retrying at the next interval: %s", exc)

    # -- accrual -------------------------------------------------------------------------

    def tick(self) -> Txn:
        """Charges every running allocation up to now, in one txn (submitted; wait on it)."""
        now = self.core.clock.now()
        with self.core.committer.transaction() as txn:
            for a in self.core.state.live.values():
                if a.state == AllocationState.ALLOCATED:
                    self._charge(a, now)
            self._accrued.clear()
            self.accrued_through = max(self.accrued_through, now)
            watermark = json.dumps(self.accrued_through).encode()
            txn.puts.append((EventKind.COST, WATERMARK, watermark))
            self._write(txn)
            self._stop_spent(txn, now)
        self._new_periods(now)
        return txn

    def _new_periods(self, now: float) -> None:
        """Asks for a scheduling pass when a budget period began since the last tick."""
        periods = {
            tenant: Period.of(q.budget).start(now)
            for tenant, q in self.core.state.quotas.items()
            if q.budget is not None and q.budget.amount > 0
        }
        began = any(self._periods.get(t, start) != start for t, start in periods.items())
        self._periods = periods
        if began:
            self.core.scheduling.changed()

    def _stop_spent(self, txn: Txn, now: float) -> None:
        """Ends the running work under each spent budget that says `stop_running`."""
        for tenant, quota in list(self.core.state.quotas.items()):
            if quota.budget is None or not quota.budget.stop_running:
                continue
            spent, amount = self.budget_spend(tenant, now)
            if amount <= 0 or spent < amount:
                continue
            why = f"budget of {tenant!r} is spent ({spent:.2f} of {amount:.2f}): stop_running"
            for a in list(self.core.state.live.values()):
                if a.state == AllocationState.ALLOCATED and in_subtree(a.tenant, tenant):
                    self.core.transitions.end(txn, a, AllocationState.EXPIRED, why)

    def ending(self, txn: Txn, a: Allocation) -> None:
        """`a` stops running: its last charge goes into `txn`, the txn that ends it.

        Called while it is ALLOCATED (ending) or just PREEMPTED (its grace included)."""
        if a.allocate_time is None or a.state not in _RUNNING_OR_PREEMPTED:
            return
        until = self.core.clock.now()
        preempted = a.state == AllocationState.PREEMPTED
        if preempted and a.grace_end_time is not None and self.core.state.holds(a):
            until = a.grace_end_time  # it holds its GPUs through the grace
        self._charge(a, until)
        self._accrued[a.id] = float("inf")  # charged in full: later ticks skip it
        self._held.pop(a.id, None)
        self._write(txn)

    def held(self, a: Allocation) -> list[Held]:
        """What `a` holds, by the GPU model of each replica's GPUs (its CPU and memory go
        with its first GPU's model; '' for a replica with none)."""
        by_model: dict[str, list[int]] = {}
        nodes = self.core.state.nodes
        for p in a.placements:
            node = nodes.get(p.node_id)
            models = {g.index: g.model for g in node.gpus} if node is not None else {}
            named = [models.get(i, a.shape.gpu_model) for i in p.gpu_indices]
            for m in named:
                by_model.setdefault(m, [0, 0, 0])[0] += 1
            first = by_model.setdefault(named[0] if named else "", [0, 0, 0])
            first[1] += a.shape.cpu_millis
            first[2] += a.shape.memory_bytes
        return [Held(m, g, c, b) for m, (g, c, b) in sorted(by_model.items())]

    def _charge(self, a: Allocation, until: float) -> None:
        assert a.allocate_time is not None
        if a.max_end_time is not None:
            # Never past its hard end, however late the expiry timer fires.
            until = min(until, a.max_end_time)
        start = self._accrued.get(a.id, max(a.allocate_time, self.accrued_through))
        if until <= start:
            return
        priced = self._held.get(a.id)
        if priced is None:
            held = self.held(a)
            rate = sum(cost.hourly(h, self.prices).cost for h in held) / cost.HOUR_SECONDS
            priced = self._held[a.id] = (held, rate)
        held, rate = priced
        for (model, day), amounts in cost.accrue(held, self.prices, start, until).items():
            key = (a.tenant, model, day)
            self.ledger.setdefault(key, Amounts()).add(amounts)
            self._dirty_rows.add(key)
        self._accrued[a.id] = until
        for tenant in ancestors(a.tenant):
            self._charge_budget(tenant, start, until, rate)

    def _charge_budget(self, tenant: str, start: float, until: float, rate: float) -> None:
        quota = self.core.state.quotas.get(tenant)
        budget = quota.budget if quota is not None else None
        if budget is None or budget.amount <= 0:
            return
        period = Period.of(budget)
        spend = self._spend_of(tenant, period, start)
        for piece_start, seconds in cost.split(start, until, period):
            if piece_start > spend.period_start:
                spend.period_start, spend.spent, spend.alerted = piece_start, 0.0, 0
            elif piece_start < spend.period_start:
                continue  # a period already over: it no longer counts against the budget
            spend.spent += rate * seconds
        # A raised budget re-arms the thresholds spend is now below.
        spend.alerted = cost.reached(spend.spent, budget.amount, spend.alerted)
        for percent in cost.alerts_due(spend.spent, budget.amount, spend.alerted):
            spend.alerted = percent
            self._alerts.append(Alert(tenant, percent, spend.spent, budget.amount))
        self._dirty_budgets.add(tenant)

    def _spend_of(self, tenant: str, period: Period, at: float) -> BudgetSpend:
        spend = self.budgets.get(tenant)
        if spend is None or spend.period != period:
            # New budget, or a new period (length or calendar): counting starts afresh.
            spend = BudgetSpend(
                tenant, period.seconds, period.start(at), calendar=int(period.calendar)
            )
            self.budgets[tenant] = spend
        return spend

    def _write(self, txn: Txn) -> None:
        for key in sorted(self._dirty_rows):
            row = self.ledger[key]
            data = json.dumps(
                [row.cost, row.gpu_hours, row.cpu_core_hours, row.memory_gib_hours]
            ).encode()
            txn.puts.append((EventKind.COST, json.dumps([key[0], key[1], key[2]]), data))
        self._dirty_rows.clear()
        for tenant in sorted(self._dirty_budgets):
            txn.puts.append((EventKind.BUDGET, tenant, self.budgets[tenant].encode()))
        self._dirty_budgets.clear()
        alerts, self._alerts = self._alerts, []
        for alert in alerts:
            spend = self.budgets[alert.tenant]
            msg = quota_pb2.BudgetAlert(
                tenant=alert.tenant,
                percent=alert.percent,
                spent=alert.spent,
                amount=alert.amount,
                period_seconds=spend.period_seconds,
                period=quota_pb2.BudgetPeriod.ValueType(spend.calendar),
            )
            start = codec.ts(spend.period_start)
            if spend.period.resets and start is not None:
                msg.period_start.CopyFrom(start)
            # The event carries the alert; the stored object stays the counter above.
            self.core.committer.emit(
                txn, EventKind.BUDGET, alert.percent, alert.tenant,
                _const(msg.SerializeToString()), alert.tenant, persist=False,
            )  # fmt: skip
            log.warning(
                "tenant %s spent %.2f: %d %% of its budget %.2f",
                alert.tenant, alert.spent, alert.percent, alert.amount,
            )  # fmt: skip
            for observe in self.alert_observers:
                observe(alert)

    # -- reads ---------------------------------------------------------------------------

    def budget_spend(self, tenant: str, now: float) -> tuple[float, float]:
        """(spend in the current period, budget amount) of a budgeted tenant's subtree;
        (0, 0) without a budget."""
        left = self.budget_left(tenant, now)
        return (left.spent, left.amount) if left is not None else (0.0, 0.0)

    def budget_left(self, tenant: str, now: float) -> BudgetLeft | None:
        """A budgeted tenant's spend in its current period; None without a budget."""
        quota = self.core.state.quotas.get(tenant)
        budget = quota.budget if quota is not None else None
        if budget is None or budget.amount <= 0:
            return None
        period = Period.of(budget)
        spend = self.budgets.get(tenant)
        if spend is None or spend.period != period or spend.period_start != period.start(now):
            return BudgetLeft(0.0, budget.amount, period)
        return BudgetLeft(spend.spent, budget.amount, period)

    def budgets_left(self, now: float) -> dict[str, BudgetLeft]:
        """Every budgeted tenant's spend in its current period (for the scheduler)."""
        out = {}
        for tenant in self.core.state.quotas:
            left = self.budget_left(tenant, now)
            if left is not None:
                out[tenant] = left
        return out

    def usage(self, tenant: str, now: float) -> tuple[float, float]:
        """GetUsage's (cost, budget_used_fraction): the subtree's spend in the current
        budget period; without a budget, in the current UTC day (fraction 0)."""
        spent, amount = self.budget_spend(tenant, now)
        if amount > 0:
            return spent, spent / amount
        today = cost.period_start(now, cost.DAY_SECONDS)
        total = sum(
            row.cost
            for (t, _, day), row in self.ledger.items()
            if day == today and in_subtree(t, tenant)
        )
        return total, 0.0

    def check_budget(self, request: Allocation) -> None:
        """QuotaExceeded when a budget of the tenant or an ancestor cannot cover `request`
        for its `max_duration_seconds` (with none: once the budget is spent)."""
        now = self.core.clock.now()
        budgets = {t: b for t in ancestors(request.tenant) if (b := self.budget_left(t, now))}
        block = cost.budget_block(request, budgets, self.prices)
        if block is not None:
            tenant, why = block
            raise QuotaExceeded([QuotaViolation(f"budget:{tenant}", why)])


def _const(data: bytes) -> Callable[[int], bytes]:
    """An event encoder for data that does not name its revision."""
    return lambda revision: data


@dataclass(slots=True)
class CostReport:
    """Spend over whole UTC days [start, end): per tenant (own and with its subtree), per
    GPU model, per day."""

    start: float
    end: float
    own: dict[str, Amounts]
    subtree: dict[str, Amounts]
    models: dict[str, Amounts]
    days: dict[float, Amounts]
    total: Amounts


def report(
    ledger: dict[LedgerKey, Amounts], tenant: str, start: float | None, end: float
) -> CostReport:
    """The ledger's rows of `tenant`'s subtree (all when empty) on the days overlapping
    [start, end); `start` None: from the first day recorded."""
    first = cost.period_start(start, cost.DAY_SECONDS) if start is not None else None
    own: dict[str, Amounts] = {}
    subtree: dict[str, Amounts] = {}
    models: dict[str, Amounts] = {}
    days: dict[float, Amounts] = {}
    total = Amounts()
    if tenant:
        subtree[tenant] = Amounts()
    for (t, model, day), row in ledger.items():
        if not in_subtree(t, tenant) or day >= end or (first is not None and day < first):
            continue
        own.setdefault(t, Amounts()).add(row)
        for a in ancestors(t):
            if not in_subtree(a, tenant):
                break
            subtree.setdefault(a, Amounts()).add(row)
        models.setdefault(model, Amounts()).add(row)
        days.setdefault(day, Amounts()).add(row)
        total.add(row)
    if first is None:
        first = min(days, default=cost.period_start(end, cost.DAY_SECONDS))
    last = cost.period_start(end, cost.DAY_SECONDS)
    last = last if last == end else last + cost.DAY_SECONDS
    return CostReport(first, last, own, subtree, models, days, total)
