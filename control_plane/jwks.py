"""JSON Web Key Sets: which public keys a tenant's JWT issuer may hold, and the fetcher that keeps
the keys of ``jwks_uri`` issuers current.

The checks here serve both the admin API (refuse bad input, saying why) and the fetcher (keep
the keys an identity provider publishes that one of the issuer's algorithms can use). The
fetched keys travel to data planes in the snapshot: a data plane never calls an identity provider.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Callable, Collection
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import jwt
from aiohttp.abc import AbstractResolver, ResolveResult
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

import shared
from control_plane.cluster.snapshots import SnapshotCache
from control_plane.errors import ControlPlaneError, StoreUnavailable
from control_plane.store import issuers as issuer_store
from control_plane.store.db import Database
from shared.snapshot import MAX_JWKS_KEYS

log = logging.getLogger(__name__)

REFRESH_INTERVAL_S: Final = 600.0
# A failed fetch is retried sooner than a good one is refreshed, so that a new issuer whose
# identity provider blinked does not stay keyless for a whole refresh interval.
ERROR_RETRY_S: Final = 60.0
FETCH_TIMEOUT_S: Final = 5.0
MAX_JWKS_BYTES: Final = 256 * 1024
MAX_CONCURRENT_FETCHES: Final = 8
MAX_KID_LENGTH: Final = 256
MAX_PEM_CHARS: Final = 16_384
MIN_RSA_BITS: Final = 2048
EMPTY_JWKS: Final = '{"keys":[]}'

_RSA_ALGORITHMS: Final = frozenset({"RS256", "RS384", "RS512", "PS256"})
_EC_CURVES: Final = {"ES256": "secp256r1", "ES384": "secp384r1"}
# JWK members that carry private or symmetric key material (RFC 7518 §6).
_PRIVATE_MEMBERS: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_METADATA_HOSTS: Final = frozenset({"metadata.google.internal", "metadata"})
_LOOPBACK_NAMES: Final = frozenset({"localhost", "localhost.localdomain"})

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey


class JwksFetchError(ControlPlaneError):
    """A jwks_uri could not be fetched or held no usable key; recorded as the issuer's jwks_error."""


# --- key material ---


def describe_key(key: object) -> str:
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return f"RSA-{key.key_size} key"
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return f"EC {key.curve.name} key"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519 key"
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448 key"
    return f"{type(key).__name__} key"


def key_fits(key: object, algorithm: str) -> bool:
    """Whether a token signed with ``algorithm`` can be verified with the public ``key``."""
    if isinstance(key, rsa.RSAPublicKey):
        return algorithm in _RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        return _EC_CURVES.get(algorithm) == key.curve.name
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return algorithm == "EdDSA"
    return False


def _check_strength(key: object) -> None:
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise ValueError(f"RSA keys need at least {MIN_RSA_BITS} bits, this one has {key.key_size}")


def check_jwk(jwk: object, algorithms: Collection[str]) -> dict[str, Any]:
    """Return ``jwk`` if it is a public signing key that one of ``algorithms`` can use; raise
    ValueError saying why not."""
    if not isinstance(jwk, dict):
        raise ValueError("must be a JSON object")
    kty = jwk.get("kty")
    if not isinstance(kty, str) or not kty:
        raise ValueError("needs a kty")
    if kty == "oct":
        raise ValueError("symmetric (oct) keys are not accepted; use hs256_secret")
    private = sorted(_PRIVATE_MEMBERS & jwk.keys())
    if private:
        raise ValueError(f"holds private key members {private}; give only public keys")
    if jwk.get("use", "sig") != "sig":
        raise ValueError('use must be "sig"')
    kid = jwk.get("kid")
    if kid is not None and (not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID_LENGTH):
        raise ValueError(f"kid must be a string of 1..{MAX_KID_LENGTH} characters")
    alg = jwk.get("alg")
    if alg is not None and alg not in algorithms:
        raise ValueError(f"alg {alg!r} is not one of the issuer's algorithms {sorted(algorithms)}")
    try:
        parsed = jwt.PyJWK(jwk, algorithm=alg or ("EdDSA" if kty == "OKP" else None))
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        raise ValueError(f"is not a usable JWK: {exc}") from None
    _check_strength(parsed.key)
    if not any(key_fits(parsed.key, a) for a in algorithms):
        raise ValueError(f"an {describe_key(parsed.key)} fits none of the algorithms {sorted(algorithms)}")
    return jwk


