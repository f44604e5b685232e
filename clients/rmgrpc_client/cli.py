"""`rmgrpcctl`: the operator's command line for rmgrpc.

    rmgrpcctl allocate org/team --count 2 --gpus 4 --gpu-model H100
    rmgrpcctl list --tenant org --state allocated
    rmgrpcctl watch --node n1            # resumes across disconnects and compaction
    rmgrpcctl quota set org/team --guaranteed-gpus 8 --limit-gpus 16 --weight 2
    rmgrpcctl --json nodes

`--server` (env RMGRPC_SERVER, default 127.0.0.1:50051) and `--token` (env RMGRPC_TOKEN)
pick the server and credentials; `--json` prints protobuf JSON instead of tables. A
failed call prints one line, ``error: CODE: message (field: reason)``, on stderr and
exits 1; bad arguments exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from google.protobuf import json_format

from rmgrpc.v1 import allocator_pb2, gpu_manager_pb2, quota_pb2, resources_pb2
from rmgrpc_client import _format as fmt
from rmgrpc_client._async_client import AsyncClient
from rmgrpc_client._channel import DEFAULT_TARGET, DEFAULT_TIMEOUT
from rmgrpc_client._errors import RmgrpcError
from rmgrpc_client.watch import Relisted

Handler = Callable[[AsyncClient, argparse.Namespace], Awaitable[None]]


def main(argv: list[str] | None = None) -> int:
    """Run one `rmgrpcctl` command; returns the process exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error argparse already printed
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        asyncio.run(_run(args))
    except RmgrpcError as error:
        return _fail(str(error))
    except (OSError, ValueError) as error:  # e.g. an unreadable TLS file
        return _fail(str(error))
    except KeyboardInterrupt:
        return 130
    return 0


def _fail(text: str) -> int:
    print(f"error: {text}", file=sys.stderr)
    return 1


async def _run(args: argparse.Namespace) -> None:
    async with AsyncClient(
        args.server,
        token=args.token or None,
        credentials=_credentials(args),
        timeout=args.timeout or None,
    ) as client:
        handler: Handler = args.handler
        await handler(client, args)


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    if not (args.tls_ca or args.tls_cert):
        return None

    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(
        root_certificates=read(args.tls_ca),
        private_key=read(args.tls_key),
        certificate_chain=read(args.tls_cert),
    )


def _out(args: argparse.Namespace, human: str, as_json: str) -> None:
    print(as_json if args.json else human, flush=True)


# -- allocations ------------------------------------------------------------------------


async def _allocate(client: AsyncClient, args: argparse.Namespace) -> None:
    shape = {
        "gpus": args.gpus,
        "gpu_model": args.gpu_model,
        "cpu_millis": args.cpu_millis,
        "memory_bytes": args.memory,
        "node_selector": dict(args.selector),
        "priority": args.priority,
        "lease_seconds": args.lease,
        "max_duration_seconds": args.max_duration,
        "reservation_id": args.reservation,
    }
    if args.dry_run:
        response = await client.allocate_dry_run(args.tenant, args.count, **shape)
        _out(args, fmt.dry_run_block(response), fmt.to_json(response))
    else:
        alloc = await client.allocate(args.tenant, args.count, request_id=args.request_id, **shape)
        _out(args, fmt.allocation_block(alloc), fmt.to_json(alloc))


async def _get(client: AsyncClient, args: argparse.Namespace) -> None:
    alloc = await client.get_allocation(args.id)
    _out(args, fmt.allocation_block(alloc), fmt.to_json(alloc))


async def _list(client: AsyncClient, args: argparse.Namespace) -> None:
    states = [allocator_pb2.AllocationState.Value(s) for s in args.state]
    items: list[allocator_pb2.Allocation] = []
    revision = 0
    token = ""
    while True:
        page = await client.list_allocations_page(
            tenant=args.tenant, node_id=args.node, states=states, page_token=token
        )
        revision = revision or page.revision
        items += page.items
        token = page.next_page_token
        if not token:
            break
    whole = allocator_pb2.ListAllocationsResponse(allocations=items, revision=revision)
    _out(args, fmt.allocation_table(items), fmt.to_json(whole))


