"""`rmgrpcctl top`: a live full-screen view of nodes, tenants and the pending queue,
refreshed every few seconds (like `top`, k9s or `watch squeue`).

`collect` reads one snapshot from the server; `render` turns it into rich renderables
with the same columns as `nodes`, `tenants` and `queue` (it shares their `Rows`), so a
test can render one frame into a recording console without a terminal.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from rmgrpc.v1 import allocator_pb2, gpu_manager_pb2
from rmgrpc_client import _format as fmt
from rmgrpc_client._async_client import AsyncClient
from rmgrpc_client._tenants import live_allocations, tenant_statuses

_STATE_STYLE = {
    "READY": "green",
    "CORDONED": "yellow",
    "DRAINING": "yellow",
    "DRAINED": "yellow",
    "DOWN": "bold red",
}


@dataclass(frozen=True)
class Snapshot:
    """What one frame of `top` shows, read from the server at `read_at` (Unix seconds)."""

    server: str
    read_at: float
    nodes: Sequence[gpu_manager_pb2.Node]
    tenants: Sequence[fmt.TenantStatus]
    pending: Sequence[allocator_pb2.Allocation]
    running: int


async def collect(client: AsyncClient, server: str) -> Snapshot:
    """One snapshot: nodes, live allocations (for the queue) and per-tenant status."""
    nodes_task = asyncio.ensure_future(_nodes(client))
    allocations = await live_allocations(client)
    tenants = await tenant_statuses(client, allocations=allocations)
    pending = [a for a in allocations if a.state == allocator_pb2.ALLOCATION_STATE_PENDING]
    return Snapshot(
        server=server,
        read_at=time.time(),
        nodes=await nodes_task,
        tenants=tenants,
        pending=fmt.admission_order(pending),
        running=len(allocations) - len(pending),
    )


async def _nodes(client: AsyncClient) -> list[gpu_manager_pb2.Node]:
    return [n async for n in client.list_nodes()]


def _table(title: str, rows: fmt.Rows, limit: int, styles: dict[int, dict[str, str]]) -> Table:
    grid = Table(
        title=title,
        title_justify="left",
        title_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    for header in rows.headers:
        # Short columns keep their width; only the free-text REASON wraps when space is short.
        if header == "REASON":
            grid.add_column(header, ratio=1, min_width=len(header), overflow="fold")
        else:
            width = max([len(header), *(len(row[len(grid.columns)]) for row in rows.rows)])
            grid.add_column(header, no_wrap=True, min_width=width)
    for row in rows.rows[:limit]:
        cells = [Text(c, style=styles.get(i, {}).get(c, "")) for i, c in enumerate(row)]
        grid.add_row(*cells)
    hidden = len(rows.rows) - limit
    if not rows.rows:
        grid.caption = "none"
    elif hidden > 0:
        grid.caption = f"… {hidden} more"
    return grid


def render(snap: Snapshot, *, max_rows: int = 15) -> RenderableType:
    """One frame: a summary line, then the nodes, tenants and queue tables (each cut to
    `max_rows`, saying how many more there are)."""
    total = sum(len(n.gpus) for n in snap.nodes)
    free = sum(fmt.free_gpus(n) for n in snap.nodes)
    ready = sum(1 for n in snap.nodes if n.state == gpu_manager_pb2.NODE_STATE_READY)
    held = sum(n.allocated.gpus for n in snap.nodes)
    at = time.strftime("%H:%M:%S", time.localtime(snap.read_at))
    summary = Text.assemble(
        ("rmgrpc top", "bold"),
        f"  {snap.server}  {at}\n"
        f"nodes {ready}/{len(snap.nodes)} ready   GPUs {held} held, {free} free of {total}"
        f"   allocations {snap.running} running, {len(snap.pending)} pending",
    )
    node_rows = fmt.node_rows(snap.nodes, snap.read_at)
    state_col = node_rows.headers.index("STATE")
    return Group(
        summary,
        _table("Nodes", node_rows, max_rows, {state_col: _STATE_STYLE}),
        _table("Tenants", fmt.tenant_rows(snap.tenants, snap.read_at), max_rows, {}),
        _table("Queue (admission order)", fmt.queue_rows(snap.pending, snap.read_at), max_rows, {}),
        Text("Ctrl-C to quit", style="dim"),
    )


PIPED_WIDTH = 200


async def run(
    client: AsyncClient,
    server: str,
    *,
    interval: float,
    once: bool,
    console: Console | None = None,
    frames: int | None = None,
) -> None:
    """Show `top` on `console`: one frame and return when `once`, else refresh every
    `interval` seconds on the alternate screen until interrupted (or, for tests, after
    `frames` frames)."""
    if console is None:
        # Into a pipe or file nothing wraps for a terminal: rich's 80 columns would cut the
        # reasons short, so use $COLUMNS when set, else a wide page.
        piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
        console = Console(width=PIPED_WIDTH if piped else None)
    if once:
        console.print(render(await collect(client, server)))
        return
    snap = await collect(client, server)
    shown = 1
    with Live(render(snap), console=console, screen=True, auto_refresh=False) as live:
        while frames is None or shown < frames:
            await asyncio.sleep(interval)
            snap = await collect(client, server)
            live.update(render(snap), refresh=True)
            shown += 1
