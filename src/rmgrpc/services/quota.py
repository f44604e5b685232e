"""rmgrpc.v1.QuotaService: what each tenant is guaranteed, may hold, and uses."""

from __future__ import annotations

from rmgrpc import codec
from rmgrpc.engine import Engine
from rmgrpc.model import Budget, Quota, Resources, parent_of
from rmgrpc.services import validate as val
from rmgrpc.services.pagination import decode_token, fingerprint, paginate
from rmgrpc.services.status import Context as Ctx
from rmgrpc.services.status import unary
from rmgrpc.v1 import quota_pb2, quota_pb2_grpc, resources_pb2

MAX_WEIGHT = 1_000_000.0


def _resources(v: val.Violations, field: str, msg: resources_pb2.Resources) -> Resources:
    if msg.HasField("gpus"):
        v.int_range(f"{field}.gpus", msg.gpus, 0, 1_000_000)
    if msg.HasField("cpu_millis"):
        v.int_range(f"{field}.cpu_millis", msg.cpu_millis, 0, 1 << 40)
    if msg.HasField("memory_bytes"):
        v.int_range(f"{field}.memory_bytes", msg.memory_bytes, 0, 1 << 60)
    for model, count in sorted(msg.gpus_by_model.items()):
        v.text(f"{field}.gpus_by_model", model, 64)
        v.check(bool(model), f"{field}.gpus_by_model", "model names must not be empty")
        v.int_range(f"{field}.gpus_by_model[{model!r}]", count, 0, 1_000_000)
    return codec.resources_from_proto(msg)


def quota_from_request(msg: quota_pb2.Quota, known: dict[str, Quota]) -> Quota:
    """The validated quota; InvalidArgument lists every bad field."""
    v = val.Violations()
    v.tenant("quota.tenant", msg.tenant)
    v.tenant("quota.parent", msg.parent, required=False)
    parent = msg.parent or parent_of(msg.tenant)
    if msg.tenant and parent == msg.tenant:
        v.add("quota.parent", "a tenant cannot be its own parent")
    guaranteed = _resources(v, "quota.guaranteed", msg.guaranteed)
    limit = _resources(v, "quota.limit", msg.limit)
    for name in ("gpus", "cpu_millis", "memory_bytes"):
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
    weight = msg.weight or 1.0
    v.check(0 < weight <= MAX_WEIGHT, "quota.weight", f"must be in (0, {MAX_WEIGHT:g}]")
    budget = None
    if msg.HasField("budget"):
        v.check(msg.budget.amount >= 0, "quota.budget.amount", "must be >= 0")
        v.int_range("quota.budget.period_seconds", msg.budget.period_seconds, 0, 10 * 366 * 86400)
        budget = Budget(msg.budget.amount, msg.budget.period_seconds)
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
    v.raise_if_any()
    return Quota(
        tenant=msg.tenant,
        parent=parent,
        guaranteed=guaranteed,
        limit=limit,
        weight=weight,
        budget=budget,
    )


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
        quota = quota_from_request(request.quota, self.engine.state.quotas)
        saved = codec.quota_to_proto(await self.engine.set_quota(quota))
        await self.engine.wait_committed(saved.revision)
        return quota_pb2.SetQuotaResponse(quota=saved)

    @unary
    async def GetQuota(
        self, request: quota_pb2.GetQuotaRequest, context: Ctx
    ) -> quota_pb2.GetQuotaResponse:
        self._tenant(request.tenant)
        # Encoded before waiting: a DeleteQuota meanwhile stamps the object it deletes.
        quota = await self.engine.found(lambda: self.engine.get_quota(request.tenant))
        answer = codec.quota_to_proto(quota)
        await self.engine.wait_committed(answer.revision)
        return quota_pb2.GetQuotaResponse(quota=answer)

    @unary
    async def ListQuotas(
        self, request: quota_pb2.ListQuotasRequest, context: Ctx
    ) -> quota_pb2.ListQuotasResponse:
        v = val.Violations()
        v.tenant("parent", request.parent, required=False)
        page_size = v.page_size("page_size", request.page_size)
        fp = fingerprint("quotas", request.parent)
        after = decode_token(request.page_token, fp, v)
        v.raise_if_any()
        quotas = sorted(
            (
                q
                for q in self.engine.state.quotas.values()
                if not request.parent or q.parent == request.parent
            ),
            key=lambda q: q.tenant,
        )
        page, token = paginate(quotas, lambda q: q.tenant, page_size, after, fp)
        revision = self.engine.revision
        # Encoded before waiting: a DeleteQuota meanwhile stamps the object it deletes.
        answer = quota_pb2.ListQuotasResponse(
            quotas=[codec.quota_to_proto(q) for q in page],
            next_page_token=token,
            revision=revision,
        )
        await self.engine.wait_committed(revision)
        return answer

    @unary
    async def DeleteQuota(
        self, request: quota_pb2.DeleteQuotaRequest, context: Ctx
    ) -> quota_pb2.DeleteQuotaResponse:
        self._tenant(request.tenant)
        await self.engine.delete_quota(request.tenant)
        return quota_pb2.DeleteQuotaResponse()

    @unary
    async def GetUsage(
        self, request: quota_pb2.GetUsageRequest, context: Ctx
    ) -> quota_pb2.GetUsageResponse:
        self._tenant(request.tenant)
        u, revision = await self.engine.usage(request.tenant)
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
        )
        out = quota_pb2.GetUsageResponse(usage=usage, revision=revision)
        stamp = codec.ts(self.engine.clock.now())
        if stamp is not None:
            out.read_time.CopyFrom(stamp)
        return out
