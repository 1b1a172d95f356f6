"""shared.declarative without a server: the file's validation, the diff, export, apply's order."""

from __future__ import annotations

import io
import textwrap
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared import declarative as decl
from shared import settings
from shared.declarative import (
    AdminAPIError,
    AdminClient,
    ConfigFileError,
    Document,
    LiveState,
    StateError,
    parse,
    plan,
)
from shared.settings import Secret

pytestmark = pytest.mark.unit

TIERS = {
    "free": {"rate_limit_per_minute": 60, "rate_limit_per_hour": 1000, "monthly_quota": 10000, "max_concurrency": 10},
    "premium": {
        "rate_limit_per_minute": 3000,
        "rate_limit_per_hour": 100000,
        "monthly_quota": 10000000,
        "max_concurrency": 200,
    },
}


def _doc(text: str) -> Document:
    return parse(textwrap.dedent(text), "gw.yaml")


def _error(text: str) -> str:
    with pytest.raises(ConfigFileError) as info:
        _doc(text)
    return str(info.value)


def _tenant_item(name: str, **fields: Any) -> dict[str, Any]:
    """A tenant as GET /admin/tenants returns it."""
    item = {
        "id": str(uuid.uuid5(uuid.NAMESPACE_DNS, name)),
        "name": name,
        "tier": "free",
        **TIERS["free"],
        "is_active": True,
        "created_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:00:00Z",
    }
    item.update(fields)
    return item


def _route_item(path: str, **fields: Any) -> dict[str, Any]:
    """A route as GET /admin/routes returns it."""
    item: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "path": path,
        "upstream": "http://up.internal:3000",
        "upstreams": [{"url": "http://up.internal:3000", "weight": 1}],
        "methods": [],
        "auth_required": True,
        "rate_limit": None,
        "burst": None,
        "timeout_ms": 30000,
        "retries": 0,
        "strip_prefix": False,
        "priority": 0,
        "is_active": True,
        "load_balancing": "round_robin",
        "hash_on": None,
        "host": None,
        "headers": {},
        "tenants": [],
        "tiers": [],
        "scopes": [],
        "websocket": False,
        "max_body_bytes": 10485760,
        "circuit_breaker": None,
        "health_check": None,
        "created_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:00:00Z",
    }
    item.update(fields)
    return item


def _plan(text: str, tenants: Sequence[dict[str, Any]] = (), routes: Sequence[dict[str, Any]] = ()) -> decl.Plan:
    return plan(_doc(text), LiveState(tuple(tenants), tuple(routes)), TIERS)


# --- the file ---


def test_minimal_tenant_takes_the_api_defaults() -> None:
    doc = _doc("tenants:\n  - name: Acme\n")
    assert doc.tenants == (
        {
            "name": "Acme",
            "tier": "free",
            "rate_limit_per_minute": None,
            "rate_limit_per_hour": None,
            "monthly_quota": None,
            "max_concurrency": None,
            "is_active": True,
        },
    )
    assert doc.routes is None


def test_route_upstream_shorthand_becomes_one_upstream_of_weight_1() -> None:
    doc = _doc("routes:\n  - path: /a\n    upstream: http://x:1\n")
    assert doc.routes is not None
    route = doc.routes[0]
    assert route["upstreams"] == [{"url": "http://x:1", "weight": 1}]
    assert list(route) == list(decl.ROUTE_FIELDS)
    assert route["timeout_ms"] == 30000 and route["methods"] == [] and route["circuit_breaker"] is None


def test_route_lists_hosts_and_headers_are_canonical() -> None:
    doc = _doc(
        """
        tenants: [{name: B}, {name: A}]
        routes:
          - path: /a
            upstream: http://x
            methods: [post, GET, get]
            host: API.Example.com
            headers: {X-Version: "2", Accept: json}
            tenants: [B, A, B]
            tiers: [premium, free]
            scopes: [w, r]
        """
    )
    assert doc.routes is not None
    route = doc.routes[0]
    assert route["methods"] == ["GET", "POST"]
    assert route["host"] == "api.example.com"
    assert list(route["headers"].items()) == [("accept", "json"), ("x-version", "2")]
    assert route["tenants"] == ["A", "B"]
    assert route["tiers"] == ["free", "premium"]
    assert route["scopes"] == ["r", "w"]


