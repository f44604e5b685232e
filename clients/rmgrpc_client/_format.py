"""How `rmgrpcctl` shows results: compact human tables and blocks, or protobuf JSON.

Pure functions from messages to text, so the CLI's output is testable without a server.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from google.protobuf import json_format, message

from rmgrpc.v1 import allocator_pb2, gpu_manager_pb2, quota_pb2, resources_pb2

_BINARY_UNITS = (("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10))
_DECIMAL_UNITS = {"T": 10**12, "G": 10**9, "M": 10**6, "K": 10**3, "k": 10**3}


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


def enum_value(names: Sequence[str], prefix: str, text: str) -> str:
    """The full enum name for ``allocated`` / ``ALLOCATED`` / ``ALLOCATION_STATE_ALLOCATED``."""
    wanted = text.upper()
    for name in (wanted, prefix + wanted):
        if name in names and not name.endswith("_UNSPECIFIED"):
            return name
    choices = ", ".join(n.removeprefix(prefix).lower() for n in names if "UNSPECIFIED" not in n)
    raise ValueError(f"unknown value {text!r} (choose from {choices})")


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


def format_placements(placements: Iterable[resources_pb2.Placement]) -> str:
    """``n1:0,1 n2:3``: per replica, its node and GPU indices."""
    text = " ".join(
        f"{p.node_id}:{','.join(map(str, p.gpu_indices))}" if p.gpu_indices else p.node_id
        for p in placements
    )
    return text or "-"


# -- layouts ----------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Left-aligned columns two spaces apart; the last column is not padded."""
    cells = [[str(h) for h in headers], *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def block(pairs: Iterable[tuple[str, object]]) -> str:
    """``key: value`` lines with aligned values; empty values are left out."""
    kept = [(k, str(v)) for k, v in pairs if v not in ("", None)]
    width = max((len(k) for k, _ in kept), default=0) + 1
    return "\n".join(f"{k + ':':<{width}} {v}" for k, v in kept)


def to_json(msg: message.Message, *, compact: bool = False) -> str:
    """Protobuf JSON, with the field names grpcurl shows; one line when `compact`."""
    return json_format.MessageToJson(msg, indent=None if compact else 2)


# -- allocations ------------------------------------------------------------------------


def _reason(a: allocator_pb2.Allocation) -> str:
    return a.pending_reason or a.state_reason


def allocation_table(allocations: Iterable[allocator_pb2.Allocation]) -> str:
    return table(
        ("ID", "TENANT", "STATE", "REPLICAS", "SHAPE", "PLACEMENTS", "REV", "REASON"),
        (
            (
                a.id,
                a.tenant,
                state_name(a.state),
                a.count,
                format_shape(a.shape),
                format_placements(a.placements),
                a.revision,
                _reason(a),
            )
            for a in allocations
        ),
    )


def allocation_block(a: allocator_pb2.Allocation) -> str:
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
            ("reason", a.state_reason),
            ("preempted by", a.preempted_by),
            ("reservation", a.reservation_id),
            ("lease expires", _time(a, "lease_expire_time")),
            ("max end", _time(a, "max_end_time")),
            ("created", _time(a, "create_time")),
            ("ended", _time(a, "end_time")),
            ("request id", a.request_id),
            ("revision", a.revision or ""),
        ]
    )


def dry_run_block(response: allocator_pb2.AllocateResponse) -> str:
    text = "dry run: nothing changed\n" + allocation_block(response.allocation)
    if response.preempted_allocation_ids:
        text += "\nwould preempt: " + ", ".join(response.preempted_allocation_ids)
    return text


def event_line(event: allocator_pb2.AllocationEvent) -> str:
    """``42 PLACED a-1 org/team ALLOCATED n1:0,1`` — revision, change, allocation."""
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


def _time(msg: message.Message, field: str) -> str:
    if not msg.HasField(field):
        return ""
    stamp = getattr(msg, field)
    return str(stamp.ToJsonString())


# -- nodes and GPUs ---------------------------------------------------------------------


