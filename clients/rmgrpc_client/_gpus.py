"""The node agent's GPUs: real ones through NVML (pynvml) when it works, else simulated.

pynvml is imported only when asked for, so the client library never needs it. NVML calls
block; the agent runs `statuses()` in a worker thread.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Protocol

from google.protobuf import timestamp_pb2

from rmgrpc.v1 import gpu_manager_pb2

HEALTHY = gpu_manager_pb2.GPU_HEALTH_HEALTHY
UNHEALTHY = gpu_manager_pb2.GPU_HEALTH_UNHEALTHY


class GpuSource(Protocol):
    """Where the agent's GPU inventory and live status come from."""

    def inventory(self) -> list[gpu_manager_pb2.Gpu]:
        """The node's GPUs as RegisterNode wants them (index, uuid, model, memory, health)."""
        ...

    def statuses(self) -> list[gpu_manager_pb2.GpuStatus]:
        """Health and metrics for a heartbeat; empty when there is nothing live to report."""
        ...


class SimulatedGpus:
    """`count` identical healthy GPUs with no metrics."""

    def __init__(self, node_id: str, count: int, model: str, memory_bytes: int) -> None:
        self._gpus = [
            gpu_manager_pb2.Gpu(
                index=i,
                uuid=f"GPU-sim-{node_id}-{i}",
                model=model,
                memory_bytes=memory_bytes,
                health=HEALTHY,
            )
            for i in range(count)
        ]

    def inventory(self) -> list[gpu_manager_pb2.Gpu]:
        return list(self._gpus)

    def statuses(self) -> list[gpu_manager_pb2.GpuStatus]:
        return []


class NvmlGpus:
    """The GPUs NVML sees, with utilization, memory, temperature, power and ECC errors."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        self._handles = [
            nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())
        ]

    def inventory(self) -> list[gpu_manager_pb2.Gpu]:
        nvml = self._nvml
        return [
            gpu_manager_pb2.Gpu(
                index=i,
                uuid=_text(nvml.nvmlDeviceGetUUID(h)),
                model=model_name(_text(nvml.nvmlDeviceGetName(h))),
                memory_bytes=int(nvml.nvmlDeviceGetMemoryInfo(h).total),
                health=HEALTHY,
            )
            for i, h in enumerate(self._handles)
        ]

    def statuses(self) -> list[gpu_manager_pb2.GpuStatus]:
        return [self._status(i, h) for i, h in enumerate(self._handles)]

    def _status(self, index: int, handle: Any) -> gpu_manager_pb2.GpuStatus:
        nvml = self._nvml
        sample_time = timestamp_pb2.Timestamp()
        sample_time.FromNanoseconds(time.time_ns())
        try:
            metrics = gpu_manager_pb2.GpuMetrics(
                utilization_percent=float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                memory_used_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).used),
                temperature_celsius=float(
                    nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
                ),
                power_watts=self._optional(nvml.nvmlDeviceGetPowerUsage, handle) / 1000.0,
                ecc_errors=int(
                    self._optional(
                        nvml.nvmlDeviceGetTotalEccErrors,
                        handle,
                        nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                        nvml.NVML_VOLATILE_ECC,
                    )
                ),
                sample_time=sample_time,
            )
        except nvml.NVMLError:  # the device stopped answering: that is what unhealthy means
            return gpu_manager_pb2.GpuStatus(index=index, health=UNHEALTHY)
        healthy = metrics.ecc_errors == 0
        return gpu_manager_pb2.GpuStatus(
            index=index, health=HEALTHY if healthy else UNHEALTHY, metrics=metrics
        )

    def _optional(self, query: Any, *args: Any) -> float:
        """A metric some devices do not support: 0 when unsupported."""
        try:
            return float(query(*args))
        except self._nvml.NVMLError_NotSupported:
            return 0.0


def model_name(device_name: str) -> str:
    """NVML's marketing name to the model the scheduler matches on:
    ``NVIDIA H100 80GB HBM3`` → ``H100``, ``Tesla V100-SXM2-16GB`` → ``V100``."""
    words = device_name.split()
    while len(words) > 1 and words[0] in ("NVIDIA", "Tesla", "GeForce", "Quadro"):
        words = words[1:]
    return words[0].split("-")[0] if words else device_name


def open_nvml() -> tuple[NvmlGpus | None, str]:
    """NVML's GPUs, or None and why NVML cannot be used here."""
    try:
        with warnings.catch_warnings():  # pynvml 12+ warns that nvidia-ml-py replaces it
            warnings.simplefilter("ignore", FutureWarning)
            import pynvml  # only agents on GPU machines need it
    except ImportError:
        return None, "pynvml is not installed"
    try:
        pynvml.nvmlInit()
        gpus = NvmlGpus(pynvml)
    except pynvml.NVMLError as error:
        return None, str(error) or type(error).__name__
    if not gpus.inventory():
        return None, "NVML sees no GPUs"
    return gpus, ""


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
