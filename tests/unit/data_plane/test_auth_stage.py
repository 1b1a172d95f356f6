"""data_plane.auth.stage: which credential wins, conflicts, open routes and authorisation."""

from __future__ import annotations

import json
import time
from typing import Any

import jwt as pyjwt
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from data_plane.auth.identity import Identity
from data_plane.auth.stage import Auth
from data_plane.errors import BadRequest, Forbidden, GatewayError, Unauthenticated
from data_plane.router import CompiledRoute, Router
from shared import keys
from shared.snapshot import ApiKey, JwtIssuer, Route, Snapshot, Tenant, Upstream

pytestmark = pytest.mark.unit

SECRET = b"k" * 40
A = Tenant("a", "A", "premium", 60, 1000, 0, 0, True)
B = Tenant("b", "B", "free", 60, 1000, 0, 0, True)
OFF = Tenant("off", "Off", "free", 60, 1000, 0, 0, False)
KEY = {t.id: f"tg_key-of-{t.id}-0123456789" for t in (A, B, OFF)}


def _route(path: str, **fields: Any) -> Route:
    return Route(
        id=path,
        path=path + "/*",
        methods=("GET",),
        upstreams=(Upstream("http://svc:1", 1),),
        auth_required=fields.pop("auth_required", True),
        rate_limit=0,
        timeout_ms=1000,
        strip_prefix=False,
        priority=0,
        **fields,
    )


ROUTES = (
    _route("/strict"),
    _route("/open", auth_required=False),
    _route("/only-b", tenants=("b",)),
    _route("/premium", auth_required=False, tiers=("premium",)),
    _route("/scoped", scopes=("read", "write")),
)
SNAPSHOT = Snapshot(
    version=1,
    built_at_ms=0,
    tenants=(A, B, OFF),
    api_keys=tuple(ApiKey(f"k-{t}", t, keys.hash_key(k)) for t, k in KEY.items()),
    routes=ROUTES,
    jwt_issuers=(
        JwtIssuer("ia", "a", "iss-a", "aud", ("HS256",), json.dumps({"keys": []}), SECRET),
        JwtIssuer("ioff", "off", "iss-off", "aud", ("HS256",), json.dumps({"keys": []}), SECRET),
    ),
)
ROUTER = Router(ROUTES)


@pytest.fixture(scope="module")
def auth() -> Auth:
    return Auth(SNAPSHOT, {t.id: t for t in SNAPSHOT.tenants})


def _at(path: str) -> CompiledRoute:
    match = ROUTER.match(path + "/x", "GET", "", {})
    assert match is not None
    return match.route


def _token(iss: str = "iss-a", **claims: Any) -> str:
    now = int(time.time())
    return pyjwt.encode({"iss": iss, "aud": "aud", "sub": "u", "iat": now, "exp": now + 60, **claims}, SECRET, "HS256")


def _admit(auth: Auth, path: str, *headers: tuple[str, str], query: str = "") -> Identity | None:
    return auth.admit(CIMultiDictProxy(CIMultiDict(headers)), query, _at(path))


def _refused(auth: Auth, path: str, *headers: tuple[str, str], query: str = "") -> GatewayError:
    with pytest.raises(GatewayError) as exc_info:
        _admit(auth, path, *headers, query=query)
    return exc_info.value


def test_api_key_names_its_tenant_and_grants_no_scope(auth: Auth) -> None:
    identity = _admit(auth, "/strict", ("x-api-key", KEY["a"]))
    assert identity is not None and identity.tenant == A and identity.scopes == frozenset()
    assert not identity.via_bearer


def test_bearer_token_names_its_issuers_tenant(auth: Auth) -> None:
    identity = _admit(auth, "/strict", ("Authorization", f"Bearer {_token(scope='read')}"))
    assert identity is not None and identity.tenant == A and identity.scopes == {"read"} and identity.via_bearer


def test_no_credential_is_401_with_both_challenges(auth: Auth) -> None:
    exc = _refused(auth, "/strict")
    assert isinstance(exc, Unauthenticated) and exc.code == "missing_credentials"
    assert exc.headers == (
        ("WWW-Authenticate", 'ApiKey realm="tenantgate", header="X-API-Key", Bearer realm="tenantgate"'),
    )


def test_other_authorization_schemes_are_not_credentials(auth: Auth) -> None:
    assert _refused(auth, "/strict", ("Authorization", "Basic dTpw")).code == "missing_credentials"
    assert _admit(auth, "/open", ("Authorization", "Basic dTpw")) is None


def test_key_and_token_of_one_tenant_agree(auth: Auth) -> None:
    identity = _admit(auth, "/strict", ("X-API-Key", KEY["a"]), ("Authorization", f"Bearer {_token(scope='s')}"))
    assert identity is not None and identity.tenant == A and identity.scopes == {"s"}  # the token's


