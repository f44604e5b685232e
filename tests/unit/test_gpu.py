"""The simulated inventory, and NVML discovery and sampling through a fake pynvml."""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from rmgrpc.gpu import (
    HOSTNAME_LABEL,
    SIMULATED_LABEL,
    HealthPolicy,
    NvmlInventory,
    model_name,
    simulated_metrics,
    simulated_nodes,
)
from rmgrpc.model import GpuHealth, NodeState

GIB = 1024**3

# --- simulated inventory --------------------------------------------------------------


def test_simulated_nodes_shape() -> None:
    nodes = simulated_nodes(3, 4, labels={"zone": "a", SIMULATED_LABEL: "false"}, now=100.0)
    assert [n.id for n in nodes] == ["sim-node-0", "sim-node-1", "sim-node-2"]
    for node in nodes:
        assert node.simulated and node.state == NodeState.READY and node.schedulable
        assert node.lease_expire_time is None
        assert node.last_heartbeat_time == 100.0
        assert node.cpu_millis == 128_000 and node.memory_bytes == 1024**4
        assert node.labels == {HOSTNAME_LABEL: node.id, "zone": "a", SIMULATED_LABEL: "true"}
        assert [g.index for g in node.gpus] == [0, 1, 2, 3]
        assert all(g.model == "H100" and g.memory_bytes == 80 * GIB for g in node.gpus)
        assert all(g.health == GpuHealth.HEALTHY for g in node.gpus)
    uuids = [g.uuid for n in nodes for g in n.gpus]
    assert len(set(uuids)) == 12
    # NVML's spelling: "GPU-" and a canonical uuid.
    assert all(u.startswith("GPU-") and len(u) == 40 and u.count("-") == 5 for u in uuids)


def test_simulated_nodes_are_deterministic_and_configurable() -> None:
    a = simulated_nodes(2, 8, gpu_model="A100", gpu_memory_bytes=40 * GIB, prefix="lab")
    b = simulated_nodes(2, 8, gpu_model="A100", gpu_memory_bytes=40 * GIB, prefix="lab")
    assert a == b
    assert a[1].id == "lab-1" and a[1].gpus[7].model == "A100"
    # A uuid belongs to its node and index, not to its position in the list.
    assert simulated_nodes(5, 8, prefix="lab")[1].gpus[3].uuid == a[1].gpus[3].uuid
    assert simulated_nodes(0, 8) == []
    with pytest.raises(ValueError):
        simulated_nodes(1, -1)


def test_simulated_metrics_busy_and_idle() -> None:
    (node,) = simulated_nodes(1, 4)
    metrics = simulated_metrics(node, 1000.0, {1, 2})
    assert sorted(metrics) == [0, 1, 2, 3]
    for index in (1, 2):
        busy = metrics[index]
        assert busy.utilization_percent >= 60
        assert busy.memory_used_bytes >= 0.4 * 80 * GIB
        assert busy.power_watts > 300
    for index in (0, 3):
        idle = metrics[index]
        assert idle.utilization_percent <= 2
        assert idle.memory_used_bytes < 1 * GIB
        assert idle.power_watts < 100
        assert idle.temperature_celsius < metrics[1].temperature_celsius
    assert all(m.sample_time == 1000.0 and m.ecc_errors == 0 for m in metrics.values())
    # Same inputs, same sample; a later time bucket moves the numbers.
    assert simulated_metrics(node, 1000.0, {1, 2}) == metrics
    later = simulated_metrics(node, 1060.0, {1, 2})
    assert later[1].utilization_percent != metrics[1].utilization_percent


# --- a fake pynvml --------------------------------------------------------------------


class NVMLError(Exception):
    def __init__(self, value: int = 999) -> None:
        super().__init__(value)
        self.value = value


class NVMLError_NotSupported(NVMLError):
    def __init__(self) -> None:
        super().__init__(3)

    def __str__(self) -> str:
        return "Not Supported"


class NVMLError_Timeout(NVMLError):
    def __init__(self) -> None:
        super().__init__(10)


class NVMLError_LibraryNotFound(NVMLError):
    def __init__(self) -> None:
        super().__init__(12)

    def __str__(self) -> str:
        return "NVML Shared Library Not Found"


