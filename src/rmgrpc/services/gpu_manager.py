"""rmgrpc.v1.GpuManagerService: node agents register and heartbeat; operators inspect,
cordon and drain."""

from __future__ import annotations

from rmgrpc import codec
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


def node_from_request(req: gpu_manager_pb2.RegisterNodeRequest) -> Node:
    v = val.Violations()
    v.identifier("node_id", req.node_id, kind="node id")
    if "," in req.node_id:
        v.add("node_id", "must not contain ','")
    v.int_range("cpu_millis", req.cpu_millis, 0, val.MAX_CPU_MILLIS)
    v.int_range("memory_bytes", req.memory_bytes, 0, val.MAX_MEMORY_BYTES)
    v.labels("labels", req.labels)
    v.check(
        len(req.gpus) <= MAX_GPUS_PER_NODE,
        "gpus",
        f"must list at most {MAX_GPUS_PER_NODE} GPUs (got {len(req.gpus)})",
    )
    seen: set[int] = set()
    gpus = []
    for i, g in enumerate(req.gpus[:MAX_GPUS_PER_NODE]):
        field = f"gpus[{i}]"
        v.int_range(f"{field}.index", g.index, 0, MAX_GPUS_PER_NODE - 1)
        if g.index in seen:
            v.add(f"{field}.index", f"index {g.index} appears twice")
        seen.add(g.index)
        v.text(f"{field}.uuid", g.uuid, 128)
        v.text(f"{field}.model", g.model, 64)
        v.check(bool(g.model), f"{field}.model", "is required")
        v.int_range(f"{field}.memory_bytes", g.memory_bytes, 0, val.MAX_MEMORY_BYTES)
        v.enum_value(f"{field}.health", g.health, _HEALTH, allow_unspecified=True)
        gpus.append(
            Gpu(
                index=g.index,
                uuid=g.uuid or f"{req.node_id}-gpu-{g.index}",
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
        node = await self.engine.register_node(node_from_request(request))
        settings = self.engine.settings
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
        v.check(len(request.gpus) <= MAX_GPUS_PER_NODE, "gpus", "too many GPU reports")
        reports = []
        for i, g in enumerate(request.gpus[:MAX_GPUS_PER_NODE]):
            v.enum_value(f"gpus[{i}].health", g.health, _HEALTH, allow_unspecified=True)
            reports.append(
                GpuReport(
                    index=g.index,
                    health=GpuHealth(g.health) if g.health in (1, 2) else None,
                    metrics=codec.metrics_from_proto(g.metrics) if g.HasField("metrics") else None,
                )
            )
        v.raise_if_any()
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
        v.labels("label_selector", request.label_selector)
        page_size = v.page_size("page_size", request.page_size)
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
        page, token = paginate(nodes, lambda n: n.id, page_size, after, fp)
        answer = gpu_manager_pb2.ListNodesResponse(
            nodes=self._nodes(page), next_page_token=token, revision=revision
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
        page_size = v.page_size("page_size", request.page_size)
        fp = fingerprint("gpus", request.node_id, request.model, request.free_only)
        after = decode_token(request.page_token, fp, v)
        v.raise_if_any()
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
                if request.free_only and holder is not None:
                    continue
                rows.append((f"{n.id}\x00{g.index:04d}", codec.gpu_to_proto(n.id, g, holder)))
        page, token = paginate(rows, lambda r: r[0], page_size, after, fp)
        revision = self.engine.revision
        await self.engine.wait_committed(revision)
        return gpu_manager_pb2.ListGpusResponse(
            gpus=[r[1] for r in page], next_page_token=token, revision=revision
        )

    @unary
    async def CordonNode(
        self, request: gpu_manager_pb2.CordonNodeRequest, context: Ctx
    ) -> gpu_manager_pb2.CordonNodeResponse:
        v = val.Violations()
        v.identifier("node_id", request.node_id, kind="node id")
        v.text("reason", request.reason, 1024)
        v.raise_if_any()
        node = await self.engine.cordon(request.node_id, request.reason)
        return gpu_manager_pb2.CordonNodeResponse(node=await self._node(node))

    @unary
    async def UncordonNode(
        self, request: gpu_manager_pb2.UncordonNodeRequest, context: Ctx
    ) -> gpu_manager_pb2.UncordonNodeResponse:
        self._node_id(request.node_id)
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
        node, evicted = await self.engine.drain(
            request.node_id, request.reason, float(request.grace_seconds)
        )
        return gpu_manager_pb2.DrainNodeResponse(
            node=await self._node(node), allocation_ids=evicted
        )
