"""A simulated GPU inventory, so the server runs and schedules on a machine with no GPU.

Everything here is deterministic: the same arguments give the same nodes, GPU uuids and
metric samples, which keeps tests and demos reproducible. Simulated nodes hold no lease
(`lease_expire_time` is None), so they never go DOWN for missing heartbeats.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Mapping, Set

from rmgrpc.gpu.nvml import HOSTNAME_LABEL
from rmgrpc.model import Gpu, GpuMetrics, Node, NodeState

GIB = 1024**3
TIB = 1024**4

SIMULATED_LABEL = "rmgrpc.io/simulated"

# Fixed namespace: uuids must not change between runs, or a restarted server would see
# "new" GPUs on the same simulated node.
_UUID_NAMESPACE = uuid.UUID("6f0c5c1e-3c55-4a55-9d7e-2b1f3f6a8c11")

# Rough board power limits (watts), so simulated power draw looks like the real model's.
_TDP_WATTS: Mapping[str, float] = {
    "B200": 1000.0,
    "H200": 700.0,
    "H100": 700.0,
    "GH200": 900.0,
    "A100": 400.0,
    "L40S": 350.0,
    "L4": 72.0,
    "A10G": 300.0,
    "T4": 70.0,
    "V100": 300.0,
}
_DEFAULT_TDP_WATTS = 300.0

# Samples change every this many seconds: stable within a scrape, moving over time.
_SAMPLE_PERIOD_SECONDS = 10.0


def simulated_gpu_uuid(node_id: str, index: int) -> str:
    """A stable uuid for GPU `index` of `node_id`, spelled like NVML's ("GPU-…")."""
    return f"GPU-{uuid.uuid5(_UUID_NAMESPACE, f'{node_id}/{index}')}"


def simulated_nodes(
    count: int,
    gpus_per_node: int,
    *,
    gpu_model: str = "H100",
    gpu_memory_bytes: int = 80 * GIB,
    cpu_millis: int = 128_000,
    memory_bytes: int = 1 * TIB,
    prefix: str = "sim-node",
    labels: Mapping[str, str] | None = None,
    now: float = 0.0,
) -> list[Node]:
    """`count` READY nodes named `{prefix}-0` … `{prefix}-{count-1}`, each with `gpus_per_node`
    healthy GPUs of `gpu_model`."""
    if count < 0 or gpus_per_node < 0:
        raise ValueError(f"count and gpus_per_node must be >= 0, got {count}, {gpus_per_node}")
    nodes = []
    for n in range(count):
        node_id = f"{prefix}-{n}"
        node_labels = {HOSTNAME_LABEL: node_id, **(labels or {})}
        # Set last so a caller's labels cannot make a simulated node look real.
        node_labels[SIMULATED_LABEL] = "true"
        gpus = [
            Gpu(
                index=i,
                uuid=simulated_gpu_uuid(node_id, i),
                model=gpu_model,
                memory_bytes=gpu_memory_bytes,
            )
            for i in range(gpus_per_node)
        ]
        nodes.append(
            Node(
                id=node_id,
                cpu_millis=cpu_millis,
                memory_bytes=memory_bytes,
                labels=node_labels,
                gpus=gpus,
                state=NodeState.READY,
                simulated=True,
                last_heartbeat_time=now,
                lease_expire_time=None,
            )
        )
    return nodes


def simulated_metrics(node: Node, now: float, busy_indices: Set[int]) -> dict[int, GpuMetrics]:
    """A plausible metrics sample for each GPU of `node`, keyed by GPU index.

    GPUs in `busy_indices` (those holding allocations) look loaded; the rest look idle.
    The values depend only on the node id, GPU index, busyness and a coarse time bucket.
    """
    bucket = int(now // _SAMPLE_PERIOD_SECONDS)
    samples: dict[int, GpuMetrics] = {}
    for gpu in node.gpus:
        busy = gpu.index in busy_indices
        u1, u2, u3, u4 = _uniforms(f"{node.id}/{gpu.index}/{bucket}/{int(busy)}")
        tdp = _TDP_WATTS.get(gpu.model, _DEFAULT_TDP_WATTS)
        if busy:
            utilization = _between(u1, 60.0, 100.0)
            memory_fraction = _between(u2, 0.40, 0.95)
            power = tdp * (0.30 + 0.65 * utilization / 100.0)
            temperature = 45.0 + 35.0 * utilization / 100.0 + _between(u3, -3.0, 3.0)
        else:
            utilization = _between(u1, 0.0, 2.0)
            # The driver's own context keeps a sliver of memory in use even when idle.
            memory_fraction = _between(u2, 0.002, 0.006)
            power = tdp * _between(u3, 0.08, 0.13)
            temperature = _between(u4, 28.0, 38.0)
        samples[gpu.index] = GpuMetrics(
            utilization_percent=round(utilization, 1),
            memory_used_bytes=int(gpu.memory_bytes * memory_fraction),
            temperature_celsius=round(temperature, 1),
            power_watts=round(power, 1),
            ecc_errors=0,
            xid_errors=0,
            sample_time=now,
        )
    return samples


def _uniforms(key: str) -> tuple[float, float, float, float]:
    """Four numbers in [0, 1) that depend only on `key`, the same in every process (unlike
    hash(), which PYTHONHASHSEED randomises). One BLAKE2b digest: seeding a
    `random.Random` per GPU (SHA-512 and a Mersenne Twister state) made the simulated
    metrics of 8,000 GPUs ~0.3 s of event-loop time every refresh."""
    words = struct.unpack("<4I", hashlib.blake2b(key.encode(), digest_size=16).digest())
    return words[0] / 2**32, words[1] / 2**32, words[2] / 2**32, words[3] / 2**32


def _between(u: float, low: float, high: float) -> float:
    return low + (high - low) * u
