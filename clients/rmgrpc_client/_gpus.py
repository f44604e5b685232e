"""The node agent's GPUs: real ones through NVML (pynvml) when it works, else simulated.

pynvml is imported only when asked for, so the client library never needs it. NVML calls
block; the agent runs `statuses()` in a worker thread. GPU model names come from
`rmgrpc.gpu.health.model_name`, the server's own normaliser (this package ships in the
`rmgrpc` distribution, beside the stubs it already imports), so an agent's "RTX-4090"
is the server's "RTX-4090".
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Any, Protocol

from google.protobuf import timestamp_pb2

from rmgrpc.gpu.health import model_name
from rmgrpc.v1 import gpu_manager_pb2

__all__ = ["GpuSource", "NvmlGpus", "SimulatedGpus", "model_name", "open_nvml"]

HEALTHY = gpu_manager_pb2.GPU_HEALTH_HEALTHY
UNHEALTHY = gpu_manager_pb2.GPU_HEALTH_UNHEALTHY
# NVML's event mask for XIDs (part of its C ABI), and how many one heartbeat drains and
# carries at most, so an XID storm cannot stall the agent.
_XID_CRITICAL_EVENT = 0x8
_MAX_EVENTS_PER_SAMPLE = 256
_MAX_XIDS_PER_SAMPLE = 16


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
    """The GPUs NVML sees, with utilization, memory, temperature, power, uncorrectable ECC
    errors and the XID codes since the last heartbeat. It reports facts; the server's
    GPU health policy (`rmgrpc.gpu.health`, the module the server's own NVML path uses)
    judges them, with the thresholds and XID lists of the server's config."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        self._handles = [
            nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())
        ]
        self._xid_counts: dict[int, int] = {}
        self._events = self._register_xid_events()

    def _register_xid_events(self) -> Any:
        nvml = self._nvml
        try:
            events = nvml.nvmlEventSetCreate()
        except (nvml.NVMLError, AttributeError):
            return None  # no XIDs then: the server judges the rest
        for handle in self._handles:
            # Refused on some consumer boards and in VMs: that GPU reports no XIDs.
            with contextlib.suppress(nvml.NVMLError):
                nvml.nvmlDeviceRegisterEvents(handle, _XID_CRITICAL_EVENT, events)
        return events

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
        xids = self._drain_xids()
        return [self._status(i, h, xids.get(i, [])) for i, h in enumerate(self._handles)]

    def _drain_xids(self) -> dict[int, list[int]]:
        """XID codes queued since the last call, per GPU index (timeout 0: no waiting)."""
        out: dict[int, list[int]] = {}
        if self._events is None:
            return out
        nvml = self._nvml
        index_of = {_text(nvml.nvmlDeviceGetUUID(h)): i for i, h in enumerate(self._handles)}
        for _ in range(_MAX_EVENTS_PER_SAMPLE):
            try:
                event = nvml.nvmlEventSetWait(self._events, 0)
                index = index_of.get(_text(nvml.nvmlDeviceGetUUID(event.device)))
            except nvml.NVMLError:
                break  # NVMLError_Timeout: nothing more queued
            if index is None:
                continue
            self._xid_counts[index] = self._xid_counts.get(index, 0) + 1
            codes = out.setdefault(index, [])
            if len(codes) < _MAX_XIDS_PER_SAMPLE:
                codes.append(int(event.eventData))
        return out

    def _status(self, index: int, handle: Any, xids: list[int]) -> gpu_manager_pb2.GpuStatus:
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
                xid_errors=self._xid_counts.get(index, 0),
                recent_xids=xids,
                sample_time=sample_time,
            )
        except nvml.NVMLError:  # the device stopped answering: that is what unhealthy means
            return gpu_manager_pb2.GpuStatus(index=index, health=UNHEALTHY)
        # Healthy as far as NVML can tell; the server's policy judges the metrics.
        return gpu_manager_pb2.GpuStatus(index=index, health=HEALTHY, metrics=metrics)

    def _optional(self, query: Any, *args: Any) -> float:
        """A metric some devices do not support: 0 when unsupported."""
        try:
            return float(query(*args))
        except self._nvml.NVMLError_NotSupported:
            return 0.0


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
