"""Settings: defaults < TOML < environment < flags, and one clear error per bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from rmgrpc.config import ConfigError, Settings, example_toml, load_settings


def test_defaults() -> None:
    s = load_settings(env={})
    assert s == Settings()
    assert s.listen == "127.0.0.1:50051"
    # Production defaults: only real nodes, and no lease unless a request asks for one.
    assert s.simulated_nodes == 0 and s.default_lease_seconds == 0


def test_dev_defaults_sit_below_file_and_environment(tmp_path: Path) -> None:
    dev = {"simulated_nodes": 4}
    assert load_settings(env={}, defaults=dev).simulated_nodes == 4
    toml = tmp_path / "rm.toml"
    toml.write_text("[inventory]\nsimulated_nodes = 1\n")
    assert load_settings(str(toml), env={}, defaults=dev).simulated_nodes == 1
    env = {"RMGRPC_SIMULATED_NODES": "0"}
    assert load_settings(env=env, defaults=dev).simulated_nodes == 0


def test_precedence(tmp_path: Path) -> None:
    toml = tmp_path / "rm.toml"
    toml.write_text(
        '[server]\nlisten = "127.0.0.1:7000"\n[inventory]\nsimulated_nodes = 9\n'
        "simulated_gpus_per_node = 2\n"
    )
    s = load_settings(
        str(toml),
        env={"RMGRPC_SIMULATED_NODES": "3"},
        overrides={"listen": "127.0.0.1:8000", "db": None},
    )
    assert s.listen == "127.0.0.1:8000"  # flag beats file
    assert s.simulated_nodes == 3  # environment beats file
    assert s.simulated_gpus_per_node == 2  # file beats default
    assert s.db == "rmgrpc.db"  # a flag left unset changes nothing


def test_example_file_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "example.toml"
    path.write_text(example_toml())
    assert load_settings(str(path), env={}) == Settings()
    shipped = Path(__file__).resolve().parents[2] / "rmgrpc.example.toml"
    assert shipped.read_text() == example_toml(), "run `rmgrpc config > rmgrpc.example.toml`"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RMGRPC_SIMULATED_NODES": "lots"}, "simulated_nodes"),
        ({"RMGRPC_SIMULATED_NODES": "-1"}, "simulated_nodes"),
        ({"RMGRPC_LISTEN": "nohost"}, "listen"),
        (
            {"RMGRPC_NODE_LEASE_SECONDS": "5", "RMGRPC_HEARTBEAT_INTERVAL_SECONDS": "10"},
            "heartbeat_interval_seconds",
        ),
        ({"RMGRPC_NVML": "maybe"}, "nvml"),
        ({"RMGRPC_SQLITE_SYNCHRONOUS": "OFF"}, "sqlite_synchronous"),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env=env)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(str(tmp_path / "missing.toml"), env={})
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\nlisten=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(str(broken), env={})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[server]\ncolour = 'blue'\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        load_settings(str(unknown), env={})
    wrong_section = tmp_path / "wrong.toml"
    wrong_section.write_text("[store]\nlisten = '127.0.0.1:1'\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        load_settings(str(wrong_section), env={})
