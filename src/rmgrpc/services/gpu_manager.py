"""rmgrpc.v1.GpuManagerService: node agents register and heartbeat; operators inspect,
cordon and drain."""

from __future__ import annotations

from collections.abc import Sequence

from rmgrpc import auth, authorize, codec
from rmgrpc.engine import Engine, GpuReport
from rmgrpc.model import Gpu, GpuHealth, Node, NodeState
from rmgrpc.services import validate as val
from rmgrpc.services.pagination import decode_token, fingerprint, paginate
from rmgrpc.services.status import Context as Ctx
from rmgrpc.services.status import unary
from rmgrpc.v1 import gpu_manager_pb2, gpu_manager_pb2_grpc

MAX_GPUS_PER_NODE = 64
_NODE_STATES = [s.value for s in NodeState]
_HEALTH = [h.value for h in GpuHealth]


def node_from_request(
    req: gpu_manager_pb2.RegisterNodeRequest,
    max_gpus: int = MAX_GPUS_PER_NODE,
    max_labels: int = val.MAX_LABELS,
) -> Node:
    """The validated node; InvalidArgument lists every bad field (a uuid listed twice
    included; one held by another node is the engine's check, against the state)."""
    v = val.Violations()
    v.identifier("node_id", req.node_id, kind="node id")
    if "," in req.node_id:
        v.add("node_id", "must not contain ','")
    v.int_range("cpu_millis", req.cpu_millis, 0, val.MAX_CPU_MILLIS)
    v.int_range("memory_bytes", req.memory_bytes, 0, val.MAX_MEMORY_BYTES)
    v.labels("labels", req.labels, max_labels)
    v.size("gpus", len(req.gpus), max_gpus, "GPUs")
    seen: set[int] = set()
    uuids: dict[str, int] = {}
    gpus = []
    for i, g in enumerate(req.gpus[:max_gpus]):
        field = f"gpus[{i}]"
        v.int_range(f"{field}.index", g.index, 0, max_gpus - 1)
        if g.index in seen:
            v.add(f"{field}.index", f"index {g.index} appears twice")
        seen.add(g.index)
        uuid = g.uuid or f"{req.node_id}-gpu-{g.index}"
        if uuid in uuids:
            v.add(f"{field}.uuid", f"uuid {uuid[:128]!r} is also gpus[{uuids[uuid]}]'s")
        uuids.setdefault(uuid, i)
        v.text(f"{field}.uuid", g.uuid, 128)
        v.text(f"{field}.model", g.model, 64)
        v.check(bool(g.model), f"{field}.model", "is required")
        v.int_range(f"{field}.memory_bytes", g.memory_bytes, 0, val.MAX_MEMORY_BYTES)
        v.enum_value(f"{field}.health", g.health, _HEALTH, allow_unspecified=True)
        gpus.append(
            Gpu(
                index=g.index,
                uuid=uuid,
                model=g.model,
                memory_bytes=g.memory_bytes,
                health=GpuHealth(g.health) if g.health in _HEALTH else GpuHealth.HEALTHY,
            )
        )
    v.raise_if_any()
    gpus.sort(key=lambda g: g.index)
    return Node(
        id=req.node_id,
        cpu_millis=req.cpu_millis,
        memory_bytes=req.memory_bytes,
        labels=dict(req.labels),
        gpus=gpus,
    )


def _metrics(v: val.Violations, field: str, m: gpu_manager_pb2.GpuMetrics) -> None:
    """Metrics are measurements: finite and never negative (NaN would poison every sum
    and comparison made with them)."""
    v.finite(f"{field}.utilization_percent", m.utilization_percent, 0.0, 100.0)
    v.int_range(f"{field}.memory_used_bytes", m.memory_used_bytes, 0, val.MAX_MEMORY_BYTES)
    v.finite(f"{field}.temperature_celsius", m.temperature_celsius, 0.0, 1000.0)
    v.finite(f"{field}.power_watts", m.power_watts, 0.0, 1_000_000.0)
    v.int_range(f"{field}.ecc_errors", m.ecc_errors, 0, 2**62)
    v.int_range(f"{field}.xid_errors", m.xid_errors, 0, 2**62)
    v.size(f"{field}.recent_xids", len(m.recent_xids), 64, "XID codes")


