"""A watch on allocation events that survives disconnects and compaction.

Modelled on Kubernetes client-go's reflector: the caller iterates one endless stream of
changes and never handles the ways a long-lived gRPC stream breaks.

- The stream dropped (UNAVAILABLE, a server restart), or the server cut a slow consumer
  (RESOURCE_EXHAUSTED), or any other transient error: reconnect with exponential backoff
  and jitter, resuming at ``last revision seen + 1``. Nothing is missed, nothing repeated.
- The server no longer holds the revisions needed to resume (OUT_OF_RANGE, reason
  REVISION_COMPACTED): list the allocations again, yield one `Relisted` item with that
  complete picture, and watch on from the list's ``revision + 1``.
- PROGRESS events (sent on idle streams) only move the resume point; they are not yielded.
- INVALID_ARGUMENT, PERMISSION_DENIED, UNAUTHENTICATED (and NOT_FOUND, FAILED_PRECONDITION,
  UNIMPLEMENTED) are raised: retrying cannot fix them.

So the items are `AllocationEvent` (CREATED, PLACED, UPDATED, ENDED; each exactly once, in
revision order) and, now and then, `Relisted`: after one, treat the list as the truth.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, TypeAlias

import grpc

from rmgrpc.v1 import allocator_pb2
from rmgrpc_client._errors import OutOfRangeError, RmgrpcError

if TYPE_CHECKING:
    from rmgrpc_client._async_client import AsyncClient

__all__ = ["AllocationWatch", "Relisted", "Relister", "WatchItem", "watch_allocations"]

log = logging.getLogger(__name__)

_FATAL = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


@dataclass(frozen=True, slots=True)
class Relisted:
    """The watch could not resume, so it listed again: `allocations` is every allocation
    matching the watch's filters as of `revision`. Replace what you knew with it; the
    events that follow all have revisions above `revision`."""

    allocations: tuple[allocator_pb2.Allocation, ...]
    revision: int


WatchItem: TypeAlias = allocator_pb2.AllocationEvent | Relisted
"""What a watch yields: a change (`AllocationEvent`) or a fresh full list (`Relisted`)."""

Relister: TypeAlias = Callable[[], Awaitable[Relisted]]
"""Lists the allocations a watch covers; used instead of the default full ListAllocations
(e.g. to list only ALLOCATED ones). It must return the list's read revision."""


def watch_allocations(
    client: AsyncClient,
    *,
    start_revision: int = 0,
    tenant: str = "",
    node_id: str = "",
    allocation_id: str = "",
    relist: Relister | None = None,
    backoff_initial: float = 0.2,
    backoff_max: float = 5.0,
    budget_alerts: bool = False,
) -> AllocationWatch:
    """Watch allocation events matching the filters, resuming across failures.

    `start_revision` 0 means "from now"; N means every event with revision >= N, then
    live. Use it as ``async for item in watch_allocations(client, node_id="n1"): ...`` and
    close it with ``await watch.aclose()`` or ``async with`` when you stop early. The
    default relist is ListAllocations with the same tenant/node_id filters (all pages,
    every state); pass `relist` to list differently. `budget_alerts` adds the budget
    alerts of `tenant`'s subtree (BUDGET_ALERT events; a relist lists allocations only).
    """
    return AllocationWatch(
        client,
        start_revision=start_revision,
        tenant=tenant,
        node_id=node_id,
        allocation_id=allocation_id,
        relist=relist,
        backoff_initial=backoff_initial,
        backoff_max=backoff_max,
        budget_alerts=budget_alerts,
    )


