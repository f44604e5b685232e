"""rmgrpc.v1.AllocatorService: validate, call the engine, answer."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import AsyncIterator

from rmgrpc import auth, authorize, codec, limits
from rmgrpc.engine import Engine
from rmgrpc.events import Progress, WatchFilter
from rmgrpc.model import Allocation, AllocationState, Event, EventKind
from rmgrpc.services import validate as val
from rmgrpc.services.pagination import decode_seq_token, fingerprint, take_page
from rmgrpc.services.status import Context as Ctx
from rmgrpc.services.status import stream, unary
from rmgrpc.v1 import allocator_pb2, allocator_pb2_grpc, quota_pb2

_STATES = [s.value for s in AllocationState]
# The fan-out's cache of decoded events: a burst of large allocations must not pin more.
_DECODED_MAX_BYTES = 16 * 1024 * 1024


def request_digest(req: allocator_pb2.AllocateRequest) -> str:
    """What identifies a request's body for idempotency: every field but `dry_run`
    (asking what would happen, then doing it, is the same request)."""
    body = allocator_pb2.AllocateRequest()
    body.CopyFrom(req)
    body.dry_run = False
    return hashlib.sha256(body.SerializeToString(deterministic=True)).hexdigest()[:32]


def allocation_request(
    req: allocator_pb2.AllocateRequest,
    max_lease_seconds: int,
    max_labels: int = val.MAX_LABELS,
    max_duration_seconds: int = 0,
) -> Allocation:
    """The validated request as an Allocation template; InvalidArgument lists every bad field.
    `max_duration_seconds` is the server's `max_allowed_duration_seconds` (0: none)."""
    v = val.Violations()
    v.tenant("tenant", req.tenant)
    v.identifier("request_id", req.request_id, required=False, kind="request id")
    v.int_range("count", req.count, 1, val.MAX_COUNT)
    shape = req.shape
    v.int_range("shape.gpus", shape.gpus, 0, val.MAX_GPUS_PER_REPLICA)
    v.int_range("shape.cpu_millis", shape.cpu_millis, 0, val.MAX_CPU_MILLIS)
    v.int_range("shape.memory_bytes", shape.memory_bytes, 0, val.MAX_MEMORY_BYTES)
    if shape.gpu_model:
        v.text("shape.gpu_model", shape.gpu_model, 64)
        v.check(shape.gpus > 0, "shape.gpu_model", "only makes sense with shape.gpus > 0")
    v.labels("shape.node_selector", shape.node_selector, max_labels)
    if shape.gpus == 0 and shape.cpu_millis == 0 and shape.memory_bytes == 0:
        v.add("shape", "must ask for at least one of gpus, cpu_millis or memory_bytes")
    v.int_range("priority", req.priority, -val.MAX_PRIORITY, val.MAX_PRIORITY)
    v.int_range("lease_seconds", req.lease_seconds, 0, max_lease_seconds)
    v.int_range("max_duration_seconds", req.max_duration_seconds, 0, val.MAX_DURATION_SECONDS)
    if max_duration_seconds and req.max_duration_seconds > max_duration_seconds:
        v.add(
            "max_duration_seconds",
            f"must be at most {max_duration_seconds} (the server's "
            f"max_allowed_duration_seconds; got {req.max_duration_seconds})",
        )
    v.identifier("reservation_id", req.reservation_id, required=False, kind="reservation id")
    v.raise_if_any()
    return Allocation(
        id="",
        tenant=req.tenant,
        count=req.count,
        shape=codec.shape_from_proto(shape),
        request_id=req.request_id,
        priority=req.priority,
        lease_seconds=req.lease_seconds,
        max_duration_seconds=req.max_duration_seconds,
        reservation_id=req.reservation_id,
        request_digest=request_digest(req),
        no_requeue=req.no_requeue,
    )


