"""How `rmgrpcctl` shows results: human tables and blocks, protobuf JSON (with the field
names grpcurl prints) or YAML.

Pure functions from messages to text, so the CLI's output is testable without a server.
Tables are built as `Rows` first, which the live `top` view renders with rich; times are
shown as ages ("5m12s") against a `now` the caller passes, never as raw UTC stamps.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from google.protobuf import json_format, message, timestamp_pb2

from rmgrpc.v1 import allocator_pb2, gpu_manager_pb2, quota_pb2, resources_pb2
from rmgrpc_client._yaml import dump as yaml_dump

_BINARY_UNITS = (("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10))
_DECIMAL_UNITS = {"T": 10**12, "G": 10**9, "M": 10**6, "K": 10**3, "k": 10**3}

# Allocations that still hold or wait for capacity; `list` shows only these by default.
LIVE_STATES = (
    allocator_pb2.ALLOCATION_STATE_PENDING,
    allocator_pb2.ALLOCATION_STATE_ALLOCATED,
    allocator_pb2.ALLOCATION_STATE_PREEMPTED,
)


# -- values -----------------------------------------------------------------------------


def parse_bytes(text: str) -> int:
    """``"64Gi"`` → 68719476736; accepts Ki/Mi/Gi/Ti, K/M/G/T and plain byte counts."""
    text = text.strip()
    for suffix, size in _BINARY_UNITS:
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * size)
    if text and text[-1] in _DECIMAL_UNITS:
        return int(float(text[:-1]) * _DECIMAL_UNITS[text[-1]])
    return int(text)


def format_bytes(size: int) -> str:
    """68719476736 → ``"64Gi"``; 1.5 GiB → ``"1.5Gi"``; small sizes in plain bytes."""
    for suffix, unit in _BINARY_UNITS:
        if size >= unit:
            return f"{size / unit:.1f}".removesuffix(".0") + suffix
    return str(size)


def format_cpu(millis: int) -> str:
    """8000 → ``"8"`` cores; 500 → ``"500m"``."""
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis}m"


def parse_labels(pairs: Iterable[str]) -> dict[str, str]:
    """``["zone=a", "gpu=h100"]`` → ``{"zone": "a", "gpu": "h100"}``."""
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {pair!r}")
        labels[key] = value
    return labels


def format_labels(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def _short(full: str, prefix: str) -> str:
    return full.removeprefix(prefix)


def state_name(state: allocator_pb2.AllocationState.ValueType) -> str:
    return _short(allocator_pb2.AllocationState.Name(state), "ALLOCATION_STATE_")


def event_type_name(kind: allocator_pb2.AllocationEventType.ValueType) -> str:
    return _short(allocator_pb2.AllocationEventType.Name(kind), "ALLOCATION_EVENT_TYPE_")


def node_state_name(state: gpu_manager_pb2.NodeState.ValueType) -> str:
    return _short(gpu_manager_pb2.NodeState.Name(state), "NODE_STATE_")


def health_name(health: gpu_manager_pb2.GpuHealth.ValueType) -> str:
    return _short(gpu_manager_pb2.GpuHealth.Name(health), "GPU_HEALTH_")


def format_shape(shape: resources_pb2.Shape) -> str:
    """``4xH100 cpu=8 mem=64Gi zone=a``: only what the shape asks for."""
    parts = []
    if shape.gpus:
        parts.append(f"{shape.gpus}x{shape.gpu_model or 'gpu'}")
    if shape.cpu_millis:
        parts.append(f"cpu={format_cpu(shape.cpu_millis)}")
    if shape.memory_bytes:
        parts.append(f"mem={format_bytes(shape.memory_bytes)}")
    if shape.node_selector:
        parts.append(format_labels(shape.node_selector))
    return " ".join(parts) or "-"


def format_resources(res: resources_pb2.Resources, *, empty: str = "-") -> str:
    """``gpus=4 H100=2 cpu=8 mem=64Gi``; fields left unset are left out."""
    parts = []
    if res.HasField("gpus"):
        parts.append(f"gpus={res.gpus}")
    parts += [f"{model}={n}" for model, n in sorted(res.gpus_by_model.items())]
    if res.HasField("cpu_millis"):
        parts.append(f"cpu={format_cpu(res.cpu_millis)}")
    if res.HasField("memory_bytes"):
        parts.append(f"mem={format_bytes(res.memory_bytes)}")
    return " ".join(parts) or empty


def format_amounts(res: resources_pb2.Resources) -> str:
    """``gpus=4 cpu=8``: only the non-zero amounts (what is held or asked for); ``0`` when
    nothing is."""
    parts = [f"gpus={res.gpus}"] if res.gpus else []
    parts += [f"{model}={n}" for model, n in sorted(res.gpus_by_model.items()) if n]
    if res.cpu_millis:
        parts.append(f"cpu={format_cpu(res.cpu_millis)}")
    if res.memory_bytes:
        parts.append(f"mem={format_bytes(res.memory_bytes)}")
    return " ".join(parts) or "0"


def format_placements(placements: Iterable[resources_pb2.Placement]) -> str:
    """``n1:0,1 n2:3``: per replica, its node and GPU indices."""
    text = " ".join(
        f"{p.node_id}:{','.join(map(str, p.gpu_indices))}" if p.gpu_indices else p.node_id
        for p in placements
    )
    return text or "-"


# -- times ------------------------------------------------------------------------------


def stamp_seconds(stamp: timestamp_pb2.Timestamp) -> float:
    """A protobuf Timestamp as Unix seconds."""
    return stamp.seconds + stamp.nanos / 1e9


def human_duration(seconds: float) -> str:
    """Like kubectl's AGE: ``42s``, ``5m12s``, ``45m``, ``3h20m``, ``30h``, ``3d4h``, ``12d``;
    precise when short, coarser as it grows."""
    s = max(0, int(seconds))
    minutes, hours, days = s // 60, s // 3600, s // 86400
    if s < 120:
        return f"{s}s"
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if hours < 3:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if days < 8:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    return f"{days}d"


def age(msg: message.Message, field: str, now: float) -> str:
    """How long ago the Timestamp `field` of `msg` was (``5m``), or ``-`` when unset."""
    if not msg.HasField(field):
        return "-"
    return human_duration(now - stamp_seconds(getattr(msg, field)))


def relative(msg: message.Message, field: str, now: float) -> str:
    """``5m ago`` or ``in 4m`` for the Timestamp `field`; ``-`` when unset."""
    if not msg.HasField(field):
        return "-"
    delta = stamp_seconds(getattr(msg, field)) - now
    return f"in {human_duration(delta)}" if delta > 0 else f"{human_duration(-delta)} ago"


def when(msg: message.Message, field: str, now: float) -> str:
    """``2026-12-02 12:25:35 (5m ago)`` in local time, to the second; empty when unset."""
    if not msg.HasField(field):
        return ""
    at = datetime.fromtimestamp(stamp_seconds(getattr(msg, field))).astimezone()
    return f"{at:%Y-%m-%d %H:%M:%S} ({relative(msg, field, now)})"


# -- layouts ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rows:
    """A table before layout: column headers and one tuple of cells per row."""

    headers: tuple[str, ...]
    rows: list[tuple[str, ...]]


def _rows(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> Rows:
    return Rows(tuple(headers), [tuple(str(c) for c in row) for row in rows])


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, header: bool = True) -> str:
    """Left-aligned columns two spaces apart; the last column is not padded."""
    body = [[str(c) for c in row] for row in rows]
    cells = [[str(h) for h in headers], *body] if header else body
    if not cells:
        return ""
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def render(rows: Rows, *, header: bool = True) -> str:
    """`rows` as a plain-text table (`header=False` for ``--no-headers``)."""
    return table(rows.headers, rows.rows, header=header)


def block(pairs: Iterable[tuple[str, object]]) -> str:
    """``key: value`` lines with aligned values; empty values are left out."""
    kept = [(k, str(v)) for k, v in pairs if v not in ("", None)]
    width = max((len(k) for k, _ in kept), default=0) + 1
    return "\n".join(f"{k + ':':<{width}} {v}" for k, v in kept)


def to_dict(msg: message.Message) -> dict[str, Any]:
    """A message as grpcurl shows it: snake_case proto field names, enums by name, int64
    as strings, default values left out."""
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def to_json(msg: message.Message, *, compact: bool = False) -> str:
    """Protobuf JSON with the field names grpcurl prints; one line when `compact`."""
    return json_format.MessageToJson(
        msg, indent=None if compact else 2, preserving_proto_field_name=True
    )


def dumps(doc: Any, *, compact: bool = False) -> str:
    """A plain JSON document (for outputs that are not one message), formatted like `to_json`."""
    return json.dumps(doc, indent=None if compact else 2, ensure_ascii=False)


def json_to_yaml(text: str) -> str:
    """JSON text as YAML (a ``-o yaml`` view of the same document)."""
    return yaml_dump(json.loads(text)).rstrip("\n")


# -- allocations ------------------------------------------------------------------------


def _reason(a: allocator_pb2.Allocation) -> str:
    return a.pending_reason or a.state_reason


def _position(a: allocator_pb2.Allocation) -> str:
    return str(a.queue_position) if a.queue_position else "-"


def _start(a: allocator_pb2.Allocation, now: float) -> str:
    """When a PENDING allocation is estimated to start (``in 2h10m``), ``unknown`` when
    no hard end frees what it needs, ``-`` otherwise (not pending, not estimated)."""
    if a.state != allocator_pb2.ALLOCATION_STATE_PENDING:
        return "-"
    if a.HasField("estimated_start_time"):
        delta = stamp_seconds(a.estimated_start_time) - now
        return f"in {human_duration(delta)}" if delta >= 1 else "now"
    return "unknown" if a.estimate_reason.startswith("unknown") else "-"


def is_live(a: allocator_pb2.Allocation, now: float) -> bool:
    """Still holds or waits for capacity: PENDING, ALLOCATED, or PREEMPTED within its grace
    period (its GPUs are not back yet)."""
    if a.state == allocator_pb2.ALLOCATION_STATE_PREEMPTED:
        return a.HasField("grace_end_time") and stamp_seconds(a.grace_end_time) > now
    return a.state in LIVE_STATES


def allocation_rows(
    allocations: Iterable[allocator_pb2.Allocation], now: float, *, wide: bool = False
) -> Rows:
    """ID, tenant, state, queue position, shape, where it runs, AGE (since created), the
    estimated START of pending work and why it waits or ended; `wide` adds priority,
    lease, revision and request id."""
    headers = ["ID", "TENANT", "STATE", "POS", "REPLICAS", "SHAPE", "PLACEMENTS", "AGE"]
    if wide:
        headers += ["PRIORITY", "LEASE", "REV", "REQUEST-ID"]
    headers += ["START", "REASON"]
    rows = []
    for a in allocations:
        row = [
            a.id,
            a.tenant,
            state_name(a.state),
            _position(a),
            a.count,
            format_shape(a.shape),
            format_placements(a.placements),
            age(a, "create_time", now),
        ]
        if wide:
            lease = relative(a, "lease_expire_time", now) if is_live(a, now) else "-"
            row += [a.priority, lease, a.revision, a.request_id or "-"]
        row += [_start(a, now), _reason(a) or "-"]
        rows.append(row)
    return _rows(headers, rows)


def admission_order(pending: Iterable[allocator_pb2.Allocation]) -> list[allocator_pb2.Allocation]:
    """Pending allocations in the order the scheduler would admit them: by queue position;
    ones not ranked yet (position 0) last, in arrival order."""
    return sorted(
        pending,
        key=lambda a: (a.queue_position == 0, a.queue_position, a.create_revision, a.id),
    )


def queue_rows(
    pending: Iterable[allocator_pb2.Allocation], now: float, *, wide: bool = False
) -> Rows:
    """The queue in admission order: position, who, what, how long it has waited, when
    it is estimated to start, why."""
    headers = ["POS", "ID", "TENANT", "PRIORITY", "REPLICAS", "SHAPE", "WAITING"]
    if wide:
        headers += ["CREATED-REV", "REQUEST-ID"]
    headers += ["START", "REASON"]
    rows = []
    for a in admission_order(pending):
        row = [
            _position(a),
            a.id,
            a.tenant,
            a.priority,
            a.count,
            format_shape(a.shape),
            age(a, "create_time", now),
        ]
        if wide:
            row += [a.create_revision, a.request_id or "-"]
        row += [_start(a, now), a.pending_reason or "-"]
        rows.append(row)
    return _rows(headers, rows)


def allocation_block(a: allocator_pb2.Allocation, now: float | None = None) -> str:
    """One allocation as ``key: value`` lines; times local, with their age."""
    now = time.time() if now is None else now
    return block(
        [
            ("id", a.id),
            ("tenant", a.tenant),
            ("state", state_name(a.state)),
            ("replicas", a.count),
            ("shape", format_shape(a.shape)),
            ("placements", format_placements(a.placements) if a.placements else ""),
            ("priority", a.priority or ""),
            ("pending", a.pending_reason),
            ("queue position", a.queue_position or ""),
            ("estimated start", when(a, "estimated_start_time", now)),
            ("estimate", a.estimate_reason),
            ("reason", a.state_reason),
            ("preempted by", a.preempted_by),
            ("reservation", a.reservation_id),
            ("created", when(a, "create_time", now)),
            ("allocated", when(a, "allocate_time", now)),
            ("lease expires", when(a, "lease_expire_time", now) if is_live(a, now) else ""),
            ("max end", when(a, "max_end_time", now)),
            ("grace ends", when(a, "grace_end_time", now)),
            ("ended", when(a, "end_time", now)),
            ("request id", a.request_id),
            ("revision", a.revision or ""),
        ]
    )


def dry_run_block(response: allocator_pb2.AllocateResponse, now: float | None = None) -> str:
    """What a dry run would do, and whom it would preempt."""
    text = "dry run: nothing changed\n" + allocation_block(response.allocation, now)
    if response.preempted_allocation_ids:
        text += "\nwould preempt: " + ", ".join(response.preempted_allocation_ids)
    return text


def event_line(event: allocator_pb2.AllocationEvent) -> str:
    """``42 PLACED a-1 org/team ALLOCATED n1:0,1`` — revision, change, allocation."""
    if event.HasField("budget_alert"):
        return budget_alert_line(event)
    a = event.allocation
    fields = [
        str(event.revision),
        event_type_name(event.type),
        a.id,
        a.tenant,
        state_name(a.state),
        format_placements(a.placements),
    ]
    if _reason(a):
        fields.append(f"({_reason(a)})")
    return " ".join(fields)


def budget_alert_line(event: allocator_pb2.AllocationEvent) -> str:
    """``57 BUDGET_ALERT org 75% spent 75.00 of 100.00 this month (from 2027-02-01)``."""
    b = event.budget_alert
    if b.period:
        period = f"this {budget_period_name(b.period)}"
    elif b.period_seconds:
        period = f"per {human_duration(b.period_seconds)}"
    else:
        period = "in total"
    since = ""
    if b.HasField("period_start"):
        since = " (from " + time.strftime("%Y-%m-%d %H:%M", time.gmtime(b.period_start.seconds))
        since = since.removesuffix(" 00:00") + ")"
    return (
        f"{event.revision} {event_type_name(event.type)} {b.tenant} {b.percent}% spent "
        f"{b.spent:.2f} of {b.amount:.2f} {period}{since}"
    )


def relisted_lines(allocations: Sequence[allocator_pb2.Allocation], revision: int) -> str:
    """After a compaction the watch relisted: a ``RELISTED`` line, then one ``LISTED`` line
    per allocation; the events that follow continue from `revision`."""
    head = f"{revision} RELISTED {len(allocations)} allocation(s)"
    rows = [
        f"{revision} LISTED {a.id} {a.tenant} {state_name(a.state)} "
        f"{format_placements(a.placements)}"
        for a in allocations
    ]
    return "\n".join([head, *rows])


# -- nodes and GPUs ---------------------------------------------------------------------


def free_gpus(n: gpu_manager_pb2.Node) -> int:
    """GPUs of `n` that could take work now: healthy and held by no allocation."""
    return sum(
        1 for g in n.gpus if not g.allocation_id and g.health == gpu_manager_pb2.GPU_HEALTH_HEALTHY
    )


def _heartbeat(n: gpu_manager_pb2.Node, now: float) -> str:
    return relative(n, "last_heartbeat_time", now)


def node_rows(nodes: Iterable[gpu_manager_pb2.Node], now: float, *, wide: bool = False) -> Rows:
    """Nodes with state, free/total columns that cannot be misread, heartbeat age and the
    operator's reason; `wide` adds models, totals, labels and revision."""
    headers = ["NODE", "STATE", "GPU-FREE", "GPU-TOTAL", "CPU-FREE", "MEM-FREE", "HEARTBEAT"]
    if wide:
        headers += ["MODELS", "CPU-TOTAL", "MEM-TOTAL", "LABELS", "REV"]
    headers.append("REASON")
    rows = []
    for n in nodes:
        row = [
            n.id + (" (sim)" if n.simulated else ""),
            node_state_name(n.state),
            free_gpus(n),
            len(n.gpus),
            format_cpu(max(0, n.cpu_millis - n.allocated.cpu_millis)),
            format_bytes(max(0, n.memory_bytes - n.allocated.memory_bytes)),
            _heartbeat(n, now),
        ]
        if wide:
            row += [
                ",".join(sorted({g.model for g in n.gpus})) or "-",
                format_cpu(n.cpu_millis),
                format_bytes(n.memory_bytes),
                format_labels(n.labels),
                n.revision,
            ]
        row.append(n.state_reason or "-")
        rows.append(row)
    return _rows(headers, rows)


