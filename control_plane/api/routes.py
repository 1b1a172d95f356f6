"""``/admin/routes``: create, list, read, update (PATCH: only the fields sent), delete.

Writes need an ``admin`` token, reads ``admin`` or ``viewer``. A route names its upstream as
``"upstream"`` (one URL) or ``"upstreams"`` (``[{"url", "weight"}]``); the output shows both,
``upstream`` being the first of ``upstreams``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import uuid
from datetime import datetime
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from control_plane.api.deps import Caller, State, committed, object_id
from control_plane.api.errors import ERROR_RESPONSES
from control_plane.errors import Unprocessable
from control_plane.store import routes as store
from shared import patterns
from shared import snapshot as model
from shared.errors import InvalidPattern
from shared.settings import Settings
from shared.snapshot import HTTP_METHODS, MAX_TIMEOUT_MS, validate_upstream_url

router = APIRouter(prefix="/admin/routes", tags=["routes"], responses=ERROR_RESPONSES)

# Cloud metadata services and other link-local targets are never valid upstreams.
_FORBIDDEN_NETWORKS = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))
_FORBIDDEN_HOSTS = frozenset({"metadata.google.internal", "metadata"})
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})

MAX_ROUTE_TENANTS: Final = 1000
MAX_ROUTE_SCOPES: Final = 32
# Fields a PATCH may set to null, turning the option off; every other field must carry a value.
NULLABLE: Final = frozenset({"host", "rate_limit", "burst", "hash_on", "circuit_breaker", "health_check"})

Int32 = Annotated[int, Field(gt=0, le=2_147_483_647)]
Path = Annotated[str, Field(min_length=1, max_length=patterns.MAX_PATTERN_LENGTH, examples=["/api/users/*"])]
Url = Annotated[str, Field(min_length=1, max_length=2048, examples=["http://user-service:3000"])]
Timeout = Annotated[int, Field(gt=0, le=MAX_TIMEOUT_MS)]
Retries = Annotated[int, Field(ge=0, le=model.MAX_RETRIES)]
Priority = Annotated[int, Field(ge=-1_000_000, le=1_000_000)]
BodyLimit = Annotated[int, Field(ge=0, le=2**62, description="Request body limit in bytes; 0: unlimited.")]
HashOn = Annotated[str, Field(max_length=300)]
LoadBalancing = Literal["round_robin", "least_connections", "consistent_hash"]
Tier = Literal["free", "basic", "premium", "enterprise"]


class UpstreamSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    url: Url
    weight: Annotated[int, Field(ge=1, le=model.MAX_UPSTREAM_WEIGHT)] = 1


class CircuitBreakerSpec(BaseModel):
    """Omitted members take the defaults shown."""

    model_config = ConfigDict(extra="forbid", strict=True)

    failure_rate: Annotated[float, Field(gt=0, le=1)] = 0.5
    min_requests: Annotated[int, Field(ge=1, le=model.MAX_MIN_REQUESTS)] = 20
    window_s: Annotated[int, Field(ge=1, le=model.MAX_WINDOW_S)] = 10
    open_s: Annotated[int, Field(ge=1, le=model.MAX_WINDOW_S)] = 30
    half_open_requests: Annotated[int, Field(ge=1, le=model.MAX_HALF_OPEN_REQUESTS)] = 3


class HealthCheckSpec(BaseModel):
    """Omitted members take the defaults shown."""

    model_config = ConfigDict(extra="forbid", strict=True)

    path: Annotated[str, Field(min_length=1, max_length=model.MAX_HEALTH_PATH_LENGTH)] = "/health"
    interval_s: Annotated[int, Field(ge=1, le=model.MAX_WINDOW_S)] = 5
    healthy: Annotated[int, Field(ge=1, le=model.MAX_HEALTH_THRESHOLD)] = 2
    unhealthy: Annotated[int, Field(ge=1, le=model.MAX_HEALTH_THRESHOLD)] = 3

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        model.validate_health_path(value)
        return value


def _check_pattern(value: str | None) -> str | None:
    if value is not None:
        try:
            patterns.parse(value)
        except InvalidPattern as exc:
            raise ValueError(str(exc)) from None
    return value


def _check_methods(value: list[str] | None) -> list[str] | None:
    if value is None:
        return None
    upper = sorted({m.upper() for m in value})
    unknown = [m for m in upper if m not in HTTP_METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; allowed: {sorted(HTTP_METHODS)}")
    return upper


def _check_upstreams(value: list[UpstreamSpec] | None) -> list[UpstreamSpec] | None:
    if value is not None and len({u.url for u in value}) != len(value):
        raise ValueError("each upstream url may appear once")
    return value


def _check_hash_on(value: str | None) -> str | None:
    if value is not None:
        model.validate_hash_on(value)
    return value


def _check_host(value: str | None) -> str | None:
    if value is None:
        return None
    host = value.lower()
    model.validate_host(host)
    return host


def _check_headers(value: dict[str, str] | None) -> dict[str, str] | None:
    """Header names are case-insensitive: stored and shown in lower case."""
    if value is None:
        return None
    if len(value) > model.MAX_HEADER_MATCHES:
        raise ValueError(f"at most {model.MAX_HEADER_MATCHES} header matches")
    out: dict[str, str] = {}
    for name, expected in value.items():
        model.validate_header_name(name)
        model.validate_header_value(expected)
        if name.lower() in out:
            raise ValueError(f"header {name!r} is given twice (names are case-insensitive)")
        out[name.lower()] = expected
    return dict(sorted(out.items()))


def _check_tenants(value: list[str] | None) -> list[str] | None:
    if value is None:
        return None
    ids = set()
    for item in value:
        try:
            ids.add(str(uuid.UUID(item)))
        except ValueError:
            raise ValueError(f"{item!r} is not a tenant id") from None
    return sorted(ids)


def _check_scopes(value: list[str] | None) -> list[str] | None:
    if value is None:
        return None
    for scope in value:
        model.validate_scope(scope)
    return sorted(set(value))


def _sorted_set(value: list[Any] | None) -> list[Any] | None:
    return None if value is None else sorted(set(value))


class RouteCreate(BaseModel):
    """Give exactly one of ``upstream`` and ``upstreams``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    path: Path
    upstream: Url | None = Field(None, description="One upstream base URL (weight 1).")
    upstreams: Annotated[list[UpstreamSpec], Field(min_length=1, max_length=model.MAX_UPSTREAMS)] | None = None
    methods: list[str] = Field(default_factory=list, description="Allowed methods; empty allows every method.")
    auth_required: bool = True
    rate_limit: Int32 | None = Field(
        None, description="Per-tenant requests per minute on this route, on top of the tenant's limits."
    )
    burst: Int32 | None = Field(None, description="Token-bucket burst for rate_limit; needs rate_limit.")
    timeout_ms: Timeout = 30_000
    retries: Retries = 0
    strip_prefix: bool = False
    priority: Priority = 0
    is_active: bool = True
    load_balancing: LoadBalancing = "round_robin"
    hash_on: HashOn | None = Field(
        None,
        description="With consistent_hash: 'tenant' (default), 'ip' or 'header:<Name>'.",
        examples=["header:X-User-ID"],
    )
    host: Annotated[str, Field(max_length=model.MAX_HOST_LENGTH)] | None = Field(
        None, description="Exact Host to match (case-insensitive, no port); null: any host."
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="Exact header values the request must carry (names case-insensitive)."
    )
    tenants: Annotated[list[str], Field(max_length=MAX_ROUTE_TENANTS)] = Field(
        default_factory=list, description="Tenant ids allowed on the route; empty: every tenant."
    )
    tiers: Annotated[list[Tier], Field(max_length=4)] = Field(
        default_factory=list, description="Tenant tiers allowed; empty: every tier."
    )
    scopes: Annotated[list[str], Field(max_length=MAX_ROUTE_SCOPES)] = Field(
        default_factory=list, description="JWT scopes a request's credential must all carry."
    )
    websocket: bool = False
    max_body_bytes: BodyLimit = model.DEFAULT_MAX_BODY_BYTES
    rate_limit_shadow: bool = Field(
        False, description="Decide and count this route's limits but never refuse a request for them."
    )
    circuit_breaker: CircuitBreakerSpec | None = Field(None, description="null: no circuit breaker.")
    health_check: HealthCheckSpec | None = Field(None, description="null: no active health checks.")

    _path = field_validator("path")(_check_pattern)
    _methods = field_validator("methods")(_check_methods)
    _upstreams = field_validator("upstreams")(_check_upstreams)
    _hash_on = field_validator("hash_on")(_check_hash_on)
    _host = field_validator("host")(_check_host)
    _headers = field_validator("headers")(_check_headers)
    _tenants = field_validator("tenants")(_check_tenants)
    _tiers = field_validator("tiers")(_sorted_set)
    _scopes = field_validator("scopes")(_check_scopes)


