"""Request validation: every client mistake becomes a field violation, all reported at once.

Validators read a request message and either return the domain value it asks for
or raise InvalidArgument listing every bad field (with its JSON path, e.g.
`shape.gpus`), before anything is changed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

from rmgrpc.errors import FailedPrecondition, FieldViolation, InvalidArgument

MAX_COUNT = 4096
MAX_GPUS_PER_REPLICA = 64
MAX_CPU_MILLIS = 10_000_000  # 10,000 cores
MAX_MEMORY_BYTES = 1 << 50  # 1 PiB
MAX_PRIORITY = 1_000_000
MAX_DURATION_SECONDS = 366 * 86400
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
MAX_LABELS = 64

_SEGMENT = r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?"
TENANT_RE = re.compile(rf"^{_SEGMENT}(/{_SEGMENT}){{0,7}}$")
ID_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._:-]{0,251}[A-Za-z0-9])?$")
LABEL_KEY_RE = re.compile(
    r"^([A-Za-z0-9.-]{1,253}/)?[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$"
)
LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$")
PRINTABLE_RE = re.compile(r"^[^\x00-\x1f\x7f]*$")


class Violations:
    """Collects field violations; `raise_if_any` ends validation with all of them."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def check(self, ok: bool, field: str, description: str) -> bool:
        if not ok:
            self.add(field, description)
        return ok

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items)

    # -- common checks -----------------------------------------------------

    def tenant(self, field: str, value: str, required: bool = True) -> None:
        if not value:
            if required:
                self.add(field, "is required")
            return
        if len(value) > 253:
            self.add(field, f"must be at most 253 characters (got {len(value)})")
        elif not TENANT_RE.match(value):
            self.add(
                field,
                "must be one or more '/'-separated names of letters, digits, '.', '_' or '-' "
                "(e.g. 'org/team')",
            )

    def identifier(self, field: str, value: str, required: bool = True, kind: str = "id") -> None:
        if not value:
            if required:
                self.add(field, "is required")
            return
        if len(value) > 253:
            self.add(field, f"must be at most 253 characters (got {len(value)})")
        elif not ID_RE.match(value):
            self.add(field, f"is not a valid {kind}: use letters, digits, '.', '_', ':' or '-'")

    def text(self, field: str, value: str, max_len: int) -> None:
        if len(value) > max_len:
            self.add(field, f"must be at most {max_len} characters (got {len(value)})")
        elif not PRINTABLE_RE.match(value):
            self.add(field, "must not contain control characters")

    def int_range(self, field: str, value: int, lo: int, hi: int) -> None:
        if not lo <= value <= hi:
            self.add(field, f"must be between {lo} and {hi} (got {value})")

    def labels(self, field: str, labels: Mapping[str, str], max_entries: int = MAX_LABELS) -> None:
        if len(labels) > max_entries:
            self.add(field, f"must have at most {max_entries} entries (got {len(labels)})")
            return
        for key in sorted(labels):
            if not LABEL_KEY_RE.match(key):
                self.add(f"{field}[{key[:64]!r}]", "is not a valid label key")
            elif not LABEL_VALUE_RE.match(labels[key]):
                self.add(
                    f"{field}[{key!r}]",
                    "label values are at most 63 letters, digits, '.', '_' or '-'",
                )

    def enum_values(
        self, field: str, values: Iterable[int], known: Iterable[int], allow_unspecified: bool
    ) -> None:
        allowed = set(known)
        for i, value in enumerate(values):
            self.enum_value(f"{field}[{i}]", value, allowed, allow_unspecified)

    def enum_value(
        self, field: str, value: int, known: Iterable[int], allow_unspecified: bool
    ) -> None:
        if value == 0:
            if not allow_unspecified:
                self.add(field, "must not be UNSPECIFIED")
        elif value not in set(known):
            self.add(field, f"unknown value {value}")

    def page_size(self, field: str, value: int, max_size: int = MAX_PAGE_SIZE) -> int:
        if value < 0 or value > max_size:
            self.add(field, f"must be between 0 and {max_size} (got {value})")
            return DEFAULT_PAGE_SIZE
        return value or min(DEFAULT_PAGE_SIZE, max_size)

    def finite(self, field: str, value: float, lo: float = 0.0, hi: float = math.inf) -> None:
        """A real number in [lo, hi]: NaN and infinities are never a measurement."""
        if math.isnan(value) or math.isinf(value):
            self.add(field, f"must be a finite number (got {value})")
        elif not lo <= value <= hi:
            self.add(field, f"must be between {lo:g} and {hi:g} (got {value:g})")

    def size(self, field: str, count: int, most: int, what: str = "entries") -> bool:
        """At most `most` entries in a list or map; False (and a violation) above."""
        return self.check(count <= most, field, f"must have at most {most} {what} (got {count})")


def refuse_unissued_revision(start_revision: int, current: int) -> None:
    """A watch's `start_revision` must have been issued: a List's revision may still be
    committing, so its + 1 is fine; past that, the client holds a revision this server
    never issued (another cluster, a lost database) and must list again rather than wait
    for history that differs."""
    if start_revision > current + 1:
        raise FailedPrecondition(
            "REVISION_NOT_YET_ISSUED",
            f"revision:{start_revision}",
            f"start_revision {start_revision} is past the current revision "
            f"{current}: list again and watch from the list's revision + 1 "
            "(or 0 for what happens from now on)",
        )
