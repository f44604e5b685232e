"""`Client`: the blocking twin of `AsyncClient`, for scripts and threads; same methods,
same arguments, same results, on a plain (non-asyncio) gRPC channel."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, cast

import grpc
from google.protobuf import message

from rmgrpc.v1 import (
    allocator_pb2,
    allocator_pb2_grpc,
    gpu_manager_pb2,
    gpu_manager_pb2_grpc,
    quota_pb2,
    quota_pb2_grpc,
    resources_pb2,
    telemetry_pb2,
    telemetry_pb2_grpc,
)
from rmgrpc_client._channel import (
    CHANNEL_OPTIONS,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    auth_metadata,
    tls_credentials,
)
from rmgrpc_client._errors import RmgrpcError, from_rpc_error
from rmgrpc_client._paging import Page, iterate_pages_sync
from rmgrpc_client._requests import (
    allocate_request,
    quota_message,
    quota_request,
    quota_update_request,
)

if TYPE_CHECKING:
    from rmgrpc_client.keepalive import Keepalive

_R = TypeVar("_R", bound=message.Message)


class Client:
    """A blocking client for one rmgrpc server; `AsyncClient` is the asyncio one.

    >>> with Client("127.0.0.1:50051", token="s3cret") as client:
    ...     alloc = client.allocate("org/team", 2, gpus=4, gpu_model="H100")

    `target` is ``host:port``; pass `channel` instead to bring your own (TLS, interceptors,
    options) — the client then leaves it open on `close()`. `credentials` makes the client
    open a TLS channel to `target`; or name PEM files: `tls_ca` (the CA to trust) and, for
    mutual TLS, `tls_cert` and `tls_key`. `token` is sent as ``authorization: Bearer <token>``.
    `timeout` (seconds, `None` for none) bounds each unary call; watch streams are unbounded.
    Every failed call raises `RmgrpcError` (a subclass per status code).
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        channel: grpc.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        self._owns_channel = channel is None
        if credentials is None and (tls_ca or tls_cert):
            credentials = tls_credentials(tls_ca, tls_cert, tls_key)
        if channel is None:
            if credentials is not None:
                channel = grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
            else:
                channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._channel = channel
        self._metadata = auth_metadata(token)
        self._timeout = timeout
        self._allocator = allocator_pb2_grpc.AllocatorServiceStub(channel)
        self._gpu_manager = gpu_manager_pb2_grpc.GpuManagerServiceStub(channel)
        self._quota = quota_pb2_grpc.QuotaServiceStub(channel)
        self._telemetry = telemetry_pb2_grpc.TelemetryServiceStub(channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel, if this client opened it."""
        if self._owns_channel:
            self._channel.close()

    def _call(self, method: Any, request: message.Message, response_type: type[_R]) -> _R:
        try:
            response = method(request, metadata=self._metadata, timeout=self._timeout)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return cast(_R, response)

    # -- AllocatorService -------------------------------------------------------------

    def allocate(
        self,
        tenant: str,
        count: int = 1,
        *,
        gpus: int = 0,
        gpu_model: str = "",
        cpu_millis: int = 0,
        memory_bytes: int = 0,
        node_selector: Mapping[str, str] | None = None,
        priority: int = 0,
        lease_seconds: int = 0,
        max_duration_seconds: int = 0,
        reservation_id: str = "",
        request_id: str | None = None,
        no_requeue: bool = False,
    ) -> allocator_pb2.Allocation:
        """Ask for `count` replicas (a gang: all placed or none) of the given shape.

        Returns the allocation once the scheduler has considered it: ALLOCATED with
        `placements`, or PENDING with `pending_reason`. `request_id` defaults to a fresh
        uuid4, and the channel retries UNAVAILABLE with it, so a retry never allocates twice;
        pass your own to make retries across processes idempotent too. `no_requeue`: when
        a drain of its node ends it, no PENDING replacement is created.
        """
        request = allocate_request(
            tenant=tenant,
            count=count,
            gpus=gpus,
            gpu_model=gpu_model,
            cpu_millis=cpu_millis,
            memory_bytes=memory_bytes,
            node_selector=node_selector,
            priority=priority,
            lease_seconds=lease_seconds,
            max_duration_seconds=max_duration_seconds,
            reservation_id=reservation_id,
            request_id=request_id,
            dry_run=False,
            no_requeue=no_requeue,
        )
        response = self._call(self._allocator.Allocate, request, allocator_pb2.AllocateResponse)
        return response.allocation

    def allocate_dry_run(
        self,
        tenant: str,
        count: int = 1,
        *,
        gpus: int = 0,
        gpu_model: str = "",
        cpu_millis: int = 0,
        memory_bytes: int = 0,
        node_selector: Mapping[str, str] | None = None,
        priority: int = 0,
        lease_seconds: int = 0,
        max_duration_seconds: int = 0,
        reservation_id: str = "",
    ) -> allocator_pb2.AllocateResponse:
        """`Allocate` with `dry_run`: what would happen now, changing nothing.

        The whole response is returned: `allocation` (its would-be placements, or the
        `pending_reason`) and `preempted_allocation_ids` (whom it would preempt).
        """
        request = allocate_request(
            tenant=tenant,
            count=count,
            gpus=gpus,
            gpu_model=gpu_model,
            cpu_millis=cpu_millis,
            memory_bytes=memory_bytes,
            node_selector=node_selector,
            priority=priority,
            lease_seconds=lease_seconds,
            max_duration_seconds=max_duration_seconds,
            reservation_id=reservation_id,
            request_id=None,
            dry_run=True,
        )
        return self._call(self._allocator.Allocate, request, allocator_pb2.AllocateResponse)

    def get_allocation(self, allocation_id: str) -> allocator_pb2.Allocation:
        """The allocation with this id (NotFoundError when there is none)."""
        response = self._call(
            self._allocator.GetAllocation,
            allocator_pb2.GetAllocationRequest(id=allocation_id),
            allocator_pb2.GetAllocationResponse,
        )
        return response.allocation

    def list_allocations_page(
        self,
        *,
        tenant: str = "",
        node_id: str = "",
        states: Sequence[allocator_pb2.AllocationState.ValueType] = (),
        page_size: int = 0,
        page_token: str = "",
    ) -> Page[allocator_pb2.Allocation]:
        """One page of allocations matching the filters (empty filters match all)."""
        response = self._call(
            self._allocator.ListAllocations,
            allocator_pb2.ListAllocationsRequest(
                tenant=tenant,
                node_id=node_id,
                states=list(states),
                page_size=page_size,
                page_token=page_token,
            ),
            allocator_pb2.ListAllocationsResponse,
        )
        return Page(list(response.allocations), response.next_page_token, response.revision)

    def list_allocations(
        self,
        *,
        tenant: str = "",
        node_id: str = "",
        states: Sequence[allocator_pb2.AllocationState.ValueType] = (),
        page_size: int = 0,
    ) -> Iterator[allocator_pb2.Allocation]:
        """Every allocation matching the filters, across all pages: ``for a in ...``."""
        return iterate_pages_sync(
            lambda token: self.list_allocations_page(
                tenant=tenant, node_id=node_id, states=states, page_size=page_size, page_token=token
            )
        )

    def release(self, allocation_id: str) -> allocator_pb2.Allocation:
        """End the allocation (or cancel it while pending). Releasing twice is harmless."""
        response = self._call(
            self._allocator.ReleaseAllocation,
            allocator_pb2.ReleaseAllocationRequest(id=allocation_id),
            allocator_pb2.ReleaseAllocationResponse,
        )
        return response.allocation

    def renew(self, allocation_id: str, lease_seconds: int = 0) -> allocator_pb2.Allocation:
        """Extend the lease by `lease_seconds` from now (0: the allocation's own length)."""
        response = self._call(
            self._allocator.RenewAllocation,
            allocator_pb2.RenewAllocationRequest(id=allocation_id, lease_seconds=lease_seconds),
            allocator_pb2.RenewAllocationResponse,
        )
        return response.allocation

    def keepalive(
        self,
        allocation: str | allocator_pb2.Allocation,
        *,
        lease_seconds: int = 0,
        fraction: float = 1 / 3,
        on_renewed: Callable[[allocator_pb2.Allocation], None] | None = None,
        on_error: Callable[[RmgrpcError], None] | None = None,
    ) -> Keepalive:
        """Renew `allocation` every `fraction` of its lease until stopped; use it as
        ``with client.keepalive(a.id):`` (see `rmgrpc_client.keepalive`)."""
        from rmgrpc_client.keepalive import Keepalive

        return Keepalive(
            self,
            allocation,
            lease_seconds=lease_seconds,
            fraction=fraction,
            on_renewed=on_renewed,
            on_error=on_error,
        )

    def watch_events(
        self,
        *,
        start_revision: int = 0,
        tenant: str = "",
        node_id: str = "",
        allocation_id: str = "",
        budget_alerts: bool = False,
    ) -> Generator[allocator_pb2.AllocationEvent, None, None]:
        """One raw WatchAllocations stream, PROGRESS events included; it ends on the first
        error (raised as `RmgrpcError`) and does not resume. For a watch that survives
        disconnects and compaction use `AsyncClient.watch_allocations`."""
        call = self._allocator.WatchAllocations(
            allocator_pb2.WatchAllocationsRequest(
                start_revision=start_revision,
                tenant=tenant,
                node_id=node_id,
                allocation_id=allocation_id,
                budget_alerts=budget_alerts,
            ),
            metadata=self._metadata,
        )
        try:
            yield from call
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    # -- GpuManagerService ------------------------------------------------------------

    def register_node(
        self,
        node_id: str,
        *,
        cpu_millis: int = 0,
        memory_bytes: int = 0,
        labels: Mapping[str, str] | None = None,
        gpus: Sequence[gpu_manager_pb2.Gpu] = (),
    ) -> gpu_manager_pb2.RegisterNodeResponse:
        """Add the node, or update its capacity and GPUs. The response carries the
        `heartbeat_interval_seconds` the agent should keep."""
        return self._call(
            self._gpu_manager.RegisterNode,
            gpu_manager_pb2.RegisterNodeRequest(
                node_id=node_id,
                cpu_millis=cpu_millis,
                memory_bytes=memory_bytes,
                labels=dict(labels or {}),
                gpus=list(gpus),
            ),
            gpu_manager_pb2.RegisterNodeResponse,
        )

    def heartbeat(
        self, node_id: str, gpus: Sequence[gpu_manager_pb2.GpuStatus] = ()
    ) -> gpu_manager_pb2.HeartbeatResponse:
        """Refresh the node's lease, reporting GPU health and metrics.
        NotFoundError means the server does not know the node: register it again."""
        return self._call(
            self._gpu_manager.Heartbeat,
            gpu_manager_pb2.HeartbeatRequest(node_id=node_id, gpus=list(gpus)),
            gpu_manager_pb2.HeartbeatResponse,
        )

    def get_node(self, node_id: str) -> gpu_manager_pb2.Node:
        """The node with its GPUs, state and allocated capacity."""
        response = self._call(
            self._gpu_manager.GetNode,
            gpu_manager_pb2.GetNodeRequest(node_id=node_id),
            gpu_manager_pb2.GetNodeResponse,
        )
        return response.node

    def list_nodes_page(
        self,
        *,
        states: Sequence[gpu_manager_pb2.NodeState.ValueType] = (),
        label_selector: Mapping[str, str] | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> Page[gpu_manager_pb2.Node]:
        """One page of nodes in `states` (empty: all) carrying every label of the selector."""
        response = self._call(
            self._gpu_manager.ListNodes,
            gpu_manager_pb2.ListNodesRequest(
                states=list(states),
                label_selector=dict(label_selector or {}),
                page_size=page_size,
                page_token=page_token,
            ),
            gpu_manager_pb2.ListNodesResponse,
        )
        return Page(list(response.nodes), response.next_page_token, response.revision)

    def list_nodes(
        self,
        *,
        states: Sequence[gpu_manager_pb2.NodeState.ValueType] = (),
        label_selector: Mapping[str, str] | None = None,
        page_size: int = 0,
    ) -> Iterator[gpu_manager_pb2.Node]:
        """Every matching node, across all pages."""
        return iterate_pages_sync(
            lambda token: self.list_nodes_page(
                states=states, label_selector=label_selector, page_size=page_size, page_token=token
            )
        )

    def list_gpus_page(
        self,
        *,
        node_id: str = "",
        model: str = "",
        free_only: bool = False,
        page_size: int = 0,
        page_token: str = "",
    ) -> Page[gpu_manager_pb2.Gpu]:
        """One page of GPUs, optionally of one node or model, or only those free."""
        response = self._call(
            self._gpu_manager.ListGpus,
            gpu_manager_pb2.ListGpusRequest(
                node_id=node_id,
                model=model,
                free_only=free_only,
                page_size=page_size,
                page_token=page_token,
            ),
            gpu_manager_pb2.ListGpusResponse,
        )
        return Page(list(response.gpus), response.next_page_token, response.revision)

    def list_gpus(
        self,
        *,
        node_id: str = "",
        model: str = "",
        free_only: bool = False,
        page_size: int = 0,
    ) -> Iterator[gpu_manager_pb2.Gpu]:
        """Every matching GPU, across all pages."""
        return iterate_pages_sync(
            lambda token: self.list_gpus_page(
                node_id=node_id,
                model=model,
                free_only=free_only,
                page_size=page_size,
                page_token=token,
            )
        )

    def cordon(
        self, node_id: str, reason: str = "", gpu_indices: Sequence[int] = ()
    ) -> gpu_manager_pb2.Node:
        """Stop new work landing on the node; running work stays. With `gpu_indices`, only
        those GPUs are pinned out of service (no automatic return by the health policy)."""
        response = self._call(
            self._gpu_manager.CordonNode,
            gpu_manager_pb2.CordonNodeRequest(
                node_id=node_id, reason=reason, gpu_indices=list(gpu_indices)
            ),
            gpu_manager_pb2.CordonNodeResponse,
        )
        return response.node

    def uncordon(self, node_id: str, gpu_indices: Sequence[int] = ()) -> gpu_manager_pb2.Node:
        """Let new work land on the node again. With `gpu_indices`, only those GPUs return
        to service (HEALTHY; a later bad sample quarantines them again)."""
        response = self._call(
            self._gpu_manager.UncordonNode,
            gpu_manager_pb2.UncordonNodeRequest(node_id=node_id, gpu_indices=list(gpu_indices)),
            gpu_manager_pb2.UncordonNodeResponse,
        )
        return response.node

    def drain(
        self, node_id: str, reason: str = "", grace_seconds: int = 0
    ) -> gpu_manager_pb2.DrainNodeResponse:
        """Cordon the node and ask its allocations to leave within `grace_seconds`
        (0: the server's grace period). The response lists the allocations asked."""
        return self._call(
            self._gpu_manager.DrainNode,
            gpu_manager_pb2.DrainNodeRequest(
                node_id=node_id, reason=reason, grace_seconds=grace_seconds
            ),
            gpu_manager_pb2.DrainNodeResponse,
        )

    # -- QuotaService -----------------------------------------------------------------

    def set_quota(
        self,
        tenant: str,
        *,
        parent: str = "",
        guaranteed: resources_pb2.Resources | None = None,
        limit: resources_pb2.Resources | None = None,
        weight: float = 0.0,
        budget: quota_pb2.Budget | None = None,
        update_mask: Sequence[str] | None = None,
        etag: str = "",
        policy: quota_pb2.Quota | None = None,
    ) -> quota_pb2.Quota:
        """Create or replace the tenant's quota. Unset limit fields are unbounded; weight 0
        and an empty parent take the server's defaults (1, and the tenant's path prefix).

        `update_mask` (e.g. ``["weight", "limit.gpus"]``) changes only the fields it names
        and keeps the rest; `None` replaces the whole quota. `etag` (from a read) makes the
        write conditional: `FailedPreconditionError` if the quota changed since.
        `update_quota` builds the mask for you. `policy`: a Quota whose preemption policy
        fields (`within_tenant_preemption`, `reclaim_from_others`,
        `preemption_while_borrowing`, `borrowing_max_priority`) are sent."""
        quota = quota_message(
            tenant=tenant,
            parent=parent,
            guaranteed=guaranteed,
            limit=limit,
            weight=weight,
            budget=budget,
            policy=policy,
        )
        response = self._call(
            self._quota.SetQuota,
            quota_request(quota, update_mask, etag),
            quota_pb2.SetQuotaResponse,
        )
        return response.quota

    def update_quota(
        self,
        tenant: str,
        *,
        parent: str | None = None,
        guaranteed: resources_pb2.Resources | None = None,
        limit: resources_pb2.Resources | None = None,
        weight: float | None = None,
        budget: quota_pb2.Budget | None = None,
        etag: str = "",
    ) -> quota_pb2.Quota:
        """Change only what is given and keep the rest (creating the quota, with defaults
        for the rest, if the tenant has none): ``update_quota("org/a", weight=3)`` leaves
        its guarantee and limit alone. In `guaranteed`/`limit` only the fields set count.
        `etag`: as in `set_quota`."""
        request = quota_update_request(
            tenant,
            parent=parent,
            guaranteed=guaranteed,
            limit=limit,
            weight=weight,
            budget=budget,
            etag=etag,
        )
        response = self._call(
            self._quota.SetQuota,
            request,
            quota_pb2.SetQuotaResponse,
        )
        return response.quota

    def get_quota(self, tenant: str) -> quota_pb2.Quota:
        """The tenant's quota."""
        response = self._call(
            self._quota.GetQuota,
            quota_pb2.GetQuotaRequest(tenant=tenant),
            quota_pb2.GetQuotaResponse,
        )
        return response.quota

    def list_quotas_page(
        self, *, parent: str = "", page_size: int = 0, page_token: str = ""
    ) -> Page[quota_pb2.Quota]:
        """One page of quotas; with `parent`, only its direct children."""
        response = self._call(
            self._quota.ListQuotas,
            quota_pb2.ListQuotasRequest(parent=parent, page_size=page_size, page_token=page_token),
            quota_pb2.ListQuotasResponse,
        )
        return Page(list(response.quotas), response.next_page_token, response.revision)

    def list_quotas(self, *, parent: str = "", page_size: int = 0) -> Iterator[quota_pb2.Quota]:
        """Every quota (or every direct child of `parent`), across all pages."""
        return iterate_pages_sync(
            lambda token: self.list_quotas_page(
                parent=parent, page_size=page_size, page_token=token
            )
        )

    def delete_quota(self, tenant: str, *, etag: str = "") -> None:
        """Return the tenant to the default quota; with `etag`, only if unchanged since read
        (else `FailedPreconditionError`)."""
        self._call(
            self._quota.DeleteQuota,
            quota_pb2.DeleteQuotaRequest(tenant=tenant, etag=etag),
            quota_pb2.DeleteQuotaResponse,
        )

    def get_usage(self, tenant: str) -> quota_pb2.TenantUsage:
        """What the tenant holds, waits for, borrows, is entitled to and has spent."""
        response = self._call(
            self._quota.GetUsage,
            quota_pb2.GetUsageRequest(tenant=tenant),
            quota_pb2.GetUsageResponse,
        )
        return response.usage

    def get_cost_report(
        self, tenant: str = "", *, since: float | None = None, until: float | None = None
    ) -> telemetry_pb2.GetCostReportResponse:
        """Spend by tenant (subtree included), GPU model and UTC day over [since, until)
        (Unix seconds; widened to whole days; None: from the first day, until now)."""
        request = telemetry_pb2.GetCostReportRequest(tenant=tenant)
        if since is not None:
            request.start_time.FromNanoseconds(int(since * 1e9))
        if until is not None:
            request.end_time.FromNanoseconds(int(until * 1e9))
        return self._call(
            self._telemetry.GetCostReport, request, telemetry_pb2.GetCostReportResponse
        )