def _keys_of(jwks: object) -> list[Any]:
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        raise ValueError('must be a JWKS object: {"keys": [...]}')
    keys: list[Any] = jwks["keys"]
    return keys


def check_jwks(jwks: object, algorithms: Collection[str]) -> dict[str, Any]:
    """Validate an inline JWKS strictly (every key must be usable); return ``{"keys": [...]}``."""
    keys = _keys_of(jwks)
    if not 0 < len(keys) <= MAX_JWKS_KEYS:
        raise ValueError(f"must hold 1..{MAX_JWKS_KEYS} keys, not {len(keys)}")
    kids: set[str] = set()
    for n, jwk in enumerate(keys):
        try:
            check_jwk(jwk, algorithms)
        except ValueError as exc:
            raise ValueError(f"keys[{n}] {exc}") from None
        kid = jwk.get("kid")
        if kid is not None:
            if kid in kids:
                raise ValueError(f"keys[{n}] repeats kid {kid!r}")
            kids.add(kid)
    return {"keys": keys}


def usable_keys(jwks: object, algorithms: Collection[str]) -> dict[str, Any]:
    """The keys of a fetched JWKS that ``algorithms`` can use (others are dropped, as an identity
    provider may publish keys for other purposes); raise ValueError if none is left."""
    keys = _keys_of(jwks)
    kept: list[dict[str, Any]] = []
    seen: set[str] = set()
    for jwk in keys:
        try:
            check_jwk(jwk, algorithms)
        except ValueError:
            continue
        kid = jwk.get("kid")
        if kid is not None and kid in seen:
            continue
        if kid is not None:
            seen.add(kid)
        kept.append(jwk)
        if len(kept) == MAX_JWKS_KEYS:
            break
    if not kept:
        raise ValueError(f"none of its {len(keys)} keys fits the algorithms {sorted(algorithms)}")
    return {"keys": kept}


def load_public_key_pem(pem: str) -> PublicKey:
    """Parse a PEM public key (SubjectPublicKeyInfo or PKCS#1 RSA) or X.509 certificate."""
    data = pem.strip().encode()
    if b"PRIVATE KEY" in data:
        raise ValueError("is a private key; give the public key")
    try:
        if data.startswith(b"-----BEGIN CERTIFICATE-----"):
            key: object = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError("is not a PEM public key or certificate") from None
    if not isinstance(key, PublicKey):
        raise ValueError(f"holds an unsupported {describe_key(key)}")
    return key


def check_public_key_pem(pem: str, algorithms: Collection[str]) -> None:
    """Raise ValueError unless ``pem`` parses and every one of ``algorithms`` can use it."""
    key = load_public_key_pem(pem)
    _check_strength(key)
    unfit = sorted(a for a in algorithms if not key_fits(key, a))
    if unfit:
        raise ValueError(f"an {describe_key(key)} does not fit the algorithms {unfit}")


@functools.lru_cache(maxsize=4096)
def pem_to_jwks_json(pem: str) -> str:
    """The JWKS (one key, no kid: it matches any token) of a stored PEM key, for the snapshot.
    Cached: the snapshot is rebuilt on every change and the PEM never changes."""
    key = load_public_key_pem(pem)
    jwk: dict[str, Any]
    if isinstance(key, rsa.RSAPublicKey):
        jwk = dict(RSAAlgorithm.to_jwk(key, as_dict=True))
    elif isinstance(key, ec.EllipticCurvePublicKey):
        jwk = dict(ECAlgorithm.to_jwk(key, as_dict=True))
    else:
        jwk = dict(OKPAlgorithm.to_jwk(key, as_dict=True))
    jwk["use"] = "sig"
    return json.dumps({"keys": [jwk]}, separators=(",", ":"), sort_keys=True)