class RouteUpdate(BaseModel):
    """Only the fields sent change. ``null`` turns off an optional feature (host, rate_limit,
    burst, hash_on, circuit_breaker, health_check) and is refused for every other field."""

    model_config = ConfigDict(extra="forbid", strict=True)

    path: Path | None = None
    upstream: Url | None = None
    upstreams: Annotated[list[UpstreamSpec], Field(min_length=1, max_length=model.MAX_UPSTREAMS)] | None = None
    methods: list[str] | None = None
    auth_required: bool | None = None
    rate_limit: Int32 | None = None
    burst: Int32 | None = None
    timeout_ms: Timeout | None = None
    retries: Retries | None = None
    strip_prefix: bool | None = None
    priority: Priority | None = None
    is_active: bool | None = None
    load_balancing: LoadBalancing | None = None
    hash_on: HashOn | None = None
    host: Annotated[str, Field(max_length=model.MAX_HOST_LENGTH)] | None = None
    headers: dict[str, str] | None = None
    tenants: Annotated[list[str], Field(max_length=MAX_ROUTE_TENANTS)] | None = None
    tiers: Annotated[list[Tier], Field(max_length=4)] | None = None
    scopes: Annotated[list[str], Field(max_length=MAX_ROUTE_SCOPES)] | None = None
    websocket: bool | None = None
    max_body_bytes: BodyLimit | None = None
    rate_limit_shadow: bool | None = None
    circuit_breaker: CircuitBreakerSpec | None = None
    health_check: HealthCheckSpec | None = None

    _path = field_validator("path")(_check_pattern)
    _methods = field_validator("methods")(_check_methods)
    _upstreams = field_validator("upstreams")(_check_upstreams)
    _hash_on = field_validator("hash_on")(_check_hash_on)
    _host = field_validator("host")(_check_host)
    _headers = field_validator("headers")(_check_headers)
    _tenants = field_validator("tenants")(_check_tenants)
    _tiers = field_validator("tiers")(_sorted_set)
    _scopes = field_validator("scopes")(_check_scopes)


