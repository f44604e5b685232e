"""The store contract: what the engine and server need from persistence, and nothing more.

`Store` (SQLite) is the one implementation; these types are kept apart from it so another
backend (PostgreSQL, say) can implement `EventStore` without importing SQLite code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from rmgrpc.model import Event, EventKind


class StoreError(Exception):
    """The database cannot be used: unreadable, corrupt, read-only, locked, too new, deleted
    or replaced while in use, or a commit failed.

    The message is one line, fit to print before exiting.
    """


@dataclass(frozen=True, slots=True)
class Write:
    """One atomic change: events appended and objects put or deleted, all or nothing.

    Events must continue the log gaplessly, in increasing revision order. Within a write,
    puts apply before deletes; across writes, later writes win.
    """

    events: Sequence[Event] = ()
    puts: Sequence[tuple[EventKind, str, bytes]] = ()
    deletes: Sequence[tuple[EventKind, str]] = ()


@dataclass(frozen=True, slots=True)
class LoadedState:
    """Everything persisted, as of `last_revision`."""

    # Every EventKind is a key, with an empty dict when it has no objects.
    objects: dict[EventKind, dict[str, bytes]]
    last_revision: int
    # Revision of the oldest retained event; last_revision + 1 when the log is empty.
    oldest_revision: int


OnCommit = Callable[[Sequence[Event]], None]


@runtime_checkable
class EventStore(Protocol):
    """Objects keyed by (kind, id) plus an append-only event log, changed only by
    transactions.

    The contract an implementation must keep:

    - A `Write` is one transaction: its events, puts and deletes are all durable or none
      are. Concurrent writes may share a transaction (group commit) but keep their order.
    - Revisions are gapless: the first event of a write is `last revision queued + 1`
      (else `submit` raises ValueError and queues nothing). When a transaction fails, every
      write queued behind it fails too and numbering restarts at `last_revision + 1`.
    - `commit` returns (and `submit`'s future resolves) only once the write is durable;
      `on_commit` sees each committed event exactly once, in order, before that.
    - `read_events(after, limit)` returns retained events with revision > after, in order
      and without gaps; compaction removes only a prefix, so the result may start later.
    - `load()` returns every object as of `last_revision`.
    - Anything that makes the data untrustworthy (corruption, a gap in the log, the
      backing storage going away) raises StoreError rather than acknowledging a write.
    Opening is implementation-specific (a classmethod or factory that raises StoreError),
    so it is not part of the protocol.
    """

    #: Called synchronously with each committed batch of events; must not raise or block.
    on_commit: OnCommit | None
    #: Write transactions committed so far (for metrics).
    transactions_committed: int

    @property
    def path(self) -> str:
        """Where the data lives, for messages (a file path, a DSN without secrets)."""
        ...

    @property
    def last_revision(self) -> int:
        """The newest durable revision (0 when nothing was ever written)."""
        ...

    @property
    def oldest_revision(self) -> int:
        """The oldest retained revision; last_revision + 1 when the log is empty."""
        ...

    async def load(self) -> LoadedState: ...

    def submit(self, write: Write) -> asyncio.Future[None]: ...

    async def commit(self, write: Write) -> None: ...

    async def read_events(self, after_revision: int, limit: int = 1000) -> list[Event]: ...

    async def compact(self, *, max_events: int, min_time: float) -> int: ...

    async def close(self) -> None: ...