def node_table(nodes: Iterable[gpu_manager_pb2.Node]) -> str:
    return table(
        ("ID", "STATE", "GPUS", "MODELS", "CPU", "MEMORY", "LABELS"),
        (
            (
                n.id + (" (sim)" if n.simulated else ""),
                node_state_name(n.state),
                f"{n.allocated.gpus}/{len(n.gpus)}",
                ",".join(sorted({g.model for g in n.gpus})) or "-",
                f"{format_cpu(n.allocated.cpu_millis)}/{format_cpu(n.cpu_millis)}",
                f"{format_bytes(n.allocated.memory_bytes)}/{format_bytes(n.memory_bytes)}",
                format_labels(n.labels),
            )
            for n in nodes
        ),
    )


def node_block(n: gpu_manager_pb2.Node) -> str:
    head = block(
        [
            ("id", n.id),
            ("state", node_state_name(n.state)),
            ("reason", n.state_reason),
            ("simulated", "yes" if n.simulated else ""),
            ("cpu", f"{format_cpu(n.allocated.cpu_millis)}/{format_cpu(n.cpu_millis)}"),
            (
                "memory",
                f"{format_bytes(n.allocated.memory_bytes)}/{format_bytes(n.memory_bytes)}",
            ),
            ("labels", format_labels(n.labels)),
            ("last heartbeat", _time(n, "last_heartbeat_time")),
            ("lease expires", _time(n, "lease_expire_time")),
            ("revision", n.revision),
        ]
    )
    return head + "\n\n" + gpu_table(n.gpus) if n.gpus else head


def gpu_table(gpus: Iterable[gpu_manager_pb2.Gpu]) -> str:
    return table(
        ("NODE", "INDEX", "MODEL", "MEMORY", "HEALTH", "UTIL", "TEMP", "ALLOCATION", "TENANT"),
        (
            (
                g.node_id or "-",
                g.index,
                g.model,
                format_bytes(g.memory_bytes),
                health_name(g.health),
                f"{g.metrics.utilization_percent:.0f}%" if g.HasField("metrics") else "-",
                f"{g.metrics.temperature_celsius:.0f}C" if g.HasField("metrics") else "-",
                g.allocation_id or "-",
                g.tenant or "-",
            )
            for g in gpus
        ),
    )


def drain_block(response: gpu_manager_pb2.DrainNodeResponse) -> str:
    asked = ", ".join(response.allocation_ids) or "none"
    return node_block(response.node) + f"\n\nasked to leave: {asked}"


# -- quotas and usage -------------------------------------------------------------------


def _budget(q: quota_pb2.Quota) -> str:
    if not q.HasField("budget") or not q.budget.amount:
        return "-"
    period = f"/{q.budget.period_seconds}s" if q.budget.period_seconds else ""
    return f"{q.budget.amount:g}{period}"


def quota_table(quotas: Iterable[quota_pb2.Quota]) -> str:
    return table(
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
    return block(
        [
            ("tenant", q.tenant),
            ("parent", q.parent or "-"),
            ("guaranteed", format_resources(q.guaranteed)),
            ("limit", format_resources(q.limit, empty="unbounded")),
            ("weight", f"{q.weight:g}"),
            ("budget", _budget(q)),
            ("revision", q.revision),
        ]
    )


def usage_block(u: quota_pb2.TenantUsage) -> str:
    return block(
        [
            ("tenant", u.tenant),
            ("held", format_resources(u.held)),
            ("pending", format_resources(u.pending)),
            ("guaranteed", format_resources(u.guaranteed)),
            ("limit", format_resources(u.limit, empty="unbounded")),
            ("borrowed", format_resources(u.borrowed)),
            ("running", u.running_allocations),
            ("waiting", u.pending_allocations),
            ("dominant share", f"{u.dominant_share:.3f}"),
            ("weighted share", f"{u.weighted_dominant_share:.3f}"),
            ("fair share", f"{u.fair_share:.3f}"),
            ("cost", f"{u.cost:g}"),
            ("budget used", f"{u.budget_used_fraction:.0%}" if u.budget_used_fraction else ""),
        ]
    )
