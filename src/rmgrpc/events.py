"""The revision stream: fan-out of committed events to watchers, resume and progress.

Watchers live in two phases, as in etcd's watchable store. A watcher that is behind
*catches up*: it reads from the in-memory ring of recent events or, further back, from
the store's log, one batch at a time. Once caught up it is *synced* and gets each new
event straight from `publish`, which the store calls after every commit, in revision
order, into a buffer of at most `buffer_limit` events.

Bursts: when one publish (or several in a row, before the watcher can run) brings a
synced watcher more matching events than its buffer has room for, the watcher is not
cut off: it *falls back* to catch-up. Its buffer is dropped (the ring holds the same
events), it keeps only the next revision it needs, and its watch loop reads on from
there, then rejoins live. Rejoining happens with no await between the last "caught up?"
check and re-registering, so no publish can slip between the two.

Really slow: a watcher that has fallen back is cut off with WatcherTooSlow (the client
resumes from its last revision) when, at the start of a publish burst, it is still behind
and either
  * lags more than `max_lag_events` revisions (all events, matching or not: that is what
    decides whether the ring still holds its next revision) behind the head, or
  * has made no progress (taken no event, fetched no batch) for `max_lag_seconds` since
    it fell back.
A burst is what is published within one turn of the event loop; lag is measured before
it, so a burst never counts against a watcher before it could run (it then has until the
next burst to get back under the bound: keep `max_lag_events` well above the largest
commit). The check is one pass over the fallen-back watchers per burst. Watchers still
in their initial catch-up from an old `start_revision` are never cut: they may be
arbitrarily far behind by request, and hold one batch whatever they do.

Memory: the ring holds at most `ring_size` events and `ring_max_bytes` of them (the
newest always); a synced watcher holds at most `buffer_limit` events; one in catch-up holds at
most one batch (`catch_up_batch`, capped at `buffer_limit`), dropped when it is cut.
Every batch, from the ring or the store, must run contiguously from the revision asked
for: a hole is an EventLogGap (UNAVAILABLE, logged), never skipped. A missing start
below the hub's oldest revision is compaction (it removes only a prefix): RevisionCompacted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import islice

from rmgrpc.errors import RevisionCompacted, Unavailable, WatcherTooSlow
from rmgrpc.model import Event, EventKind
from rmgrpc.state import in_subtree

log = logging.getLogger(__name__)

ReadEvents = Callable[[int, int], Awaitable[list[Event]]]


class EventLogGap(Unavailable):
    """A catch-up batch is not contiguous: the log lost an event it should hold."""

    def __init__(self, expected: int, found: int | None) -> None:
        self.expected = expected
        self.found = found
        got = "nothing" if found is None else f"revision {found}"
        super().__init__(
            f"the event log has a gap: expected revision {expected}, found {got}; "
            "refusing to deliver events with a hole (the server's store needs attention)"
        )


@dataclass(frozen=True, slots=True)
class WatchFilter:
    """Which events a watcher wants; empty fields match everything."""

    kind: EventKind = EventKind.ALLOCATION
    tenant: str = ""
    node_id: str = ""
    object_id: str = ""
    # Budget alerts too (their tenant is the budgeted one), beside `kind`.
    budget_alerts: bool = False

    def matches(self, event: Event) -> bool:
        if event.kind != self.kind and not (self.budget_alerts and event.kind == EventKind.BUDGET):
            return False
        if self.object_id and event.object_id != self.object_id:
            return False
        if self.node_id and self.node_id not in event.node_ids:
            return False
        # A tenant sees its whole subtree: "org" matches "org/team".
        return in_subtree(event.tenant, self.tenant)


@dataclass(frozen=True, slots=True)
class Progress:
    """Nothing new matched; every matching event up to `revision` has been delivered."""

    revision: int


class _Subscriber:
    __slots__ = (
        "batch",
        "buffer",
        "cut",
        "filter",
        "lag",
        "limit",
        "next_rev",
        "progressed_at",
        "synced",
        "waiter",
    )

    def __init__(self, filter: WatchFilter, limit: int, next_rev: int, now: float) -> None:
        self.filter = filter
        self.limit = limit
        # Every matching event below next_rev has been delivered (or was not asked for).
        self.next_rev = next_rev
        # Synced: registered in the hub's index and fed by publish. Otherwise catching up.
        self.synced = False
        self.buffer: deque[Event] = deque()
        # The catch-up batch being delivered; cleared when cut so a stalled stream holds
        # nothing.
        self.batch: list[Event] = []
        # Set while the watcher sleeps on an empty buffer; publish, close or the progress
        # timer resolves it. A bare future and a timer handle rather than
        # wait_for(Event.wait()), which costs a Task per wait: this is the fan-out's hot path.
        self.waiter: asyncio.Future[None] | None = None
        self.progressed_at = now
        self.cut = False
        self.lag = 0

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
        ring_max_bytes: int = 64 * 1024 * 1024,
        buffer_limit: int = 4096,
        catch_up_batch: int = 1000,
        max_lag_events: int = 65536,
        max_lag_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read_events = read_events
        self.revision = last_revision
        self.oldest_revision = oldest_revision
        # Bounded by count and by bytes (events carry whole objects: a few large ones
        # must not pin hundreds of MB). Older events are read from the store instead.
        self._ring: deque[Event] = deque()
        self._ring_size = ring_size
        self._ring_max_bytes = ring_max_bytes
        self.ring_bytes = 0
        self._buffer_limit = buffer_limit
        # A catch-up copy is never larger than a live buffer may be.
        self._batch = min(catch_up_batch, buffer_limit)
        self._max_lag_events = max_lag_events
        self._max_lag_seconds = max_lag_seconds
        self._clock = clock
        # Subscribers indexed by their most selective filter so publish touches only
        # those that may match.
        self._by_object: dict[str, set[_Subscriber]] = {}
        self._by_node: dict[str, set[_Subscriber]] = {}
        self._by_tenant: dict[str, set[_Subscriber]] = {}
        self._rest: set[_Subscriber] = set()
        # Fell back from live, catching up; checked against the slowness bounds.
        self._unsynced: set[_Subscriber] = set()
        self._in_burst = False
        self.delivered = 0
        self.fell_back = 0
        self.cut_off = 0
        self._closed = False
        # Called with each published batch, on the event loop, after the watchers: for
        # in-process followers of the log (the metrics' counters); must be cheap.
        self.listeners: list[Callable[[Sequence[Event]], None]] = []

    @property
    def watchers(self) -> int:
        """Live streams plus those catching up after a fall-back."""
        return (
            sum(len(s) for s in self._by_object.values())
            + sum(len(s) for s in self._by_node.values())
            + sum(len(s) for s in self._by_tenant.values())
            + len(self._rest)
            + len(self._unsynced)
        )

    # -- the writer's side -------------------------------------------------

    def publish(self, events: Sequence[Event]) -> None:
        """Called by the store after each commit, in revision order, exactly once per event."""
        if not events:
            return
        if not self._in_burst:
            self._start_burst()
        fallen: list[_Subscriber] = []
        for event in events:
            self._remember(event)
            self.revision = event.revision
            for sub in self._candidates(event):
                if not sub.synced or not sub.filter.matches(event):
                    continue
                if len(sub.buffer) >= sub.limit:
                    # More than the buffer holds: back to catch-up from the ring rather
                    # than cut off a watcher that had no chance to drain. The ring has
                    # these events, so the copies go.
                    sub.synced = False
                    sub.buffer.clear()
                    sub.progressed_at = self._clock()
                    fallen.append(sub)
                else:
                    sub.buffer.append(event)
                sub.wake()
        # Not while iterating the index's sets above.
        for sub in fallen:
            self._unregister(sub)
            self._unsynced.add(sub)
        self.fell_back += len(fallen)
        for listen in self.listeners:
            try:
                listen(events)
            except Exception:  # a follower's bug must not fail the commit it follows
                log.exception("event listener %r failed", listen)

    def _remember(self, event: Event) -> None:
        """Appends `event` to the ring, dropping the oldest past either bound (always
        keeping the newest, whatever its size)."""
        ring = self._ring
        ring.append(event)
        self.ring_bytes += event_bytes(event)
        while len(ring) > 1 and (
            len(ring) > self._ring_size or self.ring_bytes > self._ring_max_bytes
        ):
            self.ring_bytes -= event_bytes(ring.popleft())

    @property
    def ring_events(self) -> int:
        return len(self._ring)

    def _start_burst(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            pass  # A caller with no loop: each publish is a burst of its own.
        else:
            self._in_burst = True
            loop.call_soon(self._end_burst)
        if self._unsynced:
            self._cut_slow()

    def _end_burst(self) -> None:
        self._in_burst = False

    def _cut_slow(self) -> None:
        """Cuts the fallen-back watchers that are really slow (see the module docstring)."""
        now = self._clock()
        slow = []
        for sub in self._unsynced:
            lag = self.revision - sub.next_rev + 1
            if lag > 0 and (
                lag > self._max_lag_events or now - sub.progressed_at > self._max_lag_seconds
            ):
                slow.append(sub)
                sub.lag = lag
        for sub in slow:
            sub.cut = True
            sub.batch.clear()
            self._unsynced.discard(sub)
            self.cut_off += 1

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
    ) -> AsyncGenerator[Event | Progress, None]:
        """Matching events from `start_revision` on, then live, with progress when idle.

        Raises RevisionCompacted when the log no longer holds `start_revision`,
        WatcherTooSlow when the consumer is really slow (module docstring) and
        EventLogGap when the log has a hole.
        """
        sub = _Subscriber(
            filter, self._buffer_limit, self.check_start(start_revision), self._clock()
        )
        try:
            while True:
                async for event in self._catch_up(sub):
                    yield event
                # Caught up with no await since the last check: from here publish() feeds us.
                sub.synced = True
                self._unsynced.discard(sub)
                self._register(sub)
                while True:
                    if self._closed:
                        raise _shutting_down(sub.next_rev)
                    if sub.cut:
                        raise WatcherTooSlow(sub.next_rev, sub.lag)
                    if not sub.synced:
                        break  # A burst overflowed the buffer: catch up from next_rev.
                    if not sub.buffer:
                        loop = asyncio.get_running_loop()
                        sub.waiter = waiter = loop.create_future()
                        timer = loop.call_later(progress_seconds, _resolve, waiter)
                        try:
                            await waiter
                        finally:
                            timer.cancel()
                            sub.waiter = None
                        if sub.synced and not sub.buffer and not self._closed:
                            # Woken by the timer: nothing matched for a while. (A catch-up
                            # read may have delivered past the published head.)
                            yield Progress(max(self.revision, sub.next_rev - 1))
                        continue
                    event = sub.buffer.popleft()
                    if event.revision < sub.next_rev:
                        # Covered already: a catch-up read past the published head, or a
                        # start past the committed head (a List's revision counts events
                        # still being committed).
                        continue
                    sub.next_rev = event.revision + 1
                    self.delivered += 1
                    yield event
        finally:
            if sub.synced:
                self._unregister(sub)
            self._unsynced.discard(sub)

    async def _catch_up(self, sub: _Subscriber) -> AsyncIterator[Event]:
        """What `sub` wants from sub.next_rev up to the head, one batch at a time."""
        while sub.next_rev <= self.revision:
            if self._closed:
                raise _shutting_down(sub.next_rev)
            batch = await self._read_batch(sub.next_rev)
            if sub.cut:  # while a store read was in flight
                break
            sub.batch = batch
            sub.progressed_at = self._clock()
            match = sub.filter.matches
            # Stops early if a cut clears the batch while we are suspended in it.
            for event in batch:
                sub.next_rev = event.revision + 1
                if match(event):
                    self.delivered += 1
                    yield event
                    sub.progressed_at = self._clock()
            sub.batch = []
            if sub.cut:
                break
        if sub.cut:
            raise WatcherTooSlow(sub.next_rev, sub.lag)

    async def _read_batch(self, next_rev: int) -> list[Event]:
        """Up to one batch from next_rev on (next_rev <= head), checked contiguous."""
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
            if (not batch or batch[0].revision != next_rev) and next_rev < self.oldest_revision:
                # Compacted while we read. (Should the store compact before the hub hears
                # of it, this is a gap below; a retry then gets RevisionCompacted.)
                raise RevisionCompacted(next_rev, self.oldest_revision, self.revision)
            if not batch:
                raise _gap(next_rev, None)
        for i, event in enumerate(batch):
            if event.revision != next_rev + i:
                raise _gap(next_rev + i, event.revision)
        return batch


# What an Event costs in memory beyond its payload and strings (object, tuple, ints).
_EVENT_OVERHEAD = 256


def event_bytes(event: Event) -> int:
    """About what `event` holds in memory, for the ring's byte bound."""
    return (
        _EVENT_OVERHEAD
        + len(event.data)
        + len(event.object_id)
        + len(event.tenant)
        + sum(len(n) for n in event.node_ids)
    )


def _gap(expected: int, found: int | None) -> EventLogGap:
    err = EventLogGap(expected, found)
    log.error("%s", err)
    return err


def _shutting_down(next_rev: int) -> Unavailable:
    return Unavailable(f"server is shutting down; resume with start_revision={next_rev}")


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