def snapshot_pem_jwks(issuer_id: str, pem: str) -> str:
    """:func:`pem_to_jwks_json` for the snapshot builder, which must not fail on one bad row."""
    try:
        return pem_to_jwks_json(pem)
    except ValueError as exc:  # checked at creation; only a changed crypto library could get here
        log.error(
            "stored PEM key no longer parses; issuer has no keys", extra={"issuer_id": issuer_id, "error": str(exc)}
        )
        return EMPTY_JWKS


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url) of a public RSA, EC or OKP key."""
    members = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x")}[jwk["kty"]]
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).decode().rstrip("=")


def kids_of(jwks_json: str) -> list[str | None]:
    return [k.get("kid") for k in json.loads(jwks_json).get("keys", []) if isinstance(k, dict)]


# --- where keys may be fetched from ---


def _forbidden_address(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_link_local or addr.is_unspecified or addr.is_multicast


def check_jwks_uri(url: str) -> None:
    """Raise ValueError unless ``url`` is an https URL (http only for loopback hosts) that is not
    link-local: cloud metadata services must never be reachable through the control plane."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port validates it
    except ValueError as exc:
        raise ValueError(f"is not a valid URL: {exc}") from None
    if parts.scheme not in ("https", "http"):
        raise ValueError("must be an https URL")
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise ValueError("must name a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials")
    if parts.fragment or "#" in url:
        raise ValueError("must not have a fragment")
    try:
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        addr = None
    if host in _METADATA_HOSTS or (addr is not None and _forbidden_address(addr)):
        raise ValueError("link-local and metadata addresses are not allowed")
    loopback = host in _LOOPBACK_NAMES or (addr is not None and addr.is_loopback)
    if parts.scheme == "http" and not loopback:
        raise ValueError("must be https (http only for loopback hosts)")