async def _release(client: AsyncClient, args: argparse.Namespace) -> None:
    alloc = await client.release(args.id)
    _out(args, fmt.allocation_block(alloc), fmt.to_json(alloc))


async def _renew(client: AsyncClient, args: argparse.Namespace) -> None:
    alloc = await client.renew(args.id, args.lease)
    _out(args, fmt.allocation_block(alloc), fmt.to_json(alloc))


async def _watch(client: AsyncClient, args: argparse.Namespace) -> None:
    # Reconnects and relists are worth a line on stderr while the output stays clean.
    notes = logging.StreamHandler(sys.stderr)
    notes.setFormatter(logging.Formatter("watch: %(message)s"))
    watch_log = logging.getLogger("rmgrpc_client.watch")
    watch_log.addHandler(notes)
    watch_log.setLevel(logging.INFO)
    seen = 0
    async with client.watch_allocations(
        start_revision=args.from_revision,
        tenant=args.tenant,
        node_id=args.node,
        allocation_id=args.allocation,
    ) as watch:
        async for item in watch:
            if isinstance(item, Relisted):
                listed = allocator_pb2.ListAllocationsResponse(
                    allocations=item.allocations, revision=item.revision
                )
                as_json = json.dumps({"relisted": json_format.MessageToDict(listed)})
                _out(args, fmt.relisted_lines(item.allocations, item.revision), as_json)
            else:
                _out(args, fmt.event_line(item), fmt.to_json(item, compact=True))
            seen += 1
            if args.limit and seen >= args.limit:
                return


# -- nodes and GPUs ---------------------------------------------------------------------


async def _nodes(client: AsyncClient, args: argparse.Namespace) -> None:
    states = [gpu_manager_pb2.NodeState.Value(s) for s in args.state]
    nodes = [n async for n in client.list_nodes(states=states, label_selector=dict(args.label))]
    whole = gpu_manager_pb2.ListNodesResponse(nodes=nodes)
    _out(args, fmt.node_table(nodes), fmt.to_json(whole))


async def _node(client: AsyncClient, args: argparse.Namespace) -> None:
    node = await client.get_node(args.node_id)
    _out(args, fmt.node_block(node), fmt.to_json(node))


async def _gpus(client: AsyncClient, args: argparse.Namespace) -> None:
    gpus = [
        g async for g in client.list_gpus(node_id=args.node, model=args.model, free_only=args.free)
    ]
    whole = gpu_manager_pb2.ListGpusResponse(gpus=gpus)
    _out(args, fmt.gpu_table(gpus), fmt.to_json(whole))


async def _cordon(client: AsyncClient, args: argparse.Namespace) -> None:
    node = await client.cordon(args.node_id, args.reason)
    _out(args, fmt.node_block(node), fmt.to_json(node))


async def _uncordon(client: AsyncClient, args: argparse.Namespace) -> None:
    node = await client.uncordon(args.node_id)
    _out(args, fmt.node_block(node), fmt.to_json(node))


async def _drain(client: AsyncClient, args: argparse.Namespace) -> None:
    response = await client.drain(args.node_id, args.reason, args.grace)
    _out(args, fmt.drain_block(response), fmt.to_json(response))


# -- quotas and usage -------------------------------------------------------------------


def _resources(args: argparse.Namespace, kind: str) -> resources_pb2.Resources | None:
    gpus = getattr(args, f"{kind}_gpus")
    cpu = getattr(args, f"{kind}_cpu_millis")
    memory = getattr(args, f"{kind}_memory")
    by_model: dict[str, int] = dict(getattr(args, f"{kind}_model_gpus"))
    if gpus is None and cpu is None and memory is None and not by_model:
        return None
    return resources_pb2.Resources(
        gpus=gpus,
        cpu_millis=cpu,
        memory_bytes=memory,
        gpus_by_model=by_model,
    )


