"""``/admin/routes``."""

from __future__ import annotations

import ipaddress
from datetime import datetime
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from control_plane.api.deps import Caller, State, committed
from control_plane.errors import Unprocessable
from control_plane.store import routes as store
from shared import patterns
from shared.errors import InvalidPattern
from shared.settings import Settings
from shared.snapshot import HTTP_METHODS, MAX_TIMEOUT_MS, validate_upstream_url

router = APIRouter(prefix="/admin/routes", tags=["routes"])

# Cloud metadata services and other link-local targets are never valid upstreams.
_FORBIDDEN_NETWORKS = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))
_FORBIDDEN_HOSTS = frozenset({"metadata.google.internal", "metadata"})
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


class RouteCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    path: Annotated[
        str, Field(min_length=1, max_length=patterns.MAX_PATTERN_LENGTH, examples=["/api/users/*"])
    ]
    upstream: Annotated[str, Field(min_length=1, max_length=2048, examples=["http://user-service:3000"])]
    methods: list[str] = Field(
        default_factory=list, description="Allowed methods; empty allows every method."
    )
    auth_required: bool = True
    rate_limit: Annotated[int, Field(gt=0, le=2_147_483_647)] | None = Field(
        None, description="Per-tenant requests per minute on this route, on top of the tenant's limits."
    )
    timeout_ms: Annotated[int, Field(gt=0, le=MAX_TIMEOUT_MS)] = 30_000
    strip_prefix: bool = False
    priority: Annotated[int, Field(ge=-1_000_000, le=1_000_000)] = 0
    is_active: bool = True

    @field_validator("path")
    @classmethod
    def _pattern(cls, value: str) -> str:
        try:
            patterns.parse(value)
        except InvalidPattern as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        upper = sorted({m.upper() for m in value})
        unknown = [m for m in upper if m not in HTTP_METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; allowed: {sorted(HTTP_METHODS)}")
        return upper


class RouteOut(BaseModel):
    id: str
    path: str
    upstream: str
    methods: list[str]
    auth_required: bool
    rate_limit: int | None
    timeout_ms: int
    strip_prefix: bool
    priority: int
    is_active: bool
    created_at: datetime
    config_version: int


def check_upstream(url: str, settings: Settings) -> None:
    """Refuse upstreams that are not http(s), or that would turn the gateway against its own
    control plane or a cloud metadata service."""
    try:
        validate_upstream_url(url)
    except ValueError as exc:
        raise Unprocessable("upstream", str(exc)) from None
    parts = urlsplit(url)
    host = (parts.hostname or "").lower().rstrip(".")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if host in _FORBIDDEN_HOSTS:
        raise Unprocessable("upstream", "metadata service hosts are not allowed")
    try:
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        addr = None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr is not None and any(addr in net for net in _FORBIDDEN_NETWORKS):
        raise Unprocessable("upstream", "link-local and metadata addresses are not allowed")
    local = host in _LOOPBACK_NAMES or (addr is not None and (addr.is_loopback or addr.is_unspecified))
    for listener in (settings.admin_listen, settings.cluster_listen):
        if port == listener.port and (local or host == listener.host.lower()):
            raise Unprocessable("upstream", "must not point at the control plane's own admin or cluster port")


@router.post("", status_code=201, response_model=RouteOut)
async def create_route(body: RouteCreate, state: State, caller: Caller, response: Response) -> RouteOut:
    caller.require_admin()
    check_upstream(body.upstream, state.settings)
    created = await store.create(
        state.db,
        store.NewRoute(
            path=body.path,
            upstream=body.upstream,
            methods=tuple(body.methods),
            auth_required=body.auth_required,
            rate_limit=body.rate_limit,
            timeout_ms=body.timeout_ms,
            strip_prefix=body.strip_prefix,
            priority=body.priority,
            is_active=body.is_active,
        ),
    )
    committed(state, response, created.config_version)
    r = created.route
    return RouteOut(
        id=r.id,
        path=r.path,
        upstream=r.upstream,
        methods=list(r.methods),
        auth_required=r.auth_required,
        rate_limit=r.rate_limit,
        timeout_ms=r.timeout_ms,
        strip_prefix=r.strip_prefix,
        priority=r.priority,
        is_active=r.is_active,
        created_at=r.created_at,
        config_version=created.config_version,
    )
