"""Who may call the admin API, and what they may do: the one place this is decided.

A caller presents ``Authorization: Bearer <token>``: either the bootstrap token from
``TENANTGATE_ADMIN_TOKEN`` (role ``admin``, compared in constant time) or a token created
through ``POST /admin/tokens`` (stored as a SHA-256 hash, looked up by hash).

Roles:
- ``admin``: anything.
- ``viewer``: reads anything, writes nothing (403).
- ``tenant_admin``: bound to one tenant. Reads that tenant and manages its keys (and, as they
  arrive, its issuers, OAuth clients and usage). Any other tenant's objects answer 404, as if
  they did not exist; anything global (routes, tokens, other tenants' creation) answers 403.
  It cannot change its own tenant's limits, tier or state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from control_plane.errors import Forbidden, NotFound, Unauthorized
from control_plane.store import tokens as token_store
from control_plane.store.audit import Actor
from control_plane.store.db import Database
from shared import keys
from shared.settings import Secret

ROLES: Final = ("admin", "tenant_admin", "viewer")
BOOTSTRAP_NAME: Final = "bootstrap"
MAX_TOKEN_LENGTH: Final = 512


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    role: str
    tenant_id: str | None = None
    token_id: str | None = None

    @property
    def actor(self) -> Actor:
        label = self.name if self.token_id is None else f"{self.name} ({self.token_id})"
        return Actor(label, self.role)

    def require_admin(self) -> None:
        """Global writes: only ``admin``."""
        if self.role != "admin":
            raise Forbidden("this call needs an admin token", code="admin_required")

    def require_global_read(self) -> None:
        """Reads of global state (routes, all tenants, config): ``admin`` and ``viewer``."""
        if self.role == "tenant_admin":
            raise Forbidden("a tenant_admin token may only read its own tenant", code="forbidden")

    def require_tenant_read(self, tenant_id: str) -> None:
        if self.role == "tenant_admin" and tenant_id != self.tenant_id:
            raise NotFound("no such tenant")

    def require_tenant_manage(self, tenant_id: str) -> None:
        """Managing a tenant's own objects (keys, issuers, OAuth clients)."""
        self.require_tenant_read(tenant_id)
        if self.role == "viewer":
            raise Forbidden("this token may only read", code="read_only_token")


class Authenticator:
    def __init__(self, bootstrap_token: Secret, db: Database) -> None:
        self._bootstrap = bootstrap_token.reveal()
        self._db = db

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthorized("missing Authorization: Bearer <admin token>", code="missing_credentials")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_LENGTH:
            raise Unauthorized("expected Authorization: Bearer <admin token>", code="invalid_credentials")
        if keys.secrets_equal(token, self._bootstrap):
            return Principal(name=BOOTSTRAP_NAME, role="admin")
        record = await token_store.find_live_by_hash(self._db, keys.hash_key(token))
        if record is None:
            raise Unauthorized("invalid admin token", code="invalid_credentials")
        return Principal(name=record.name, role=record.role, tenant_id=record.tenant_id, token_id=record.id)
