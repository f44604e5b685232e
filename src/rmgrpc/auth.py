"""Who is asking: principals, the tokens file, and the interceptor that authenticates calls.

A principal is a name and a role (`admin`; `tenant` with the root of its tenant subtree;
`agent` with its node id or an `fnmatch` pattern of node ids; `viewer`). The tokens file
(`[auth] tokens_file`, TOML) lists them; a principal is reached by a bearer token, of
which only the SHA-256 is stored (`rmgrpc hash-token` makes one), and/or, over mutual
TLS, by a subject alternative name of the client certificate:

    [[principal]]
    name = "research"
    role = "tenant"
    tenant = "ml/research"
    token_sha256 = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"

    [[principal]]
    name = "gpu-box-1"
    role = "agent"
    node = "gpu-box-1"
    san = "gpu-box-1.example.com"

`Authenticator.reload()` (SIGHUP) swaps the whole set at once; a file that does not load
leaves the previous set in force. Calls are authenticated when they start, so a revoked
token is refused on the next call while streams already open keep running.

`AuthInterceptor` authenticates every RPC but health and reflection, asks `authorize`
whether the principal's role may call the method at all, and makes the principal the
`current()` one for the handler; per-resource checks are in `authorize`.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import hashlib
import inspect
import logging
import re
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_status import rpc_status

from rmgrpc.errors import PermissionDenied

log = logging.getLogger("rmgrpc.auth")
audit = logging.getLogger("rmgrpc.audit")

# Probes and tooling must work without credentials.
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class Role(enum.StrEnum):
    ADMIN = "admin"
    TENANT = "tenant"
    AGENT = "agent"
    VIEWER = "viewer"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. `tenant` is set for tenants, `node` for agents."""

    name: str
    role: Role
    tenant: str = ""
    node: str = ""

    def __str__(self) -> str:
        scope = self.tenant or self.node
        return f"{self.role}:{self.name}" + (f"[{scope}]" if scope else "")


class AuthConfigError(Exception):
    """The tokens file cannot be used; the message names the file and the entry."""


def hash_token(token: str) -> str:
    """What the tokens file stores for `token`: its SHA-256, hex. Tokens are long random
    strings (`rmgrpc hash-token --generate`), so an unsalted hash is not guessable."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principals:
    """One loaded tokens file: principals by token hash and by certificate SAN."""

    by_token: Mapping[str, Principal] = field(default_factory=dict)
    by_san: Mapping[str, Principal] = field(default_factory=dict)


def load_principals(path: str) -> Principals:
    """Reads and checks the tokens file at `path`; raises AuthConfigError."""
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except OSError as exc:
        raise AuthConfigError(f"cannot read tokens file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise AuthConfigError(f"tokens file {path} is not valid TOML: {exc}") from None
    unknown = set(doc) - {"principal"}
    if unknown:
        raise AuthConfigError(f"tokens file {path}: unknown table(s) {sorted(unknown)}")
    entries = doc.get("principal", [])
    if not isinstance(entries, list):
        raise AuthConfigError(f"tokens file {path}: use [[principal]] tables")
    by_token: dict[str, Principal] = {}
    by_san: dict[str, Principal] = {}
    for i, entry in enumerate(entries):
        where = f"tokens file {path}: principal #{i + 1}"
        principal, token_hash, san = _entry(where, entry)
        if token_hash:
            if token_hash in by_token:
                raise AuthConfigError(f"{where}: this token_sha256 is listed twice")
            by_token[token_hash] = principal
        if san:
            if san in by_san:
                raise AuthConfigError(f"{where}: san {san!r} is listed twice")
            by_san[san] = principal
    return Principals(by_token, by_san)


def _entry(where: str, entry: Any) -> tuple[Principal, str, str]:
    if not isinstance(entry, dict):
        raise AuthConfigError(f"{where}: must be a table")
    allowed = {"name", "role", "tenant", "node", "token_sha256", "san"}
    extra = set(entry) - allowed
    if extra:
        raise AuthConfigError(f"{where}: unknown key(s) {sorted(extra)}")
    if not all(isinstance(v, str) for v in entry.values()):
        raise AuthConfigError(f"{where}: every value must be a string")
    name = entry.get("name", "")
    if not name:
        raise AuthConfigError(f"{where}: name is required")
    try:
        role = Role(entry.get("role", ""))
    except ValueError:
        roles = ", ".join(r.value for r in Role)
        raise AuthConfigError(f"{where} ({name}): role must be one of {roles}") from None
    tenant, node = entry.get("tenant", ""), entry.get("node", "")
    if role == Role.TENANT and not tenant:
        raise AuthConfigError(f"{where} ({name}): a tenant principal needs tenant")
    if role == Role.AGENT and not node:
        raise AuthConfigError(f"{where} ({name}): an agent principal needs node (id or pattern)")
    if role not in (Role.TENANT,) and tenant:
        raise AuthConfigError(f"{where} ({name}): only tenant principals have a tenant")
    if role not in (Role.AGENT,) and node:
        raise AuthConfigError(f"{where} ({name}): only agent principals have a node")
    if role == Role.TENANT and not tenant.strip("/"):
        raise AuthConfigError(f"{where} ({name}): tenant must name a tenant, not the root")
    token_hash = entry.get("token_sha256", "").lower()
    san = entry.get("san", "")
    if token_hash and not _SHA256.match(token_hash):
        raise AuthConfigError(
            f"{where} ({name}): token_sha256 must be 64 hex digits (rmgrpc hash-token)"
        )
    if not token_hash and not san:
        raise AuthConfigError(f"{where} ({name}): give token_sha256, san, or both")
    return Principal(name, role, tenant.strip("/"), node), token_hash, san


class Unauthenticated(Exception):
    """No usable credentials: no token, an unknown token, or an unmapped certificate."""


class Authenticator:
    """The principals of the tokens file in force, and how a call's credentials map to one."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._principals = load_principals(path)

    @property
    def principals(self) -> Principals:
        return self._principals

    def reload(self) -> bool:
        """Rereads the tokens file; on failure keeps the previous set and logs why."""
        try:
            loaded = load_principals(self.path)
        except AuthConfigError as exc:
            log.error("tokens file not reloaded, the previous one stays in force: %s", exc)
            return False
        self._principals = loaded
        log.info(
            "tokens file reloaded: %d token(s), %d certificate name(s)",
            len(loaded.by_token),
            len(loaded.by_san),
        )
        return True

    def authenticate(
        self, metadata: Iterable[tuple[str, Any]], auth_context: Mapping[str, Iterable[bytes]]
    ) -> Principal:
        """The principal of a call: its bearer token if it has one, else its client
        certificate's SAN; raises Unauthenticated."""
        principals = self._principals
        values = [v for k, v in metadata if k == "authorization"]
        if values:
            scheme, _, token = str(values[0]).partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("authorization must be 'Bearer <token>'")
            principal = principals.by_token.get(hash_token(token.strip()))
            if principal is None:
                raise Unauthenticated("unknown or revoked token")
            return principal
        sans = [
            s.decode(errors="replace")
            for s in auth_context.get("x509_subject_alternative_name", ())
        ]
        for san in sans:
            principal = principals.by_san.get(san)
            if principal is not None:
                return principal
        if sans:
            raise Unauthenticated(f"client certificate {sans[0]!r} maps to no principal")
        raise Unauthenticated("credentials required: 'authorization: Bearer <token>' metadata")


