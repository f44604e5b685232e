"""Small helpers for end-to-end tests: rich error details and polling."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

T = TypeVar("T")


def field_violations(err: grpc.aio.AioRpcError) -> dict[str, str]:
    """The BadRequest field violations of an error, by field."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "error carries no google.rpc.Status"
    out: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.update({v.field: v.description for v in bad.field_violations})
    return out


def detail(err: grpc.aio.AioRpcError, kind: type[T]) -> T:
    """The first detail of type `kind` (e.g. ResourceInfo) in an error's status."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "error carries no google.rpc.Status"
    for d in status.details:
        if d.Is(kind.DESCRIPTOR):  # type: ignore[attr-defined]
            msg = kind()
            d.Unpack(msg)  # type: ignore[arg-type]
            return msg
    raise AssertionError(f"no {kind.__name__} in {status}")


async def eventually(
    probe: Callable[[], Awaitable[T]], ok: Callable[[T], bool], timeout: float = 10.0
) -> T:
    """Polls `probe` until `ok` holds for its answer; fails after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await probe()
        if ok(value):
            return value
        if loop.time() > deadline:
            raise AssertionError(f"condition not reached in {timeout} s; last value: {value}")
        await asyncio.sleep(0.05)