def test_empty_circuit_breaker_takes_every_default() -> None:
    doc = _doc("routes:\n  - {path: /a, upstream: 'http://x', circuit_breaker: {}, health_check: {path: /hz}}\n")
    assert doc.routes is not None
    assert doc.routes[0]["circuit_breaker"] == dict(decl.CIRCUIT_BREAKER_DEFAULTS)
    assert doc.routes[0]["health_check"] == {**decl.HEALTH_CHECK_DEFAULTS, "path": "/hz"}


def test_consistent_hash_defaults_hash_on_to_tenant() -> None:
    doc = _doc("routes:\n  - {path: /a, upstream: 'http://x', load_balancing: consistent_hash}\n")
    assert doc.routes is not None
    assert doc.routes[0]["hash_on"] == "tenant"


def test_unknown_key_is_named_with_its_line_and_a_suggestion() -> None:
    message = _error(
        """\
        routes:
          - path: /a
            upstream: http://x
            timeout: 5
        """
    )
    assert message == "gw.yaml:4: routes[0].timeout: unknown key 'timeout' (did you mean 'timeout_ms'?)"


def test_unknown_top_level_key_is_refused() -> None:
    assert "unknown key 'tenant' (did you mean 'tenants'?)" in _error("tenant: []\n")


def test_bad_yaml_gives_the_line() -> None:
    assert _error("tenants:\n  - name: A\n routes: [\n").startswith("gw.yaml:3:2: invalid YAML: ")


def test_duplicate_yaml_key_is_refused() -> None:
    assert _error("tenants:\n  - name: A\n    name: B\n") == "gw.yaml:3: key 'name' appears twice in one mapping"


def test_empty_file_is_refused() -> None:
    assert "the file is empty" in _error("")


def test_top_level_must_be_a_mapping() -> None:
    assert "the top level must be a mapping" in _error("- a\n")


def test_section_must_be_a_list() -> None:
    assert _error("tenants:\n") == "gw.yaml:1: tenants: must be a list (write [] for none)"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("timeout_ms: true", "routes[0].timeout_ms: must be an integer from 1 to 3600000, got True"),
        ("timeout_ms: '5'", "routes[0].timeout_ms: must be an integer from 1 to 3600000, got '5'"),
        ("retries: 11", "routes[0].retries: must be an integer from 0 to 10, got 11"),
        ("websocket: 1", "routes[0].websocket: must be true or false, got 1"),
        ("methods: [FETCH]", "routes[0].methods[0]: unknown method 'FETCH'"),
        ("headers: {X-V: 2}", "routes[0].headers.X-V: header values must be text, got 2 (quote it: '2')"),
        ("host: 'a b'", "routes[0].host: must be a host name"),
        ("load_balancing: random", "routes[0].load_balancing: must be one of round_robin"),
        ("hash_on: ip", "routes[0].hash_on: only applies with load_balancing: consistent_hash"),
        ("burst: 5", "routes[0].burst: needs a rate_limit on the route"),
        ("upstreams: [{url: 'http://y'}]", "routes[0]: give exactly one of upstream"),
        ("circuit_breaker: {failure_rate: 2}", "routes[0].circuit_breaker.failure_rate: must be a number"),
    ],
)
def test_bad_route_field_is_named(line: str, expected: str) -> None:
    message = _error(f"routes:\n  - path: /a\n    upstream: http://x\n    {line}\n")
    assert message.startswith("gw.yaml:"), message
    assert expected in message


def test_route_needs_an_upstream() -> None:
    assert "give exactly one of upstream" in _error("routes:\n  - path: /a\n")


