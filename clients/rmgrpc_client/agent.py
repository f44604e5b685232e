"""`rmgrpc-agent`: an example node agent.

It registers its node and GPUs (NVML when available, else simulated), heartbeats at the
interval the server asks for, and watches the allocations placed on its node, printing
what it would start and stop:

    start a-17 tenant=org/team gpus=0,1 (revision 42)
    stop a-17 (released) (revision 57)

Each action happens once, across disconnects, server restarts and agent restarts: the
decisions come from the pure `Reconciler`; the agent keeps the started set and the last
revision in a small JSON state file and resumes its watch at that revision + 1 (or lists
and reconciles when the server has compacted it). The one window left is a crash between
acting and saving, after which the restarted agent repeats that action: real actions
should be idempotent. If the server forgets the node (heartbeat NOT_FOUND), the agent
registers it again. SIGINT/SIGTERM stop it cleanly.

Leases: an allocation that asked for `lease_seconds` expires unless renewed. The agent
renews what runs on its node as part of its heartbeat loop, once half a lease (less two
heartbeats, as margin) has passed since the last renewal, so work placed here lives as
long as the agent does, and stops soon after the agent dies. An allocation with no lease
(the server's default) needs nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc

from rmgrpc.v1 import allocator_pb2
from rmgrpc_client._async_client import AsyncClient
from rmgrpc_client._channel import DEFAULT_TARGET
from rmgrpc_client._errors import FailedPreconditionError, NotFoundError, RmgrpcError
from rmgrpc_client._format import parse_bytes, parse_labels
from rmgrpc_client._gpus import GpuSource, SimulatedGpus, open_nvml
from rmgrpc_client._reconcile import Action, AgentState, Reconciler
from rmgrpc_client.watch import AllocationWatch, Relisted

_T = TypeVar("_T")

_FATAL = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
_DEFAULT_HEARTBEAT_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """What the agent registers about its machine (besides the GPUs)."""

    node_id: str
    cpu_millis: int
    memory_bytes: int
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class _Lease:
    """What the agent knows of one started allocation's lease, on its own clock."""

    seconds: int
    renewed_at: float


def _print_line(line: str) -> None:
    print(line, flush=True)


