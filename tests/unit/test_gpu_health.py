"""The GPU health policy: one model-name normaliser and one rule for the server and the
agent, the XID policy, quarantine and timed return on a fake clock, and GPUs an operator
pinned out staying out."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rmgrpc.clock import ManualClock
from rmgrpc.config import ConfigError, load_settings
from rmgrpc.engine import Engine, GpuReport
from rmgrpc.errors import InvalidArgument
from rmgrpc.gpu.health import (
    DEFAULT_QUARANTINE_XIDS,
    DEFAULT_WARN_XIDS,
    HealthPolicy,
    Sample,
    XidAction,
    model_name,
    parse_xids,
    recovered,
)
from rmgrpc.model import EventKind, Gpu, GpuHealth, GpuMetrics, Node
from rmgrpc.store import Store
from rmgrpc.v1 import gpu_manager_pb2
from rmgrpc_client import _gpus
from tests.conftest import make_settings
from tests.unit.test_gpu import FakeEvent, FakeNvml, h100

RECOVERY = 300.0

# --- the normaliser ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("full", "short"),
    [
        ("NVIDIA GeForce RTX 4090", "RTX-4090"),
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-40GB", "A100"),
        ("Tesla V100-SXM2-16GB", "V100"),
        ("NVIDIA GeForce RTX 3090 Ti", "RTX-3090-Ti"),
        ("NVIDIA RTX A6000", "RTX-A6000"),
        ("NVIDIA L4", "L4"),
        ("Tesla T4", "T4"),
    ],
)
def test_one_model_name_for_server_and_agent(full: str, short: str) -> None:
    assert model_name(full) == short
    # The agent names GPUs with the very same function: they cannot drift apart.
    assert _gpus.model_name is model_name


# --- the XID policy and the rule --------------------------------------------------------


def test_default_xid_policy_follows_nvidias_catalogue() -> None:
    policy = HealthPolicy()
    for xid in (48, 63, 64, 74, 79, 92, 94, 95):
        assert policy.classify(xid) == XidAction.QUARANTINE, xid
    for xid in (13, 31, 43, 45):
        assert policy.classify(xid) == XidAction.WARN, xid
    assert policy.classify(8) == XidAction.IGNORE
    assert not DEFAULT_QUARANTINE_XIDS & DEFAULT_WARN_XIDS


def test_the_rule_names_the_first_reason_and_warns_on_application_xids() -> None:
    policy = HealthPolicy(max_temperature_celsius=85, max_uncorrectable_ecc=2)
    assert policy.judge(Sample(temperature_celsius=85, uncorrectable_ecc=2)).healthy
    assert policy.judge(Sample()).healthy  # nothing sampled: nothing against it
    hot = policy.judge(Sample(temperature_celsius=91.5))
    assert hot.reason == "temperature 91.5 °C above 85 °C"
    ecc = policy.judge(Sample(uncorrectable_ecc=3))
    assert ecc.reason == "3 uncorrectable ECC errors (more than 2)"
    xid = policy.judge(Sample(xids=(13, 79)))
    assert xid.reason == "XID 79 (GPU has fallen off the bus)"
    assert xid.warnings == ("XID 13 (graphics engine exception), usually the application's fault",)
    assert policy.judge(Sample(xids=(8,))).healthy
    assert policy.judge(Sample(failed=True)).reason == "reported unhealthy by its node"
    assert HealthPolicy(max_temperature_celsius=0).judge(Sample(temperature_celsius=200)).healthy


def test_recovery_and_config() -> None:
    policy = HealthPolicy(recovery_seconds=60)
    assert not recovered(policy, None, 100.0)
    assert not recovered(policy, 50.0, 109.0) and recovered(policy, 50.0, 110.0)
    assert parse_xids(" 48, 79,,95") == {48, 79, 95}
    with pytest.raises(ValueError, match="'x1'"):
        parse_xids("48,x1")
    settings = load_settings(
        None,
        env={"RMGRPC_GPU_QUARANTINE_XIDS": "79", "RMGRPC_GPU_RECOVERY_SECONDS": "30"},
    )
    assert settings.health_policy().quarantine_xids == {79}
    assert settings.health_policy().recovery_seconds == 30
    for env, message in [
        ({"RMGRPC_GPU_WARN_XIDS": "13,79"}, "both|quarantine and to warn"),
        ({"RMGRPC_GPU_QUARANTINE_XIDS": "79;48"}, "not an XID"),
        ({"RMGRPC_GPU_RECOVERY_SECONDS": "-1"}, "recovery_seconds"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_settings(None, env=env)


# --- the engine applies it --------------------------------------------------------------


class Cluster:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = ManualClock()
        self.settings = make_settings(
            tmp_path, simulated_nodes=0, gpu_recovery_seconds=RECOVERY, node_lease_seconds=1e6
        )
        self.engine: Engine
        self.store: Store

    async def start(self) -> Engine:
        self.store = await Store.open(self.settings.db)
        self.engine = Engine(self.settings, self.store, self.clock)
        await self.engine.start()
        return self.engine

    async def stop(self) -> None:
        await self.engine.stop()
        await self.store.close()

    async def report(self, index: int = 0, **metrics: Any) -> Gpu:
        m = GpuMetrics(temperature_celsius=metrics.pop("temperature", 50.0), **metrics)
        node = await self.engine.heartbeat("n1", [GpuReport(index, GpuHealth.HEALTHY, m)])
        return node.gpus[index]

    async def health_events(self) -> list[tuple[GpuHealth, str, bool]]:
        """(health, reason, cordoned) of GPU 0 in each stored event of node n1."""
        out = []
        for e in await self.store.read_events(0, 10_000):
            if e.kind == EventKind.NODE:
                g = gpu_manager_pb2.Node.FromString(e.data).gpus[0]
                out.append((GpuHealth(g.health), g.health_reason, g.cordoned))
        return out


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path)
    engine = await c.start()
    gpus = [Gpu(i, f"GPU-{i}", "H100", 80 << 30) for i in range(2)]
    await engine.register_node(Node("n1", 8000, 64 << 30, gpus=gpus))
    yield c
    await c.stop()


async def test_quarantine_and_timed_return(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    c = cluster
    with caplog.at_level(logging.INFO, logger="rmgrpc.engine"):
        gpu = await c.report(temperature=97)
        assert gpu.health == GpuHealth.UNHEALTHY
        assert gpu.health_reason == "temperature 97 °C above 90 °C"
        # Clean samples start the clock; a bad one in between starts it over.
        c.clock.advance(10)
        assert (await c.report()).healthy_since == c.clock.now()
        c.clock.advance(RECOVERY - 1)
        assert (await c.report()).health == GpuHealth.UNHEALTHY
        assert (await c.report(recent_xids=(94,))).healthy_since is None
        c.clock.advance(1)
        gpu = await c.report()
        c.clock.advance(RECOVERY - 1)
        assert (await c.report()).health == GpuHealth.UNHEALTHY
        c.clock.advance(1)
        gpu = await c.report()
        assert gpu.health == GpuHealth.HEALTHY and gpu.health_reason == ""
        # An application's XID is a warning, not a quarantine.
        assert (await c.report(recent_xids=(13,))).health == GpuHealth.HEALTHY
    # Each change is one event (the repeated bad sample is none) and a log line.
    assert await c.health_events() == [
        (GpuHealth.HEALTHY, "", False),  # registered
        (GpuHealth.UNHEALTHY, "temperature 97 °C above 90 °C", False),
        (GpuHealth.HEALTHY, "", False),
    ]
    lines = [r.getMessage() for r in caplog.records]
    assert "node n1 GPU 0 quarantined: temperature 97 °C above 90 °C" in lines
    assert any(line.startswith("node n1 GPU 0 back in service: clean for 300 s") for line in lines)
    assert any("XID 13 (graphics engine exception)" in line for line in lines)
    warned = [r for r in caplog.records if "XID 13" in r.getMessage()]
    assert warned and warned[0].levelno == logging.WARNING


async def test_uncorrectable_ecc_keeps_a_gpu_out_until_reset(cluster: Cluster) -> None:
    c = cluster
    assert (await c.report(ecc_errors=1)).health == GpuHealth.UNHEALTHY
    c.clock.advance(RECOVERY * 3)
    # The volatile counter stays until the GPU is reset: every sample is still bad.
    assert (await c.report(ecc_errors=1)).health == GpuHealth.UNHEALTHY
    assert (await c.report(ecc_errors=0)).health == GpuHealth.UNHEALTHY
    c.clock.advance(RECOVERY)
    assert (await c.report(ecc_errors=0)).health == GpuHealth.HEALTHY


async def test_a_pinned_gpu_stays_out_across_restarts_until_uncordoned(
    cluster: Cluster,
) -> None:
    c = cluster
    await c.report(recent_xids=(79,))
    node = await c.engine.cordon_gpus("n1", [0], "RMA ticket 42")
    gpu = node.gpus[0]
    assert gpu.cordoned and gpu.health == GpuHealth.UNHEALTHY
    assert gpu.health_reason == "cordoned by an operator: RMA ticket 42"
    for _ in range(3):
        c.clock.advance(RECOVERY)
        assert (await c.report()).health == GpuHealth.UNHEALTHY
    # Nor does an agent's restart (re-registration), nor the server's.
    gpus = [Gpu(i, f"GPU-{i}", "H100", 80 << 30) for i in range(2)]
    await c.engine.register_node(Node("n1", 8000, 64 << 30, gpus=gpus))
    await c.stop()
    await c.start()
    gpu = c.engine.get_node("n1").gpus[0]
    assert gpu.cordoned and gpu.health == GpuHealth.UNHEALTHY
    c.clock.advance(RECOVERY)
    assert (await c.report()).health == GpuHealth.UNHEALTHY
    with pytest.raises(InvalidArgument, match="no GPU 7"):
        await c.engine.cordon_gpus("n1", [1, 7], "")
    gpu = (await c.engine.uncordon_gpus("n1", [0])).gpus[0]
    assert not gpu.cordoned and gpu.health == GpuHealth.HEALTHY and gpu.health_reason == ""
    assert (await c.report(temperature=99)).health == GpuHealth.UNHEALTHY


async def test_a_quarantine_survives_an_agent_reregistering(cluster: Cluster) -> None:
    c = cluster
    await c.report(recent_xids=(48,))
    gpus = [Gpu(i, f"GPU-{i}", "H100", 80 << 30) for i in range(2)]
    node = await c.engine.register_node(Node("n1", 8000, 64 << 30, gpus=gpus))
    assert node.gpus[0].health == GpuHealth.UNHEALTHY
    assert node.gpus[0].health_reason == "XID 48 (double-bit ECC error)"
    assert node.gpus[1].health == GpuHealth.HEALTHY


# --- the agent reports what the rule needs ----------------------------------------------


def test_agent_reports_model_names_and_xids(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml([h100(0), h100(1, temperature=71, ecc=2)])
    fake.gpus[1].name = "NVIDIA GeForce RTX 4090"
    module = fake.module()
    module.NVML_TEMPERATURE_GPU = 0  # type: ignore[attr-defined]
    module.NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1  # type: ignore[attr-defined]
    module.NVML_VOLATILE_ECC = 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", module)
    gpus, why = _gpus.open_nvml()
    assert gpus is not None, why
    assert [g.model for g in gpus.inventory()] == ["H100", "RTX-4090"]
    fake.events += [FakeEvent(fake.gpus[1], 79), FakeEvent(fake.gpus[1], 13)]
    first = gpus.statuses()
    assert list(first[1].metrics.recent_xids) == [79, 13] and first[1].metrics.xid_errors == 2
    assert first[1].metrics.ecc_errors == 2 and first[1].metrics.temperature_celsius == 71
    assert list(first[0].metrics.recent_xids) == []
    again = gpus.statuses()
    assert list(again[1].metrics.recent_xids) == [] and again[1].metrics.xid_errors == 2
    # The same rule the server applies quarantines it for the XID.
    verdict = HealthPolicy().judge(
        Sample(
            temperature_celsius=first[1].metrics.temperature_celsius,
            xids=tuple(first[1].metrics.recent_xids),
        )
    )
    assert verdict.reason == "XID 79 (GPU has fallen off the bus)"


# --- a property: healthy exactly when clean for the recovery time since the last bad --


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.sampled_from([0.0, 1.0, 30.0, 100.0, 200.0]), st.booleans()),
        min_size=1,
        max_size=25,
    )
)
def test_health_follows_the_last_bad_sample(samples: list[tuple[float, bool]]) -> None:
    """At every report, a GPU is HEALTHY iff it never had a bad sample, or the clean run
    since its last bad one started at least `recovery_seconds` ago; each change is one
    node event."""

    async def run() -> None:
        clock = ManualClock()
        config = load_settings(
            None, env={}, overrides={"gpu_recovery_seconds": 200.0, "simulated_nodes": 0}
        )
        store = await Store.open(":memory:")
        engine = Engine(config, store, clock)
        await engine.start()
        try:
            gpu = Gpu(0, "GPU-0", "H100", 80 << 30)
            await engine.register_node(Node("n1", 1000, 1 << 30, gpus=[gpu]))
            start_rev = engine.revision
            times: list[float] = []
            last_bad: int | None = None
            changes = 0
            was_healthy = True
            for i, (dt, bad) in enumerate(samples):
                clock.advance(dt)
                times.append(clock.now())
                m = GpuMetrics(temperature_celsius=99.0 if bad else 40.0)
                node = await engine.heartbeat("n1", [GpuReport(0, GpuHealth.HEALTHY, m)])
                if bad:
                    last_bad = i
                healthy = last_bad is None or (
                    i > last_bad and times[i] - times[last_bad + 1] >= 200.0
                )
                assert (node.gpus[0].health == GpuHealth.HEALTHY) == healthy, (i, samples)
                changes += healthy != was_healthy
                was_healthy = healthy
            await engine.wait_committed()
            events = await store.read_events(start_rev, 10_000)
            assert len([e for e in events if e.kind == EventKind.NODE]) == changes
        finally:
            await engine.stop()
            await store.close()

    asyncio.run(run())
