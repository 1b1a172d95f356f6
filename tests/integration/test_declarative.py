"""``tenantgate apply`` / ``export``: the real CLI against a real control plane and Postgres."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.harness import ADMIN_TOKEN, ControlPlane, Processes, start_control_plane

pytestmark = pytest.mark.integration

CONFIG = """\
tenants:
  - name: Acme Corp
    tier: premium
    rate_limit_per_minute: 1000
    monthly_quota: 500000
  - name: Beta
routes:
  - path: /api/users/*
    upstream: http://users.internal:3000
    methods: [GET, POST]
    tenants: [Acme Corp]
  - path: /api/orders/*
    upstreams:
      - {url: http://orders-a.internal:3000, weight: 3}
      - {url: http://orders-b.internal:3000}
    load_balancing: consistent_hash
    headers: {X-Version: "2"}
    timeout_ms: 5000
    circuit_breaker: {}
  - path: /old/*
    upstream: http://old.internal:3000
    rate_limit: 100
"""


def _cli(cp: ControlPlane, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTGATE_")}
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *args, "--admin-url", cp.admin_url, "--admin-token", ADMIN_TOKEN],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _apply(cp: ControlPlane, path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return _cli(cp, "apply", "-f", str(path), *extra)


def _state(cp: ControlPlane) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    tenants = cp.api("GET", "/admin/tenants?limit=500").json()["items"]
    routes = cp.api("GET", "/admin/routes").json()["items"]
    for r in (*tenants, *routes):
        r.pop("updated_at")
    return tenants, routes


@pytest.fixture
def cp(procs: Processes, database_url: str) -> ControlPlane:
    return start_control_plane(procs, database_url)


def test_apply_creates_the_files_tenants_and_routes(cp: ControlPlane, tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(CONFIG)
    result = _apply(cp, path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    tenants, routes = _state(cp)
    by_name = {t["name"]: t for t in tenants}
    assert set(by_name) == {"Acme Corp", "Beta"}
    acme, beta = by_name["Acme Corp"], by_name["Beta"]
    assert (acme["tier"], acme["rate_limit_per_minute"], acme["monthly_quota"]) == ("premium", 1000, 500000)
    assert acme["rate_limit_per_hour"] == 100_000  # omitted: the tier's default
    assert (beta["tier"], beta["rate_limit_per_minute"], beta["is_active"]) == ("free", 60, True)
    by_path = {r["path"]: r for r in routes}
    assert set(by_path) == {"/api/users/*", "/api/orders/*", "/old/*"}
    users, orders = by_path["/api/users/*"], by_path["/api/orders/*"]
    assert users["tenants"] == [acme["id"]]
    assert users["methods"] == ["GET", "POST"]
    assert orders["upstreams"] == [
        {"url": "http://orders-a.internal:3000", "weight": 3},
        {"url": "http://orders-b.internal:3000", "weight": 1},
    ]
    assert (orders["hash_on"], orders["headers"], orders["timeout_ms"]) == ("tenant", {"x-version": "2"}, 5000)
    assert orders["circuit_breaker"]["min_requests"] == 20
    assert by_path["/old/*"]["rate_limit"] == 100
    assert "+ tenant Acme Corp" in result.stdout
    assert "+ route GET,POST /api/users/*" in result.stdout
    # Each new tenant's API key is shown once, and it works: the API holds that key's prefix.
    key_lines = [line for line in result.stdout.splitlines() if "API key of" in line]
    assert len(key_lines) == 2
    acme_key = next(line for line in key_lines if "Acme Corp" in line).rsplit(" ", 1)[1]
    prefixes = [k["prefix"] for k in cp.api("GET", f"/admin/tenants/{acme['id']}/keys").json()["items"]]
    assert any(acme_key.startswith(p) for p in prefixes)


def test_dry_run_shows_the_diff_and_changes_nothing(cp: ControlPlane, tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(CONFIG)
    before = _state(cp)
    result = _apply(cp, path, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "+ tenant Acme Corp",
        "+ tenant Beta",
        "+ route GET,POST /api/users/*",
        "+ route /api/orders/* headers={x-version: 2}",
        "+ route /old/*",
        "5 to create, 0 to update, 0 to delete",
        "dry run: nothing was changed",
    ]
    assert _state(cp) == before


def test_export_then_apply_is_no_change(cp: ControlPlane, tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(CONFIG)
    assert _apply(cp, path).returncode == 0
    exported = _cli(cp, "export")
    assert exported.returncode == 0, exported.stderr
    data = yaml.safe_load(exported.stdout)
    assert [t["name"] for t in data["tenants"]] == ["Acme Corp", "Beta"]
    assert [r["path"] for r in data["routes"]] == ["/api/orders/*", "/api/users/*", "/old/*"]
    assert data["routes"][1]["tenants"] == ["Acme Corp"]
    assert "api_key" not in exported.stdout and "tg_" not in exported.stdout
    before = _state(cp)
    again = _cli(cp, "apply", "-f", "-", stdin=exported.stdout)
    assert again.returncode == 0, again.stderr
    assert again.stdout == "no changes\n"
    assert _state(cp) == before
    # The hand-written file, applied again, is no change either.
    assert _apply(cp, path).stdout == "no changes\n"


def test_editing_the_file_applies_exactly_those_changes(cp: ControlPlane, tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(CONFIG)
    assert _apply(cp, path).returncode == 0
    tenants_before, routes_before = _state(cp)
    edited = CONFIG.replace("rate_limit_per_minute: 1000", "rate_limit_per_minute: 2000")
    edited = edited.replace("    timeout_ms: 5000\n", "    timeout_ms: 7000\n")
    edited = edited[: edited.index("  - path: /old/*")]
    path.write_text(edited)
    result = _apply(cp, path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:4] == [
        "~ tenant Acme Corp : rate_limit_per_minute 1000 → 2000",
        "~ route /api/orders/* headers={x-version: 2} : timeout_ms 5000 → 7000",
        "- route /old/*",
        "0 to create, 2 to update, 1 to delete",
    ]
    tenants_after, routes_after = _state(cp)
    old_t = {t["id"]: t for t in tenants_before}
    assert [t["id"] for t in tenants_after] == [t["id"] for t in tenants_before]  # no tenant replaced
    changed = [(t["name"], k) for t in tenants_after for k in t if t[k] != old_t[t["id"]][k]]
    assert changed == [("Acme Corp", "rate_limit_per_minute")]
    old_r = {r["id"]: r for r in routes_before}
    assert {r["path"] for r in routes_after} == {"/api/users/*", "/api/orders/*"}
    changed = [(r["path"], k) for r in routes_after for k in r if r[k] != old_r[r["id"]][k]]
    assert changed == [("/api/orders/*", "timeout_ms")]
    assert _apply(cp, path).stdout == "no changes\n"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("tenants:\n  - name: A\n routes: [\n", "gw.yaml:3:2: invalid YAML: "),
        ("tenants:\n  - name: A\n    tier: gold\n", "gw.yaml:3: tenants[0].tier: must be one of"),
        (
            "tenants: []\nroutes:\n  - path: /x\n    upstream: http://x\n    timeout: 5\n",
            "gw.yaml:5: routes[0].timeout: unknown key 'timeout' (did you mean 'timeout_ms'?)",
        ),
        ("tenants:\n  - name: A\n  - name: A\n", "gw.yaml:3: tenants[1]: tenant name 'A' is already used"),
        (
            "tenants: []\nroutes:\n  - {path: /x, upstream: 'http://x', tenants: [Nobody]}\n",
            "gw.yaml:3: routes[0]: tenants: no tenant named 'Nobody'",
        ),
    ],
    ids=["bad-yaml", "bad-tier", "unknown-key", "duplicate-tenant", "unknown-tenant"],
)
def test_a_bad_file_is_one_line_and_changes_nothing(cp: ControlPlane, tmp_path: Path, text: str, error: str) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(CONFIG)
    assert _apply(cp, good).returncode == 0
    before = _state(cp)
    path = tmp_path / "gw.yaml"
    path.write_text(text)
    result = _apply(cp, path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"tenantgate apply: {tmp_path}/{error}"), result.stderr
    assert "Traceback" not in result.stderr
    assert _state(cp) == before


def test_a_change_the_api_refuses_stops_apply_and_rerunning_converges(cp: ControlPlane, tmp_path: Path) -> None:
    own_port = cp.admin_url.rsplit(":", 1)[1]
    path = tmp_path / "gw.yaml"
    bad = CONFIG.replace("http://old.internal:3000", f"http://127.0.0.1:{own_port}")
    path.write_text(bad)
    result = _apply(cp, path)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("tenantgate apply: failed to create route /old/*: the admin API answered 422")
    assert "4 of 5 changes were applied before it" in result.stderr
    path.write_text(CONFIG)
    rerun = _apply(cp, path)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.splitlines()[:2] == ["+ route /old/*", "1 to create, 0 to update, 0 to delete"]


def test_without_a_token_or_a_control_plane_the_error_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(CONFIG)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTGATE_")}
    base = [sys.executable, "-m", "shared.cli", "apply", "-f", str(path), "--admin-url", "http://127.0.0.1:9"]
    no_token = subprocess.run(base, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert no_token.returncode == 2
    assert no_token.stderr == (
        "tenantgate apply: an admin token is required: set TENANTGATE_ADMIN_TOKEN or pass --admin-token\n"
    )
    down = subprocess.run(
        [*base, "--admin-token", ADMIN_TOKEN], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert down.returncode == 1
    assert down.stderr.startswith("tenantgate apply: cannot reach the admin API at http://127.0.0.1:9: ")
    assert down.stderr.endswith("— is the control plane running?\n")


def _issuer_keys() -> tuple[str, dict[str, Any]]:
    """A PEM public key (ES256) and an inline JWKS (RS256), as an identity provider would publish them."""
    import json

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from jwt.algorithms import RSAAlgorithm

    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    jwk = json.loads(RSAAlgorithm.to_jwk(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()))
    return pem, {"keys": [{**jwk, "kid": "rsa-1", "alg": "RS256", "use": "sig"}]}


def test_issuers_round_trip_through_export_and_keep_their_hs256_secret(cp: ControlPlane, tmp_path: Path) -> None:
    pem, jwks = _issuer_keys()
    doc = {
        "tenants": [{"name": "Acme Corp"}, {"name": "Beta"}],
        "jwt_issuers": [
            {"tenant": "Acme Corp", "issuer": "https://idp.acme.example/", "audience": "acme", "algorithms": ["RS256"],
             "jwks": jwks},
            {"tenant": "Acme Corp", "issuer": "legacy", "audience": "acme", "algorithms": ["HS256"],
             "hs256_secret": "s" * 40},
            {"tenant": "Beta", "issuer": "https://login.beta.example/", "audience": "beta", "algorithms": ["ES256"],
             "public_key_pem": pem},
        ],
    }  # fmt: skip
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(doc))
    first = _apply(cp, path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("created issuer") == 3
    items = cp.api("GET", "/admin/jwt-issuers").json()["items"]
    assert sorted((i["issuer"], i["key_source"]) for i in items) == [
        ("https://idp.acme.example/", "jwks"),
        ("https://login.beta.example/", "public_key_pem"),
        ("legacy", "hs256_secret"),
    ]

    exported = _cli(cp, "export")
    assert exported.returncode == 0, exported.stderr
    assert "s" * 40 not in exported.stdout  # the secret never leaves the control plane
    again = _cli(cp, "apply", "-f", "-", stdin=exported.stdout)
    assert (again.returncode, again.stdout) == (0, "no changes\n")
    assert cp.api("GET", "/admin/jwt-issuers").json()["items"] == items  # the HS256 issuer kept its secret

    # Moving an issuer to another tenant frees its (issuer, audience) before claiming it again.
    doc["jwt_issuers"][2]["tenant"] = "Acme Corp"  # type: ignore[index]
    path.write_text(yaml.safe_dump(doc))
    moved = _apply(cp, path)
    assert moved.returncode == 0, moved.stderr
    lines = moved.stdout.splitlines()
    assert lines.index("- issuer https://login.beta.example/ of Beta") < lines.index(
        "+ issuer https://login.beta.example/ of Acme Corp"
    )
    owners = {i["issuer"]: i["tenant_id"] for i in cp.api("GET", "/admin/jwt-issuers").json()["items"]}
    acme = next(t["id"] for t in cp.api("GET", "/admin/tenants").json()["items"] if t["name"] == "Acme Corp")
    assert owners["https://login.beta.example/"] == acme

    # An empty list deletes them all; a viewer may list them, a tenant admin may not.
    path.write_text("jwt_issuers: []\n")
    assert _apply(cp, path).returncode == 0
    assert cp.api("GET", "/admin/jwt-issuers").json()["items"] == []
    tenant_admin = cp.api("POST", "/admin/tokens", {"name": "t", "role": "tenant_admin", "tenant_id": acme}).json()
    assert cp.api("GET", "/admin/jwt-issuers", token=tenant_admin["token"]).status == 403
