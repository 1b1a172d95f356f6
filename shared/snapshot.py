"""The snapshot model: plain frozen dataclasses, their protobuf form, and whole-snapshot validation.

The control plane builds a :class:`Snapshot` from Postgres and sends :func:`to_proto` of it;
a data plane turns the message back with :func:`from_proto`, which validates the whole
snapshot and raises :class:`~shared.errors.InvalidSnapshot` on the first inconsistency, so
that a bad snapshot is refused (NACKed) as a unit and never half-applied.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from shared import patterns
from shared._generated.tenantgate.v1 import snapshot_pb2 as pb
from shared.errors import InvalidPattern, InvalidSnapshot

HTTP_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})
TIERS: Final = ("free", "basic", "premium", "enterprise")
KEY_HASH_BYTES: Final = 32
MAX_TIMEOUT_MS: Final = 3_600_000


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
class Route:
    id: str
    path: str
    methods: tuple[str, ...]
    upstreams: tuple[Upstream, ...]
    auth_required: bool
    rate_limit: int
    timeout_ms: int
    strip_prefix: bool
    priority: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: int
    built_at_ms: int
    tenants: tuple[Tenant, ...]
    api_keys: tuple[ApiKey, ...]
    routes: tuple[Route, ...]


def now_ms() -> int:
    return int(time.time() * 1000)


def to_proto(snap: Snapshot) -> pb.Snapshot:
    return pb.Snapshot(
        version=snap.version,
        built_at_ms=snap.built_at_ms,
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
            )
            for r in snap.routes
        ],
    )


def from_proto(msg: pb.Snapshot) -> Snapshot:
    """Decode and validate a whole snapshot; raises :class:`InvalidSnapshot`."""
    snap = Snapshot(
        version=msg.version,
        built_at_ms=msg.built_at_ms,
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
        api_keys=tuple(
            ApiKey(id=k.id, tenant_id=k.tenant_id, key_hash=bytes(k.key_hash)) for k in msg.api_keys
        ),
        routes=tuple(
            Route(
                id=r.id,
                path=r.path,
                methods=tuple(r.methods),
                upstreams=tuple(Upstream(url=u.url, weight=u.weight) for u in r.upstreams),
                auth_required=r.auth_required,
                rate_limit=r.rate_limit,
                timeout_ms=r.timeout_ms,
                strip_prefix=r.strip_prefix,
                priority=r.priority,
            )
            for r in msg.routes
        ),
    )
    validate(snap)
    return snap


def validate_upstream_url(url: str) -> None:
    """Raise ValueError unless ``url`` is an absolute http(s) base URL without query or fragment."""
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


def validate(snap: Snapshot) -> None:
    if snap.version <= 0:
        raise InvalidSnapshot("version must be positive")
    tenant_ids: set[str] = set()
    for t in snap.tenants:
        if not t.id or t.id in tenant_ids:
            raise InvalidSnapshot(f"tenant id {t.id!r} is empty or duplicated")
        if t.tier not in TIERS:
            raise InvalidSnapshot(f"tenant {t.id}: unknown tier {t.tier!r}")
        if min(t.rate_limit_per_minute, t.rate_limit_per_hour, t.monthly_quota, t.max_concurrency) < 0:
            raise InvalidSnapshot(f"tenant {t.id}: limits must not be negative")
        tenant_ids.add(t.id)
    key_ids: set[str] = set()
    hashes: set[bytes] = set()
    for k in snap.api_keys:
        if not k.id or k.id in key_ids:
            raise InvalidSnapshot(f"api key id {k.id!r} is empty or duplicated")
        if k.tenant_id not in tenant_ids:
            raise InvalidSnapshot(f"api key {k.id}: unknown tenant {k.tenant_id!r}")
        if len(k.key_hash) != KEY_HASH_BYTES or k.key_hash in hashes:
            raise InvalidSnapshot(f"api key {k.id}: hash must be {KEY_HASH_BYTES} unique bytes")
        key_ids.add(k.id)
        hashes.add(k.key_hash)
    route_ids: set[str] = set()
    for r in snap.routes:
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
