"""Who a request is, once a credential proved it, and the challenges a 401 answers with.

An :class:`Identity` is built per snapshot (one per API key) or per verified token (cached
with it), never per request: the pipeline only reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from shared.snapshot import Tenant

REALM: Final = "tenantgate"
API_KEY_CHALLENGE: Final = f'ApiKey realm="{REALM}", header="X-API-Key"'
BEARER_CHALLENGE: Final = f'Bearer realm="{REALM}"'
# Both ways in, for a request that brought no credential (RFC 9110 §11.6.1: one header, several challenges).
ANY_CHALLENGE: Final = f"{API_KEY_CHALLENGE}, {BEARER_CHALLENGE}"
INVALID_TOKEN_CHALLENGE: Final = f'{BEARER_CHALLENGE}, error="invalid_token"'


@dataclass(frozen=True, slots=True)
class Identity:
    """The tenant a credential names and what it grants.

    ``via_bearer`` is true when the credential came in ``Authorization``: the proxy must then
    not forward that header (``X-API-Key`` is never forwarded).
    """

    tenant: Tenant
    scopes: frozenset[str]
    via_bearer: bool
    # The key id, or the token's ``sub``: for logs and usage, never a secret.
    subject: str


def www_authenticate(challenge: str) -> tuple[tuple[str, str], ...]:
    return (("WWW-Authenticate", challenge),)
