"""What `rmgrpcctl` knows about tenants as a whole: the per-tenant status behind
`rmgrpcctl tenants` and `top`, and the check that turns a mistyped tenant name into a
"no such tenant" hint instead of a table of zeros.

The server has no list of tenants: a tenant exists through its quota or its
allocations. So the known names are the quota tenants, the tenants of live allocations,
and their ancestors (``org`` for ``org/team``).
"""

from __future__ import annotations

import asyncio
import difflib
from collections.abc import Iterable, Sequence

from rmgrpc.v1 import allocator_pb2, quota_pb2
from rmgrpc_client import _format as fmt
from rmgrpc_client._async_client import AsyncClient
from rmgrpc_client._cliutil import NoSuchTenant


def in_subtree(tenant: str, root: str) -> bool:
    """`tenant` is `root` or below it (``org/team`` is in ``org``'s subtree)."""
    return tenant == root or tenant.startswith(root + "/")


def with_ancestors(names: Iterable[str]) -> set[str]:
    """`names` and every tenant above them: ``org/a/b`` brings ``org`` and ``org/a``."""
    out: set[str] = set()
    for name in names:
        parts = name.split("/")
        out.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    out.discard("")
    return out


async def live_allocations(client: AsyncClient, tenant: str = "") -> list[allocator_pb2.Allocation]:
    """Every PENDING or ALLOCATED allocation (of `tenant`'s subtree), all pages."""
    states = [allocator_pb2.ALLOCATION_STATE_PENDING, allocator_pb2.ALLOCATION_STATE_ALLOCATED]
    return [a async for a in client.list_allocations(tenant=tenant, states=states)]


async def known_tenants(
    client: AsyncClient, allocations: Sequence[allocator_pb2.Allocation] | None = None
) -> set[str]:
    """Tenant names with a quota or a live allocation, and their ancestors."""
    quotas = [q.tenant async for q in client.list_quotas()]
    if allocations is None:
        allocations = await live_allocations(client)
    return with_ancestors([*quotas, *(a.tenant for a in allocations)])


async def check_tenant(client: AsyncClient, tenant: str) -> None:
    """Raise `NoSuchTenant` (with close matches) when nothing — no quota, no allocation in
    any state — knows `tenant`; callers ask only when the answer came back empty, so a
    normal call costs nothing extra."""
    known = await known_tenants(client)
    if tenant in known:
        return
    page = await client.list_allocations_page(tenant=tenant, page_size=1)
    if page.items:  # only ended allocations: a real tenant with nothing live
        return
    raise NoSuchTenant(tenant, difflib.get_close_matches(tenant, sorted(known), n=3))


def usage_is_empty(u: quota_pb2.TenantUsage) -> bool:
    """Nothing held, pending, guaranteed or limited: what the server answers for a name it
    has never seen."""
    amounts = (u.held, u.pending, u.guaranteed, u.limit)
    # Fields are set to explicit zeros, so compare values, not presence.
    return not (
        u.running_allocations
        or u.pending_allocations
        or u.cost
        or any(fmt.format_amounts(r) != "0" for r in amounts)
    )


async def tenant_statuses(
    client: AsyncClient,
    only: Sequence[str] = (),
    allocations: Sequence[allocator_pb2.Allocation] | None = None,
) -> list[fmt.TenantStatus]:
    """Per tenant (all known ones, or the subtrees of `only`), sorted by name so each
    parent precedes its children: quota, usage, and its oldest pending allocation."""
    quotas = {q.tenant: q async for q in client.list_quotas()}
    if allocations is None:
        allocations = await live_allocations(client)
    names = with_ancestors([*quotas, *(a.tenant for a in allocations)])
    for tenant in only:
        if tenant not in names:
            await check_tenant(client, tenant)
            names.add(tenant)
    if only:
        names = {n for n in names if any(in_subtree(n, root) for root in only)}
    ordered = sorted(names)
    usages = await asyncio.gather(*(client.get_usage(n) for n in ordered))
    out = []
    for name, usage in zip(ordered, usages, strict=True):
        waiting = [
            fmt.stamp_seconds(a.create_time)
            for a in allocations
            if a.state == allocator_pb2.ALLOCATION_STATE_PENDING
            and in_subtree(a.tenant, name)
            and a.HasField("create_time")
        ]
        if not usage.tenant:  # the server left usage unset: nothing known about it
            usage = quota_pb2.TenantUsage(tenant=name)
        out.append(
            fmt.TenantStatus(
                tenant=name,
                usage=usage,
                quota=quotas.get(name),
                oldest_pending=min(waiting) if waiting else None,
            )
        )
    return out
