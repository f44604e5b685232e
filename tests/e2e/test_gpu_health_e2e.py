"""The GPU health policy through a real server on 127.0.0.1: a heartbeat's XID quarantines
the GPU (ListGpus says why), it returns by itself after clean heartbeats for the recovery
time on a `ManualClock`, and one an operator pinned out with CordonNode stays out until
UncordonNode names it. Bad GPU indices are INVALID_ARGUMENT with field violations."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from rmgrpc.v1 import gpu_manager_pb2 as gm
from tests.e2e.helpers import field_violations
from tests.e2e.test_drain_e2e import Server

RECOVERY = 600  # the default


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    s = Server(tmp_path)
    await s.start()
    gpus = [gm.Gpu(index=i, model="H100", memory_bytes=80 << 30) for i in range(2)]
    await s.nodes.RegisterNode(
        gm.RegisterNodeRequest(node_id="n1", cpu_millis=8000, memory_bytes=1 << 36, gpus=gpus)
    )
    yield s
    await s.stop()


async def beat(s: Server, index: int, *xids: int) -> gm.HeartbeatResponse:
    status = gm.GpuStatus(
        index=index,
        health=gm.GPU_HEALTH_HEALTHY,
        metrics=gm.GpuMetrics(temperature_celsius=55, recent_xids=xids, xid_errors=len(xids)),
    )
    return await s.nodes.Heartbeat(gm.HeartbeatRequest(node_id="n1", gpus=[status]))


async def gpu(s: Server, index: int) -> gm.Gpu:
    listed = await s.nodes.ListGpus(gm.ListGpusRequest(node_id="n1"))
    return listed.gpus[index]


async def test_quarantine_auto_return_and_operator_pin(server: Server) -> None:
    s = server
    await beat(s, 0, 79)
    g = await gpu(s, 0)
    assert g.health == gm.GPU_HEALTH_UNHEALTHY
    assert g.health_reason == "XID 79 (GPU has fallen off the bus)"
    free = await s.nodes.ListGpus(gm.ListGpusRequest(free_only=True))
    assert [(f.node_id, f.index) for f in free.gpus] == [("n1", 1)]

    await beat(s, 0)
    s.clock.advance(RECOVERY - 1)
    await beat(s, 0)
    assert (await gpu(s, 0)).health == gm.GPU_HEALTH_UNHEALTHY
    s.clock.advance(1)
    await beat(s, 0)
    g = await gpu(s, 0)
    assert g.health == gm.GPU_HEALTH_HEALTHY and g.health_reason == ""

    # Pinned out: the same heartbeats never bring it back.
    pinned = await s.nodes.CordonNode(
        gm.CordonNodeRequest(node_id="n1", reason="flaky NVLink", gpu_indices=[1])
    )
    assert pinned.node.state == gm.NODE_STATE_READY  # the node itself is untouched
    assert pinned.node.gpus[1].cordoned
    for _ in range(3):
        await beat(s, 1)
        s.clock.advance(RECOVERY)
    await beat(s, 1)
    g = await gpu(s, 1)
    assert g.cordoned and g.health == gm.GPU_HEALTH_UNHEALTHY
    assert g.health_reason == "cordoned by an operator: flaky NVLink"

    back = await s.nodes.UncordonNode(gm.UncordonNodeRequest(node_id="n1", gpu_indices=[1]))
    assert not back.node.gpus[1].cordoned
    assert back.node.gpus[1].health == gm.GPU_HEALTH_HEALTHY

    for bad in ([5], [-1]):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.nodes.CordonNode(gm.CordonNodeRequest(node_id="n1", gpu_indices=bad))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "gpu_indices[0]" in field_violations(err.value)
