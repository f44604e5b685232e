"""rmgrpc.v1.ReservationService: validate, authorize, call the engine, answer."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

from rmgrpc import auth, authorize, codec, limits
from rmgrpc.engine import Engine
from rmgrpc.events import Progress, WatchFilter
from rmgrpc.model import Event, EventKind, Reservation, ReservationState
from rmgrpc.services import validate as val
from rmgrpc.services.pagination import decode_seq_token, fingerprint, take_page
from rmgrpc.services.status import Context as Ctx
from rmgrpc.services.status import stream, unary
from rmgrpc.v1 import reservation_pb2, reservation_pb2_grpc

_STATES = [s.value for s in ReservationState]
# The longest window one reservation may book, and how far ahead it may start.
MAX_RESERVATION_SECONDS = 30 * 86400
MAX_AHEAD_SECONDS = 366 * 86400
# A start this close behind now is clock skew between client and server, not the past.
PAST_TOLERANCE_SECONDS = 60.0


def request_digest(req: reservation_pb2.CreateReservationRequest) -> str:
    """Every field but `dry_run`: asking whether it fits, then booking it, is one request."""
    body = reservation_pb2.CreateReservationRequest()
    body.CopyFrom(req)
    body.dry_run = False
    return hashlib.sha256(body.SerializeToString(deterministic=True)).hexdigest()[:32]


def reservation_request(
    req: reservation_pb2.CreateReservationRequest, now: float, max_labels: int = val.MAX_LABELS
) -> Reservation:
    """The validated request as a Reservation template; InvalidArgument lists every bad
    field (the window is judged against `now`, the server's clock)."""
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
    start = codec.from_ts(req.start_time, req.HasField("start_time"))
    end = codec.from_ts(req.end_time, req.HasField("end_time"))
    v.check(start is not None, "start_time", "is required")
    v.check(end is not None, "end_time", "is required")
    if start is not None and end is not None:
        if v.check(end > start, "end_time", "must be after start_time"):
            length = end - start
            v.check(
                length <= MAX_RESERVATION_SECONDS,
                "end_time",
                f"the window is {length:.0f} s long; at most {MAX_RESERVATION_SECONDS} s",
            )
        if v.check(end > now, "end_time", "is in the past: the window is already over"):
            v.check(
                start >= now - PAST_TOLERANCE_SECONDS,
                "start_time",
                "is in the past: start the window now or later",
            )
        v.check(
            start <= now + MAX_AHEAD_SECONDS,
            "start_time",
            f"is more than {MAX_AHEAD_SECONDS} s ahead",
        )
    v.raise_if_any()
    assert start is not None and end is not None
    return Reservation(
        id="",
        tenant=req.tenant,
        shape=codec.shape_from_proto(shape),
        count=req.count,
        start_time=start,
        end_time=end,
        request_id=req.request_id,
        request_digest=request_digest(req),
    )


class ReservationService(reservation_pb2_grpc.ReservationServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        settings = engine.settings
        self.watch_slots = limits.StreamSlots(
            settings.max_watch_streams_per_principal, settings.max_watch_streams
        )

    def _proto(self, r: Reservation) -> reservation_pb2.Reservation:
        return codec.reservation_to_proto(r, self.engine.state.uuid_of)

    async def _durable(self, r: Reservation) -> reservation_pb2.Reservation:
        """`r` as it stands, answered once the revision it names is durable."""
        answer = self._proto(r)
        await self.engine.wait_committed(answer.revision)
        return answer

    async def _visible(self, reservation_id: str) -> Reservation:
        """The reservation; NOT_FOUND, as for an unknown id, if the caller may not see it."""
        found = await self.engine.found(lambda: self.engine.get_reservation(reservation_id))
        authorize.reservation(auth.current(), found)
        return found

    @unary
    async def CreateReservation(
        self, request: reservation_pb2.CreateReservationRequest, context: Ctx
    ) -> reservation_pb2.CreateReservationResponse:
        engine = self.engine
        template = reservation_request(request, engine.clock.now(), engine.settings.max_labels)
        authorize.write_tenant(auth.current(), request.tenant)
        r = await engine.create_reservation(template, request.dry_run)
        answer = self._proto(r) if request.dry_run else await self._durable(r)
        return reservation_pb2.CreateReservationResponse(
            reservation=answer, dry_run=request.dry_run
        )

    @unary
    async def GetReservation(
        self, request: reservation_pb2.GetReservationRequest, context: Ctx
    ) -> reservation_pb2.GetReservationResponse:
        v = val.Violations()
        v.identifier("id", request.id, kind="reservation id")
        v.raise_if_any()
        found = await self._visible(request.id)
        return reservation_pb2.GetReservationResponse(reservation=await self._durable(found))

    @unary
    async def ListReservations(
        self, request: reservation_pb2.ListReservationsRequest, context: Ctx
    ) -> reservation_pb2.ListReservationsResponse:
        v = val.Violations()
        v.tenant("tenant", request.tenant, required=False)
        v.enum_values("states", request.states, _STATES, allow_unspecified=False)
        settings = self.engine.settings
        page_size = v.page_size("page_size", request.page_size, settings.max_page_size)
        states = sorted(set(request.states))
        tenant = authorize.tenant_scope(auth.current(), request.tenant)
        fp = fingerprint("reservations", tenant, states)
        after = decode_seq_token(request.page_token, fp, v)
        v.raise_if_any()
        revision = self.engine.revision
        items = self.engine.list_reservations(
            tenant,
            frozenset(ReservationState(s) for s in states),
            after_seq=after,
        )
        page, token = take_page(
            items, lambda r: r.seq, page_size, fp, self._proto, settings.max_page_bytes
        )
        answer = reservation_pb2.ListReservationsResponse(
            reservations=page, next_page_token=token, revision=revision
        )
        await self.engine.wait_committed(revision)
        return answer

    @unary
    async def CancelReservation(
        self, request: reservation_pb2.CancelReservationRequest, context: Ctx
    ) -> reservation_pb2.CancelReservationResponse:
        v = val.Violations()
        v.identifier("id", request.id, kind="reservation id")
        v.raise_if_any()
        await self._visible(request.id)
        r = await self.engine.cancel_reservation(request.id)
        return reservation_pb2.CancelReservationResponse(reservation=await self._durable(r))

    @stream
    async def WatchReservations(
        self, request: reservation_pb2.WatchReservationsRequest, context: Ctx
    ) -> AsyncIterator[reservation_pb2.WatchReservationsResponse]:
        v = val.Violations()
        v.check(request.start_revision >= 0, "start_revision", "must be >= 0")
        v.tenant("tenant", request.tenant, required=False)
        v.identifier(
            "reservation_id", request.reservation_id, required=False, kind="reservation id"
        )
        v.raise_if_any()
        val.refuse_unissued_revision(request.start_revision, self.engine.revision)
        tenant = authorize.tenant_scope(auth.current(), request.tenant)
        flt = WatchFilter(
            kind=EventKind.RESERVATION, tenant=tenant, object_id=request.reservation_id
        )
        progress_seconds = self.engine.settings.watch_progress_seconds
        with self.watch_slots.slot(limits.principal_key(context)):
            async for item in self.engine.hub.watch(flt, request.start_revision, progress_seconds):
                if isinstance(item, Progress):
                    yield reservation_pb2.WatchReservationsResponse(
                        revision=item.revision,
                        type=reservation_pb2.RESERVATION_EVENT_TYPE_PROGRESS,
                    )
                else:
                    yield _reservation_event(item)


def _reservation_event(event: Event) -> reservation_pb2.WatchReservationsResponse:
    msg = reservation_pb2.WatchReservationsResponse(
        revision=event.revision,
        type=event.type,  # type: ignore[arg-type]
        reservation=reservation_pb2.Reservation.FromString(event.data),
    )
    codec.set_stamps(msg, (("event_time", event.time),))
    return msg
