"""Cost of the authenticate/authorise stage per request: ``python -m bench.auth_micro``.

Runs :meth:`data_plane.auth.stage.Auth.admit` (what the pipeline calls) on real headers for an
anonymous request on an open route (the floor), an API key, and bearer JWTs of RS256, ES256,
EdDSA and HS256 issuers, each cold (a token never seen: parse, key lookup, signature check,
claims) and cached (the same token again: one dict lookup). Also the cost of issuing a token at
``POST /oauth/token`` (client secret check and an ES256 signature). Prints µs per call, the best
of a few rounds.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import jwt as pyjwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from multidict import CIMultiDict, CIMultiDictProxy

from data_plane.auth.stage import Auth
from data_plane.router import CompiledRoute, Router
from shared import keys
from shared.snapshot import ApiKey, JwtIssuer, OAuthClient, Route, SigningKey, Snapshot, Tenant, Upstream

TOKENS = 300
ROUNDS = 7
CACHED_CALLS = 20_000
HS_SECRET = b"h" * 48


def _route(path: str, auth_required: bool) -> Route:
    return Route(
        id=path,
        path=path + "/*",
        methods=("GET",),
        upstreams=(Upstream("http://127.0.0.1:9000", 1),),
        auth_required=auth_required,
        rate_limit=0,
        timeout_ms=30_000,
        strip_prefix=False,
        priority=0,
    )


def _compiled_route(router: Router, path: str) -> CompiledRoute:
    match = router.match(path, "GET", "", {})
    assert match is not None
    return match.route


class World:
    def __init__(self) -> None:
        tenant = Tenant("t1", "T1", "premium", 1000, 50_000, 0, 0, True)
        self.api_key = keys.generate_api_key()
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.ed = ed25519.Ed25519PrivateKey.generate()
        gateway = ec.generate_private_key(ec.SECP256R1())
        pem = gateway.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        self.secret = keys.generate_token("tgcs_")

        def jwks(public: Any, kind: Any, kid: str) -> str:
            return json.dumps({"keys": [{**kind.to_jwk(public, as_dict=True), "kid": kid}]})

        self.snapshot = Snapshot(
            version=1,
            built_at_ms=0,
            tenants=(tenant,),
            api_keys=(ApiKey("k1", "t1", keys.hash_key(self.api_key)),),
            routes=(_route("/api", True), _route("/open", False)),
            jwt_issuers=(
                JwtIssuer("i1", "t1", "rs", "aud", ("RS256",), jwks(self.rsa.public_key(), RSAAlgorithm, "r")),
                JwtIssuer("i2", "t1", "es", "aud", ("ES256",), jwks(self.ec.public_key(), ECAlgorithm, "e")),
                JwtIssuer("i3", "t1", "ed", "aud", ("EdDSA",), jwks(self.ed.public_key(), OKPAlgorithm, "d")),
                JwtIssuer("i4", "t1", "hs", "aud", ("HS256",), '{"keys":[]}', HS_SECRET),
            ),
            oauth_clients=(OAuthClient("o1", "t1", "tgc_bench", keys.hash_key(self.secret), ("a", "b")),),
            signing_keys=(
                SigningKey("g1", "ES256", pem, json.dumps(ECAlgorithm.to_jwk(gateway.public_key(), as_dict=True))),
            ),
        )
        router = Router(self.snapshot.routes)
        self.route = _compiled_route(router, "/api/x")
        self.open_route = _compiled_route(router, "/open/x")

    def auth(self) -> Auth:
        return Auth(self.snapshot, {t.id: t for t in self.snapshot.tenants})

    def tokens(self, alg: str, count: int) -> list[str]:
        key: Any
        iss, key, kid = {
            "RS256": ("rs", self.rsa, "r"),
            "ES256": ("es", self.ec, "e"),
            "EdDSA": ("ed", self.ed, "d"),
            "HS256": ("hs", HS_SECRET, None),
        }[alg]
        now = int(time.time())
        return [
            pyjwt.encode(
                {"iss": iss, "aud": "aud", "sub": f"user-{n}", "iat": now, "exp": now + 3600, "scope": "a b"},
                key,
                algorithm=alg,
                headers={"kid": kid} if kid else None,
            )
            for n in range(count)
        ]


def _headers(**values: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({"Host": "api.example.com", "User-Agent": "bench", **values}))


def _best_us(run: Callable[[], int]) -> float:
    best = float("inf")
    for _ in range(ROUNDS):
        started = time.perf_counter()
        calls = run()
        best = min(best, (time.perf_counter() - started) / calls)
    return best * 1e6


def measure() -> dict[str, float]:
    world = World()
    results: dict[str, float] = {}

    def repeat(headers: CIMultiDictProxy[str], route: CompiledRoute) -> Callable[[], int]:
        def run() -> int:
            auth = world.auth()
            auth.admit(headers, "", route)  # warm: the token cache and the issuer's parsed keys
            admit = auth.admit
            for _ in range(CACHED_CALLS):
                admit(headers, "", route)
            return CACHED_CALLS

        return run

    results["anonymous, open route"] = _best_us(repeat(_headers(), world.open_route))
    results["API key"] = _best_us(repeat(_headers(**{"X-API-Key": world.api_key}), world.route))
    for alg in ("RS256", "ES256", "EdDSA", "HS256"):
        bearers = [_headers(Authorization=f"Bearer {t}") for t in world.tokens(alg, TOKENS)]

        def cold(bearers: list[CIMultiDictProxy[str]] = bearers) -> int:
            auth = world.auth()
            auth.admit(bearers[0], "", world.route)  # the issuer's keys parsed once per process, not per token
            for headers in bearers[1:]:
                auth.admit(headers, "", world.route)
            return len(bearers) - 1

        results[f"{alg} JWT, cold"] = _best_us(cold)
        results[f"{alg} JWT, cached"] = _best_us(repeat(bearers[0], world.route))
    grant_form = {"grant_type": "client_credentials", "client_id": "tgc_bench", "client_secret": world.secret}

    def issue() -> int:
        service = world.auth().token_service
        for _ in range(TOKENS):
            service.grant(grant_form, None)
        return TOKENS

    results["POST /oauth/token (grant + ES256 sign)"] = _best_us(issue)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.auth_micro", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    results = measure()
    if args.json:
        print(json.dumps(results))
        return 0
    width = max(len(name) for name in results)
    print(f"{'credential':<{width}}  {'µs/request':>10}")
    for name, us in results.items():
        print(f"{name:<{width}}  {us:>10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
