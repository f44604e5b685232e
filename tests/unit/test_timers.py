"""Deadlines: keyed and cancellable (one entry per live key, however often re-armed),
kept on the monotonic clock (a wall-clock step moves none of them)."""

from __future__ import annotations

from rmgrpc.clock import ManualClock
from rmgrpc.engine.timers import Timers


def test_rearming_a_key_replaces_its_deadline() -> None:
    clock = ManualClock()
    t = Timers(clock)
    for i in range(10_000):
        t.arm("lease", "a1", clock.now() + 30 + i)
    assert len(t) == 1
    assert t.heap_size <= 2 * len(t) + 64 + 1
    clock.advance(30 + 9_998)
    assert t.due() == []
    clock.advance(1)
    assert t.due() == [("lease", "a1")]
    assert len(t) == 0


def test_cancelled_deadlines_never_fire_and_leave_nothing() -> None:
    clock = ManualClock()
    t = Timers(clock)
    for i in range(1000):
        t.arm("lease", f"a{i}", clock.now() + 5)
        t.arm("max", f"a{i}", clock.now() + 50)
        t.cancel_all(f"a{i}", ("lease", "max", "grace"))
    assert len(t) == 0
    clock.advance(100)
    assert t.due() == []
    assert t.next_delay() is None
    assert t.heap_size == 0


def test_due_in_deadline_order_and_next_delay() -> None:
    clock = ManualClock()
    t = Timers(clock)
    t.arm("node", "n2", clock.now() + 3)
    t.arm("node", "n1", clock.now() + 1)
    t.arm("grace", "a", clock.now() + 2)
    assert t.next_delay() == 1
    clock.advance(2.5)
    assert t.due() == [("node", "n1"), ("grace", "a")]
    assert t.next_delay() == 0.5


def test_a_wall_clock_step_moves_no_deadline() -> None:
    clock = ManualClock()
    t = Timers(clock)
    t.arm("lease", "a", clock.now() + 60)
    clock.step(3600)  # NTP jumps an hour ahead
    assert t.due() == []
    clock.step(-7200)  # and back past where it was
    clock.advance(59)
    assert t.due() == []
    clock.advance(1)
    assert t.due() == [("lease", "a")]


def test_an_earlier_deadline_wakes_the_loop() -> None:
    clock = ManualClock()
    woken: list[int] = []
    t = Timers(clock, lambda: woken.append(1))
    t.arm("lease", "a", clock.now() + 10)
    t.arm("lease", "b", clock.now() + 20)
    t.arm("lease", "c", clock.now() + 5)
    assert len(woken) == 2
