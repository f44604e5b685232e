"""The keepalive helper's policy against a scripted client: when it renews, when it only
reads, what it retries, and how it reports the end. Sleeps are recorded, not slept."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from rmgrpc.v1 import allocator_pb2 as pb
from rmgrpc_client import (
    AllocationEnded,
    AsyncKeepalive,
    FailedPreconditionError,
    Keepalive,
    PermissionDeniedError,
    RmgrpcError,
    UnavailableError,
)

PENDING = pb.ALLOCATION_STATE_PENDING
ALLOCATED = pb.ALLOCATION_STATE_ALLOCATED
PREEMPTED = pb.ALLOCATION_STATE_PREEMPTED


def alloc(
    state: pb.AllocationState.ValueType = ALLOCATED, lease: int = 30, reason: str = ""
) -> pb.Allocation:
    return pb.Allocation(id="a-1", state=state, lease_seconds=lease, state_reason=reason)


class Script:
    """A client whose answers are scripted: each call takes the next answer of its method
    (an Allocation, or an exception to raise); the last one repeats."""

    def __init__(
        self,
        renew: list[pb.Allocation | Exception] | None = None,
        get: list[pb.Allocation | Exception] | None = None,
    ) -> None:
        self.answers = {"renew": renew or [alloc()], "get": get or [alloc()]}
        self.calls: list[tuple[str, int]] = []

    def _next(self, method: str, arg: int = 0) -> pb.Allocation:
        self.calls.append((method, arg))
        queue = self.answers[method]
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


class AsyncScript(Script):
    async def renew(self, allocation_id: str, lease_seconds: int = 0) -> pb.Allocation:
        return self._next("renew", lease_seconds)

    async def get_allocation(self, allocation_id: str) -> pb.Allocation:
        return self._next("get")


class SyncScript(Script):
    def renew(self, allocation_id: str, lease_seconds: int = 0) -> pb.Allocation:
        return self._next("renew", lease_seconds)

    def get_allocation(self, allocation_id: str) -> pb.Allocation:
        return self._next("get")


def unavailable() -> UnavailableError:
    return UnavailableError(grpc.StatusCode.UNAVAILABLE, "server restarting")


def sleeper(limit: int) -> tuple[list[float], Callable[[float], Any]]:
    """Records each sleep; after `limit` of them, blocks for good (the test then stops)."""
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) >= limit:
            await asyncio.Event().wait()

    return slept, sleep


async def run_until_idle(ka: AsyncKeepalive) -> None:
    ka.start()
    for _ in range(200):
        await asyncio.sleep(0)


async def test_renews_at_once_then_every_third_of_the_lease() -> None:
    client = AsyncScript(renew=[alloc(lease=30)])
    slept, sleep = sleeper(3)
    ka = AsyncKeepalive(client, "a-1", sleep=sleep)  # type: ignore[arg-type]
    await run_until_idle(ka)
    await ka.stop()
    assert client.calls == [("get", 0), ("renew", 0), ("renew", 0), ("renew", 0)]
    assert slept == [10.0, 10.0, 10.0]
    assert ka.renewals == 3 and ka.failure is None


async def test_a_lease_length_given_is_sent_and_gives_a_lease_to_one_without() -> None:
    client = AsyncScript(renew=[alloc(lease=60)])
    slept, sleep = sleeper(1)
    ka = AsyncKeepalive(client, alloc(lease=0), lease_seconds=60, sleep=sleep)  # type: ignore[arg-type]
    await run_until_idle(ka)
    await ka.stop()
    assert client.calls == [("renew", 60)]  # the allocation handed in is not read again
    assert slept == [20.0]


async def test_without_a_lease_it_only_reads_now_and_then() -> None:
    client = AsyncScript(get=[alloc(lease=0)])
    slept, sleep = sleeper(2)
    ka = AsyncKeepalive(client, alloc(lease=0), sleep=sleep)  # type: ignore[arg-type]
    await run_until_idle(ka)
    await ka.stop()
    assert [m for m, _ in client.calls] == ["get"]
    assert slept == [30.0, 30.0]


async def test_pending_is_read_until_placed_then_renewed_at_once() -> None:
    client = AsyncScript(get=[alloc(PENDING), alloc(ALLOCATED)], renew=[alloc(lease=30)])
    slept, sleep = sleeper(4)
    ka = AsyncKeepalive(client, alloc(PENDING), poll_seconds=2, sleep=sleep)  # type: ignore[arg-type]
    await run_until_idle(ka)
    await ka.stop()
    # Handed in PENDING, read 2 s later (still), then placed: renewed with no wait.
    assert [m for m, _ in client.calls] == ["get", "get", "renew"]
    assert slept == [2.0, 2.0, 0.0, 10.0]


async def test_transient_errors_are_retried_and_reported() -> None:
    errors: list[RmgrpcError] = []
    client = AsyncScript(renew=[unavailable(), unavailable(), alloc()])
    slept, sleep = sleeper(3)
    ka = AsyncKeepalive(
        client,  # type: ignore[arg-type]
        alloc(),
        retry_seconds=0.5,
        on_error=errors.append,
        sleep=sleep,
    )
    await run_until_idle(ka)
    await ka.stop()
    assert slept == [0.5, 0.5, 10.0]
    assert len(errors) == 2 and ka.failure is None and ka.renewals == 1


async def test_other_errors_end_it_and_are_raised() -> None:
    denied = PermissionDeniedError(grpc.StatusCode.PERMISSION_DENIED, "not yours")
    client = AsyncScript(renew=[denied])
    ka = AsyncKeepalive(client, alloc()).start()  # type: ignore[arg-type]
    with pytest.raises(PermissionDeniedError):
        await ka.wait()
    assert ka.failure is denied
    with pytest.raises(PermissionDeniedError):
        async with AsyncKeepalive(client, alloc()) as ka:  # type: ignore[arg-type]
            await asyncio.sleep(0.01)


async def test_an_allocation_that_ended_says_how() -> None:
    ended = alloc(PREEMPTED, reason="preempted by a-9")
    refused = FailedPreconditionError(grpc.StatusCode.FAILED_PRECONDITION, "ended")
    client = AsyncScript(renew=[refused], get=[ended])
    ka = AsyncKeepalive(client, alloc()).start()  # type: ignore[arg-type]
    with pytest.raises(AllocationEnded) as err:
        await ka.wait()
    assert err.value.allocation == ended
    assert "PREEMPTED: preempted by a-9" in str(err.value)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_the_threaded_keepalive_renews_until_stopped_and_reports_failures() -> None:
    client = SyncScript(renew=[alloc(lease=1)])
    with Keepalive(client, "a-1", fraction=0.05) as ka:  # type: ignore[arg-type]
        while ka.renewals < 3:
            assert not ka.wait(0.01)
    calls = len(client.calls)
    assert ka.wait(0) is True  # stopped
    assert len(client.calls) == calls  # and nothing more is called

    denied = PermissionDeniedError(grpc.StatusCode.PERMISSION_DENIED, "not yours")
    ka = Keepalive(SyncScript(renew=[denied]), alloc()).start()  # type: ignore[arg-type]
    with pytest.raises(PermissionDeniedError):
        ka.wait(5)


def test_fraction_must_be_a_fraction() -> None:
    with pytest.raises(ValueError):
        Keepalive(SyncScript(), "a-1", fraction=1.5)  # type: ignore[arg-type]
