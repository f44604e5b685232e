"""Cost arithmetic: the price table, what an allocation costs over an interval, periods.

Pure and synchronous (no clock, no I/O): the engine's accrual loop (`engine/cost.py`)
feeds it times and placed resources. Prices are per hour: a GPU-hour by GPU model (a
default for models the table does not list), a CPU core-hour (1000 millicores) and a
GiB-hour of memory. Periods are whole multiples of their length since the Unix epoch, in
UTC: a 86400 s period (and the ledger's day) starts at midnight UTC; calendar periods
(`Period.calendar`) are a UTC day, an ISO week from Monday 00:00 UTC, or a month from the
1st 00:00 UTC.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from rmgrpc.model import Allocation, Budget, BudgetPeriod, parent_of

DAY_SECONDS = 86400
HOUR_SECONDS = 3600.0
GIB = 1024**3


@dataclass(frozen=True, slots=True)
class PriceTable:
    """Prices per hour, in cost units."""

    gpu_hour_by_model: Mapping[str, float] = field(default_factory=dict)
    gpu_hour_default: float = 0.0
    cpu_core_hour: float = 0.0
    memory_gib_hour: float = 0.0

    def gpu_hour(self, model: str) -> float:
        return self.gpu_hour_by_model.get(model, self.gpu_hour_default)

    @property
    def dearest_gpu_hour(self) -> float:
        """The highest GPU-hour price: what a request naming no model may end up paying."""
        return max([self.gpu_hour_default, *self.gpu_hour_by_model.values()])


def parse_gpu_prices(text: str) -> dict[str, float]:
    """`"H100=4.0,A100=2.5"` as a dict; ValueError (naming the entry) when malformed,
    negative, not finite, or a model given twice."""
    out: dict[str, float] = {}
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue
        model, sep, price_text = entry.partition("=")
        model = model.strip()
        if not sep or not model:
            raise ValueError(f"{entry!r} is not MODEL=PRICE")
        try:
            price = float(price_text)
        except ValueError:
            raise ValueError(f"{entry!r}: {price_text.strip()!r} is not a number") from None
        check_price(f"price of {model}", price)
        if model in out:
            raise ValueError(f"model {model!r} is priced twice")
        out[model] = price
    return out


def check_price(name: str, price: float) -> None:
    """ValueError unless `price` is a finite number >= 0."""
    if not math.isfinite(price) or price < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {price!r}")


@dataclass(slots=True)
class Amounts:
    """Spend and the resource-hours behind it."""

    cost: float = 0.0
    gpu_hours: float = 0.0
    cpu_core_hours: float = 0.0
    memory_gib_hours: float = 0.0

    def add(self, other: Amounts) -> None:
        self.cost += other.cost
        self.gpu_hours += other.gpu_hours
        self.cpu_core_hours += other.cpu_core_hours
        self.memory_gib_hours += other.memory_gib_hours

    def scaled(self, hours: float) -> Amounts:
        return Amounts(
            self.cost * hours,
            self.gpu_hours * hours,
            self.cpu_core_hours * hours,
            self.memory_gib_hours * hours,
        )


@dataclass(frozen=True, slots=True)
class Held:
    """Resources held under one GPU model ('' for none): the GPUs of that model, and the
    CPU and memory of the replicas whose GPUs are of it."""

    model: str
    gpus: int = 0
    cpu_millis: int = 0
    memory_bytes: int = 0


def hourly(held: Held, prices: PriceTable) -> Amounts:
    """What holding `held` for one hour costs, and its resource-hours."""
    cores = held.cpu_millis / 1000.0
    gib = held.memory_bytes / GIB
    cost = held.gpus * prices.gpu_hour(held.model)
    cost += cores * prices.cpu_core_hour + gib * prices.memory_gib_hour
    return Amounts(cost, float(held.gpus), cores, gib)


WEEK_SECONDS = 7 * DAY_SECONDS
# 1970-01-05, the first Monday after the epoch (a Thursday): ISO weeks start from it.
_MONDAY = 4 * DAY_SECONDS


def period_start(t: float, period_seconds: int) -> float:
    """Start of the period holding `t`; 0 for a period of 0 (never resets)."""
    if period_seconds <= 0:
        return 0.0
    return math.floor(t / period_seconds) * float(period_seconds)


@dataclass(frozen=True, slots=True)
class Period:
    """A budget period: a calendar one (UTC), else `seconds` long from the epoch (0: one
    period that never ends)."""

    seconds: int = 0
    calendar: BudgetPeriod = BudgetPeriod.NONE

    @classmethod
    def of(cls, budget: Budget) -> Period:
        if budget.period != BudgetPeriod.NONE:
            return cls(0, budget.period)
        return cls(budget.period_seconds)

    @property
    def resets(self) -> bool:
        return self.calendar != BudgetPeriod.NONE or self.seconds > 0

    def start(self, t: float) -> float:
        """Start of the period holding `t` (0 for one that never resets)."""
        if self.calendar == BudgetPeriod.DAY:
            return period_start(t, DAY_SECONDS)
        if self.calendar == BudgetPeriod.WEEK:
            return math.floor((t - _MONDAY) / WEEK_SECONDS) * float(WEEK_SECONDS) + _MONDAY
        if self.calendar == BudgetPeriod.MONTH:
            d = datetime.fromtimestamp(t, UTC)
            return datetime(d.year, d.month, 1, tzinfo=UTC).timestamp()
        return period_start(t, self.seconds)

    def end(self, start: float) -> float:
        """End of the period that begins at `start` (infinity for one that never resets)."""
        if self.calendar == BudgetPeriod.DAY:
            return start + DAY_SECONDS
        if self.calendar == BudgetPeriod.WEEK:
            return start + WEEK_SECONDS
        if self.calendar == BudgetPeriod.MONTH:
            d = datetime.fromtimestamp(start, UTC)
            year, month = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
            return datetime(year, month, 1, tzinfo=UTC).timestamp()
        return start + self.seconds if self.seconds > 0 else math.inf

    @property
    def name(self) -> str:
        """The period in words, for reasons: "this month", "this period"."""
        if self.calendar != BudgetPeriod.NONE:
            return f"this {self.calendar.name.lower()}"
        return "this period" if self.seconds > 0 else "in total"


def split(start: float, end: float, period: int | Period) -> Iterator[tuple[float, float]]:
    """[start, end) cut at period boundaries (a length in seconds, or a `Period`):
    (period start, seconds in it) per piece."""
    p = period if isinstance(period, Period) else Period(period)
    t = start
    while t < end:
        first = p.start(t)
        stop = min(end, p.end(first))
        yield first, stop - t
        t = stop


def accrue(
    held: list[Held], prices: PriceTable, start: float, end: float
) -> dict[tuple[str, float], Amounts]:
    """What `held` costs over [start, end), by (GPU model, UTC day start)."""
    out: dict[tuple[str, float], Amounts] = {}
    for day, seconds in split(start, end, DAY_SECONDS):
        for h in held:
            row = out.setdefault((h.model, day), Amounts())
            row.add(hourly(h, prices).scaled(seconds / HOUR_SECONDS))
    return out


def request_cost(
    gpus: int,
    gpu_model: str,
    cpu_millis: int,
    memory_bytes: int,
    seconds: float,
    prices: PriceTable,
) -> float:
    """Most a request (all replicas summed) can cost over `seconds`; a request naming no
    model is priced at the dearest GPU, since it may be placed on any."""
    held = Held(gpu_model, gpus, cpu_millis, memory_bytes)
    amounts = hourly(held, prices)
    if not gpu_model and gpus:
        amounts.cost += gpus * (prices.dearest_gpu_hour - prices.gpu_hour(""))
    return amounts.cost * seconds / HOUR_SECONDS


THRESHOLDS = (50, 75, 90, 100)


def alerts_due(spent: float, amount: float, alerted: int) -> list[int]:
    """The thresholds (percent of `amount`) `spent` has reached above the highest one
    already alerted this period (`alerted`, 0 for none): each fires once per period."""
    if amount <= 0:
        return []
    return [p for p in THRESHOLDS if p > alerted and spent >= amount * p / 100]


def reached(spent: float, amount: float, alerted: int) -> int:
    """`alerted` lowered to the highest threshold `spent` still reaches (after the budget
    was raised); never raised."""
    return max((p for p in THRESHOLDS if p <= alerted and spent >= amount * p / 100), default=0)


def ancestors(tenant: str) -> Iterator[str]:
    """`tenant`, then its parent, up to the root."""
    while tenant:
        yield tenant
        tenant = parent_of(tenant)


@dataclass(frozen=True, slots=True)
class BudgetLeft:
    """A budgeted tenant's subtree spend in its current period, as admission reads it."""

    spent: float
    amount: float
    period: Period = Period()


