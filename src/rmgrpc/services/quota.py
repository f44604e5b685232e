"""rmgrpc.v1.QuotaService: what each tenant is guaranteed, may hold, and uses."""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor, field_mask_pb2

from rmgrpc import auth, authorize, codec
from rmgrpc.engine import Engine
from rmgrpc.engine.quotas import quota_etag
from rmgrpc.errors import InvalidArgument
from rmgrpc.model import Budget, BudgetPeriod, Quota, Resources, parent_of
from rmgrpc.services import validate as val
from rmgrpc.services.pagination import decode_token, fingerprint, paginate
from rmgrpc.services.status import Context as Ctx
from rmgrpc.services.status import unary
from rmgrpc.summary import reserved_of
from rmgrpc.v1 import quota_pb2, quota_pb2_grpc, resources_pb2

MAX_WEIGHT = 1_000_000.0


_DIMENSIONS = ("gpus", "cpu_millis", "memory_bytes")


def _resources(
    v: val.Violations, field: str, msg: resources_pb2.Resources, max_models: int
) -> Resources:
    if msg.HasField("gpus"):
        v.int_range(f"{field}.gpus", msg.gpus, 0, 1_000_000)
    if msg.HasField("cpu_millis"):
        v.int_range(f"{field}.cpu_millis", msg.cpu_millis, 0, 1 << 40)
    if msg.HasField("memory_bytes"):
        v.int_range(f"{field}.memory_bytes", msg.memory_bytes, 0, 1 << 60)
    if not v.size(f"{field}.gpus_by_model", len(msg.gpus_by_model), max_models, "models"):
        return codec.resources_from_proto(resources_pb2.Resources())
    for model, count in sorted(msg.gpus_by_model.items()):
        v.text(f"{field}.gpus_by_model", model, 64)
        v.check(bool(model), f"{field}.gpus_by_model", "model names must not be empty")
        v.int_range(f"{field}.gpus_by_model[{model!r}]", count, 0, 1_000_000)
    return codec.resources_from_proto(msg)


def _within_parent(
    v: val.Violations,
    guaranteed: Resources,
    limit: Resources,
    parent: Quota | None,
    children: list[Quota],
) -> None:
    """The tree stays consistent: a guarantee no ancestor could ever grant is a promise
    the scheduler cannot keep, so a child's guarantee must fit its parent's limit (checked
    both ways: setting the child, and setting the parent under existing children)."""
    if parent is not None:
        for name in _DIMENSIONS:
            g, lim = getattr(guaranteed, name), getattr(parent.limit, name)
            if g is not None and lim is not None and g > lim:
                v.add(
                    f"quota.guaranteed.{name}",
                    f"guaranteed {g} is above the limit {lim} of parent {parent.tenant!r}",
                )
        for model, g in guaranteed.gpus_by_model.items():
            lim = parent.limit.gpus_by_model.get(model)
            if lim is not None and g > lim:
                v.add(
                    f"quota.guaranteed.gpus_by_model[{model!r}]",
                    f"guaranteed {g} is above the limit {lim} of parent {parent.tenant!r}",
                )
    for child in children:
        for name in _DIMENSIONS:
            g, lim = getattr(child.guaranteed, name), getattr(limit, name)
            if g is not None and lim is not None and g > lim:
                v.add(
                    f"quota.limit.{name}",
                    f"limit {lim} is below the guarantee {g} of child {child.tenant!r}",
                )
        for model, g in child.guaranteed.gpus_by_model.items():
            lim = limit.gpus_by_model.get(model)
            if lim is not None and g > lim:
                v.add(
                    f"quota.limit.gpus_by_model[{model!r}]",
                    f"limit {lim} is below the guarantee {g} of child {child.tenant!r}",
                )


