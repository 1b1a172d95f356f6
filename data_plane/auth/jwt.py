"""JWT bearer tokens: verified against the issuers in the snapshot, never anything the token says.

For each snapshot an index ``iss`` → issuers is built. A token is routed by its (unverified)
``iss``, ``aud`` and header ``alg``/``kid`` to exactly one issuer and the keys that issuer holds,
then verified by PyJWT with that one algorithm pinned:

- ``alg`` must be one of the issuer's algorithms; ``none`` never is, and an issuer never mixes
  HS256 with an asymmetric algorithm (checked by the snapshot), so a public key cannot be
  replayed as an HMAC secret. Each key serves only the algorithms its type fits.
- ``kid`` is a dictionary key into the issuer's key set, nothing more; ``jku``, ``x5u``,
  ``jwk`` and ``x5c`` headers are ignored (keys come only from the snapshot) and a ``crit``
  header is refused (no extension is understood).
- ``exp``, ``iat``, ``iss``, ``aud`` and ``sub`` are required; ``iss`` matches exactly,
  ``aud`` must be or contain the issuer's audience; :data:`LEEWAY_S` of clock skew is allowed.
- The tenant is the issuer's tenant. For the gateway's own tokens (``POST /oauth/token``) it is
  the tenant of the OAuth client named by ``sub``, which must still be in the snapshot: a revoked
  client's tokens stop working with the next snapshot.

Verified tokens are cached until their ``exp`` in a bounded map keyed by the whole token. The
verifier, and so the cache, belongs to one snapshot: a deleted issuer or client stops working
as soon as the next snapshot is swapped in.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import jwt as pyjwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from data_plane.auth.identity import INVALID_TOKEN_CHALLENGE, Identity, www_authenticate
from data_plane.errors import Unauthenticated
from shared.snapshot import HMAC_JWT_ALGORITHMS, JWT_ALGORITHMS, JwtIssuer, OAuthClient, SigningKey, Tenant

log = logging.getLogger(__name__)

MAX_TOKEN_BYTES: Final = 8192
LEEWAY_S: Final = 30
REQUIRED_CLAIMS: Final = ("exp", "iat", "iss", "aud", "sub")
CACHE_SIZE: Final = 10_000
# The gateway's own tokens (data_plane.auth.oauth signs them). A tenant's issuer with this
# ``iss`` is never consulted: gateway tokens are checked only against the gateway's keys.
GATEWAY_ISSUER: Final = "tenantgate"
GATEWAY_AUDIENCE: Final = "tenantgate"
TENANT_CLAIM: Final = "tenant_id"

_RSA_ALGORITHMS: Final = frozenset({"RS256", "RS384", "RS512", "PS256"})
_EC_CURVES: Final = {"ES256": "secp256r1", "ES384": "secp384r1"}
_OPTIONS: Final[Any] = {"require": list(REQUIRED_CLAIMS)}
_CHALLENGE: Final = www_authenticate(INVALID_TOKEN_CHALLENGE)

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey


class InvalidToken(Unauthenticated):
    """401 with ``WWW-Authenticate: Bearer …, error="invalid_token"``."""

    code = "invalid_token"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers=_CHALLENGE)


# --- keys ---


@dataclass(frozen=True, slots=True)
class _Key:
    kid: str | None
    key: PublicKey | bytes
    algorithms: frozenset[str]  # the issuer's algorithms this key can verify


@dataclass(frozen=True, slots=True)
class KeySet:
    """An issuer's verification keys, by ``kid``; keys without a ``kid`` serve any token."""

    by_kid: Mapping[str, _Key]
    unnamed: tuple[_Key, ...]
    all: tuple[_Key, ...]

    def candidates(self, kid: str | None, alg: str) -> list[_Key]:
        if kid is None:
            return [k for k in self.all if alg in k.algorithms]
        named = self.by_kid.get(kid)
        if named is not None:
            return [named] if alg in named.algorithms else []
        return [k for k in self.unnamed if alg in k.algorithms]


def _fits(key: PublicKey, algorithm: str) -> bool:
    if isinstance(key, rsa.RSAPublicKey):
        return algorithm in _RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        return _EC_CURVES.get(algorithm) == key.curve.name
    return algorithm == "EdDSA"


