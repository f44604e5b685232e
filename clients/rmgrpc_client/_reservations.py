"""ReservationService for `rmgrpcctl`: the calls behind `reserve`, `reservations` and
`reservation get|cancel`, and how a reservation is shown.

Kept beside the client rather than in it: these are the CLI's needs, built on the
client's channel, metadata and error mapping (`AsyncClient._call`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from rmgrpc.v1 import reservation_pb2, reservation_pb2_grpc, resources_pb2
from rmgrpc_client import _format as fmt
from rmgrpc_client._async_client import AsyncClient

_RELATIVE = re.compile(r"^\+(\d+)([smhd]?)$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, now: float | None = None) -> float:
    """``now``, ``+90m``/``+2h``/``+3600`` (from now) or RFC 3339 (``2026-12-24T08:00:00Z``)."""
    now = time.time() if now is None else now
    if text == "now":
        return now
    m = _RELATIVE.match(text)
    if m:
        return now + int(m.group(1)) * _UNIT[m.group(2)]
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"bad time {text!r}: use now, +SECONDS, +90m, +2h, +1d or RFC 3339"
        ) from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.timestamp()


def _stamp(seconds: float) -> Timestamp:
    out = Timestamp()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


def _stub(client: AsyncClient) -> reservation_pb2_grpc.ReservationServiceStub:
    return reservation_pb2_grpc.ReservationServiceStub(client._channel)


async def create(
    client: AsyncClient,
    tenant: str,
    count: int,
    shape: resources_pb2.Shape,
    start: float,
    end: float,
    *,
    request_id: str = "",
    dry_run: bool = False,
) -> reservation_pb2.CreateReservationResponse:
    request = reservation_pb2.CreateReservationRequest(
        tenant=tenant,
        count=count,
        shape=shape,
        start_time=_stamp(start),
        end_time=_stamp(end),
        request_id=request_id,
        dry_run=dry_run,
    )
    return await client._call(
        _stub(client).CreateReservation, request, reservation_pb2.CreateReservationResponse
    )


async def get(client: AsyncClient, reservation_id: str) -> reservation_pb2.Reservation:
    answer = await client._call(
        _stub(client).GetReservation,
        reservation_pb2.GetReservationRequest(id=reservation_id),
        reservation_pb2.GetReservationResponse,
    )
    return answer.reservation


async def cancel(client: AsyncClient, reservation_id: str) -> reservation_pb2.Reservation:
    answer = await client._call(
        _stub(client).CancelReservation,
        reservation_pb2.CancelReservationRequest(id=reservation_id),
        reservation_pb2.CancelReservationResponse,
    )
    return answer.reservation


async def list_all(
    client: AsyncClient, tenant: str, states: Sequence[int]
) -> reservation_pb2.ListReservationsResponse:
    """Every page, as one response (at the first page's revision)."""
    whole = reservation_pb2.ListReservationsResponse()
    token = ""
    while True:
        page = await client._call(
            _stub(client).ListReservations,
            reservation_pb2.ListReservationsRequest(
                tenant=tenant,
                states=states,  # type: ignore[arg-type]
                page_token=token,
            ),
            reservation_pb2.ListReservationsResponse,
        )
        whole.revision = whole.revision or page.revision
        whole.reservations.extend(page.reservations)
        token = page.next_page_token
        if not token:
            return whole


STATE_NAMES = list(reservation_pb2.ReservationState.keys())


def state_value(name: str) -> int:
    return int(reservation_pb2.ReservationState.Value(name))


def state_name(state: int) -> str:
    name = reservation_pb2.ReservationState.Name(state)  # type: ignore[arg-type]
    return name.removeprefix("RESERVATION_STATE_").lower()


def block(r: reservation_pb2.Reservation, now: float | None = None) -> str:
    """One reservation as ``key: value`` lines."""
    now = time.time() if now is None else now
    return fmt.block(
        [
            ("id", r.id or "(dry run: not booked)"),
            ("tenant", r.tenant),
            ("state", state_name(r.state)),
            ("replicas", r.count),
            ("shape", fmt.format_shape(r.shape)),
            ("placements", fmt.format_placements(r.placements) if r.placements else ""),
            ("starts", fmt.when(r, "start_time", now)),
            ("ends", fmt.when(r, "end_time", now)),
            ("reason", r.state_reason),
            ("request id", r.request_id),
            ("revision", r.revision or ""),
        ]
    )


def rows(items: Sequence[reservation_pb2.Reservation], now: float) -> fmt.Rows:
    headers = ("ID", "TENANT", "STATE", "REPLICAS", "SHAPE", "STARTS", "ENDS", "PLACEMENTS")
    out: list[tuple[str, ...]] = []
    for r in items:
        out.append(
            (
                r.id,
                r.tenant,
                state_name(r.state),
                str(r.count),
                fmt.format_shape(r.shape),
                fmt.relative(r, "start_time", now),
                fmt.relative(r, "end_time", now),
                fmt.format_placements(r.placements),
            )
        )
    return fmt.Rows(headers, out)


def shape(
    gpus: int, gpu_model: str, cpu_millis: int, memory_bytes: int, selector: Mapping[str, str]
) -> resources_pb2.Shape:
    return resources_pb2.Shape(
        gpus=gpus,
        gpu_model=gpu_model,
        cpu_millis=cpu_millis,
        memory_bytes=memory_bytes,
        node_selector=dict(selector),
    )