def node_block(n: gpu_manager_pb2.Node, now: float | None = None) -> str:
    """One node as ``key: value`` lines, then its GPUs as a table."""
    now = time.time() if now is None else now
    head = block(
        [
            ("id", n.id),
            ("state", node_state_name(n.state)),
            ("reason", n.state_reason),
            ("simulated", "yes" if n.simulated else ""),
            ("gpus", f"{free_gpus(n)} free of {len(n.gpus)}"),
            ("cpu", f"{format_cpu(n.allocated.cpu_millis)} used of {format_cpu(n.cpu_millis)}"),
            (
                "memory",
                f"{format_bytes(n.allocated.memory_bytes)} used of {format_bytes(n.memory_bytes)}",
            ),
            ("labels", format_labels(n.labels)),
            ("last heartbeat", when(n, "last_heartbeat_time", now)),
            ("lease expires", when(n, "lease_expire_time", now)),
            ("revision", n.revision),
        ]
    )
    return head + "\n\n" + render(gpu_rows(n.gpus)) if n.gpus else head


def gpu_rows(gpus: Iterable[gpu_manager_pb2.Gpu], *, wide: bool = False) -> Rows:
    """GPUs with health, live metrics and who holds them; `wide` adds memory use, power
    and UUID."""
    headers = ["NODE", "INDEX", "MODEL", "MEMORY", "HEALTH", "UTIL", "TEMP"]
    if wide:
        headers += ["MEM-USED", "POWER", "UUID"]
    headers += ["ALLOCATION", "TENANT"]
    rows = []
    for g in gpus:
        has = g.HasField("metrics")
        row = [
            g.node_id or "-",
            g.index,
            g.model,
            format_bytes(g.memory_bytes),
            health_name(g.health),
            f"{g.metrics.utilization_percent:.0f}%" if has else "-",
            f"{g.metrics.temperature_celsius:.0f}C" if has else "-",
        ]
        if wide:
            row += [
                format_bytes(g.metrics.memory_used_bytes) if has else "-",
                f"{g.metrics.power_watts:.0f}W" if has else "-",
                g.uuid or "-",
            ]
        row += [g.allocation_id or "-", g.tenant or "-"]
        rows.append(row)
    return _rows(headers, rows)


