"""Upstream resilience through real processes: one control plane, one data plane and three
instances of tests/integration/upstream_app.py for the whole module.

Every test makes its own route, and gives its targets a base path of its own
(``http://127.0.0.1:port/<test>``): target state (health, ejection, breaker) is kept per target
URL, so no test inherits another's. The upstream instances count what reaches them; that is
how "without touching the upstream" is checked.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.integration.harness import (
    ControlPlane,
    DataPlane,
    Processes,
    Response,
    free_port,
    http,
    start_control_plane,
    start_data_plane,
    wait_for,
)

pytestmark = pytest.mark.integration


@dataclass
class Upstream:
    name: str
    url: str

    def control(self, action: str, body: Any = None) -> Any:
        method = "GET" if action == "stats" else "POST"
        return http(method, f"{self.url}/_control/{action}", json_body=body if body is not None else {}).json()

    def hits(self) -> int:
        hits: int = self.control("stats")["hits"]
        return hits


@dataclass
class Env:
    cp: ControlPlane
    dp: DataPlane
    upstreams: list[Upstream]
    route_ids: dict[str, str]

    def route(self, name: str, targets: list[tuple[Upstream, int]], **fields: Any) -> str:
        """A route /<name>/* over ``targets`` (upstream, weight), live on the data plane; its path prefix."""
        for upstream, _ in targets:
            if upstream in self.upstreams:  # not the dead address of the connect-error test
                upstream.control("reset")
        body = {
            "path": f"/{name}/*",
            "upstreams": [{"url": f"{u.url}/{name}", "weight": w} for u, w in targets],
            "methods": ["GET", "POST", "PUT", "DELETE"],
            "auth_required": False,
            **fields,
        }
        created = self.cp.api("POST", "/admin/routes", body)
        assert created.status == 201, created.body
        self.route_ids[name] = created.json()["id"]
        self.wait_version(created.json()["config_version"])
        return f"/{name}"

    def wait_version(self, version: int) -> None:
        wait_for(lambda: self.dp.status()["config_version"] >= version, what=f"config version {version} on the DP")

    def request(
        self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None
    ) -> Response:
        return http(method, self.dp.proxy_url + path, headers=headers, body=body)


def _start_upstream(procs: Processes, name: str) -> Upstream:
    port = free_port()
    proc = procs.spawn(
        f"upstream-{name}", ["-m", "tests.integration.upstream_app", "--listen", f"127.0.0.1:{port}", "--name", name]
    )
    upstream = Upstream(name, f"http://127.0.0.1:{port}")

    def up() -> bool:
        assert proc.alive(), proc.log()
        try:
            upstream.control("stats")
        except OSError:
            return False
        return True

    wait_for(up, what=f"upstream {name}")
    return upstream


async def _admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def env(postgres_admin_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    name = f"tg_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(postgres_admin_url, f'CREATE DATABASE "{name}"'))
    database_url = postgres_admin_url.rsplit("/", 1)[0] + f"/{name}"
    procs = Processes(Path(tmp_path_factory.mktemp("upstream")))
    try:
        cp = start_control_plane(procs, database_url)
        dp = start_data_plane(procs, cp.cluster_addr, redis_url)
        yield Env(cp, dp, [_start_upstream(procs, n) for n in ("a", "b", "c")], {})
    except BaseException:
        print(procs.dump_logs())
        raise
    finally:
        procs.stop_all()
        asyncio.run(_admin(postgres_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _load(
    base: str, paths: list[str], method: str = "GET", concurrency: int = 32, headers: list[dict[str, str]] | None = None
) -> list[tuple[int, str, str]]:
    """Send one request per path, ``concurrency`` at a time: (status, instance, error code) each."""
    results: list[tuple[int, str, str]] = [(0, "", "")] * len(paths)
    queue = iter(range(len(paths)))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for i in queue:
                extra = headers[i] if headers is not None else None
                async with session.request(method, base + paths[i], headers=extra) as resp:
                    body = await resp.read()
                    code = ""
                    if resp.status >= 400 and resp.content_type == "application/json":
                        code = (await resp.json()).get("error", {}).get("code", "") if b'"error"' in body else ""
                    results[i] = (resp.status, resp.headers.get("X-Upstream-Instance", ""), code)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def load(env: Env, paths: list[str], **kwargs: Any) -> list[tuple[int, str, str]]:
    return asyncio.run(_load(env.dp.proxy_url, paths, **kwargs))


def _code(resp: Response) -> str:
    code: str = resp.json()["error"]["code"]
    return code


# -- load balancing ---------------------------------------------------------------------


def test_weighted_round_robin_within_5_percent_over_10000_requests(env: Env) -> None:
    a, b, c = env.upstreams
    prefix = env.route("wrr", [(a, 5), (b, 3), (c, 2)])

    results = load(env, [f"{prefix}/x"] * 10_000)

    assert all(status == 200 for status, _, _ in results)
    seen = Counter(instance for _, instance, _ in results)
    counted = {u.name: u.hits() for u in env.upstreams}
    assert dict(seen) == counted  # what the client saw is what each upstream served
    print(f"weighted round robin 5:3:2 over 10,000 requests: {dict(sorted(seen.items()))}")
    for name, weight in (("a", 5), ("b", 3), ("c", 2)):
        expected = 10_000 * weight / 10
        assert abs(seen[name] - expected) <= 0.05 * expected, (name, seen[name], expected)


def test_least_connections_prefers_the_idle_target(env: Env) -> None:
    a, b, _ = env.upstreams
    prefix = env.route("leastconn", [(a, 1), (b, 1)], load_balancing="least_connections")

    # Instance a takes 1.5 s per request, b answers at once: requests in flight pile up on a,
    # so least-connections sends nearly everything to b (round robin would split 20/20).
    results = load(env, [f"{prefix}/x?slow=a&delay_ms=1500"] * 40, concurrency=8)

    seen = Counter(instance for _, instance, _ in results)
    print(f"least connections, a slow and b fast, 40 requests: {dict(seen)}")
    assert all(status == 200 for status, _, _ in results)
    assert seen["a"] <= 8  # at most one per concurrent client: each pick sees a busy
    assert seen["b"] >= 32


def test_consistent_hash_sticks_per_header_and_moves_minimally(env: Env) -> None:
    a, b, c = env.upstreams
    prefix = env.route("chash", [(a, 1), (b, 1), (c, 1)], load_balancing="consistent_hash", hash_on="header:X-User")
    users = [f"user-{i}" for i in range(300)]
    paths = [f"{prefix}/x"] * len(users)
    headers = [{"X-User": u} for u in users]

    first = load(env, paths, headers=headers)
    again = load(env, paths, headers=headers)

    placed = {u: r[1] for u, r in zip(users, first, strict=True)}
    assert placed == {u: r[1] for u, r in zip(users, again, strict=True)}  # sticky
    spread = Counter(placed.values())
    print(f"consistent hash, 300 keys over 3 targets: {dict(spread)}")
    assert set(spread) == {"a", "b", "c"} and min(spread.values()) >= 50

    # Remove c: only c's keys move, each to a or b.
    patched = env.cp.api(
        "PATCH",
        f"/admin/routes/{env.route_ids['chash']}",
        {"upstreams": [{"url": f"{u.url}/chash", "weight": 1} for u in (a, b)]},
    )
    assert patched.status == 200, patched.body
    env.wait_version(patched.json()["config_version"])
    after = {u: r[1] for u, r in zip(users, load(env, paths, headers=headers), strict=True)}
    moved = [u for u in users if after[u] != placed[u]]
    assert sorted(moved) == sorted(u for u in users if placed[u] == "c")
    assert set(after.values()) == {"a", "b"}
    print(f"after removing c: {len(moved)} of 300 keys moved (c held {spread['c']})")

    # No key: balanced round robin, not all on one target.
    keyless = Counter(instance for _, instance, _ in load(env, [f"{prefix}/x"] * 20))
    assert keyless == Counter({"a": 10, "b": 10})


def test_consistent_hash_on_tenant_sticks_per_tenant(env: Env) -> None:
    a, b, c = env.upstreams
    prefix = env.route(
        "chash-tenant", [(a, 1), (b, 1), (c, 1)], load_balancing="consistent_hash", hash_on="tenant", auth_required=True
    )
    placements = []
    for i in range(6):
        tenant = env.cp.api("POST", "/admin/tenants", {"name": f"Sticky {i}", "tier": "enterprise"})
        assert tenant.status == 201, tenant.body
        env.wait_version(tenant.json()["config_version"])
        key = tenant.json()["api_key"]
        seen = {env.request("GET", f"{prefix}/x", {"X-API-Key": key}).headers["x-upstream-instance"] for _ in range(10)}
        assert len(seen) == 1, seen
        placements.append(seen.pop())
    print(f"consistent hash on tenant, 6 tenants: {placements}")


# -- health checks and outlier ejection ------------------------------------------------


def test_health_check_takes_a_target_out_and_back_in(env: Env) -> None:
    a, b, _ = env.upstreams
    prefix = env.route(
        "health", [(a, 1), (b, 1)], health_check={"path": "/health", "interval_s": 1, "healthy": 2, "unhealthy": 2}
    )
    wait_for(lambda: a.control("stats")["health_hits"] >= 1 and b.control("stats")["health_hits"] >= 1, what="probes")

    def instances(n: int = 10) -> set[str]:
        return {env.request("GET", f"{prefix}/x").headers.get("x-upstream-instance", "") for _ in range(n)}

    assert instances() == {"a", "b"}
    b.control("health", {"status": 500})
    wait_for(lambda: instances() == {"a"}, what="b taken out of service", timeout=15)
    hits = b.hits()
    assert instances(20) == {"a"} and b.hits() == hits

    b.control("health", {"status": 200})
    wait_for(lambda: instances() == {"a", "b"}, what="b back in service", timeout=15)

    # Every target unhealthy: 503 without touching any.
    a.control("health", {"status": 503})
    b.control("health", {"status": 503})
    wait_for(lambda: env.request("GET", f"{prefix}/x").status == 503, what="no healthy target", timeout=15)
    before = a.hits() + b.hits()
    resp = env.request("GET", f"{prefix}/x")
    assert resp.status == 503 and _code(resp) == "no_healthy_upstream"
    assert int(resp.headers["retry-after"]) >= 1
    assert a.hits() + b.hits() == before


def test_outlier_ejection_takes_out_a_failing_target_but_never_all(env: Env) -> None:
    a, b, _ = env.upstreams
    prefix = env.route("outlier", [(a, 1), (b, 1)])
    b.control("mode", {"status": 502})

    statuses = [env.request("GET", f"{prefix}/x").status for _ in range(40)]

    # Round robin alternates a, b: b's fifth 502 in a row ejects it; then only a answers.
    assert b.hits() == 5
    assert statuses.count(502) == 5 and statuses.count(200) == 35

    # With a failing too, a is not ejected: that would leave no target.
    a.control("mode", {"status": 502})
    statuses = [env.request("GET", f"{prefix}/x").status for _ in range(10)]
    assert statuses == [502] * 10 and a.control("stats")["hits"] == 35 + 10


# -- circuit breaker ---------------------------------------------------------------------


def test_circuit_breaker_opens_sheds_half_opens_and_closes(env: Env) -> None:
    (a, _, _) = env.upstreams
    breaker = {"failure_rate": 0.5, "min_requests": 10, "window_s": 10, "open_s": 2, "half_open_requests": 2}
    prefix = env.route("breaker", [(a, 1)], circuit_breaker=breaker)

    # closed: 5 successes, then failures until failures ≥ 50 % of ≥ 10 outcomes (the 10th).
    for _ in range(5):
        assert env.request("GET", f"{prefix}/x").status == 200
    a.control("mode", {"status": 500})
    for _ in range(5):
        assert env.request("GET", f"{prefix}/x").status == 500
    assert a.hits() == 10

    # open: answered 503 with Retry-After, the upstream untouched.
    for _ in range(20):
        resp = env.request("GET", f"{prefix}/x")
        assert resp.status == 503 and _code(resp) == "circuit_open"
        assert 1 <= int(resp.headers["retry-after"]) <= 2
    assert a.hits() == 10

    # half-open after open_s: a failing probe reopens at once.
    wait_for(lambda: a.hits() == 11 or env.request("GET", f"{prefix}/x").status == 500, what="a probe", timeout=10)
    assert a.hits() == 11
    resp = env.request("GET", f"{prefix}/x")
    assert resp.status == 503 and _code(resp) == "circuit_open" and a.hits() == 11

    # The upstream recovers: half_open_requests successful probes close the breaker.
    a.control("mode", {})
    wait_for(lambda: env.request("GET", f"{prefix}/x").status == 200, what="the first good probe", timeout=10)
    assert env.request("GET", f"{prefix}/x").status == 200
    statuses = [env.request("GET", f"{prefix}/x").status for _ in range(20)]
    assert statuses == [200] * 20
    assert a.hits() == 11 + 22


def test_open_breaker_sends_requests_to_the_other_target(env: Env) -> None:
    a, b, _ = env.upstreams
    breaker = {"failure_rate": 0.5, "min_requests": 4, "window_s": 10, "open_s": 30, "half_open_requests": 1}
    prefix = env.route("breaker-pick", [(a, 1), (b, 1)], circuit_breaker=breaker)
    a.control("mode", {"status": 503})

    statuses = [env.request("GET", f"{prefix}/x").status for _ in range(30)]

    # a's breaker opens after its 4th failure (requests 1, 3, 5, 7); every later request goes to b.
    assert a.hits() == 4 and b.hits() == 26
    assert statuses.count(503) == 4

    # A config change to the route keeps the target's breaker: a stays cut off.
    patched = env.cp.api("PATCH", f"/admin/routes/{env.route_ids['breaker-pick']}", {"timeout_ms": 5000})
    assert patched.status == 200, patched.body
    env.wait_version(patched.json()["config_version"])
    assert [env.request("GET", f"{prefix}/x").status for _ in range(10)] == [200] * 10
    assert a.hits() == 4 and b.hits() == 36


# -- retries and the retry budget --------------------------------------------------------


def test_retries_idempotent_requests_but_not_post(env: Env) -> None:
    a, b, _ = env.upstreams
    prefix = env.route("retry", [(a, 1), (b, 1)], retries=1)
    a.control("mode", {"status": 503})

    posts = [env.request("POST", f"{prefix}/x", body=b"{}").status for _ in range(4)]
    # POST is not retried: the tries that went to a came back as a's 503.
    assert a.control("stats")["by_method"].get("POST", 0) == posts.count(503) == 2
    assert posts.count(200) == 2

    a.control("reset")
    a.control("mode", {"status": 503})
    b.control("reset")
    gets = [env.request("GET", f"{prefix}/x").status for _ in range(6)]
    puts = [env.request("PUT", f"{prefix}/x").status for _ in range(2)]
    assert gets == [200] * 6 and puts == [200] * 2
    # Every try that reached a was retried on b (a is ejected after 5 failures in a row).
    stats_a, stats_b = a.control("stats"), b.control("stats")
    assert stats_b["hits"] == 8
    assert stats_a["hits"] == 3


def test_retry_budget_holds_under_a_failing_upstream(env: Env) -> None:
    a, _, _ = env.upstreams
    prefix = env.route("budget", [(a, 1)], retries=3)
    a.control("mode", {"status": 503})
    requests = 600

    started = time.monotonic()
    results = load(env, [f"{prefix}/x"] * requests, concurrency=16)
    elapsed = time.monotonic() - started

    assert all(status == 503 for status, _, _ in results)
    tries = a.hits()
    # Without a budget: 4 tries per request (2,400). The budget allows retries of 20 % of
    # requests plus 3 a second, counted over 10 s windows.
    windows = int(elapsed // 10) + 1
    allowed = requests + 0.2 * requests + 30 * windows
    print(f"retry budget: {requests} requests, retries=3, {tries} upstream tries in {elapsed:.1f}s (cap {allowed:.0f})")
    assert requests < tries <= allowed


# -- timeouts and errors -------------------------------------------------------------------


def test_hanging_upstream_is_504_and_retries_share_one_deadline(env: Env) -> None:
    a, b, _ = env.upstreams
    prefix = env.route("hang", [(a, 1), (b, 1)], timeout_ms=400, retries=5)
    a.control("mode", {"hang": True})
    b.control("mode", {"hang": True})

    resp = env.request("GET", f"{prefix}/x")

    assert resp.status == 504 and _code(resp) == "gateway_timeout"
    # One full try (400 ms), then the retry gets what is left of 2 x 400 ms: two tries, not six.
    assert a.hits() + b.hits() == 2


def test_connection_refused_is_502(env: Env) -> None:
    dead = Upstream("dead", f"http://127.0.0.1:{free_port()}")
    created = env.cp.api(
        "POST",
        "/admin/routes",
        {"path": "/refused/*", "upstream": dead.url, "methods": ["GET"], "auth_required": False},
    )
    assert created.status == 201, created.body
    env.wait_version(created.json()["config_version"])

    resp = env.request("GET", "/refused/x")

    assert resp.status == 502 and _code(resp) == "upstream_connect_error"

    # Beside a live target, with a retry: every GET is answered by the live one.
    a, _, _ = env.upstreams
    prefix = env.route("refused-retry", [(dead, 1), (a, 1)], retries=1)
    statuses = [env.request("GET", f"{prefix}/x").status for _ in range(12)]
    assert statuses == [200] * 12 and a.hits() == 12


def test_upstream_breaking_off_mid_body_cuts_the_client_connection(env: Env) -> None:
    a, _, _ = env.upstreams
    prefix = env.route("broken", [(a, 1)])

    with pytest.raises((OSError, HTTPException)):  # IncompleteRead or reset
        env.request("GET", f"{prefix}/x?close_early=1")
    # The broken connection was not reused: the next request is answered in full.
    resp = env.request("GET", f"{prefix}/x?chunks=64")
    assert resp.status == 200 and len(resp.body) == 64 * 1024
    # One warning line says what happened; no traceback.
    log = env.dp.proc.log()
    assert "upstream broke off mid-response" in log
    assert "Traceback" not in log