class AllocatorService(allocator_pb2_grpc.AllocatorServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        settings = engine.settings
        self.watch_slots = limits.StreamSlots(
            settings.max_watch_streams_per_principal, settings.max_watch_streams
        )
        # Fan-out sends one event to many streams: decode it once.
        self._decoded: OrderedDict[int, allocator_pb2.AllocationEvent] = OrderedDict()
        self._decoded_bytes = 0

    def _event(self, event: Event) -> allocator_pb2.AllocationEvent:
        msg = self._decoded.get(event.revision)
        if msg is None:
            msg = _allocation_event(event)
            self._decoded[event.revision] = msg
            self._decoded_bytes += len(event.data)
            # Bounded by count and bytes, as the event ring is.
            while len(self._decoded) > 1 and (
                len(self._decoded) > 8192 or self._decoded_bytes > _DECODED_MAX_BYTES
            ):
                _, old = self._decoded.popitem(last=False)
                self._decoded_bytes -= old.allocation.ByteSize() + old.budget_alert.ByteSize()
        return msg

    def _proto(self, a: Allocation) -> allocator_pb2.Allocation:
        scheduling = self.engine.scheduling
        position = scheduling.positions.get(a.id)
        estimate = scheduling.estimates.get(a.id)
        encoded = self.engine.transitions.encoded(a)
        if encoded is None:
            return codec.allocation_to_proto(
                a, self.engine.state.uuid_of, position=position, estimate=estimate
            )
        if a.state != AllocationState.PENDING:
            return encoded  # no status to add: the revision's own message
        # A copy (the kept message is shared) with the status added: a copy in C costs
        # a fraction of encoding the allocation again in Python.
        msg = allocator_pb2.Allocation()
        msg.CopyFrom(encoded)
        codec.add_status(msg, a, position, estimate)
        return msg

    async def _visible(self, allocation_id: str) -> None:
        """NOT_FOUND, as for an unknown id, for an allocation the caller may not see."""
        found = await self.engine.found(lambda: self.engine.get_allocation(allocation_id))
        authorize.allocation(auth.current(), found)

    async def _durable(self, a: Allocation) -> allocator_pb2.Allocation:
        """`a` as it stands, answered once the revision it names is durable (the object may
        have moved on since the caller's own commit, e.g. placed by a pass)."""
        answer = self._proto(a)
        await self.engine.wait_committed(answer.revision)
        return answer

    @unary
    async def Allocate(
        self, request: allocator_pb2.AllocateRequest, context: Ctx
    ) -> allocator_pb2.AllocateResponse:
        settings = self.engine.settings
        template = allocation_request(
            request,
            settings.max_lease_seconds,
            settings.max_labels,
            settings.max_allowed_duration_seconds,
        )
        authorize.write_tenant(auth.current(), request.tenant)
        if request.reservation_id:
            # One the caller may not see is NOT_FOUND, as an unknown one.
            found = await self.engine.found(
                lambda: self.engine.get_reservation(request.reservation_id)
            )
            authorize.reservation(auth.current(), found)
        allocation, preempted = await self.engine.allocate(template, request.dry_run)
        answer = await self._durable(allocation)
        return allocator_pb2.AllocateResponse(
            allocation=answer,
            preempted_allocation_ids=preempted,
            dry_run=request.dry_run,
        )

    @unary
    async def GetAllocation(
        self, request: allocator_pb2.GetAllocationRequest, context: Ctx
    ) -> allocator_pb2.GetAllocationResponse:
        v = val.Violations()
        v.identifier("id", request.id, kind="allocation id")
        v.raise_if_any()
        found = await self.engine.found(lambda: self.engine.get_allocation(request.id))
        authorize.allocation(auth.current(), found)
        answer = await self._durable(found)
        return allocator_pb2.GetAllocationResponse(allocation=answer)

    @unary
    async def ListAllocations(
        self, request: allocator_pb2.ListAllocationsRequest, context: Ctx
    ) -> allocator_pb2.ListAllocationsResponse:
        v = val.Violations()
        v.tenant("tenant", request.tenant, required=False)
        v.identifier("node_id", request.node_id, required=False, kind="node id")
        v.enum_values("states", request.states, _STATES, allow_unspecified=False)
        settings = self.engine.settings
        page_size = v.page_size("page_size", request.page_size, settings.max_page_size)
        states = sorted(set(request.states))
        tenant, node_id = authorize.allocation_scope(
            auth.current(), request.tenant, request.node_id
        )
        fp = fingerprint("allocations", tenant, node_id, states)
        after = decode_seq_token(request.page_token, fp, v)
        v.raise_if_any()
        revision = self.engine.revision
        items = self.engine.list_allocations(
            tenant,
            node_id,
            frozenset(AllocationState(s) for s in states),
            after_seq=after,
        )
        page, token = take_page(
            items, lambda a: a.seq, page_size, fp, self._proto, settings.max_page_bytes
        )
        answer = allocator_pb2.ListAllocationsResponse(
            allocations=page, next_page_token=token, revision=revision
        )
        await self.engine.wait_committed(revision)
        return answer

    @unary
    async def ReleaseAllocation(
        self, request: allocator_pb2.ReleaseAllocationRequest, context: Ctx
    ) -> allocator_pb2.ReleaseAllocationResponse:
        v = val.Violations()
        v.identifier("id", request.id, kind="allocation id")
        v.raise_if_any()
        await self._visible(request.id)
        allocation = await self.engine.release(request.id)
        return allocator_pb2.ReleaseAllocationResponse(allocation=await self._durable(allocation))

    @unary
    async def RenewAllocation(
        self, request: allocator_pb2.RenewAllocationRequest, context: Ctx
    ) -> allocator_pb2.RenewAllocationResponse:
        v = val.Violations()
        v.identifier("id", request.id, kind="allocation id")
        v.int_range(
            "lease_seconds", request.lease_seconds, 0, self.engine.settings.max_lease_seconds
        )
        v.raise_if_any()
        await self._visible(request.id)
        allocation = await self.engine.renew(request.id, request.lease_seconds)
        return allocator_pb2.RenewAllocationResponse(allocation=await self._durable(allocation))

    @stream
    async def WatchAllocations(
        self, request: allocator_pb2.WatchAllocationsRequest, context: Ctx
    ) -> AsyncIterator[allocator_pb2.AllocationEvent]:
        v = val.Violations()
        v.check(request.start_revision >= 0, "start_revision", "must be >= 0")
        v.tenant("tenant", request.tenant, required=False)
        v.identifier("node_id", request.node_id, required=False, kind="node id")
        v.identifier("allocation_id", request.allocation_id, required=False, kind="allocation id")
        if request.budget_alerts:
            for name in ("node_id", "allocation_id"):
                v.check(
                    not getattr(request, name),
                    "budget_alerts",
                    f"budget alerts are per tenant: not with {name}",
                )
        v.raise_if_any()
        val.refuse_unissued_revision(request.start_revision, self.engine.revision)
        tenant, node_id = authorize.allocation_scope(
            auth.current(), request.tenant, request.node_id
        )
        flt = WatchFilter(
            kind=EventKind.ALLOCATION,
            tenant=tenant,
            node_id=node_id,
            object_id=request.allocation_id,
            budget_alerts=request.budget_alerts,
        )
        hub = self.engine.hub
        progress_seconds = self.engine.settings.watch_progress_seconds
        with self.watch_slots.slot(limits.principal_key(context)):
            async for item in hub.watch(flt, request.start_revision, progress_seconds):
                if isinstance(item, Progress):
                    yield allocator_pb2.AllocationEvent(
                        revision=item.revision,
                        type=allocator_pb2.ALLOCATION_EVENT_TYPE_PROGRESS,
                    )
                else:
                    yield self._event(item)


def _allocation_event(event: Event) -> allocator_pb2.AllocationEvent:
    if event.kind == EventKind.BUDGET:
        return _budget_event(event)
    msg = allocator_pb2.AllocationEvent(
        revision=event.revision,
        type=event.type,  # type: ignore[arg-type]
        allocation=allocator_pb2.Allocation.FromString(event.data),
    )
    codec.set_stamps(msg, (("event_time", event.time),))
    return msg


def _budget_event(event: Event) -> allocator_pb2.AllocationEvent:
    """A budget alert (asked for with `budget_alerts`): its data is the BudgetAlert."""
    msg = allocator_pb2.AllocationEvent(
        revision=event.revision,
        type=allocator_pb2.ALLOCATION_EVENT_TYPE_BUDGET_ALERT,
        budget_alert=quota_pb2.BudgetAlert.FromString(event.data),
    )
    codec.set_stamps(msg, (("event_time", event.time),))
    return msg
