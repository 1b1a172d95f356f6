"""Who may call the admin API: the one place its authorisation is decided.

A caller presents ``Authorization: Bearer <token>``. The bootstrap token from
``TENANTGATE_ADMIN_TOKEN`` has the ``admin`` role. Comparison is constant-time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from control_plane.errors import Forbidden, Unauthorized
from shared import keys
from shared.settings import Secret

ROLES: Final = ("admin", "tenant_admin", "viewer")


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    role: str
    tenant_id: str | None = None

    def require_write(self) -> None:
        if self.role == "viewer":
            raise Forbidden("this token may only read", code="read_only_token")

    def require_admin(self) -> None:
        if self.role != "admin":
            raise Forbidden("this call needs an admin token", code="admin_required")


class Authenticator:
    def __init__(self, bootstrap_token: Secret) -> None:
        self._bootstrap = bootstrap_token.reveal()

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthorized("missing Authorization: Bearer <admin token>", code="missing_credentials")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("expected Authorization: Bearer <admin token>", code="invalid_credentials")
        if keys.secrets_equal(token, self._bootstrap):
            return Principal(name="bootstrap", role="admin")
        raise Unauthorized("invalid admin token", code="invalid_credentials")