def quota_from_request(
    msg: quota_pb2.Quota, known: dict[str, Quota], max_models: int = 64
) -> Quota:
    """The validated quota; InvalidArgument lists every bad field."""
    v = val.Violations()
    v.tenant("quota.tenant", msg.tenant)
    v.tenant("quota.parent", msg.parent, required=False)
    parent = msg.parent or parent_of(msg.tenant)
    if msg.tenant and parent == msg.tenant:
        v.add("quota.parent", "a tenant cannot be its own parent")
    guaranteed = _resources(v, "quota.guaranteed", msg.guaranteed, max_models)
    limit = _resources(v, "quota.limit", msg.limit, max_models)
    for name in _DIMENSIONS:
        g, lim = getattr(guaranteed, name), getattr(limit, name)
        if g is not None and lim is not None and g > lim:
            v.add(f"quota.guaranteed.{name}", f"guaranteed {g} is above the limit {lim}")
    for model, g in guaranteed.gpus_by_model.items():
        lim = limit.gpus_by_model.get(model)
        if lim is not None and g > lim:
            v.add(
                f"quota.guaranteed.gpus_by_model[{model!r}]",
                f"guaranteed {g} is above the limit {lim}",
            )
    # Unset means 1; 0 is allowed (only capacity weighted siblings leave).
    weight = msg.weight if msg.HasField("weight") else 1.0
    v.check(0 <= weight <= MAX_WEIGHT, "quota.weight", f"must be in [0, {MAX_WEIGHT:g}]")
    lending = _resources(v, "quota.lending_limit", msg.lending_limit, max_models)
    v.check(
        not lending.gpus_by_model,
        "quota.lending_limit.gpus_by_model",
        "lending limits are per resource (gpus, cpu_millis, memory_bytes), not per model",
    )
    for name in _DIMENSIONS:
        lend, g = getattr(lending, name), getattr(guaranteed, name)
        if lend is not None and (g is None or lend > g):
            v.add(
                f"quota.lending_limit.{name}",
                f"lending limit {lend} is above the guarantee {g or 0}: only a guarantee is lent",
            )
    budget = None
    if msg.HasField("budget"):
        v.finite("quota.budget.amount", msg.budget.amount, 0.0, 1e15)
        v.int_range("quota.budget.period_seconds", msg.budget.period_seconds, 0, 10 * 366 * 86400)
        period = msg.budget.period
        known_period = period in quota_pb2.BudgetPeriod.values()
        v.check(known_period, "quota.budget.period", f"unknown value {period}")
        v.check(
            not (period and msg.budget.period_seconds),
            "quota.budget.period",
            "give a calendar period or period_seconds, not both (clear period_seconds to 0)",
        )
        budget = Budget(
            msg.budget.amount,
            msg.budget.period_seconds,
            msg.budget.stop_running,
            BudgetPeriod(period) if known_period else BudgetPeriod.NONE,
        )
    # The tree must stay a tree: walking up from the new parent must not reach the tenant.
    seen = {msg.tenant}
    ancestor = parent
    while ancestor:
        if ancestor in seen:
            v.add("quota.parent", f"would make a cycle through {ancestor!r}")
            break
        seen.add(ancestor)
        above = known.get(ancestor)
        ancestor = (above.parent or parent_of(ancestor)) if above else parent_of(ancestor)
    if msg.tenant:
        children = [
            q
            for q in known.values()
            if q.tenant != msg.tenant and (q.parent or parent_of(q.tenant)) == msg.tenant
        ]
        _within_parent(v, guaranteed, limit, known.get(parent), children)
    policy = _preemption_policy(v, msg)
    v.raise_if_any()
    return Quota(
        tenant=msg.tenant,
        parent=parent,
        guaranteed=guaranteed,
        limit=limit,
        weight=weight,
        budget=budget,
        lending_limit=lending,
        **policy,
    )


def _preemption_policy(v: val.Violations, msg: quota_pb2.Quota) -> dict[str, Any]:
    """The preemption policy fields: a value no enum defines is a client mistake
    (INVALID_ARGUMENT), never a silent default."""
    ok = True
    for name, enum in (
        ("within_tenant_preemption", quota_pb2.WithinTenantPreemption),
        ("reclaim_from_others", quota_pb2.ReclaimPolicy),
        ("preemption_while_borrowing", quota_pb2.BorrowingPreemption),
    ):
        value = getattr(msg, name)
        ok = ok and value in enum.values()
        v.check(value in enum.values(), f"quota.{name}", f"unknown value {value}")
    v.int_range(
        "quota.borrowing_max_priority",
        msg.borrowing_max_priority,
        -val.MAX_PRIORITY,
        val.MAX_PRIORITY,
    )
    return codec.preemption_policy_from_proto(msg) if ok else {}


# Identity and output-only fields: a mask naming them is a mistake, not a no-op.
_NOT_MASKABLE = frozenset({"tenant", "revision", "update_time", "etag"})
_MAX_ETAG = 64


