"""The light span records what the SDK's span records, and samples as it samples.

The same script of span operations runs on the SDK's own `TracerProvider` and on
`LightTracerProvider`; the spans their processors receive must read the same through
every `ReadableSpan` property an exporter uses (ids and times aside, which are random
and the clock's)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler
from opentelemetry.trace import SpanContext, SpanKind, StatusCode, TraceFlags

from rmgrpc.spans import LightSpan, LightTracerProvider

Script = Callable[[trace.Tracer], None]


def run(
    provider_class: type[TracerProvider], script: Script, sampler: Sampler = ALWAYS_ON
) -> list[ReadableSpan]:
    exported = InMemorySpanExporter()
    provider = provider_class(
        resource=Resource.create({"service.name": "rmgrpc"}), sampler=ParentBased(sampler)
    )
    provider.add_span_processor(SimpleSpanProcessor(exported))
    script(provider.get_tracer("rmgrpc"))
    provider.shutdown()
    return list(exported.get_finished_spans())


def record(span: ReadableSpan, ids: dict[int, int]) -> dict[str, Any]:
    """What an exporter reads of a span, with ids renumbered by first appearance."""

    def ref(ctx: SpanContext | None) -> tuple[int, int, bool] | None:
        if ctx is None:
            return None
        return (
            ids.setdefault(ctx.trace_id, len(ids)),
            ids.setdefault(ctx.span_id, len(ids)),
            ctx.trace_flags.sampled,
        )

    assert span.start_time is not None and span.end_time is not None
    assert span.start_time <= span.end_time
    return {
        "name": span.name,
        "context": ref(span.context),
        "parent": ref(span.parent),
        "kind": span.kind,
        "attributes": dict(span.attributes or {}),
        "events": [(e.name, _stackless(e.attributes)) for e in span.events],
        "links": list(span.links),
        "status": (span.status.status_code, span.status.description),
        # Each `Resource.create` draws its own service.instance.id.
        "resource": {k: v for k, v in span.resource.attributes.items() if "instance" not in k},
        "scope": span.instrumentation_scope,
        "dropped": (span.dropped_attributes, span.dropped_events, span.dropped_links),
    }


def _stackless(attributes: Any) -> dict[str, Any]:
    """An event's attributes; a stack trace only as its last line (the frames between
    differ: each tracer's own)."""
    out = dict(attributes or {})
    if "exception.stacktrace" in out:
        out["exception.stacktrace"] = str(out["exception.stacktrace"]).splitlines()[-1]
    return out


def same(script: Script, sampler: Sampler = ALWAYS_ON) -> list[ReadableSpan]:
    sdk = run(TracerProvider, script, sampler)
    light = run(LightTracerProvider, script, sampler)
    assert all(isinstance(s, LightSpan) for s in light)
    assert [record(s, {}) for s in light] == [record(s, {}) for s in sdk]
    return light


VALUES = st.one_of(
    st.none(),
    st.text(max_size=5),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False),
    st.lists(st.integers(0, 9), max_size=3),
    st.lists(st.text(max_size=3), max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(0, 9), max_size=2),
)
ATTRIBUTES = st.dictionaries(st.sampled_from(["a", "b", "rpc.method", "n", ""]), VALUES, max_size=4)
STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("attr"), st.sampled_from(["a", "z"]), VALUES),
        st.tuples(st.just("event"), st.text(max_size=4), ATTRIBUTES),
        st.tuples(st.just("status"), st.sampled_from(list(StatusCode)), st.text(max_size=4)),
        st.tuples(st.just("rename"), st.text(max_size=4), st.none()),
        st.tuples(st.just("child"), st.sampled_from(list(SpanKind)), ATTRIBUTES),
    ),
    max_size=6,
)