def drain_block(response: gpu_manager_pb2.DrainNodeResponse, now: float | None = None) -> str:
    """The drained node, the allocations asked to leave it and their requeued replacements."""
    asked = ", ".join(response.allocation_ids) or "none"
    text = node_block(response.node, now) + f"\n\nasked to leave: {asked}"
    if response.requeued_allocation_ids:
        text += "\nrequeued as:    " + ", ".join(response.requeued_allocation_ids)
    return text


# -- quotas, usage and tenants ----------------------------------------------------------


def _budget(q: quota_pb2.Quota) -> str:
    if not q.HasField("budget") or not q.budget.amount:
        return "-"
    period = f"/{q.budget.period_seconds}s" if q.budget.period_seconds else ""
    if q.budget.period:
        period = "/" + budget_period_name(q.budget.period)
    return f"{q.budget.amount:g}{period}"


def budget_period_name(period: int) -> str:
    """A calendar budget period as the CLI spells it: day, week, month."""
    return (
        quota_pb2.BudgetPeriod.Name(quota_pb2.BudgetPeriod.ValueType(period))
        .removeprefix("BUDGET_PERIOD_")
        .lower()
    )


def quota_rows(quotas: Iterable[quota_pb2.Quota]) -> Rows:
    """Quotas as set: guarantee, limit, weight and budget per tenant."""
    return _rows(
        ("TENANT", "PARENT", "GUARANTEED", "LIMIT", "WEIGHT", "BUDGET"),
        (
            (
                q.tenant,
                q.parent or "-",
                format_resources(q.guaranteed),
                format_resources(q.limit, empty="unbounded"),
                f"{q.weight:g}",
                _budget(q),
            )
            for q in quotas
        ),
    )


