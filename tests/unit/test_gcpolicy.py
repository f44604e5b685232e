"""Survivors of a full collection are frozen (later full collections scan only newer
objects), and everything is unfrozen now and then so old cycles are still collected."""

from __future__ import annotations

import asyncio
import gc

import pytest

from rmgrpc import gcpolicy


async def test_survivors_of_a_full_collection_are_frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gcpolicy, "CHECK_EVERY", 0.01)
    task = asyncio.create_task(gcpolicy.GcPolicy().run())
    try:
        await asyncio.sleep(0.05)
        assert gc.get_freeze_count() > 0  # start-up's objects
        kept = [[i] for i in range(5000)]  # long-lived, tracked
        gc.collect()
        await asyncio.sleep(0.05)
        frozen = gc.get_freeze_count()
        assert frozen >= len(kept)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert gc.get_freeze_count() == 0  # stopping gives everything back to the collector


async def test_everything_is_unfrozen_periodically(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gcpolicy, "CHECK_EVERY", 0.01)
    monkeypatch.setattr(gcpolicy, "UNFREEZE_EVERY", 0.0)
    task = asyncio.create_task(gcpolicy.GcPolicy().run())
    try:
        await asyncio.sleep(0.05)
        assert gc.get_freeze_count() == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
