"""The snapshot model: plain frozen dataclasses, their protobuf form, and whole-snapshot validation.

The control plane builds a :class:`Snapshot` from Postgres and sends :func:`to_proto` of it;
a data plane turns the message back with :func:`from_proto`, which validates the whole
snapshot and raises :class:`~shared.errors.InvalidSnapshot` on the first inconsistency, so
that a bad snapshot is refused (NACKed) as a unit and never half-applied.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit

from shared import patterns
from shared._generated.tenantgate.v1 import identity_pb2 as idpb
from shared._generated.tenantgate.v1 import snapshot_pb2 as pb
from shared.errors import InvalidPattern, InvalidSnapshot

HTTP_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})
TIERS: Final = ("free", "basic", "premium", "enterprise")
KEY_HASH_BYTES: Final = 32
MAX_TIMEOUT_MS: Final = 3_600_000

# Route fields beyond the seed shape; the admin API and the migrations use the same bounds.
LOAD_BALANCING: Final = ("round_robin", "least_connections", "consistent_hash")
DEFAULT_LOAD_BALANCING: Final = "round_robin"
MAX_UPSTREAMS: Final = 64
MAX_UPSTREAM_WEIGHT: Final = 10_000
MAX_RETRIES: Final = 10
DEFAULT_MAX_BODY_BYTES: Final = 10 * 1024 * 1024  # 0 means unlimited
MAX_HEADER_MATCHES: Final = 16
MAX_HEADER_NAME_LENGTH: Final = 256
MAX_HEADER_VALUE_LENGTH: Final = 1024
MAX_HOST_LENGTH: Final = 253
MAX_SCOPE_LENGTH: Final = 128
MAX_WINDOW_S: Final = 3600
MAX_MIN_REQUESTS: Final = 1_000_000
MAX_HALF_OPEN_REQUESTS: Final = 1000
MAX_HEALTH_THRESHOLD: Final = 100
MAX_HEALTH_PATH_LENGTH: Final = 1024

# RFC 9110 token: header names.
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# A DNS name or dotted IPv4 address, lower case, no port, no trailing dot.
_HOST = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*$")
# RFC 6749 scope-token.
_SCOPE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")
# Field values: visible ASCII, space and tab inside, nothing that could split a header.
_HEADER_VALUE = re.compile(r"^[\x21-\x7e]([\x20-\x7e\t]*[\x21-\x7e])?$")
_HEALTH_PATH = re.compile(r"^/[\x21-\x7e]*$")


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str
    name: str
    tier: str
    rate_limit_per_minute: int
    rate_limit_per_hour: int
    monthly_quota: int
    max_concurrency: int
    is_active: bool


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    tenant_id: str
    key_hash: bytes


@dataclass(frozen=True, slots=True)
class Upstream:
    url: str
    weight: int


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    failure_rate: float  # (0, 1]
    min_requests: int
    window_s: int
    open_s: int
    half_open_requests: int


@dataclass(frozen=True, slots=True)
class HealthCheck:
    path: str
    interval_s: int
    healthy: int
    unhealthy: int


@dataclass(frozen=True, slots=True)
class Route:
    """A route as the data plane serves it. Like the protobuf, "none" is the zero value:
    ``rate_limit``/``burst``/``max_body_bytes`` 0, ``host``/``hash_on`` "", empty tuples."""

    id: str
    path: str
    methods: tuple[str, ...]
    upstreams: tuple[Upstream, ...]
    auth_required: bool
    rate_limit: int
    timeout_ms: int
    strip_prefix: bool
    priority: int
    load_balancing: str = DEFAULT_LOAD_BALANCING
    hash_on: str = ""
    host: str = ""
    # (lower-case name, exact value), sorted by name.
    headers: tuple[tuple[str, str], ...] = ()
    tenants: tuple[str, ...] = ()
    tiers: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    retries: int = 0
    websocket: bool = False
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    circuit_breaker: CircuitBreaker | None = None
    health_check: HealthCheck | None = None
    burst: int = 0
    rate_limit_shadow: bool = False


# Identity: tenants' JWT issuers and OAuth clients, the gateway's signing keys. The admin API
# checks against the same bounds.
JWT_ALGORITHMS: Final = frozenset({"RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA", "HS256"})
HMAC_JWT_ALGORITHMS: Final = frozenset({"HS256"})
MIN_HS256_SECRET_BYTES: Final = 32
MAX_ISSUER_LENGTH: Final = 512
MAX_JWKS_KEYS: Final = 100
SIGNING_ALGORITHMS: Final = frozenset({"ES256"})
MAX_CLIENT_SCOPES: Final = 50
_CLIENT_SCOPE = re.compile(r"^[A-Za-z0-9:._-]{1,64}$")


@dataclass(frozen=True, slots=True)
class JwtIssuer:
    """A tenant's JWT issuer. ``jwks_json`` is the effective public key set (``{"keys": [...]}``);
    ``hs256_secret`` is set exactly when ``algorithms`` is ``("HS256",)``."""

    id: str
    tenant_id: str
    issuer: str
    audience: str
    algorithms: tuple[str, ...]
    jwks_json: str
    hs256_secret: bytes = field(default=b"", repr=False)


@dataclass(frozen=True, slots=True)
class OAuthClient:
    id: str
    tenant_id: str
    client_id: str
    secret_hash: bytes = field(repr=False)
    scopes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A key the data planes sign OAuth access tokens with (``kid`` in the token header)."""

    kid: str
    algorithm: str
    private_key_pem: str = field(repr=False)
    public_jwk_json: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: int
    built_at_ms: int
    tenants: tuple[Tenant, ...]
    api_keys: tuple[ApiKey, ...]
    routes: tuple[Route, ...]
    jwt_issuers: tuple[JwtIssuer, ...] = ()
    oauth_clients: tuple[OAuthClient, ...] = ()
    signing_keys: tuple[SigningKey, ...] = ()
    # The database's config epoch (see proto/tenantgate/v1/snapshot.proto); "": unknown.
    epoch: str = ""


