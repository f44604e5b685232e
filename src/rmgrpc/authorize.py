"""Who may do what: every authorization rule of rmgrpc, in one place.

Two levels. `method()` (called by the auth interceptor for every RPC) decides by role
alone whether a principal may call a method at all. The functions below it are called by
the servicers with the resource in hand: a tenant reaches only its own subtree (tested
with `state.in_subtree`, so "org/a" never covers "org/ab"), an agent only its node(s).
Every function takes the principal of the call, `None` when authentication is off, and
then allows everything.

What a caller may not see is answered as if it did not exist (`NotFound`, the engine's
own message), so nobody learns that another tenant's allocation exists; what it may not
do is `PermissionDenied`.
"""

from __future__ import annotations

import fnmatch

from rmgrpc.auth import Principal, Role, audit, current_method
from rmgrpc.errors import NotFound, PermissionDenied
from rmgrpc.model import Allocation, Reservation
from rmgrpc.state import in_subtree

ADMIN, TENANT, AGENT, VIEWER = Role.ADMIN, Role.TENANT, Role.AGENT, Role.VIEWER

_A = "/rmgrpc.v1.AllocatorService/"
_Q = "/rmgrpc.v1.QuotaService/"
_G = "/rmgrpc.v1.GpuManagerService/"
_R = "/rmgrpc.v1.ReservationService/"
_T = "/rmgrpc.v1.TelemetryService/"

# Which roles may call each method; what they may touch is narrowed further per resource.
# Reads are what viewers may call (and what the audit log leaves out for admins).
READS: dict[str, frozenset[Role]] = {
    _A + "GetAllocation": frozenset({ADMIN, VIEWER, TENANT, AGENT}),
    _A + "ListAllocations": frozenset({ADMIN, VIEWER, TENANT, AGENT}),
    _A + "WatchAllocations": frozenset({ADMIN, VIEWER, TENANT, AGENT}),
    _Q + "GetQuota": frozenset({ADMIN, VIEWER, TENANT}),
    _Q + "ListQuotas": frozenset({ADMIN, VIEWER, TENANT}),
    _Q + "GetUsage": frozenset({ADMIN, VIEWER, TENANT}),
    # Inventory shows which allocation holds each GPU: not for tenants (other tenants'
    # allocations); an agent sees its own node.
    _G + "GetNode": frozenset({ADMIN, VIEWER, AGENT}),
    _G + "ListNodes": frozenset({ADMIN, VIEWER}),
    _G + "ListGpus": frozenset({ADMIN, VIEWER, AGENT}),
    _R + "GetReservation": frozenset({ADMIN, VIEWER, TENANT}),
    _R + "ListReservations": frozenset({ADMIN, VIEWER, TENANT}),
    _R + "WatchReservations": frozenset({ADMIN, VIEWER, TENANT}),
    # Cluster-wide figures include every tenant's: operators and viewers only.
    _T + "GetClusterSummary": frozenset({ADMIN, VIEWER}),
    _T + "StreamClusterMetrics": frozenset({ADMIN, VIEWER}),
    # Cost is read like usage: a tenant sees its own subtree's.
    _T + "GetCostReport": frozenset({ADMIN, VIEWER, TENANT}),
}
WRITES: dict[str, frozenset[Role]] = {
    _A + "Allocate": frozenset({ADMIN, TENANT}),
    _A + "ReleaseAllocation": frozenset({ADMIN, TENANT}),
    # An agent keeps alive the work placed on its node (the servicer's visibility check
    # hides every other allocation from it).
    _A + "RenewAllocation": frozenset({ADMIN, TENANT, AGENT}),
    _Q + "SetQuota": frozenset({ADMIN}),
    _Q + "DeleteQuota": frozenset({ADMIN}),
    _G + "RegisterNode": frozenset({ADMIN, AGENT}),
    _G + "Heartbeat": frozenset({ADMIN, AGENT}),
    _G + "CordonNode": frozenset({ADMIN}),
    _G + "UncordonNode": frozenset({ADMIN}),
    _G + "DrainNode": frozenset({ADMIN}),
    _R + "CreateReservation": frozenset({ADMIN, TENANT}),
    _R + "CancelReservation": frozenset({ADMIN, TENANT}),
}
_ADMIN_ONLY = frozenset({ADMIN})


def is_read(method: str) -> bool:
    return method in READS


def roles_for(method: str) -> frozenset[Role]:
    """The roles that may call `method`; a method not listed is for admins only, so a
    service added later is closed until someone opens it here."""
    return READS.get(method) or WRITES.get(method) or _ADMIN_ONLY


def method(principal: Principal | None, full_method: str) -> None:
    """Raises PermissionDenied when `principal`'s role may not call `full_method`."""
    if principal is None or principal.role in roles_for(full_method):
        return
    name = full_method.rsplit("/", 1)[-1]
    raise PermissionDenied(
        str(principal), full_method, f"{principal.role} principal {principal.name!r} may not {name}"
    )


