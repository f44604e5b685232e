"""The GPU health policy and the GPU model normaliser, shared by the server and the agent.

One module so the two can never disagree: the server's NVML path and the example agent
(`rmgrpc_client`, which ships in the same distribution and already imports `rmgrpc.v1`)
both name a GPU with `model_name`, and both report what they sample — metrics, the XID
codes seen since the last sample, a lost device — while the verdict is the server's:
`HealthPolicy.judge`, with the thresholds and XID lists of the server's config, applied
to every report in one place (the engine's heartbeat). Pure: no NVML, no gRPC, no clock.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# --- model names ------------------------------------------------------------------------

# Words in NVML product names that say nothing about the GPU model.
_VENDOR_WORDS = frozenset({"NVIDIA", "TESLA", "GEFORCE", "QUADRO"})
_FAMILY_WORDS = frozenset({"RTX", "GTX", "TITAN"})
_SUFFIX_WORDS = frozenset({"TI", "SUPER"})
# Memory sizes, memory kinds and form factors: "80GB", "HBM3", "SXM4", "PCIe", "NVL", …
_NOISE = re.compile(r"^(\d+GB|HBM\d*E?|SXM\d*|PCIE|NVL\d*|MIG|MAX-Q|LAPTOP|GPU)$")


def model_name(full_name: str) -> str:
    """The model a request's `gpu_model` matches, from NVML's product name.

    "NVIDIA H100 80GB HBM3" → "H100", "NVIDIA A100-SXM4-80GB" → "A100",
    "Tesla T4" → "T4", "NVIDIA GeForce RTX 4090" → "RTX-4090", "NVIDIA RTX A6000" →
    "RTX-A6000". Names it cannot parse come back whole, spaces turned into dashes.
    """
    tokens = [t for t in re.split(r"[\s\-_]+", full_name.strip()) if t]
    kept = [t for t in tokens if t.upper() not in _VENDOR_WORDS and not _NOISE.match(t.upper())]
    if not kept:
        return "-".join(tokens) or "unknown"
    model = [kept[0]]
    if kept[0].upper() in _FAMILY_WORDS and len(kept) > 1:
        model.append(kept[1])
        model.extend(t for t in kept[2:3] if t.upper() in _SUFFIX_WORDS)
    return "-".join(model)


# --- XIDs -------------------------------------------------------------------------------

# What the XIDs named in the defaults mean (NVIDIA's Xid catalogue), for log lines and
# health reasons an operator can look up.
XID_NAMES: Mapping[int, str] = {
    13: "graphics engine exception",
    31: "GPU memory page fault",
    43: "GPU stopped processing",
    45: "preemptive cleanup after earlier errors",
    48: "double-bit ECC error",
    63: "ECC page retirement or row remap recorded",
    64: "ECC page retirement or row remap failed",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
}

# Hardware faults that need a reset, a drain or an RMA: the GPU gets no new work.
DEFAULT_QUARANTINE_XIDS = frozenset({48, 63, 64, 74, 79, 92, 94, 95, 119, 120})
# Faults an application causes (a bad kernel, its own page fault, its cleanup): the
# same set the Kubernetes NVIDIA device plugin skips. Logged, the GPU stays in service.
DEFAULT_WARN_XIDS = frozenset({13, 31, 43, 45})


class XidAction(enum.Enum):
    QUARANTINE = "quarantine"
    WARN = "warn"
    # Neither list names it: logged at info, nothing else.
    IGNORE = "ignore"


def xid_text(xid: int) -> str:
    """The code and its meaning, e.g. "XID 79 (GPU has fallen off the bus)"."""
    name = XID_NAMES.get(xid)
    return f"XID {xid} ({name})" if name else f"XID {xid}"


def parse_xids(text: str) -> frozenset[int]:
    """Comma-separated codes ("48, 63,79") as a set; ValueError names what is not one."""
    out = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        if not part.isdigit():
            raise ValueError(f"{part!r} is not an XID code")
        out.add(int(part))
    return frozenset(out)


# --- the policy -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """What one report says about one GPU (metrics as sampled, all optional)."""

    temperature_celsius: float | None = None
    uncorrectable_ecc: int | None = None
    # XID codes since the previous sample.
    xids: tuple[int, ...] = ()
    # The reporter lost the device, or says it is unhealthy for its own reasons.
    failed: bool = False


@dataclass(frozen=True, slots=True)
class Verdict:
    """`reason` is set when the sample quarantines the GPU; `warnings` are log lines."""

    reason: str = ""
    warnings: tuple[str, ...] = ()

    @property
    def healthy(self) -> bool:
        return not self.reason


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    """When a GPU is quarantined (no new work), and when it may come back by itself."""

    # Above this the GPU is quarantined; 0 disables the check.
    max_temperature_celsius: float = 90.0
    # More uncorrectable (volatile) ECC errors than this quarantine the GPU. The counter
    # only resets with the GPU, so such a GPU stays out until it is reset.
    max_uncorrectable_ecc: int = 0
    quarantine_xids: frozenset[int] = field(default=DEFAULT_QUARANTINE_XIDS)
    warn_xids: frozenset[int] = field(default=DEFAULT_WARN_XIDS)
    # A quarantined GPU whose samples stay clean this long returns (0: at the first).
    recovery_seconds: float = 600.0

    def __post_init__(self) -> None:
        both = self.quarantine_xids & self.warn_xids
        if both:
            raise ValueError(f"XIDs {sorted(both)} are listed to quarantine and to warn")
        if self.max_temperature_celsius < 0 or self.max_uncorrectable_ecc < 0:
            raise ValueError("health thresholds must be >= 0")
        if self.recovery_seconds < 0:
            raise ValueError("recovery_seconds must be >= 0")

    def classify(self, xid: int) -> XidAction:
        if xid in self.quarantine_xids:
            return XidAction.QUARANTINE
        if xid in self.warn_xids:
            return XidAction.WARN
        return XidAction.IGNORE

    def judge(self, sample: Sample) -> Verdict:
        """The verdict on one sample: the first reason to quarantine, if any."""
        reasons: list[str] = []
        warnings: list[str] = []
        if sample.failed:
            reasons.append("reported unhealthy by its node")
        t = sample.temperature_celsius
        if self.max_temperature_celsius and t is not None and t > self.max_temperature_celsius:
            reasons.append(f"temperature {t:g} °C above {self.max_temperature_celsius:g} °C")
        ecc = sample.uncorrectable_ecc
        if ecc is not None and ecc > self.max_uncorrectable_ecc:
            reasons.append(
                f"{ecc} uncorrectable ECC errors (more than {self.max_uncorrectable_ecc})"
            )
        for xid in sample.xids:
            action = self.classify(xid)
            if action == XidAction.QUARANTINE:
                reasons.append(xid_text(xid))
            elif action == XidAction.WARN:
                warnings.append(f"{xid_text(xid)}, usually the application's fault")
        return Verdict(reasons[0] if reasons else "", tuple(warnings))


def recovered(policy: HealthPolicy, healthy_since: float | None, now: float) -> bool:
    """A quarantined GPU clean since `healthy_since` may return at `now`."""
    return healthy_since is not None and now - healthy_since >= policy.recovery_seconds


def policy_from(
    *,
    max_temperature_celsius: float,
    max_uncorrectable_ecc: int,
    quarantine_xids: str | Iterable[int],
    warn_xids: str | Iterable[int],
    recovery_seconds: float,
) -> HealthPolicy:
    """A policy from config values (XID lists as "48,79" text or as codes)."""

    def codes(value: str | Iterable[int]) -> frozenset[int]:
        return parse_xids(value) if isinstance(value, str) else frozenset(value)

    return HealthPolicy(
        max_temperature_celsius=max_temperature_celsius,
        max_uncorrectable_ecc=max_uncorrectable_ecc,
        quarantine_xids=codes(quarantine_xids),
        warn_xids=codes(warn_xids),
        recovery_seconds=recovery_seconds,
    )
