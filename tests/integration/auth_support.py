"""One control plane, data plane(s) and a recording upstream per auth test module, plus helpers to
mint tokens and to check that a refused request never reached the upstream."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import jwt as pyjwt

from tests.integration.harness import (
    ControlPlane,
    DataPlane,
    Processes,
    Response,
    http,
    start_control_plane,
    start_data_plane,
    wait_for,
)


class RecordingUpstream:
    """An upstream in this process that answers 200 and remembers every request it was sent."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        lock = threading.Lock()
        seen = self.requests

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                entry = {"method": self.command, "path": self.path, "headers": dict(self.headers.items())}
                with lock:
                    seen.append(entry)
                payload = json.dumps({**entry, "body_bytes": len(body)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def paths(self) -> list[str]:
        return [r["path"] for r in self.requests]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class AuthCluster:
    def __init__(self, cp: ControlPlane, dps: list[DataPlane], upstream: RecordingUpstream) -> None:
        self.cp, self.dps, self.upstream = cp, dps, upstream
        self.dp = dps[0]

    def write(self, method: str, path: str, body: Any = None, expect: int = 201) -> dict[str, Any]:
        """An admin write, waited for on every data plane."""
        resp = self.cp.api(method, path, body)
        assert resp.status == expect, resp.body
        result: dict[str, Any] = resp.json()
        self.sync(int(result["config_version"]))
        return result

    def sync(self, version: int) -> None:
        for dp in self.dps:
            wait_for(lambda dp=dp: dp.status()["config_version"] >= version, what=f"version {version} on {dp}")

    def tenant(self, tier: str = "free") -> dict[str, Any]:
        return self.write("POST", "/admin/tenants", {"name": f"t-{uuid.uuid4().hex[:10]}", "tier": tier})

    def route(self, **fields: Any) -> str:
        """A route on a fresh path prefix; returns the prefix."""
        prefix = f"/r{uuid.uuid4().hex[:10]}"
        self.write("POST", "/admin/routes", {"path": prefix + "/*", "upstream": self.upstream.url, **fields})
        return prefix

    def get(self, path: str, headers: dict[str, str] | None = None, dp: DataPlane | None = None) -> Response:
        return http("GET", (dp or self.dp).proxy_url + path, headers=headers)

    def refused(self, path: str, headers: dict[str, str], status: int, code: str) -> Response:
        """Send a request that must be refused with ``status``/``code`` and must not reach the upstream."""
        before = len(self.upstream.requests)
        resp = self.get(path, headers)
        assert resp.status == status, (resp.status, resp.body)
        body = resp.json()
        assert body["error"]["code"] == code, body
        assert body["error"]["request_id"] == resp.headers["x-request-id"]
        assert len(self.upstream.requests) == before, self.upstream.requests[before:]
        return resp

    def passed(self, path: str, headers: dict[str, str], dp: DataPlane | None = None) -> dict[str, Any]:
        """Send a request that must reach the upstream; returns what the upstream received."""
        before = len(self.upstream.requests)
        resp = self.get(path, headers, dp)
        assert resp.status == 200, (resp.status, resp.body)
        assert len(self.upstream.requests) == before + 1
        received: dict[str, Any] = self.upstream.requests[-1]
        return received


def raw_request(dp: DataPlane, method: str, path: str, headers: list[tuple[str, str]], body: bytes = b"") -> Response:
    """A request with headers exactly as given (repeats included), which urllib cannot send."""
    host, port = dp.proxy_url.removeprefix("http://").split(":")
    conn = HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        if body or method == "POST":
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body or None)
        resp = conn.getresponse()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def basic(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


def claims(iss: str, aud: str, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    result: dict[str, Any] = {"iss": iss, "aud": aud, "sub": "user-1", "iat": now, "exp": now + 300}
    result.update(overrides)
    return {k: v for k, v in result.items() if v is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def forge(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"x") -> str:
    return ".".join((b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()), b64(signature)))


def sign(payload: dict[str, Any], key: Any, alg: str, **header: Any) -> str:
    return pyjwt.encode(payload, key, algorithm=alg, headers=header or None)


async def _admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def auth_cluster(postgres_admin_url: str, redis_url: str, tmp: Path, data_planes: int = 1) -> Iterator[AuthCluster]:
    """Body of a module-scoped fixture: a fresh database, a control plane, ``data_planes`` data
    planes and a recording upstream, all stopped (and the database dropped) at the end."""
    name = f"tg_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(postgres_admin_url, f'CREATE DATABASE "{name}"'))
    database_url = postgres_admin_url.rsplit("/", 1)[0] + f"/{name}"
    procs = Processes(tmp)
    upstream = RecordingUpstream()
    try:
        cp = start_control_plane(procs, database_url)
        dps = [start_data_plane(procs, cp.cluster_addr, redis_url) for _ in range(data_planes)]
        yield AuthCluster(cp, dps, upstream)
    except BaseException:
        print(procs.dump_logs())
        raise
    finally:
        procs.stop_all()
        upstream.stop()
        asyncio.run(_admin(postgres_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


class JsonServer:
    """Serves one JSON document at every path (a JWKS endpoint for jwks_uri issuers)."""

    def __init__(self, document: Any) -> None:
        payload = json.dumps(document).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/jwks.json"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
