"""Keyset pagination for List RPCs, bounded by count and by bytes.

A page token names the last key returned and a fingerprint of the filters it was
issued for, so pages stay stable while the cluster changes underneath and a token
cannot be replayed against a different query.

Tokens are opaque to clients: a short binary record (fingerprint, key type, key) with a
checksum, base64url-encoded. Decoding is bounded (a token longer than
`MAX_TOKEN_CHARS` is refused before it is looked at) and never parses a structure a
client could nest: anything that is not a token we issued is INVALID_ARGUMENT.

A page ends at `page_size` items or before its items would pass `max_bytes` of
encoded messages, whichever comes first, and always holds at least one item: a list
of large objects never makes an answer bigger than a client may receive.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from typing import TypeVar

from google.protobuf.message import Message

from rmgrpc.services.validate import Violations

T = TypeVar("T")
M = TypeVar("M", bound=Message)
Key = str | int

MAX_TOKEN_CHARS = 1024
_FP_LEN = 12
_CHECK_LEN = 8
_MAX_INT_KEY = 2**63 - 1
# Per repeated item: its field tag and length prefix (at most 1 + 5 bytes).
_ITEM_OVERHEAD = 6


def fingerprint(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:_FP_LEN]


def _check(raw: bytes) -> bytes:
    return hashlib.sha256(b"rmgrpc-page-token\x00" + raw).digest()[:_CHECK_LEN]


def encode_token(last_key: Key, fp: str) -> str:
    kind = b"i" if isinstance(last_key, int) else b"s"
    raw = fp.encode() + kind + str(last_key).encode()
    return base64.urlsafe_b64encode(raw + _check(raw)).decode().rstrip("=")


def _decode(token: str, fp: str) -> Key | None:
    """The key of a token issued for `fp`, or None for anything else."""
    if len(token) > MAX_TOKEN_CHARS or not token.isascii():
        return None
    try:
        data = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        return None
    raw, check = data[:-_CHECK_LEN], data[-_CHECK_LEN:]
    if len(raw) < _FP_LEN + 1 or _check(raw) != check:
        return None
    if raw[:_FP_LEN] != fp.encode():
        return None
    kind, body = raw[_FP_LEN : _FP_LEN + 1], raw[_FP_LEN + 1 :]
    try:
        text = body.decode()
    except UnicodeDecodeError:
        return None
    if kind == b"s":
        return text
    if (
        kind == b"i"
        and text.isascii()
        and text.isdigit()
        and len(text) <= 19
        and int(text) <= _MAX_INT_KEY
    ):
        return int(text)
    return None


def decode_token(token: str, fp: str, v: Violations, field: str = "page_token") -> Key | None:
    """The key a page token continues after (None without a token); a token that is
    not one we issued for this query is a field violation."""
    if not token:
        return None
    key = _decode(token, fp)
    if key is None:
        v.add(field, "is not a page token issued for this query; start again without one")
    return key


def decode_seq_token(token: str, fp: str, v: Violations, field: str = "page_token") -> int:
    """The sequence number a page token continues after (0 without a token), for lists
    paged by `seq`; any other token is a field violation."""
    after = decode_token(token, fp, v, field)
    if after is not None and not isinstance(after, int):
        v.add(field, "is not a page token issued for this query; start again without one")
    return after if isinstance(after, int) else 0


def take_page(
    items: Iterable[T],
    key: Callable[[T], Key],
    page_size: int,
    fp: str,
    encode: Callable[[T], M],
    max_bytes: int,
) -> tuple[list[M], str]:
    """One page from `items`, already in key order and starting after the token's key,
    encoded with `encode`: at most `page_size` items and, past the first, none that
    would take the encoded page over `max_bytes`. Reads at most one item past the
    page, so a page costs its size, not the whole list."""
    page: list[M] = []
    used = 0
    last: T | None = None
    more = False
    for item in items:
        if len(page) >= page_size:
            more = True
            break
        msg = encode(item)
        size = msg.ByteSize() + _ITEM_OVERHEAD
        if page and used + size > max_bytes:
            more = True
            break
        page.append(msg)
        used += size
        last = item
    token = encode_token(key(last), fp) if more and last is not None else ""
    return page, token


def paginate(
    items: Sequence[T],
    key: Callable[[T], Key],
    page_size: int,
    after: Key | None,
    fp: str,
    encode: Callable[[T], M],
    max_bytes: int,
) -> tuple[list[M], str]:
    """One page of `items` (sorted by `key`) after `after`, and the token for the next."""
    start = 0
    if after is not None:
        keys = [key(item) for item in items]
        try:
            start = bisect.bisect_right(keys, after)
        except TypeError:
            start = len(items)
    return take_page(islice(items, start, None), key, page_size, fp, encode, max_bytes)
