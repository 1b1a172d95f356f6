"""API keys: ``X-API-Key`` hashed once and looked up in the snapshot's key table."""

from __future__ import annotations

import hashlib
from typing import Final

from data_plane.errors import Unauthenticated
from data_plane.snapshot import Compiled
from shared.snapshot import Tenant

HEADER: Final = "X-API-Key"
MAX_KEY_LENGTH: Final = 256


def authenticate(key: str, snap: Compiled) -> Tenant:
    """The tenant owning ``key``; :class:`Unauthenticated` if none does.

    A dict lookup by SHA-256 digest: the time taken does not depend on how much of a wrong
    key matches a real one, so there is nothing to learn from timing.
    """
    if not key or len(key) > MAX_KEY_LENGTH:
        raise Unauthenticated("invalid API key", code="invalid_api_key")
    tenant = snap.tenants_by_key_hash.get(hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest())
    if tenant is None:
        raise Unauthenticated("invalid API key", code="invalid_api_key")
    return tenant