class UpstreamOut(BaseModel):
    url: str
    weight: int


class RouteOut(BaseModel):
    id: str
    path: str
    upstream: str = Field(description="The first of upstreams.")
    upstreams: list[UpstreamOut]
    methods: list[str]
    auth_required: bool
    rate_limit: int | None
    burst: int | None
    timeout_ms: int
    retries: int
    strip_prefix: bool
    priority: int
    is_active: bool
    load_balancing: LoadBalancing
    hash_on: str | None
    host: str | None
    headers: dict[str, str]
    tenants: list[str]
    tiers: list[str]
    scopes: list[str]
    websocket: bool
    max_body_bytes: int
    rate_limit_shadow: bool
    circuit_breaker: CircuitBreakerSpec | None
    health_check: HealthCheckSpec | None
    created_at: datetime
    updated_at: datetime


class RouteWritten(RouteOut):
    config_version: int


class RouteList(BaseModel):
    items: list[RouteOut]


class Deleted(BaseModel):
    id: str
    deleted: bool
    config_version: int


def check_upstream(url: str, settings: Settings, field: str = "upstream") -> None:
    """Refuse upstreams that are not http(s), or that would turn the gateway against its own
    control plane or a cloud metadata service. ``field`` names the field in the 422."""
    try:
        validate_upstream_url(url)
    except ValueError as exc:
        raise Unprocessable(field, str(exc)) from None
    parts = urlsplit(url)
    host = (parts.hostname or "").lower().rstrip(".")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if host in _FORBIDDEN_HOSTS:
        raise Unprocessable(field, "metadata service hosts are not allowed")
    try:
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        addr = None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr is not None and any(addr in net for net in _FORBIDDEN_NETWORKS):
        raise Unprocessable(field, "link-local and metadata addresses are not allowed")
    local = host in _LOOPBACK_NAMES or (addr is not None and (addr.is_loopback or addr.is_unspecified))
    for listener in (settings.admin_listen, settings.cluster_listen):
        if port == listener.port and (local or host == listener.host.lower()):
            raise Unprocessable(field, "must not point at the control plane's own admin or cluster port")


def _upstreams(
    upstream: str | None, upstreams: list[UpstreamSpec] | None, settings: Settings
) -> tuple[model.Upstream, ...]:
    """The upstream list from whichever of the two fields was sent, every URL checked."""
    if upstream is not None and upstreams is not None:
        raise Unprocessable("upstream", "send either upstream or upstreams, not both")
    if upstream is not None:
        check_upstream(upstream, settings, "upstream")
        return (model.Upstream(upstream, 1),)
    assert upstreams is not None
    for u in upstreams:
        check_upstream(u.url, settings, "upstreams")
    return tuple(model.Upstream(u.url, u.weight) for u in upstreams)


def _breaker(spec: CircuitBreakerSpec | None) -> model.CircuitBreaker | None:
    return None if spec is None else model.CircuitBreaker(**spec.model_dump())


def _health_check(spec: HealthCheckSpec | None) -> model.HealthCheck | None:
    return None if spec is None else model.HealthCheck(**spec.model_dump())


