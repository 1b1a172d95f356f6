"""The gateway under test: a fresh Postgres database (created here, dropped at the end), a Redis
database number of the run's own, one control plane and data planes started with the real
``tenantgate control-plane`` / ``tenantgate data-plane`` commands, and the tenants, keys,
routes and JWT issuer the scenarios use, created through the admin API.

Features are detected, not assumed: what the admin API accepts and what the data plane
actually does (a tenant with a limit of 2 a minute either meets a 429 or it does not) go in
the report, so a figure is never credited to a feature that was off.
"""

from __future__ import annotations

import asyncio
import fcntl
import secrets
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bench.procs import REPO_ROOT, Service, Stack, answers, free_port, http, tenantgate_command, wait_until

MAX_LIMIT: Final = 2_147_483_647
MAX_QUOTA: Final = 2**62
JWT_ISSUER: Final = "https://issuer.bench.example/"
JWT_AUDIENCE: Final = "tenantgate-bench"
PROPAGATION_TIMEOUT_S: Final = 300.0

# Request paths of the scenarios; every upstream answers any path.
PLAIN_PATH: Final = "/plain/items/42"
FULL_PATH: Final = "/full/items/42"


# -- Postgres and Redis ----------------------------------------------------------------------


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


async def _admin_execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def create_database(admin_url: str) -> tuple[str, str]:
    name = f"tg_bench_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin_execute(admin_url, f'CREATE DATABASE "{name}"'))
    return name, _with_database(admin_url, name)