def now_ms() -> int:
    return int(time.time() * 1000)


def to_proto(snap: Snapshot) -> pb.Snapshot:
    return pb.Snapshot(
        version=snap.version,
        built_at_ms=snap.built_at_ms,
        epoch=snap.epoch,
        jwt_issuers=[
            idpb.JwtIssuer(
                id=i.id,
                tenant_id=i.tenant_id,
                issuer=i.issuer,
                audience=i.audience,
                algorithms=list(i.algorithms),
                jwks_json=i.jwks_json,
                hs256_secret=i.hs256_secret,
            )
            for i in snap.jwt_issuers
        ],
        oauth_clients=[
            idpb.OAuthClient(
                id=c.id, tenant_id=c.tenant_id, client_id=c.client_id, secret_hash=c.secret_hash, scopes=list(c.scopes)
            )
            for c in snap.oauth_clients
        ],
        signing_keys=[
            idpb.SigningKey(
                kid=k.kid, algorithm=k.algorithm, private_key_pem=k.private_key_pem, public_jwk_json=k.public_jwk_json
            )
            for k in snap.signing_keys
        ],
        tenants=[
            pb.Tenant(
                id=t.id,
                name=t.name,
                tier=t.tier,
                rate_limit_per_minute=t.rate_limit_per_minute,
                rate_limit_per_hour=t.rate_limit_per_hour,
                monthly_quota=t.monthly_quota,
                max_concurrency=t.max_concurrency,
                is_active=t.is_active,
            )
            for t in snap.tenants
        ],
        api_keys=[pb.ApiKey(id=k.id, tenant_id=k.tenant_id, key_hash=k.key_hash) for k in snap.api_keys],
        routes=[
            pb.Route(
                id=r.id,
                path=r.path,
                methods=list(r.methods),
                upstreams=[pb.Upstream(url=u.url, weight=u.weight) for u in r.upstreams],
                auth_required=r.auth_required,
                rate_limit=r.rate_limit,
                timeout_ms=r.timeout_ms,
                strip_prefix=r.strip_prefix,
                priority=r.priority,
                load_balancing=r.load_balancing,
                hash_on=r.hash_on,
                host=r.host,
                headers=dict(r.headers),
                tenants=list(r.tenants),
                tiers=list(r.tiers),
                scopes=list(r.scopes),
                retries=r.retries,
                websocket=r.websocket,
                max_body_bytes=r.max_body_bytes,
                circuit_breaker=_breaker_to_proto(r.circuit_breaker),
                health_check=_health_check_to_proto(r.health_check),
                burst=r.burst,
                rate_limit_shadow=r.rate_limit_shadow,
            )
            for r in snap.routes
        ],
    )


