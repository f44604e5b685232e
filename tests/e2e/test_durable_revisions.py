"""No answer carries or names a revision that is not durable yet (SPEC, Durability).

The store's commits are held at a gate (the store's one-batch transaction step waits on it),
so the engine runs ahead of the disk: revisions exist in memory that a kill -9 would take
back. Writes and reads of every service are sent while the gate is shut and while it lets
one transaction through at a time. Each answer is checked against the store's durable
`last_revision` at the moment it arrived: no revision it carries (top-level `revision`,
or `revision` / `create_revision` inside what it returns) may be above it, and a write
that changes something must not answer before that change is durable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message

from rmgrpc.server import RunningServer
from rmgrpc.v1 import allocator_pb2 as pb
from rmgrpc.v1 import allocator_pb2_grpc, gpu_manager_pb2_grpc, quota_pb2_grpc
from rmgrpc.v1 import gpu_manager_pb2 as gm
from rmgrpc.v1 import quota_pb2 as qpb
from rmgrpc.v1.resources_pb2 import Resources, Shape

SHAPE = Shape(gpus=1, cpu_millis=100, memory_bytes=1 << 20)
REVISION_FIELDS = ("revision", "create_revision")
# Heartbeat refreshes a lease in memory and appends nothing when nothing changed, so it may
# answer while commits are held; it must still name no revision beyond the durable one.
MAY_ANSWER_WHILE_HELD = {"Heartbeat"}


class Gate:
    """Holds each store transaction until a permit (or `open`) lets it through."""

    def __init__(self) -> None:
        self.permits = 0
        self.opened = False
        self.waiting = 0
        # The highest revision of any batch that reached the gate: proof the test had
        # non-durable revisions for an answer to leak.
        self.max_held_revision = 0
        self._cond = asyncio.Condition()

    async def enter(self, events: Sequence[Any]) -> None:
        if events:
            self.max_held_revision = max(self.max_held_revision, events[-1].revision)
        async with self._cond:
            self.waiting += 1
            try:
                await self._cond.wait_for(lambda: self.opened or self.permits > 0)
            finally:
                self.waiting -= 1
            if not self.opened:
                self.permits -= 1

    async def allow_one(self) -> None:
        async with self._cond:
            self.permits += 1
            self._cond.notify_all()

    async def open(self) -> None:
        async with self._cond:
            self.opened = True
            self._cond.notify_all()


@dataclass
class Answer:
    name: str
    write: bool
    # (field path, value) of every revision the answer carries.
    revisions: list[tuple[str, int]]
    # The store's durable revision when the answer arrived.
    durable: int
    # Store transactions committed when the call was sent and when its answer arrived.
    commits_at_send: int
    commits_at_answer: int
    code: grpc.StatusCode | None = None


def revisions_in(msg: Message, path: str = "") -> list[tuple[str, int]]:
    """Every `revision`/`create_revision` field set anywhere in `msg`."""
    out: list[tuple[str, int]] = []
    for fd, value in msg.ListFields():
        where = f"{path}.{fd.name}" if path else fd.name
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            continue  # maps here are labels: strings only
        if fd.message_type is not None:
            items = value if fd.is_repeated else [value]
            for i, item in enumerate(items):
                out += revisions_in(item, f"{where}[{i}]" if fd.is_repeated else where)
        elif fd.name in REVISION_FIELDS:
            out.append((where, int(value)))
    return out


async def test_no_answer_names_a_revision_that_is_not_durable(
    server: RunningServer, channel: grpc.aio.Channel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Durability: "No answer carries or names a revision that is not durable yet", for the
    write and read RPCs of AllocatorService, QuotaService and GpuManagerService; and a write
    that changes something answers only after its change is durable."""
    alloc = allocator_pb2_grpc.AllocatorServiceStub(channel)
    quotas = quota_pb2_grpc.QuotaServiceStub(channel)
    nodes = gpu_manager_pb2_grpc.GpuManagerServiceStub(channel)
    store = server.store

    # What the held writes act on, committed normally first.
    await nodes.RegisterNode(
        gm.RegisterNodeRequest(
            node_id="n-agent",
            cpu_millis=8000,
            memory_bytes=32 << 30,
            gpus=[gm.Gpu(index=i, model="H100", memory_bytes=80 << 30) for i in range(2)],
        )
    )
    ids = [
        (await alloc.Allocate(pb.AllocateRequest(tenant=t, count=1, shape=SHAPE))).allocation.id
        for t in ("t/a", "t/a", "t/b")
    ]
    to_release, to_renew, _untouched = ids
    await quotas.SetQuota(qpb.SetQuotaRequest(quota=qpb.Quota(tenant="t/q", weight=2.0)))

    gate = Gate()
    transaction = store._transaction

    async def held_transaction(events: Sequence[Any], puts: Any, deletes: Any) -> None:
        await gate.enter(events)
        await transaction(events, puts, deletes)

    monkeypatch.setattr(store, "_transaction", held_transaction)

    answers: list[Answer] = []
    tasks: list[asyncio.Task[None]] = []

    def send(name: str, call: Callable[[], Awaitable[Message]], write: bool = False) -> None:
        async def run() -> None:
            sent = store.transactions_committed
            try:
                resp = await call()
            except grpc.aio.AioRpcError as err:
                answers.append(
                    Answer(
                        name,
                        write,
                        [],
                        store.last_revision,
                        sent,
                        store.transactions_committed,
                        err.code(),
                    )
                )
                return
            # Taken as the answer arrives: the durable revision it must not pass.
            answers.append(
                Answer(
                    name,
                    write,
                    revisions_in(resp),
                    store.last_revision,
                    sent,
                    store.transactions_committed,
                )
            )

        tasks.append(asyncio.create_task(run(), name=name))

    def send_reads() -> None:
        for aid in ids:
            send("GetAllocation", lambda a=aid: alloc.GetAllocation(pb.GetAllocationRequest(id=a)))
        send("ListAllocations", lambda: alloc.ListAllocations(pb.ListAllocationsRequest()))
        for tenant in ("t/s", "t/q"):
            send(
                f"GetQuota {tenant}",
                lambda t=tenant: quotas.GetQuota(qpb.GetQuotaRequest(tenant=t)),
            )
        send("ListQuotas", lambda: quotas.ListQuotas(qpb.ListQuotasRequest()))
        for tenant in ("t", "t/a"):
            send("GetUsage", lambda t=tenant: quotas.GetUsage(qpb.GetUsageRequest(tenant=t)))
        for node_id in ("n-agent", "sim-node-0", "n-new"):
            send("GetNode", lambda n=node_id: nodes.GetNode(gm.GetNodeRequest(node_id=n)))
        send("ListNodes", lambda: nodes.ListNodes(gm.ListNodesRequest()))
        send("ListGpus", lambda: nodes.ListGpus(gm.ListGpusRequest()))

    # Every write RPC, in waves: each wave queues behind the batch the gate holds.
    waves: list[list[tuple[str, Callable[[], Awaitable[Message]]]]] = [
        [
            (
                "Allocate",
                lambda: alloc.Allocate(pb.AllocateRequest(tenant="t/a", count=1, shape=SHAPE)),
            ),
            (
                "ReleaseAllocation",
                lambda: alloc.ReleaseAllocation(pb.ReleaseAllocationRequest(id=to_release)),
            ),
        ],
        [
            (
                "RenewAllocation",
                lambda: alloc.RenewAllocation(
                    pb.RenewAllocationRequest(id=to_renew, lease_seconds=600)
                ),
            ),
            (
                "SetQuota",
                lambda: quotas.SetQuota(
                    qpb.SetQuotaRequest(quota=qpb.Quota(tenant="t/s", limit=Resources(gpus=4)))
                ),
            ),
            ("Heartbeat", lambda: nodes.Heartbeat(gm.HeartbeatRequest(node_id="n-agent"))),
        ],
        [
            ("DeleteQuota", lambda: quotas.DeleteQuota(qpb.DeleteQuotaRequest(tenant="t/q"))),
            (
                "RegisterNode",
                lambda: nodes.RegisterNode(
                    gm.RegisterNodeRequest(node_id="n-new", cpu_millis=1000, memory_bytes=1 << 30)
                ),
            ),
        ],
        [
            (
                "CordonNode",
                lambda: nodes.CordonNode(gm.CordonNodeRequest(node_id="sim-node-0", reason="x")),
            ),
            (
                "DrainNode",
                lambda: nodes.DrainNode(gm.DrainNodeRequest(node_id="n-agent", reason="x")),
            ),
            ("Heartbeat", lambda: nodes.Heartbeat(gm.HeartbeatRequest(node_id="n-agent"))),
        ],
    ]

    async def step() -> None:
        """Lets the one batch waiting at the gate commit, and shuts the gate behind it."""
        committed = store.transactions_committed
        await gate.allow_one()
        async with asyncio.timeout(10):
            while store.transactions_committed == committed:
                await asyncio.sleep(0.005)

    durable_before = store.last_revision
    steps = 0
    try:
        for wave in waves:
            for name, call in wave:
                send(name, call, write=True)
            await asyncio.sleep(0.2)  # the writes reach the engine, their commits the gate
            send_reads()
            await asyncio.sleep(0.2)
            if steps == 0:
                assert store.last_revision == durable_before, "a commit got past the shut gate"
                assert gate.max_held_revision > durable_before, "nothing held: nothing shown"
            if gate.waiting:
                await step()
                steps += 1
        # Then one transaction at a time until every call has answered.
        async with asyncio.timeout(30):
            while gate.waiting or not all(t.done() for t in tasks):
                if gate.waiting:
                    await step()
                    steps += 1
                    if steps <= 2 * len(waves):
                        send_reads()
                await asyncio.sleep(0.1)
    finally:
        await gate.open()
    await asyncio.gather(*tasks)

    assert steps >= len(waves), steps
    answered = {a.name for a in answers}
    assert {name for wave in waves for name, _ in wave} <= answered, answered
    errors = [(a.name, a.code) for a in answers if a.code is not None]
    # Only reads of what does not exist (yet, or any more) may fail: n-new, t/s, t/q.
    assert all(
        name.split()[0] in ("GetNode", "GetQuota") and code == grpc.StatusCode.NOT_FOUND
        for name, code in errors
    ), errors
    # "Gone" is an answer too: t/q is reported NOT_FOUND only once its deletion is
    # durable, else a crash could bring back what a client was told is gone.
    events = await store.read_events(0, 100_000)
    deleted_at = [e.revision for e in events if e.kind.value == "quota" and e.object_id == "t/q"][
        -1
    ]
    early = [
        a.durable
        for a in answers
        if a.name == "GetQuota t/q"
        and a.code == grpc.StatusCode.NOT_FOUND
        and a.durable < deleted_at
    ]
    assert not early, f"t/q answered NOT_FOUND at durable {early}, deleted at {deleted_at}"
    problems = sorted(
        {
            f"{a.name} answered {path}={rev} while only {a.durable} was durable"
            for a in answers
            for path, rev in a.revisions
            if rev > a.durable
        }
    )
    # A write's change cannot be durable before a transaction committed after it was sent.
    problems += [
        f"{a.name} answered before its change could be durable"
        for a in answers
        if a.write
        and a.name not in MAY_ANSWER_WHILE_HELD
        and a.commits_at_answer <= a.commits_at_send
    ]
    assert not problems, "\n".join(problems)
