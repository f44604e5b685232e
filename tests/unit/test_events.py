"""EventHub alone, fed by hand: bursts fall back to catch-up and rejoin, only really slow
watchers are cut, memory stays bounded, and a hole in the log is an error.

The store is an in-memory list (`FakeLog`); `publish` is called the way the store calls it
after a commit. Every test checks delivery against that list: revision order, each once,
none missing.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from rmgrpc.errors import RevisionCompacted, Unavailable, WatcherTooSlow
from rmgrpc.events import EventHub, EventLogGap, Progress, WatchFilter, _Subscriber
from rmgrpc.model import Event, EventKind

TENANTS = ("org/a", "org/b", "other")


def event(revision: int) -> Event:
    return Event(
        revision, EventKind.ALLOCATION, 1, f"a{revision % 50}", 0.0, b"", TENANTS[revision % 3], ()
    )


class FakeLog:
    """The store's log: committed events, read like `SqliteStore.read_events`."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.reads = 0

    def append(self, n: int) -> list[Event]:
        first = self.events[-1].revision + 1 if self.events else 1
        new = [event(r) for r in range(first, first + n)]
        self.events.extend(new)
        return new

    async def read_events(self, after: int, limit: int) -> list[Event]:
        self.reads += 1
        await asyncio.sleep(0)  # a real read suspends: publishes may run meanwhile
        return [e for e in self.events if e.revision > after][:limit]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_hub(log: FakeLog, **kw: object) -> EventHub:
    last = log.events[-1].revision if log.events else 0
    return EventHub(log.read_events, last_revision=last, oldest_revision=1, **kw)  # type: ignore[arg-type]


def commit(hub: EventHub, log: FakeLog, n: int) -> list[Event]:
    """One commit of n events: into the log, then published, as the store does."""
    new = log.append(n)
    hub.publish(new)
    return new


def wanted(log: FakeLog, flt: WatchFilter, first: int = 1) -> list[int]:
    return [e.revision for e in log.events if e.revision >= first and flt.matches(e)]


async def registered(hub: EventHub, n: int = 1) -> None:
    async with asyncio.timeout(5):
        while hub.watchers < n:
            await asyncio.sleep(0)


async def reader(
    watch: AsyncIterator[Event | Progress], until: int, pace: random.Random | None = None
) -> list[int]:
    """Takes events until one at or past `until`; with `pace`, now and then (3%) lets others
    run."""
    got: list[int] = []
    async with asyncio.timeout(20):
        async for item in watch:
            if isinstance(item, Progress):
                if item.revision >= until:
                    break
                continue
            got.append(item.revision)
            if item.revision >= until:
                break
            if pace is not None and pace.random() < 0.03:
                await asyncio.sleep(0)
    return got


FILTERS = [WatchFilter(), WatchFilter(tenant="org")]


# -- bursts reach a prompt watcher ----------------------------------------------------------


@pytest.mark.parametrize("flt", FILTERS, ids=["all", "tenant"])
@pytest.mark.parametrize(("commits", "size"), [(1, 10_000), (10, 1000), (100, 100)])
async def test_a_10000_event_burst_reaches_a_prompt_watcher_whole(
    flt: WatchFilter, commits: int, size: int
) -> None:
    log = FakeLog()
    hub = make_hub(log)  # default buffer: 4,096
    task = asyncio.create_task(reader(hub.watch(flt, 0, 5.0), until=commits * size))
    await registered(hub)
    for _ in range(commits):
        commit(hub, log, size)  # back to back: the watcher cannot run in between
    got = await task
    assert got == wanted(log, flt)
    assert hub.cut_off == 0 and hub.fell_back == 1
    assert log.reads == 0  # caught up from the ring, not the store


async def test_a_watcher_that_fell_back_rejoins_live_and_gets_later_events() -> None:
    log = FakeLog()
    hub = make_hub(log, buffer_limit=16)
    watch = hub.watch(WatchFilter(), 0, 5.0)
    task = asyncio.create_task(reader(watch, until=500))
    await registered(hub)
    commit(hub, log, 500)
    assert hub.fell_back == 1 and len(hub._unsynced) == 1 and not hub._rest
    assert await task == wanted(log, WatchFilter())
    # Rejoined: registered again, fed by publish, nothing left in catch-up.
    nxt = asyncio.ensure_future(anext(watch))
    await asyncio.sleep(0)
    assert len(hub._rest) == 1 and not hub._unsynced
    (sub,) = hub._rest
    assert sub.synced and not sub.buffer and not sub.batch
    commit(hub, log, 1)
    assert (await nxt).revision == 501
    assert hub.fell_back == 1 and hub.cut_off == 0
    await watch.aclose()
    assert hub.watchers == 0


