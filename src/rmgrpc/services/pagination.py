"""Keyset pagination for List RPCs.

A page token names the last key returned and a fingerprint of the filters it was
issued for, so pages stay stable while the cluster changes underneath and a token
cannot be replayed against a different query.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from typing import TypeVar

from rmgrpc.services.validate import Violations

T = TypeVar("T")
Key = str | int


def fingerprint(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


def encode_token(last_key: Key, fp: str) -> str:
    raw = json.dumps({"k": last_key, "f": fp}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, fp: str, v: Violations, field: str = "page_token") -> Key | None:
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        key = data["k"]
        if data["f"] != fp or not isinstance(key, (str, int)) or isinstance(key, bool):
            raise ValueError
        return key
    except (ValueError, KeyError, TypeError):
        v.add(field, "is not a page token issued for this query; start again without one")
        return None


def paginate(
    items: Sequence[T], key: Callable[[T], Key], page_size: int, after: Key | None, fp: str
) -> tuple[list[T], str]:
    """One page of `items` (sorted by `key`) after `after`, and the token for the next."""
    start = 0
    if after is not None:
        keys = [key(item) for item in items]
        try:
            start = bisect.bisect_right(keys, after)
        except TypeError:
            start = len(items)
    page = list(items[start : start + page_size])
    more = start + page_size < len(items)
    return page, encode_token(key(page[-1]), fp) if more and page else ""


def take_page(
    items: Iterable[T], key: Callable[[T], Key], page_size: int, fp: str
) -> tuple[list[T], str]:
    """One page from `items`, already in key order and starting after the token's key:
    reads at most one item past the page, so a page costs its size, not the whole list."""
    got = list(islice(items, page_size + 1))
    page = got[:page_size]
    more = len(got) > page_size
    return page, encode_token(key(page[-1]), fp) if more and page else ""
