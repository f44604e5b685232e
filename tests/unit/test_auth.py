"""The role rules (`authorize`), the tokens file and authentication (`auth`), and the
exposure rules of `security`, without a server."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st

from rmgrpc import auth as auth_module
from rmgrpc import authorize, cli, limits
from rmgrpc.auth import (
    AuthConfigError,
    Authenticator,
    Principal,
    Role,
    Unauthenticated,
    hash_token,
    is_open,
    load_principals,
)
from rmgrpc.errors import NotFound, PermissionDenied
from rmgrpc.model import Allocation, Placement, Shape
from rmgrpc.security import SecurityError, from_settings, is_loopback
from rmgrpc.state import in_subtree
from tests.conftest import make_settings

ADMIN = Principal("ops", Role.ADMIN)
VIEWER = Principal("dash", Role.VIEWER)
TENANT = Principal("research", Role.TENANT, tenant="org/a")
AGENT = Principal("box1", Role.AGENT, node="box-1")
FLEET = Principal("fleet", Role.AGENT, node="box-*")


def _alloc(tenant: str, *nodes: str) -> Allocation:
    return Allocation(
        id="a-1",
        tenant=tenant,
        count=max(1, len(nodes)),
        shape=Shape(cpu_millis=1),
        placements=tuple(Placement(n) for n in nodes),
    )


# -- method level ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("principal", "method", "allowed"),
    [
        (ADMIN, "/rmgrpc.v1.QuotaService/SetQuota", True),
        (TENANT, "/rmgrpc.v1.QuotaService/SetQuota", False),
        (VIEWER, "/rmgrpc.v1.QuotaService/SetQuota", False),
        (VIEWER, "/rmgrpc.v1.QuotaService/ListQuotas", True),
        (VIEWER, "/rmgrpc.v1.AllocatorService/Allocate", False),
        (TENANT, "/rmgrpc.v1.AllocatorService/Allocate", True),
        (AGENT, "/rmgrpc.v1.AllocatorService/Allocate", False),
        (AGENT, "/rmgrpc.v1.GpuManagerService/Heartbeat", True),
        (AGENT, "/rmgrpc.v1.GpuManagerService/CordonNode", False),
        (TENANT, "/rmgrpc.v1.GpuManagerService/ListGpus", False),
        (AGENT, "/rmgrpc.v1.AllocatorService/WatchAllocations", True),
        # A method nobody listed (a service added later) is for admins only.
        (ADMIN, "/rmgrpc.v1.NewService/Anything", True),
        (VIEWER, "/rmgrpc.v1.NewService/GetAnything", False),
        (TENANT, "/rmgrpc.v1.NewService/Anything", False),
    ],
)
def test_method_rules(principal: Principal, method: str, allowed: bool) -> None:
    if allowed:
        authorize.method(principal, method)
    else:
        with pytest.raises(PermissionDenied) as caught:
            authorize.method(principal, method)
        assert caught.value.action == method
        assert caught.value.principal == str(principal)


def test_viewers_may_call_every_read_and_no_write() -> None:
    for method in authorize.READS:
        authorize.method(VIEWER, method)
    for method in authorize.WRITES:
        with pytest.raises(PermissionDenied):
            authorize.method(VIEWER, method)


def test_auth_off_allows_everything() -> None:
    authorize.method(None, "/rmgrpc.v1.QuotaService/SetQuota")
    authorize.write_tenant(None, "anyone")
    authorize.node(None, "any-node")
    assert authorize.allocation_scope(None, "", "") == ("", "")
    assert authorize.can_see_allocation(None, _alloc("x"))


def test_health_and_reflection_are_open() -> None:
    assert is_open("/grpc.health.v1.Health/Check")
    assert is_open("/grpc.health.v1.Health/Watch")
    assert is_open("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
    assert is_open("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert not is_open("/rmgrpc.v1.AllocatorService/Allocate")
    assert not is_open("/grpc.health.v1.HealthX/Check")


# -- tenants -----------------------------------------------------------------------------------


def test_tenant_sees_its_subtree_and_no_sibling_with_a_longer_name() -> None:
    assert authorize.can_read_tenant(TENANT, "org/a")
    assert authorize.can_read_tenant(TENANT, "org/a/x")
    assert not authorize.can_read_tenant(TENANT, "org/ab")
    assert not authorize.can_read_tenant(TENANT, "org")
    assert not authorize.can_read_tenant(TENANT, "")
    assert not authorize.can_read_tenant(AGENT, "org/a")
    assert authorize.can_read_tenant(VIEWER, "org/ab")


def test_allocations_of_others_are_not_found() -> None:
    authorize.allocation(TENANT, _alloc("org/a/x"))
    for other in ("org/ab", "org", "org/b"):
        with pytest.raises(NotFound) as caught:
            authorize.allocation(TENANT, _alloc(other))
        # Word for word what an unknown id gets from the engine.
        assert str(caught.value) == str(NotFound("allocation", "a-1"))


def test_agents_see_allocations_on_their_nodes() -> None:
    assert authorize.can_see_allocation(AGENT, _alloc("t", "box-1"))
    assert not authorize.can_see_allocation(AGENT, _alloc("t", "box-10"))
    assert not authorize.can_see_allocation(AGENT, _alloc("t"))  # pending: on no node
    assert authorize.can_see_allocation(FLEET, _alloc("t", "other", "box-7"))


def test_write_tenant() -> None:
    authorize.write_tenant(TENANT, "org/a")
    authorize.write_tenant(TENANT, "org/a/job")
    authorize.write_tenant(ADMIN, "anyone")
    for principal, tenant in ((TENANT, "org/ab"), (TENANT, "org"), (VIEWER, "org/a")):
        with pytest.raises(PermissionDenied):
            authorize.write_tenant(principal, tenant)


tenant_names = st.lists(st.sampled_from(["org", "a", "ab", "b", "x"]), min_size=0, max_size=3).map(
    "/".join
)


@given(own=tenant_names.filter(bool), asked=tenant_names)
def test_a_tenant_scope_is_never_wider_than_its_subtree(own: str, asked: str) -> None:
    """Whatever filter a tenant asks for, the filter that runs covers only tenants of its
    own subtree, and all of what it asked for that lies inside it."""
    principal = Principal("t", Role.TENANT, tenant=own)
    try:
        scope = authorize.tenant_scope(principal, asked)
    except PermissionDenied:
        # Refused only when what it asked for and its own subtree share nothing.
        assert asked and not in_subtree(asked, own) and not in_subtree(own, asked)
        return
    assert in_subtree(scope, own)
    probe_tenants = {own, f"{own}/x", f"{own}x", asked, f"{asked}/x", "org", "org/ab"}
    for tenant in probe_tenants:
        if in_subtree(tenant, scope):
            assert in_subtree(tenant, own), (own, asked, scope, tenant)
        if tenant and in_subtree(tenant, own) and in_subtree(tenant, asked):
            assert in_subtree(tenant, scope)


# -- nodes -------------------------------------------------------------------------------------


def test_agent_node_rules() -> None:
    authorize.node(AGENT, "box-1")
    authorize.node(FLEET, "box-42")
    for principal, node_id in ((AGENT, "box-2"), (AGENT, "box-1x"), (FLEET, "cpu-1"), (AGENT, "")):
        with pytest.raises(PermissionDenied):
            authorize.node(principal, node_id)
    assert authorize.node_scope(AGENT, "") == "box-1"
    assert authorize.node_scope(FLEET, "box-3") == "box-3"
    with pytest.raises(PermissionDenied):
        authorize.node_scope(FLEET, "")  # a pattern cannot stand for one node
    assert authorize.node_scope(ADMIN, "") == ""


# -- the tokens file and authentication -------------------------------------------------------


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "tokens.toml"
    path.write_text(text)
    return str(path)


GOOD = f"""
[[principal]]
name = "ops"
role = "admin"
token_sha256 = "{hash_token("s3cret-admin")}"