def quota_block(q: quota_pb2.Quota) -> str:
    """One quota as ``key: value`` lines."""
    return block(
        [
            ("tenant", q.tenant),
            ("parent", q.parent or "-"),
            ("guaranteed", format_resources(q.guaranteed)),
            ("limit", format_resources(q.limit, empty="unbounded")),
            ("weight", f"{q.weight:g}"),
            ("lending", format_resources(q.lending_limit, empty="all of the guarantee")),
            ("budget", _budget(q)),
            ("preemption", _preemption_policy(q)),
            ("revision", q.revision),
            ("etag", q.etag or "-"),
        ]
    )


def _preemption_policy(q: quota_pb2.Quota) -> str:
    """E.g. "own: lower priority; others: any; while borrowing: up to priority 3"."""

    def word(enum: Any, value: int, prefix: str) -> str:
        if not value:
            return "default"
        return str(enum.Name(value)).removeprefix(prefix).lower().replace("_", " ")

    borrowing = word(
        quota_pb2.BorrowingPreemption, q.preemption_while_borrowing, "BORROWING_PREEMPTION_"
    )
    if q.preemption_while_borrowing == quota_pb2.BORROWING_PREEMPTION_UP_TO_PRIORITY:
        borrowing = f"up to priority {q.borrowing_max_priority}"
    return (
        "own: "
        + word(
            quota_pb2.WithinTenantPreemption,
            q.within_tenant_preemption,
            "WITHIN_TENANT_PREEMPTION_",
        )
        + "; others: "
        + word(quota_pb2.ReclaimPolicy, q.reclaim_from_others, "RECLAIM_POLICY_")
        + "; while borrowing: "
        + borrowing
    )