class Agent:
    """The agent's I/O loop: register, heartbeat, watch, act, persist. `run()` returns
    only by raising (a fatal error) or being cancelled, saving its state either way."""

    def __init__(
        self,
        client: AsyncClient,
        node: NodeSpec,
        gpus: GpuSource,
        state_file: Path,
        *,
        emit: Callable[[str], None] = _print_line,
        heartbeat_interval: float | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._node = node
        self._gpus = gpus
        self._state_file = state_file
        self._emit = emit
        self._interval_override = heartbeat_interval
        self._interval = heartbeat_interval or _DEFAULT_HEARTBEAT_SECONDS
        self._backoff = (backoff_initial, backoff_max)
        self._reconciler = Reconciler(node.node_id)
        self._saved: AgentState | None = None
        self._watch: AllocationWatch | None = None
        self._monotonic = monotonic
        # Started allocations' leases. One not known yet (just placed, or found after a
        # restart, its lease maybe long running) is renewed at the next heartbeat, which
        # also says how long its lease is (a renewal of one with no lease writes nothing).
        self._leases: dict[str, _Lease] = {}
        self._renew_failing = False
        self.heartbeats = 0  # heartbeat rounds completed (renewals included)

    @property
    def reconciler(self) -> Reconciler:
        return self._reconciler

    async def run(self) -> None:
        """Run until cancelled; raises `RmgrpcError` for errors retrying cannot fix."""
        saved = AgentState.load(self._state_file, self._node.node_id)
        self._reconciler = Reconciler(self._node.node_id, saved)
        self._saved = saved
        if saved is not None:
            self._emit(
                f"resuming from revision {saved.revision} with "
                f"{len(saved.started)} allocation(s) started"
            )
        await self._register()
        tasks = [
            asyncio.create_task(self._heartbeats(), name="heartbeats"),
            asyncio.create_task(self._watch_allocations(fresh=saved is None), name="watch"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._checkpoint()

    # -- the node ---------------------------------------------------------------------

    async def _register(self) -> None:
        inventory = self._gpus.inventory()
        response = await self._retrying(
            "register",
            lambda: self._client.register_node(
                self._node.node_id,
                cpu_millis=self._node.cpu_millis,
                memory_bytes=self._node.memory_bytes,
                labels=self._node.labels,
                gpus=inventory,
            ),
        )
        if self._interval_override is None and response.heartbeat_interval_seconds > 0:
            self._interval = float(response.heartbeat_interval_seconds)
        self._emit(
            f"registered node {self._node.node_id} with {len(inventory)} GPU(s); "
            f"heartbeat every {self._interval:g}s"
        )

    async def _heartbeats(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self._interval)
            statuses = await asyncio.to_thread(self._gpus.statuses)
            try:
                await self._client.heartbeat(self._node.node_id, statuses)
            except NotFoundError:
                self._emit("the server does not know this node; registering again")
                await self._register()
            except RmgrpcError as error:
                if error.code in _FATAL:
                    raise
                if not failing:
                    self._emit(f"heartbeat failed, will keep trying: {error}")
                failing = True
                continue
            if failing:
                self._emit("heartbeat ok again")
                failing = False
            await self._renew_leases()
            self._checkpoint()
            self.heartbeats += 1

    async def _renew_leases(self) -> None:
        """Renews each started allocation whose lease is due (see the module doc)."""
        started = self._reconciler.started
        for gone in self._leases.keys() - started:
            del self._leases[gone]
        now = self._monotonic()
        for alloc_id in sorted(started):
            lease = self._leases.get(alloc_id)
            if lease is not None and (
                lease.seconds <= 0
                or now - lease.renewed_at + 2 * self._interval < lease.seconds / 2
            ):
                continue
            try:
                renewed = await self._client.renew(alloc_id)
            except (FailedPreconditionError, NotFoundError):
                # Ended: the watch brings the stop; nothing to keep alive.
                self._leases[alloc_id] = _Lease(0, now)
                continue
            except RmgrpcError as error:
                # Never fatal: heartbeats and the watch matter more than one lease.
                if not self._renew_failing:
                    self._emit(f"cannot renew {alloc_id}, will keep trying: {error}")
                self._renew_failing = True
                continue
            if self._renew_failing:
                self._emit("renewals ok again")
                self._renew_failing = False
            self._leases[alloc_id] = _Lease(renewed.lease_seconds, now)

    # -- the allocations --------------------------------------------------------------

    async def _watch_allocations(self, *, fresh: bool) -> None:
        if fresh:  # nothing known yet: start from a full list, then watch past it
            listed = await self._retrying("list allocations", self._list_live_here)
            self._apply(self._reconciler.on_relist(listed.allocations, listed.revision))
        initial, maximum = self._backoff
        self._watch = self._client.watch_allocations(
            start_revision=self._reconciler.revision + 1,
            node_id=self._node.node_id,
            relist=self._list_live_here,
            backoff_initial=initial,
            backoff_max=maximum,
        )
        async with self._watch as watch:
            async for item in watch:
                if isinstance(item, Relisted):
                    self._emit(f"relisted at revision {item.revision}; reconciling")
                    self._apply(self._reconciler.on_relist(item.allocations, item.revision))
                else:
                    self._apply(self._reconciler.on_event(item))

    async def _list_live_here(self) -> Relisted:
        allocations: list[allocator_pb2.Allocation] = []
        revision = 0
        token = ""
        while True:
            page = await self._client.list_allocations_page(
                node_id=self._node.node_id,
                states=[allocator_pb2.ALLOCATION_STATE_ALLOCATED],
                page_token=token,
            )
            revision = revision or page.revision  # the first page's is the oldest
            allocations += page.items
            token = page.next_page_token
            if not token:
                return Relisted(tuple(allocations), revision)

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            self._emit(action.describe())
        self._checkpoint()

    def _checkpoint(self) -> None:
        """Save the state if it changed (progress included)."""
        if self._watch is not None:
            self._reconciler.advance(self._watch.revision)
        state = self._reconciler.state()
        if state.revision and state != self._saved:
            state.save(self._state_file)
            self._saved = state

    async def _retrying(self, what: str, call: Callable[[], Awaitable[_T]]) -> _T:
        initial, maximum = self._backoff
        delay = initial
        told = False
        while True:
            try:
                return await call()
            except RmgrpcError as error:
                if error.code in _FATAL:
                    raise
                if not told:
                    self._emit(f"cannot {what} yet, will keep trying: {error}")
                    told = True
            await asyncio.sleep(delay)
            delay = min(maximum, delay * 2)


# -- command line -----------------------------------------------------------------------


def _default_state_file(node_id: str) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "rmgrpc-agent" / f"{node_id}.json"


def _machine_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rmgrpc-agent", description="Example rmgrpc node agent (prints, runs nothing)."
    )
    parser.add_argument("--server", default=os.environ.get("RMGRPC_SERVER", DEFAULT_TARGET))
    parser.add_argument(
        "--token",
        default=os.environ.get("RMGRPC_TOKEN"),
        help="bearer token of the agent's principal (env RMGRPC_TOKEN)",
    )
    parser.add_argument("--tls-ca", metavar="FILE", help="CA bundle: connect with TLS")
    parser.add_argument("--tls-cert", metavar="FILE", help="client certificate (mutual TLS)")
    parser.add_argument("--tls-key", metavar="FILE", help="client private key (mutual TLS)")
    parser.add_argument("--node-id", default=socket.gethostname())
    parser.add_argument("--cpu-millis", type=int, default=(os.cpu_count() or 1) * 1000)
    parser.add_argument("--memory", type=parse_bytes, default=_machine_memory())
    parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--simulated-gpus", type=int, default=8, help="GPUs to report when NVML is not available"
    )
    parser.add_argument("--gpu-model", default="H100", help="model of the simulated GPUs")
    parser.add_argument("--gpu-memory", type=parse_bytes, default=80 << 30)
    parser.add_argument(
        "--state-file", type=Path, help="default: $XDG_STATE_HOME/rmgrpc-agent/NODE.json"
    )
    parser.add_argument(
        "--heartbeat-interval", type=float, help="seconds; default: what the server asks for"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log reconnects")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the agent until SIGINT/SIGTERM; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        labels = parse_labels(args.label)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(_serve(args, labels))
    except (RmgrpcError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


async def _serve(args: argparse.Namespace, labels: dict[str, str]) -> None:
    node = NodeSpec(args.node_id, args.cpu_millis, args.memory, labels)
    gpus: GpuSource | None
    gpus, why_not = await asyncio.to_thread(open_nvml)
    if gpus is None:
        _print_line(
            f"NVML not available ({why_not}); simulating {args.simulated_gpus} "
            f"{args.gpu_model} GPU(s)"
        )
        gpus = SimulatedGpus(node.node_id, args.simulated_gpus, args.gpu_model, args.gpu_memory)
    state_file = args.state_file or _default_state_file(node.node_id)
    async with AsyncClient(
        args.server,
        token=args.token or None,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    ) as client:
        agent = Agent(client, node, gpus, state_file, heartbeat_interval=args.heartbeat_interval)
        running = asyncio.create_task(agent.run())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not running.done():
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
            _print_line("stopped")
        else:
            running.result()  # a fatal error: let main report it


if __name__ == "__main__":
    sys.exit(main())