async def _quota_set(client: AsyncClient, args: argparse.Namespace) -> None:
    budget = None
    if args.budget is not None:
        budget = quota_pb2.Budget(amount=args.budget, period_seconds=args.budget_period)
    quota = await client.set_quota(
        args.tenant,
        parent=args.parent,
        guaranteed=_resources(args, "guaranteed"),
        limit=_resources(args, "limit"),
        weight=args.weight,
        budget=budget,
    )
    _out(args, fmt.quota_block(quota), fmt.to_json(quota))


async def _quota_get(client: AsyncClient, args: argparse.Namespace) -> None:
    quota = await client.get_quota(args.tenant)
    _out(args, fmt.quota_block(quota), fmt.to_json(quota))


async def _quota_list(client: AsyncClient, args: argparse.Namespace) -> None:
    quotas = [q async for q in client.list_quotas(parent=args.parent)]
    whole = quota_pb2.ListQuotasResponse(quotas=quotas)
    _out(args, fmt.quota_table(quotas), fmt.to_json(whole))


async def _quota_delete(client: AsyncClient, args: argparse.Namespace) -> None:
    await client.delete_quota(args.tenant)
    _out(args, f"quota of {args.tenant} deleted", "{}")


async def _usage(client: AsyncClient, args: argparse.Namespace) -> None:
    usage = await client.get_usage(args.tenant)
    _out(args, fmt.usage_block(usage), fmt.to_json(usage))


# -- arguments --------------------------------------------------------------------------


