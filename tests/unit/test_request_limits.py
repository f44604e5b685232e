"""Limits without a server: page tokens, byte-bounded pages, stream slots, the event
ring's byte bound, and the transport options built from the settings."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rmgrpc.config import ConfigError, Settings, load_settings
from rmgrpc.errors import QuotaExceeded
from rmgrpc.events import EventHub, WatchFilter, event_bytes
from rmgrpc.limits import StreamSlots, check_pending, grpc_options, principal_key
from rmgrpc.model import Event, EventKind
from rmgrpc.services.pagination import (
    MAX_TOKEN_CHARS,
    decode_token,
    encode_token,
    fingerprint,
    paginate,
    take_page,
)
from rmgrpc.services.validate import Violations
from rmgrpc.v1 import resources_pb2

FP = fingerprint("allocations", "", "", [])


def decode(token: str, fp: str = FP) -> tuple[int | str | None, list[str]]:
    v = Violations()
    key = decode_token(token, fp, v)
    return key, [f.field for f in v.items]


# -- page tokens -----------------------------------------------------------------------


@given(st.one_of(st.integers(0, 2**63 - 1), st.text(max_size=300)))
def test_a_token_we_issue_decodes_to_its_key(key: int | str) -> None:
    assert decode(encode_token(key, FP)) == (key, [])


def test_a_token_for_another_query_is_refused() -> None:
    other = fingerprint("allocations", "org", "", [])
    assert decode(encode_token(5, other)) == (None, ["page_token"])


def test_the_old_json_token_and_a_deeply_nested_one_are_invalid_argument() -> None:
    # What tokens used to be, and what made every List answer INTERNAL (RecursionError).
    old = base64.urlsafe_b64encode(json.dumps({"k": 5, "f": FP}).encode()).decode()
    nested = base64.urlsafe_b64encode(b"[" * 100_000 + b"]" * 100_000).decode()
    for token in (old, nested, nested[:MAX_TOKEN_CHARS]):
        assert decode(token) == (None, ["page_token"])


def test_a_tampered_token_is_refused() -> None:
    token = encode_token(1234, FP)
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[-9] ^= 1  # a digit of the key
    forged = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    assert decode(forged) == (None, ["page_token"])


@settings(max_examples=300)
@given(st.one_of(st.text(max_size=2000), st.binary(max_size=1500).map(lambda b: b.hex())))
def test_any_string_decodes_to_a_key_or_a_violation_never_an_exception(token: str) -> None:
    key, fields = decode(token)
    assert (key is None) == (fields == ["page_token"]) or token == ""


# -- pages bounded by count and bytes ----------------------------------------------------


def shape(labels: int, ident: int = 0) -> resources_pb2.Shape:
    return resources_pb2.Shape(
        gpus=ident, cpu_millis=1, node_selector={f"k{i:03d}": "v" * 60 for i in range(labels)}
    )


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 64), max_size=40),
    page_size=st.integers(1, 50),
    max_bytes=st.integers(1, 20_000),
)
def test_pages_stop_at_count_or_bytes_and_together_list_everything(
    sizes: list[int], page_size: int, max_bytes: int
) -> None:
    items = list(enumerate(sizes))
    seen: list[int] = []
    after: int | str | None = None
    pages = 0
    while True:
        rest = [i for i in items if after is None or i[0] > int(after)]
        page, token = take_page(
            rest, lambda i: i[0], page_size, FP, lambda i: shape(i[1], i[0]), max_bytes
        )
        pages += 1
        assert len(page) <= page_size
        if len(page) > 1:
            assert sum(m.ByteSize() + 6 for m in page) <= max_bytes
        assert page or not rest  # never an empty page while items remain
        seen.extend(m.gpus for m in page)
        if not token:
            break
        after, fields = decode(token)
        assert fields == []
        assert pages <= len(items) + 1
    assert seen == [i for i, _ in items]


def test_a_single_item_larger_than_the_byte_bound_still_makes_a_page() -> None:
    page, token = take_page([1, 2], lambda i: i, 10, FP, lambda i: shape(64), 100)
    assert len(page) == 1 and decode(token) == (1, [])


def test_paginate_resumes_after_the_key() -> None:
    items = [f"n{i:02d}" for i in range(10)]
    page, token = paginate(items, str, 4, "n03", FP, lambda s: shape(0), 1 << 20)
    assert len(page) == 4 and decode(token) == ("n07", [])


# -- stream slots and pending bounds -----------------------------------------------------


def test_stream_slots_refuse_past_each_bound_and_free_on_exit() -> None:
    slots = StreamSlots(per_principal=2, total=3)
    slots.acquire("a")
    slots.acquire("a")
    with pytest.raises(QuotaExceeded) as mine:
        slots.acquire("a")
    assert mine.value.violations[0].subject == "principal:a"
    assert "max_watch_streams_per_principal" in mine.value.violations[0].description
    slots.acquire("b")
    with pytest.raises(QuotaExceeded) as total:
        slots.acquire("c")
    assert total.value.violations[0].subject == "server"
    slots.release("a")
    with slots.slot("c"):
        assert slots.count == 3 and slots.open_for("c") == 1
    assert slots.count == 2 and slots.open_for("c") == 0


def test_a_stream_that_fails_still_gives_its_slot_back() -> None:
    slots = StreamSlots(per_principal=1, total=1)
    with pytest.raises(RuntimeError), slots.slot("a"):
        raise RuntimeError("the stream ended badly")
    assert slots.count == 0


def test_pending_bounds_name_the_tenant_or_the_server() -> None:
    s = Settings(max_pending_per_tenant=2, max_pending_total=3)
    check_pending(s, "org/a", 1, 2)
    with pytest.raises(QuotaExceeded) as tenant:
        check_pending(s, "org/a", 2, 2)
    assert tenant.value.violations[0].subject == "tenant:org/a"
    with pytest.raises(QuotaExceeded) as total:
        check_pending(s, "org/b", 0, 3)
    assert total.value.violations[0].subject == "server"


class _Peer:
    def __init__(self, peer: str) -> None:
        self._peer = peer

    def peer(self) -> str:
        return self._peer


@pytest.mark.parametrize(
    ("peer", "key"),
    [
        ("ipv4:10.1.2.3:50000", "ipv4:10.1.2.3"),
        ("ipv6:[::1]:41234", "ipv6:[::1]"),
        ("unix:/tmp/sock", "unix:/tmp/sock"),
    ],
)
def test_principal_is_the_peer_host_without_its_port(peer: str, key: str) -> None:
    assert principal_key(_Peer(peer)) == key


# -- transport options and settings ------------------------------------------------------


def test_grpc_options_follow_the_settings() -> None:
    s = Settings(
        max_message_bytes=1 << 20,
        max_page_bytes=1 << 19,
        max_concurrent_streams=7,
        keepalive_time_seconds=2,
        keepalive_timeout_seconds=1.5,
        min_ping_interval_seconds=3,
    )
    opts = dict(grpc_options(s))
    assert opts["grpc.max_receive_message_length"] == 1 << 20
    assert opts["grpc.max_concurrent_streams"] == 7
    assert opts["grpc.keepalive_time_ms"] == 2000
    assert opts["grpc.keepalive_timeout_ms"] == 1500
    assert opts["grpc.http2.min_ping_interval_without_data_ms"] == 3000


def test_a_page_byte_bound_above_the_message_size_is_refused() -> None:
    with pytest.raises(ConfigError, match="max_page_bytes"):
        load_settings(None, env={}, overrides={"max_page_bytes": 8 << 20})


# -- the event ring's byte bound ---------------------------------------------------------


def big_event(revision: int, size: int) -> Event:
    return Event(revision, EventKind.ALLOCATION, 1, f"a{revision}", 0.0, b"x" * size, "t", ())


async def test_the_ring_is_bounded_in_bytes_and_older_events_come_from_the_store() -> None:
    log = [big_event(r, 8000) for r in range(1, 2001)]

    async def read_events(after: int, limit: int) -> list[Event]:
        await asyncio.sleep(0)
        return [e for e in log if e.revision > after][:limit]

    hub = EventHub(read_events, last_revision=0, oldest_revision=1, ring_max_bytes=1 << 20)
    for e in log:
        hub.publish([e])
        assert hub.ring_bytes <= 1 << 20
    assert hub.ring_bytes == sum(event_bytes(e) for e in log[-hub.ring_events :])
    assert 100 < hub.ring_events < 200  # ~1 MiB of ~8 KB events, not 2000
    # A watcher from the start still gets every event, in order: the store has them.
    got: list[int] = []
    stream = hub.watch(WatchFilter(), 1, 60.0)
    async for item in stream:
        assert isinstance(item, Event)
        got.append(item.revision)
        if item.revision == 2000:
            break
    await stream.aclose()
    assert got == list(range(1, 2001))


def test_the_newest_event_stays_in_the_ring_however_large() -> None:
    async def nothing(after: int, limit: int) -> list[Event]:
        return []

    hub = EventHub(nothing, last_revision=0, oldest_revision=1, ring_max_bytes=1000)
    hub.publish([big_event(1, 5000)])
    hub.publish([big_event(2, 5000)])
    assert hub.ring_events == 1 and hub.ring_bytes == event_bytes(big_event(2, 5000))