def usage_block(u: quota_pb2.TenantUsage) -> str:
    """A tenant's usage as ``key: value`` lines."""
    return block(
        [
            ("tenant", u.tenant),
            ("held", format_resources(u.held)),
            ("pending", format_resources(u.pending)),
            ("guaranteed", format_resources(u.guaranteed)),
            ("limit", format_resources(u.limit, empty="unbounded")),
            ("borrowed", format_resources(u.borrowed)),
            ("reserved", format_resources(u.reserved)),
            ("reserved later", format_resources(u.reserved_upcoming)),
            ("running", u.running_allocations),
            ("waiting", u.pending_allocations),
            ("dominant share", f"{u.dominant_share:.3f}"),
            ("weighted share", f"{u.weighted_dominant_share:.3f}"),
            ("fair share", f"{u.fair_share:.3f}"),
            ("recent usage", format_resources(u.recent_usage)),
            ("ordered by", u.order_explanation),
            ("cost", f"{u.cost:g}"),
            ("budget used", f"{u.budget_used_fraction:.0%}" if u.budget_used_fraction else ""),
        ]
    )


@dataclass(frozen=True)
class TenantStatus:
    """One line of `rmgrpcctl tenants`: a tenant's quota (if one is set), its usage, and
    its oldest pending allocation's creation time (Unix seconds; None when none waits)."""

    tenant: str
    usage: quota_pb2.TenantUsage
    quota: quota_pb2.Quota | None = None
    oldest_pending: float | None = None