def _int_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def _bytes_arg(text: str) -> int:
    try:
        return fmt.parse_bytes(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size like 64Gi: {text!r}") from None


def _enum_arg(names: list[str], prefix: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        try:
            return fmt.enum_value(names, prefix, text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _label_arg(text: str) -> tuple[str, str]:
    try:
        ((key, value),) = fmt.parse_labels([text]).items()
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return key, value


def _model_count_arg(text: str) -> tuple[str, int]:
    model, count = _label_arg(text)
    return model, _int_arg(count)


def build_parser() -> argparse.ArgumentParser:
    """The whole `rmgrpcctl` command line."""
    parser = argparse.ArgumentParser(
        prog="rmgrpcctl", description="Drive an rmgrpc resource manager."
    )
    parser.add_argument(
        "--server",
        default=os.environ.get("RMGRPC_SERVER", DEFAULT_TARGET),
        help="HOST:PORT of the server (env RMGRPC_SERVER; default %(default)s)",
    )
    parser.add_argument(
        "--token", default=os.environ.get("RMGRPC_TOKEN"), help="bearer token (env RMGRPC_TOKEN)"
    )
    parser.add_argument("--json", action="store_true", help="print protobuf JSON")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="seconds per call, 0 for none (default %(default)s)",
    )
    parser.add_argument("--tls-ca", metavar="FILE", help="CA bundle: connect with TLS")
    parser.add_argument("--tls-cert", metavar="FILE", help="client certificate (mutual TLS)")
    parser.add_argument("--tls-key", metavar="FILE", help="client private key (mutual TLS)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Handler, text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        sub.set_defaults(handler=handler)
        return sub

    alloc_states = list(allocator_pb2.AllocationState.keys())
    node_states = list(gpu_manager_pb2.NodeState.keys())

    p = command("allocate", _allocate, "request GPUs, CPU and memory for a tenant")
    p.add_argument("tenant")
    p.add_argument("-n", "--count", type=_int_arg, default=1, help="replicas (a gang)")
    p.add_argument("--gpus", type=_int_arg, default=0, help="GPUs per replica")
    p.add_argument("--gpu-model", default="", help="e.g. H100; default any")
    p.add_argument("--cpu-millis", type=_int_arg, default=0, help="CPU per replica, 1000 = 1 core")
    p.add_argument("--memory", type=_bytes_arg, default=0, help="per replica, e.g. 64Gi")
    p.add_argument("--selector", action="append", default=[], type=_label_arg, metavar="KEY=VALUE")
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--lease", type=_int_arg, default=0, metavar="SECONDS")
    p.add_argument("--max-duration", type=_int_arg, default=0, metavar="SECONDS")
    p.add_argument("--reservation", default="", metavar="ID")
    p.add_argument("--request-id", help="idempotency key (default: a fresh uuid)")
    p.add_argument("--dry-run", action="store_true", help="say what would happen; change nothing")

    p = command("get", _get, "show one allocation")
    p.add_argument("id")

    p = command("list", _list, "list allocations")
    p.add_argument("--tenant", default="", help="a tenant and its subtree")
    p.add_argument("--node", default="")
    p.add_argument(
        "--state",
        action="append",
        default=[],
        type=_enum_arg(alloc_states, "ALLOCATION_STATE_"),
        help="e.g. allocated, pending (repeatable)",
    )

    p = command("release", _release, "end an allocation (or cancel a pending one)")
    p.add_argument("id")

    p = command("renew", _renew, "extend an allocation's lease")
    p.add_argument("id")
    p.add_argument("--lease", type=_int_arg, default=0, metavar="SECONDS")

    p = command("watch", _watch, "stream allocation events (resumes by itself)")
    p.add_argument("--tenant", default="")
    p.add_argument("--node", default="")
    p.add_argument("--allocation", default="", metavar="ID")
    p.add_argument(
        "--from-revision", type=_int_arg, default=0, metavar="N", help="default: from now"
    )
    p.add_argument("--limit", type=_int_arg, default=0, help="stop after this many items")

    p = command("nodes", _nodes, "list nodes")
    p.add_argument(
        "--state", action="append", default=[], type=_enum_arg(node_states, "NODE_STATE_")
    )
    p.add_argument("--label", action="append", default=[], type=_label_arg, metavar="KEY=VALUE")

    p = command("node", _node, "show one node and its GPUs")
    p.add_argument("node_id")

    p = command("gpus", _gpus, "list GPUs")
    p.add_argument("--node", default="")
    p.add_argument("--model", default="")
    p.add_argument("--free", action="store_true", help="only GPUs no allocation holds")

    p = command("cordon", _cordon, "stop new work landing on a node")
    p.add_argument("node_id")
    p.add_argument("--reason", default="")

    p = command("uncordon", _uncordon, "let new work land on a node again")
    p.add_argument("node_id")

    p = command("drain", _drain, "cordon a node and ask its work to leave")
    p.add_argument("node_id")
    p.add_argument("--reason", default="")
    p.add_argument("--grace", type=_int_arg, default=0, metavar="SECONDS")

    quota = commands.add_parser("quota", help="tenants' quotas", description="tenants' quotas")
    quota_commands = quota.add_subparsers(dest="quota_command", required=True, metavar="ACTION")

    def quota_command(name: str, handler: Handler, text: str) -> argparse.ArgumentParser:
        sub = quota_commands.add_parser(name, help=text, description=text)
        sub.set_defaults(handler=handler)
        return sub

    p = quota_command("set", _quota_set, "create or replace a tenant's quota")
    p.add_argument("tenant")
    p.add_argument("--parent", default="")
    for kind in ("guaranteed", "limit"):
        p.add_argument(f"--{kind}-gpus", type=_int_arg)
        p.add_argument(f"--{kind}-cpu-millis", type=_int_arg)
        p.add_argument(f"--{kind}-memory", type=_bytes_arg, help="e.g. 512Gi")
        p.add_argument(
            f"--{kind}-model-gpus",
            action="append",
            default=[],
            type=_model_count_arg,
            metavar="MODEL=N",
        )
    p.add_argument("--weight", type=float, default=0.0, help="fair-share weight (default 1)")
    p.add_argument("--budget", type=float, help="cost units per period")
    p.add_argument("--budget-period", type=_int_arg, default=0, metavar="SECONDS")

    p = quota_command("get", _quota_get, "show a tenant's quota")
    p.add_argument("tenant")

    p = quota_command("list", _quota_list, "list quotas")
    p.add_argument("--parent", default="", help="only direct children of this tenant")

    p = quota_command("delete", _quota_delete, "return a tenant to the default quota")
    p.add_argument("tenant")

    p = command("usage", _usage, "what a tenant holds, waits for, borrows and spends")
    p.add_argument("tenant")

    return parser


if __name__ == "__main__":
    sys.exit(main())