def test_bad_path_pattern_is_refused() -> None:
    assert "routes[0].path: path must start with '/'" in _error("routes:\n  - {path: a, upstream: 'http://x'}\n")


def test_bad_upstream_url_is_refused() -> None:
    assert "routes[0].upstream: scheme must be http or https" in _error(
        "routes:\n  - {path: /a, upstream: 'ftp://x'}\n"
    )


def test_tenant_name_must_be_text() -> None:
    assert _error("tenants:\n  - name: 123\n") == "gw.yaml:2: tenants[0].name: must be text, got 123 (quote it)"


def test_duplicate_tenant_names_are_refused() -> None:
    message = _error("tenants:\n  - name: A\n  - name: B\n  - name: ' A '\n")
    assert message.startswith("gw.yaml:4: tenants[2]: tenant name 'A' is already used by tenants[0] (line 2)")


def test_duplicate_route_identity_is_refused() -> None:
    message = _error(
        """\
        routes:
          - {path: /a, upstream: 'http://x', methods: [GET, POST], is_active: false}
          - {path: /a, upstream: 'http://y', methods: [post, get]}
        """
    )
    assert message.startswith("gw.yaml:3: routes[1]: route GET,POST /a is already declared by routes[0] (line 2)")


def test_active_routes_serving_the_same_requests_are_refused() -> None:
    message = _error(
        """\
        routes:
          - {path: /a, upstream: 'http://x', methods: [GET]}
          - {path: /a, upstream: 'http://y'}
        """
    )
    assert "routes[1]: route /a would serve the same requests as routes[0] (line 2)" in message


def test_overlapping_routes_are_allowed_when_one_is_inactive_or_the_methods_differ() -> None:
    doc = _doc(
        """\
        routes:
          - {path: /a, upstream: 'http://x', methods: [GET]}
          - {path: /a, upstream: 'http://y', methods: [POST]}
          - {path: /a, upstream: 'http://z', is_active: false}
        """
    )
    assert doc.routes is not None and len(doc.routes) == 3


def test_route_naming_a_tenant_the_file_does_not_declare_is_refused() -> None:
    message = _error("tenants: [{name: A}]\nroutes:\n  - {path: /a, upstream: 'http://x', tenants: [B]}\n")
    assert message == "gw.yaml:3: routes[0]: tenants: no tenant named 'B' in the file's tenants: list"


# --- the diff ---


FILE = """\
tenants:
  - {name: Acme, tier: premium}
  - {name: Beta}
routes:
  - {path: /api/*, upstream: 'http://up.internal:3000', methods: [GET], tenants: [Acme]}
  - {path: /old/*, upstream: 'http://up.internal:3000'}
"""


def _live_matching_file() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    acme = _tenant_item("Acme", tier="premium", **TIERS["premium"])
    beta = _tenant_item("Beta")
    routes = [_route_item("/api/*", methods=["GET"], tenants=[acme["id"]]), _route_item("/old/*")]
    return [beta, acme], routes


def test_empty_live_state_creates_everything_tenants_first() -> None:
    result = _plan(FILE)
    assert result.lines() == ["+ tenant Acme", "+ tenant Beta", "+ route GET /api/*", "+ route /old/*"]
    assert result.summary() == "4 to create, 0 to update, 0 to delete"


def test_omitted_limits_are_the_tiers_defaults() -> None:
    created = _plan(FILE).changes[0]
    assert created.values == {"name": "Acme", "tier": "premium", **TIERS["premium"], "is_active": True}


def test_live_state_equal_to_the_file_is_no_change() -> None:
    tenants, routes = _live_matching_file()
    result = _plan(FILE, tenants, routes)
    assert result.changes == ()
    assert result.summary() == "no changes"