class AllocationWatch:
    """The async iterator `watch_allocations` returns. `revision` is the resume point:
    every matching event up to it has been yielded (or covered by a `Relisted`)."""

    def __init__(
        self,
        client: AsyncClient,
        *,
        start_revision: int = 0,
        tenant: str = "",
        node_id: str = "",
        allocation_id: str = "",
        relist: Relister | None = None,
        backoff_initial: float = 0.2,
        backoff_max: float = 5.0,
        budget_alerts: bool = False,
    ) -> None:
        if start_revision < 0:
            raise ValueError("start_revision must be >= 0")
        self._client = client
        self._tenant = tenant
        self._node_id = node_id
        self._allocation_id = allocation_id
        self._budget_alerts = budget_alerts
        self._relist = relist or self._list_everything
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        # With start_revision 0 the resume point is unknown until the first event or
        # progress message arrives; a failure before that forces a relist.
        self._known = start_revision > 0
        self._revision = max(start_revision - 1, 0)
        self._items = self._run()

    @property
    def revision(self) -> int:
        """The last revision yielded or passed by progress (0 while unknown). A new watch
        with ``start_revision=revision + 1`` continues exactly where this one is."""
        return self._revision

    def __aiter__(self) -> AllocationWatch:
        return self

    async def __anext__(self) -> WatchItem:
        return await self._items.__anext__()

    async def aclose(self) -> None:
        """Stop watching and close the stream."""
        await self._items.aclose()

    async def __aenter__(self) -> AllocationWatch:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _run(self) -> AsyncGenerator[WatchItem, None]:
        failures = 0
        must_relist = False
        while True:
            if must_relist:
                try:
                    listed = await self._relist()
                except RmgrpcError as error:
                    if error.code in _FATAL:
                        raise
                    self._note(failures, "relist failed, retrying: %s", error)
                    await self._sleep_backoff(failures)
                    failures += 1
                    continue
                must_relist = False
                self._revision = listed.revision
                self._known = True
                yield listed

            stream = self._client.watch_events(
                start_revision=self._revision + 1 if self._known else 0,
                tenant=self._tenant,
                node_id=self._node_id,
                allocation_id=self._allocation_id,
                budget_alerts=self._budget_alerts,
            )
            try:
                async for event in stream:
                    failures = 0
                    if self._known and event.revision <= self._revision:
                        continue  # already delivered (or covered by the last relist)
                    self._revision = event.revision
                    self._known = True
                    if event.type != allocator_pb2.ALLOCATION_EVENT_TYPE_PROGRESS:
                        yield event
                log.info("watch stream ended by the server; resuming at %d", self._revision + 1)
            except OutOfRangeError as error:
                info = error.error_info
                log.info(
                    "watch revision %d compacted (oldest %s, current %s); relisting",
                    self._revision + 1,
                    info.metadata.get("oldest_revision", "?") if info else "?",
                    info.metadata.get("current_revision", "?") if info else "?",
                )
                must_relist = True
                if failures:  # compaction racing the relist: do not spin
                    await self._sleep_backoff(failures)
                failures += 1
                continue
            except RmgrpcError as error:
                if error.code in _FATAL:
                    raise
                self._note(
                    failures, "watch interrupted (%s); resuming at %d", error, self._revision + 1
                )
            finally:
                await stream.aclose()
            must_relist = not self._known
            await self._sleep_backoff(failures)
            failures += 1

    @staticmethod
    def _note(failures: int, text: str, *args: object) -> None:
        """Log the first failure of a streak at INFO, the repeats at DEBUG."""
        log.log(logging.DEBUG if failures else logging.INFO, text, *args)

    async def _sleep_backoff(self, failures: int) -> None:
        ceiling = min(self._backoff_max, self._backoff_initial * 2 ** min(failures, 32))
        await asyncio.sleep(random.uniform(ceiling / 2, ceiling))

    async def _list_everything(self) -> Relisted:
        first = await self._client.list_allocations_page(tenant=self._tenant, node_id=self._node_id)
        # Pages may be read at different revisions; the first page's is the oldest, so
        # watching from it re-sends at worst a change the later pages already showed.
        allocations = list(first.items)
        token = first.next_page_token
        while token:
            page = await self._client.list_allocations_page(
                tenant=self._tenant, node_id=self._node_id, page_token=token
            )
            allocations += page.items
            token = page.next_page_token
        if self._allocation_id:
            allocations = [a for a in allocations if a.id == self._allocation_id]
        return Relisted(tuple(allocations), first.revision)
