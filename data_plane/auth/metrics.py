"""Authentication metrics. Labels are a small fixed set (credential kind, error code): never a
tenant, a client address or anything a client chose."""

from __future__ import annotations

from typing import Final

from prometheus_client import Counter

AUTH_FAILURES: Final = Counter(
    "tenantgate_auth_failures_total",
    "Requests refused by authentication or authorisation, by credential kind and error code.",
    ["credential", "code"],
)
OAUTH_TOKENS: Final = Counter(
    "tenantgate_oauth_token_requests_total",
    "POST /oauth/token answers, by outcome (issued or the RFC 6749 error code).",
    ["outcome"],
)