def mask_paths(v: val.Violations, mask: field_mask_pb2.FieldMask) -> list[list[str]]:
    """The mask's paths split at dots; each must name a settable field of Quota."""
    out: list[list[str]] = []
    for i, path in enumerate(mask.paths):
        if path == "*":
            out.append([])  # AIP-134: the whole resource
            continue
        parts = path.split(".")
        desc: descriptor.Descriptor | None = quota_pb2.Quota.DESCRIPTOR
        ok = parts[0] not in _NOT_MASKABLE
        for part in parts:
            f = desc.fields_by_name.get(part) if desc is not None else None
            if f is None:
                ok = False
                break
            desc = f.message_type if f.type == f.TYPE_MESSAGE and not _is_map(f) else None
        if not ok:
            v.add(
                f"update_mask.paths[{i}]",
                f"{path!r} is not a settable quota field (parent, guaranteed, limit, weight, "
                "budget, or a sub-field like limit.gpus)",
            )
            continue
        out.append(parts)
    return out


def _is_map(f: descriptor.FieldDescriptor) -> bool:
    return f.message_type is not None and f.message_type.GetOptions().map_entry


def apply_mask(target: quota_pb2.Quota, source: quota_pb2.Quota, paths: list[list[str]]) -> None:
    """Copies the fields named by `paths` from `source` into `target`; a field unset in
    `source` is cleared (back to its default: e.g. an unbounded limit), and a sub-field
    of a message unset in `source` never creates that message in `target`."""
    for parts in paths:
        if not parts:
            target.CopyFrom(source)
            continue
        dst: Any = target
        src: Any = source
        for part in parts[:-1]:
            if src is not None and not src.HasField(part):
                src = None  # a sub-field of a message the request leaves unset
            if src is None and not dst.HasField(part):
                break
            dst = getattr(dst, part)
            src = None if src is None else getattr(src, part)
        else:
            _copy_field(dst, src, parts[-1])


def _copy_field(dst: Any, src: Any, name: str) -> None:
    """Copies field `name` from `src` into `dst`; `src` None (or the field unset there)
    clears it."""
    if src is None:
        dst.ClearField(name)
        return
    f = dst.DESCRIPTOR.fields_by_name[name]
    if _is_map(f):
        dst.ClearField(name)
        getattr(dst, name).update(getattr(src, name))
    elif f.has_presence:
        if not src.HasField(name):
            dst.ClearField(name)
        elif f.type == f.TYPE_MESSAGE:
            getattr(dst, name).CopyFrom(getattr(src, name))
        else:
            setattr(dst, name, getattr(src, name))
    else:
        setattr(dst, name, getattr(src, name))


def quota_out(quota: Quota) -> quota_pb2.Quota:
    """The quota as answered: with its etag."""
    msg = codec.quota_to_proto(quota)
    msg.etag = quota_etag(quota)
    return msg