[[principal]]
name = "research"
role = "tenant"
tenant = "org/a"
token_sha256 = "{hash_token("s3cret-tenant")}"
san = "research.example.com"

[[principal]]
name = "fleet"
role = "agent"
node = "box-*"
san = "spiffe://example.com/agent"
"""


def test_tokens_file_and_authentication(tmp_path: Path) -> None:
    auth = Authenticator(_write(tmp_path, GOOD))
    assert auth.authenticate([("authorization", "Bearer s3cret-admin")], {}) == Principal(
        "ops", Role.ADMIN
    )
    assert auth.authenticate([("authorization", "bearer  s3cret-tenant ")], {}).tenant == "org/a"
    sans = {"x509_subject_alternative_name": [b"other.example.com", b"research.example.com"]}
    assert auth.authenticate([], sans).name == "research"
    # The token speaks for the caller when both are there.
    assert auth.authenticate([("authorization", "Bearer s3cret-admin")], sans).name == "ops"
    for metadata, context, message in [
        ([], {}, "credentials required"),
        ([("authorization", "Bearer nope")], {}, "unknown or revoked"),
        ([("authorization", "Basic czNjcmV0")], {}, "Bearer"),
        ([("authorization", "Bearer ")], {}, "Bearer"),
        ([], {"x509_subject_alternative_name": [b"stranger.example.com"]}, "maps to no"),
    ]:
        with pytest.raises(Unauthenticated, match=message):
            auth.authenticate(metadata, context)
    assert "s3cret" not in Path(auth.path).read_text()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[principal]]\nname = 'x'\nrole = 'wizard'\ntoken_sha256 = '" + "0" * 64 + "'", "role"),
        ("[[principal]]\nname = 'x'\nrole = 'tenant'\ntoken_sha256 = '" + "0" * 64 + "'", "tenant"),
        ("[[principal]]\nname = 'x'\nrole = 'tenant'\ntenant = '/'\nsan = 'a'", "root"),
        ("[[principal]]\nname = 'x'\nrole = 'agent'\nsan = 'a'", "node"),
        ("[[principal]]\nname = 'x'\nrole = 'admin'\ntenant = 'a'\nsan = 'a'", "only tenant"),
        ("[[principal]]\nname = 'x'\nrole = 'admin'\ntoken_sha256 = 'plaintext'", "64 hex"),
        ("[[principal]]\nname = 'x'\nrole = 'admin'", "token_sha256, san"),
        ("[[principal]]\nrole = 'admin'\nsan = 'a'", "name"),
        ("[[principal]]\nname = 'x'\nrole = 'admin'\nsan = 'a'\ncolour = 'red'", "unknown key"),
        (
            "[[principal]]\nname='x'\nrole='admin'\nsan='a'\n[[principal]]\nname='y'\nrole='viewer'\n"
            "san='a'",
            "twice",
        ),
        ("[tokens]\nx = 1", "unknown table"),
        ("not toml [", "not valid TOML"),
    ],
)
def test_bad_tokens_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(AuthConfigError, match=message):
        load_principals(_write(tmp_path, text))


def test_reload_swaps_the_set_and_keeps_it_on_a_bad_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _write(tmp_path, GOOD)
    auth = Authenticator(path)
    revoked = [("authorization", "Bearer s3cret-admin")]
    Path(path).write_text(GOOD.replace(hash_token("s3cret-admin"), hash_token("rotated")))
    assert auth.reload()
    with pytest.raises(Unauthenticated):
        auth.authenticate(revoked, {})
    assert auth.authenticate([("authorization", "Bearer rotated")], {}).name == "ops"
    Path(path).write_text("broken [")
    with caplog.at_level(logging.ERROR, "rmgrpc.auth"):
        assert not auth.reload()
    assert "previous one stays in force" in caplog.text
    assert auth.authenticate([("authorization", "Bearer rotated")], {}).name == "ops"


def test_missing_tokens_file(tmp_path: Path) -> None:
    with pytest.raises(AuthConfigError, match="cannot read tokens file"):
        Authenticator(str(tmp_path / "absent.toml"))


# -- exposure ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("localhost", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("[::]", False),
        ("10.0.0.5", False),
        ("example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_no_auth_off_loopback_is_refused_unless_insecure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(SecurityError, match="--insecure"):
        from_settings(make_settings(tmp_path, listen="0.0.0.0:0"))
    with caplog.at_level(logging.WARNING, "rmgrpc.security"):
        protection = from_settings(make_settings(tmp_path, listen="0.0.0.0:0", insecure=True))
    assert protection.authenticator is None
    assert "INSECURE" in caplog.text
    # Said once serving (a start refused for another reason prints only that reason).
    assert "loopback only" in from_settings(make_settings(tmp_path)).notice


def test_tokens_make_any_address_acceptable(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD)
    protection = from_settings(make_settings(tmp_path, listen="0.0.0.0:0", tokens_file=path))
    assert protection.authenticator is not None
    assert len(protection.interceptors()) == 1


def test_unusable_files_stop_start_up(tmp_path: Path) -> None:
    with pytest.raises(SecurityError, match="tokens file"):
        from_settings(make_settings(tmp_path, tokens_file=str(tmp_path / "absent.toml")))
    with pytest.raises(SecurityError, match="cannot read"):
        from_settings(
            make_settings(
                tmp_path, cert_file=str(tmp_path / "none.pem"), key_file=str(tmp_path / "k.pem")
            )
        )


# -- rmgrpc hash-token -------------------------------------------------------------------------


def test_hash_token_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret-admin\n"))
    assert cli.main(["hash-token"]) == 0
    assert capsys.readouterr().out.strip() == hash_token("s3cret-admin")
    assert cli.main(["hash-token", "--generate"]) == 0
    lines = dict(line.split(" = ", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["token_sha256"] == f'"{hash_token(lines["token"])}"'
    assert len(lines["token"]) >= 40
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert cli.main(["hash-token"]) == 2


def test_mutual_tls_alone_counts_as_authentication(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Client certificates authenticate the transport: a public address is accepted, with
    a warning that every certificate the CA signed may do everything."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    files = {"cert_file": tmp_path / "c.pem", "key_file": tmp_path / "k.pem"}
    files["client_ca_file"] = tmp_path / "ca.pem"
    files["cert_file"].write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
    files["key_file"].write_bytes(cert.private_key_pem.bytes())
    files["client_ca_file"].write_bytes(ca.cert_pem.bytes())
    settings = make_settings(
        tmp_path, listen="0.0.0.0:0", **{name: str(path) for name, path in files.items()}
    )
    with caplog.at_level(logging.WARNING, "rmgrpc.security"):
        protection = from_settings(settings)
    assert protection.interceptors() == []
    assert protection.certificates is not None and protection.certificates.mutual
    assert "every certificate" in caplog.text


def test_per_principal_limits_count_the_principal() -> None:
    """Watch-stream limits count an authenticated principal wherever it connects from."""

    class Context:
        def peer(self) -> str:
            return "ipv4:10.0.0.1:5000"

    assert limits.principal_key(Context()) == "ipv4:10.0.0.1"
    token = auth_module._CURRENT.set(TENANT)
    try:
        assert limits.principal_key(Context()) == "principal:tenant:research"
    finally:
        auth_module._CURRENT.reset(token)