def test_changed_field_is_an_update_with_old_and_new_values() -> None:
    tenants, routes = _live_matching_file()
    routes[0]["timeout_ms"] = 5000
    tenants[1]["rate_limit_per_minute"] = 10
    result = _plan(FILE, tenants, routes)
    assert result.lines() == [
        "~ tenant Acme : rate_limit_per_minute 10 → 3000",
        "~ route GET /api/* : timeout_ms 5000 → 30000",
    ]
    update = result.changes[1]
    assert (update.action, update.id, update.values) == ("update", routes[0]["id"], {"timeout_ms": 30000})


def test_objects_absent_from_the_file_are_deleted_routes_before_tenants() -> None:
    tenants, routes = _live_matching_file()
    result = _plan("tenants: [{name: Acme, tier: premium}]\nroutes: []\n", tenants, routes)
    assert result.lines() == ["- route GET /api/*", "- route /old/*", "- tenant Beta"]
    assert [c.id for c in result.changes] == [routes[0]["id"], routes[1]["id"], tenants[0]["id"]]


def test_route_tenants_are_compared_by_name() -> None:
    tenants, routes = _live_matching_file()
    routes[0]["tenants"] = [tenants[0]["id"]]  # Beta instead of Acme
    result = _plan(FILE, tenants, routes)
    assert result.lines() == ["~ route GET /api/* : tenants [Beta] → [Acme]"]
    assert result.changes[0].values == {"tenants": ["Acme"]}


def test_a_section_left_out_is_not_managed() -> None:
    tenants, routes = _live_matching_file()
    assert _plan("routes: []\n", tenants, routes).lines() == ["- route GET /api/*", "- route /old/*"]
    assert _plan("tenants: []\n", tenants, []).lines() == ["- tenant Acme", "- tenant Beta"]


def test_deleting_a_tenant_an_unmanaged_route_names_is_refused() -> None:
    tenants, routes = _live_matching_file()
    with pytest.raises(StateError, match="tenant 'Acme' would be deleted but route GET /api/\\*"):
        _plan("tenants: [{name: Beta}]\n", tenants, routes)


def test_route_tenant_names_refer_to_live_tenants_without_a_tenants_section() -> None:
    tenants, _ = _live_matching_file()
    doc = "routes:\n  - {path: /a, upstream: 'http://x', tenants: [Acme]}\n"
    assert _plan(doc, tenants).lines() == ["+ route /a"]
    with pytest.raises(StateError, match="no tenant named 'Acme' \\(the file has no tenants: section\\)"):
        _plan(doc)


def test_changing_the_methods_replaces_the_route() -> None:
    tenants, routes = _live_matching_file()
    result = _plan(FILE.replace("methods: [GET]", "methods: [POST]"), tenants, routes)
    assert result.lines() == ["+ route POST /api/*", "- route GET /api/*"]


def test_a_live_route_clashing_with_a_new_one_is_deleted_first() -> None:
    tenants, routes = _live_matching_file()
    result = _plan(FILE.replace("methods: [GET]", "methods: [GET, POST]"), tenants, routes)
    assert result.lines() == ["- route GET /api/*", "+ route GET,POST /api/*"]


def test_route_updates_come_before_creates_and_tenant_changes_before_both() -> None:
    tenants, routes = _live_matching_file()
    routes[1]["retries"] = 3
    text = FILE.replace("{name: Beta}", "{name: Beta, is_active: false}") + "  - {path: /new, upstream: 'http://x'}\n"
    assert _plan(text, tenants, routes).lines() == [
        "~ tenant Beta : is_active true → false",
        "~ route /old/* : retries 3 → 0",
        "+ route /new",
    ]


def test_duplicate_live_tenant_names_are_refused() -> None:
    first, second = _tenant_item("Acme"), {**_tenant_item("Acme"), "id": str(uuid.uuid4())}
    with pytest.raises(StateError, match=f"'Acme': {first['id']}, {second['id']}"):
        _plan("tenants: []\n", [first, second])


def test_duplicate_live_route_identities_are_refused() -> None:
    a, b = _route_item("/a"), _route_item("/a", is_active=False)
    with pytest.raises(StateError, match=f"routes {a['id']} and {b['id']} are both /a"):
        _plan("routes: []\n", [], [a, b])


