"""Limits on what any client can make the server hold: streams, pending work, bytes.

Each limit is a setting (`[limits]` in the config, see `config.py`) and each refusal is
a domain error the services map to a clear status (RESOURCE_EXHAUSTED with
`QuotaFailure`), never UNKNOWN. Transport limits (message size, streams per
connection, keepalive) are gRPC server options, built here from the same settings.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc import aio
from grpc_status import rpc_status

from rmgrpc import auth
from rmgrpc.config import Settings
from rmgrpc.errors import FieldViolation, InvalidArgument, QuotaExceeded, QuotaViolation


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    """gRPC server options enforcing the transport limits of `settings`."""
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        # The server pings idle connections and closes those that stop answering, so a
        # client that vanished (no FIN: cable pulled, VM frozen) frees its watch streams.
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_seconds * 1000)),
        # Recent gRPC cores time an unanswered ping out by this one (default one minute).
        ("grpc.http2.ping_timeout_ms", int(settings.keepalive_timeout_seconds * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # Clients may ping idle connections, but not more often than this; a client
        # that does is sent GOAWAY (ENHANCE_YOUR_CALM) after a few strikes.
        (
            "grpc.http2.min_ping_interval_without_data_ms",
            int(settings.min_ping_interval_seconds * 1000),
        ),
        ("grpc.http2.max_ping_strikes", 2),
    ]


def principal_key(context: Any) -> str:
    """Who a per-principal limit counts against.

    The authenticated principal when authentication is configured (all its connections
    count together, wherever they come from); otherwise the client's network address
    without its port (all connections from one host count together).
    """
    principal = auth.current()
    if principal is not None:
        return f"principal:{principal.role}:{principal.name}"
    peer = str(context.peer() or "")
    # "ipv4:10.0.0.1:5000", "ipv6:[::1]:5000", "unix:/path"
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host = rest.rpartition(":")[0]
        return f"{kind}:{host}" if host else peer
    return peer


class StreamSlots:
    """Counts open streams per principal and in total; refuses one over either bound."""

    def __init__(self, per_principal: int, total: int, what: str = "watch streams") -> None:
        self.per_principal = per_principal
        self.total = total
        self.what = what
        self._open: dict[str, int] = {}
        self.count = 0

    def open_for(self, principal: str) -> int:
        return self._open.get(principal, 0)

    def acquire(self, principal: str) -> None:
        """Takes a slot for `principal`; QuotaExceeded when none is left."""
        mine = self._open.get(principal, 0)
        if mine >= self.per_principal:
            raise QuotaExceeded(
                [
                    QuotaViolation(
                        principal
                        if principal.startswith("principal:")
                        else f"principal:{principal}",
                        f"{self.what}: at most {self.per_principal} open per client "
                        f"(max_{self.what.replace(' ', '_')}_per_principal); close one first",
                    )
                ]
            )
        if self.count >= self.total:
            raise QuotaExceeded(
                [
                    QuotaViolation(
                        "server",
                        f"{self.what}: the server holds its most ({self.total}, "
                        f"max_{self.what.replace(' ', '_')}); retry later",
                    )
                ]
            )
        self._open[principal] = mine + 1
        self.count += 1

    def release(self, principal: str) -> None:
        mine = self._open.get(principal, 0) - 1
        if mine <= 0:
            self._open.pop(principal, None)
        else:
            self._open[principal] = mine
        self.count = max(0, self.count - 1)

    @contextmanager
    def slot(self, principal: str) -> Iterator[None]:
        """A slot held for the body's duration (released however the stream ends)."""
        self.acquire(principal)
        try:
            yield
        finally:
            self.release(principal)


def check_pending(settings: Settings, tenant: str, of_tenant: int, total: int) -> None:
    """Refuses a new allocation when its tenant, or the server, holds the most PENDING."""
    if of_tenant >= settings.max_pending_per_tenant:
        raise QuotaExceeded(
            [
                QuotaViolation(
                    f"tenant:{tenant}",
                    f"tenant {tenant} has {of_tenant} pending allocations, the most allowed "
                    f"(max_pending_per_tenant={settings.max_pending_per_tenant}); "
                    "wait for some to be placed or cancel them",
                )
            ]
        )
    if total >= settings.max_pending_total:
        raise QuotaExceeded(
            [
                QuotaViolation(
                    "server",
                    f"the server holds {total} pending allocations, the most allowed "
                    f"(max_pending_total={settings.max_pending_total}); retry later",
                )
            ]
        )


class _Undecodable:
    """Stands for a request whose bytes are not a message of the method's type."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _safe(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as exc:
            return _Undecodable(str(exc)[:200])

    return deserialize


async def _refuse(request: _Undecodable, context: Any) -> None:
    # Imported here: services.status imports the domain errors, not this module.
    from rmgrpc.services.status import to_status

    error = InvalidArgument(
        [FieldViolation("request", f"is not a valid message of the method's type: {request.error}")]
    )
    await context.abort_with_status(rpc_status.to_status(to_status(error)))


class DecodeGuard(aio.ServerInterceptor):  # type: ignore[misc]
    """Undecodable request bytes become INVALID_ARGUMENT with a BadRequest detail.

    Left to grpc, a request that fails to parse (corrupt wire format, a string field
    that is not UTF-8) is answered UNKNOWN: a client's mistake must never look like
    the server's."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        if handler.request_streaming:
            return handler
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def guarded_unary(request: Any, context: Any) -> Any:
                if isinstance(request, _Undecodable):
                    await _refuse(request, context)
                return await unary(request, context)

            return handler._replace(
                request_deserializer=_safe(handler.request_deserializer),
                unary_unary=guarded_unary,
            )
        stream = handler.unary_stream
        if stream is None:
            return handler
        if inspect.isasyncgenfunction(stream) or inspect.isasyncgenfunction(
            getattr(stream, "__func__", None)
        ):

            async def guarded_stream(request: Any, context: Any) -> AsyncIterator[Any]:
                if isinstance(request, _Undecodable):
                    await _refuse(request, context)
                async for item in stream(request, context):
                    yield item

            guarded: Any = guarded_stream
        else:
            # A streaming method written with context.write: a coroutine.
            async def guarded_writer(request: Any, context: Any) -> Any:
                if isinstance(request, _Undecodable):
                    await _refuse(request, context)
                return await stream(request, context)

            guarded = guarded_writer
        return handler._replace(
            request_deserializer=_safe(handler.request_deserializer), unary_stream=guarded
        )
