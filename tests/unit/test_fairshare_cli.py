"""`rmgrpcctl quota set` sends a lending limit and weight 0 (issue 9), and shows them."""

from __future__ import annotations

import pytest

from rmgrpc.v1 import resources_pb2
from tests.unit.test_client_cli import Fake, fake, run

__all__ = ["fake"]  # the fixture, used by name below


def test_lending_limit_and_weight_zero_flags(
    fake: Fake, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        capsys,
        "quota",
        "set",
        "org/team",
        "--guaranteed-gpus",
        "8",
        "--lending-limit-gpus",
        "2",
        "--weight",
        "0",
    )
    assert code == 0
    request = fake.last("SetQuota")
    assert request.quota.lending_limit == resources_pb2.Resources(gpus=2)
    assert request.quota.HasField("weight") and request.quota.weight == 0
    assert {"lending_limit.gpus", "weight", "guaranteed.gpus"} <= set(request.update_mask.paths)
    assert "lending:    gpus=2" in out and "weight:     0" in out

    # Without the flags nothing about them is sent: weight keeps the server's default.
    run(capsys, "quota", "set", "org/team", "--replace", "--limit-gpus", "4")
    request = fake.last("SetQuota")
    assert not request.quota.HasField("weight")
    assert not request.quota.HasField("lending_limit")
