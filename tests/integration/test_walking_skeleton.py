"""End to end through real processes: a control plane on Postgres, a data plane on Redis,
and a real upstream. What a newcomer does in the README, asserted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from control_plane.store.migrate import available
from tests.integration.harness import (
    ADMIN_TOKEN,
    CLUSTER_TOKEN,
    ControlPlane,
    DataPlane,
    Processes,
    free_port,
    http,
    start_control_plane,
    start_data_plane,
    start_echo,
    wait_for,
)

pytestmark = pytest.mark.integration


def _cluster(procs: Processes, database_url: str, redis_url: str) -> tuple[ControlPlane, DataPlane, str]:
    cp = start_control_plane(procs, database_url)
    dp = start_data_plane(procs, cp.cluster_addr, redis_url)
    return cp, dp, start_echo(procs)


def _served_version(dp: DataPlane) -> int:
    version: int = dp.status()["config_version"]
    return version


def _setup_tenant_and_route(cp: ControlPlane, dp: DataPlane, upstream: str, **route: object) -> tuple[str, str]:
    tenant = cp.api("POST", "/admin/tenants", {"name": "Acme Corp", "tier": "premium"})
    assert tenant.status == 201, tenant.body
    created = cp.api(
        "POST",
        "/admin/routes",
        {"path": "/api/users/*", "upstream": upstream, "methods": ["GET", "POST"], **route},
    )
    assert created.status == 201, created.body
    version = created.json()["config_version"]
    wait_for(lambda: _served_version(dp) >= version, what="route to reach the data plane")
    return tenant.json()["api_key"], tenant.json()["id"]


def test_request_with_key_is_proxied_to_upstream(procs: Processes, database_url: str, redis_url: str) -> None:
    cp, dp, upstream = _cluster(procs, database_url, redis_url)
    key, tenant_id = _setup_tenant_and_route(cp, dp, upstream)

    resp = dp.get("/api/users/123?x=1", {"X-API-Key": key, "X-Tenant-ID": "someone-else", "X-Request-ID": "req-1"})

    assert resp.status == 200, resp.body
    seen = resp.json()
    assert seen["path"] == "/api/users/123"
    assert seen["query"] == "x=1"
    assert seen["headers"]["X-Tenant-ID"] == tenant_id
    assert seen["headers"]["X-Request-ID"] == "req-1"
    assert "X-API-Key" not in seen["headers"]
    assert resp.headers["x-request-id"] == "req-1"


def test_missing_or_wrong_key_is_401_and_upstream_sees_nothing(
    procs: Processes, database_url: str, redis_url: str
) -> None:
    cp, dp, upstream = _cluster(procs, database_url, redis_url)
    key, _ = _setup_tenant_and_route(cp, dp, upstream)

    missing = dp.get("/api/users/1")
    wrong = dp.get("/api/users/1", {"X-API-Key": key[:-1] + ("A" if key[-1] != "A" else "B")})
    case_changed = dp.get("/api/users/1", {"X-API-Key": key.swapcase()})

    for resp in (missing, wrong, case_changed):
        assert resp.status == 401
        error = resp.json()["error"]
        assert set(error) == {"code", "message", "request_id"}
        assert error["request_id"] == resp.headers["x-request-id"]
        assert "www-authenticate" in resp.headers
    assert missing.json()["error"]["code"] == "missing_credentials"
    assert wrong.json()["error"]["code"] == "invalid_api_key"


def test_unknown_path_is_404_and_wrong_method_is_405(procs: Processes, database_url: str, redis_url: str) -> None:
    cp, dp, upstream = _cluster(procs, database_url, redis_url)
    key, _ = _setup_tenant_and_route(cp, dp, upstream)

    not_found = dp.get("/nothing/here", {"X-API-Key": key})
    wrong_method = http("DELETE", dp.proxy_url + "/api/users/1", headers={"X-API-Key": key})

    assert not_found.status == 404
    assert not_found.json()["error"]["code"] == "route_not_found"
    assert wrong_method.status == 405
    assert wrong_method.headers["allow"] == "GET, POST"


def test_unreachable_upstream_is_502(procs: Processes, database_url: str, redis_url: str) -> None:
    cp, dp, _ = _cluster(procs, database_url, redis_url)
    key, _ = _setup_tenant_and_route(cp, dp, f"http://127.0.0.1:{free_port()}")

    resp = dp.get("/api/users/1", {"X-API-Key": key})

    assert resp.status == 502
    assert resp.json()["error"]["code"] == "upstream_connect_error"


def test_request_body_streams_to_upstream(procs: Processes, database_url: str, redis_url: str) -> None:
    cp, dp, upstream = _cluster(procs, database_url, redis_url)
    key, _ = _setup_tenant_and_route(cp, dp, upstream)
    body = b"x" * (8 * 1024 * 1024 + 17)

    resp = http("POST", dp.proxy_url + "/api/users", headers={"X-API-Key": key}, body=body)

    assert resp.status == 200
    assert resp.json()["body_bytes"] == len(body)


def test_every_admin_write_returns_a_greater_config_version(procs: Processes, database_url: str) -> None:
    cp = start_control_plane(procs, database_url)

    first = cp.api("POST", "/admin/tenants", {"name": "A"})
    second = cp.api("POST", "/admin/routes", {"path": "/a/*", "upstream": "http://127.0.0.1:9"})
    third = cp.api("POST", "/admin/tenants", {"name": "B"})

    versions = [r.json()["config_version"] for r in (first, second, third)]
    assert versions == sorted(versions) and len(set(versions)) == 3
    assert [int(r.headers["x-config-version"]) for r in (first, second, third)] == versions


def test_tenant_limits_default_from_tier(procs: Processes, database_url: str) -> None:
    cp = start_control_plane(procs, database_url)

    free = cp.api("POST", "/admin/tenants", {"name": "Small"}).json()
    custom = cp.api("POST", "/admin/tenants", {"name": "Big", "tier": "premium", "rate_limit_per_minute": 1000}).json()

    assert (free["tier"], free["rate_limit_per_minute"], free["rate_limit_per_hour"]) == ("free", 60, 1000)
    assert custom["rate_limit_per_minute"] == 1000
    assert custom["api_key"].startswith("tg_") and len(custom["api_key"]) >= 40


@pytest.mark.parametrize(
    ("token", "status"),
    [("", 401), ("wrong-token-0123456789", 401), (ADMIN_TOKEN, 201)],
)
def test_admin_api_requires_the_admin_token(procs: Processes, database_url: str, token: str, status: int) -> None:
    cp = start_control_plane(procs, database_url)

    resp = cp.api("POST", "/admin/tenants", {"name": "X"}, token=token)

    assert resp.status == status
    if status == 401:
        assert resp.json()["error"]["code"] in ("missing_credentials", "invalid_credentials")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"path": "/a/*", "upstream": "ftp://x"}, "upstream"),
        ({"path": "/a/*", "upstream": "http://169.254.169.254/latest"}, "upstream"),
        ({"path": "a", "upstream": "http://x"}, "path"),
        ({"path": "/a/*", "upstream": "http://x", "timeout_ms": 0}, "timeout_ms"),
        ({"path": "/a/*", "upstream": "http://x", "methods": ["FETCH"]}, "methods"),
        ({"path": "/a/*", "upstream": "http://x", "surprise": 1}, "surprise"),
    ],
)
def test_invalid_route_is_422_naming_the_field(
    procs: Processes, database_url: str, body: dict[str, object], field: str
) -> None:
    cp = start_control_plane(procs, database_url)

    resp = cp.api("POST", "/admin/routes", body)

    assert resp.status == 422, resp.body
    assert resp.json()["error"]["message"].startswith(field)


def test_data_plane_is_not_ready_until_it_has_a_snapshot(procs: Processes, database_url: str, redis_url: str) -> None:
    cluster_port = free_port()
    dp = start_data_plane(procs, f"127.0.0.1:{cluster_port}", redis_url, wait_ready=False)
    assert http("GET", dp.status_url + "/readyz").status == 503
    assert dp.get("/anything").status == 503

    start_control_plane(procs, database_url, TENANTGATE_CLUSTER_LISTEN=f"127.0.0.1:{cluster_port}")

    wait_for(lambda: http("GET", dp.status_url + "/readyz").status == 200, what="data plane ready")
    status = dp.status()
    assert status["cp_connected"] is True and status["redis_ok"] is True and status["config_version"] >= 1


def test_wrong_cluster_token_is_refused(procs: Processes, database_url: str, redis_url: str) -> None:
    cp = start_control_plane(procs, database_url)

    dp = start_data_plane(
        procs,
        cp.cluster_addr,
        redis_url,
        wait_ready=False,
        TENANTGATE_CLUSTER_TOKEN="not-the-cluster-token-000",
    )

    wait_for(lambda: "refused the cluster token" in dp.status()["last_error"], what="token refusal")
    assert http("GET", dp.status_url + "/readyz").status == 503
    assert "TENANTGATE_CLUSTER_TOKEN" in dp.proc.log()


def test_concurrent_migrations_do_not_race(procs: Processes, database_url: str) -> None:
    env = {"TENANTGATE_DATABASE_URL": database_url}
    runners = [procs.spawn("migrate", ["-m", "control_plane", "migrate"], env) for _ in range(3)]

    codes = [r.popen.wait(timeout=60) for r in runners]

    assert codes == [0, 0, 0], procs.dump_logs()
    applied = sum(int(r.log().split("migrations: ")[1].split()[0]) for r in runners)
    assert applied == len(available())  # each migration applied by exactly one of them


@pytest.mark.parametrize(
    ("module", "env", "setting"),
    [
        (
            "data_plane",
            {"TENANTGATE_CLUSTER_TOKEN": CLUSTER_TOKEN, "TENANTGATE_PROXY_LISTEN": "nonsense"},
            "TENANTGATE_PROXY_LISTEN",
        ),
        ("data_plane", {}, "TENANTGATE_CLUSTER_TOKEN"),
        ("data_plane", {"TENANTGATE_CLUSTER_TOKEN": "short"}, "TENANTGATE_CLUSTER_TOKEN"),
        (
            "data_plane",
            {"TENANTGATE_CLUSTER_TOKEN": CLUSTER_TOKEN, "TENANTGATE_RATELIMIT_FAILURE_MODE": "maybe"},
            "TENANTGATE_RATELIMIT_FAILURE_MODE",
        ),
        (
            "control_plane",
            {
                "TENANTGATE_DATABASE_URL": "mysql://x",
                "TENANTGATE_ADMIN_TOKEN": ADMIN_TOKEN,
                "TENANTGATE_CLUSTER_TOKEN": CLUSTER_TOKEN,
            },
            "TENANTGATE_DATABASE_URL",
        ),
        (
            "control_plane",
            {"TENANTGATE_DATABASE_URL": "postgresql://x/y", "TENANTGATE_CLUSTER_TOKEN": CLUSTER_TOKEN},
            "TENANTGATE_ADMIN_TOKEN",
        ),
    ],
)
def test_bad_setting_stops_the_process_with_one_line(module: str, env: dict[str, str], setting: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and setting in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_admin_errors_use_the_error_body(procs: Processes, database_url: str) -> None:
    cp = start_control_plane(procs, database_url)

    not_json = http(
        "POST",
        cp.admin_url + "/admin/tenants",
        body=b"{oops",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"},
    )
    unknown = cp.api("GET", "/admin/nowhere")

    assert not_json.status == 400 and json.loads(not_json.body)["error"]["code"] == "invalid_json"
    assert unknown.status == 404 and set(unknown.json()["error"]) == {"code", "message", "request_id"}
