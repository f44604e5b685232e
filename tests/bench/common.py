"""What the server benchmarks share: the settings of the server they measure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rmgrpc.config import Settings, load_settings


def bench_settings(tmp: str | Path, **overrides: Any) -> Settings:
    """An in-process server on a free port: 4 simulated nodes of 8 GPUs, no metrics, quiet."""
    base: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "db": str(Path(tmp) / "bench.db"),
        "metrics_listen": "",
        "nvml": "off",
        "simulated_nodes": 4,
        "simulated_gpus_per_node": 8,
        "log_level": "warning",
    }
    return load_settings(None, env={}, overrides={**base, **overrides})
