"""Router lookup cost at 10 and at 10,000 routes: ``python -m bench.router_micro``.

The route table mixes exact, parameter and wildcard patterns, a fifth of them with a host
condition and a tenth with a header condition, as a multi-tenant deployment has them; the
lookups mix hits of every kind (through the host/header variants too) and misses. It prints
microseconds per ``Router.match`` for each size and the ratio: the trie's cost depends on the
path's depth, so the ratio stays near 1 where a linear scan's would be near 1,000.

A second table is the worst case for a path trie: every route on the same path ``/api/*``,
told apart only by its tenant's hostname (``t<i>.example.com``).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence

from data_plane.router import Router, request_host
from shared.snapshot import Route, Upstream

SIZES = (10, 10_000)
LOOKUPS = 20_000
ROUNDS = 5


def make_routes(n: int) -> list[Route]:
    """``n`` routes over ``n/3`` services: exact, parameter and wildcard patterns, some of
    them with host or header conditions."""
    routes: list[Route] = []
    for i in range(n):
        service = f"svc{i // 3}"
        kind = i % 3
        path = (
            f"/{service}/items"
            if kind == 0
            else f"/{service}/users/{{id}}/orders"
            if kind == 1
            else f"/{service}/files/*"
        )
        routes.append(
            Route(
                id=f"r{i}",
                path=path,
                methods=("GET", "POST"),
                upstreams=(Upstream("http://127.0.0.1:9000", 1),),
                auth_required=True,
                rate_limit=0,
                timeout_ms=30_000,
                strip_prefix=False,
                priority=0,
                host=f"t{i % 50}.example.com" if i % 5 == 0 else "",
                headers=(("x-version", "2"),) if i % 10 == 1 else (),
            )
        )
    return routes


def make_host_routes(n: int) -> list[Route]:
    return [
        Route(
            id=f"h{i}",
            path="/api/*",
            methods=("GET",),
            upstreams=(Upstream("http://127.0.0.1:9000", 1),),
            auth_required=True,
            rate_limit=0,
            timeout_ms=30_000,
            strip_prefix=False,
            priority=0,
            host=f"t{i}.example.com",
        )
        for i in range(n)
    ]


def make_host_lookups(n: int, count: int, rng: random.Random) -> list[tuple[str, str, str, dict[str, str]]]:
    return [
        (f"/api/v1/items/{rng.randrange(1000)}", "GET", f"t{rng.randrange(n)}.example.com", {}) for _ in range(count)
    ]


def make_lookups(n: int, count: int, rng: random.Random) -> list[tuple[str, str, str, dict[str, str]]]:
    services = max(1, n // 3)
    lookups: list[tuple[str, str, str, dict[str, str]]] = []
    for _ in range(count):
        s = rng.randrange(services)
        kind = rng.randrange(4)
        path = (
            f"/svc{s}/items"
            if kind == 0
            else f"/svc{s}/users/{rng.randrange(10**6)}/orders"
            if kind == 1
            else f"/svc{s}/files/a/b/c.txt"
            if kind == 2
            else f"/nosuch{s}/x"
        )
        host = request_host(f"t{rng.randrange(60)}.example.com:8000")
        headers = {"x-version": "2"} if rng.random() < 0.3 else {}
        lookups.append((path, "GET", host, headers))
    return lookups


def measure(n: int, seed: int = 7, *, by_host: bool = False) -> dict[str, float]:
    rng = random.Random(seed)
    router = Router(make_host_routes(n) if by_host else make_routes(n))
    lookups = make_host_lookups(n, LOOKUPS, rng) if by_host else make_lookups(n, LOOKUPS, rng)
    match = router.match
    hits = sum(1 for path, method, host, headers in lookups if match(path, method, host, headers) is not None)
    best = float("inf")
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for path, method, host, headers in lookups:
            match(path, method, host, headers)
        best = min(best, time.perf_counter() - started)
    return {"routes": n, "us_per_lookup": best / len(lookups) * 1e6, "hit_ratio": hits / len(lookups)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.router_micro", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    tables = {
        "mixed": [measure(n) for n in SIZES],
        "same_path_by_host": [measure(n, by_host=True) for n in SIZES],
    }
    ratios = {name: rows[-1]["us_per_lookup"] / rows[0]["us_per_lookup"] for name, rows in tables.items()}
    if args.json:
        print(json.dumps({"results": tables, "ratios": ratios}))
        return 0
    for name, rows in tables.items():
        print(f"{name}:")
        print(f"{'routes':>8}  {'µs/lookup':>10}  {'hits':>5}")
        for r in rows:
            print(f"{int(r['routes']):>8}  {r['us_per_lookup']:>10.2f}  {r['hit_ratio']:>5.0%}")
        print(
            f"ratio {SIZES[-1]:,} / {SIZES[0]:,} routes: {ratios[name]:.2f}x "
            f"(a linear scan would be ~{SIZES[-1] // SIZES[0]}x)\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
