"""Transactions: how one command's changes become durable, and who waits for what.

Each command (an RPC's write, a timer firing, a scheduling pass) builds its own `Txn`:
events that take the next revisions, and the objects to put or delete. The txn is
handed to the store as soon as it is built, in revision order, and shares a SQLite
transaction with whatever else is queued (group commit); the command then waits for
*its* txn's future, and nothing else. No buffer is shared between callers, so nobody
is answered before their own change is on disk.

Building a txn never awaits: `Committer.transaction()` is a context manager whose exit
submits what was emitted even if the block raised, so an assigned revision is never
left out of the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from rmgrpc.clock import Clock
from rmgrpc.errors import Unavailable
from rmgrpc.events import EventHub
from rmgrpc.model import Event, EventKind
from rmgrpc.store import EventStore, Write

log = logging.getLogger("rmgrpc.engine")


@dataclass(slots=True)
class Txn:
    """One command's changes; committed all or nothing."""

    events: list[Event] = field(default_factory=list)
    puts: list[tuple[EventKind, str, bytes]] = field(default_factory=list)
    deletes: list[tuple[EventKind, str]] = field(default_factory=list)
    future: asyncio.Future[None] | None = None

    def __bool__(self) -> bool:
        return bool(self.events or self.puts or self.deletes)


class Committer:
    """Assigns revisions, submits txns in order, and knows what is durable."""

    def __init__(self, store: EventStore, hub: EventHub, clock: Clock) -> None:
        self.store = store
        self.hub = hub
        self.clock = clock
        # The newest revision handed out (durable or not).
        self.revision = store.last_revision
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.failed: BaseException | None = None
        # Called with the seconds each txn took from submit to durable (metrics).
        self.observers: list[Callable[[float], None]] = []
        self._building = False

    @property
    def durable(self) -> int:
        """The newest revision on disk."""
        return self.store.last_revision

    # -- building ------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Txn]:
        """A txn to emit into; submitted on exit, whatever happens inside."""
        if self.failed is not None:
            raise Unavailable("the store failed; the server is shutting down")
        if self._building:
            # Two txns open at once would interleave revisions out of submit order.
            raise RuntimeError("a transaction is already being built")
        self._building = True
        txn = Txn()
        try:
            yield txn
        finally:
            self._building = False
            self._submit(txn)

    def emit(
        self,
        txn: Txn,
        kind: EventKind,
        type: int,
        object_id: str,
        encode: Callable[[int], bytes],
        tenant: str = "",
        node_ids: Iterable[str] = (),
        *,
        persist: bool = True,
    ) -> int:
        """Appends an event (taking the next revision) and, unless not `persist`, a put."""
        self.revision += 1
        rev = self.revision
        data = encode(rev)
        txn.events.append(
            Event(rev, kind, type, object_id, self.clock.now(), data, tenant, tuple(node_ids))
        )
        if persist:
            txn.puts.append((kind, object_id, data))
        return rev

    def _submit(self, txn: Txn) -> None:
        if not txn:
            return
        started = time.perf_counter()
        try:
            fut = self.store.submit(Write(events=txn.events, puts=txn.puts, deletes=txn.deletes))
        except Exception as exc:
            # The in-memory state is ahead of the disk now: stop rather than serve it.
            self._fail(exc)
            fut = asyncio.get_running_loop().create_future()
            fut.set_exception(exc)
        txn.future = fut
        fut.add_done_callback(lambda f: self._done(f, started))

    def _done(self, fut: asyncio.Future[None], started: float) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            self._fail(exc)
            return
        self._reached(self.store.last_revision)
        for observe in self.observers:
            observe(time.perf_counter() - started)

    def _fail(self, exc: BaseException) -> None:
        if self.failed is None:
            self.failed = exc
            log.critical("store commit failed, shutting down: %s", exc)
        waiters, self._waiters = self._waiters, []
        for _, fut in waiters:
            if not fut.done():
                fut.set_exception(Unavailable(f"the store failed: {exc}"))

    # -- waiting -------------------------------------------------------------

    async def wait(self, txn: Txn) -> None:
        """Returns once `txn` is durable; Unavailable when its commit failed."""
        if txn.future is None:
            return
        try:
            await asyncio.shield(txn.future)
        except Unavailable:
            raise
        except Exception as exc:
            raise Unavailable("the store failed; the server is shutting down") from exc

    def on_commit(self, events: Sequence[Event]) -> None:
        """The store's commit callback: publish, then wake who waited for these revisions."""
        self.hub.publish(events)
        if events:
            self._reached(events[-1].revision)

    def _reached(self, revision: int) -> None:
        """Everything up to `revision` is durable: wake who waited for it."""
        if not self._waiters:
            return
        keep = []
        for wanted, fut in self._waiters:
            if wanted <= revision:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((wanted, fut))
        self._waiters = keep

    async def wait_durable(self, revision: int | None = None) -> int:
        """Waits until every change up to `revision` (default: all so far) is durable.

        Returns the revision waited for: an answer may name it, since a crash can no
        longer take it back."""
        if revision is None:
            revision = self.revision
        if self.durable >= revision:
            return revision
        if self.failed is not None:
            raise Unavailable("the store failed; the server is shutting down")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((revision, fut))
        await fut
        return revision

    def close(self) -> None:
        waiters, self._waiters = self._waiters, []
        for _, fut in waiters:
            if not fut.done():
                fut.cancel()
