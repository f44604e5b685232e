"""No client mistake yields UNKNOWN or INTERNAL, and none wedges the server.

Hypothesis builds arbitrary well-formed requests for every unary RPC straight from the
message descriptors (extreme integers, NaN and infinities, unknown enum numbers, long and
odd strings, nested messages) and sends them to a real server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rmgrpc.server import SERVICE_NAMES, start
from rmgrpc.v1 import allocator_pb2, gpu_manager_pb2, quota_pb2
from tests.conftest import make_settings

FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
}
_TEXT = st.one_of(
    st.sampled_from(["", "a", "org/team", "sim-node-0", "H100", "a-0000", "x" * 300, "a/b/"]),
    st.text(max_size=40),
)


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.type in _INT_RANGES:
        lo, hi = _INT_RANGES[field.type]
        return st.one_of(st.sampled_from([0, 1, -1, lo, hi]), st.integers(lo, hi))
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=64)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_STRING:
        return _TEXT
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=20)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return st.integers(-3, 12)
    raise AssertionError(f"unhandled field type {field.type}")


def message_strategy(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Field values for a message of `descriptor`, as a dict for `fill`."""
    parts: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = (
                field.message_type.fields_by_name["key"],
                field.message_type.fields_by_name["value"],
            )
            parts[field.name] = st.dictionaries(_scalar(key), _scalar(value), max_size=4)
        elif field.message_type is not None:
            if depth >= 3 or field.message_type.full_name.startswith("google.protobuf"):
                continue
            inner = message_strategy(field.message_type, depth + 1)
            parts[field.name] = (
                st.lists(inner, max_size=3) if field.is_repeated else st.none() | inner
            )
        elif field.is_repeated:
            parts[field.name] = st.lists(_scalar(field), max_size=4)
        else:
            parts[field.name] = st.none() | _scalar(field)
    return st.fixed_dictionaries({}, optional=parts)


def fill(msg: Message, values: dict[str, Any]) -> Message:
    for name, value in values.items():
        if value is None:
            continue
        field = msg.DESCRIPTOR.fields_by_name[name]
        target = getattr(msg, name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            for k, v in value.items():
                target[k] = v
        elif field.message_type is not None and field.is_repeated:
            for item in value:
                fill(target.add(), item)
        elif field.message_type is not None:
            fill(target, value)
        elif field.is_repeated:
            target.extend(value)
        else:
            setattr(msg, name, value)
    return msg


def unary_methods() -> Iterator[tuple[str, str, type[Message], type[Message]]]:
    for module in (allocator_pb2, gpu_manager_pb2, quota_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            assert service.full_name in SERVICE_NAMES
            for method in service.methods:
                if method.server_streaming:
                    continue
                request = getattr(module, method.input_type.name)
                response = getattr(module, method.output_type.name)
                yield service.full_name, method.name, request, response


METHODS = sorted(unary_methods(), key=lambda m: (m[0], m[1]))


@pytest.mark.parametrize(
    ("service", "method", "request_type", "response_type"),
    METHODS,
    ids=[f"{m[0].rsplit('.', 1)[1]}.{m[1]}" for m in METHODS],
)
def test_random_requests_never_get_unknown_or_internal(
    tmp_path: Path,
    service: str,
    method: str,
    request_type: type[Message],
    response_type: type[Message],
) -> None:
    async def scenario() -> None:
        running = await start(make_settings(tmp_path))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                call: Callable[..., Any] = channel.unary_unary(
                    f"/{service}/{method}",
                    request_serializer=request_type.SerializeToString,
                    response_deserializer=response_type.FromString,
                )
                codes = await fuzz(call)
                # Still serving after all of it.
                health = health_pb2_grpc.HealthStub(channel)
                ok = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert ok.status == health_pb2.HealthCheckResponse.SERVING
                assert codes - FORBIDDEN == codes
        finally:
            await running.stop(0)

    async def fuzz(call: Callable[..., Any]) -> set[grpc.StatusCode]:
        samples: list[Message] = []

        @settings(
            max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(message_strategy(request_type.DESCRIPTOR))
        def collect(values: dict[str, Any]) -> None:
            samples.append(fill(request_type(), values))

        collect()
        codes: set[grpc.StatusCode] = set()
        for request in samples:
            try:
                await call(request, timeout=20)
                codes.add(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as err:
                assert err.code() not in FORBIDDEN, (
                    f"{method}({request}) -> {err.code()}: {err.details()}"
                )
                codes.add(err.code())
        return codes

    asyncio.run(scenario())
