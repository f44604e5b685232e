"""No client mistake yields UNKNOWN or INTERNAL, and none wedges the server.

Hypothesis builds arbitrary well-formed requests for every RPC of every served service,
the server-streaming ones included, straight from the message descriptors (extreme
integers, NaN and infinities, unknown enum numbers, long and odd strings, nested
messages), then mutates their wire bytes (overwritten, truncated, extended: what a
broken or hostile client sends), and sends both to a real server. `make test` runs a
bounded number of examples per RPC; `make test-slow` runs ten times as many.
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
from rmgrpc.v1 import allocator_pb2, gpu_manager_pb2, quota_pb2, reservation_pb2, telemetry_pb2
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


Method = tuple[str, str, bool, type[Message], type[Message]]


def served_methods() -> Iterator[Method]:
    """Every RPC of every rmgrpc service the server registers: (service, method,
    server-streaming?, request type, response type)."""
    for module in (allocator_pb2, gpu_manager_pb2, quota_pb2, reservation_pb2, telemetry_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            if service.full_name not in SERVICE_NAMES:
                continue  # defined in the protos, not served (yet)
            for method in service.methods:
                request = getattr(module, method.input_type.name)
                response = getattr(module, method.output_type.name)
                yield service.full_name, method.name, method.server_streaming, request, response


METHODS = sorted(served_methods(), key=lambda m: (m[0], m[1]))
# Per RPC: well-formed examples, and as many mutated ones.
EXAMPLES = 60
SLOW_EXAMPLES = 600
# What a streaming call may end with when we stop reading it (we cancel it), or when a
# stream that has nothing to say yet outlives the deadline.
STOPPED = {grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}


def test_every_served_service_is_fuzzed() -> None:
    assert {m[0] for m in METHODS} == set(SERVICE_NAMES)
    assert any(m[2] for m in METHODS), "no streaming RPC is fuzzed"


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int, extra: bytes) -> bytes:
    """`data` with bytes overwritten at `edits` (position modulo length), the last `cut`
    bytes dropped and `extra` appended."""
    out = bytearray(data)
    for pos, value in edits:
        if out:
            out[pos % len(out)] = value
    if cut:
        del out[-cut:]
    return bytes(out) + extra


def identity(raw: bytes) -> bytes:
    return raw


@pytest.mark.parametrize(
    "examples",
    [
        pytest.param(EXAMPLES, id="bounded"),
        pytest.param(SLOW_EXAMPLES, id="long", marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize(
    ("service", "method", "streaming", "request_type", "response_type"),
    METHODS,
    ids=[f"{m[0].rsplit('.', 1)[1]}.{m[1]}" for m in METHODS],
)
def test_random_and_mutated_requests_never_get_unknown_or_internal(
    tmp_path: Path,
    service: str,
    method: str,
    streaming: bool,
    request_type: type[Message],
    response_type: type[Message],
    examples: int,
) -> None:
    samples: list[bytes] = []
    mutated: list[bytes] = []

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        message_strategy(request_type.DESCRIPTOR),
        st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=4),
        st.integers(0, 8),
        st.binary(max_size=8),
    )
    def collect(
        values: dict[str, Any], edits: list[tuple[int, int]], cut: int, extra: bytes
    ) -> None:
        raw = fill(request_type(), values).SerializeToString()
        samples.append(raw)
        mutated.append(mutate(raw, edits, cut, extra))

    collect()

    async def scenario() -> None:
        # Idle watch streams get a progress message quickly: a stream we fuzz answers
        # something (or fails) at once instead of waiting for events.
        running = await start(make_settings(tmp_path, watch_progress_seconds=0.05))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                path = f"/{service}/{method}"
                codes: set[grpc.StatusCode] = set()
                for raw in samples + mutated:
                    if streaming:
                        code = await call_stream(channel, path, raw)
                    else:
                        code = await call_unary(channel, path, raw)
                    assert code not in FORBIDDEN, (
                        f"{method}({request_type.FromString(raw) if raw in samples else raw!r})"
                        f" -> {code}"
                    )
                    codes.add(code)
                # Still serving after all of it.
                health = health_pb2_grpc.HealthStub(channel)
                ok = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert ok.status == health_pb2.HealthCheckResponse.SERVING
                assert codes and not codes & FORBIDDEN
        finally:
            await running.stop(0)

    async def call_unary(channel: grpc.aio.Channel, path: str, raw: bytes) -> grpc.StatusCode:
        call: Callable[..., Any] = channel.unary_unary(
            path, request_serializer=identity, response_deserializer=identity
        )
        try:
            await call(raw, timeout=20)
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as err:
            return err.code()  # type: ignore[no-any-return]

    async def call_stream(channel: grpc.aio.Channel, path: str, raw: bytes) -> grpc.StatusCode:
        call: Callable[..., Any] = channel.unary_stream(
            path, request_serializer=identity, response_deserializer=identity
        )
        # A stream may rightly wait before its first message (e.g. for a revision the
        # server has not reached): past 2 s that is a deadline, not a failure.
        stream = call(raw, timeout=2)
        try:
            async for _ in stream:
                break  # it answers: enough; stop it
            else:
                return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as err:
            if err.code() in STOPPED:
                return grpc.StatusCode.OK
            return err.code()  # type: ignore[no-any-return]
        stream.cancel()
        return grpc.StatusCode.OK

    asyncio.run(scenario())