_CURRENT: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "rmgrpc_principal", default=None
)


_METHOD: contextvars.ContextVar[str] = contextvars.ContextVar("rmgrpc_method", default="")


def current_method() -> str:
    """The full name of the RPC being served (for the audit log); "" outside one."""
    return _METHOD.get()


def current() -> Principal | None:
    """The principal of the RPC being served; None when authentication is off (then every
    caller may do everything, which is why the server then listens on loopback only)."""
    return _CURRENT.get()


def is_open(method: str) -> bool:
    """Health and reflection: served to anyone."""
    return method.startswith(OPEN_SERVICES)


_HANDLER_KINDS = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)


def resource_of(request: Any) -> str:
    """A short name of what a request is about, for the audit log."""
    for name in ("id", "node_id", "tenant", "allocation_id", "reservation_id"):
        value = getattr(request, name, "")
        if isinstance(value, str) and value:
            return f"{name}={value}"
    tenant: Any = getattr(getattr(request, "quota", None), "tenant", "")
    return f"tenant={tenant}" if isinstance(tenant, str) and tenant else "-"


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Authenticates every call but health and reflection, refuses methods the role may
    not call (UNAUTHENTICATED / PERMISSION_DENIED), and audits admin writes and refusals."""

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or is_open(details.method):
            return handler
        for kind, rebuild in _HANDLER_KINDS:
            behavior = getattr(handler, kind)
            if behavior is None:
                continue
            return rebuild(
                self._wrap(behavior, details.method, kind.startswith("stream")),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    async def _admit(self, method: str, request: Any, context: Any) -> Principal:
        """The caller's principal, or the call aborted with the reason."""
        from rmgrpc import authorize  # the rules import Principal from here
        from rmgrpc.services import status

        resource = "-" if request is None else resource_of(request)
        try:
            principal = self.authenticator.authenticate(
                context.invocation_metadata() or (), context.auth_context() or {}
            )
        except Unauthenticated as exc:
            audit.warning(
                "denied UNAUTHENTICATED peer=%s method=%s resource=%s: %s",
                context.peer(),
                method,
                resource,
                exc,
            )
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            raise AssertionError("unreachable") from None
        try:
            authorize.method(principal, method)
        except PermissionDenied as exc:
            audit.warning(
                "denied PERMISSION_DENIED principal=%s method=%s resource=%s: %s",
                principal,
                method,
                resource,
                exc,
            )
            await context.abort_with_status(rpc_status.to_status(status.to_status(exc)))
            raise AssertionError("unreachable") from None
        if principal.role == Role.ADMIN and not authorize.is_read(method):
            audit.info("admin principal=%s method=%s resource=%s", principal, method, resource)
        return principal

    def _wrap(self, behavior: Callable[..., Any], method: str, client_streams: bool) -> Any:
        admit = self._admit

        if inspect.isasyncgenfunction(behavior):

            async def generator(request: Any, context: Any) -> AsyncIterator[Any]:
                principal = await admit(method, None if client_streams else request, context)
                # The RPC's own task: nothing else sees these.
                _CURRENT.set(principal)
                _METHOD.set(method)
                async for item in behavior(request, context):
                    yield item

            return generator

        async def coroutine(request: Any, context: Any) -> Any:
            principal = await admit(method, None if client_streams else request, context)
            token, method_token = _CURRENT.set(principal), _METHOD.set(method)
            try:
                result = behavior(request, context)
                return await result if inspect.isawaitable(result) else result
            finally:
                with contextlib.suppress(ValueError):
                    _CURRENT.reset(token)
                    _METHOD.reset(method_token)

        return coroutine