@settings(max_examples=150, deadline=None)
@given(steps=STEPS, start=ATTRIBUTES, kind=st.sampled_from(list(SpanKind)))
def test_a_light_span_exports_what_the_sdk_span_exports(
    steps: list[tuple[str, Any, Any]], start: dict[str, Any], kind: SpanKind
) -> None:
    def script(tracer: trace.Tracer) -> None:
        with tracer.start_as_current_span("rpc", kind=kind, attributes=start) as span:
            for op, x, y in steps:
                if op == "attr":
                    span.set_attribute(x, y)
                elif op == "event":
                    span.add_event(x, y)
                elif op == "status":
                    # The SDK keeps a description only with ERROR (and warns otherwise).
                    span.set_status(x, y if x == StatusCode.ERROR else None)
                elif op == "rename":
                    span.update_name(x)
                else:
                    with tracer.start_as_current_span("child", kind=x, attributes=y):
                        pass
        # Changes after the end are ignored by both.
        span.set_attribute("late", 1)
        span.add_event("late")
        span.end()

    same(script)


def test_values_beyond_the_primitives_are_cleaned_as_the_sdk_cleans_them() -> None:
    class Named:
        def __str__(self) -> str:
            return "named"

    def script(tracer: trace.Tracer) -> None:
        span = tracer.start_span("x", attributes={"ok": 1, "map": {"a": [1, 2]}, "": 3})  # type: ignore[dict-item]
        span.set_attribute("mixed", [1, "a"])  # type: ignore[list-item]
        span.set_attribute("named", Named())  # type: ignore[arg-type]
        span.set_attribute("bare", object())  # type: ignore[arg-type]
        span.set_attribute("bytes", b"x")  # type: ignore[arg-type]
        span.set_attribute("", 1)
        span.end()

    (span,) = same(script)
    assert dict(span.attributes or {}) == {
        "ok": 1,
        "map": {"a": (1, 2)},
        "mixed": (1, "a"),
        "named": "named",
        "bare": None,
        "bytes": b"x",
    }


def test_an_exception_and_a_failed_status_are_recorded_as_the_sdk_records_them() -> None:
    def script(tracer: trace.Tracer) -> None:
        with pytest.raises(ValueError), tracer.start_as_current_span("boom"):
            raise ValueError("bad shape")

    (span,) = same(script)
    assert span.status.status_code == StatusCode.ERROR
    (event,) = span.events
    assert event.name == "exception"
    attrs = event.attributes or {}
    assert attrs["exception.type"] == "ValueError" and attrs["exception.message"] == "bad shape"
    assert "Traceback" in str(attrs["exception.stacktrace"])


def test_the_current_span_is_the_parent_and_logs_see_it() -> None:
    def script(tracer: trace.Tracer) -> None:
        with tracer.start_as_current_span("outer") as outer:
            assert trace.get_current_span() is outer
            inner = tracer.start_span("inner")
            inner.end()
        assert trace.get_current_span() is not outer

    inner, outer = same(script)
    assert inner.parent is not None and outer.context is not None
    assert inner.parent.span_id == outer.context.span_id
    assert inner.context is not None and inner.context.trace_id == outer.context.trace_id


@pytest.mark.parametrize("sampled", [True, False])
def test_sampling_follows_a_remote_parent_and_the_ratio_for_roots(sampled: bool) -> None:
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    remote = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=flags)
    parent = trace.set_span_in_context(trace.NonRecordingSpan(remote))

    def script(tracer: trace.Tracer) -> None:
        child = tracer.start_span("child", context=parent)
        assert child.is_recording() is sampled
        assert child.get_span_context().trace_id == 0xABC
        child.end()
        root = tracer.start_span("root")  # the ratio (here: never) decides a new trace
        assert not root.is_recording() and not root.get_span_context().trace_flags.sampled
        root.end()

    spans = same(script, ALWAYS_OFF)
    assert [s.name for s in spans] == (["child"] if sampled else [])


def test_a_span_is_handed_to_the_processors_once() -> None:
    def script(tracer: trace.Tracer) -> None:
        span = tracer.start_span("once")
        span.end()
        span.end()

    assert [s.name for s in same(script)] == ["once"]


def test_start_as_current_span_can_leave_the_span_open() -> None:
    kept: list[trace.Span] = []

    def script(tracer: trace.Tracer) -> None:
        with tracer.start_as_current_span("open", end_on_exit=False) as span:
            kept.append(span)
        assert span.is_recording()
        token = otel_context.attach(trace.set_span_in_context(span))
        otel_context.detach(token)
        span.end()

    assert [s.name for s in same(script)] == ["open"]