class _NoLinkLocalResolver(AbstractResolver):
    """Resolves as usual but drops link-local addresses, so a DNS name cannot lead the fetcher
    to a metadata service either."""

    def __init__(self) -> None:
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if not _forbidden_address(ipaddress.ip_address(r["host"]))]
        if not allowed:
            raise OSError(f"{host} resolves only to link-local or unusable addresses")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def new_session() -> aiohttp.ClientSession:
    """The HTTP client for fetching JWKS; the caller closes it."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(resolver=_NoLinkLocalResolver(), limit=MAX_CONCURRENT_FETCHES),
        timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S),
        headers={"User-Agent": f"tenantgate/{shared.__version__}", "Accept": "application/json"},
    )


async def fetch_jwks(session: aiohttp.ClientSession, url: str, algorithms: Collection[str]) -> dict[str, Any]:
    """GET ``url`` (no redirects, at most :data:`MAX_JWKS_BYTES`) and return its usable keys;
    raise :class:`JwksFetchError` saying what went wrong."""
    try:
        check_jwks_uri(url)
    except ValueError as exc:
        raise JwksFetchError(f"jwks_uri {exc}") from None
    try:
        async with session.get(url, allow_redirects=False) as resp:
            if resp.status != 200:
                hint = " (redirects are not followed)" if 300 <= resp.status < 400 else ""
                raise JwksFetchError(f"HTTP {resp.status} from jwks_uri{hint}")
            if resp.content_length is not None and resp.content_length > MAX_JWKS_BYTES:
                raise JwksFetchError(f"the JWKS is larger than {MAX_JWKS_BYTES} bytes")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise JwksFetchError(f"the JWKS is larger than {MAX_JWKS_BYTES} bytes")
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
        raise JwksFetchError(f"cannot fetch jwks_uri: {reason}") from exc
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise JwksFetchError("the jwks_uri response is not JSON") from None
    try:
        return usable_keys(document, algorithms)
    except ValueError as exc:
        raise JwksFetchError(f"the JWKS {exc}") from None


# --- the fetcher ---


class JwksFetcher:
    """Fetches every jwks_uri issuer's keys when the issuer appears and every
    :data:`REFRESH_INTERVAL_S` after; a failure is recorded as the issuer's ``jwks_error`` and
    retried after :data:`ERROR_RETRY_S`, the last good keys staying in the snapshot.

    It wakes on every new snapshot version (so an issuer created through any replica is fetched
    at once) and when the next issuer falls due. Each replica fetches on its own; the config
    version is bumped only when the stored keys change, so replicas agreeing cost nothing.
    """

    def __init__(
        self,
        db: Database,
        cache: SnapshotCache,
        *,
        clock: Callable[[], float] = time.monotonic,
        refresh_s: float = REFRESH_INTERVAL_S,
        retry_s: float = ERROR_RETRY_S,
    ) -> None:
        self._db = db
        self._cache = cache
        self._clock = clock
        self._refresh_s = refresh_s
        self._retry_s = retry_s
        self._due: dict[str, float] = {}  # issuer id -> clock() time of its next fetch
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = new_session()
        self._task = asyncio.create_task(self._run(), name="jwks-fetcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _run(self) -> None:
        seen = 0
        while True:
            try:
                await self.refresh_due()
            except StoreUnavailable as exc:
                log.warning("JWKS refresh skipped: Postgres unavailable", extra={"error": str(exc)})
            except Exception:  # a bug must not stop every later refresh
                log.exception("JWKS refresh failed")
            wait = self._retry_s if not self._due else max(0.0, min(self._due.values()) - self._clock())
            with contextlib.suppress(TimeoutError):  # not wait_for: see NodeRegistry._run
                async with asyncio.timeout(wait):
                    seen = (await self._cache.wait_newer(seen)).version

    async def refresh_due(self) -> None:
        """Fetch every jwks_uri issuer whose turn it is, a few at a time."""
        assert self._session is not None, "start() first"
        issuers = await issuer_store.list_uri_issuers(self._db)
        now = self._clock()
        self._due = {i.id: self._due.get(i.id, now + self._initial_wait(i)) for i in issuers}
        due = [i for i in issuers if self._due[i.id] <= now]
        if not due:
            return
        limit = asyncio.Semaphore(MAX_CONCURRENT_FETCHES)

        async def one(issuer: issuer_store.UriIssuer) -> None:
            async with limit:
                await self._refresh(issuer)

        await asyncio.gather(*(one(i) for i in due))

    def _initial_wait(self, issuer: issuer_store.UriIssuer) -> float:
        """Time until a first fetch by this replica: none if the stored keys are stale or failed."""
        if issuer.fetched_age_s is None or issuer.jwks_error is not None:
            return 0.0
        return max(0.0, self._refresh_s - issuer.fetched_age_s)

    async def _refresh(self, issuer: issuer_store.UriIssuer) -> None:
        assert self._session is not None
        try:
            jwks = await fetch_jwks(self._session, issuer.jwks_uri, issuer.algorithms)
        except JwksFetchError as exc:
            self._due[issuer.id] = self._clock() + self._retry_s
            log.warning(
                "JWKS fetch failed; keeping the last good keys",
                extra={"issuer_id": issuer.id, "jwks_uri": issuer.jwks_uri, "error": exc.args[0]},
            )
            await issuer_store.save_fetch_error(self._db, issuer.id, exc.args[0])
            return
        self._due[issuer.id] = self._clock() + self._refresh_s
        version = await issuer_store.save_fetched(self._db, issuer.id, jwks)
        if version is not None:
            self._cache.poke()
            log.info(
                "JWKS keys changed",
                extra={"issuer_id": issuer.id, "keys": len(jwks["keys"]), "config_version": version},
            )
