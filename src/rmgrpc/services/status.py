"""Domain errors to gRPC statuses with `google.rpc` details.

Every servicer method is wrapped by `unary` or `stream`: a client mistake
becomes the right code with a detail a program can read (BadRequest field
violations, ResourceInfo, QuotaFailure, PreconditionFailure, ErrorInfo); a bug
becomes INTERNAL with the traceback in the server log, never in the answer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from rmgrpc.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    RevisionCompacted,
    RmgrpcError,
    Unavailable,
    WatcherTooSlow,
)

log = logging.getLogger("rmgrpc.rpc")

DOMAIN = "rmgrpc.io"

# grpc.aio.ServicerContext; grpcio ships no type information, so this is Any to mypy.
Context = Any

Req = TypeVar("Req")
Resp = TypeVar("Resp")


def _status(code: int, message: str, *details: Message) -> status_pb2.Status:
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    return status_pb2.Status(code=code, message=message, details=packed)


def to_status(exc: RmgrpcError) -> status_pb2.Status:
    """The rich status for a domain error."""
    if isinstance(exc, InvalidArgument):
        return _status(
            code_pb2.INVALID_ARGUMENT,
            str(exc),
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in exc.violations
                ]
            ),
        )
    if isinstance(exc, NotFound):
        return _status(
            code_pb2.NOT_FOUND,
            exc.description,
            error_details_pb2.ResourceInfo(
                resource_type=exc.resource_type,
                resource_name=exc.name,
                description=exc.description,
            ),
        )
    if isinstance(exc, QuotaExceeded):
        return _status(
            code_pb2.RESOURCE_EXHAUSTED,
            str(exc),
            error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(
                        subject=v.subject, description=v.description
                    )
                    for v in exc.violations
                ]
            ),
        )
    if isinstance(exc, FailedPrecondition):
        return _status(
            code_pb2.FAILED_PRECONDITION,
            exc.description,
            error_details_pb2.PreconditionFailure(
                violations=[
                    error_details_pb2.PreconditionFailure.Violation(
                        type=exc.type, subject=exc.subject, description=exc.description
                    ),
                    *(
                        error_details_pb2.PreconditionFailure.Violation(
                            type=t, subject=s, description=d
                        )
                        for t, s, d in exc.extra
                    ),
                ]
            ),
        )
    if isinstance(exc, RevisionCompacted):
        return _status(
            code_pb2.OUT_OF_RANGE,
            str(exc),
            error_details_pb2.ErrorInfo(
                reason="REVISION_COMPACTED",
                domain=DOMAIN,
                metadata={
                    "requested_revision": str(exc.requested),
                    "oldest_revision": str(exc.oldest),
                    "current_revision": str(exc.current),
                },
            ),
        )
    if isinstance(exc, WatcherTooSlow):
        return _status(
            code_pb2.RESOURCE_EXHAUSTED,
            str(exc),
            error_details_pb2.ErrorInfo(
                reason="WATCHER_TOO_SLOW",
                domain=DOMAIN,
                metadata={"resume_revision": str(exc.resume_revision)},
            ),
        )
    if isinstance(exc, Unavailable):
        return _status(code_pb2.UNAVAILABLE, str(exc) or "server is shutting down")
    if isinstance(exc, PermissionDenied):
        return _status(
            code_pb2.PERMISSION_DENIED,
            exc.description,
            error_details_pb2.ErrorInfo(
                reason="PERMISSION_DENIED",
                domain=DOMAIN,
                metadata={"principal": exc.principal, "action": exc.action},
            ),
        )
    return _status(code_pb2.INTERNAL, "internal error")


async def _abort(context: Context, exc: BaseException) -> None:
    if isinstance(exc, RmgrpcError):
        await context.abort_with_status(rpc_status.to_status(to_status(exc)))
    log.exception("internal error in %s", exc.__class__.__name__, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; the server log has details")


def _is_abort(exc: BaseException) -> bool:
    # grpc.aio raises AbortError out of context.abort*: let it through untouched.
    return isinstance(exc, grpc.aio.AbortError)


UnaryMethod = Callable[[Any, Req, Context], Awaitable[Resp]]
StreamMethod = Callable[[Any, Req, Context], AsyncIterator[Resp]]


def unary(fn: UnaryMethod[Req, Resp]) -> UnaryMethod[Req, Resp]:
    """Maps errors raised by a unary servicer method to statuses."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: Context) -> Resp:
        try:
            return await fn(self, request, context)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if _is_abort(exc):
                raise
            await _abort(context, exc)
            raise AssertionError("unreachable") from exc

    return wrapper


def stream(fn: StreamMethod[Req, Resp]) -> StreamMethod[Req, Resp]:
    """Maps errors raised by a server-streaming servicer method to statuses."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: Context) -> AsyncIterator[Resp]:
        try:
            async for item in fn(self, request, context):
                yield item
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if _is_abort(exc):
                raise
            await _abort(context, exc)

    return wrapper
