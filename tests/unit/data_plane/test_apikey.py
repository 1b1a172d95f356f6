"""data_plane.auth.apikey: X-API-Key lookup in a compiled snapshot, and keys in the query string."""

from __future__ import annotations

import pytest

from data_plane.auth import apikey
from data_plane.auth.stage import Auth
from data_plane.errors import Unauthenticated
from shared import keys
from shared import snapshot as model
from shared.snapshot import ApiKey, Route, Snapshot, Tenant, Upstream

pytestmark = pytest.mark.unit

KEY_ACME = "tg_acme-0123456789abcdefghijklmnopqrstuvwxyzABCD"
KEY_ACME_ROTATED = "tg_acme-rotated-0123456789abcdefghijklmnopqrstu"
KEY_GLOBEX = "tg_GLOBEX-0123456789abcdefghijklmnopqrstuvwxyz"
KEY_MAX_LENGTH = "tg_" + "k" * (apikey.MAX_KEY_LENGTH - 3)
KEY_OVERSIZE = "tg_" + "k" * (apikey.MAX_KEY_LENGTH - 2)


def _tenant(id: str, tier: str = "basic", *, is_active: bool = True) -> Tenant:
    return Tenant(
        id=id,
        name=id.title(),
        tier=tier,
        rate_limit_per_minute=60,
        rate_limit_per_hour=1000,
        monthly_quota=0,
        max_concurrency=0,
        is_active=is_active,
    )


ACME = _tenant("acme", "premium")
GLOBEX = _tenant("globex", "free", is_active=False)
LONG = _tenant("long")
OVERSIZE = _tenant("oversize")


@pytest.fixture(scope="module")
def auth() -> Auth:
    snap = Snapshot(
        version=3,
        built_at_ms=1_700_000_000_000,
        tenants=(ACME, GLOBEX, LONG, OVERSIZE),
        api_keys=(
            ApiKey("k-acme", "acme", keys.hash_key(KEY_ACME)),
            ApiKey("k-acme-2", "acme", keys.hash_key(KEY_ACME_ROTATED)),
            ApiKey("k-globex", "globex", keys.hash_key(KEY_GLOBEX)),
            ApiKey("k-long", "long", keys.hash_key(KEY_MAX_LENGTH)),
            # Present in the table, so only the length check can refuse it.
            ApiKey("k-oversize", "oversize", keys.hash_key(KEY_OVERSIZE)),
        ),
        routes=(
            Route(
                id="r1",
                path="/api/*",
                methods=("GET",),
                upstreams=(Upstream("http://svc:3000", 1),),
                auth_required=True,
                rate_limit=0,
                timeout_ms=1000,
                strip_prefix=False,
                priority=0,
            ),
        ),
    )
    decoded = model.from_proto(model.to_proto(snap))
    return Auth(decoded, {t.id: t for t in decoded.tenants})


def test_valid_key_returns_its_tenant(auth: Auth) -> None:
    assert auth.keys.lookup(KEY_ACME).tenant == ACME


def test_every_live_key_of_a_tenant_authenticates(auth: Auth) -> None:
    assert auth.keys.lookup(KEY_ACME_ROTATED).tenant == ACME


def test_key_maps_to_its_own_tenant(auth: Auth) -> None:
    # Inactive tenants are refused by authorisation (403), not here.
    assert auth.keys.lookup(KEY_GLOBEX).tenant == GLOBEX


def test_key_of_maximum_length_is_accepted(auth: Auth) -> None:
    assert len(KEY_MAX_LENGTH) == apikey.MAX_KEY_LENGTH
    assert auth.keys.lookup(KEY_MAX_LENGTH).tenant == LONG


@pytest.mark.parametrize(
    "key",
    [
        "tg_acme-0123456789abcdefghijklmnopqrstuvwxyzABCE",  # last character changed
        "tg_unknown",
        KEY_ACME[:-1],  # truncated
        KEY_ACME + "x",  # extended
        " " + KEY_ACME,
        KEY_ACME + " ",
        KEY_ACME + "\n",
        keys.hash_key(KEY_ACME).hex(),  # the stored hash is not a credential
    ],
)
def test_wrong_key_is_unauthenticated(key: str, auth: Auth) -> None:
    with pytest.raises(Unauthenticated) as exc_info:
        auth.keys.lookup(key)
    assert exc_info.value.status == 401
    assert exc_info.value.code == "invalid_api_key"


@pytest.mark.parametrize("key", [KEY_ACME.upper(), KEY_ACME.lower(), KEY_ACME.swapcase(), KEY_GLOBEX.lower()])
def test_case_changed_key_is_unauthenticated(key: str, auth: Auth) -> None:
    with pytest.raises(Unauthenticated) as exc_info:
        auth.keys.lookup(key)
    assert exc_info.value.code == "invalid_api_key"


def test_empty_key_is_unauthenticated(auth: Auth) -> None:
    with pytest.raises(Unauthenticated) as exc_info:
        auth.keys.lookup("")
    assert exc_info.value.status == 401
    assert exc_info.value.code == "invalid_api_key"


def test_oversize_key_is_unauthenticated_even_if_its_hash_is_known(auth: Auth) -> None:
    assert len(KEY_OVERSIZE) == apikey.MAX_KEY_LENGTH + 1
    assert len(auth.keys) == 5  # its hash is in the table: only the length check refuses it
    with pytest.raises(Unauthenticated) as exc_info:
        auth.keys.lookup(KEY_OVERSIZE)
    assert exc_info.value.code == "invalid_api_key"


def test_huge_key_is_unauthenticated(auth: Auth) -> None:
    with pytest.raises(Unauthenticated):
        auth.keys.lookup("tg_" + "a" * 1_000_000)


def test_non_ascii_key_is_unauthenticated(auth: Auth) -> None:
    with pytest.raises(Unauthenticated):
        auth.keys.lookup("tg_caf\u00e9\udcff")


def test_revoked_key_is_unauthenticated() -> None:
    # Revocation means the key is absent from the next snapshot.
    snap = Snapshot(version=4, built_at_ms=0, tenants=(ACME,), api_keys=(), routes=())
    auth = Auth(snap, {ACME.id: ACME})
    with pytest.raises(Unauthenticated):
        auth.keys.lookup(KEY_ACME)


def test_error_message_does_not_echo_the_key(auth: Auth) -> None:
    with pytest.raises(Unauthenticated) as exc_info:
        auth.keys.lookup("tg_secret-guess-123")
    assert "tg_secret-guess-123" not in str(exc_info.value)
    assert exc_info.value.message == "invalid API key"


def test_header_name() -> None:
    assert apikey.HEADER == "X-API-Key"


@pytest.mark.parametrize(
    "query",
    [
        "api_key=tg_x",
        "API_KEY=tg_x",
        "apikey=tg_x",
        "ApiKey=tg_x",
        "key=tg_x",
        "x-api-key=tg_x",
        "X-Api-Key=tg_x",
        "access_token=eyJ",
        "page=2&api_key=tg_x",
        "api%5Fkey=tg_x",  # the name percent-encoded
        "%6B%65%79=tg_x",
        "api_key",  # even without a value
    ],
)
def test_key_in_the_query_string_is_detected(query: str) -> None:
    assert apikey.in_query(query)


@pytest.mark.parametrize("query", ["", "page=2", "keys=3", "monkey=1", "q=api_key", "sort=key&x=1", "token_type=a"])
def test_other_query_strings_are_not_credentials(query: str) -> None:
    assert not apikey.in_query(query)