def _public_key(jwk: dict[str, Any]) -> PublicKey:
    kty = jwk.get("kty")
    parsed: object
    if kty == "RSA":
        parsed = RSAAlgorithm.from_jwk(jwk)
    elif kty == "EC":
        parsed = ECAlgorithm.from_jwk(jwk)
    elif kty == "OKP":
        parsed = OKPAlgorithm.from_jwk(jwk)
    else:
        raise ValueError(f"unsupported kty {kty!r}")
    if isinstance(parsed, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        parsed = parsed.public_key()
    if isinstance(parsed, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        parsed = parsed.public_key()
    if not isinstance(parsed, PublicKey):
        raise ValueError(f"unsupported key {type(parsed).__name__}")
    return parsed


@functools.lru_cache(maxsize=4096)
def keyset(jwks_json: str, algorithms: frozenset[str], secret: bytes = b"") -> KeySet:
    """Parse an issuer's keys once per process (not per snapshot: most snapshots change other
    things). Keys that cannot serve any of ``algorithms`` are dropped."""
    if algorithms <= HMAC_JWT_ALGORITHMS:
        only = _Key(None, secret, algorithms)
        return KeySet({}, (only,), (only,))
    keys: list[_Key] = []
    for jwk in json.loads(jwks_json).get("keys", []):
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
            continue
        try:
            key = _public_key(jwk)
        except (ValueError, TypeError, pyjwt.PyJWTError) as exc:
            log.warning("skipping an issuer key that does not parse", extra={"kid": jwk.get("kid"), "error": str(exc)})
            continue
        allowed = algorithms if not isinstance(jwk.get("alg"), str) else algorithms & {jwk["alg"]}
        fitting = frozenset(a for a in allowed if _fits(key, a))
        kid = jwk.get("kid")
        if fitting:
            keys.append(_Key(kid if isinstance(kid, str) else None, key, fitting))
    by_kid = {k.kid: k for k in keys if k.kid is not None}
    return KeySet(by_kid, tuple(k for k in keys if k.kid is None), tuple(keys))


def signing_keyset(keys: Iterable[SigningKey]) -> KeySet:
    """The gateway's public keys, each only for its own algorithm and only by its ``kid``."""
    named = {}
    for k in keys:
        public = _public_key(json.loads(k.public_jwk_json))
        named[k.kid] = _Key(k.kid, public, frozenset({k.algorithm}))
    return KeySet(named, (), ())


# --- issuers ---


@dataclass(frozen=True, slots=True)
class _Issuer:
    issuer: str
    audience: str
    algorithms: frozenset[str]
    # A tenant's issuer: its tenant and key source. The gateway's: tenant None, keys given.
    tenant: Tenant | None
    jwks_json: str = ""
    secret: bytes = b""
    keys: KeySet | None = None

    def keyset(self) -> KeySet:
        if self.keys is not None:
            return self.keys
        return keyset(self.jwks_json, self.algorithms, self.secret)


def _segment(data: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
        value = json.loads(raw)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidToken("the token is not a well-formed JWT") from None
    if not isinstance(value, dict):
        raise InvalidToken("the token is not a well-formed JWT")
    return value


def _scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """``scope`` (RFC 8693: space separated) or ``scp`` (a list, as some providers send it);
    either form is read from either claim."""
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            return frozenset(value.split())
        if isinstance(value, list):
            return frozenset(s for s in value if isinstance(s, str))
    return frozenset()


class Verifier:
    """Verifies bearer tokens for one snapshot; see the module docstring."""

    __slots__ = ("_by_iss", "_cache", "_cache_size", "_clients", "_clock", "_tenants")

    def __init__(
        self,
        issuers: Iterable[JwtIssuer],
        tenants: Mapping[str, Tenant],
        clients: Mapping[str, OAuthClient],
        signing_keys: Iterable[SigningKey],
        *,
        clock: Callable[[], float] = time.time,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        by_iss: dict[str, list[_Issuer]] = {}
        for i in issuers:
            if i.issuer == GATEWAY_ISSUER:
                continue
            entry = _Issuer(
                i.issuer, i.audience, frozenset(i.algorithms), tenants[i.tenant_id], i.jwks_json, i.hs256_secret
            )
            by_iss.setdefault(i.issuer, []).append(entry)
        gateway = tuple(signing_keys)
        if gateway:
            algorithms = frozenset(k.algorithm for k in gateway)
            by_iss[GATEWAY_ISSUER] = [
                _Issuer(GATEWAY_ISSUER, GATEWAY_AUDIENCE, algorithms, None, keys=signing_keyset(gateway))
            ]
        self._by_iss = {iss: tuple(entries) for iss, entries in by_iss.items()}
        self._clients = clients
        self._tenants = tenants
        self._clock = clock
        self._cache_size = cache_size
        self._cache: dict[str, tuple[float, Identity]] = {}

    def verify(self, token: str) -> Identity:
        """The identity ``token`` proves; :class:`InvalidToken` saying why not."""
        hit = self._cache.get(token)
        if hit is not None:
            if self._clock() < hit[0]:
                return hit[1]
            del self._cache[token]
        if len(token) > MAX_TOKEN_BYTES:
            raise InvalidToken(f"the token is larger than {MAX_TOKEN_BYTES} bytes")
        parts = token.split(".")
        if len(parts) != 3 or not all(parts):
            raise InvalidToken("the token is not a well-formed JWT")
        header, payload = _segment(parts[0]), _segment(parts[1])
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in JWT_ALGORITHMS:
            raise InvalidToken("the token's algorithm is not accepted")
        if "crit" in header or "b64" in header:
            raise InvalidToken("the token uses a critical header extension that is not supported")
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("the token's kid is not a string")
        issuer = self._issuer(payload)
        if alg not in issuer.algorithms:
            raise InvalidToken("the token's algorithm is not accepted for its issuer")
        candidates = issuer.keyset().candidates(kid, alg)
        if not candidates:
            raise InvalidToken("no key of the token's issuer matches its kid and algorithm")
        claims = self._decode(token, alg, issuer, candidates)
        identity = self._identity(issuer, claims)
        self._remember(token, float(claims["exp"]), identity)
        return identity

    def _issuer(self, payload: Mapping[str, Any]) -> _Issuer:
        iss, aud = payload.get("iss"), payload.get("aud")
        if not isinstance(iss, str):
            raise InvalidToken("the token has no iss claim")
        entries = self._by_iss.get(iss)
        if entries is None:
            raise InvalidToken("the token's issuer is not trusted")
        if isinstance(aud, str):
            audiences: tuple[object, ...] = (aud,)
        elif isinstance(aud, list):
            audiences = tuple(aud)
        else:
            raise InvalidToken("the token has no aud claim")
        matching = [e for e in entries if e.audience in audiences]
        if not matching:
            raise InvalidToken("the token's audience is not accepted")
        if len(matching) > 1:
            # Two tenants' issuers share this iss and the token names both audiences.
            raise InvalidToken("the token's audience names more than one tenant")
        return matching[0]

    @staticmethod
    def _decode(token: str, alg: str, issuer: _Issuer, candidates: list[_Key]) -> dict[str, Any]:
        for candidate in candidates:
            try:
                claims: dict[str, Any] = pyjwt.decode(
                    token,
                    candidate.key,
                    algorithms=[alg],
                    audience=issuer.audience,
                    issuer=issuer.issuer,
                    leeway=LEEWAY_S,
                    options=_OPTIONS,
                )
            except pyjwt.InvalidSignatureError:
                continue
            except pyjwt.ExpiredSignatureError:
                raise InvalidToken("the token has expired") from None
            except pyjwt.ImmatureSignatureError:
                raise InvalidToken("the token is not valid yet") from None
            except pyjwt.MissingRequiredClaimError as exc:
                raise InvalidToken(f"the token has no {exc.claim} claim") from None
            except pyjwt.PyJWTError:
                raise InvalidToken("the token is invalid") from None
            if not claims["sub"] or not isinstance(claims["sub"], str):
                raise InvalidToken("the token's sub claim is empty")
            return claims
        raise InvalidToken("the token's signature does not verify")

    def _identity(self, issuer: _Issuer, claims: Mapping[str, Any]) -> Identity:
        scopes = _scopes(claims)
        if issuer.tenant is not None:
            return Identity(issuer.tenant, scopes, True, claims["sub"])
        client = self._clients.get(claims["sub"])
        if client is None:
            raise InvalidToken("the token's OAuth client has been revoked")
        tenant = self._client_tenant(client)
        if claims.get(TENANT_CLAIM) != tenant.id:
            raise InvalidToken("the token's tenant does not match its client")
        return Identity(tenant, scopes & frozenset(client.scopes), True, client.client_id)

    def _client_tenant(self, client: OAuthClient) -> Tenant:
        tenant = self._tenants.get(client.tenant_id)
        if tenant is None:
            raise InvalidToken("the token's tenant no longer exists")
        return tenant

    def _remember(self, token: str, exp: float, identity: Identity) -> None:
        cache = self._cache
        if len(cache) >= self._cache_size:
            # Oldest first: dicts keep insertion order, so this is a FIFO, which is as good as an
            # LRU for tokens that are re-sent until they expire.
            del cache[next(iter(cache))]
        cache[token] = (exp, identity)