@pytest.mark.parametrize("ring_size", [65536, 40], ids=["from-ring", "from-store"])
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_repeated_fall_back_and_rejoin_under_interleaved_commits_is_exact(
    ring_size: int, seed: int
) -> None:
    """Commits of random sizes, some back to back, while a watcher reads at a random pace:
    it falls back and rejoins many times, racing publishes at every seam (with a small
    ring the catch-up reads the store, whose reads suspend)."""
    rng = random.Random(seed)
    log = FakeLog()
    hub = make_hub(log, buffer_limit=16, ring_size=ring_size, catch_up_batch=7)
    total = 6000
    flt = WatchFilter(tenant="org")
    task = asyncio.create_task(reader(hub.watch(flt, 0, 5.0), total, pace=random.Random(seed)))
    await registered(hub)
    done = 0
    while done < total:
        n = min(total - done, rng.choice([1, 2, 5, 30]))
        commit(hub, log, n)
        done += n
        for _ in range(rng.choice([0, 1, 2, 4])):  # 0: the next commit is back to back
            await asyncio.sleep(0)
    got = await task
    assert got == wanted(log, flt)
    assert hub.fell_back > 50 and hub.cut_off == 0
    assert (log.reads > 0) == (ring_size < total)


async def test_a_watcher_that_fell_back_makes_no_progress_message_it_has_not_earned() -> None:
    """Progress(r) promises every matching event up to r was delivered: never sent while
    the watcher has fallen back with events still to catch up."""
    log = FakeLog()
    hub = make_hub(log, buffer_limit=16)
    watch = hub.watch(WatchFilter(), 0, 0.01)
    task = asyncio.create_task(reader(watch, until=100))
    await registered(hub)
    commit(hub, log, 100)
    assert await task == list(range(1, 101))
    await asyncio.sleep(0.05)
    item = await anext(watch)
    assert isinstance(item, Progress) and item.revision == 100
    await watch.aclose()


# -- really slow watchers are cut; memory stays bounded ---------------------------------------


async def test_a_watcher_that_never_reads_is_cut_off_and_holds_nothing() -> None:
    log = FakeLog()
    hub = make_hub(log, buffer_limit=64, max_lag_events=1000)
    watch = hub.watch(WatchFilter(), 0, 5.0)
    first = asyncio.ensure_future(anext(watch))
    await registered(hub)
    commit(hub, log, 1)
    assert (await first).revision == 1
    (sub,) = hub._rest  # now it stops reading
    peak = 0
    for _ in range(400):
        commit(hub, log, 10)
        await asyncio.sleep(0)  # separate bursts: the watcher could have run
        peak = max(peak, len(sub.buffer), len(sub.batch))
        if hub.cut_off:
            break
    assert hub.cut_off == 1 and hub.fell_back == 1
    # Bounded all along: the buffer never past its limit; after the fall-back, nothing.
    assert peak <= 64
    # Cut once it lagged more than 1,000 revisions, checked at the next burst.
    assert 1000 < hub.revision - 1 <= 1000 + 2 * 10
    assert sub.cut and not sub.buffer and not sub.batch
    assert hub.watchers == 0 and not hub._unsynced and not hub._rest
    with pytest.raises(WatcherTooSlow) as err:
        await anext(watch)
    assert err.value.resume_revision == 2  # it took revision 1
    # The hub holds its ring and nothing for the watcher.
    commit(hub, log, 5000)
    assert not sub.buffer and not sub.batch


async def test_a_watcher_stalled_inside_a_catch_up_batch_is_cut_and_drops_the_batch() -> None:
    log = FakeLog()
    hub = make_hub(log, buffer_limit=32, catch_up_batch=1000, max_lag_events=500)
    watch = hub.watch(WatchFilter(), 0, 5.0)
    first = asyncio.ensure_future(anext(watch))
    await registered(hub)
    commit(hub, log, 200)  # overflows: falls back
    assert (await first).revision == 1
    got = [(await anext(watch)).revision for _ in range(5)]
    assert got == [2, 3, 4, 5, 6]
    (sub,) = hub._unsynced
    assert len(sub.batch) == 32  # the batch is capped at the buffer limit
    for _ in range(10):
        commit(hub, log, 100)
        await asyncio.sleep(0)
    assert hub.cut_off == 1 and sub.cut and not sub.batch and not sub.buffer
    with pytest.raises(WatcherTooSlow) as err:
        await anext(watch)
    assert err.value.resume_revision == 7