class QuotaService(quota_pb2_grpc.QuotaServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _tenant(self, tenant: str) -> None:
        v = val.Violations()
        v.tenant("tenant", tenant)
        v.raise_if_any()

    @unary
    async def SetQuota(
        self, request: quota_pb2.SetQuotaRequest, context: Ctx
    ) -> quota_pb2.SetQuotaResponse:
        v = val.Violations()
        known, max_models = self.engine.state.quotas, self.engine.settings.max_quota_models
        if request.HasField("update_mask"):
            v.tenant("quota.tenant", request.quota.tenant)
        else:
            # A full replace: every bad field of the body is reported at once.
            try:
                quota_from_request(request.quota, known, max_models)
            except InvalidArgument as exc:
                for violation in exc.violations:
                    v.add(violation.field, violation.description)
        v.check(len(request.etag) <= _MAX_ETAG, "etag", f"must be at most {_MAX_ETAG} characters")
        paths = mask_paths(v, request.update_mask)
        v.raise_if_any()

        def build(current: Quota | None) -> Quota:
            # No mask: a full replace, as before masks existed. With one, unnamed fields
            # keep the current quota's values (the defaults, for a tenant with none yet).
            if not request.HasField("update_mask"):
                return quota_from_request(request.quota, known, max_models)
            merged = (
                codec.quota_to_proto(current)
                if current is not None
                else quota_pb2.Quota(tenant=request.quota.tenant)
            )
            apply_mask(merged, request.quota, paths)
            return quota_from_request(merged, known, max_models)

        quota = await self.engine.update_quota(request.quota.tenant, build, request.etag)
        saved = quota_out(quota)
        await self.engine.wait_committed(saved.revision)
        return quota_pb2.SetQuotaResponse(quota=saved)

    @unary
    async def GetQuota(
        self, request: quota_pb2.GetQuotaRequest, context: Ctx
    ) -> quota_pb2.GetQuotaResponse:
        self._tenant(request.tenant)
        authorize.read_tenant(auth.current(), request.tenant)
        # Encoded before waiting: a DeleteQuota meanwhile stamps the object it deletes.
        quota = await self.engine.found(lambda: self.engine.get_quota(request.tenant))
        answer = quota_out(quota)
        await self.engine.wait_committed(answer.revision)
        return quota_pb2.GetQuotaResponse(quota=answer)

    @unary
    async def ListQuotas(
        self, request: quota_pb2.ListQuotasRequest, context: Ctx
    ) -> quota_pb2.ListQuotasResponse:
        v = val.Violations()
        v.tenant("parent", request.parent, required=False)
        settings = self.engine.settings
        page_size = v.page_size("page_size", request.page_size, settings.max_page_size)
        fp = fingerprint("quotas", request.parent)
        after = decode_token(request.page_token, fp, v)
        v.raise_if_any()
        principal = auth.current()
        quotas = sorted(
            (
                q
                for q in self.engine.state.quotas.values()
                if (not request.parent or q.parent == request.parent)
                and authorize.can_read_tenant(principal, q.tenant)
            ),
            key=lambda q: q.tenant,
        )
        # Encoded before waiting: a DeleteQuota meanwhile stamps the object it deletes.
        page, token = paginate(
            quotas,
            lambda q: q.tenant,
            page_size,
            after,
            fp,
            quota_out,
            settings.max_page_bytes,
        )
        revision = self.engine.revision
        answer = quota_pb2.ListQuotasResponse(
            quotas=page,
            next_page_token=token,
            revision=revision,
        )
        await self.engine.wait_committed(revision)
        return answer

    @unary
    async def DeleteQuota(
        self, request: quota_pb2.DeleteQuotaRequest, context: Ctx
    ) -> quota_pb2.DeleteQuotaResponse:
        v = val.Violations()
        v.tenant("tenant", request.tenant)
        v.check(len(request.etag) <= _MAX_ETAG, "etag", f"must be at most {_MAX_ETAG} characters")
        v.raise_if_any()
        await self.engine.delete_quota(request.tenant, request.etag)
        return quota_pb2.DeleteQuotaResponse()

    @unary
    async def GetUsage(
        self, request: quota_pb2.GetUsageRequest, context: Ctx
    ) -> quota_pb2.GetUsageResponse:
        self._tenant(request.tenant)
        authorize.read_tenant(auth.current(), request.tenant)
        # Read with the usage's snapshot, before any await lets the state move on.
        reserved = reserved_of(self.engine.state.reservations.values(), request.tenant)
        u, revision = await self.engine.usage(request.tenant)
        spent, fraction = self.engine.cost.usage(request.tenant, self.engine.clock.now())
        usage = quota_pb2.TenantUsage(
            tenant=request.tenant,
            held=codec.resources_to_proto(u.held),
            pending=codec.resources_to_proto(u.pending),
            guaranteed=codec.resources_to_proto(u.guaranteed),
            limit=codec.resources_to_proto(u.limit),
            borrowed=codec.resources_to_proto(u.borrowed),
            dominant_share=u.dominant_share,
            weighted_dominant_share=u.weighted_dominant_share,
            fair_share=u.fair_share,
            running_allocations=u.running,
            pending_allocations=u.pending_count,
            recent_usage=codec.resources_to_proto(u.recent),
            usage_half_life_seconds=u.half_life_seconds,
            order_score=u.order_score,
            order_explanation=u.order_text,
            fair_share_resources=codec.resources_to_proto(u.fair_share_resources),
            cost=spent,
            budget_used_fraction=fraction,
            reserved=codec.resources_to_proto(reserved.active),
            reserved_upcoming=codec.resources_to_proto(reserved.upcoming),
        )
        out = quota_pb2.GetUsageResponse(usage=usage, revision=revision)
        stamp = codec.ts(self.engine.clock.now())
        if stamp is not None:
            out.read_time.CopyFrom(stamp)
        return out
