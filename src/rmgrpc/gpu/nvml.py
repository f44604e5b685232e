"""Local GPU discovery and metrics through NVML (`pynvml`).

NVML is a blocking C library, so one `NvmlInventory` owns every NVML call: its sync
methods serialise on a lock, and its async methods hand the same work to one dedicated
worker thread so the event loop never blocks on the driver. `pynvml` is imported only in
`probe()`, so a machine without it (or without a GPU driver) still runs: probe logs one
line and returns None.

What it reports are facts (metrics, the XID codes since the last sample, a lost device);
the verdict is the shared health policy's (`rmgrpc.gpu.health`), which the engine applies
to every report. Only `discover` judges, with the server's policy, for the first sample.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from rmgrpc.gpu.health import HealthPolicy, Sample, model_name, xid_text
from rmgrpc.model import Gpu, GpuHealth, GpuMetrics, Node, NodeState

log = logging.getLogger(__name__)

_T = TypeVar("_T")

HOSTNAME_LABEL = "rmgrpc.io/hostname"

# NVML enum values. They are part of NVML's C ABI and never change, so spelling them here
# spares every caller (and test double) from exporting pynvml's constant names.
_NVML_TEMPERATURE_GPU = 0
_NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
_NVML_VOLATILE_ECC = 0
_XID_CRITICAL_EVENT = 0x8

# How many XID events one sample drains at most, so a storm cannot stall sampling.
_MAX_EVENTS_PER_SAMPLE = 256
# How many XID codes one sample carries to the server (the count covers them all).
_MAX_XIDS_PER_SAMPLE = 16


def _text(value: object) -> str:
    # Older pynvml releases return bytes for strings; newer ones return str.
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


class NvmlInventory:
    """The local machine's GPUs as NVML sees them. Create with `probe()`."""

    def __init__(self, nvml: Any, policy: HealthPolicy | None = None) -> None:
        self._nvml = nvml
        self._policy = policy or HealthPolicy()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvml")
        self._closed = False
        self._handles: dict[int, Any] = {}
        self._uuids: dict[int, str] = {}
        self._names: dict[int, str] = {}
        self._memory_total: dict[int, int] = {}
        # XIDs seen since start per GPU index (the `xid_errors` counter), and the codes
        # not yet handed out with a sample.
        self._xid_counts: dict[int, int] = {}
        self._recent_xids: dict[int, list[int]] = {}
        self._lost: set[int] = set()
        self._event_set: Any = None
        # (index, metric) pairs whose failure was already logged, to log each once.
        self._warned: set[tuple[int, str]] = set()

    # --- life cycle -----------------------------------------------------------------

    @classmethod
    def probe(cls, policy: HealthPolicy | None = None) -> NvmlInventory | None:
        """Start NVML and list the local GPUs; None (after one log line) if that fails."""
        try:
            with warnings.catch_warnings():
                # The pynvml shim warns on import that it is deprecated; that is noise here.
                warnings.simplefilter("ignore", FutureWarning)
                import pynvml
        except ImportError:
            log.info("NVML not available (pynvml not installed): no local GPUs discovered")
            return None
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # NVMLError, or OSError from ctypes on odd systems
            log.info("NVML not available (%s): no local GPUs discovered", exc)
            return None
        inventory = cls(pynvml, policy)
        try:
            inventory._open()
        except Exception as exc:
            inventory.close()
            log.info("NVML not available (%s): no local GPUs discovered", exc)
            return None
        if not inventory._handles:
            inventory.close()
            log.info("NVML found no GPUs: no local GPUs discovered")
            return None
        return inventory

    @classmethod
    async def probe_async(cls, policy: HealthPolicy | None = None) -> NvmlInventory | None:
        return await asyncio.to_thread(cls.probe, policy)

    def _open(self) -> None:
        nvml = self._nvml
        for index in range(int(nvml.nvmlDeviceGetCount())):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                gpu_uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            except nvml.NVMLError as exc:
                # Without a handle and uuid the GPU cannot be named or used; leave it out.
                log.warning("NVML: skipping GPU %d (%s)", index, exc)
                continue
            self._handles[index] = handle
            self._uuids[index] = gpu_uuid
            self._names[index] = _text(self._read(index, "name", nvml.nvmlDeviceGetName, "unknown"))
            memory = self._read(index, "memory", nvml.nvmlDeviceGetMemoryInfo, None)
            self._memory_total[index] = int(memory.total) if memory is not None else 0
        self._register_xid_events()

    def _register_xid_events(self) -> None:
        nvml = self._nvml
        try:
            self._event_set = nvml.nvmlEventSetCreate()
        except (nvml.NVMLError, AttributeError) as exc:
            log.info("NVML: XID events unavailable (%s); GPU health goes without them", exc)
            return
        for index, handle in self._handles.items():
            try:
                nvml.nvmlDeviceRegisterEvents(handle, _XID_CRITICAL_EVENT, self._event_set)
            except nvml.NVMLError as exc:
                # Common on consumer boards and in some VMs: that GPU just reports no XIDs.
                log.debug("NVML: GPU %d has no XID events (%s)", index, exc)

    def close(self) -> None:
        """Stop NVML. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            nvml = self._nvml
            if self._event_set is not None:
                try:
                    nvml.nvmlEventSetFree(self._event_set)
                except Exception as exc:
                    log.debug("NVML: freeing the event set failed (%s)", exc)
            try:
                nvml.nvmlShutdown()
            except Exception as exc:
                log.debug("NVML: shutdown failed (%s)", exc)
        # Not waiting: close() may itself be running on that worker (close_async).
        self._executor.shutdown(wait=False)

    async def close_async(self) -> None:
        if not self._closed:
            await self._run(self.close)

    # --- queries --------------------------------------------------------------------

    @property
    def gpu_indices(self) -> list[int]:
        return sorted(self._handles)

    def full_name(self, index: int) -> str:
        """NVML's whole product name, e.g. "NVIDIA H100 80GB HBM3"."""
        return self._names[index]

    def discover(self, node_id: str, *, now: float | None = None) -> Node:
        """The local node: host CPU and memory, and each GPU with its first sample,
        judged by the policy (a GPU that starts out bad starts quarantined)."""
        metrics = self.sample(now=now)
        gpus = []
        for index in self.gpu_indices:
            m = metrics[index]
            verdict = self._policy.judge(
                Sample(
                    temperature_celsius=m.temperature_celsius,
                    uncorrectable_ecc=m.ecc_errors,
                    xids=m.recent_xids,
                    failed=index in self._lost,
                )
            )
            gpus.append(
                Gpu(
                    index=index,
                    uuid=self._uuids[index],
                    model=model_name(self._names[index]),
                    memory_bytes=self._memory_total[index],
                    health=GpuHealth.HEALTHY if verdict.healthy else GpuHealth.UNHEALTHY,
                    metrics=m,
                    health_reason=verdict.reason,
                )
            )
        return Node(
            id=node_id,
            cpu_millis=(os.cpu_count() or 1) * 1000,
            memory_bytes=_host_memory_bytes(),
            labels={HOSTNAME_LABEL: socket.gethostname()},
            gpus=gpus,
            state=NodeState.READY,
            simulated=False,
        )

    def sample(self, *, now: float | None = None) -> dict[int, GpuMetrics]:
        """Current metrics per GPU index. A query a GPU does not support reads as 0."""
        sample_time = time.time() if now is None else now
        with self._lock:
            if self._closed:
                raise RuntimeError("NVML inventory is closed")
            self._drain_xid_events()
            return {index: self._sample_one(index, sample_time) for index in self.gpu_indices}

    def health(self) -> dict[int, GpuHealth]:
        """What NVML itself says per GPU index: UNHEALTHY once the device is lost (the
        metrics of `sample` carry the rest, for the policy to judge)."""
        with self._lock:
            return {
                index: GpuHealth.UNHEALTHY if index in self._lost else GpuHealth.HEALTHY
                for index in self.gpu_indices
            }

    async def discover_async(self, node_id: str, *, now: float | None = None) -> Node:
        return await self._run(lambda: self.discover(node_id, now=now))

    async def sample_async(self, *, now: float | None = None) -> dict[int, GpuMetrics]:
        return await self._run(lambda: self.sample(now=now))

    async def health_async(self) -> dict[int, GpuHealth]:
        return await self._run(self.health)

    async def _run(self, fn: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    # --- internals (called with the lock held) --------------------------------------

    def _sample_one(self, index: int, sample_time: float) -> GpuMetrics:
        nvml = self._nvml
        # Each field on its own: one unsupported query must not lose the others.
        util = self._read(index, "utilization", nvml.nvmlDeviceGetUtilizationRates, None)
        memory = self._read(index, "memory", nvml.nvmlDeviceGetMemoryInfo, None)
        temperature = self._read(
            index, "temperature", nvml.nvmlDeviceGetTemperature, 0, _NVML_TEMPERATURE_GPU
        )
        power_mw = self._read(index, "power", nvml.nvmlDeviceGetPowerUsage, 0)
        ecc = self._read(
            index,
            "ecc",
            nvml.nvmlDeviceGetTotalEccErrors,
            0,
            _NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
            _NVML_VOLATILE_ECC,
        )
        return GpuMetrics(
            utilization_percent=float(util.gpu) if util is not None else 0.0,
            memory_used_bytes=int(memory.used) if memory is not None else 0,
            temperature_celsius=float(temperature),
            power_watts=float(power_mw) / 1000.0,
            ecc_errors=int(ecc),
            xid_errors=self._xid_counts.get(index, 0),
            sample_time=sample_time,
            recent_xids=tuple(self._recent_xids.pop(index, ())),
        )

    def _read(self, index: int, what: str, query: Any, default: Any, *args: Any) -> Any:
        nvml = self._nvml
        try:
            return query(self._handles[index], *args)
        except nvml.NVMLError as exc:
            not_supported = getattr(nvml, "NVMLError_NotSupported", None)
            if not_supported is not None and isinstance(exc, not_supported):
                return default
            gpu_lost = getattr(nvml, "NVMLError_GpuIsLost", None)
            if gpu_lost is not None and isinstance(exc, gpu_lost):
                self._lost.add(index)
            if (index, what) not in self._warned:
                self._warned.add((index, what))
                log.warning("NVML: reading %s of GPU %d failed (%s)", what, index, exc)
            return default

    def _drain_xid_events(self) -> None:
        if self._event_set is None:
            return
        nvml = self._nvml
        index_of = {u: i for i, u in self._uuids.items()}
        for _ in range(_MAX_EVENTS_PER_SAMPLE):
            try:
                # Timeout 0: only what is already queued; NVMLError_Timeout means none left.
                event = nvml.nvmlEventSetWait(self._event_set, 0)
                index = index_of.get(_text(nvml.nvmlDeviceGetUUID(event.device)))
            except nvml.NVMLError:
                return
            if index is None:
                continue
            xid = int(event.eventData)
            self._xid_counts[index] = self._xid_counts.get(index, 0) + 1
            recent = self._recent_xids.setdefault(index, [])
            if len(recent) < _MAX_XIDS_PER_SAMPLE:
                recent.append(xid)
            # The engine judges it and logs what it does; this is the raw trail.
            log.debug("NVML: GPU %d reported %s", index, xid_text(xid))