async def test_a_watcher_that_takes_nothing_for_max_lag_seconds_is_cut() -> None:
    log = FakeLog()
    clock = Clock()
    hub = make_hub(log, buffer_limit=16, max_lag_seconds=30.0, clock=clock)
    slow = hub.watch(WatchFilter(), 0, 5.0)
    prompt = hub.watch(WatchFilter(), 0, 5.0)
    slow_first = asyncio.ensure_future(anext(slow))
    prompt_first = asyncio.ensure_future(anext(prompt))
    await registered(hub, 2)
    commit(hub, log, 100)  # both fall back
    assert hub.fell_back == 2
    await slow_first
    await prompt_first
    for _ in range(3):
        clock.now += 20.0
        await anext(prompt)  # progresses; `slow` does not
        commit(hub, log, 1)
        await asyncio.sleep(0)
    # slow: 60 s without progress since it fell back; prompt: 20 s at most.
    assert hub.cut_off == 1
    with pytest.raises(WatcherTooSlow):
        await anext(slow)
    rest = [(await anext(prompt)).revision for _ in range(103 - 4)]
    assert rest == list(range(5, 104))


async def test_a_burst_does_not_count_against_a_watcher_until_it_could_run() -> None:
    """Lag is measured at the start of a burst (one loop turn's publishes), before it."""
    log = FakeLog()
    hub = make_hub(log, buffer_limit=16, max_lag_events=100)
    task = asyncio.create_task(reader(hub.watch(WatchFilter(), 0, 5.0), until=5000))
    await registered(hub)
    for _ in range(50):
        commit(hub, log, 100)  # 5,000 revisions in one turn: 50 times the lag bound
    assert await task == list(range(1, 5001))
    assert hub.cut_off == 0


# -- the log must be whole --------------------------------------------------------------------


def _holed(n: int, missing: int) -> FakeLog:
    log = FakeLog()
    log.append(n)
    log.events = [e for e in log.events if e.revision != missing]
    return log


@pytest.mark.parametrize("missing", [2, 55, 100, 101, 150])
async def test_a_hole_in_the_store_log_is_an_error_not_skipped(missing: int) -> None:
    log = _holed(300, missing)
    hub = EventHub(log.read_events, last_revision=300, oldest_revision=1, catch_up_batch=50)
    got: list[int] = []
    with pytest.raises(EventLogGap) as err:
        async for item in hub.watch(WatchFilter(), 1, 5.0):
            assert isinstance(item, Event)
            got.append(item.revision)
    # Batches are checked before any of them is delivered: everything up to the batch with
    # the hole, nothing after it.
    assert got == list(range(1, (missing - 1) // 50 * 50 + 1))
    assert err.value.expected == missing
    assert isinstance(err.value, Unavailable) and f"revision {missing}" in str(err.value)


async def test_a_store_log_that_ends_early_is_an_error() -> None:
    log = FakeLog()
    log.append(100)
    hub = EventHub(log.read_events, last_revision=120, oldest_revision=1, catch_up_batch=50)
    with pytest.raises(EventLogGap) as err:
        async for _ in hub.watch(WatchFilter(), 1, 5.0):
            pass
    assert err.value.expected == 101 and err.value.found is None


async def test_a_start_compacted_away_is_still_revision_compacted() -> None:
    log = FakeLog()
    log.append(100)
    hub = EventHub(log.read_events, last_revision=100, oldest_revision=1, catch_up_batch=10)
    watch = hub.watch(WatchFilter(), 1, 5.0)
    assert (await anext(watch)).revision == 1
    log.events = log.events[50:]
    hub.compacted(51)
    with pytest.raises(RevisionCompacted):
        async for _ in watch:
            pass


def test_subscriber_has_no_per_instance_dict() -> None:
    # Thousands of watchers: keep each small.
    assert not hasattr(_Subscriber(WatchFilter(), 16, 1, 0.0), "__dict__")


def test_listeners_see_every_batch_and_a_failing_one_fails_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """In-process followers of the log (the metrics' counters) get each published batch
    after the watchers; one that raises is logged, and neither the publish (a commit's
    callback) nor the listeners after it are affected."""
    log = FakeLog()
    hub = make_hub(log)
    seen: list[int] = []

    def broken(events: object) -> None:
        raise RuntimeError("listener bug")

    hub.listeners.extend([broken, lambda events: seen.extend(e.revision for e in events)])
    commit(hub, log, 3)
    commit(hub, log, 2)
    assert seen == [1, 2, 3, 4, 5] and hub.revision == 5
    assert sum("listener" in r.getMessage() for r in caplog.records) == 2