def route_out(r: store.RouteRecord) -> dict[str, Any]:
    """Every field of a route as the admin API shows it."""
    return {
        "id": r.id,
        "path": r.path,
        "upstream": r.upstream,
        "upstreams": [{"url": u.url, "weight": u.weight} for u in r.upstreams],
        "methods": list(r.methods),
        "auth_required": r.auth_required,
        "rate_limit": r.rate_limit,
        "burst": r.burst,
        "timeout_ms": r.timeout_ms,
        "retries": r.retries,
        "strip_prefix": r.strip_prefix,
        "priority": r.priority,
        "is_active": r.is_active,
        "load_balancing": r.load_balancing,
        "hash_on": r.hash_on,
        "host": r.host,
        "headers": dict(r.headers),
        "tenants": list(r.tenants),
        "tiers": list(r.tiers),
        "scopes": list(r.scopes),
        "websocket": r.websocket,
        "max_body_bytes": r.max_body_bytes,
        "rate_limit_shadow": r.rate_limit_shadow,
        "circuit_breaker": _as_dict(r.circuit_breaker),
        "health_check": _as_dict(r.health_check),
        "created_at": r.created_at,
        "updated_at": r.updated_at,
    }


def _as_dict(value: model.CircuitBreaker | model.HealthCheck | None) -> dict[str, Any] | None:
    return None if value is None else dataclasses.asdict(value)


@router.post("", status_code=201, response_model=RouteWritten)
async def create_route(body: RouteCreate, state: State, caller: Caller, response: Response) -> dict[str, Any]:
    """Create a route. ``hash_on`` defaults to ``tenant`` with ``consistent_hash``."""
    caller.require_admin()
    if body.upstream is None and body.upstreams is None:
        raise Unprocessable("upstream", "required (or upstreams)")
    upstreams = _upstreams(body.upstream, body.upstreams, state.settings)
    created = await store.create(
        state.db,
        caller.actor,
        store.NewRoute(
            path=body.path,
            upstreams=upstreams,
            methods=tuple(body.methods),
            auth_required=body.auth_required,
            rate_limit=body.rate_limit,
            burst=body.burst,
            timeout_ms=body.timeout_ms,
            retries=body.retries,
            strip_prefix=body.strip_prefix,
            priority=body.priority,
            is_active=body.is_active,
            load_balancing=body.load_balancing,
            hash_on=body.hash_on,
            host=body.host,
            headers=body.headers,
            tenants=tuple(body.tenants),
            tiers=tuple(body.tiers),
            scopes=tuple(body.scopes),
            websocket=body.websocket,
            max_body_bytes=body.max_body_bytes,
            rate_limit_shadow=body.rate_limit_shadow,
            circuit_breaker=_breaker(body.circuit_breaker),
            health_check=_health_check(body.health_check),
        ),
        sent={name for name in body.model_fields_set if getattr(body, name) is not None},
    )
    committed(state, response, created.config_version)
    return {**route_out(created.route), "config_version": created.config_version}


@router.get("", response_model=RouteList)
async def list_routes(state: State, caller: Caller) -> dict[str, Any]:
    """Every route, active or not, in creation order."""
    caller.require_global_read()
    return {"items": [route_out(r) for r in await store.list_all(state.db)]}


@router.get("/{route_id}", response_model=RouteOut)
async def get_route(route_id: str, state: State, caller: Caller) -> dict[str, Any]:
    caller.require_global_read()
    return route_out(await store.get(state.db, object_id(route_id, "route")))


@router.patch("/{route_id}", response_model=RouteWritten)
async def update_route(
    route_id: str, body: RouteUpdate, state: State, caller: Caller, response: Response
) -> dict[str, Any]:
    """Change the fields sent; the others keep their values. Switching ``load_balancing``
    away from ``consistent_hash`` clears ``hash_on``; clearing ``rate_limit`` clears ``burst``."""
    caller.require_admin()
    rid = object_id(route_id, "route")
    sent = {name: getattr(body, name) for name in body.model_fields_set}
    for name, value in sent.items():
        if value is None and name not in NULLABLE:
            raise Unprocessable(name, "must not be null")
    changes: dict[str, Any] = {}
    if "upstream" in sent or "upstreams" in sent:
        changes["upstreams"] = _upstreams(sent.pop("upstream", None), sent.pop("upstreams", None), state.settings)
    for name, value in sent.items():
        if name == "circuit_breaker":
            changes[name] = _breaker(value)
        elif name == "health_check":
            changes[name] = _health_check(value)
        elif isinstance(value, list):
            changes[name] = tuple(value)
        else:
            changes[name] = value
    route, version = await store.update(state.db, caller.actor, rid, changes)
    committed(state, response, version)
    return {**route_out(route), "config_version": version}


@router.delete("/{route_id}", response_model=Deleted)
async def delete_route(route_id: str, state: State, caller: Caller, response: Response) -> dict[str, Any]:
    caller.require_admin()
    rid = object_id(route_id, "route")
    version = await store.delete(state.db, caller.actor, rid)
    committed(state, response, version)
    return {"id": rid, "deleted": True, "config_version": version}
