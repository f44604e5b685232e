"""The update-mask merge of SetQuota, as a property: after a merge, every field a mask
path covers equals the request's, and every other field the stored quota's."""

from __future__ import annotations

from typing import Any

from google.protobuf.field_mask_pb2 import FieldMask
from hypothesis import given
from hypothesis import strategies as st

from rmgrpc.services import validate as val
from rmgrpc.services.quota import apply_mask, mask_paths
from rmgrpc.v1 import quota_pb2
from rmgrpc.v1.resources_pb2 import Resources
from rmgrpc_client._requests import quota_update_mask

LEAVES = [
    "parent",
    "weight",
    "budget.amount",
    "budget.period_seconds",
    *(
        f"{kind}.{name}"
        for kind in ("guaranteed", "limit")
        for name in ("gpus", "cpu_millis", "memory_bytes", "gpus_by_model")
    ),
]
PATHS = [*LEAVES, "guaranteed", "limit", "budget"]

_count = st.none() | st.integers(0, 64)
_resources = st.builds(
    lambda g, c, m, by: Resources(gpus=g, cpu_millis=c, memory_bytes=m, gpus_by_model=by),
    _count,
    _count,
    _count,
    st.dictionaries(st.sampled_from(["H100", "A100"]), st.integers(0, 8), max_size=2),
)
_quotas = st.builds(
    lambda parent, g, lim, w, budget: quota_pb2.Quota(
        tenant="org/team", parent=parent, guaranteed=g, limit=lim, weight=w, budget=budget
    ),
    st.sampled_from(["", "org", "other"]),
    _resources,
    _resources,
    st.sampled_from([0.0, 1.0, 2.5]),
    st.none() | st.builds(quota_pb2.Budget, amount=st.floats(0, 100), period_seconds=_count),
)


def _leaf(q: quota_pb2.Quota, path: str) -> Any:
    """A leaf's value as read (defaults inside unset messages), None for an optional
    field that is unset."""
    *outer, name = path.split(".")
    msg: Any = q
    for part in outer:
        msg = getattr(msg, part)
    value = getattr(msg, name)
    if name == "gpus_by_model":
        return dict(value)
    field = msg.DESCRIPTOR.fields_by_name[name]
    if field.has_presence and not msg.HasField(name):
        return None
    return value


@given(_quotas, _quotas, st.lists(st.sampled_from(PATHS), max_size=4, unique=True))
def test_masked_fields_come_from_the_request_and_the_rest_stay(
    stored: quota_pb2.Quota, request: quota_pb2.Quota, mask: list[str]
) -> None:
    v = val.Violations()
    paths = mask_paths(v, FieldMask(paths=mask))
    assert not v.items
    merged = quota_pb2.Quota()
    merged.CopyFrom(stored)
    apply_mask(merged, request, paths)
    for leaf in LEAVES:
        covered = any(leaf == p or leaf.startswith(p + ".") for p in mask)
        assert _leaf(merged, leaf) == _leaf(request if covered else stored, leaf), (leaf, mask)
    assert merged.tenant == stored.tenant
    # A budget comes from the request when named whole; naming one of its fields sets it
    # when the request has one and never creates an empty one.
    if "budget" in mask:
        assert merged.HasField("budget") == request.HasField("budget")
    elif any(p.startswith("budget.") for p in mask):
        assert merged.HasField("budget") == (
            stored.HasField("budget") or request.HasField("budget")
        )
    else:
        assert merged.HasField("budget") == stored.HasField("budget")


@given(_resources, _resources, st.none() | st.floats(0.5, 9), st.none() | st.just("org"))
def test_the_client_mask_names_exactly_the_given_fields(
    guaranteed: Resources, limit: Resources, weight: float | None, parent: str | None
) -> None:
    mask = quota_update_mask(
        parent=parent, guaranteed=guaranteed, limit=limit, weight=weight, budget=None
    )
    stored = quota_pb2.Quota(tenant="org/team", weight=7, limit=Resources(gpus=99))
    merged = quota_pb2.Quota()
    merged.CopyFrom(stored)
    v = val.Violations()
    apply_mask(
        merged,
        quota_pb2.Quota(tenant="org/team", guaranteed=guaranteed, limit=limit, weight=weight or 0),
        mask_paths(v, FieldMask(paths=mask)),
    )
    assert merged.weight == (weight if weight is not None else 7)
    assert merged.limit.gpus == (limit.gpus if limit.HasField("gpus") else 99)
    for name in ("cpu_millis", "memory_bytes"):
        assert merged.guaranteed.HasField(name) == guaranteed.HasField(name)
