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
from typing import TYPE_CHECKING, Any

from rmgrpc.scheduler.snapshot import SchedulerConfig

if TYPE_CHECKING:
    from rmgrpc.cost import PriceTable
    from rmgrpc.gpu.health import HealthPolicy


# The longest max_duration_seconds the API accepts at all (services.validate's bound).
_MAX_DURATION = 366 * 86400


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
    insecure: bool = _s(
        "server",
        "serve a non-loopback address with no authentication (never in production)",
        default=False,
    )

    db: str = _s("store", "SQLite database file", default="rmgrpc.db")
    sqlite_synchronous: str = _s(
        "store", "NORMAL survives kill -9; FULL also survives power loss", default="NORMAL"
    )
    allocation_retention_seconds: float = _s(
        "store", "ended allocations are forgotten after this long", default=7 * 86400.0
    )

    simulated_nodes: int = _s(
        "inventory", "simulated nodes at start (0: none; `rmgrpc serve --dev`: 4)", default=0
    )
    simulated_gpus_per_node: int = _s("inventory", "GPUs per simulated node", default=8)
    simulated_gpu_model: str = _s("inventory", "model of simulated GPUs", default="H100")
    simulated_cpu_millis: int = _s("inventory", "CPU per simulated node", default=128_000)
    simulated_memory_bytes: int = _s(
        "inventory", "memory per simulated node", default=1024 * 1024**3
    )
    nvml: str = _s("inventory", "auto: add local GPUs when NVML works; off: never", default="auto")

    gpu_max_temperature_celsius: float = _s(
        "gpu_health", "a GPU hotter than this is quarantined (0: no limit)", default=90.0
    )
    gpu_max_uncorrectable_ecc: int = _s(
        "gpu_health",
        "a GPU with more uncorrectable (volatile) ECC errors than this is quarantined",
        default=0,
    )
    gpu_quarantine_xids: str = _s(
        "gpu_health",
        "XID codes that quarantine a GPU (hardware faults), comma-separated",
        default="48,63,64,74,79,92,94,95,119,120",
    )
    gpu_warn_xids: str = _s(
        "gpu_health",
        "XID codes only logged as warnings (application faults), comma-separated",
        default="13,31,43,45",
    )
    gpu_recovery_seconds: float = _s(
        "gpu_health",
        "a quarantined GPU whose samples stay clean this long returns by itself (0: at once)",
        default=600.0,
    )

    default_lease_seconds: int = _s(
        "leases",
        "allocation lease when a request names none; 0: no lease (runs until released"
        " or max_duration_seconds)",
        default=0,
    )
    max_lease_seconds: int = _s("leases", "longest allocation lease", default=7 * 86400)
    default_max_duration_seconds: int = _s(
        "leases",
        "hard end of an allocation whose request gives no max_duration_seconds; 0: none"
        " (max_allowed_duration_seconds, when set, is the default then)",
        default=0,
    )
    max_allowed_duration_seconds: int = _s(
        "leases",
        "longest max_duration_seconds a request may ask for (INVALID_ARGUMENT above);"
        " 0: no limit but 366 days",
        default=0,
    )
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
    fair_share_half_life_seconds: float = _s(
        "scheduler",
        "fair share orders by usage averaged with this half-life (0: by what is held now)",
        default=3600.0,
    )
    never_fits: str = _s(
        "scheduler",
        "a request no registered node could ever host: reject (REJECTED at once) or pending",
        default="reject",
    )
    estimate_queue_depth: int = _s(
        "scheduler",
        "start-time estimates for the first this many pending requests in queue order"
        " (the rest: not estimated); 0 turns estimates off",
        default=200,
    )
    estimate_interval_seconds: float = _s(
        "scheduler",
        "estimates are recomputed by the first pass this long after the last (not every pass)",
        default=60.0,
    )
    estimate_resolution_seconds: float = _s(
        "scheduler",
        "estimates replay the queue at hard ends rounded down to this step (Slurm's"
        " bf_resolution; 0: at every hard end, exact but dearer)",
        default=60.0,
    )
    pass_runner: str = _s(
        "scheduler",
        "where full scheduling passes run: process (a worker process, so a deep queue "
        "slows RPCs little) or thread (in the server's own process, for embedding)",
        default="process",
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
    event_ring_max_bytes: int = _s(
        "watch",
        "the in-memory ring of recent events (watch catch-up) holds at most this many bytes",
        default=64 * 1024 * 1024,
    )

    max_message_bytes: int = _s(
        "limits", "largest request message accepted (RESOURCE_EXHAUSTED above)", default=4 << 20
    )
    max_concurrent_streams: int = _s(
        "limits", "concurrent calls (HTTP/2 streams) per client connection", default=2048
    )
    keepalive_time_seconds: float = _s(
        "limits", "the server pings an idle connection this often", default=30.0
    )
    keepalive_timeout_seconds: float = _s(
        "limits", "a connection whose ping goes unanswered this long is closed", default=10.0
    )
    min_ping_interval_seconds: float = _s(
        "limits", "clients pinging more often than this are disconnected", default=10.0
    )
    max_page_size: int = _s("limits", "most items a List page may ask for", default=1000)
    max_page_bytes: int = _s(
        "limits", "a List page stops before its items pass this many bytes", default=1 << 20
    )
    max_labels: int = _s(
        "limits", "most labels on a node, or entries in a node selector", default=64
    )
    max_gpus_per_node: int = _s("limits", "most GPUs one node may register", default=64)
    max_quota_models: int = _s(
        "limits", "most GPU models in a quota's gpus_by_model map", default=64
    )
    max_pending_per_tenant: int = _s(
        "limits", "PENDING allocations one tenant may have at once", default=10_000
    )
    max_pending_total: int = _s(
        "limits", "PENDING allocations the whole server may hold at once", default=100_000
    )
    max_watch_streams_per_principal: int = _s(
        "limits", "open watch streams per client (today: per peer address)", default=2048
    )
    max_watch_streams: int = _s("limits", "open watch streams in total", default=10_000)

    tracing: str = _s(
        "telemetry",
        "span exporter: none, console (to tracing_file) or otlp (pip install 'rmgrpc[otlp]')",
        default="none",
    )
    tracing_file: str = _s(
        "telemetry",
        "file console spans are appended to (a JSON per line); empty: stdout",
        default="",
    )
    otlp_endpoint: str = _s(
        "telemetry",
        "OTLP collector URL; empty: OTEL_EXPORTER_OTLP_ENDPOINT, else the exporter's default",
        default="",
    )
    otlp_protocol: str = _s("telemetry", "OTLP transport: grpc or http/protobuf", default="grpc")
    tracing_sample_ratio: float = _s(
        "telemetry",
        "share of traces recorded, 0..1 (spans in a recorded trace always are)",
        default=1.0,
    )
    metrics_refresh_seconds: float = _s(
        "telemetry", "how often gauges (cluster, tenants, GPUs) are recomputed", default=5.0
    )

    gpu_hour_prices: str = _s(
        "cost",
        "price of a GPU-hour by model, MODEL=PRICE comma-separated (models not listed: "
        "gpu_hour_price_default)",
        default="H100=4.0,A100=2.0,L4=0.8",
    )
    gpu_hour_price_default: float = _s(
        "cost", "price of a GPU-hour of a model gpu_hour_prices does not list", default=2.0
    )
    cpu_core_hour_price: float = _s("cost", "price of a CPU core-hour", default=0.04)
    memory_gib_hour_price: float = _s("cost", "price of a GiB-hour of memory", default=0.005)
    cost_accrual_interval_seconds: float = _s(
        "cost",
        "how often accrued cost is written (a kill -9 loses at most this much of it)",
        default=60.0,
    )

    tokens_file: str = _s(
        "auth",
        "TOML file of principals: token hashes and client-certificate SANs (reread on SIGHUP)",
        default="",
    )

    cert_file: str = _s("tls", "server certificate chain (PEM); empty: no TLS", default="")
    key_file: str = _s("tls", "server private key (PEM)", default="")
    client_ca_file: str = _s(
        "tls", "CA bundle (PEM) for client certificates; set: mutual TLS required", default=""
    )

    def health_policy(self) -> HealthPolicy:
        """The GPU health policy of these settings; ValueError when it cannot be built."""
        from rmgrpc.gpu.health import policy_from

        return policy_from(
            max_temperature_celsius=self.gpu_max_temperature_celsius,
            max_uncorrectable_ecc=self.gpu_max_uncorrectable_ecc,
            quarantine_xids=self.gpu_quarantine_xids,
            warn_xids=self.gpu_warn_xids,
            recovery_seconds=self.gpu_recovery_seconds,
        )

    def price_table(self) -> PriceTable:
        """The prices of these settings; ValueError naming the bad one."""
        from rmgrpc.cost import PriceTable, check_price, parse_gpu_prices

        check_price("gpu_hour_price_default", self.gpu_hour_price_default)
        check_price("cpu_core_hour_price", self.cpu_core_hour_price)
        check_price("memory_gib_hour_price", self.memory_gib_hour_price)
        try:
            by_model = parse_gpu_prices(self.gpu_hour_prices)
        except ValueError as exc:
            raise ValueError(f"gpu_hour_prices: {exc}") from None
        return PriceTable(
            by_model,
            self.gpu_hour_price_default,
            self.cpu_core_hour_price,
            self.memory_gib_hour_price,
        )

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
            fair_share_half_life_seconds=self.fair_share_half_life_seconds,
            never_fits_pending=self.never_fits == "pending",
        )

    def validate(self) -> None:
        _host_port("listen", self.listen)
        if self.metrics_listen:
            _host_port("metrics_listen", self.metrics_listen)
        checks: list[tuple[bool, str]] = [
            (self.simulated_nodes >= 0, "simulated_nodes must be >= 0"),
            (self.pass_runner in ("process", "thread"), "pass_runner must be process or thread"),
            (0 <= self.simulated_gpus_per_node <= 64, "simulated_gpus_per_node must be 0..64"),
            (self.simulated_cpu_millis > 0, "simulated_cpu_millis must be > 0"),
            (self.simulated_memory_bytes > 0, "simulated_memory_bytes must be > 0"),
            (self.nvml in ("auto", "off"), "nvml must be 'auto' or 'off'"),
            (_health_error(self) is None, f"gpu_health: {_health_error(self)}"),
            (
                0 <= self.default_lease_seconds <= self.max_lease_seconds,
                "default_lease_seconds must be >= 0 and <= max_lease_seconds",
            ),
            (
                0 <= self.default_max_duration_seconds <= _MAX_DURATION,
                "default_max_duration_seconds must be 0..31622400 (366 days)",
            ),
            (
                0 <= self.max_allowed_duration_seconds <= _MAX_DURATION,
                "max_allowed_duration_seconds must be 0..31622400 (366 days)",
            ),
            (
                not self.max_allowed_duration_seconds
                or self.default_max_duration_seconds <= self.max_allowed_duration_seconds,
                "default_max_duration_seconds must be <= max_allowed_duration_seconds",
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
            (
                self.fair_share_half_life_seconds >= 0,
                "fair_share_half_life_seconds must be >= 0",
            ),
            (self.never_fits in ("reject", "pending"), "never_fits must be reject or pending"),
            (self.estimate_queue_depth >= 0, "estimate_queue_depth must be >= 0"),
            (self.estimate_interval_seconds >= 0, "estimate_interval_seconds must be >= 0"),
            (self.estimate_resolution_seconds >= 0, "estimate_resolution_seconds must be >= 0"),
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
            (self.event_ring_max_bytes >= 1 << 20, "event_ring_max_bytes must be >= 1048576"),
            (
                64 * 1024 <= self.max_message_bytes <= 1 << 30,
                "max_message_bytes must be between 65536 and 1073741824",
            ),
            (self.max_concurrent_streams >= 1, "max_concurrent_streams must be >= 1"),
            (self.keepalive_time_seconds >= 1, "keepalive_time_seconds must be >= 1"),
            (self.keepalive_timeout_seconds > 0, "keepalive_timeout_seconds must be > 0"),
            (self.min_ping_interval_seconds >= 0, "min_ping_interval_seconds must be >= 0"),
            (self.max_page_size >= 1, "max_page_size must be >= 1"),
            (self.max_page_bytes >= 64 * 1024, "max_page_bytes must be >= 65536"),
            (
                self.max_page_bytes <= self.max_message_bytes,
                "max_page_bytes must be <= max_message_bytes (clients' default limit is 4 MiB)",
            ),
            (0 <= self.max_labels <= 1024, "max_labels must be 0..1024"),
            (1 <= self.max_gpus_per_node <= 1024, "max_gpus_per_node must be 1..1024"),
            (self.max_quota_models >= 0, "max_quota_models must be >= 0"),
            (self.max_pending_per_tenant >= 1, "max_pending_per_tenant must be >= 1"),
            (self.max_pending_total >= 1, "max_pending_total must be >= 1"),
            (
                self.max_watch_streams_per_principal >= 1,
                "max_watch_streams_per_principal must be >= 1",
            ),
            (self.max_watch_streams >= 1, "max_watch_streams must be >= 1"),
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
            (
                self.otlp_protocol in ("grpc", "http/protobuf"),
                "otlp_protocol must be grpc or http/protobuf",
            ),
            (self.metrics_refresh_seconds > 0, "metrics_refresh_seconds must be > 0"),
            (_price_error(self) is None, f"cost: {_price_error(self)}"),
            (
                self.cost_accrual_interval_seconds > 0,
                "cost_accrual_interval_seconds must be > 0",
            ),
            (0 <= self.tracing_sample_ratio <= 1, "tracing_sample_ratio must be in [0, 1]"),
            (bool(self.cert_file) == bool(self.key_file), "cert_file and key_file go together"),
            (
                not self.client_ca_file or bool(self.cert_file),
                "client_ca_file needs cert_file and key_file (mutual TLS is TLS)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def _health_error(settings: Settings) -> str | None:
    try:
        settings.health_policy()
    except ValueError as exc:
        return str(exc)
    return None


def _price_error(settings: Settings) -> str | None:
    try:
        settings.price_table()
    except ValueError as exc:
        return str(exc)
    return None


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
    defaults: Mapping[str, Any] | None = None,
) -> Settings:
    """Defaults (`defaults` replacing some, e.g. dev mode's), then the TOML file at
    `path`, then `RMGRPC_*` variables, then `overrides`."""
    env = os.environ if env is None else env
    values: dict[str, Any] = dict(defaults or {})
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
        if isinstance(value, bool):
            rendered = "true" if value else "false"
        else:
            rendered = f'"{value}"' if isinstance(value, str) else repr(value)
        lines.append(f"# {f.metadata['help']}")
        lines.append(f"{f.name} = {rendered}")
    return "\n".join(lines) + "\n"