def _breaker_to_proto(cb: CircuitBreaker | None) -> pb.CircuitBreaker | None:
    if cb is None:
        return None
    return pb.CircuitBreaker(
        failure_rate=cb.failure_rate,
        min_requests=cb.min_requests,
        window_s=cb.window_s,
        open_s=cb.open_s,
        half_open_requests=cb.half_open_requests,
    )


def _health_check_to_proto(hc: HealthCheck | None) -> pb.HealthCheck | None:
    if hc is None:
        return None
    return pb.HealthCheck(path=hc.path, interval_s=hc.interval_s, healthy=hc.healthy, unhealthy=hc.unhealthy)


def _route_from_proto(r: pb.Route) -> Route:
    cb = r.circuit_breaker if r.HasField("circuit_breaker") else None
    hc = r.health_check if r.HasField("health_check") else None
    return Route(
        id=r.id,
        path=r.path,
        methods=tuple(r.methods),
        upstreams=tuple(Upstream(url=u.url, weight=u.weight) for u in r.upstreams),
        auth_required=r.auth_required,
        rate_limit=r.rate_limit,
        timeout_ms=r.timeout_ms,
        strip_prefix=r.strip_prefix,
        priority=r.priority,
        # An empty string is what a snapshot from before the field was added carries.
        load_balancing=r.load_balancing or DEFAULT_LOAD_BALANCING,
        hash_on=r.hash_on,
        host=r.host,
        headers=tuple(sorted(r.headers.items())),
        tenants=tuple(r.tenants),
        tiers=tuple(r.tiers),
        scopes=tuple(r.scopes),
        retries=r.retries,
        websocket=r.websocket,
        max_body_bytes=r.max_body_bytes,
        circuit_breaker=None
        if cb is None
        else CircuitBreaker(
            failure_rate=cb.failure_rate,
            min_requests=cb.min_requests,
            window_s=cb.window_s,
            open_s=cb.open_s,
            half_open_requests=cb.half_open_requests,
        ),
        health_check=None
        if hc is None
        else HealthCheck(path=hc.path, interval_s=hc.interval_s, healthy=hc.healthy, unhealthy=hc.unhealthy),
        burst=r.burst,
        rate_limit_shadow=r.rate_limit_shadow,
    )


def from_proto(msg: pb.Snapshot) -> Snapshot:
    """Decode and validate a whole snapshot; raises :class:`InvalidSnapshot`."""
    snap = decode(msg)
    validate(snap)
    return snap


def decode(msg: pb.Snapshot) -> Snapshot:
    """Decode without validating: for the objects of a delta, which are validated with the
    snapshot they join (see data_plane/snapshot.py)."""
    return Snapshot(
        version=msg.version,
        built_at_ms=msg.built_at_ms,
        epoch=msg.epoch,
        jwt_issuers=tuple(
            JwtIssuer(
                id=i.id,
                tenant_id=i.tenant_id,
                issuer=i.issuer,
                audience=i.audience,
                algorithms=tuple(i.algorithms),
                jwks_json=i.jwks_json,
                hs256_secret=bytes(i.hs256_secret),
            )
            for i in msg.jwt_issuers
        ),
        oauth_clients=tuple(
            OAuthClient(
                id=c.id,
                tenant_id=c.tenant_id,
                client_id=c.client_id,
                secret_hash=bytes(c.secret_hash),
                scopes=tuple(c.scopes),
            )
            for c in msg.oauth_clients
        ),
        signing_keys=tuple(
            SigningKey(
                kid=k.kid, algorithm=k.algorithm, private_key_pem=k.private_key_pem, public_jwk_json=k.public_jwk_json
            )
            for k in msg.signing_keys
        ),
        tenants=tuple(
            Tenant(
                id=t.id,
                name=t.name,
                tier=t.tier,
                rate_limit_per_minute=t.rate_limit_per_minute,
                rate_limit_per_hour=t.rate_limit_per_hour,
                monthly_quota=t.monthly_quota,
                max_concurrency=t.max_concurrency,
                is_active=t.is_active,
            )
            for t in msg.tenants
        ),
        api_keys=tuple(ApiKey(id=k.id, tenant_id=k.tenant_id, key_hash=bytes(k.key_hash)) for k in msg.api_keys),
        routes=tuple(_route_from_proto(r) for r in msg.routes),
    )