class GpuManagerService(gpu_manager_pb2_grpc.GpuManagerServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _nodes(self, nodes: list[Node]) -> list[gpu_manager_pb2.Node]:
        """Nodes with their status (metrics, heartbeat) and what is held on each, read
        from the read model's per-node indexes: a node costs its own size."""
        state = self.engine.state
        out = []
        for n in nodes:
            holders = {}
            for g in n.gpus:
                holder = state.holder_of(n.id, g.index)
                if holder is not None:
                    holders[(n.id, g.index)] = holder
            out.append(codec.node_to_proto(n, holders, state.totals_of(n.id)))
        return out

    async def _node(self, node: Node) -> gpu_manager_pb2.Node:
        """`node` as it stands, answered once the revision it names is durable."""
        answer = self._nodes([node])[0]
        await self.engine.wait_committed(answer.revision)
        return answer

    def _node_id(self, node_id: str) -> None:
        v = val.Violations()
        v.identifier("node_id", node_id, kind="node id")
        v.raise_if_any()

    @unary
    async def RegisterNode(
        self, request: gpu_manager_pb2.RegisterNodeRequest, context: Ctx
    ) -> gpu_manager_pb2.RegisterNodeResponse:
        settings = self.engine.settings
        node = node_from_request(request, settings.max_gpus_per_node, settings.max_labels)
        authorize.node(auth.current(), request.node_id)
        node = await self.engine.register_node(node)
        return gpu_manager_pb2.RegisterNodeResponse(
            node=await self._node(node),
            heartbeat_interval_seconds=settings.heartbeat_interval_seconds,
            lease_seconds=settings.node_lease_seconds,
        )

    @unary
    async def Heartbeat(
        self, request: gpu_manager_pb2.HeartbeatRequest, context: Ctx
    ) -> gpu_manager_pb2.HeartbeatResponse:
        v = val.Violations()
        v.identifier("node_id", request.node_id, kind="node id")
        most = self.engine.settings.max_gpus_per_node
        v.size("gpus", len(request.gpus), most, "GPU reports")
        reports = []
        seen: set[int] = set()
        for i, g in enumerate(request.gpus[:most]):
            if g.index in seen:
                v.add(f"gpus[{i}].index", f"GPU {g.index} is reported twice")
            seen.add(g.index)
            v.enum_value(f"gpus[{i}].health", g.health, _HEALTH, allow_unspecified=True)
            if g.HasField("metrics"):
                _metrics(v, f"gpus[{i}].metrics", g.metrics)
            reports.append(
                GpuReport(
                    index=g.index,
                    health=GpuHealth(g.health) if g.health in (1, 2) else None,
                    metrics=codec.metrics_from_proto(g.metrics) if g.HasField("metrics") else None,
                )
            )
        v.raise_if_any()
        authorize.node(auth.current(), request.node_id)
        node = await self.engine.heartbeat(request.node_id, reports)
        out = gpu_manager_pb2.HeartbeatResponse(
            state=int(node.state),  # type: ignore[arg-type]
            # Durable by definition: what the watch fan-out has published.
            revision=self.engine.committer.durable,
        )
        stamp = codec.ts(node.lease_expire_time)
        if stamp is not None:
            out.lease_expire_time.CopyFrom(stamp)
        return out

    @unary
    async def GetNode(
        self, request: gpu_manager_pb2.GetNodeRequest, context: Ctx
    ) -> gpu_manager_pb2.GetNodeResponse:
        self._node_id(request.node_id)
        authorize.node(auth.current(), request.node_id)
        # The node and what is held on it (allocations' revisions) are as of now.
        revision = self.engine.revision
        node = await self.engine.found(lambda: self.engine.get_node(request.node_id))
        answer = gpu_manager_pb2.GetNodeResponse(node=self._nodes([node])[0])
        await self.engine.wait_committed(revision)
        return answer

    @unary
    async def ListNodes(
        self, request: gpu_manager_pb2.ListNodesRequest, context: Ctx
    ) -> gpu_manager_pb2.ListNodesResponse:
        v = val.Violations()
        v.enum_values("states", request.states, _NODE_STATES, allow_unspecified=False)
        settings = self.engine.settings
        v.labels("label_selector", request.label_selector, settings.max_labels)
        page_size = v.page_size("page_size", request.page_size, settings.max_page_size)
        raw_states = sorted(set(request.states))
        selector = sorted(request.label_selector.items())
        fp = fingerprint("nodes", raw_states, selector)
        after = decode_token(request.page_token, fp, v)
        v.raise_if_any()
        states = {NodeState(s) for s in raw_states}
        revision = self.engine.revision
        nodes = sorted(
            (
                n
                for n in self.engine.state.nodes.values()
                if (not states or n.state in states)
                and all(n.labels.get(k) == val_ for k, val_ in selector)
            ),
            key=lambda n: n.id,
        )
        page, token = paginate(
            nodes,
            lambda n: n.id,
            page_size,
            after,
            fp,
            lambda n: self._nodes([n])[0],
            settings.max_page_bytes,
        )
        answer = gpu_manager_pb2.ListNodesResponse(
            nodes=page, next_page_token=token, revision=revision
        )
        await self.engine.wait_committed(revision)
        return answer

    @unary
    async def ListGpus(
        self, request: gpu_manager_pb2.ListGpusRequest, context: Ctx
    ) -> gpu_manager_pb2.ListGpusResponse:
        v = val.Violations()
        v.identifier("node_id", request.node_id, required=False, kind="node id")
        v.text("model", request.model, 64)
        settings = self.engine.settings
        page_size = v.page_size("page_size", request.page_size, settings.max_page_size)
        fp = fingerprint("gpus", request.node_id, request.model, request.free_only)
        after = decode_token(request.page_token, fp, v)
        v.raise_if_any()
        authorize.node(auth.current(), request.node_id)
        state = self.engine.state
        if request.node_id:
            nodes = [await self.engine.found(lambda: self.engine.get_node(request.node_id))]
        else:
            nodes = sorted(state.nodes.values(), key=lambda n: n.id)
        rows = []
        for n in nodes:
            for g in n.gpus:
                if request.model and g.model != request.model:
                    continue
                holder = state.holder_of(n.id, g.index)
                # Free means it could take new work now: a GPU of a cordoned, draining,
                # drained or down node, or an unhealthy one, is idle but not free.
                if request.free_only and (
                    holder is not None or not n.schedulable or g.health != GpuHealth.HEALTHY
                ):
                    continue
                rows.append((f"{n.id}\x00{g.index:04d}", codec.gpu_to_proto(n.id, g, holder)))
        page, token = paginate(
            rows, lambda r: r[0], page_size, after, fp, lambda r: r[1], settings.max_page_bytes
        )
        revision = self.engine.revision
        await self.engine.wait_committed(revision)
        return gpu_manager_pb2.ListGpusResponse(gpus=page, next_page_token=token, revision=revision)

    @unary
    async def CordonNode(
        self, request: gpu_manager_pb2.CordonNodeRequest, context: Ctx
    ) -> gpu_manager_pb2.CordonNodeResponse:
        v = val.Violations()
        v.identifier("node_id", request.node_id, kind="node id")
        v.text("reason", request.reason, 1024)
        self._gpu_indices(v, request.gpu_indices)
        v.raise_if_any()
        if request.gpu_indices:
            node = await self.engine.cordon_gpus(
                request.node_id, list(request.gpu_indices), request.reason
            )
        else:
            node = await self.engine.cordon(request.node_id, request.reason)
        return gpu_manager_pb2.CordonNodeResponse(node=await self._node(node))

    def _gpu_indices(self, v: val.Violations, indices: Sequence[int]) -> None:
        most = self.engine.settings.max_gpus_per_node
        v.size("gpu_indices", len(indices), most, "GPU indices")
        for i, index in enumerate(indices[:most]):
            v.int_range(f"gpu_indices[{i}]", index, 0, most - 1)

    @unary
    async def UncordonNode(
        self, request: gpu_manager_pb2.UncordonNodeRequest, context: Ctx
    ) -> gpu_manager_pb2.UncordonNodeResponse:
        v = val.Violations()
        v.identifier("node_id", request.node_id, kind="node id")
        self._gpu_indices(v, request.gpu_indices)
        v.raise_if_any()
        if request.gpu_indices:
            node = await self.engine.uncordon_gpus(request.node_id, list(request.gpu_indices))
        else:
            node = await self.engine.uncordon(request.node_id)
        return gpu_manager_pb2.UncordonNodeResponse(node=await self._node(node))

    @unary
    async def DrainNode(
        self, request: gpu_manager_pb2.DrainNodeRequest, context: Ctx
    ) -> gpu_manager_pb2.DrainNodeResponse:
        v = val.Violations()
        v.identifier("node_id", request.node_id, kind="node id")
        v.text("reason", request.reason, 1024)
        v.int_range("grace_seconds", request.grace_seconds, 0, 86400)
        v.raise_if_any()
        node, evicted, requeued = await self.engine.drain(
            request.node_id, request.reason, float(request.grace_seconds)
        )
        return gpu_manager_pb2.DrainNodeResponse(
            node=await self._node(node),
            allocation_ids=evicted,
            requeued_allocation_ids=requeued,
        )