def budget_block(
    request: Allocation, budgets: Mapping[str, BudgetLeft], prices: PriceTable
) -> tuple[str, str] | None:
    """(budgeted tenant, why) when a budget of `request`'s tenant or an ancestor cannot
    cover it: its cost for `max_duration_seconds` is more than is left (count * shape *
    price), or, without a duration, nothing is left. The one rule for Allocate and for
    queued work the scheduler would start."""
    if not budgets:
        return None
    need: float | None = None
    for tenant in ancestors(request.tenant):
        left = budgets.get(tenant)
        if left is None or left.amount <= 0:
            continue
        remaining = left.amount - left.spent
        if request.max_duration_seconds > 0:
            if need is None:
                shape, n = request.shape, request.count
                need = request_cost(
                    n * shape.gpus,
                    shape.gpu_model,
                    n * shape.cpu_millis,
                    n * shape.memory_bytes,
                    float(request.max_duration_seconds),
                    prices,
                )
            if need > remaining:
                return tenant, (
                    f"budget of {tenant!r} cannot cover this request: it may cost {need:.2f} "
                    f"over max_duration_seconds {request.max_duration_seconds}, and "
                    f"{max(remaining, 0.0):.2f} of {left.amount:.2f} is left {left.period.name}"
                )
        if remaining <= 0:
            return tenant, (
                f"budget of {tenant!r} is spent: {left.spent:.2f} of {left.amount:.2f} "
                f"{left.period.name}"
            )
    return None


def pending_budget_reason(
    request: Allocation, budgets: Mapping[str, BudgetLeft], prices: PriceTable
) -> str | None:
    """Why queued work does not start for budget (the rule of `budget_block`), and what
    would let it: the next period, or a raised budget."""
    block = budget_block(request, budgets, prices)
    if block is None:
        return None
    tenant, why = block
    period = budgets[tenant].period
    when = f"the next {period.calendar.name.lower()}" if period.calendar else "the next period"
    lift = f"{when} or a raised budget" if period.resets else "a raised budget"
    return f"{why}; starts with {lift}"
