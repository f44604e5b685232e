"""SetQuota edited safely, through a real server: an update mask keeps what it does not
name, an etag refuses a write based on a stale read, and concurrent operators doing
read-modify-write lose no update."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from rmgrpc.server import RunningServer
from rmgrpc.v1 import quota_pb2
from rmgrpc.v1.resources_pb2 import Resources
from rmgrpc_client import AsyncClient, FailedPreconditionError, InvalidArgumentError

TENANT = "ml/research"


@pytest.fixture
async def rm(server: RunningServer) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        yield client


async def _full(rm: AsyncClient) -> quota_pb2.Quota:
    return await rm.set_quota(
        TENANT,
        guaranteed=Resources(gpus=8, cpu_millis=64_000),
        limit=Resources(gpus=16, cpu_millis=128_000, gpus_by_model={"H100": 12}),
        weight=2,
        budget=quota_pb2.Budget(amount=500, period_seconds=86_400),
    )


def _body(q: quota_pb2.Quota) -> quota_pb2.Quota:
    """The quota without what every write changes (revision, time, etag)."""
    out = quota_pb2.Quota()
    out.CopyFrom(q)
    for name in ("revision", "update_time", "etag"):
        out.ClearField(name)
    return out


async def test_a_mask_changes_only_what_it_names(rm: AsyncClient) -> None:
    before = await _full(rm)
    after = await rm.update_quota(TENANT, weight=3)
    expected = _body(before)
    expected.weight = 3
    assert _body(after) == expected
    assert _body(await rm.get_quota(TENANT)) == expected

    # An empty mask (present, naming nothing) changes nothing; no mask would replace all.
    assert _body(await rm.set_quota(TENANT, update_mask=[])) == expected

    # A sub-field: only limit.gpus moves; the CPU limit and the per-model map stay.
    after = await rm.update_quota(TENANT, limit=Resources(gpus=20))
    expected.limit.gpus = 20
    assert _body(after) == expected

    # A field named but left unset in the request goes back to its default (unbounded).
    after = await rm.set_quota(TENANT, update_mask=["limit.gpus"])
    expected.limit.ClearField("gpus")
    assert _body(after) == expected and not after.limit.HasField("gpus")


async def test_no_mask_is_a_full_replace(rm: AsyncClient) -> None:
    await _full(rm)
    replaced = await rm.set_quota(TENANT, weight=3)
    assert replaced.weight == 3
    assert not replaced.HasField("budget")
    assert not replaced.guaranteed.HasField("gpus") and not replaced.limit.HasField("gpus")


async def test_a_mask_on_a_new_tenant_takes_defaults_for_the_rest(rm: AsyncClient) -> None:
    created = await rm.update_quota("fresh/team", weight=4)
    assert created.weight == 4 and created.parent == "fresh"
    assert not created.limit.HasField("gpus") and not created.HasField("budget")


async def test_a_bad_mask_is_refused_with_field_violations(rm: AsyncClient) -> None:
    before = await _full(rm)
    for paths in (["tenant"], ["weigth"], ["limit.gpus.x"], ["etag"], ["revision"]):
        with pytest.raises(InvalidArgumentError) as err:
            await rm.set_quota(TENANT, weight=9, update_mask=paths)
        assert [v.field for v in err.value.field_violations] == ["update_mask.paths[0]"]
    # A merge that would break the quota's own rules is refused, naming the field.
    with pytest.raises(InvalidArgumentError) as err:
        await rm.update_quota(TENANT, guaranteed=Resources(gpus=40))
    assert "quota.guaranteed.gpus" in {v.field for v in err.value.field_violations}
    assert await rm.get_quota(TENANT) == before


async def test_a_stale_etag_is_refused_and_changes_nothing(rm: AsyncClient) -> None:
    read = await _full(rm)
    assert read.etag and read.etag == (await rm.get_quota(TENANT)).etag
    moved = await rm.update_quota(TENANT, weight=5, etag=read.etag)
    assert moved.etag != read.etag

    with pytest.raises(FailedPreconditionError) as err:
        await rm.update_quota(TENANT, weight=7, etag=read.etag)
    (violation,) = err.value.precondition_violations
    assert (violation.type, violation.subject) == ("ETAG_MISMATCH", f"quota:{TENANT}")
    assert await rm.get_quota(TENANT) == moved

    with pytest.raises(FailedPreconditionError):
        await rm.delete_quota(TENANT, etag=read.etag)
    assert await rm.get_quota(TENANT) == moved
    await rm.delete_quota(TENANT, etag=moved.etag)

    # The quota is gone: an etag read before the delete cannot resurrect it blindly.
    with pytest.raises(FailedPreconditionError):
        await rm.update_quota(TENANT, weight=1, etag=moved.etag)


async def test_concurrent_operators_lose_no_update(rm: AsyncClient) -> None:
    """Eight operators each add one guaranteed GPU by read-modify-write with the etag;
    every conflict is refused and retried, so all eight additions land."""
    start = await rm.set_quota(TENANT, guaranteed=Resources(gpus=0), limit=Resources(gpus=64))
    refused = 0
    first_round = asyncio.Barrier(8)  # all read the same version before anyone writes

    async def add_one() -> None:
        nonlocal refused
        first = True
        while True:
            read = await rm.get_quota(TENANT)
            if first:
                await first_round.wait()
                first = False
            try:
                await rm.update_quota(
                    TENANT, guaranteed=Resources(gpus=read.guaranteed.gpus + 1), etag=read.etag
                )
                return
            except FailedPreconditionError:
                refused += 1

    await asyncio.gather(*(add_one() for _ in range(8)))
    final = await rm.get_quota(TENANT)
    assert final.guaranteed.gpus == 8
    assert final.limit.gpus == start.limit.gpus
    assert refused >= 7  # the first round collided: one write won, the etag refused 7


async def test_concurrent_masks_on_different_fields_both_land(rm: AsyncClient) -> None:
    await _full(rm)
    await asyncio.gather(
        rm.update_quota(TENANT, weight=6),
        rm.update_quota(TENANT, limit=Resources(cpu_millis=256_000)),
        rm.update_quota(TENANT, guaranteed=Resources(gpus=4)),
    )
    q = await rm.get_quota(TENANT)
    assert (q.weight, q.limit.cpu_millis, q.guaranteed.gpus) == (6, 256_000, 4)
    assert (q.limit.gpus, q.budget.amount) == (16, 500)
