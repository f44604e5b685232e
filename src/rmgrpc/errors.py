"""Domain errors: what went wrong, in terms a client can act on.

The engine and the validators raise these; `services/status.py` maps each to a
gRPC status code with its `google.rpc` detail. No module below `services/`
knows about gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass


class RmgrpcError(Exception):
    """Base of every error a client is meant to see."""


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str


class InvalidArgument(RmgrpcError):
    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = violations
        first = violations[0]
        more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
        super().__init__(f"invalid {first.field}: {first.description}{more}")


class NotFound(RmgrpcError):
    def __init__(self, resource_type: str, name: str, description: str = "") -> None:
        self.resource_type = resource_type
        self.name = name
        self.description = description or f"{resource_type} {name!r} not found"
        super().__init__(self.description)


@dataclass(frozen=True, slots=True)
class QuotaViolation:
    subject: str
    description: str


class QuotaExceeded(RmgrpcError):
    def __init__(self, violations: list[QuotaViolation]) -> None:
        self.violations = violations
        super().__init__("; ".join(v.description for v in violations))


class FailedPrecondition(RmgrpcError):
    def __init__(
        self,
        type: str,
        subject: str,
        description: str,
        extra: tuple[tuple[str, str, str], ...] = (),
    ) -> None:
        self.type = type
        self.subject = subject
        self.description = description
        # More (type, subject, description) violations, e.g. each conflict of a refused
        # reservation and the earliest window that would fit.
        self.extra = extra
        super().__init__(description)


class RevisionCompacted(RmgrpcError):
    """A watch asked for revisions the log no longer holds."""

    def __init__(self, requested: int, oldest: int, current: int) -> None:
        self.requested = requested
        self.oldest = oldest
        self.current = current
        super().__init__(
            f"revision {requested} has been compacted; the oldest retained revision is "
            f"{oldest} (current {current}): list again and watch from the list's revision + 1"
        )


class WatcherTooSlow(RmgrpcError):
    """A watcher fell further behind than its buffer allows."""

    def __init__(self, resume_revision: int, buffered: int) -> None:
        self.resume_revision = resume_revision
        self.buffered = buffered
        super().__init__(
            f"watch stream fell {buffered} events behind and was cut off; "
            f"resume with start_revision={resume_revision}"
        )


class Unavailable(RmgrpcError):
    """The server is shutting down or cannot serve right now; retry elsewhere or later."""


class PermissionDenied(RmgrpcError):
    """The caller is known but may not do this (its role, tenant subtree or node)."""

    def __init__(self, principal: str, action: str, description: str) -> None:
        self.principal = principal
        self.action = action
        self.description = description
        super().__init__(description)