def drop_database(admin_url: str, name: str) -> None:
    asyncio.run(_admin_execute(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@dataclass
class RedisClaim:
    """A Redis database number nobody else on this machine uses while the lock is held (the
    test suite claims numbers the same way, so a benchmark never flushes a test's counters)."""

    url: str
    lock: IO[bytes] | None

    def release(self) -> None:
        if self.lock is not None:
            _flush(self.url)
            self.lock.close()


def _flush(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


def claim_redis(base_url: str | None) -> RedisClaim:
    if base_url is not None:
        return RedisClaim(base_url, None)
    numbers = list(range(1, 16))
    secrets.SystemRandom().shuffle(numbers)
    for db in numbers:
        lock = open(Path(tempfile.gettempdir()) / f"tenantgate-test-redis-db-{db}.lock", "wb")  # noqa: SIM115
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        url = f"redis://127.0.0.1:6379/{db}"
        _flush(url)
        return RedisClaim(url, lock)
    raise RuntimeError("every Redis database 1-15 is claimed by a test run; pass --redis-url")


# -- processes -------------------------------------------------------------------------------


@dataclass
class ControlPlane:
    service: Service
    admin_url: str
    cluster_addr: str
    token: str

    def api(self, method: str, path: str, body: Any = None) -> Any:
        answer = http(method, self.admin_url + path, headers={"Authorization": f"Bearer {self.token}"}, json_body=body)
        if answer.status >= 400:
            raise AdminError(method, path, answer.status, answer.body.decode(errors="replace"))
        return answer.json() if answer.body else None

    def try_api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        answer = http(method, self.admin_url + path, headers={"Authorization": f"Bearer {self.token}"}, json_body=body)
        try:
            return answer.status, answer.json()
        except ValueError:
            return answer.status, answer.body.decode(errors="replace")


class AdminError(RuntimeError):
    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path} -> {status}: {body[:500]}")
        self.status = status


@dataclass
class DataPlane:
    service: Service
    proxy_url: str
    status_url: str
    workers: int

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = http("GET", self.status_url + "/status", timeout=5).json()
        return result

    def worker_pids(self) -> list[int]:
        """The processes that serve requests: the node itself with one worker, else its workers."""
        from bench.procs import children

        if self.workers <= 1:
            return [self.service.pid]
        return children(self.service.pid)

    def wait_version(self, version: int, timeout: float = PROPAGATION_TIMEOUT_S) -> float:
        """Seconds until every worker serves ``version`` or newer (the status port answers one
        worker at a time, so it is asked until all have been seen at it)."""
        start = time.monotonic()
        seen: set[str] = set()

        def ready() -> bool:
            st = self.status()
            if st.get("config_version", 0) >= version:
                seen.add(str(st.get("node_id")))
            return len(seen) >= self.workers

        wait_until(self.service, ready, f"data plane at config version {version}", timeout)
        return time.monotonic() - start


CLUSTER_TOKEN: Final = "bench-cluster-token-" + secrets.token_hex(16)
ADMIN_TOKEN: Final = "bench-admin-token-" + secrets.token_hex(16)


def _source_env(src: Path | None) -> dict[str, str]:
    """Run the gateway from ``src`` (an exported commit) instead of the installed tree."""
    return {"PYTHONPATH": str(src)} if src is not None else {}


def start_control_plane(stack: Stack, database_url: str, cpus: str | None, src: Path | None) -> ControlPlane:
    admin_port, cluster_port = free_port(), free_port()
    env = {
        "TENANTGATE_DATABASE_URL": database_url,
        "TENANTGATE_ADMIN_TOKEN": ADMIN_TOKEN,
        "TENANTGATE_CLUSTER_TOKEN": CLUSTER_TOKEN,
        "TENANTGATE_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
        "TENANTGATE_CLUSTER_LISTEN": f"127.0.0.1:{cluster_port}",
        "TENANTGATE_LOG_LEVEL": "warning",
        "TENANTGATE_LOG_FORMAT": "text",
        **_source_env(src),
    }
    service = stack.spawn(
        "control-plane", [*tenantgate_command(), "control-plane"], env=env, cpus=cpus, cwd=src or REPO_ROOT
    )
    cp = ControlPlane(service, f"http://127.0.0.1:{admin_port}", f"127.0.0.1:{cluster_port}", ADMIN_TOKEN)
    wait_until(service, lambda: answers(cp.admin_url + "/readyz", 200), "control plane /readyz")
    return cp


def start_data_plane(
    stack: Stack, cp: ControlPlane, redis_url: str, workers: int, cpus: str | None, name: str, src: Path | None
) -> DataPlane:
    proxy_port, status_port = free_port(), free_port()
    env = {
        "TENANTGATE_CP_ADDR": cp.cluster_addr,
        "TENANTGATE_CLUSTER_TOKEN": CLUSTER_TOKEN,
        "TENANTGATE_REDIS_URL": redis_url,
        "TENANTGATE_PROXY_LISTEN": f"127.0.0.1:{proxy_port}",
        "TENANTGATE_STATUS_LISTEN": f"127.0.0.1:{status_port}",
        "TENANTGATE_DATA_DIR": str(stack.workdir / f"{name}-data"),
        "TENANTGATE_NODE_ID": name,
        "TENANTGATE_WORKERS": str(workers),
        # Access logs (if any) at info would measure the terminal, not the gateway.
        "TENANTGATE_LOG_LEVEL": "warning",
        "TENANTGATE_LOG_FORMAT": "json",
        **_source_env(src),
    }
    service = stack.spawn(name, [*tenantgate_command(), "data-plane"], env=env, cpus=cpus, cwd=src or REPO_ROOT)
    dp = DataPlane(service, f"http://127.0.0.1:{proxy_port}", f"http://127.0.0.1:{status_port}", workers)
    wait_until(service, lambda: answers(dp.status_url + "/readyz", 200), f"{name} /readyz")
    return dp


# -- what the scenarios use ------------------------------------------------------------------


@dataclass
class Fixture:
    """Credentials and facts the scenarios need, and the features found on."""

    plain_key: str
    full_key: str
    jwt_token: str | None
    version: int
    features: dict[str, Any] = field(default_factory=dict)
    jwt_skip_reason: str | None = None


def _rsa_pair() -> tuple[Any, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key, pem.decode()


def configure(cp: ControlPlane, upstream_url: str) -> Fixture:
    """Tenants, routes and an issuer for the small scenarios.

    - ``plain``: every limit 0 (none), route without a limit: key auth only.
    - ``full``: every limit set (far above what a benchmark sends, so nothing is rejected)
      and a per-route limit: each request runs the whole limits stage.
    """
    plain = cp.api(
        "POST",
        "/admin/tenants",
        {
            "name": "bench-plain",
            "tier": "enterprise",
            "rate_limit_per_minute": 0,
            "rate_limit_per_hour": 0,
            "monthly_quota": 0,
            "max_concurrency": 0,
        },
    )
    full_limits = {"rate_limit_per_minute": MAX_LIMIT, "rate_limit_per_hour": MAX_LIMIT, "monthly_quota": MAX_QUOTA}
    full = cp.api("POST", "/admin/tenants", {"name": "bench-full", "tier": "enterprise", **full_limits})
    cp.api("POST", "/admin/routes", {"path": "/plain/*", "upstream": upstream_url, "methods": ["GET", "POST"]})
    route_limit_status, _ = cp.try_api(
        "POST",
        "/admin/routes",
        {"path": "/full/*", "upstream": upstream_url, "methods": ["GET", "POST"], "rate_limit": MAX_LIMIT},
    )
    if route_limit_status >= 400:
        cp.api("POST", "/admin/routes", {"path": "/full/*", "upstream": upstream_url, "methods": ["GET", "POST"]})
    # A tenant that must be limited after 2 requests a minute, if the data plane limits at all.
    probe = cp.api("POST", "/admin/tenants", {"name": "bench-limit-probe", "rate_limit_per_minute": 2})

    token: str | None = None
    jwt_reason: str | None = None
    private_key, public_pem = _rsa_pair()
    status, body = cp.try_api(
        "POST",
        f"/admin/tenants/{full['id']}/jwt-issuers",
        {"issuer": JWT_ISSUER, "audience": JWT_AUDIENCE, "public_key_pem": public_pem, "algorithms": ["RS256"]},
    )
    if status >= 400:
        jwt_reason = f"the admin API refused an RS256 issuer ({status}: {str(body)[:200]})"
    else:
        now = int(time.time())
        claims = {"iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "sub": "bench-client", "iat": now, "exp": now + 6 * 3600}
        token = jwt.encode(claims, private_key, algorithm="RS256")
    last = cp.api("GET", "/admin/config")
    return Fixture(
        plain_key=plain["api_key"],
        full_key=full["api_key"],
        jwt_token=token,
        version=int(last["version"]),
        features={
            "route_rate_limit_field": route_limit_status < 400,
            "_probe_key": probe["api_key"],
            "_full_tenant": full["id"],
        },
        jwt_skip_reason=jwt_reason,
    )


def detect(cp: ControlPlane, dp: DataPlane, fixture: Fixture) -> dict[str, Any]:
    """What the data plane really does today."""
    probe_key = fixture.features.pop("_probe_key")
    full_tenant = fixture.features.pop("_full_tenant")
    statuses = [
        http("GET", dp.proxy_url + PLAIN_PATH, headers={"X-API-Key": probe_key}, timeout=10).status for _ in range(4)
    ]
    features: dict[str, Any] = dict(fixture.features)
    features["key_auth"] = http("GET", dp.proxy_url + PLAIN_PATH, headers={"X-API-Key": fixture.plain_key}).status
    features["key_auth"] = features["key_auth"] == 200
    features["rate_limit_enforced"] = 429 in statuses
    features["rate_limit_probe_statuses"] = statuses
    usage_status, _ = cp.try_api("GET", f"/admin/tenants/{full_tenant}/usage")
    features["usage_api"] = usage_status == 200
    features["dp_metrics_endpoint"] = http("GET", dp.status_url + "/metrics", timeout=5).status == 200
    if fixture.jwt_token is not None:
        answer = http("GET", dp.proxy_url + FULL_PATH, headers={"Authorization": f"Bearer {fixture.jwt_token}"})
        features["jwt_rs256"] = answer.status == 200
        if answer.status != 200:
            fixture.jwt_skip_reason = (
                f"the data plane answered {answer.status} to a valid RS256 JWT: "
                f"{answer.body.decode(errors='replace')[:200]}"
            )
    else:
        features["jwt_rs256"] = False
    return features