def test_route_label_names_every_identity_field_that_is_set() -> None:
    route = decl.live_route(
        _route_item("/a", methods=["POST", "GET"], host="h.example", headers={"X-V": "2"}, priority=5), {}
    )
    assert decl.route_label(route) == "GET,POST /a host=h.example headers={x-v: 2} priority=5"


# --- export ---


def test_export_then_parse_is_no_change() -> None:
    tenants, routes = _live_matching_file()
    routes.append(
        _route_item(
            "/full/*",
            upstreams=[{"url": "http://a", "weight": 3}, {"url": "http://b", "weight": 1}],
            load_balancing="consistent_hash",
            hash_on="header:X-User",
            host="api.example.com",
            headers={"x-version": "2"},
            tiers=["premium"],
            scopes=["r"],
            rate_limit=10,
            burst=5,
            circuit_breaker={**decl.CIRCUIT_BREAKER_DEFAULTS, "failure_rate": 1},
            health_check=dict(decl.HEALTH_CHECK_DEFAULTS),
            priority=-3,
            is_active=False,
        )
    )
    live = LiveState(tuple(tenants), tuple(routes))
    text = decl.export_text(live)
    assert plan(parse(text, "export"), live, TIERS).changes == ()


def test_export_writes_every_field_in_a_stable_order() -> None:
    tenants, routes = _live_matching_file()
    routes.append(_route_item("/api/*", priority=-1))
    data = yaml.safe_load(decl.export_text(LiveState(tuple(tenants), tuple(routes))))
    assert [t["name"] for t in data["tenants"]] == ["Acme", "Beta"]
    assert [(r["path"], r["priority"]) for r in data["routes"]] == [("/api/*", -1), ("/api/*", 0), ("/old/*", 0)]
    assert all(list(t) == list(decl.TENANT_FIELDS) for t in data["tenants"])
    assert all(list(r) == list(decl.ROUTE_FIELDS) for r in data["routes"])
    assert data["routes"][1]["tenants"] == ["Acme"]


def test_export_holds_no_ids_or_secrets() -> None:
    tenants, routes = _live_matching_file()
    text = decl.export_text(LiveState(tuple(tenants), tuple(routes)))
    assert all(t["id"] not in text for t in tenants)
    assert "id:" not in text and "api_key" not in text and "created_at" not in text


def test_export_warns_about_a_route_naming_a_missing_tenant() -> None:
    ghost = str(uuid.uuid4())
    warnings: list[str] = []
    text = decl.export_text(LiveState((), (_route_item("/a", tenants=[ghost]),)), warnings.append)
    assert ghost in text
    assert len(warnings) == 1 and f"names tenant id {ghost} that does not exist" in warnings[0]


# --- the defaults must be the admin API's ---


def test_route_fields_and_defaults_are_the_admin_apis() -> None:
    from control_plane.api.routes import CircuitBreakerSpec, HealthCheckSpec, RouteCreate

    api_fields = set(RouteCreate.model_fields) - {"upstream"}
    assert set(decl.ROUTE_FIELDS) == api_fields
    for name, default in decl.ROUTE_DEFAULTS.items():
        assert RouteCreate.model_fields[name].get_default(call_default_factory=True) == default, name
    assert CircuitBreakerSpec().model_dump() == decl.CIRCUIT_BREAKER_DEFAULTS
    assert HealthCheckSpec().model_dump() == decl.HEALTH_CHECK_DEFAULTS


def test_tenant_fields_and_default_tier_are_the_admin_apis() -> None:
    from control_plane.api.tenants import TenantUpdate
    from control_plane.tiers import DEFAULT_TIER

    assert set(decl.TENANT_FIELDS) == set(TenantUpdate.model_fields)
    assert decl.DEFAULT_TIER == DEFAULT_TIER


# --- the admin API address ---