class NVMLError_GpuIsLost(NVMLError):
    def __init__(self) -> None:
        super().__init__(15)

    def __str__(self) -> str:
        return "GPU is lost"


@dataclass
class FakeGpu:
    uuid: str
    name: str
    total: int
    used: int = 0
    util: int = 0
    temperature: int = 30
    power_mw: int = 50_000
    ecc: int = 0
    # Names of queries this GPU answers with an exception instead.
    fails: dict[str, Callable[[], Exception]] = field(default_factory=dict)


@dataclass
class FakeEvent:
    device: FakeGpu
    eventData: int


class FakeNvml:
    """The pynvml calls NvmlInventory makes, over a list of FakeGpu."""

    def __init__(self, gpus: list[FakeGpu], init_error: NVMLError | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.events: list[FakeEvent] = []
        self.calls: list[str] = []

    def module(self) -> types.ModuleType:
        mod = types.ModuleType("pynvml")
        for name, value in vars(sys.modules[__name__]).items():
            if name.startswith("NVMLError"):
                setattr(mod, name, value)
        for name in dir(self):
            if name.startswith("nvml"):
                setattr(mod, name, getattr(self, name))
        return mod

    def _query(self, gpu: FakeGpu, what: str) -> None:
        self.calls.append(what)
        if what in gpu.fails:
            raise gpu.fails[what]()

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self.gpus[index]

    def nvmlDeviceGetUUID(self, h: FakeGpu) -> str:
        return h.uuid

    def nvmlDeviceGetName(self, h: FakeGpu) -> bytes:
        self._query(h, "name")
        return h.name.encode()  # older pynvml returns bytes

    def nvmlDeviceGetMemoryInfo(self, h: FakeGpu) -> Any:
        self._query(h, "memory")
        return types.SimpleNamespace(total=h.total, used=h.used, free=h.total - h.used)

    def nvmlDeviceGetUtilizationRates(self, h: FakeGpu) -> Any:
        self._query(h, "utilization")
        return types.SimpleNamespace(gpu=h.util, memory=0)

    def nvmlDeviceGetTemperature(self, h: FakeGpu, sensor: int) -> int:
        assert sensor == 0  # NVML_TEMPERATURE_GPU
        self._query(h, "temperature")
        return h.temperature

    def nvmlDeviceGetPowerUsage(self, h: FakeGpu) -> int:
        self._query(h, "power")
        return h.power_mw

    def nvmlDeviceGetTotalEccErrors(self, h: FakeGpu, kind: int, counter: int) -> int:
        assert (kind, counter) == (1, 0)  # uncorrected, volatile
        self._query(h, "ecc")
        return h.ecc

    def nvmlEventSetCreate(self) -> str:
        return "event-set"

    def nvmlDeviceRegisterEvents(self, h: FakeGpu, kinds: int, event_set: str) -> None:
        assert kinds == 0x8 and event_set == "event-set"  # XID critical errors

    def nvmlEventSetWait(self, event_set: str, timeout_ms: int) -> FakeEvent:
        assert timeout_ms == 0  # sampling must never block on events
        if not self.events:
            raise NVMLError_Timeout()
        return self.events.pop(0)

    def nvmlEventSetFree(self, event_set: str) -> None:
        self.calls.append("free")


def h100(n: int, **kw: Any) -> FakeGpu:
    return FakeGpu(uuid=f"GPU-real-{n}", name="NVIDIA H100 80GB HBM3", total=80 * GIB, **kw)


@pytest.fixture
def install(monkeypatch: pytest.MonkeyPatch) -> Callable[[FakeNvml], FakeNvml]:
    def put(fake: FakeNvml) -> FakeNvml:
        monkeypatch.setitem(sys.modules, "pynvml", fake.module())
        return fake

    return put


def probe() -> NvmlInventory:
    inventory = NvmlInventory.probe()
    assert inventory is not None
    return inventory


# --- NVML probing ---------------------------------------------------------------------


def test_probe_without_pynvml_logs_once_and_returns_none(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    with caplog.at_level(logging.INFO, logger="rmgrpc.gpu.nvml"):
        assert NvmlInventory.probe() is None
    assert [r.getMessage() for r in caplog.records] == [
        "NVML not available (pynvml not installed): no local GPUs discovered"
    ]


def test_probe_when_nvml_init_fails_returns_none(
    install: Callable[[FakeNvml], FakeNvml], caplog: pytest.LogCaptureFixture
) -> None:
    install(FakeNvml([h100(0)], init_error=NVMLError_LibraryNotFound()))
    with caplog.at_level(logging.INFO, logger="rmgrpc.gpu.nvml"):
        assert NvmlInventory.probe() is None
    assert [r.getMessage() for r in caplog.records] == [
        "NVML not available (NVML Shared Library Not Found): no local GPUs discovered"
    ]


def test_probe_with_no_gpus_returns_none(install: Callable[[FakeNvml], FakeNvml]) -> None:
    fake = install(FakeNvml([]))
    assert NvmlInventory.probe() is None
    assert "shutdown" in fake.calls


# --- discovery and sampling -----------------------------------------------------------


def test_discover_local_node(install: Callable[[FakeNvml], FakeNvml]) -> None:
    install(
        FakeNvml(
            [
                h100(0, used=GIB, util=7),
                FakeGpu("GPU-real-1", "NVIDIA A100-SXM4-40GB", 40 * GIB, ecc=2),
            ]
        )
    )
    inventory = probe()
    node = inventory.discover("gpu-host-1", now=5.0)
    inventory.close()

    assert node.id == "gpu-host-1" and not node.simulated and node.state == NodeState.READY
    assert node.cpu_millis > 0 and node.cpu_millis % 1000 == 0
    assert node.memory_bytes > 0
    assert set(node.labels) == {HOSTNAME_LABEL}
    assert [(g.index, g.uuid, g.model, g.memory_bytes) for g in node.gpus] == [
        (0, "GPU-real-0", "H100", 80 * GIB),
        (1, "GPU-real-1", "A100", 40 * GIB),
    ]
    assert inventory.full_name(0) == "NVIDIA H100 80GB HBM3"
    # Uncorrected ECC errors make a GPU unhealthy.
    assert [g.health for g in node.gpus] == [GpuHealth.HEALTHY, GpuHealth.UNHEALTHY]
    first = node.gpus[0].metrics
    assert first is not None and first.utilization_percent == 7 and first.sample_time == 5.0


def test_sample_reads_every_metric(install: Callable[[FakeNvml], FakeNvml]) -> None:
    install(FakeNvml([h100(0, used=10 * GIB, util=93, temperature=71, power_mw=612_500)]))
    inventory = probe()
    (metrics,) = inventory.sample(now=9.0).values()
    inventory.close()
    assert metrics.utilization_percent == 93
    assert metrics.memory_used_bytes == 10 * GIB
    assert metrics.temperature_celsius == 71
    assert metrics.power_watts == pytest.approx(612.5)  # NVML reports milliwatts
    assert metrics.ecc_errors == 0 and metrics.xid_errors == 0
    assert metrics.sample_time == 9.0


def test_unsupported_metric_reads_zero_and_the_rest_survive(
    install: Callable[[FakeNvml], FakeNvml], caplog: pytest.LogCaptureFixture
) -> None:
    gpu = h100(0, util=50, temperature=60, ecc=0, fails={"power": NVMLError_NotSupported})
    install(FakeNvml([gpu]))
    inventory = probe()
    with caplog.at_level(logging.INFO, logger="rmgrpc.gpu.nvml"):
        metrics = inventory.sample()[0]
    assert metrics.power_watts == 0
    assert metrics.utilization_percent == 50 and metrics.temperature_celsius == 60
    # Not supported is normal for some boards: nothing to warn about.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert inventory.health() == {0: GpuHealth.HEALTHY}
    inventory.close()


def test_failed_name_and_lost_gpu(
    install: Callable[[FakeNvml], FakeNvml], caplog: pytest.LogCaptureFixture
) -> None:
    gpu = h100(0, fails={"name": NVMLError_NotSupported})
    fake = install(FakeNvml([gpu, h100(1)]))
    inventory = probe()
    assert inventory.full_name(0) == "unknown"
    fake.gpus[1].fails["utilization"] = NVMLError_GpuIsLost
    with caplog.at_level(logging.WARNING, logger="rmgrpc.gpu.nvml"):
        inventory.sample()
        inventory.sample()
    # Other failures are logged, once per GPU and metric; a lost GPU is unhealthy.
    assert len(caplog.records) == 1 and "GPU is lost" in caplog.records[0].getMessage()
    assert inventory.health() == {0: GpuHealth.HEALTHY, 1: GpuHealth.UNHEALTHY}
    inventory.close()


def test_xids_are_reported_once_with_their_sample_and_counted(
    install: Callable[[FakeNvml], FakeNvml],
) -> None:
    """NVML reports facts: each XID code rides with the next sample only, the count
    keeps growing; the verdict is the policy's (judged by the engine)."""
    fake = install(FakeNvml([h100(0), h100(1)]))
    inventory = probe()
    fake.events += [FakeEvent(fake.gpus[0], 13), FakeEvent(fake.gpus[1], 79)]
    metrics = inventory.sample()
    assert (metrics[0].recent_xids, metrics[1].recent_xids) == ((13,), (79,))
    assert (metrics[0].xid_errors, metrics[1].xid_errors) == (1, 1)
    # NVML's own health says only whether the device answers.
    assert inventory.health() == {0: GpuHealth.HEALTHY, 1: GpuHealth.HEALTHY}
    again = inventory.sample()
    assert again[1].recent_xids == () and again[1].xid_errors == 1
    inventory.close()


def test_discover_judges_the_first_sample_with_the_given_policy(
    install: Callable[[FakeNvml], FakeNvml],
) -> None:
    install(FakeNvml([h100(0, temperature=85), h100(1, temperature=70)]))
    inventory = NvmlInventory.probe(HealthPolicy(max_temperature_celsius=80))
    assert inventory is not None
    node = inventory.discover("n", now=1.0)
    inventory.close()
    assert [g.health for g in node.gpus] == [GpuHealth.UNHEALTHY, GpuHealth.HEALTHY]
    assert node.gpus[0].health_reason == "temperature 85 °C above 80 °C"
    assert node.gpus[1].health_reason == ""


def test_close_is_idempotent_and_stops_sampling(install: Callable[[FakeNvml], FakeNvml]) -> None:
    fake = install(FakeNvml([h100(0)]))
    inventory = probe()
    inventory.close()
    inventory.close()
    assert fake.calls.count("shutdown") == 1 and fake.calls.count("free") == 1
    with pytest.raises(RuntimeError, match="closed"):
        inventory.sample()


async def test_async_wrappers(install: Callable[[FakeNvml], FakeNvml]) -> None:
    install(FakeNvml([h100(0, util=40)]))
    inventory = await NvmlInventory.probe_async()
    assert inventory is not None
    node = await inventory.discover_async("n", now=1.0)
    assert node.gpus[0].model == "H100"
    assert (await inventory.sample_async(now=2.0))[0].utilization_percent == 40
    assert await inventory.health_async() == {0: GpuHealth.HEALTHY}
    await inventory.close_async()
    await inventory.close_async()


async def test_unexpected_sampling_error_raises_and_the_next_sample_works(
    install: Callable[[FakeNvml], FakeNvml],
) -> None:
    # Not an NVMLError (a ctypes or driver oddity): it reaches the caller, whose loop logs
    # it and retries; the worker thread and the lock must be fine for that retry.
    fake = install(FakeNvml([h100(0, util=40)]))
    inventory = probe()
    fake.gpus[0].fails["utilization"] = lambda: OSError("driver hiccup")
    with pytest.raises(OSError, match="driver hiccup"):
        await inventory.sample_async()
    del fake.gpus[0].fails["utilization"]
    assert (await inventory.sample_async())[0].utilization_percent == 40
    await inventory.close_async()


@pytest.mark.parametrize(
    ("full", "short"),
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100"),
        ("NVIDIA H100 NVL", "H100"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A100 80GB PCIe", "A100"),
        ("Tesla V100-SXM2-16GB", "V100"),
        ("Tesla T4", "T4"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA GH200 480GB", "GH200"),
        ("NVIDIA B200", "B200"),
        ("NVIDIA GeForce RTX 4090", "RTX-4090"),
        ("NVIDIA GeForce RTX 3080 Ti", "RTX-3080-Ti"),
        ("NVIDIA RTX A6000", "RTX-A6000"),
        ("Quadro RTX 8000", "RTX-8000"),
        ("NVIDIA", "NVIDIA"),
    ],
)
def test_model_name(full: str, short: str) -> None:
    assert model_name(full) == short
