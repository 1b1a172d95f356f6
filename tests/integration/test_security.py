"""Hostile requests sent over raw sockets to a real data plane. Each case asserts the status the
client gets and what the upstream (a recorder) received: for a refused request nothing at all,
for an accepted one nothing it should not see. Every request carries a marker (``case=<id>``
in the query, or in the path of a smuggled request) to find its traces at the upstream."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.integration.proxy_env import ProxyEnv, proxy_env
from tests.integration.rawhttp import RawResponse, exchange

pytestmark = pytest.mark.integration


@dataclass
class Env:
    proxy: ProxyEnv
    key_a: str
    tenant_a: str
    key_b: str
    tenant_b: str


@pytest.fixture(scope="module")
def env(postgres_admin_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp: Path = tmp_path_factory.mktemp("security")
    with proxy_env(postgres_admin_url, redis_url, tmp) as proxy:
        a = proxy.tenant("Tenant A")
        b = proxy.tenant("Tenant B")
        proxy.route(path="/sec/*", methods=["GET", "POST", "PUT", "DELETE", "HEAD"])
        proxy.route(path="/private/*", tenants=[b["id"]])
        proxy.route(path="/open/*", auth_required=False)
        yield Env(proxy, a["api_key"], a["id"], b["api_key"], b["id"])


# What a case sends: built from the env (keys) and the case's marker.
Build = Callable[[Env, str], bytes]
Check = Callable[[Env, RawResponse, list[dict[str, Any]]], None]


@dataclass
class Case:
    id: str
    build: Build
    status: int
    # For accepted requests: assertions on the response and on what the upstream saw.
    check: Check | None = None
    error_code: str | None = None
    extra_markers: list[str] = field(default_factory=list)


def raw(
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    version: str = "HTTP/1.1",
) -> bytes:
    lines = [f"{method} {target} {version}".encode("latin-1")]
    lines += [f"{k}: {v}".encode("latin-1") for k, v in headers or []]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def req(
    method: str,
    target: str,
    *extra: tuple[str, str],
    body: bytes = b"",
    key: bool = True,
    host: bool = True,
    version: str = "HTTP/1.1",
) -> Build:
    """A request to ``target`` (``{m}`` is replaced by the marker) with Host and tenant A's key."""

    def build(env: Env, marker: str) -> bytes:
        headers: list[tuple[str, str]] = [("Host", "gateway.test")] if host else []
        if key:
            headers.append(("X-API-Key", env.key_a))
        headers += list(extra)
        if body and not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in extra):
            headers.append(("Content-Length", str(len(body))))
        return raw(method, target.replace("{m}", marker), headers, body, version)

    return build


def literal(data: bytes) -> Build:
    """Bytes sent as they are; ``{m}`` and ``{key}`` filled in."""

    def build(env: Env, marker: str) -> bytes:
        return data.replace(b"{m}", marker.encode()).replace(b"{key}", env.key_a.encode())

    return build


def smuggled(marker: str) -> bytes:
    """A complete second request hidden in the body: it must never reach the upstream."""
    return f"GET /sec/smuggled?{marker}-smuggled HTTP/1.1\r\nHost: gateway.test\r\n\r\n".encode()


