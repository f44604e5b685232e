"""Pages of list results, and walking every page of a list RPC."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Generic, NamedTuple, TypeVar

T = TypeVar("T")


class Page(NamedTuple, Generic[T]):
    """One page of a list RPC: its items, the token for the next page ("" when this is
    the last), and the revision the server read it at (watch from `revision + 1` to miss
    nothing)."""

    items: list[T]
    next_page_token: str
    revision: int


async def iterate_pages(fetch: Callable[[str], Awaitable[Page[T]]]) -> AsyncIterator[T]:
    """Yield every item of every page, fetching the next page only when needed."""
    token = ""
    while True:
        page = await fetch(token)
        for item in page.items:
            yield item
        token = page.next_page_token
        if not token:
            return


def iterate_pages_sync(fetch: Callable[[str], Page[T]]) -> Iterator[T]:
    """The blocking twin of `iterate_pages`."""
    token = ""
    while True:
        page = fetch(token)
        yield from page.items
        token = page.next_page_token
        if not token:
            return