def _settings(**env: str) -> settings.Settings:
    return settings.load(None, environ={settings.ENV_PREFIX + k: v for k, v in env.items()})


def test_admin_url_comes_from_admin_listen_with_a_wildcard_host_as_loopback() -> None:
    assert decl.admin_base_url(_settings(ADMIN_LISTEN="0.0.0.0:9001"), None) == "http://127.0.0.1:9001"
    assert decl.admin_base_url(_settings(), None) == "http://127.0.0.1:8001"


def test_admin_url_option_wins_and_is_checked() -> None:
    assert decl.admin_base_url(_settings(), "https://cp.example:8443/") == "https://cp.example:8443"
    with pytest.raises(decl.UsageError, match="expected http"):
        decl.admin_base_url(_settings(), "cp.example:8001")


# --- apply against a recording fake of the admin API ---


class FakeAdmin(AdminClient):
    """Answers from a fixed live state and records every write; ``fail_on`` makes one write fail."""

    def __init__(self, live: LiveState, fail_on: str | None = None) -> None:
        super().__init__("http://fake", Secret("token-0123456789abcdef"))
        self.live = live
        self.fail_on = fail_on
        self.writes: list[tuple[str, str, Any]] = []

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        if method == "GET":
            if path.startswith("/admin/tenants"):
                return {"items": list(self.live.tenants), "next_cursor": None}
            if path == "/admin/routes":
                return {"items": list(self.live.routes)}
            if path == "/admin/jwt-issuers":
                return {"items": list(self.live.jwt_issuers)}
            return {"tiers": [{"name": k, **v} for k, v in TIERS.items()]}
        if f"{method} {path}" == self.fail_on:
            raise AdminAPIError(422, "invalid_request", "upstreams: nope", "rid1")
        self.writes.append((method, path, body))
        if method == "POST" and path == "/admin/tenants":
            return {"id": f"id-{body['name'] if body else ''}", "api_key": "tg_secret"}
        return {}


def _apply(admin: FakeAdmin, text: str, tmp_path: Path, dry_run: bool = False) -> tuple[int, str, str]:
    path = tmp_path / "gw.yaml"
    path.write_text(text)
    out, err = io.StringIO(), io.StringIO()
    code = decl.run_apply(admin, str(path), dry_run=dry_run, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_apply_maps_tenant_names_to_ids_and_prints_new_keys_once(tmp_path: Path) -> None:
    text = "tenants: [{name: New, is_active: false}]\nroutes:\n  - {path: /a, upstream: 'http://x', tenants: [New]}\n"
    admin = FakeAdmin(LiveState((), ()))
    code, out, err = _apply(admin, text, tmp_path)
    assert (code, err) == (0, "")
    assert [(m, p) for m, p, _ in admin.writes] == [
        ("POST", "/admin/tenants"),
        ("PATCH", "/admin/tenants/id-New"),  # created active, then switched off
        ("POST", "/admin/routes"),
    ]
    assert "is_active" not in admin.writes[0][2]
    assert admin.writes[2][2]["tenants"] == ["id-New"]
    assert out.count("tg_secret") == 1
    assert out.endswith("applied 2 changes\n")


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    admin = FakeAdmin(LiveState((), ()))
    code, out, _ = _apply(admin, FILE, tmp_path, dry_run=True)
    assert code == 0 and admin.writes == []
    assert out.splitlines()[-2:] == ["4 to create, 0 to update, 0 to delete", "dry run: nothing was changed"]


def test_a_failed_write_stops_apply_and_says_which_change(tmp_path: Path) -> None:
    admin = FakeAdmin(LiveState((), ()), fail_on="POST /admin/routes")
    code, out, err = _apply(admin, FILE, tmp_path)
    assert code == 1
    assert len(admin.writes) == 2  # the two tenants
    assert "created tenant Beta" in out and "created route" not in out
    assert err.count("\n") == 1
    assert err.startswith(
        "tenantgate apply: failed to create route GET /api/*: the admin API answered 422 invalid_request:"
        " upstreams: nope [request id rid1]. 2 of 4 changes were applied before it;"
    )
    assert "run apply again" in err


def test_a_bad_file_reaches_no_server(tmp_path: Path) -> None:
    admin = FakeAdmin(LiveState((), ()), fail_on="never")
    admin.call = None  # type: ignore[assignment,method-assign]
    code, out, err = _apply(admin, "tenants: [{name: A, tier: gold}]\n", tmp_path)
    assert (code, out) == (1, "")
    assert err == "tenantgate apply: " + str(tmp_path / "gw.yaml") + ":1: tenants[0].tier: must be one of free," + (
        " basic, premium, enterprise, got 'gold'\n"
    )


# --- JWT issuers ---

JWKS = {"keys": [{"kty": "RSA", "kid": "k1", "n": "AQAB", "e": "AQAB", "alg": "RS256"}]}


def _issuer_item(tenant: str, issuer: str, **fields: Any) -> dict[str, Any]:
    """An issuer as GET /admin/jwt-issuers returns it."""
    item: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "tenant_id": str(uuid.uuid5(uuid.NAMESPACE_DNS, tenant)),
        "issuer": issuer,
        "audience": "api",
        "algorithms": ["RS256"],
        "key_source": "jwks_uri",
        "jwks": None,
        "jwks_uri": "https://idp.example/jwks.json",
        "public_key_pem": None,
        "keys": [],
        "jwks_fetched_at": None,
        "jwks_error": None,
        "created_at": "2026-01-01T00:00:00Z",
    }
    item.update(fields)
    return item