def header_map(entry: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in entry["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


def only(seen: list[dict[str, Any]]) -> dict[str, list[str]]:
    assert len(seen) == 1, seen
    return header_map(seen[0])


# --- checks for accepted requests ---


def _forwarding_is_the_gateways(env: Env, resp: RawResponse, seen: list[dict[str, Any]]) -> None:
    headers = only(seen)
    assert headers["x-forwarded-for"] == ["127.0.0.1"]
    assert headers["x-forwarded-proto"] == ["http"]
    assert headers["x-forwarded-host"] == ["gateway.test"]
    assert "forwarded" not in headers and "x-real-ip" not in headers and "x-forwarded-port" not in headers


def _gateway_headers_survive_connection(env: Env, resp: RawResponse, seen: list[dict[str, Any]]) -> None:
    headers = only(seen)
    assert headers["x-forwarded-for"] == ["127.0.0.1"]
    assert headers["x-tenant-id"] == [env.tenant_a]
    assert headers["x-request-id"] == [resp.header("X-Request-ID")]


def _hop_by_hop_removed(env: Env, resp: RawResponse, seen: list[dict[str, Any]]) -> None:
    headers = only(seen)
    for name in ("connection", "keep-alive", "te", "trailer", "proxy-authorization", "proxy-connection", "x-custom"):
        assert name not in headers, name
    assert headers["x-kept"] == ["1"]


def _upgrade_ignored(env: Env, resp: RawResponse, seen: list[dict[str, Any]]) -> None:
    headers = only(seen)
    assert "upgrade" not in headers and "http2-settings" not in headers and "connection" not in headers
    assert seen[0]["method"] == "GET"
    assert not resp.rest  # the bytes after the head were not parsed as a second request


def _identity_is_the_gateways(env: Env, resp: RawResponse, seen: list[dict[str, Any]]) -> None:
    headers = only(seen)
    assert headers["x-tenant-id"] == [env.tenant_a]
    assert not [name for name in headers if name.startswith(("x-tenant-", "x-consumer-")) and name != "x-tenant-id"]


def _no_credentials(env: Env, resp: RawResponse, seen: list[dict[str, Any]]) -> None:
    headers = only(seen)
    assert "x-api-key" not in headers and "authorization" not in headers
    assert env.key_a not in str(seen)


def _method_is_the_authorised_one(method: str) -> Check:
    def check(env: Env, resp: RawResponse, seen: list[dict[str, Any]]) -> None:
        headers = only(seen)
        assert seen[0]["method"] == method
        for name in ("x-http-method-override", "x-method-override", "x-http-method"):
            assert name not in headers

    return check


def _path_overrides_removed(env: Env, resp: RawResponse, seen: list[dict[str, Any]]) -> None:
    headers = only(seen)
    assert "x-original-url" not in headers and "x-rewrite-url" not in headers
    assert seen[0]["path"] == "/sec/x"


def _raw_path_exact(expected: str) -> Check:
    def check(env: Env, resp: RawResponse, seen: list[dict[str, Any]]) -> None:
        assert len(seen) == 1
        assert seen[0]["path"] == expected

    return check


def _request_id_replaced(env: Env, resp: RawResponse, seen: list[dict[str, Any]]) -> None:
    headers = only(seen)
    rid = resp.header("X-Request-ID")
    assert rid and rid != "<script>" and headers["x-request-id"] == [rid]


def _response_hop_by_hop_removed(env: Env, resp: RawResponse, seen: list[dict[str, Any]]) -> None:
    assert resp.header("X-Upstream") == "recorder"
    assert resp.header("X-Upstream-Secret") is None and resp.header("Keep-Alive") is None


def _basic_auth_is_the_upstreams(env: Env, resp: RawResponse, seen: list[dict[str, Any]]) -> None:
    headers = only(seen)
    assert headers["authorization"] == ["Basic dXNlcjpwYXNz"]
    assert "x-tenant-id" not in headers


def _continued(env: Env, resp: RawResponse, seen: list[dict[str, Any]]) -> None:
    headers = only(seen)
    assert resp.interim == [100]
    assert "expect" not in headers and seen[0]["body_bytes"] == 4


B = "/sec/x?{m}"
CASES: list[Case] = [
    # Path tricks: every form an upstream could read as another path is refused.
    Case("dot-dot", req("GET", "/sec/../private/x?{m}"), 400, error_code="bad_path"),
    Case("encoded-dot-dot", req("GET", "/sec/%2e%2e/private/x?{m}"), 400, error_code="bad_path"),
    Case("mixed-case-encoded-dot-dot", req("GET", "/sec/%2E%2e/private/x?{m}"), 400, error_code="bad_path"),
    Case("half-encoded-dot-dot", req("GET", "/sec/.%2e/private/x?{m}"), 400, error_code="bad_path"),
    Case("single-dot", req("GET", "/sec/./x?{m}"), 400, error_code="bad_path"),
    Case("encoded-slash", req("GET", "/sec/..%2fprivate/x?{m}"), 400, error_code="bad_path"),
    Case("encoded-backslash", req("GET", "/sec/..%5Cprivate/x?{m}"), 400, error_code="bad_path"),
    Case("raw-backslash", req("GET", "/sec/..\\private/x?{m}"), 400, error_code="bad_path"),
    Case("encoded-nul", req("GET", "/sec/x%00.json?{m}"), 400, error_code="bad_path"),
    Case("path-parameter", req("GET", "/sec/x;jsessionid=1?{m}"), 400, error_code="bad_path"),
    Case("encoded-semicolon", req("GET", "/sec/x%3Bjsessionid=1?{m}"), 400, error_code="bad_path"),
    Case("empty-segment", req("GET", "/sec//x?{m}"), 400, error_code="bad_path"),
    Case("invalid-utf8", req("GET", "/sec/%ff?{m}"), 400, error_code="bad_path"),
    Case("overlong-utf8-dot", req("GET", "/sec/%c0%ae%c0%ae/private?{m}"), 400, error_code="bad_path"),
    Case("bad-escape", req("GET", "/sec/%zz?{m}"), 400, error_code="bad_path"),
    Case("encoded-crlf", req("GET", "/sec/x%0d%0aX-Tenant-ID:%20evil?{m}"), 400, error_code="bad_path"),
    Case("fragment", req("GET", "/sec/x?{m}#frag"), 400, error_code="bad_target"),
    Case("absolute-form", req("GET", "http://evil.example/sec/x?{m}"), 400, error_code="bad_target"),
    Case("absolute-form-own-host", req("GET", "http://gateway.test/private/x?{m}"), 400, error_code="bad_target"),
    Case("asterisk-form", literal(b"OPTIONS * HTTP/1.1\r\nHost: gateway.test\r\nX-M: {m}\r\n\r\n"), 400),
    Case("connect", literal(b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\nX-M: {m}\r\n\r\n"), 400),
    Case("other-tenants-route", req("GET", "/private/x?{m}"), 403),
    # Encoded letters decode to the restricted route's path: matched, and refused, as that route.
    Case("encoded-letters-reach-the-same-route", req("GET", "/priv%61te/x?{m}"), 403),
    Case("case-changed-prefix", req("GET", "/SEC/x?{m}"), 404),
    # Request smuggling: conflicting or unusual framing is refused and the connection closed.
    Case(
        "cl-te",
        lambda env, m: raw(
            "POST",
            f"/sec/x?{m}",
            [
                ("Host", "gateway.test"),
                ("X-API-Key", env.key_a),
                ("Content-Length", "4"),
                ("Transfer-Encoding", "chunked"),
            ],
            b"0\r\n\r\n" + smuggled(m),
        ),
        400,
        extra_markers=["-smuggled"],
    ),
    Case(
        "te-cl",
        lambda env, m: raw(
            "POST",
            f"/sec/x?{m}",
            [
                ("Host", "gateway.test"),
                ("X-API-Key", env.key_a),
                ("Transfer-Encoding", "chunked"),
                ("Content-Length", "60"),
            ],
            b"5c\r\n" + smuggled(m) + b"\r\n0\r\n\r\n",
        ),
        400,
        extra_markers=["-smuggled"],
    ),
    Case(
        "te-te-duplicate",
        req("POST", B, ("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "identity"), body=b"0\r\n\r\n"),
        400,
    ),
    Case(
        "te-gzip-chunked",
        lambda env, m: raw(
            "POST",
            f"/sec/x?{m}",
            [("Host", "gateway.test"), ("X-API-Key", env.key_a), ("Transfer-Encoding", "gzip, chunked")],
            b"0\r\n\r\n" + smuggled(m),
        ),
        400,
        error_code="bad_framing",
        extra_markers=["-smuggled"],
    ),
    Case("te-xchunked", req("POST", B, ("Transfer-Encoding", "xchunked"), body=b"0\r\n\r\n"), 400),
    Case("te-space-before-colon", req("POST", B, ("Transfer-Encoding ", "chunked"), body=b"0\r\n\r\n"), 400),
    Case(
        "te-in-http10",
        req("POST", B, ("Transfer-Encoding", "chunked"), body=b"0\r\n\r\n", version="HTTP/1.0"),
        400,
        error_code="bad_framing",
    ),
    Case(
        "duplicate-content-length", req("POST", B, ("Content-Length", "3"), ("Content-Length", "4"), body=b"abcd"), 400
    ),
    Case("content-length-list", req("POST", B, ("Content-Length", "4, 4"), body=b"abcd"), 400),
    Case("content-length-signed", req("POST", B, ("Content-Length", "+4"), body=b"abcd"), 400),
    Case(
        "bad-chunk-size",
        req("POST", B, ("Transfer-Encoding", "chunked"), body=b"4x\r\nabcd\r\n0\r\n\r\n"),
        400,
    ),
    Case(
        "obs-fold",
        literal(b"GET /sec/x?{m} HTTP/1.1\r\nHost: gateway.test\r\nX-API-Key: {key}\r\nX-A: a\r\n b\r\n\r\n"),
        400,
    ),
    Case("bare-lf", literal(b"GET /sec/x?{m} HTTP/1.1\nHost: gateway.test\nX-API-Key: {key}\n\n"), 400),
    # Header injection.
    Case(
        "cr-in-header-value",
        literal(
            b"GET /sec/x?{m} HTTP/1.1\r\nHost: gateway.test\r\nX-API-Key: {key}\r\nX-A: a\rX-Tenant-ID: evil\r\n\r\n"
        ),
        400,
    ),
    Case("nul-in-header-value", literal(b"GET /sec/x?{m} HTTP/1.1\r\nHost: gateway.test\r\nX-A: a\x00b\r\n\r\n"), 400),
    Case("space-in-header-name", req("GET", B, ("X A", "1")), 400),
    Case("raw-control-in-target", literal(b"GET /sec/x\x01?{m} HTTP/1.1\r\nHost: gateway.test\r\n\r\n"), 400),
    Case("invalid-request-id", req("GET", B, ("X-Request-ID", "<script>")), 200, _request_id_replaced),
    # Hop-by-hop abuse: Connection cannot remove what the gateway sets, and hop-by-hop goes nowhere.
    Case(
        "connection-names-gateway-headers",
        req("GET", B, ("Connection", "close, X-Forwarded-For, X-Tenant-ID, X-Request-ID")),
        200,
        _gateway_headers_survive_connection,
    ),
    Case(
        "hop-by-hop-headers",
        req(
            "GET",
            B,
            ("Connection", "keep-alive, X-Custom"),
            ("X-Custom", "1"),
            ("Keep-Alive", "timeout=300"),
            ("TE", "trailers"),
            ("Trailer", "X-Checksum"),
            ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
            ("Proxy-Connection", "keep-alive"),
            ("X-Kept", "1"),
        ),
        200,
        _hop_by_hop_removed,
    ),
    Case(
        "h2c-upgrade",
        lambda env, m: raw(
            "GET",
            f"/sec/x?{m}",
            [
                ("Host", "gateway.test"),
                ("X-API-Key", env.key_a),
                ("Connection", "Upgrade, HTTP2-Settings"),
                ("Upgrade", "h2c"),
                ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"),
            ],
        ),
        200,
        _upgrade_ignored,
    ),
    Case("response-hop-by-hop", req("GET", "/sec/x?{m}&hop=1"), 200, _response_hop_by_hop_removed),
    # Oversized input.
    Case("oversized-header", req("GET", B, ("X-Big", "a" * 20_000)), 400, error_code="malformed_request"),
    Case("oversized-url", req("GET", "/sec/" + "a" * 9000 + "?{m}"), 400),
    Case("too-many-headers", req("GET", B, *[(f"X-H{i}", "1") for i in range(150)]), 400),
    # Host confusion.
    Case("duplicate-host", req("GET", B, ("Host", "private.test")), 400),
    Case(
        "host-with-userinfo",
        req("GET", B, ("Host", "gateway.test@evil.example"), host=False),
        400,
        error_code="bad_host",
    ),
    Case("host-with-path", req("GET", B, ("Host", "gateway.test/private"), host=False), 400, error_code="bad_host"),
    Case("missing-host", req("GET", B, host=False), 400),
    Case("empty-host", req("GET", B, ("Host", ""), host=False), 400),
    # Credentials, identity and client-address spoofing.
    Case("credentials-not-forwarded", req("GET", B), 200, _no_credentials),
    Case(
        "other-authorization-schemes-pass",
        req("GET", "/open/x?{m}", ("Authorization", "Basic dXNlcjpwYXNz"), key=False),
        200,
        _basic_auth_is_the_upstreams,
    ),
    Case(
        "spoofed-tenant-headers",
        lambda env, m: raw(
            "GET",
            f"/sec/x?{m}",
            [
                ("Host", "gateway.test"),
                ("X-API-Key", env.key_a),
                ("X-Tenant-ID", env.tenant_b),
                ("X-Tenant-Tier", "enterprise"),
                ("X-Consumer-ID", "admin"),
                ("X-Consumer-Username", "root"),
            ],
        ),
        200,
        _identity_is_the_gateways,
    ),
    Case(
        "spoofed-tenant-header-on-private-route",
        lambda env, m: raw(
            "GET",
            f"/private/x?{m}",
            [("Host", "gateway.test"), ("X-API-Key", env.key_a), ("X-Tenant-ID", env.tenant_b)],
        ),
        403,
    ),
    Case(
        "spoofed-forwarding",
        req(
            "GET",
            B,
            ("X-Forwarded-For", "10.0.0.1"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "admin.internal"),
            ("X-Forwarded-Port", "443"),
            ("Forwarded", "for=10.0.0.1;proto=https"),
            ("X-Real-IP", "10.0.0.1"),
        ),
        200,
        _forwarding_is_the_gateways,
    ),
    # Method tricks.
    Case(
        "method-override-headers",
        req(
            "POST",
            B,
            ("X-HTTP-Method-Override", "DELETE"),
            ("X-Method-Override", "PATCH"),
            ("X-HTTP-Method", "PUT"),
            body=b"{}",
        ),
        200,
        _method_is_the_authorised_one("POST"),
    ),
    Case(
        "path-override-headers",
        req("GET", B, ("X-Original-URL", "/private/x"), ("X-Rewrite-URL", "/private/x")),
        200,
        _path_overrides_removed,
    ),
    Case("trace-not-listed", req("TRACE", B), 405),
    Case("trace-on-route-without-method-list", req("TRACE", "/open/x?{m}", key=False), 405),
    Case("unknown-method", req("PROPFIND", B), 405),
    Case("http-0.9", literal(b"GET /sec/x?{m}\r\n\r\n"), 400),
    Case("http-2-preface-version", req("GET", B, version="HTTP/2.0"), 400, error_code="unsupported_http_version"),
    Case(
        "expect-continue-refused", req("POST", B, ("Expect", "100-continue"), ("Content-Length", "4"), key=False), 401
    ),
    Case("expect-continue-admitted", req("POST", B, ("Expect", "100-continue"), body=b"abcd"), 200, _continued),
    # The path that was matched is the path sent, byte for byte.
    Case("percent-encoding-kept", req("GET", "/sec/caf%C3%A9/%41?{m}"), 200, _raw_path_exact("/sec/caf%C3%A9/%41")),
    Case("double-encoding-kept", req("GET", "/sec/%252e%252e/x?{m}"), 200, _raw_path_exact("/sec/%252e%252e/x")),
    Case("trailing-slash-kept", req("GET", "/sec/x/?{m}"), 200, _raw_path_exact("/sec/x/")),
]


# Cases decided (in part) by aiohttp's HTTP parser: checked again against a data plane that runs
# aiohttp's pure-Python parser (AIOHTTP_NO_EXTENSIONS=1), which must refuse them the same way.
PARSER_CASES = [
    case
    for case in CASES
    if case.id.startswith(("cl-", "te-", "duplicate-", "content-length-", "bad-chunk", "obs-fold", "bare-lf", "http-"))
    or case.id
    in ("cr-in-header-value", "nul-in-header-value", "space-in-header-name", "raw-control-in-target", "missing-host")
    or case.id.startswith(("oversized-", "too-many-", "absolute-form", "asterisk"))
    or case.id == "connect"
]


@pytest.fixture(scope="module")
def python_parser(env: Env) -> Iterator[ProxyEnv]:
    proxy = env.proxy.with_data_plane(AIOHTTP_NO_EXTENSIONS="1")
    try:
        yield proxy
    finally:
        proxy.dp.proc.stop()


def test_at_least_forty_distinct_hostile_cases() -> None:
    assert len({case.id for case in CASES}) == len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_hostile_request(env: Env, case: Case) -> None:
    marker = f"case={case.id}"
    resp = exchange(env.proxy.port, case.build(env, marker))

    assert resp.status == case.status, (resp.status, resp.body[:500])
    assert resp.header("X-Request-ID")
    if case.status >= 400:
        error = resp.json()["error"]
        assert set(error) == {"code", "message", "request_id"}
        assert error["request_id"] == resp.header("X-Request-ID")
        if case.error_code is not None:
            assert error["code"] == case.error_code
        # Nothing after the error answer: no second (smuggled) request was parsed.
        assert not resp.rest, resp.rest[:300]
        assert resp.interim == []  # a refused client is never asked for its body
    seen = env.proxy.seen(marker)
    if case.check is None:
        assert seen == [], f"the upstream received a refused request: {seen}"
    else:
        case.check(env, resp, seen)
    for extra in case.extra_markers:
        assert env.proxy.seen(marker + extra) == []


def test_forwarded_headers_from_a_trusted_proxy_are_kept_and_extended(env: Env) -> None:
    trusted = env.proxy.with_data_plane(TENANTGATE_TRUSTED_PROXIES="127.0.0.0/8")
    try:
        resp = exchange(
            trusted.port,
            raw(
                "GET",
                "/sec/x?case=trusted-forwarding",
                [
                    ("Host", "gateway.test"),
                    ("X-API-Key", env.key_a),
                    ("X-Forwarded-For", "203.0.113.7"),
                    ("X-Forwarded-Proto", "https"),
                    ("X-Forwarded-Host", "api.example.com"),
                    ("X-Real-IP", "10.0.0.1"),
                ],
            ),
        )
    finally:
        trusted.dp.proc.stop()

    assert resp.status == 200
    headers = only(env.proxy.seen("case=trusted-forwarding"))
    assert headers["x-forwarded-for"] == ["203.0.113.7, 127.0.0.1"]
    assert headers["x-forwarded-proto"] == ["https"]
    assert headers["x-forwarded-host"] == ["api.example.com"]
    assert "x-real-ip" not in headers


@pytest.mark.parametrize("case", PARSER_CASES, ids=lambda case: case.id)
def test_hostile_request_with_the_python_parser(env: Env, python_parser: ProxyEnv, case: Case) -> None:
    marker = f"case=py-{case.id}"
    resp = exchange(python_parser.port, case.build(env, marker))

    assert resp.status == case.status, (resp.status, resp.body[:500])
    if case.status >= 400:
        assert set(resp.json()["error"]) == {"code", "message", "request_id"}
        assert not resp.rest, resp.rest[:300]
    assert env.proxy.seen(marker) == []