def _deny(principal: Principal, action: str, why: str) -> PermissionDenied:
    """The refusal, logged for the audit trail with the RPC it refuses."""
    method = current_method()
    audit.warning("denied PERMISSION_DENIED principal=%s method=%s: %s", principal, method, why)
    return PermissionDenied(str(principal), method or action, f"{principal.name!r} {why}")


# -- tenants ------------------------------------------------------------------------------


def can_read_tenant(principal: Principal | None, tenant: str) -> bool:
    """May `principal` see `tenant`'s data (its quota, usage, allocations, reservations)?"""
    if principal is None or principal.role in (ADMIN, VIEWER):
        return True
    return principal.role == TENANT and bool(tenant) and in_subtree(tenant, principal.tenant)


def read_tenant(principal: Principal | None, tenant: str) -> None:
    """Raises PermissionDenied unless `principal` may see `tenant`'s data."""
    if not can_read_tenant(principal, tenant):
        assert principal is not None
        raise _deny(principal, "read", f"may not read tenant {tenant!r}")


def write_tenant(principal: Principal | None, tenant: str) -> None:
    """Raises PermissionDenied unless `principal` may act for `tenant` (Allocate, reserve)."""
    if principal is None or principal.role == ADMIN:
        return
    if principal.role == TENANT and tenant and in_subtree(tenant, principal.tenant):
        return
    raise _deny(principal, "write", f"may not act for tenant {tenant!r}")


def tenant_scope(principal: Principal | None, tenant: str) -> str:
    """The tenant filter a list or watch really runs with: a tenant principal's own subtree
    when it asks for none or for a wider one (never more), what it asked for inside it;
    PermissionDenied for a tenant outside it."""
    if principal is None or principal.role != TENANT:
        return tenant
    own = principal.tenant
    if not tenant or in_subtree(own, tenant):
        return own
    if in_subtree(tenant, own):
        return tenant
    raise _deny(principal, "read", f"may not read tenant {tenant!r}")


# -- nodes --------------------------------------------------------------------------------


def agent_covers(principal: Principal, node_id: str) -> bool:
    """Is `node_id` the agent's node, or matched by its pattern?"""
    return bool(node_id) and fnmatch.fnmatchcase(node_id, principal.node)


def node(principal: Principal | None, node_id: str) -> None:
    """Raises PermissionDenied when an agent names a node other than its own (other roles
    were already decided by `method`)."""
    if principal is None or principal.role != AGENT or agent_covers(principal, node_id):
        return
    raise _deny(principal, "node", f"is the agent of {principal.node!r}, not of {node_id!r}")


def node_scope(principal: Principal | None, node_id: str) -> str:
    """The node filter a list or watch really runs with: an agent's own node when it names
    none (an agent with a pattern must name one); PermissionDenied for another node."""
    if principal is None or principal.role != AGENT:
        return node_id
    if not node_id:
        if any(c in principal.node for c in "*?["):
            raise _deny(principal, "node", "must name its node (node_id)")
        return principal.node
    node(principal, node_id)
    return node_id


# -- allocations --------------------------------------------------------------------------


def can_see_allocation(principal: Principal | None, allocation: Allocation) -> bool:
    """Admins and viewers see every allocation, a tenant those of its subtree, an agent
    those placed on its node(s)."""
    if principal is None or principal.role in (ADMIN, VIEWER):
        return True
    if principal.role == TENANT:
        return in_subtree(allocation.tenant, principal.tenant)
    if principal.role == AGENT:
        return any(agent_covers(principal, p.node_id) for p in allocation.placements)
    return False


def allocation(principal: Principal | None, allocation: Allocation) -> None:
    """Raises NotFound, exactly as for an unknown id, for an allocation `principal` may
    not see: its existence is not for them to learn."""
    if not can_see_allocation(principal, allocation):
        audit.warning(
            "denied NOT_FOUND principal=%s method=%s resource=allocation %s (not theirs)",
            principal,
            current_method(),
            allocation.id,
        )
        raise NotFound("allocation", allocation.id)


def allocation_scope(principal: Principal | None, tenant: str, node_id: str) -> tuple[str, str]:
    """(tenant, node_id) filters a ListAllocations or WatchAllocations really runs with."""
    return tenant_scope(principal, tenant), node_scope(principal, node_id)


# -- reservations -------------------------------------------------------------------------


def reservation(principal: Principal | None, reservation: Reservation) -> None:
    """Raises NotFound, exactly as for an unknown id, for a reservation `principal` may
    not see: admins and viewers see all, a tenant those of its subtree (agents none: the
    method check already refused them)."""
    if can_read_tenant(principal, reservation.tenant):
        return
    audit.warning(
        "denied NOT_FOUND principal=%s method=%s resource=reservation %s (not theirs)",
        principal,
        current_method(),
        reservation.id,
    )
    raise NotFound("reservation", reservation.id)