def _issuer_plan(text: str, tenants: Sequence[str], issuers: Sequence[dict[str, Any]]) -> decl.Plan:
    live = LiveState(tuple(_tenant_item(t) for t in tenants), (), tuple(issuers))
    return plan(_doc(text), live, TIERS)


ISSUER_FILE = """\
jwt_issuers:
  - tenant: Acme
    issuer: https://idp.example/
    audience: api
    algorithms: [RS256]
    jwks_uri: https://idp.example/jwks.json
"""


def test_an_issuer_needs_exactly_one_key_source_that_fits_its_algorithms() -> None:
    base = "jwt_issuers:\n  - {tenant: A, issuer: i, audience: a, algorithms: [%s]%s}\n"
    assert "give one key source" in _error(base % ("RS256", ""))
    assert "exactly one key source, not jwks_uri and public_key_pem" in _error(
        base % ("RS256", ", jwks_uri: 'https://x/j', public_key_pem: k")
    )
    assert "HS256 issuers take hs256_secret" in _error(base % ("HS256", ", jwks_uri: 'https://x/j'"))
    assert "only for algorithms [HS256]" in _error(base % ("RS256", ", hs256_secret: s"))
    assert "must be one of" in _error(base % ("none", ", jwks_uri: 'https://x/j'"))
    assert "JWKS mapping" in _error(base % ("RS256", ", jwks: {a: 1}"))
    doc = _doc(base % ("HS256", ""))  # an HS256 issuer may keep its stored secret
    assert doc.jwt_issuers == ({"tenant": "A", "issuer": "i", "audience": "a", "algorithms": ["HS256"]},)


def test_issuers_are_unique_per_tenant_and_per_issuer_and_audience() -> None:
    one = "  - {tenant: %s, issuer: i, audience: %s, algorithms: [RS256], jwks_uri: 'https://x/j'}\n"
    assert "a tenant has one entry per issuer" in _error("jwt_issuers:\n" + one % ("A", "a") + one % ("A", "b"))
    assert "one tenant per (issuer, audience)" in _error("jwt_issuers:\n" + one % ("A", "a") + one % ("B", "a"))
    text = "tenants: [{name: A}]\njwt_issuers:\n" + one % ("B", "a")
    assert "no tenant named 'B' in the file's tenants: list" in _error(text)


