"""`rmgrpcctl`: the operator's command line for rmgrpc.

    rmgrpcctl allocate org/team --count 2 --gpus 4 --gpu-model H100
    rmgrpcctl list --tenant org --state allocated
    rmgrpcctl watch --node n1            # resumes across disconnects and compaction
    rmgrpcctl watch --tenant org --budget-alerts   # allocations and budget alerts
    rmgrpcctl quota set org/team --guaranteed-gpus 8 --limit-gpus 16 --weight 2
    rmgrpcctl tenants; rmgrpcctl queue; rmgrpcctl nodes -o wide; rmgrpcctl top
    rmgrpcctl reserve org/team --gpus 8 --start +1h --end +3h; rmgrpcctl reservations
    rmgrpcctl cost --tenant org --since 7d --by day

`--server` (env RMGRPC_SERVER, default 127.0.0.1:50051) and `--token` (env RMGRPC_TOKEN)
pick the server and credentials; `-o json|yaml` prints the messages with grpcurl's field
names, `-o wide` adds columns, `--no-headers` drops table headers. These global flags go
before or after the command. A failed call prints one line, ``error: CODE: message
(field: reason)``, on stderr and exits 1; bad arguments, and a server that cannot be
reached, exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable

import grpc

from rmgrpc.v1 import allocator_pb2, gpu_manager_pb2, quota_pb2, resources_pb2
from rmgrpc_client import _completion, _tenants
from rmgrpc_client import _format as fmt
from rmgrpc_client import _reservations as resv
from rmgrpc_client._async_client import AsyncClient
from rmgrpc_client._channel import DEFAULT_TARGET, DEFAULT_TIMEOUT, tls_credentials
from rmgrpc_client._cliutil import (
    CliError,
    EnumArg,
    defaults_in_help,
    globals_anywhere,
    unreachable_hint,
)
from rmgrpc_client._errors import RmgrpcError
from rmgrpc_client._requests import quota_update_mask
from rmgrpc_client.watch import Relisted

Handler = Callable[[AsyncClient, argparse.Namespace], Awaitable[None]]


def main(argv: list[str] | None = None) -> int:
    """Run one `rmgrpcctl` command; returns the process exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error argparse already printed
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.output == "table" and args.json:  # --json: the old spelling of -o json
        args.output = "json"
    offline: Callable[[argparse.Namespace], None] | None = getattr(args, "offline", None)
    try:
        if offline is not None:  # needs no server (e.g. `completion`)
            offline(args)
        else:
            asyncio.run(_run(args))
    except RmgrpcError as error:
        hint = unreachable_hint(error, args.server)
        return _fail(str(hint or error), hint.exit_code if hint else 1)
    except CliError as error:
        return _fail(str(error), error.exit_code)
    except BrokenPipeError:  # `rmgrpcctl list | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (OSError, ValueError) as error:  # e.g. an unreadable TLS file
        return _fail(str(error))
    except KeyboardInterrupt:
        return 0 if args.command == "top" else 130  # Ctrl-C is how one leaves `top`
    return 0


def _fail(text: str, code: int = 1) -> int:
    print(f"error: {text}", file=sys.stderr)
    return code


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
    return tls_credentials(args.tls_ca, args.tls_cert, args.tls_key)


def _out(args: argparse.Namespace, human: str, as_json: str, stream: bool = False) -> None:
    """Print `human` (table, wide) or the JSON document (json, or converted to yaml);
    each document of a `stream` opens with ``---`` in yaml, so the output stays one
    valid YAML stream."""
    if args.output == "json":
        print(as_json, flush=True)
    elif args.output == "yaml":
        print(("---\n" if stream else "") + fmt.json_to_yaml(as_json), flush=True)
    elif human:
        print(human, flush=True)


def _table(args: argparse.Namespace, rows: fmt.Rows) -> str:
    return fmt.render(rows, header=not args.no_headers)


def _wide(args: argparse.Namespace) -> bool:
    return bool(args.output == "wide")


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
    if args.dry_run and args.hold:
        raise ValueError("--hold and --dry-run do not go together")
    if args.dry_run and args.no_requeue:
        raise ValueError(
            "--no-requeue and --dry-run do not go together (a dry run creates nothing)"
        )
    if args.dry_run:
        response = await client.allocate_dry_run(args.tenant, args.count, **shape)
        _out(args, fmt.dry_run_block(response), fmt.to_json(response))
        return
    if args.hold and not args.lease:
        # Held work gets a lease the CLI keeps alive: if the CLI dies, it ends soon after.
        shape["lease_seconds"] = HOLD_LEASE_SECONDS
    alloc = await client.allocate(
        args.tenant, args.count, request_id=args.request_id, no_requeue=args.no_requeue, **shape
    )
    _out(args, fmt.allocation_block(alloc), fmt.to_json(alloc))
    if args.hold:
        await _hold(client, alloc)