def test_key_and_token_of_two_tenants_conflict(auth: Auth) -> None:
    exc = _refused(auth, "/strict", ("X-API-Key", KEY["b"]), ("Authorization", f"Bearer {_token()}"))
    assert isinstance(exc, BadRequest) and exc.code == "conflicting_credentials"


@pytest.mark.parametrize("name", ["X-API-Key", "Authorization"])
def test_repeated_credential_header_is_400(auth: Auth, name: str) -> None:
    value = KEY["a"] if name == "X-API-Key" else f"Bearer {_token()}"
    assert _refused(auth, "/open", (name, value), (name, value)).code == "conflicting_credentials"


def test_key_in_query_is_400_even_on_an_open_route(auth: Auth) -> None:
    exc = _refused(auth, "/open", query=f"api_key={KEY['a']}")
    assert isinstance(exc, BadRequest) and exc.code == "credential_in_query" and KEY["a"] not in exc.message


def test_open_route_serves_invalid_credentials_anonymously(auth: Auth) -> None:
    assert _admit(auth, "/open") is None
    assert _admit(auth, "/open", ("X-API-Key", "tg_wrong")) is None
    assert _admit(auth, "/open", ("Authorization", "Bearer not.a.jwt")) is None
    # A valid credential beside an invalid one still identifies the tenant.
    identity = _admit(auth, "/open", ("X-API-Key", KEY["b"]), ("Authorization", "Bearer not.a.jwt"))
    assert identity is not None and identity.tenant == B


def test_strict_route_refuses_an_invalid_credential_even_beside_a_valid_one(auth: Auth) -> None:
    assert _refused(auth, "/strict", ("X-API-Key", KEY["a"]), ("Authorization", "Bearer x.y.z")).code == "invalid_token"
    assert _refused(auth, "/strict", ("X-API-Key", "tg_nope")).code == "invalid_api_key"


def test_route_rules_need_a_credential_even_without_auth_required(auth: Auth) -> None:
    assert _refused(auth, "/premium").code == "missing_credentials"
    assert _refused(auth, "/premium", ("X-API-Key", "tg_wrong")).code == "invalid_api_key"
    assert _refused(auth, "/premium", ("X-API-Key", KEY["b"])).code == "tier_not_allowed"
    identity = _admit(auth, "/premium", ("X-API-Key", KEY["a"]))
    assert identity is not None and identity.tenant == A


def test_tenant_not_on_the_routes_list_is_403(auth: Auth) -> None:
    exc = _refused(auth, "/only-b", ("Authorization", f"Bearer {_token(tenant_id='b')}"))
    assert isinstance(exc, Forbidden) and exc.code == "tenant_not_allowed" and exc.tenant == A


def test_inactive_tenant_is_403_with_either_credential(auth: Auth) -> None:
    for header in (("X-API-Key", KEY["off"]), ("Authorization", f"Bearer {_token('iss-off')}")):
        exc = _refused(auth, "/strict", header)
        assert isinstance(exc, Forbidden) and exc.code == "tenant_inactive" and "inactive" in exc.message


def test_every_required_scope_is_needed(auth: Auth) -> None:
    assert _admit(auth, "/scoped", ("Authorization", f"Bearer {_token(scope='read write x')}")) is not None
    exc = _refused(auth, "/scoped", ("Authorization", f"Bearer {_token(scope='read')}"))
    assert exc.code == "insufficient_scope"
    assert exc.headers == (
        ("WWW-Authenticate", 'Bearer realm="tenantgate", error="insufficient_scope", scope="read write"'),
    )
    assert _refused(auth, "/scoped", ("X-API-Key", KEY["a"])).code == "insufficient_scope"


def test_refusals_are_counted_by_credential_kind_and_code(auth: Auth) -> None:
    from prometheus_client import REGISTRY

    def count(kind: str, code: str) -> float:
        value = REGISTRY.get_sample_value("tenantgate_auth_failures_total", {"credential": kind, "code": code})
        return value or 0.0

    before = (
        count("none", "missing_credentials"),
        count("api_key", "invalid_api_key"),
        count("both", "conflicting_credentials"),
    )
    _refused(auth, "/strict")
    _refused(auth, "/strict", ("X-API-Key", "tg_wrong"))
    _refused(auth, "/strict", ("X-API-Key", KEY["b"]), ("Authorization", f"Bearer {_token()}"))
    after = (
        count("none", "missing_credentials"),
        count("api_key", "invalid_api_key"),
        count("both", "conflicting_credentials"),
    )
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1]
