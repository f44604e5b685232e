"""Quota commands: SetQuota, DeleteQuota, and usage as the scheduler counts it."""

from __future__ import annotations

import asyncio
import logging

from rmgrpc.engine.core import EngineCore
from rmgrpc.errors import NotFound
from rmgrpc.model import Quota
from rmgrpc.scheduler import fairshare

log = logging.getLogger("rmgrpc.engine")


class QuotaCommands(EngineCore):
    _usage_ledger: tuple[int, asyncio.Future[fairshare.Ledger]] | None = None

    def get_quota(self, tenant: str) -> Quota:
        quota = self.state.quotas.get(tenant)
        if quota is None:
            raise NotFound("quota", tenant, f"tenant {tenant!r} has no quota of its own")
        return quota

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

    async def delete_quota(self, tenant: str) -> None:
        quota = self.get_quota(tenant)
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
        GetUsage at the same revision: a long queue never stalls the event loop here."""
        revision = self.committer.revision
        cached = self._usage_ledger
        if cached is None or cached[0] != revision:
            snap = self.scheduling.snapshot()
            built = asyncio.ensure_future(asyncio.to_thread(fairshare.Ledger, snap))
            cached = self._usage_ledger = (revision, built)
        ledger = await asyncio.shield(cached[1])
        usage = fairshare.usage_from(ledger, tenant)
        await self.wait_committed(revision)
        return usage, revision