HOLD_LEASE_SECONDS = 60


async def _hold(client: AsyncClient, alloc: allocator_pb2.Allocation) -> None:
    """Renews `alloc` until Ctrl-C or SIGTERM, then releases it. Ends with an error if
    the allocation ends first (e.g. PREEMPTED) or cannot be renewed."""
    print(
        f"holding {alloc.id}: renewing its {alloc.lease_seconds} s lease; Ctrl-C releases it",
        file=sys.stderr,
        flush=True,
    )

    def retrying(error: RmgrpcError) -> None:
        print(f"renewal failed, retrying: {error}", file=sys.stderr, flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    with contextlib.suppress(RuntimeError, ValueError):  # not the main thread: no signals
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)
    keepalive = client.keepalive(alloc, on_error=retrying).start()
    stopping = asyncio.create_task(stop.wait())
    failed = asyncio.create_task(keepalive.wait())
    try:
        await asyncio.wait({stopping, failed}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for sig in signals:
            with contextlib.suppress(RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
        stopping.cancel()
        await keepalive.stop()
    error = failed.exception() if failed.done() else None
    if error is not None:
        raise error  # the allocation ended, or renewing it cannot work: say why
    failed.cancel()
    released = await client.release(alloc.id)
    state = allocator_pb2.AllocationState.Name(released.state).removeprefix("ALLOCATION_STATE_")
    print(f"{alloc.id} {state.lower()}", file=sys.stderr, flush=True)


async def _get(client: AsyncClient, args: argparse.Namespace) -> None:
    alloc = await client.get_allocation(args.id)
    _out(args, fmt.allocation_block(alloc), fmt.to_json(alloc))


async def _list(client: AsyncClient, args: argparse.Namespace) -> None:
    states = [allocator_pb2.AllocationState.Value(s) for s in args.state]
    live_only = not (states or args.all)
    if live_only:
        states = list(fmt.LIVE_STATES)
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
    now = time.time()
    if live_only:  # PREEMPTED ones past their grace period have ended
        items = [a for a in items if fmt.is_live(a, now)]
    if not items and args.tenant:
        await _tenants.check_tenant(client, args.tenant)
    whole = allocator_pb2.ListAllocationsResponse(allocations=items, revision=revision)
    _out(args, _table(args, fmt.allocation_rows(items, now, wide=_wide(args))), fmt.to_json(whole))


async def _queue(client: AsyncClient, args: argparse.Namespace) -> None:
    page_states = [allocator_pb2.ALLOCATION_STATE_PENDING]
    pending = [a async for a in client.list_allocations(tenant=args.tenant, states=page_states)]
    if not pending and args.tenant:
        await _tenants.check_tenant(client, args.tenant)
    ordered = fmt.admission_order(pending)
    whole = allocator_pb2.ListAllocationsResponse(allocations=ordered)
    rows = fmt.queue_rows(ordered, time.time(), wide=_wide(args))
    _out(args, _table(args, rows), fmt.to_json(whole))


async def _release(client: AsyncClient, args: argparse.Namespace) -> None:
    ids: list[str] = list(args.ids)
    if args.all:
        if ids or not args.tenant:
            raise CliError("release --all needs --tenant T and no ids", exit_code=2)
        live = await _tenants.live_allocations(client, args.tenant)
        if not live:
            await _tenants.check_tenant(client, args.tenant)
            print(f"{args.tenant} has no live allocations", file=sys.stderr)
            return
        ids = [a.id for a in live]
        if not args.yes:
            _confirm(f"release {len(ids)} allocation(s) of {args.tenant} and its subtree?")
    elif args.tenant:
        raise CliError("--tenant goes with --all (release --tenant T --all)", exit_code=2)
    elif not ids:
        raise CliError("name the allocations to release, or --tenant T --all", exit_code=2)
    if len(ids) == 1 and not args.all:  # one id: the allocation as before
        alloc = await client.release(ids[0])
        _out(args, fmt.allocation_block(alloc), fmt.to_json(alloc))
        return
    released: list[allocator_pb2.Allocation] = []
    failed = 0
    for alloc_id in ids:  # one by one: a failure is reported and the rest still go
        try:
            released.append(await client.release(alloc_id))
        except RmgrpcError as error:
            if unreachable_hint(error, args.server):
                raise
            failed += 1
            print(f"error: {alloc_id}: {error}", file=sys.stderr)
    if released:
        whole = allocator_pb2.ListAllocationsResponse(allocations=released)
        rows = fmt.allocation_rows(released, time.time(), wide=_wide(args))
        _out(args, _table(args, rows), fmt.to_json(whole))
    if failed:
        raise CliError(f"{failed} of {len(ids)} allocation(s) not released")


def _confirm(question: str) -> None:
    """Ask on the terminal; anything but yes (or no terminal to ask on) aborts."""
    if not sys.stdin.isatty():
        raise CliError(f"{question} — not asking without a terminal: add --yes", exit_code=2)
    answer = input(f"{question} [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise CliError("aborted; nothing released")


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
        budget_alerts=args.budget_alerts,
    ) as watch:
        async for item in watch:
            if isinstance(item, Relisted):
                listed = allocator_pb2.ListAllocationsResponse(
                    allocations=item.allocations, revision=item.revision
                )
                as_json = json.dumps({"relisted": fmt.to_dict(listed)})
                _out(args, fmt.relisted_lines(item.allocations, item.revision), as_json, True)
            else:
                _out(args, fmt.event_line(item), fmt.to_json(item, compact=True), True)
            seen += 1
            if args.limit and seen >= args.limit:
                return


# -- nodes and GPUs ---------------------------------------------------------------------


async def _nodes(client: AsyncClient, args: argparse.Namespace) -> None:
    states = [gpu_manager_pb2.NodeState.Value(s) for s in args.state]
    nodes = [n async for n in client.list_nodes(states=states, label_selector=dict(args.label))]
    whole = gpu_manager_pb2.ListNodesResponse(nodes=nodes)
    rows = fmt.node_rows(nodes, time.time(), wide=_wide(args))
    _out(args, _table(args, rows), fmt.to_json(whole))


async def _node(client: AsyncClient, args: argparse.Namespace) -> None:
    node = await client.get_node(args.node_id)
    _out(args, fmt.node_block(node), fmt.to_json(node))


async def _gpus(client: AsyncClient, args: argparse.Namespace) -> None:
    gpus = [
        g async for g in client.list_gpus(node_id=args.node, model=args.model, free_only=args.free)
    ]
    whole = gpu_manager_pb2.ListGpusResponse(gpus=gpus)
    _out(args, _table(args, fmt.gpu_rows(gpus, wide=_wide(args))), fmt.to_json(whole))


async def _cordon(client: AsyncClient, args: argparse.Namespace) -> None:
    node = await client.cordon(args.node_id, args.reason, args.gpu)
    _out(args, fmt.node_block(node), fmt.to_json(node))


async def _uncordon(client: AsyncClient, args: argparse.Namespace) -> None:
    node = await client.uncordon(args.node_id, args.gpu)
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
    stop = args.budget_stop_running
    # --budget-period is a length in seconds or a calendar period (day, week, month).
    seconds = args.budget_period if isinstance(args.budget_period, int) else 0
    calendar = _BUDGET_PERIODS.get(args.budget_period, 0) if seconds == 0 else 0
    if args.budget is not None or args.budget_period is not None or stop is not None:
        budget = quota_pb2.Budget(
            amount=args.budget or 0,
            period_seconds=seconds,
            stop_running=bool(stop),
            period=quota_pb2.BudgetPeriod.ValueType(calendar),
        )
    guaranteed, limit = _resources(args, "guaranteed"), _resources(args, "limit")
    policy = _preemption_policy(args)
    # Lending limit and an explicit weight (0 included) travel with the policy fields.
    lending = resources_pb2.Resources(
        gpus=args.lending_limit_gpus,
        cpu_millis=args.lending_limit_cpu_millis,
        memory_bytes=args.lending_limit_memory,
    )
    if lending.ListFields():
        policy.lending_limit.CopyFrom(lending)
    if args.weight is not None:
        policy.weight = args.weight
    # Only the flags given change (an update mask); --replace rewrites the whole quota.
    mask = None
    if not args.replace:
        mask = quota_update_mask(
            parent=args.parent, guaranteed=guaranteed, limit=limit, weight=args.weight, budget=None
        )
        if args.budget is not None:
            mask.append("budget" if args.budget_period is not None else "budget.amount")
        elif args.budget_period is not None:
            # Both: a calendar period and a length never stand together.
            mask += ["budget.period_seconds", "budget.period"]
        if stop is not None and "budget" not in mask:
            mask.append("budget.stop_running")
        mask += [f for f, flag in _POLICY_FLAGS.items() if getattr(args, flag) is not None]
        mask += [f"lending_limit.{f.name}" for f, _ in lending.ListFields()]
        if not mask:
            raise ValueError("quota set: nothing to change; give a flag, or --replace")
    quota = await client.set_quota(
        args.tenant,
        parent=args.parent or "",
        guaranteed=guaranteed,
        limit=limit,
        weight=args.weight or 0.0,
        budget=budget,
        policy=policy,
        update_mask=mask,
        etag=args.etag,
    )
    _out(args, fmt.quota_block(quota), fmt.to_json(quota))


# Quota fields set by the preemption policy flags (for the update mask).
_POLICY_FLAGS = {
    "within_tenant_preemption": "preempt_within",
    "reclaim_from_others": "reclaim",
    "preemption_while_borrowing": "preempt_while_borrowing",
    "borrowing_max_priority": "borrowing_max_priority",
}


# Flag words for the preemption policy enums (unset: the server's default).
_WITHIN = {
    "never": quota_pb2.WITHIN_TENANT_PREEMPTION_NEVER,
    "lower-priority": quota_pb2.WITHIN_TENANT_PREEMPTION_LOWER_PRIORITY,
    "lower-or-newer": quota_pb2.WITHIN_TENANT_PREEMPTION_LOWER_OR_NEWER_EQUAL_PRIORITY,
}
_RECLAIM = {
    "never": quota_pb2.RECLAIM_POLICY_NEVER,
    "lower-priority": quota_pb2.RECLAIM_POLICY_LOWER_PRIORITY,
    "any": quota_pb2.RECLAIM_POLICY_ANY,
}
_BORROWING = {
    "never": quota_pb2.BORROWING_PREEMPTION_NEVER,
    "up-to-priority": quota_pb2.BORROWING_PREEMPTION_UP_TO_PRIORITY,
    "always": quota_pb2.BORROWING_PREEMPTION_ALWAYS,
}


def _preemption_policy(args: argparse.Namespace) -> quota_pb2.Quota:
    policy = quota_pb2.Quota(borrowing_max_priority=args.borrowing_max_priority or 0)
    if args.preempt_within:
        policy.within_tenant_preemption = _WITHIN[args.preempt_within]
    if args.reclaim:
        policy.reclaim_from_others = _RECLAIM[args.reclaim]
    if args.preempt_while_borrowing:
        policy.preemption_while_borrowing = _BORROWING[args.preempt_while_borrowing]
    return policy


async def _quota_get(client: AsyncClient, args: argparse.Namespace) -> None:
    quota = await client.get_quota(args.tenant)
    _out(args, fmt.quota_block(quota), fmt.to_json(quota))


async def _quota_list(client: AsyncClient, args: argparse.Namespace) -> None:
    quotas = [q async for q in client.list_quotas(parent=args.parent)]
    whole = quota_pb2.ListQuotasResponse(quotas=quotas)
    _out(args, _table(args, fmt.quota_rows(quotas)), fmt.to_json(whole))


async def _quota_delete(client: AsyncClient, args: argparse.Namespace) -> None:
    await client.delete_quota(args.tenant)
    _out(args, f"quota of {args.tenant} deleted", "{}")


async def _usage(client: AsyncClient, args: argparse.Namespace) -> None:
    usage = await client.get_usage(args.tenant)
    if _tenants.usage_is_empty(usage):  # a typo looks exactly like an idle tenant
        await _tenants.check_tenant(client, args.tenant)
    _out(args, fmt.usage_block(usage), fmt.to_json(usage))


async def _cost(client: AsyncClient, args: argparse.Namespace) -> None:
    now = time.time()
    since = None if args.since is None else _when(args.since, now, "--since")
    until = None if args.until is None else _when(args.until, now, "--until")
    report = await client.get_cost_report(args.tenant, since=since, until=until)
    headers: list[str]
    rows: list[list[object]]
    if args.by == "model":
        headers = ["MODEL", "COST", "GPU-HOURS"]
        rows = [
            [m.model or "(no GPU)", f"{m.cost:.2f}", f"{m.gpu_hours:.2f}"] for m in report.models
        ]
    elif args.by == "day":
        headers = ["DAY", "COST", "GPU-HOURS"]
        rows = [
            [
                time.strftime("%Y-%m-%d", time.gmtime(fmt.stamp_seconds(d.day))),
                f"{d.cost:.2f}",
                f"{d.gpu_hours:.2f}",
            ]
            for d in report.days
        ]
    else:
        headers = ["TENANT", "COST", "OWN", "GPU-HOURS", "CPU-CORE-HOURS", "MEM-GIB-HOURS"]
        headers += ["BUDGET", "BUDGET-USED"]
        rows = []
        for t in report.tenants:
            budget, period = "-", t.budget_period_seconds
            if t.budget_amount:
                budget = f"{t.budget_spent:.2f}/{t.budget_amount:g}"
                if t.budget_period:
                    budget += f" per {fmt.budget_period_name(t.budget_period)}"
                else:
                    budget += f" per {fmt.human_duration(period)}" if period else " (no reset)"
            used = f"{t.budget_spent / t.budget_amount:.0%}" if t.budget_amount else "-"
            rows.append(
                [
                    t.tenant,
                    f"{t.cost:.2f}",
                    f"{t.own_cost:.2f}",
                    f"{t.gpu_hours:.2f}",
                    f"{t.cpu_core_hours:.2f}",
                    f"{t.memory_gib_hours:.2f}",
                    budget,
                    used,
                ]
            )
    text = fmt.table(headers, rows, header=not args.no_headers)
    first = time.gmtime(fmt.stamp_seconds(report.start_time))
    last = time.gmtime(fmt.stamp_seconds(report.end_time) - 86400)  # the end is exclusive
    days = time.strftime("%Y-%m-%d", first) + " to " + time.strftime("%Y-%m-%d", last)
    total = f"total: {report.total_cost:.2f} ({days}, UTC days)"
    _out(args, "\n".join(x for x in (text, total) if x), fmt.to_json(report))


def _when(text: str, now: float, flag: str) -> float:
    """`--since`/`--until`: a date or time (ISO 8601, UTC unless it says), or a span ago
    such as ``7d`` or ``12h``."""
    units = {"d": 86400, "h": 3600, "m": 60}
    if text[:-1].isdigit() and text[-1:] in units:
        return now - int(text[:-1]) * units[text[-1]]
    try:
        parsed = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise CliError(
            f"{flag}: {text!r} is not a date (2026-12-01), a time (2026-12-01T12:00) or a "
            "span ago (7d, 12h, 30m)",
            2,
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return parsed.timestamp()


async def _tenants_cmd(client: AsyncClient, args: argparse.Namespace) -> None:
    statuses = await _tenants.tenant_statuses(client, only=args.tenants)
    rows = fmt.tenant_rows(statuses, time.time(), wide=_wide(args))
    _out(args, _table(args, rows), fmt.dumps(fmt.tenants_document(statuses)))


async def _top_cmd(client: AsyncClient, args: argparse.Namespace) -> None:
    from rmgrpc_client import _top  # rich loads only for `top`: every other command starts faster

    await _top.run(client, args.server, interval=args.interval, once=args.once)


# -- reservations -----------------------------------------------------------------------


async def _reserve(client: AsyncClient, args: argparse.Namespace) -> None:
    if not args.end and not args.duration:
        raise CliError("reserve needs --end or --duration", exit_code=2)
    now = time.time()
    start = resv.parse_time(args.start, now)
    end = resv.parse_time(args.end, now) if args.end else start + args.duration
    shape = resv.shape(args.gpus, args.gpu_model, args.cpu_millis, args.memory, dict(args.selector))
    answer = await resv.create(
        client,
        args.tenant,
        args.count,
        shape,
        start,
        end,
        request_id=args.request_id or "",
        dry_run=args.dry_run,
    )
    _out(args, resv.block(answer.reservation), fmt.to_json(answer))


async def _reservations(client: AsyncClient, args: argparse.Namespace) -> None:
    states = [resv.state_value(s) for s in args.state]
    whole = await resv.list_all(client, args.tenant, states)
    _out(args, _table(args, resv.rows(whole.reservations, time.time())), fmt.to_json(whole))


async def _reservation_get(client: AsyncClient, args: argparse.Namespace) -> None:
    r = await resv.get(client, args.id)
    _out(args, resv.block(r), fmt.to_json(r))


async def _reservation_cancel(client: AsyncClient, args: argparse.Namespace) -> None:
    r = await resv.cancel(client, args.id)
    _out(args, resv.block(r), fmt.to_json(r))


def _completion_cmd(args: argparse.Namespace) -> None:
    print(_completion.script(build_parser(), args.shell), end="")


# -- arguments --------------------------------------------------------------------------


_BUDGET_PERIODS = {
    "day": quota_pb2.BUDGET_PERIOD_DAY,
    "week": quota_pb2.BUDGET_PERIOD_WEEK,
    "month": quota_pb2.BUDGET_PERIOD_MONTH,
}


def _budget_period_arg(text: str) -> int | str:
    """A budget period: day, week or month (calendar, UTC), or a length in seconds."""
    if text.lower() in _BUDGET_PERIODS:
        return text.lower()
    try:
        return _int_arg(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"not day, week, month or a number of seconds: {text!r}"
        ) from None


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


def _enum_arg(names: list[str], prefix: str) -> EnumArg:
    return EnumArg(names, prefix)


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
        prog="rmgrpcctl",
        description="Drive an rmgrpc resource manager.",
        epilog="Global flags may also come after the command. "
        "`rmgrpcctl COMMAND --help` shows a command's flags.",
    )
    parser.add_argument(
        "--server",
        default=os.environ.get("RMGRPC_SERVER", DEFAULT_TARGET),
        help="HOST:PORT of the server (env RMGRPC_SERVER)",
    )
    parser.add_argument(
        "--token", default=os.environ.get("RMGRPC_TOKEN"), help="bearer token (env RMGRPC_TOKEN)"
    )
    parser.add_argument(
        "-o",
        "--output",
        choices=("table", "wide", "json", "yaml"),
        default="table",
        help="table; wide: more columns; json/yaml: the messages with grpcurl's field names",
    )
    parser.add_argument("--json", action="store_true", help="same as -o json")
    parser.add_argument("--no-headers", action="store_true", help="print tables without headers")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="seconds per call, 0 for none",
    )
    parser.add_argument("--tls-ca", metavar="FILE", help="CA bundle: connect with TLS")
    parser.add_argument("--tls-cert", metavar="FILE", help="client certificate (mutual TLS)")
    parser.add_argument("--tls-key", metavar="FILE", help="client private key (mutual TLS)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Handler, text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        sub.set_defaults(handler=handler)
        return sub

    def shape_flags(p: argparse.ArgumentParser, count_help: str) -> None:
        """Count and shape of one replica: the same flags for allocate and reserve."""
        p.add_argument("-n", "--count", type=_int_arg, default=1, help=count_help)
        p.add_argument("--gpus", type=_int_arg, default=0, help="GPUs per replica")
        p.add_argument("--gpu-model", default="", help="e.g. H100; empty for any model")
        p.add_argument(
            "--cpu-millis", type=_int_arg, default=0, help="CPU per replica, 1000 = 1 core"
        )
        p.add_argument("--memory", type=_bytes_arg, default=0, help="per replica, e.g. 64Gi")
        p.add_argument(
            "--selector",
            action="append",
            default=[],
            type=_label_arg,
            metavar="KEY=VALUE",
            help="node label the replicas need (repeatable)",
        )

    alloc_states = list(allocator_pb2.AllocationState.keys())
    node_states = list(gpu_manager_pb2.NodeState.keys())

    p = command("allocate", _allocate, "request GPUs, CPU and memory for a tenant")
    p.add_argument("tenant", help="who asks, e.g. org/team")
    shape_flags(p, "replicas (a gang)")
    p.add_argument("--priority", type=int, default=0, help="higher runs first, may preempt lower")
    p.add_argument(
        "--lease",
        type=_int_arg,
        default=0,
        metavar="SECONDS",
        help="expire unless renewed within this; 0 takes the server's default",
    )
    p.add_argument(
        "--max-duration",
        type=_int_arg,
        default=0,
        metavar="SECONDS",
        help="hard limit on runtime; 0 for none",
    )
    p.add_argument("--reservation", default="", metavar="ID", help="run inside this reservation")
    p.add_argument(
        "--no-requeue",
        action="store_true",
        help="if a drain of its node ends it, do not queue a replacement (default: requeued)",
    )
    p.add_argument("--request-id", help="idempotency key (default: a fresh uuid)")
    p.add_argument("--dry-run", action="store_true", help="say what would happen; change nothing")
    p.add_argument(
        "--hold",
        action="store_true",
        help="keep it until Ctrl-C, renewing its lease (--lease, default "
        f"{HOLD_LEASE_SECONDS} s so it ends soon if this command dies), then release it",
    )

    p = command("get", _get, "show one allocation")
    p.add_argument("id", help="allocation id")

    alloc_state = _enum_arg(alloc_states, "ALLOCATION_STATE_")
    p = command("list", _list, "list allocations (live ones unless --all or --state)")
    p.add_argument("--tenant", default="", help="a tenant and its subtree; empty for all")
    p.add_argument("--node", default="", help="only those with a replica on this node")
    p.add_argument(
        "--state",
        action="append",
        default=[],
        type=alloc_state,
        help=f"only this state, repeatable: {', '.join(alloc_state.words)}",
    )
    p.add_argument(
        "--all", action="store_true", help="include ended allocations (released, expired, …)"
    )

    p = command("queue", _queue, "pending allocations in admission order, with why they wait")
    p.add_argument("--tenant", default="", help="a tenant and its subtree; empty for all")

    p = command(
        "release", _release, "end allocations (or cancel pending ones): IDs, or --tenant T --all"
    )
    p.add_argument("ids", nargs="*", metavar="ID", help="allocation ids")
    p.add_argument("--tenant", default="", help="with --all: whose allocations (and subtree)")
    p.add_argument("--all", action="store_true", help="every live allocation of --tenant")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")

    p = command("renew", _renew, "extend an allocation's lease")
    p.add_argument("id", help="allocation id")
    p.add_argument(
        "--lease",
        type=_int_arg,
        default=0,
        metavar="SECONDS",
        help="new lease from now; 0 keeps the allocation's own",
    )

    p = command("watch", _watch, "stream allocation events (resumes by itself)")
    p.add_argument("--tenant", default="", help="a tenant and its subtree; empty for all")
    p.add_argument("--node", default="", help="only events of allocations on this node")
    p.add_argument("--allocation", default="", metavar="ID", help="only this allocation")
    p.add_argument(
        "--from-revision",
        type=_int_arg,
        default=0,
        metavar="N",
        help="first revision to show; 0 for from now",
    )
    p.add_argument("--limit", type=_int_arg, default=0, help="stop after this many; 0: never")
    p.add_argument(
        "--budget-alerts",
        action="store_true",
        help="also the budget alerts (50/75/90/100 %%) of --tenant's subtree's budgets",
    )

    node_state = _enum_arg(node_states, "NODE_STATE_")
    p = command("nodes", _nodes, "list nodes with state, free GPUs and heartbeat age")
    p.add_argument(
        "--state",
        action="append",
        default=[],
        type=node_state,
        help=f"only this state, repeatable: {', '.join(node_state.words)}",
    )
    p.add_argument(
        "--label",
        action="append",
        default=[],
        type=_label_arg,
        metavar="KEY=VALUE",
        help="only nodes with this label (repeatable)",
    )

    p = command("node", _node, "show one node and its GPUs")
    p.add_argument("node_id", help="node id")

    p = command("gpus", _gpus, "list GPUs")
    p.add_argument("--node", default="", help="only this node's")
    p.add_argument("--model", default="", help="only this model, e.g. H100")
    p.add_argument("--free", action="store_true", help="only GPUs no allocation holds")

    def gpu_flag(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument(
            "--gpu",
            type=_int_arg,
            action="append",
            default=[],
            metavar="INDEX",
            help=f"only this GPU (repeat for several): {what}",
        )

    p = command("cordon", _cordon, "stop new work landing on a node (or on some of its GPUs)")
    p.add_argument("node_id", help="node id")
    p.add_argument("--reason", default="", help="why, shown in `nodes`")
    gpu_flag(
        p,
        "pinned out of service, the node stays schedulable; the health policy never "
        "returns it by itself",
    )

    p = command("uncordon", _uncordon, "let new work land on a node (or some of its GPUs) again")
    p.add_argument("node_id", help="node id")
    gpu_flag(p, "back to HEALTHY")

    p = command("drain", _drain, "cordon a node and ask its work to leave")
    p.add_argument("node_id", help="node id")
    p.add_argument("--reason", default="", help="why, shown in `nodes`")
    p.add_argument(
        "--grace",
        type=_int_arg,
        default=0,
        metavar="SECONDS",
        help="notice given to running work; 0 takes the server's default",
    )

    quota = commands.add_parser("quota", help="tenants' quotas", description="tenants' quotas")
    quota_commands = quota.add_subparsers(dest="quota_command", required=True, metavar="ACTION")

    def quota_command(name: str, handler: Handler, text: str) -> argparse.ArgumentParser:
        sub = quota_commands.add_parser(name, help=text, description=text)
        sub.set_defaults(handler=handler)
        return sub

    p = quota_command(
        "set",
        _quota_set,
        "create a tenant's quota or change it: only the flags given change, the rest is kept",
    )
    p.add_argument("tenant", help="tenant name, e.g. org/team")
    p.add_argument(
        "--replace",
        action="store_true",
        help="replace the whole quota: what is not given takes its default",
    )
    p.add_argument(
        "--etag",
        default="",
        help="only if the quota is still the version read with this etag (`quota get -o json`)",
    )
    p.add_argument("--parent", help="parent tenant; empty: from the name")
    for kind in ("guaranteed", "limit"):
        unset = "none" if kind == "guaranteed" else "unbounded"
        p.add_argument(f"--{kind}-gpus", type=_int_arg, help=f"{kind} GPUs; unset: {unset}")
        p.add_argument(
            f"--{kind}-cpu-millis", type=_int_arg, help=f"{kind} CPU, 1000 = 1 core; unset: {unset}"
        )
        p.add_argument(
            f"--{kind}-memory", type=_bytes_arg, help=f"{kind} memory, e.g. 512Gi; unset: {unset}"
        )
        p.add_argument(
            f"--{kind}-model-gpus",
            action="append",
            default=[],
            type=_model_count_arg,
            metavar="MODEL=N",
            help=f"{kind} GPUs of one model, e.g. H100=4 (repeatable)",
        )
    p.add_argument(
        "--weight", type=float, help="fair-share weight (default 1; 0: only leftover capacity)"
    )
    p.add_argument(
        "--lending-limit-gpus",
        type=_int_arg,
        help="of the guaranteed GPUs, how many others may borrow while idle (unset: all)",
    )
    p.add_argument("--lending-limit-cpu-millis", type=_int_arg, help="the same for CPU")
    p.add_argument("--lending-limit-memory", type=_bytes_arg, help="the same for memory")
    p.add_argument(
        "--preempt-within",
        choices=sorted(_WITHIN),
        help="which of its own allocations its requests may preempt (default lower-priority)",
    )
    p.add_argument(
        "--reclaim",
        choices=sorted(_RECLAIM),
        help="which other tenants' allocations its requests may preempt (default any)",
    )
    p.add_argument(
        "--preempt-while-borrowing",
        choices=sorted(_BORROWING),
        help="may a request that ends above the guarantee preempt others (default always)",
    )
    p.add_argument(
        "--borrowing-max-priority",
        type=int,
        metavar="P",
        help="with --preempt-while-borrowing up-to-priority: highest victim priority",
    )
    p.add_argument("--budget", type=float, help="cost units per period")
    p.add_argument(
        "--budget-period",
        type=_budget_period_arg,
        metavar="PERIOD",
        help="day, week (ISO, from Monday) or month, in UTC; or a length in seconds "
        "(0: the budget never resets)",
    )
    p.add_argument(
        "--budget-stop-running",
        action=argparse.BooleanOptionalAction,
        help="once the budget is spent, end running work too (not only refuse new work)",
    )

    p = quota_command("get", _quota_get, "show a tenant's quota")
    p.add_argument("tenant", help="tenant name, e.g. org/team")

    p = quota_command("list", _quota_list, "list quotas")
    p.add_argument("--parent", default="", help="only direct children of this tenant")

    p = quota_command("delete", _quota_delete, "return a tenant to the default quota")
    p.add_argument("tenant", help="tenant name, e.g. org/team")

    p = command("usage", _usage, "what a tenant holds, waits for, borrows and spends")
    p.add_argument("tenant", help="tenant name, e.g. org/team")

    p = command("cost", _cost, "what tenants spent, by tenant, GPU model or day")
    p.add_argument(
        "--tenant", default="", help="only this tenant and its subtree; none: all (yours)"
    )
    p.add_argument("--since", help="from this date/time (UTC) or span ago (7d); none: first day")
    p.add_argument("--until", help="up to this date/time (UTC) or span ago; none: now")
    p.add_argument(
        "--by",
        choices=("tenant", "model", "day"),
        default="tenant",
        help="one row per tenant (subtree included), GPU model or UTC day",
    )

    p = command("tenants", _tenants_cmd, "per-tenant quota, use, fair share and oldest wait")
    p.add_argument(
        "tenants", nargs="*", metavar="TENANT", help="only these and their subtrees; none: all"
    )

    p = command("top", _top_cmd, "live full-screen view of nodes, tenants and the queue")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    p.add_argument("--once", action="store_true", help="print one frame and exit")

    p = command("reserve", _reserve, "book capacity for a tenant over a future window")
    p.add_argument("tenant", help="who books, e.g. org/team")
    shape_flags(p, "replicas")
    p.add_argument(
        "--start", required=True, metavar="WHEN", help="now, +SECONDS, +2h, +1d or RFC 3339"
    )
    p.add_argument("--end", default="", metavar="WHEN", help="as --start (or give --duration)")
    p.add_argument("--duration", type=_int_arg, default=0, metavar="SECONDS", help="window length")
    p.add_argument("--request-id", help="idempotency key")
    p.add_argument("--dry-run", action="store_true", help="say whether it fits; book nothing")

    resv_state = _enum_arg(resv.STATE_NAMES, "RESERVATION_STATE_")
    p = command("reservations", _reservations, "list reservations")
    p.add_argument("--tenant", default="", help="a tenant and its subtree; empty for all")
    p.add_argument(
        "--state",
        action="append",
        default=[],
        type=resv_state,
        help=f"only this state, repeatable: {', '.join(resv_state.words)}",
    )

    reservation = commands.add_parser(
        "reservation", help="one reservation", description="one reservation"
    )
    reservation_commands = reservation.add_subparsers(
        dest="reservation_command", required=True, metavar="ACTION"
    )
    for name, handler, text in (
        ("get", _reservation_get, "show one reservation"),
        ("cancel", _reservation_cancel, "cancel a reservation (its capacity is free again)"),
    ):
        p = reservation_commands.add_parser(name, help=text, description=text)
        p.set_defaults(handler=handler)
        p.add_argument("id", help="reservation id")

    p = commands.add_parser(
        "completion",
        help="print a shell completion script",
        description="Print a completion script: "
        "`source <(rmgrpcctl completion bash)`, or for zsh put "
        "`source <(rmgrpcctl completion zsh)` in ~/.zshrc.",
    )
    p.add_argument("shell", choices=("bash", "zsh"), help="which shell")
    p.set_defaults(offline=_completion_cmd)

    globals_anywhere(parser)
    defaults_in_help(parser)
    return parser


if __name__ == "__main__":
    sys.exit(main())