def test_a_matching_issuer_is_no_change_and_a_changed_one_is_replaced() -> None:
    assert _issuer_plan(ISSUER_FILE, ["Acme"], [_issuer_item("Acme", "https://idp.example/")]).changes == ()
    live = _issuer_item("Acme", "https://idp.example/", audience="old")
    (change,) = _issuer_plan(ISSUER_FILE, ["Acme"], [live]).changes
    assert (change.action, change.kind, change.id) == ("update", "issuer", live["id"])
    assert change.fields == (("audience", "old", "api"),)


def test_issuers_absent_from_the_file_are_deleted_first_and_new_ones_created() -> None:
    live = [_issuer_item("Acme", "https://old.example/", audience="api")]
    changes = _issuer_plan(ISSUER_FILE, ["Acme"], live).changes
    assert [(c.action, c.label) for c in changes] == [
        ("delete", "https://old.example/ of Acme"),
        ("create", "https://idp.example/ of Acme"),
    ]


def test_an_hs256_secret_is_needed_only_to_create_or_recreate_the_issuer() -> None:
    text = "jwt_issuers:\n  - {tenant: Acme, issuer: h, audience: %s, algorithms: [HS256]}\n"
    stored = _issuer_item("Acme", "h", algorithms=["HS256"], key_source="hs256_secret", jwks_uri=None)
    assert _issuer_plan(text % "api", ["Acme"], [stored]).changes == ()
    with pytest.raises(StateError, match="creating an HS256 issuer needs its hs256_secret"):
        _issuer_plan(text % "api", ["Acme"], [])
    with pytest.raises(StateError, match="needs its hs256_secret in the file"):
        _issuer_plan(text % "other", ["Acme"], [stored])


def test_export_then_plan_of_issuers_is_no_change_and_holds_no_secret() -> None:
    pem = "-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----\n"
    issuers = [
        _issuer_item("Acme", "https://idp.example/"),
        _issuer_item("Acme", "inline", key_source="jwks", jwks=JWKS, jwks_uri=None),
        _issuer_item(
            "Beta", "pem", algorithms=["ES256"], key_source="public_key_pem", public_key_pem=pem, jwks_uri=None
        ),
        _issuer_item("Beta", "hmac", algorithms=["HS256"], key_source="hs256_secret", jwks_uri=None),
    ]
    live = LiveState((_tenant_item("Acme"), _tenant_item("Beta")), (), tuple(issuers))
    text = decl.export_text(live)
    assert "hs256_secret" not in text.split("\n", 2)[2]
    assert "public_key_pem: |" in text  # the PEM stays readable
    data = yaml.safe_load(text)
    assert [(i["tenant"], i["issuer"]) for i in data["jwt_issuers"]] == [
        ("Acme", "https://idp.example/"),
        ("Acme", "inline"),
        ("Beta", "hmac"),
        ("Beta", "pem"),
    ]
    assert plan(parse(text, "export"), live, TIERS).changes == ()


def test_apply_replaces_an_issuer_by_delete_then_create_under_its_tenant(tmp_path: Path) -> None:
    live_issuer = _issuer_item("Acme", "https://idp.example/", audience="old")
    admin = FakeAdmin(LiveState((_tenant_item("Acme"),), (), (live_issuer,)))
    code, out, err = _apply(admin, ISSUER_FILE, tmp_path)
    assert (code, err) == (0, "")
    tid = live_issuer["tenant_id"]
    assert [(m, p) for m, p, _ in admin.writes] == [
        ("DELETE", f"/admin/tenants/{tid}/jwt-issuers/{live_issuer['id']}"),
        ("POST", f"/admin/tenants/{tid}/jwt-issuers"),
    ]
    assert admin.writes[1][2] == {
        "issuer": "https://idp.example/",
        "audience": "api",
        "algorithms": ["RS256"],
        "jwks_uri": "https://idp.example/jwks.json",
    }
    assert "replaced issuer https://idp.example/ of Acme" in out
