"""The revision stream: fan-out of committed events to watchers, resume and progress.

Watchers live in two phases, as in etcd's watchable store: a watcher that is
behind catches up from the in-memory ring of recent events or, further back,
from the store's log, in batches; once caught up it is *synced* and gets each new
event straight from `publish`, which the store calls after every commit, in
revision order. A synced watcher has a bounded buffer: one that falls further
behind than that is cut off (it resumes from its last revision), so no watcher
ever makes the server hold unbounded memory or slows the writer.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import islice

from rmgrpc.errors import RevisionCompacted, Unavailable, WatcherTooSlow
from rmgrpc.model import Event, EventKind

ReadEvents = Callable[[int, int], Awaitable[list[Event]]]


@dataclass(frozen=True, slots=True)
class WatchFilter:
    """Which events a watcher wants; empty fields match everything."""

    kind: EventKind = EventKind.ALLOCATION
    tenant: str = ""
    node_id: str = ""
    object_id: str = ""

    def matches(self, event: Event) -> bool:
        if event.kind != self.kind:
            return False
        if self.object_id and event.object_id != self.object_id:
            return False
        if self.node_id and self.node_id not in event.node_ids:
            return False
        # A tenant sees its whole subtree: "org" matches "org/team".
        return not self.tenant or (
            event.tenant == self.tenant or event.tenant.startswith(self.tenant + "/")
        )


@dataclass(frozen=True, slots=True)
class Progress:
    """Nothing new matched; every matching event up to `revision` has been delivered."""

    revision: int


class _Subscriber:
    __slots__ = ("buffer", "cut", "filter", "limit", "waiter")

    def __init__(self, filter: WatchFilter, limit: int) -> None:
        self.filter = filter
        self.limit = limit
        self.buffer: deque[Event] = deque()
        # Set while the watcher sleeps on an empty buffer; publish, close or the progress
        # timer resolves it. A bare future and a timer handle rather than
        # wait_for(Event.wait()), which costs a Task per wait: this is the fan-out's hot path.
        self.waiter: asyncio.Future[None] | None = None
        self.cut = False

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class EventHub:
    """Fans committed events out to watchers. Owned by the server; fed by the store."""

    def __init__(
        self,
        read_events: ReadEvents,
        *,
        last_revision: int,
        oldest_revision: int,
        ring_size: int = 65536,
        buffer_limit: int = 4096,
        catch_up_batch: int = 1000,
    ) -> None:
        self._read_events = read_events
        self.revision = last_revision
        self.oldest_revision = oldest_revision
        self._ring: deque[Event] = deque(maxlen=ring_size)
        self._buffer_limit = buffer_limit
        self._batch = catch_up_batch
        # Subscribers indexed by their most selective filter so publish touches only
        # those that may match.
        self._by_object: dict[str, set[_Subscriber]] = {}
        self._by_node: dict[str, set[_Subscriber]] = {}
        self._by_tenant: dict[str, set[_Subscriber]] = {}
        self._rest: set[_Subscriber] = set()
        self.delivered = 0
        self.cut_off = 0
        self._closed = False

    @property
    def watchers(self) -> int:
        return (
            sum(len(s) for s in self._by_object.values())
            + sum(len(s) for s in self._by_node.values())
            + sum(len(s) for s in self._by_tenant.values())
            + len(self._rest)
        )

    # -- the writer's side -------------------------------------------------

    def publish(self, events: Sequence[Event]) -> None:
        """Called by the store after each commit, in revision order, exactly once per event."""
        for event in events:
            self._ring.append(event)
            self.revision = event.revision
            for sub in self._candidates(event):
                if sub.cut or not sub.filter.matches(event):
                    continue
                if len(sub.buffer) >= sub.limit:
                    # Cut off rather than wait for or buffer without bound; the
                    # watcher resumes from the log.
                    sub.cut = True
                    sub.buffer.clear()
                    self.cut_off += 1
                else:
                    sub.buffer.append(event)
                sub.wake()

    def compacted(self, oldest_revision: int) -> None:
        self.oldest_revision = oldest_revision

    def close(self) -> None:
        """Ends every stream (shutdown)."""
        self._closed = True
        for sub in self._all():
            sub.wake()

    def _candidates(self, event: Event) -> Iterable[_Subscriber]:
        yield from self._rest
        yield from self._by_object.get(event.object_id, ())
        for node_id in event.node_ids:
            yield from self._by_node.get(node_id, ())
        tenant = event.tenant
        while tenant:
            yield from self._by_tenant.get(tenant, ())
            tenant = tenant.rpartition("/")[0]

    def _all(self) -> Iterable[_Subscriber]:
        yield from self._rest
        for index in (self._by_object, self._by_node, self._by_tenant):
            for subs in index.values():
                yield from subs

    def _index(self, sub: _Subscriber) -> tuple[dict[str, set[_Subscriber]] | None, str]:
        f = sub.filter
        if f.object_id:
            return self._by_object, f.object_id
        if f.node_id:
            return self._by_node, f.node_id
        if f.tenant:
            return self._by_tenant, f.tenant
        return None, ""

    def _register(self, sub: _Subscriber) -> None:
        index, key = self._index(sub)
        if index is None:
            self._rest.add(sub)
        else:
            index.setdefault(key, set()).add(sub)

    def _unregister(self, sub: _Subscriber) -> None:
        index, key = self._index(sub)
        if index is None:
            self._rest.discard(sub)
            return
        subs = index.get(key)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del index[key]

    # -- the watcher's side ------------------------------------------------

    def check_start(self, start_revision: int) -> int:
        """The first revision a watch from `start_revision` gets (0: from now)."""
        if start_revision <= 0:
            return self.revision + 1
        if start_revision < self.oldest_revision:
            raise RevisionCompacted(start_revision, self.oldest_revision, self.revision)
        return start_revision

    async def watch(
        self, filter: WatchFilter, start_revision: int, progress_seconds: float
    ) -> AsyncIterator[Event | Progress]:
        """Matching events from `start_revision` on, then live, with progress when idle.

        Raises RevisionCompacted when the log no longer holds `start_revision`, and
        WatcherTooSlow when the consumer falls more than the buffer limit behind.
        """
        next_rev = self.check_start(start_revision)
        async for event in self._catch_up(filter, next_rev):
            next_rev = event.revision + 1
            yield event
        # Caught up with no await since the last check: from here publish() feeds us.
        sub = _Subscriber(filter, self._buffer_limit)
        self._register(sub)
        try:
            while not self._closed:
                if sub.cut:
                    raise WatcherTooSlow(next_rev, sub.limit)
                if not sub.buffer:
                    loop = asyncio.get_running_loop()
                    sub.waiter = waiter = loop.create_future()
                    timer = loop.call_later(progress_seconds, _resolve, waiter)
                    try:
                        await waiter
                    finally:
                        timer.cancel()
                        sub.waiter = None
                    if not sub.buffer and not sub.cut and not self._closed:
                        # Woken by the timer: nothing matched for a while.
                        yield Progress(self.revision)
                    continue
                event = sub.buffer.popleft()
                if event.revision < next_rev:
                    # Asked to start past the committed head (e.g. a List's revision counts
                    # events still being committed): those were covered by the caller.
                    continue
                next_rev = event.revision + 1
                self.delivered += 1
                yield event
            raise Unavailable(f"server is shutting down; resume with start_revision={next_rev}")
        finally:
            self._unregister(sub)

    async def _catch_up(self, filter: WatchFilter, next_rev: int) -> AsyncIterator[Event]:
        while next_rev <= self.revision:
            ring_start = self._ring[0].revision if self._ring else self.revision + 1
            if next_rev >= ring_start:
                # The ring is gapless, so next_rev sits at a known index. Copy one batch
                # from there (publish may append while we yield), never the whole rest: a
                # thousand watchers far behind must not each hold a copy of the ring.
                # Reached from whichever end of the deque is nearer.
                size = len(self._ring)
                start = next_rev - ring_start
                count = min(self._batch, size - start)
                if start < size - start:
                    batch = list(islice(self._ring, start, start + count))
                else:
                    from_right = size - start
                    batch = list(islice(reversed(self._ring), from_right - count, from_right))
                    batch.reverse()
            else:
                batch = await self._read_events(next_rev - 1, self._batch)
                if not batch or batch[0].revision != next_rev:
                    # Compacted while we were reading.
                    raise RevisionCompacted(next_rev, self.oldest_revision, self.revision)
            for event in batch:
                if filter.matches(event):
                    self.delivered += 1
                    yield event
                next_rev = event.revision + 1


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