def validate_upstream_url(url: str) -> None:
    """Raise ValueError unless ``url`` is an absolute http(s) base URL without query or fragment."""
    if any(c <= " " or c == "\x7f" for c in url):
        raise ValueError("must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("scheme must be http or https")
    if not parts.hostname:
        raise ValueError("must name a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError("must not have a query or fragment")
    if port == 0:
        raise ValueError("port must not be 0")


def validate_hash_on(value: str) -> None:
    """Raise ValueError unless ``value`` is ``tenant``, ``ip`` or ``header:<Name>``."""
    if value in ("tenant", "ip"):
        return
    kind, sep, name = value.partition(":")
    if kind != "header" or not sep or not _TOKEN.fullmatch(name):
        raise ValueError("must be 'tenant', 'ip' or 'header:<Name>' with a valid header name")


def validate_host(value: str) -> None:
    """Raise ValueError unless ``value`` is a lower-case host name (or IPv4 address) without port."""
    if len(value) > MAX_HOST_LENGTH or not _HOST.fullmatch(value):
        raise ValueError("must be a host name (lower case in a snapshot) without port, like api.example.com")


def validate_header_name(name: str) -> None:
    if len(name) > MAX_HEADER_NAME_LENGTH or not _TOKEN.fullmatch(name):
        raise ValueError(f"header name {name!r} is not a valid HTTP token")


def validate_header_value(value: str) -> None:
    if len(value) > MAX_HEADER_VALUE_LENGTH or not _HEADER_VALUE.fullmatch(value):
        raise ValueError(
            f"header values must be 1..{MAX_HEADER_VALUE_LENGTH} visible ASCII characters"
            " without leading or trailing space"
        )


def validate_scope(scope: str) -> None:
    if len(scope) > MAX_SCOPE_LENGTH or not _SCOPE.fullmatch(scope):
        raise ValueError(f"scope {scope!r} is not a valid scope token (RFC 6749)")


def validate_health_path(path: str) -> None:
    if len(path) > MAX_HEALTH_PATH_LENGTH or not _HEALTH_PATH.fullmatch(path):
        raise ValueError("must start with '/' and hold only visible ASCII characters")


def validate_jwt_algorithms(algorithms: Sequence[str]) -> None:
    """Raise ValueError unless ``algorithms`` is a non-empty set of accepted JWT algorithms that
    does not mix HS256 with asymmetric ones (which would let a public key serve as an HMAC secret)."""
    if not algorithms:
        raise ValueError("must name at least one algorithm")
    if any(a.strip().lower() == "none" for a in algorithms):
        raise ValueError("'none' is never accepted: tokens must be signed")
    unknown = sorted(set(algorithms) - JWT_ALGORITHMS)
    if unknown:
        raise ValueError(f"unknown {unknown}; allowed: {sorted(JWT_ALGORITHMS)}")
    if len(set(algorithms)) != len(algorithms):
        raise ValueError("must not repeat an algorithm")
    if HMAC_JWT_ALGORITHMS & set(algorithms) and not set(algorithms) <= HMAC_JWT_ALGORITHMS:
        raise ValueError("must not mix HS256 with asymmetric algorithms")


def validate_client_scope(scope: str) -> None:
    if not _CLIENT_SCOPE.fullmatch(scope):
        raise ValueError(f"scope {scope!r} must be 1..64 characters of A-Z a-z 0-9 : . _ -")


def _json_object(text: str, what: str) -> dict[str, object]:
    try:
        value = json.loads(text)
    except ValueError:
        raise ValueError(f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} is not a JSON object")
    return value


def _validate_jwks_json(text: str) -> None:
    keys = _json_object(text, "jwks_json").get("keys")
    if not isinstance(keys, list) or len(keys) > MAX_JWKS_KEYS:
        raise ValueError(f"jwks_json must hold a list of at most {MAX_JWKS_KEYS} keys")
    for key in keys:
        if not isinstance(key, dict) or not isinstance(key.get("kty"), str):
            raise ValueError("jwks_json: every key must be an object with a kty")


def _validate_identity(snap: Snapshot, tenant_ids: set[str]) -> None:
    issuer_ids: set[str] = set()
    issuer_names: set[tuple[str, str]] = set()
    for i in snap.jwt_issuers:
        if not i.id or i.id in issuer_ids:
            raise InvalidSnapshot(f"jwt issuer id {i.id!r} is empty or duplicated")
        issuer_ids.add(i.id)
        if i.tenant_id not in tenant_ids:
            raise InvalidSnapshot(f"jwt issuer {i.id}: unknown tenant {i.tenant_id!r}")
        if not 0 < len(i.issuer) <= MAX_ISSUER_LENGTH or (i.tenant_id, i.issuer) in issuer_names:
            raise InvalidSnapshot(f"jwt issuer {i.id}: issuer must be 1..{MAX_ISSUER_LENGTH} chars, unique per tenant")
        issuer_names.add((i.tenant_id, i.issuer))
        if not i.audience:
            raise InvalidSnapshot(f"jwt issuer {i.id}: audience must not be empty")
        try:
            validate_jwt_algorithms(i.algorithms)
        except ValueError as exc:
            raise InvalidSnapshot(f"jwt issuer {i.id}: algorithms {exc}") from None
        if set(i.algorithms) <= HMAC_JWT_ALGORITHMS:
            if len(i.hs256_secret) < MIN_HS256_SECRET_BYTES:
                raise InvalidSnapshot(f"jwt issuer {i.id}: HS256 needs a secret of {MIN_HS256_SECRET_BYTES}+ bytes")
        elif i.hs256_secret:
            raise InvalidSnapshot(f"jwt issuer {i.id}: hs256_secret is only for HS256")
        try:
            _validate_jwks_json(i.jwks_json)
        except ValueError as exc:
            raise InvalidSnapshot(f"jwt issuer {i.id}: {exc}") from None
    client_ids: set[str] = set()
    public_ids: set[str] = set()
    for c in snap.oauth_clients:
        if not c.id or c.id in client_ids:
            raise InvalidSnapshot(f"oauth client id {c.id!r} is empty or duplicated")
        client_ids.add(c.id)
        if c.tenant_id not in tenant_ids:
            raise InvalidSnapshot(f"oauth client {c.id}: unknown tenant {c.tenant_id!r}")
        if not c.client_id or c.client_id in public_ids:
            raise InvalidSnapshot(f"oauth client {c.id}: client_id is empty or duplicated")
        public_ids.add(c.client_id)
        if len(c.secret_hash) != KEY_HASH_BYTES:
            raise InvalidSnapshot(f"oauth client {c.id}: secret hash must be {KEY_HASH_BYTES} bytes")
        if len(c.scopes) > MAX_CLIENT_SCOPES:
            raise InvalidSnapshot(f"oauth client {c.id}: at most {MAX_CLIENT_SCOPES} scopes")
        for scope in c.scopes:
            try:
                validate_client_scope(scope)
            except ValueError as exc:
                raise InvalidSnapshot(f"oauth client {c.id}: {exc}") from None
    kids: set[str] = set()
    for k in snap.signing_keys:
        if not k.kid or k.kid in kids:
            raise InvalidSnapshot(f"signing key kid {k.kid!r} is empty or duplicated")
        kids.add(k.kid)
        if k.algorithm not in SIGNING_ALGORITHMS:
            raise InvalidSnapshot(f"signing key {k.kid}: unknown algorithm {k.algorithm!r}")
        if not k.private_key_pem.startswith("-----BEGIN PRIVATE KEY-----"):
            raise InvalidSnapshot(f"signing key {k.kid}: private_key_pem must be a PKCS#8 PEM")
        try:
            _json_object(k.public_jwk_json, "public_jwk_json")
        except ValueError as exc:
            raise InvalidSnapshot(f"signing key {k.kid}: {exc}") from None


# validation() yields after this many tenants or keys, or a fiftieth as many routes.
VALIDATION_STEP: Final = 500
_SEEN_SHARDS: Final = 256
# A config epoch is a UUID's text (36 characters); anything much longer is not one.
MAX_EPOCH_LENGTH: Final = 64


def validate(snap: Snapshot) -> None:
    """Raise ``InvalidSnapshot`` naming the first object that is not valid."""
    for _ in validation(snap):
        pass


def validation(snap: Snapshot) -> Iterator[None]:
    """:func:`validate` in steps: yields every :data:`VALIDATION_STEP` objects or so, so that a
    caller can validate a large snapshot a little at a time."""
    if snap.version <= 0:
        raise InvalidSnapshot("version must be positive")
    if len(snap.epoch) > MAX_EPOCH_LENGTH:
        raise InvalidSnapshot(f"epoch longer than {MAX_EPOCH_LENGTH} characters")
    tenant_ids: set[str] = set()
    for n, t in enumerate(snap.tenants, 1):
        if not n % VALIDATION_STEP:
            yield
        if not t.id or t.id in tenant_ids:
            raise InvalidSnapshot(f"tenant id {t.id!r} is empty or duplicated")
        if t.tier not in TIERS:
            raise InvalidSnapshot(f"tenant {t.id}: unknown tier {t.tier!r}")
        if min(t.rate_limit_per_minute, t.rate_limit_per_hour, t.monthly_quota, t.max_concurrency) < 0:
            raise InvalidSnapshot(f"tenant {t.id}: limits must not be negative")
        tenant_ids.add(t.id)
    # Keys can be 100,000s: seen ids and hashes in many small sets, since growing one set that
    # large copies it whole now and then, milliseconds in one step.
    key_ids: list[set[str]] = [set() for _ in range(_SEEN_SHARDS)]
    hashes: list[set[bytes]] = [set() for _ in range(_SEEN_SHARDS)]
    for n, k in enumerate(snap.api_keys, 1):
        if not n % VALIDATION_STEP:
            yield
        ids = key_ids[hash(k.id) % _SEEN_SHARDS]
        if not k.id or k.id in ids:
            raise InvalidSnapshot(f"api key id {k.id!r} is empty or duplicated")
        if k.tenant_id not in tenant_ids:
            raise InvalidSnapshot(f"api key {k.id}: unknown tenant {k.tenant_id!r}")
        seen = hashes[hash(k.key_hash) % _SEEN_SHARDS]
        if len(k.key_hash) != KEY_HASH_BYTES or k.key_hash in seen:
            raise InvalidSnapshot(f"api key {k.id}: hash must be {KEY_HASH_BYTES} unique bytes")
        ids.add(k.id)
        seen.add(k.key_hash)
    for n, (ids, seen) in enumerate(zip(key_ids, hashes, strict=True), 1):  # emptied a few at a time
        ids.clear()
        seen.clear()
        if not n % 32:
            yield
    _validate_identity(snap, tenant_ids)
    route_ids: set[str] = set()
    for n, r in enumerate(snap.routes, 1):
        if not n % (VALIDATION_STEP // 50):
            yield
        if not r.id or r.id in route_ids:
            raise InvalidSnapshot(f"route id {r.id!r} is empty or duplicated")
        route_ids.add(r.id)
        try:
            patterns.parse(r.path)
        except InvalidPattern as exc:
            raise InvalidSnapshot(f"route {r.id}: {exc}") from None
        bad_methods = set(r.methods) - HTTP_METHODS
        if bad_methods:
            raise InvalidSnapshot(f"route {r.id}: unknown methods {sorted(bad_methods)}")
        if not r.upstreams:
            raise InvalidSnapshot(f"route {r.id}: no upstream")
        for u in r.upstreams:
            try:
                validate_upstream_url(u.url)
            except ValueError as exc:
                raise InvalidSnapshot(f"route {r.id}: upstream {u.url!r}: {exc}") from None
            if u.weight <= 0:
                raise InvalidSnapshot(f"route {r.id}: upstream weight must be positive")
        if not 0 < r.timeout_ms <= MAX_TIMEOUT_MS:
            raise InvalidSnapshot(f"route {r.id}: timeout_ms must be 1..{MAX_TIMEOUT_MS}")
        if r.rate_limit < 0:
            raise InvalidSnapshot(f"route {r.id}: rate_limit must not be negative")
        try:
            _validate_route_options(r)
        except ValueError as exc:
            raise InvalidSnapshot(f"route {r.id}: {exc}") from None


def _validate_route_options(r: Route) -> None:
    """The fields beyond the seed shape; raises ValueError naming the field."""
    if len(r.upstreams) > MAX_UPSTREAMS:
        raise ValueError(f"at most {MAX_UPSTREAMS} upstreams")
    if any(u.weight > MAX_UPSTREAM_WEIGHT for u in r.upstreams):
        raise ValueError(f"upstream weight must be at most {MAX_UPSTREAM_WEIGHT}")
    if r.load_balancing not in LOAD_BALANCING:
        raise ValueError(f"unknown load_balancing {r.load_balancing!r}")
    if r.hash_on:
        try:
            validate_hash_on(r.hash_on)
        except ValueError as exc:
            raise ValueError(f"hash_on {exc}") from None
    elif r.load_balancing == "consistent_hash":
        raise ValueError("consistent_hash needs hash_on")
    if r.host:
        try:
            validate_host(r.host)
        except ValueError as exc:
            raise ValueError(f"host {exc}") from None
    if len(r.headers) > MAX_HEADER_MATCHES:
        raise ValueError(f"at most {MAX_HEADER_MATCHES} header matches")
    for name, value in r.headers:
        validate_header_name(name)
        if name != name.lower():
            raise ValueError(f"header name {name!r} must be lower case")
        validate_header_value(value)
    if len(set(r.tenants)) != len(r.tenants) or not all(r.tenants):
        raise ValueError("tenants must be distinct, non-empty ids")
    bad_tiers = set(r.tiers) - set(TIERS)
    if bad_tiers:
        raise ValueError(f"unknown tiers {sorted(bad_tiers)}")
    for scope in r.scopes:
        validate_scope(scope)
    if not 0 <= r.retries <= MAX_RETRIES:
        raise ValueError(f"retries must be 0..{MAX_RETRIES}")
    if r.max_body_bytes < 0:
        raise ValueError("max_body_bytes must not be negative")
    if r.burst < 0:
        raise ValueError("burst must not be negative")
    if r.burst and not r.rate_limit:
        raise ValueError("burst needs a rate_limit")
    cb = r.circuit_breaker
    if cb is not None:
        if not 0 < cb.failure_rate <= 1:
            raise ValueError("circuit_breaker.failure_rate must be in (0, 1]")
        _in_range("circuit_breaker.min_requests", cb.min_requests, MAX_MIN_REQUESTS)
        _in_range("circuit_breaker.window_s", cb.window_s, MAX_WINDOW_S)
        _in_range("circuit_breaker.open_s", cb.open_s, MAX_WINDOW_S)
        _in_range("circuit_breaker.half_open_requests", cb.half_open_requests, MAX_HALF_OPEN_REQUESTS)
    hc = r.health_check
    if hc is not None:
        try:
            validate_health_path(hc.path)
        except ValueError as exc:
            raise ValueError(f"health_check.path {exc}") from None
        _in_range("health_check.interval_s", hc.interval_s, MAX_WINDOW_S)
        _in_range("health_check.healthy", hc.healthy, MAX_HEALTH_THRESHOLD)
        _in_range("health_check.unhealthy", hc.unhealthy, MAX_HEALTH_THRESHOLD)


def _in_range(name: str, value: int, maximum: int) -> None:
    if not 1 <= value <= maximum:
        raise ValueError(f"{name} must be 1..{maximum}")
