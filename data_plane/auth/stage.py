"""The authenticate and authorise stage of the pipeline, compiled once per snapshot.

    credentials    X-API-Key (header only)  |  Authorization: Bearer <JWT>  |  none
    authenticate   key → hash → identity; token → issuer → verified claims (cached) → identity
    reconcile      both sent: they must name the same tenant (else 400 conflicting_credentials)
    authorise      tenant active (403), route tenants / tiers (403), scopes (403 insufficient_scope)

A route with ``auth_required: false`` and no access rules is open: a valid credential still
identifies the tenant (for usage and ``X-Tenant-ID``), an invalid one is ignored and the request
is served anonymously, like Kong's ``anonymous`` consumer. Any route with access rules (tenants,
tiers, scopes) needs a valid credential whatever ``auth_required`` says.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from multidict import CIMultiDictProxy

from data_plane.auth import apikey, oauth
from data_plane.auth.identity import ANY_CHALLENGE, BEARER_CHALLENGE, Identity, www_authenticate
from data_plane.auth.jwt import Verifier
from data_plane.auth.metrics import AUTH_FAILURES
from data_plane.errors import BadRequest, Forbidden, Unauthenticated
from data_plane.router import CompiledRoute
from shared.snapshot import Snapshot, Tenant

_MISSING: Final = www_authenticate(ANY_CHALLENGE)


class Auth:
    """Everything authentication needs from one snapshot."""

    __slots__ = ("keys", "token_service", "tokens")

    def __init__(self, snap: Snapshot, tenants: Mapping[str, Tenant], keys: apikey.KeyTable | None = None) -> None:
        """``keys``: the key table when the caller has it already (patched from the previous
        snapshot's for a delta); otherwise it is built from ``snap``."""
        clients = {c.client_id: c for c in snap.oauth_clients}
        self.keys = keys if keys is not None else apikey.KeyTable(snap.api_keys, tenants)
        self.tokens = Verifier(snap.jwt_issuers, tenants, clients, snap.signing_keys)
        self.token_service = oauth.TokenService(clients, tenants, snap.signing_keys)

    def admit(self, headers: CIMultiDictProxy[str], raw_query: str, route: CompiledRoute) -> Identity | None:
        """Who may send this request on ``route``: an identity, ``None`` for an anonymous request
        on an open route, or a :class:`GatewayError` (400 / 401 / 403)."""
        try:
            return self._admit(headers, raw_query, route)
        except (BadRequest, Unauthenticated, Forbidden) as exc:
            AUTH_FAILURES.labels(_credential_kind(headers), exc.code).inc()
            raise

    def _admit(self, headers: CIMultiDictProxy[str], raw_query: str, route: CompiledRoute) -> Identity | None:
        if raw_query and apikey.in_query(raw_query):
            raise BadRequest(
                "credentials are not accepted in the query string: send the API key in X-API-Key",
                code="credential_in_query",
            )
        strict = route.route.auth_required or bool(route.tenants or route.tiers or route.scopes)
        by_key = by_token = None
        keys = headers.getall(apikey.HEADER, ())
        if keys:
            if len(keys) > 1:
                raise BadRequest("more than one X-API-Key header", code="conflicting_credentials")
            try:
                by_key = self.keys.lookup(keys[0])
            except Unauthenticated:
                if strict:
                    raise
        authorization = headers.getall("Authorization", ())
        if authorization:
            if len(authorization) > 1:
                raise BadRequest("more than one Authorization header", code="conflicting_credentials")
            scheme, _, token = authorization[0].strip().partition(" ")
            # Other schemes (Basic, …) are not the gateway's: they are left for the upstream.
            if scheme.lower() == "bearer":
                try:
                    by_token = self.tokens.verify(token.strip())
                except Unauthenticated:
                    if strict:
                        raise
        if by_token is not None:
            if by_key is not None and by_key.tenant.id != by_token.tenant.id:
                raise BadRequest(
                    "X-API-Key and the bearer token name different tenants", code="conflicting_credentials"
                )
            identity: Identity | None = by_token
        else:
            identity = by_key
        if identity is None:
            if strict:
                raise Unauthenticated(
                    "missing credentials: send X-API-Key or Authorization: Bearer",
                    code="missing_credentials",
                    headers=_MISSING,
                )
            return None
        try:
            if not identity.tenant.is_active:
                raise Forbidden("this tenant is inactive", code="tenant_inactive")
            if route.tenants or route.tiers or route.scopes:
                authorise(route, identity)
        except Forbidden as exc:
            exc.tenant = identity.tenant  # refused, yet this tenant's request: its usage counts it
            raise
        return identity


def _credential_kind(headers: CIMultiDictProxy[str]) -> str:
    """The metrics label for what a refused request brought (never the credential itself)."""
    key, bearer = apikey.HEADER in headers, "Authorization" in headers
    return "both" if key and bearer else "api_key" if key else "bearer" if bearer else "none"


def authorise(route: CompiledRoute, identity: Identity) -> None:
    """The route's access rules: which tenants, which tiers, which scopes (all of them)."""
    tenant = identity.tenant
    if route.tenants and tenant.id not in route.tenants:
        raise Forbidden("this tenant may not use this route", code="tenant_not_allowed")
    if route.tiers and tenant.tier not in route.tiers:
        raise Forbidden("this tenant's tier may not use this route", code="tier_not_allowed")
    if route.scopes and not route.scopes <= identity.scopes:
        needed = " ".join(sorted(route.scopes))
        raise Forbidden(
            f"this route requires the scopes: {needed}"
            + ("" if identity.via_bearer else " (an API key carries no scopes: use a bearer token)"),
            code="insufficient_scope",
            headers=www_authenticate(f'{BEARER_CHALLENGE}, error="insufficient_scope", scope="{needed}"'),
        )
