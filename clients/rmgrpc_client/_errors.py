"""The exceptions the client raises, decoded from gRPC status and `google.rpc` details.

Every failed call raises an `RmgrpcError` (a subclass per common status code), so
callers catch one family and read the server's rich error detail as plain attributes
instead of parsing trailing metadata.
"""

from __future__ import annotations

from typing import TypeVar

import google.rpc.error_details_pb2 as error_details_pb2
import google.rpc.status_pb2 as status_pb2
import grpc
from google.protobuf import any_pb2, message
from grpc_status import rpc_status

_M = TypeVar("_M", bound=message.Message)

_DETAIL_BY_NAME: dict[str, type[message.Message]] = {
    kind.DESCRIPTOR.full_name: kind
    for kind in (
        error_details_pb2.BadRequest,
        error_details_pb2.QuotaFailure,
        error_details_pb2.PreconditionFailure,
        error_details_pb2.ResourceInfo,
        error_details_pb2.ErrorInfo,
        error_details_pb2.RetryInfo,
        error_details_pb2.DebugInfo,
        error_details_pb2.Help,
        error_details_pb2.LocalizedMessage,
    )
}


class RmgrpcError(Exception):
    """A call failed: the gRPC status `code`, the server's `message`, and its details.

    `details` holds every `google.rpc` detail message the server attached (BadRequest,
    QuotaFailure, PreconditionFailure, ResourceInfo, ErrorInfo, ...), already unpacked;
    the properties below pick out the common ones. `str(error)` is one line:
    ``INVALID_ARGUMENT: bad request (shape.gpus: must be >= 0)``.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        details: tuple[message.Message, ...] = (),
    ) -> None:
        self.code = code
        self.message = message
        self.details = details
        super().__init__(self._one_line())

    @property
    def field_violations(self) -> list[error_details_pb2.BadRequest.FieldViolation]:
        """Which request fields were wrong and why (from `BadRequest`)."""
        return [v for d in self._of(error_details_pb2.BadRequest) for v in d.field_violations]

    @property
    def quota_violations(self) -> list[error_details_pb2.QuotaFailure.Violation]:
        """Which quota or budget refused the request (from `QuotaFailure`)."""
        return [v for d in self._of(error_details_pb2.QuotaFailure) for v in d.violations]

    @property
    def precondition_violations(self) -> list[error_details_pb2.PreconditionFailure.Violation]:
        """Which state made the call impossible now (from `PreconditionFailure`)."""
        return [v for d in self._of(error_details_pb2.PreconditionFailure) for v in d.violations]

    @property
    def resource_info(self) -> error_details_pb2.ResourceInfo | None:
        """The missing or conflicting resource, typically on NOT_FOUND."""
        found = self._of(error_details_pb2.ResourceInfo)
        return found[0] if found else None

    @property
    def error_info(self) -> error_details_pb2.ErrorInfo | None:
        """A machine-readable `reason` and `metadata` (e.g. REVISION_COMPACTED)."""
        found = self._of(error_details_pb2.ErrorInfo)
        return found[0] if found else None

    def _of(self, kind: type[_M]) -> list[_M]:
        return [d for d in self.details if isinstance(d, kind)]

    def _one_line(self) -> str:
        name = getattr(self.code, "name", str(self.code))
        text = f"{name}: {self.message}" if self.message else name
        pairs = [(v.field, v.description) for v in self.field_violations]
        pairs += [(v.subject, v.description) for v in self.quota_violations]
        pairs += [(v.subject, v.description) for v in self.precondition_violations]
        # Servers often put the first violation in the message too: say it once.
        reasons = [f"{what}: {why}" for what, why in pairs if why not in self.message]
        if reasons:
            text += f" ({'; '.join(reasons)})"
        return " ".join(text.split())  # one line, whatever the server wrote


class InvalidArgumentError(RmgrpcError):
    """INVALID_ARGUMENT: the request was wrong; see `field_violations`."""


class NotFoundError(RmgrpcError):
    """NOT_FOUND: the named object does not exist; see `resource_info`."""


class AlreadyExistsError(RmgrpcError):
    """ALREADY_EXISTS."""


class PermissionDeniedError(RmgrpcError):
    """PERMISSION_DENIED: the token is valid but may not do this."""


class UnauthenticatedError(RmgrpcError):
    """UNAUTHENTICATED: no token, or one the server does not know."""


class FailedPreconditionError(RmgrpcError):
    """FAILED_PRECONDITION: not possible in the current state; see `precondition_violations`."""


class ResourceExhaustedError(RmgrpcError):
    """RESOURCE_EXHAUSTED: quota or budget refused it (`quota_violations`), or a slow watch
    was cut off."""


class OutOfRangeError(RmgrpcError):
    """OUT_OF_RANGE: e.g. a watch revision that has been compacted; see `error_info`."""


class UnavailableError(RmgrpcError):
    """UNAVAILABLE: the server cannot be reached or is shutting down; retry later."""


class DeadlineExceededError(RmgrpcError):
    """DEADLINE_EXCEEDED: the call took longer than its timeout."""


class AbortedError(RmgrpcError):
    """ABORTED: a conflict with a concurrent change; retry."""


_BY_CODE: dict[grpc.StatusCode, type[RmgrpcError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRangeError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.ABORTED: AbortedError,
}


def from_rpc_error(error: grpc.RpcError) -> RmgrpcError:
    """Turn a failed call (sync `grpc.RpcError` or `grpc.aio.AioRpcError`) into our error."""
    code = error.code()
    message_text = error.details() or ""
    details: tuple[message.Message, ...] = ()
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # a status detail that disagrees with the call's status: ignore it
        status = None
    if isinstance(status, status_pb2.Status):
        details = tuple(_unpack(d) for d in status.details)
    return _BY_CODE.get(code, RmgrpcError)(code, message_text, details)


def _unpack(detail: any_pb2.Any) -> message.Message:
    kind = _DETAIL_BY_NAME.get(detail.TypeName())
    if kind is None:
        return detail  # unknown detail types stay packed; callers may Unpack them
    unpacked = kind()
    detail.Unpack(unpacked)
    return unpacked
