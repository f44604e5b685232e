"""A lighter recording span on OpenTelemetry's SDK pipeline.

The SDK's own span costs about 45 µs of CPU to start and end on this server's hardware:
it validates and copies every attribute into a locked `BoundedAttributes`, makes a lock,
two bounded lists and, at the end, a second read-only copy for the processors. rmgrpc
wraps every RPC in a span, and at a few hundred microseconds per Allocate that alone
cost more than 10 % of the throughput. `LightSpan` records the same things — ids,
parent, kind, times, attributes, events, status — into plain slots and is itself the
`ReadableSpan` that the SDK's processors and exporters (batching, console, OTLP) receive,
so everything after `end()` is the SDK's. Sampling (the provider's sampler, parent-based)
and ids (its id generator) are the SDK's too; `LightTracerProvider` is an SDK
`TracerProvider` whose tracers make these spans.

What it leaves out: span limits (rmgrpc sets a handful of attributes per span; events
are capped at `MAX_EVENTS`) and links. Attribute values are cleaned by the SDK's rule
(`_clean`); `tests/unit/test_spans.py` runs the same scripts through both spans and
compares what the exporters receive.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import Decision, Sampler
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util.types import Attributes, AttributeValue

log = logging.getLogger(__name__)

MAX_EVENTS = 128
_PRIMITIVES = (str, bool, int, float)
_UNSET = Status(StatusCode.UNSET)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)


def _clean(value: object) -> Any:
    """An attribute value as the SDK keeps it (OpenTelemetry's AnyValue): primitives and
    bytes as they are, sequences as tuples, mappings as dicts with string keys, anything
    else as its str() if it has one, else None."""
    if value is None or isinstance(value, (*_PRIMITIVES, bytes)):
        return value
    if isinstance(value, Sequence):
        return tuple(_clean(v) for v in value)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if k and (isinstance(k, str) or _has_str(k)):
                out[str(k)] = _clean(v)
        return out
    log.warning("span attribute value of type %s kept as its text", type(value).__name__)
    return str(value) if _has_str(value) else None


def _has_str(value: object) -> bool:
    kind = type(value)
    return kind.__str__ is not object.__str__ or kind.__repr__ is not object.__repr__


def _keep(into: dict[str, Any], attributes: Attributes | Mapping[str, Any]) -> int:
    """Adds `attributes` cleaned; returns how many were dropped (empty keys, as the SDK)."""
    dropped = 0
    for key, value in (attributes or {}).items():
        if not key:
            dropped += 1
            continue
        into[key] = value if isinstance(value, _PRIMITIVES) else _clean(value)
    return dropped


class LightSpan(trace.Span, ReadableSpan):
    """A recording span that is its own read-only record once ended (see the module)."""

    def __init__(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, Any],
        tracer: LightTracer,
        start_time: int,
        dropped: int = 0,
    ) -> None:
        # ReadableSpan's fields, set directly: its __init__ would build a resource.
        self._name = name
        self._context = self._ctx = context
        self._parent = parent
        self._kind = kind
        self._attributes = self._attrs = attributes
        self._events: list[Event] = []
        self._links: Sequence[Link] = ()
        self._status = _UNSET
        self._start_time = start_time
        self._end_time: int | None = None
        self._resource = tracer.resource
        self._instrumentation_scope = tracer.scope
        self._instrumentation_info = None
        self._processor = tracer.processor
        self._dropped = dropped

    @property
    def dropped_attributes(self) -> int:
        return self._dropped

    # -- trace.Span ------------------------------------------------------------------

    def get_span_context(self) -> SpanContext:
        return self._ctx

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if self._end_time is not None:
            return
        if not key:
            self._dropped += 1  # the SDK drops empty keys
            return
        self._attrs[key] = value if isinstance(value, _PRIMITIVES) else _clean(value)

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(
        self, name: str, attributes: Attributes = None, timestamp: int | None = None
    ) -> None:
        if self._end_time is not None or len(self._events) >= MAX_EVENTS:
            return
        kept: dict[str, Any] = {}
        _keep(kept, attributes)
        self._events.append(Event(name, kept, timestamp or time.time_ns()))

    def add_link(self, context: SpanContext, attributes: Attributes = None) -> None:
        log.debug("span link to %s not recorded: rmgrpc's spans carry no links", context)

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # As the SDK: OK is final, and UNSET is never set.
        if self._end_time is not None or self._status.status_code is StatusCode.OK:
            return
        code = status.status_code if isinstance(status, Status) else status
        if code is StatusCode.UNSET:
            return
        self._status = status if isinstance(status, Status) else Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        # The SDK's event, with the semantic-convention keys.
        kind = type(exception)
        module = kind.__module__
        event: dict[str, Any] = {
            "exception.type": (
                f"{module}.{kind.__qualname__}"
                if module and module != "builtins"
                else kind.__qualname__
            ),
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        event.update(attributes or {})
        self.add_event("exception", event, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            log.debug("span %s ended twice", self._name)
            return
        self._end_time = end_time or time.time_ns()
        # Ended, nothing changes it any more: the processors get the span itself.
        self._processor.on_end(self)

    def __repr__(self) -> str:
        return f"LightSpan(name={self._name!r}, context={self._context!r})"


class LightTracer(trace.Tracer):
    """Makes `LightSpan`s with the provider's sampler, ids, resource and processors."""

    def __init__(self, provider: LightTracerProvider, scope: InstrumentationScope) -> None:
        self.sampler: Sampler = provider.sampler
        self.ids: IdGenerator = provider.id_generator
        self.resource: Resource = provider.resource
        self.processor: SpanProcessor = provider._active_span_processor
        self.scope = scope

    def start_span(
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        # As the SDK's Tracer.start_span: the parent from `context` (else the current
        # one), a new trace id for a root span, the sampler's decision, a new span id.
        parent: SpanContext | None = trace.get_current_span(context).get_span_context()
        if parent is None or not parent.is_valid:
            parent = None
            trace_id = self.ids.generate_trace_id()
        else:
            trace_id = parent.trace_id
        sampled = self.sampler.should_sample(context, trace_id, name, kind, attributes, links)
        decision = sampled.decision
        flags = _SAMPLED if decision == Decision.RECORD_AND_SAMPLE else _NOT_SAMPLED
        span_context = SpanContext(
            trace_id,
            self.ids.generate_span_id(),
            is_remote=False,
            trace_flags=flags,
            trace_state=sampled.trace_state,
        )
        if decision == Decision.DROP:
            return trace.NonRecordingSpan(span_context)
        kept: dict[str, Any] = {}
        # The sampler's attributes are the span's (it passes on, or adds to, those given).
        dropped = _keep(kept, sampled.attributes)
        span = LightSpan(
            name, span_context, parent, kind, kept, self, start_time or time.time_ns(), dropped
        )
        # rmgrpc's processors (batching) do nothing at start; called for any that do.
        # (Processors are typed for the SDK's span; a LightSpan reads as one.)
        self.processor.on_start(span, parent_context=context)  # type: ignore[arg-type]
        return span

    @contextlib.contextmanager
    def start_as_current_span(  # type: ignore[override]  # the API's decorator is private
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[trace.Span]:
        span = self.start_span(
            name, context, kind, attributes, links, start_time, record_exception,
            set_status_on_exception,
        )  # fmt: skip
        with trace.use_span(
            span,
            end_on_exit=end_on_exit,
            record_exception=record_exception,
            set_status_on_exception=set_status_on_exception,
        ) as current:
            yield current


class LightTracerProvider(TracerProvider):
    """An SDK `TracerProvider` (sampler, ids, resource, span processors, flush and
    shutdown all the SDK's) whose tracers make `LightSpan`s."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._light: dict[InstrumentationScope, LightTracer] = {}
        self._light_lock = threading.Lock()

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Attributes = None,
    ) -> trace.Tracer:
        if self._disabled:  # OTEL_SDK_DISABLED, as the SDK's provider honours it
            return trace.NoOpTracer()
        scope = InstrumentationScope(
            instrumenting_module_name, instrumenting_library_version or "", schema_url, attributes
        )
        with self._light_lock:
            tracer = self._light.get(scope)
            if tracer is None:
                tracer = self._light[scope] = LightTracer(self, scope)
        return tracer
