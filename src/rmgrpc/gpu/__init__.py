"""GPU inventories: real GPUs through NVML, and a simulated inventory for GPU-less machines."""

from rmgrpc.gpu.nvml import HOSTNAME_LABEL, NvmlInventory, gpu_health, short_model_name
from rmgrpc.gpu.simulated import (
    SIMULATED_LABEL,
    simulated_gpu_uuid,
    simulated_metrics,
    simulated_nodes,
)

__all__ = [
    "HOSTNAME_LABEL",
    "SIMULATED_LABEL",
    "NvmlInventory",
    "gpu_health",
    "short_model_name",
    "simulated_gpu_uuid",
    "simulated_metrics",
    "simulated_nodes",
]
