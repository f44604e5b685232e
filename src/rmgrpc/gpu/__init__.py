"""GPU inventories: real GPUs through NVML, and a simulated inventory for GPU-less machines;
the health policy and model names shared with the agent live in `health`."""

from rmgrpc.gpu.health import HealthPolicy, model_name
from rmgrpc.gpu.nvml import HOSTNAME_LABEL, NvmlInventory
from rmgrpc.gpu.simulated import (
    SIMULATED_LABEL,
    simulated_gpu_uuid,
    simulated_metrics,
    simulated_nodes,
)

__all__ = [
    "HOSTNAME_LABEL",
    "SIMULATED_LABEL",
    "HealthPolicy",
    "NvmlInventory",
    "model_name",
    "simulated_gpu_uuid",
    "simulated_metrics",
    "simulated_nodes",
]
