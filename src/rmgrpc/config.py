"""Settings: one TOML file plus `RMGRPC_*` environment overrides, validated once at start-up.

Every setting has a section in the TOML file and a flat environment name
(`RMGRPC_` + the setting's name in capitals, e.g. `RMGRPC_SIMULATED_NODES`).
Precedence: defaults < TOML file < environment < command-line flags.
`rmgrpc.example.toml` at the repository root writes every default out.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from rmgrpc.scheduler.snapshot import SchedulerConfig


class ConfigError(Exception):
    """A setting that cannot be used; the message names it."""


def _s(section: str, help: str, **kw: Any) -> Any:
    return field(metadata={"section": section, "help": help}, **kw)


@dataclass(frozen=True)
class Settings:
    listen: str = _s("server", "gRPC address HOST:PORT", default="127.0.0.1:50051")
    metrics_listen: str = _s(
        "server", "HTTP /metrics address HOST:PORT; empty disables it", default="127.0.0.1:9464"
    )
    shutdown_grace_seconds: float = _s(
        "server", "how long in-flight RPCs get on SIGTERM", default=5.0
    )
    log_level: str = _s("server", "debug, info, warning or error", default="info")

    db: str = _s("store", "SQLite database file", default="rmgrpc.db")
    sqlite_synchronous: str = _s(
        "store", "NORMAL survives kill -9; FULL also survives power loss", default="NORMAL"
    )
    allocation_retention_seconds: float = _s(
        "store", "ended allocations are forgotten after this long", default=7 * 86400.0
    )

    simulated_nodes: int = _s("inventory", "simulated nodes at start (0: none)", default=4)
    simulated_gpus_per_node: int = _s("inventory", "GPUs per simulated node", default=8)
    simulated_gpu_model: str = _s("inventory", "model of simulated GPUs", default="H100")
    simulated_cpu_millis: int = _s("inventory", "CPU per simulated node", default=128_000)
    simulated_memory_bytes: int = _s(
        "inventory", "memory per simulated node", default=1024 * 1024**3
    )
    nvml: str = _s("inventory", "auto: add local GPUs when NVML works; off: never", default="auto")

    default_lease_seconds: int = _s(
        "leases", "allocation lease when a request names none", default=300
    )
    max_lease_seconds: int = _s("leases", "longest allocation lease", default=7 * 86400)
    node_lease_seconds: float = _s(
        "leases", "a node with no heartbeat this long goes DOWN", default=30.0
    )
    heartbeat_interval_seconds: float = _s(
        "leases", "how often agents are told to heartbeat", default=10.0
    )

    min_runtime_seconds: float = _s(
        "scheduler", "placed allocations are safe from preemption this long", default=60.0
    )
    max_preemptions_per_cycle: int = _s(
        "scheduler", "most allocations one cycle may preempt", default=8
    )
    preemption_grace_seconds: float = _s(
        "scheduler", "preempted allocations keep their GPUs this long", default=30.0
    )
    starvation_seconds: float = _s(
        "scheduler", "a gang blocked this long gets capacity held for it", default=120.0
    )
    max_held_gangs: int = _s(
        "scheduler", "how many starving gangs may hold capacity at once", default=1
    )
    default_weight: float = _s(
        "scheduler", "fair-share weight of tenants with no quota", default=1.0
    )
    default_limit_gpus: int = _s(
        "scheduler", "GPU limit of tenants with no quota (-1: none)", default=-1
    )

    watch_buffer_events: int = _s(
        "watch",
        "events buffered per live watcher; past it, it catches up from the log",
        default=4096,
    )
    watch_max_lag_events: int = _s(
        "watch",
        "a watcher that fell back is cut off this many revisions behind",
        default=65536,
    )
    watch_max_lag_seconds: float = _s(
        "watch",
        "a watcher that fell back is cut off after this long without progress",
        default=30.0,
    )
    watch_progress_seconds: float = _s(
        "watch", "idle streams get a progress message this often", default=5.0
    )
    retention_max_events: int = _s(
        "watch", "the event log keeps at most this many", default=1_000_000
    )
    retention_max_age_seconds: float = _s(
        "watch", "events older than this are compacted away", default=7 * 86400.0
    )
    compaction_interval_seconds: float = _s("watch", "how often to compact", default=60.0)

    tracing: str = _s("telemetry", "none, console or otlp", default="none")

    def scheduler_config(self) -> SchedulerConfig:
        from rmgrpc.model import Resources

        limit = Resources(gpus=None if self.default_limit_gpus < 0 else self.default_limit_gpus)
        return SchedulerConfig(
            default_limit=limit,
            default_weight=self.default_weight,
            min_runtime_seconds=self.min_runtime_seconds,
            max_preemptions_per_cycle=self.max_preemptions_per_cycle,
            preemption_grace_seconds=self.preemption_grace_seconds,
            starvation_seconds=self.starvation_seconds,
            max_held_gangs=self.max_held_gangs,
        )

    def validate(self) -> None:
        _host_port("listen", self.listen)
        if self.metrics_listen:
            _host_port("metrics_listen", self.metrics_listen)
        checks: list[tuple[bool, str]] = [
            (self.simulated_nodes >= 0, "simulated_nodes must be >= 0"),
            (0 <= self.simulated_gpus_per_node <= 64, "simulated_gpus_per_node must be 0..64"),
            (self.simulated_cpu_millis > 0, "simulated_cpu_millis must be > 0"),
            (self.simulated_memory_bytes > 0, "simulated_memory_bytes must be > 0"),
            (self.nvml in ("auto", "off"), "nvml must be 'auto' or 'off'"),
            (
                0 < self.default_lease_seconds <= self.max_lease_seconds,
                "default_lease_seconds must be > 0 and <= max_lease_seconds",
            ),
            (self.node_lease_seconds > 0, "node_lease_seconds must be > 0"),
            (
                0 < self.heartbeat_interval_seconds < self.node_lease_seconds,
                "heartbeat_interval_seconds must be > 0 and < node_lease_seconds",
            ),
            (self.min_runtime_seconds >= 0, "min_runtime_seconds must be >= 0"),
            (self.max_preemptions_per_cycle >= 0, "max_preemptions_per_cycle must be >= 0"),
            (self.preemption_grace_seconds >= 0, "preemption_grace_seconds must be >= 0"),
            (self.starvation_seconds >= 0, "starvation_seconds must be >= 0"),
            (self.max_held_gangs >= 0, "max_held_gangs must be >= 0"),
            (self.default_weight > 0, "default_weight must be > 0"),
            (self.watch_buffer_events >= 16, "watch_buffer_events must be >= 16"),
            (
                self.watch_max_lag_events >= self.watch_buffer_events,
                "watch_max_lag_events must be >= watch_buffer_events",
            ),
            (self.watch_max_lag_seconds > 0, "watch_max_lag_seconds must be > 0"),
            (self.watch_progress_seconds > 0, "watch_progress_seconds must be > 0"),
            (self.retention_max_events >= 1, "retention_max_events must be >= 1"),
            (self.retention_max_age_seconds > 0, "retention_max_age_seconds must be > 0"),
            (self.compaction_interval_seconds > 0, "compaction_interval_seconds must be > 0"),
            (self.shutdown_grace_seconds >= 0, "shutdown_grace_seconds must be >= 0"),
            (
                self.sqlite_synchronous.upper() in ("NORMAL", "FULL"),
                "sqlite_synchronous must be NORMAL or FULL",
            ),
            (
                self.log_level.lower() in ("debug", "info", "warning", "error"),
                "log_level must be debug, info, warning or error",
            ),
            (self.tracing in ("none", "console", "otlp"), "tracing must be none, console or otlp"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def _host_port(name: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{name} must be HOST:PORT, got {value!r}")


def _coerce(name: str, kind: Any, value: Any) -> Any:
    try:
        if kind is bool:
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r}") from None


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def load_settings(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Defaults, then the TOML file at `path`, then `RMGRPC_*` variables, then `overrides`."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    known = {f.name: f for f in fields(Settings)}
    if path:
        try:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        for section, table in doc.items():
            if not isinstance(table, dict):
                raise ConfigError(f"config file {path}: [{section}] must be a table")
            for key, value in table.items():
                f = known.get(key)
                if f is None or f.metadata["section"] != section:
                    raise ConfigError(f"config file {path}: unknown setting [{section}] {key}")
                values[key] = value
    for name in known:
        env_name = "RMGRPC_" + name.upper()
        if env_name in env:
            values[name] = env[env_name]
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
    typed = {
        name: _coerce(name, _TYPES[str(known[name].type)], value) for name, value in values.items()
    }
    settings = dataclasses.replace(Settings(), **typed)
    settings.validate()
    return settings


def example_toml() -> str:
    """Every setting with its default, by section: the text of rmgrpc.example.toml."""
    lines = [
        "# rmgrpc settings: every default written out. Each can also be set with the",
        "# environment variable RMGRPC_<NAME> (e.g. RMGRPC_SIMULATED_NODES=0).",
    ]
    section = ""
    defaults = Settings()
    for f in fields(Settings):
        if f.metadata["section"] != section:
            section = f.metadata["section"]
            lines += ["", f"[{section}]"]
        value = getattr(defaults, f.name)
        rendered = f'"{value}"' if isinstance(value, str) else repr(value)
        lines.append(f"# {f.metadata['help']}")
        lines.append(f"{f.name} = {rendered}")
    return "\n".join(lines) + "\n"
