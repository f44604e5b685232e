"""Keep an allocation's lease alive: renew it at a fraction of its lease until stopped.

rmgrpc gives an allocation no lease unless asked (it runs until released or past
`max_duration_seconds`). One that asks for `lease_seconds` is a dead-man's switch: it
EXPIRES unless renewed in time, so its work stops soon after its owner dies. These
helpers are the owner's side of that switch:

    async with rm.keepalive(alloc.id):          # AsyncKeepalive
        await run_the_work()

    with client.keepalive(alloc.id) as ka:       # Keepalive: a thread, for blocking code
        run_the_work()

Each renews right away, then every `fraction` of the lease (a third by default: two
renewals may fail before the lease lapses). While the allocation is PENDING it is only
read, at `poll_seconds` (its lease starts once placed); one with no lease is read now and
then to notice its end. Transient errors (UNAVAILABLE, DEADLINE_EXCEEDED, …) are retried
at `retry_seconds` and reported to `on_error`; anything else ends the keepalive, and so
does the allocation ending (`AllocationEnded`, e.g. PREEMPTED). The failure is kept in
`failure`, raised by `wait()`, and raised when the `with` block ends normally.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING

import grpc

from rmgrpc.v1 import allocator_pb2
from rmgrpc_client._errors import FailedPreconditionError, RmgrpcError

if TYPE_CHECKING:
    from rmgrpc_client._async_client import AsyncClient
    from rmgrpc_client._sync_client import Client

Allocation = allocator_pb2.Allocation
A = allocator_pb2

TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)
_MIN_INTERVAL = 0.05
# An allocation with no lease cannot lapse; it is read this often only to notice its end.
_IDLE_POLL_SECONDS = 30.0


class AllocationEnded(FailedPreconditionError):
    """The allocation ended (released, expired, preempted, lost, cancelled…): there is
    nothing left to keep alive. `allocation` is how it ended."""

    def __init__(self, allocation: Allocation) -> None:
        state = A.AllocationState.Name(allocation.state).removeprefix("ALLOCATION_STATE_")
        why = f": {allocation.state_reason}" if allocation.state_reason else ""
        super().__init__(
            grpc.StatusCode.FAILED_PRECONDITION, f"allocation {allocation.id} is {state}{why}"
        )
        self.allocation = allocation


def _ended(a: Allocation) -> bool:
    return a.state not in (A.ALLOCATION_STATE_PENDING, A.ALLOCATION_STATE_ALLOCATED)


class _Policy:
    """When to do what; shared by the async and the threaded keepalive."""

    def __init__(
        self, lease_seconds: int, fraction: float, poll_seconds: float, retry_seconds: float
    ) -> None:
        if not 0 < fraction < 1:
            raise ValueError("fraction must be between 0 and 1")
        self.lease_seconds = lease_seconds
        self.fraction = fraction
        self.poll_seconds = poll_seconds
        self.retry_seconds = retry_seconds

    def lease(self, a: Allocation) -> int:
        return self.lease_seconds or a.lease_seconds

    def renews(self, a: Allocation) -> bool:
        """Whether the next step is a renewal (else a read)."""
        return a.state == A.ALLOCATION_STATE_ALLOCATED and self.lease(a) > 0

    def delay(self, a: Allocation) -> float:
        lease = self.lease(a)
        if lease <= 0:
            return _IDLE_POLL_SECONDS
        every = max(_MIN_INTERVAL, lease * self.fraction)
        if a.state == A.ALLOCATION_STATE_PENDING:
            return min(self.poll_seconds, every)  # catch the placement early in its lease
        return every

    def retry_delay(self, a: Allocation) -> float:
        return min(self.retry_seconds, self.delay(a))


class AsyncKeepalive:
    """Renews one allocation from an asyncio task until `stop()` (see the module doc).

    `allocation` is an id or the `Allocation` just returned by `allocate`. `lease_seconds`
    is sent with each renewal (0 keeps the allocation's own; set it to give a lease to an
    allocation created without one). `on_renewed` gets each renewed allocation,
    `on_error` each transient error retried.
    """

    def __init__(
        self,
        client: AsyncClient,
        allocation: str | Allocation,
        *,
        lease_seconds: int = 0,
        fraction: float = 1 / 3,
        poll_seconds: float = 5.0,
        retry_seconds: float = 1.0,
        on_renewed: Callable[[Allocation], None] | None = None,
        on_error: Callable[[RmgrpcError], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._client = client
        self._initial = allocation if isinstance(allocation, Allocation) else None
        self.allocation_id = allocation.id if isinstance(allocation, Allocation) else allocation
        self._policy = _Policy(lease_seconds, fraction, poll_seconds, retry_seconds)
        self._on_renewed = on_renewed
        self._on_error = on_error
        self._sleep = sleep
        self._task: asyncio.Task[None] | None = None
        self.allocation: Allocation | None = self._initial
        self.failure: Exception | None = None
        self.renewals = 0

    def start(self) -> AsyncKeepalive:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"keepalive-{self.allocation_id}")
        return self

    async def stop(self) -> None:
        """Stop renewing (the allocation is left as it is: release it yourself)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait(self) -> None:
        """Returns when stopped; raises the failure that ended the keepalive."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._task)
        if self.failure is not None:
            raise self.failure

    async def __aenter__(self) -> AsyncKeepalive:
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
        if exc is None and self.failure is not None:
            raise self.failure

    async def _run(self) -> None:
        try:
            await self._loop()
        except Exception as error:  # kept for wait() and the with block: never lost
            self.failure = error

    async def _loop(self) -> None:
        policy = self._policy
        a = self.allocation or await self._client.get_allocation(self.allocation_id)
        self.allocation = a
        while True:
            if _ended(a):
                raise AllocationEnded(a)
            renewed = False
            try:
                if policy.renews(a):
                    a = await self._renew()
                    renewed = True
                    self.renewals += 1
                    if self._on_renewed is not None:
                        self._on_renewed(a)
                elif a is not self._initial:  # the one handed in is fresh: no need to read
                    a = await self._client.get_allocation(self.allocation_id)
                self.allocation = a
                # Seen placed by a read: renew at once, its lease started when placed.
                delay = 0.0 if policy.renews(a) and not renewed else policy.delay(a)
            except RmgrpcError as error:
                if error.code not in TRANSIENT:
                    raise
                if self._on_error is not None:
                    self._on_error(error)
                delay = policy.retry_delay(a)
            self._initial = None
            if _ended(a):
                raise AllocationEnded(a)
            await self._sleep(delay)

    async def _renew(self) -> Allocation:
        try:
            return await self._client.renew(self.allocation_id, self._policy.lease_seconds)
        except FailedPreconditionError:
            # Ended meanwhile: say how, from the allocation itself.
            ended = await self._client.get_allocation(self.allocation_id)
            if _ended(ended):
                raise AllocationEnded(ended) from None
            raise


class Keepalive:
    """`AsyncKeepalive` for blocking code: renews from a daemon thread until `stop()`."""

    def __init__(
        self,
        client: Client,
        allocation: str | Allocation,
        *,
        lease_seconds: int = 0,
        fraction: float = 1 / 3,
        poll_seconds: float = 5.0,
        retry_seconds: float = 1.0,
        on_renewed: Callable[[Allocation], None] | None = None,
        on_error: Callable[[RmgrpcError], None] | None = None,
    ) -> None:
        self._client = client
        self._initial = allocation if isinstance(allocation, Allocation) else None
        self.allocation_id = allocation.id if isinstance(allocation, Allocation) else allocation
        self._policy = _Policy(lease_seconds, fraction, poll_seconds, retry_seconds)
        self._on_renewed = on_renewed
        self._on_error = on_error
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.allocation: Allocation | None = self._initial
        self.failure: Exception | None = None
        self.renewals = 0

    def start(self) -> Keepalive:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"keepalive-{self.allocation_id}", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop renewing (the allocation is left as it is: release it yourself)."""
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def wait(self, timeout: float | None = None) -> bool:
        """Waits until stopped or failed (True), or `timeout` passes (False); raises the
        failure that ended the keepalive."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._thread is not None and self._thread.is_alive():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self._thread.join(left)
        if self.failure is not None:
            raise self.failure
        return True

    def __enter__(self) -> Keepalive:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if exc is None and self.failure is not None:
            raise self.failure

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as error:  # kept for wait() and the with block: never lost
            self.failure = error

    def _loop(self) -> None:
        policy = self._policy
        a = self.allocation or self._client.get_allocation(self.allocation_id)
        self.allocation = a
        while not self._stopping.is_set():
            if _ended(a):
                raise AllocationEnded(a)
            renewed = False
            try:
                if policy.renews(a):
                    a = self._renew()
                    renewed = True
                    self.renewals += 1
                    if self._on_renewed is not None:
                        self._on_renewed(a)
                elif a is not self._initial:
                    a = self._client.get_allocation(self.allocation_id)
                self.allocation = a
                delay = 0.0 if policy.renews(a) and not renewed else policy.delay(a)
            except RmgrpcError as error:
                if error.code not in TRANSIENT:
                    raise
                if self._on_error is not None:
                    self._on_error(error)
                delay = policy.retry_delay(a)
            self._initial = None
            if _ended(a):
                raise AllocationEnded(a)
            self._stopping.wait(delay)

    def _renew(self) -> Allocation:
        try:
            return self._client.renew(self.allocation_id, self._policy.lease_seconds)
        except FailedPreconditionError:
            ended = self._client.get_allocation(self.allocation_id)
            if _ended(ended):
                raise AllocationEnded(ended) from None
            raise