def _gpus(res: resources_pb2.Resources, unset: str) -> str:
    return str(res.gpus) if res.HasField("gpus") else unset


def tenant_rows(tenants: Iterable[TenantStatus], now: float, *, wide: bool = False) -> Rows:
    """Like `sshare`: per tenant its GPU guarantee, limit, weight, what it holds and waits
    for, its fair share of the cluster's GPUs and how long its oldest request has waited.
    `wide` adds every resource, what it borrows, its dominant share and cost."""
    headers = ["TENANT", "WEIGHT", "GUARANTEED", "LIMIT", "HELD", "PENDING", "FAIR-SHARE"]
    headers += ["RUNNING", "WAITING", "OLDEST-WAIT"]
    if wide:
        headers += ["BORROWED", "DOMINANT-SHARE", "COST", "BUDGET-USED"]
    rows = []
    for t in tenants:
        u = t.usage
        weight = f"{t.quota.weight:g}" if t.quota is not None and t.quota.weight else "1"
        if wide:
            cells = [
                format_resources(u.guaranteed),
                format_resources(u.limit, empty="unbounded"),
                format_amounts(u.held),
                format_amounts(u.pending),
            ]
        else:  # GPUs only: the scarce resource, and a column a person can compare
            cells = [
                _gpus(u.guaranteed, "0"),
                _gpus(u.limit, "none"),
                str(u.held.gpus),
                str(u.pending.gpus),
            ]
        oldest = "-" if t.oldest_pending is None else human_duration(now - t.oldest_pending)
        row: list[object] = [t.tenant, weight, *cells, f"{u.fair_share:.0%}"]
        row += [u.running_allocations, u.pending_allocations, oldest]
        if wide:
            row += [
                format_amounts(u.borrowed),
                f"{u.dominant_share:.3f}",
                f"{u.cost:g}",
                f"{u.budget_used_fraction:.0%}" if u.budget_used_fraction else "-",
            ]
        rows.append(row)
    return _rows(headers, rows)


def tenants_document(tenants: Iterable[TenantStatus]) -> dict[str, Any]:
    """`tenants -o json`: per tenant its usage and quota as grpcurl would print them."""
    out = []
    for t in tenants:
        item: dict[str, Any] = {"tenant": t.tenant, "usage": to_dict(t.usage)}
        if t.quota is not None:
            item["quota"] = to_dict(t.quota)
        if t.oldest_pending is not None:
            stamp = timestamp_pb2.Timestamp()
            stamp.FromNanoseconds(int(t.oldest_pending * 1e9))
            item["oldest_pending_create_time"] = stamp.ToJsonString()
        out.append(item)
    return {"tenants": out}
