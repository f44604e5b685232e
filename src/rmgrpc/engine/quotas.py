"""Quota commands: SetQuota, DeleteQuota, and usage as the scheduler counts it.

Writes are read-modify-write safe: the etag precondition and the merge of a partial
update are checked against the current quota in the same synchronous step that writes
it, so no other command can slip in between (the engine is one event loop).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from rmgrpc.engine.core import EngineCore
from rmgrpc.errors import FailedPrecondition, NotFound
from rmgrpc.model import Quota
from rmgrpc.scheduler import fairshare

log = logging.getLogger("rmgrpc.engine")


# How stale GetUsage's decayed (recent) usage may be when nothing else changed.
USAGE_FRESH_SECONDS = 10.0


def quota_etag(quota: Quota) -> str:
    """The quota's etag: the revision it was last written at, which no other write of
    any quota ever reuses (a deleted and recreated quota gets a new one)."""
    return str(quota.revision)


class QuotaCommands(EngineCore):
    _usage_ledger: tuple[tuple[int, int], asyncio.Future[fairshare.Ledger]] | None = None

    def get_quota(self, tenant: str) -> Quota:
        quota = self.state.quotas.get(tenant)
        if quota is None:
            raise NotFound("quota", tenant, f"tenant {tenant!r} has no quota of its own")
        return quota

    def check_etag(self, tenant: str, etag: str) -> None:
        """FailedPrecondition unless `etag` is empty or names the tenant's current quota."""
        if not etag:
            return
        current = self.state.quotas.get(tenant)
        if current is None:
            raise FailedPrecondition(
                "ETAG_MISMATCH",
                f"quota:{tenant}",
                f"tenant {tenant!r} has no quota now (etag {etag!r} is stale): read it again",
            )
        if etag != quota_etag(current):
            raise FailedPrecondition(
                "ETAG_MISMATCH",
                f"quota:{tenant}",
                f"the quota of {tenant!r} changed since it was read (etag {etag!r}, now "
                f"{quota_etag(current)!r}): read it again and reapply your change",
            )

    async def update_quota(
        self, tenant: str, build: Callable[[Quota | None], Quota], etag: str = ""
    ) -> Quota:
        """Writes `build(current quota or None)` if `etag` still matches.

        `build` merges and validates (raising InvalidArgument); it runs with the write,
        so a partial update never merges into a quota that changed meanwhile."""
        self.check_etag(tenant, etag)
        return await self.set_quota(build(self.state.quotas.get(tenant)))

    async def set_quota(self, quota: Quota) -> Quota:
        quota.update_time = self.clock.now()
        with self.committer.transaction() as txn:
            self.state.quotas[quota.tenant] = quota
            self.transitions.quota(txn, quota)
            self.quotas_version += 1
        log.info("quota of tenant %s set", quota.tenant)
        self.scheduling.changed()
        await self.committer.wait(txn)
        return quota

    async def delete_quota(self, tenant: str, etag: str = "") -> None:
        quota = self.get_quota(tenant)
        self.check_etag(tenant, etag)
        with self.committer.transaction() as txn:
            del self.state.quotas[tenant]
            self.transitions.quota(txn, quota, deleted=True)
            self.quotas_version += 1
        log.info("quota of tenant %s deleted", tenant)
        self.scheduling.changed()
        await self.committer.wait(txn)

    async def usage(self, tenant: str) -> tuple[fairshare.TenantUsage, int]:
        """Usage of `tenant`'s subtree and the (durable) revision it was read at.

        One ledger, built in a worker thread from the snapshot copies, serves every
        GetUsage at the same revision: a long queue never stalls the event loop here.
        With fair-share decay on, recent usage moves with time alone: the ledger is also
        rebuilt once it is `USAGE_FRESH_SECONDS` old."""
        revision = self.committer.revision
        decaying = self.config.fair_share_half_life_seconds > 0
        key = (revision, int(self.clock.now() // USAGE_FRESH_SECONDS) if decaying else 0)
        cached = self._usage_ledger
        if cached is None or cached[0] != key:
            snap = self.scheduling.snapshot()
            built = asyncio.ensure_future(asyncio.to_thread(fairshare.Ledger, snap))
            cached = self._usage_ledger = (key, built)
        ledger = await asyncio.shield(cached[1])
        usage = fairshare.usage_from(ledger, tenant)
        await self.wait_committed(revision)
        return usage, revision
