"""data_plane.auth.apikey: X-API-Key lookup in a compiled snapshot."""

from __future__ import annotations

import pytest

from data_plane.auth import apikey
from data_plane.errors import Unauthenticated
from data_plane.snapshot import Compiled, compile_snapshot
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
def compiled() -> Compiled:
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
    return compile_snapshot(model.to_proto(snap))


def test_valid_key_returns_its_tenant(compiled: Compiled) -> None:
    assert apikey.authenticate(KEY_ACME, compiled) == ACME


def test_every_live_key_of_a_tenant_authenticates(compiled: Compiled) -> None:
    assert apikey.authenticate(KEY_ACME_ROTATED, compiled) == ACME


def test_key_maps_to_its_own_tenant(compiled: Compiled) -> None:
    # Inactive tenants are refused by authorisation (403), not here.
    assert apikey.authenticate(KEY_GLOBEX, compiled) == GLOBEX


def test_key_of_maximum_length_is_accepted(compiled: Compiled) -> None:
    assert len(KEY_MAX_LENGTH) == apikey.MAX_KEY_LENGTH
    assert apikey.authenticate(KEY_MAX_LENGTH, compiled) == LONG


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
def test_wrong_key_is_unauthenticated(key: str, compiled: Compiled) -> None:
    with pytest.raises(Unauthenticated) as exc_info:
        apikey.authenticate(key, compiled)
    assert exc_info.value.status == 401
    assert exc_info.value.code == "invalid_api_key"


@pytest.mark.parametrize("key", [KEY_ACME.upper(), KEY_ACME.lower(), KEY_ACME.swapcase(), KEY_GLOBEX.lower()])
def test_case_changed_key_is_unauthenticated(key: str, compiled: Compiled) -> None:
    with pytest.raises(Unauthenticated) as exc_info:
        apikey.authenticate(key, compiled)
    assert exc_info.value.code == "invalid_api_key"


def test_empty_key_is_unauthenticated(compiled: Compiled) -> None:
    with pytest.raises(Unauthenticated) as exc_info:
        apikey.authenticate("", compiled)
    assert exc_info.value.status == 401
    assert exc_info.value.code == "invalid_api_key"


def test_oversize_key_is_unauthenticated_even_if_its_hash_is_known(compiled: Compiled) -> None:
    assert len(KEY_OVERSIZE) == apikey.MAX_KEY_LENGTH + 1
    assert compiled.tenants_by_key_hash[keys.hash_key(KEY_OVERSIZE)] == OVERSIZE
    with pytest.raises(Unauthenticated) as exc_info:
        apikey.authenticate(KEY_OVERSIZE, compiled)
    assert exc_info.value.code == "invalid_api_key"


def test_huge_key_is_unauthenticated(compiled: Compiled) -> None:
    with pytest.raises(Unauthenticated):
        apikey.authenticate("tg_" + "a" * 1_000_000, compiled)


def test_non_ascii_key_is_unauthenticated(compiled: Compiled) -> None:
    with pytest.raises(Unauthenticated):
        apikey.authenticate("tg_caf\u00e9\udcff", compiled)


def test_revoked_key_is_unauthenticated() -> None:
    # Revocation means the key is absent from the next snapshot.
    snap = Snapshot(version=4, built_at_ms=0, tenants=(ACME,), api_keys=(), routes=())
    compiled = compile_snapshot(model.to_proto(snap))
    with pytest.raises(Unauthenticated):
        apikey.authenticate(KEY_ACME, compiled)


def test_error_message_does_not_echo_the_key(compiled: Compiled) -> None:
    with pytest.raises(Unauthenticated) as exc_info:
        apikey.authenticate("tg_secret-guess-123", compiled)
    assert "tg_secret-guess-123" not in str(exc_info.value)
    assert exc_info.value.message == "invalid API key"


def test_header_name() -> None:
    assert apikey.HEADER == "X-API-Key"
