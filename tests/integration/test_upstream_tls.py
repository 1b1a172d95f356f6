"""HTTPS upstreams through real processes: a test CA and server certificates made here, two
TLS instances of tests/integration/upstream_app.py (one with a certificate from that CA for
``localhost``, one from a CA nobody trusts) and a data plane given the test CA with
``TENANTGATE_UPSTREAM_CA_FILE``.

The data plane verifies an upstream's certificate against the system's trust store plus that
file, and for the host in the route's upstream URL, which it also sends as SNI.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import socket
import ssl
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.client import HTTPSConnection
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

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
from tests.integration.test_upstream import _admin

pytestmark = pytest.mark.integration


@dataclass
class Issued:
    cert: Path
    key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Issued:
    cert_path, key_path = path.with_suffix(".pem"), path.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return Issued(cert_path, key_path)


def _ca(path: Path, name: str) -> tuple[Issued, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write(path, cert, key), cert, key


def _server(path: Path, host: str, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey) -> Issued:
    """A server certificate for the DNS name ``host`` (and nothing else), signed by the CA."""
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return _write(path, cert, key)


@dataclass
class TlsUpstream:
    port: int
    ca: Path  # the CA its certificate chains to

    def stats(self) -> dict[str, Any]:
        """Straight from the upstream, not through the gateway: by its address, so without
        SNI (its chain still checked against its CA), and its handshakes are told apart."""
        context = ssl.create_default_context(cafile=str(self.ca))
        context.check_hostname = False
        conn = HTTPSConnection("127.0.0.1", self.port, context=context, timeout=10)
        try:
            conn.request("GET", "/_control/stats")
            stats: dict[str, Any] = json.loads(conn.getresponse().read())
            stats["server_names"] = [name for name in stats["server_names"] if name is not None]
            return stats
        finally:
            conn.close()


@dataclass
class Env:
    cp: ControlPlane
    dp: DataPlane
    trusted: TlsUpstream  # certificate for localhost from the CA the data plane is given
    untrusted: TlsUpstream  # certificate for localhost from a CA the data plane does not know
    route_ids: dict[str, str] = field(default_factory=dict)

    def route(self, name: str, upstream: str, **fields: Any) -> str:
        body = {"path": f"/{name}/*", "upstream": upstream, "auth_required": False, "retries": 0, **fields}
        created = self.cp.api("POST", "/admin/routes", body)
        assert created.status == 201, created.body
        self.route_ids[name] = created.json()["id"]
        self.sync(created.json()["config_version"])
        return f"/{name}"

    def sync(self, version: int) -> None:
        wait_for(lambda: self.dp.status()["config_version"] >= version, what=f"config version {version}")

    def get(self, path: str) -> Response:
        return http("GET", self.dp.proxy_url + path, timeout=30)


def _start_tls_upstream(procs: Processes, name: str, issued: Issued, ca: Path) -> TlsUpstream:
    port = free_port()
    proc = procs.spawn(
        f"upstream-{name}",
        [
            "-m",
            "tests.integration.upstream_app",
            "--listen",
            f"127.0.0.1:{port}",
            "--name",
            name,
            "--tls-cert",
            str(issued.cert),
            "--tls-key",
            str(issued.key),
        ],
    )

    def listening() -> bool:
        assert proc.alive(), proc.log()
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True

    wait_for(listening, what=f"upstream {name}")
    return TlsUpstream(port, ca)


@pytest.fixture(scope="module")
def env(postgres_admin_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = Path(tmp_path_factory.mktemp("upstream-tls"))
    ca, ca_cert, ca_key = _ca(tmp / "ca", "tenantgate test CA")
    rogue, rogue_cert, rogue_key = _ca(tmp / "rogue-ca", "tenantgate untrusted CA")
    name = f"tg_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(postgres_admin_url, f'CREATE DATABASE "{name}"'))
    database_url = postgres_admin_url.rsplit("/", 1)[0] + f"/{name}"
    procs = Processes(tmp)
    try:
        cp = start_control_plane(procs, database_url)
        dp = start_data_plane(procs, cp.cluster_addr, redis_url, TENANTGATE_UPSTREAM_CA_FILE=str(ca.cert))
        trusted = _start_tls_upstream(procs, "trusted", _server(tmp / "trusted", "localhost", ca_cert, ca_key), ca.cert)
        untrusted = _start_tls_upstream(
            procs, "untrusted", _server(tmp / "untrusted", "localhost", rogue_cert, rogue_key), rogue.cert
        )
        yield Env(cp, dp, trusted, untrusted)
    except BaseException:
        print(procs.dump_logs())
        raise
    finally:
        procs.stop_all()
        asyncio.run(_admin(postgres_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _assert_refused(resp: Response) -> None:
    assert resp.status == 502, resp.body
    error = resp.json()["error"]
    assert error["code"] == "upstream_connect_error", error
    assert error["message"] and error["request_id"] == resp.headers["x-request-id"], error


def test_a_certificate_from_the_configured_ca_for_the_host_is_accepted_and_sni_sent(env: Env) -> None:
    before = len(env.trusted.stats()["server_names"])
    prefix = env.route("tls-ok", f"https://localhost:{env.trusted.port}")
    resp = env.get(f"{prefix}/hello")
    assert resp.status == 200, resp.body
    assert resp.json() == {"instance": "trusted", "method": "GET", "path": "/tls-ok/hello"}
    assert env.trusted.stats()["server_names"][before:] == ["localhost"]


def test_a_certificate_not_naming_the_host_is_a_502(env: Env) -> None:
    # The same upstream and certificate, reached by its address: the certificate names only localhost.
    hits = env.trusted.stats()["hits"]
    prefix = env.route("tls-wrong-host", f"https://127.0.0.1:{env.trusted.port}")
    _assert_refused(env.get(f"{prefix}/hello"))
    assert env.trusted.stats()["hits"] == hits  # no request went over the refused connection


def test_a_certificate_from_an_unknown_ca_is_a_502(env: Env) -> None:
    hits = env.untrusted.stats()["hits"]
    prefix = env.route("tls-untrusted", f"https://localhost:{env.untrusted.port}")
    _assert_refused(env.get(f"{prefix}/hello"))
    assert env.untrusted.stats()["hits"] == hits


def test_requests_reuse_one_tls_connection(env: Env) -> None:
    prefix = env.route("tls-keepalive", f"https://localhost:{env.trusted.port}")
    before = env.trusted.stats()
    for i in range(5):
        resp = env.get(f"{prefix}/again/{i}")
        assert resp.status == 200, resp.body
    after = env.trusted.stats()
    assert after["hits"] - before["hits"] == 5
    # At most one new connection (none if an earlier test's is still idle in the pool) and
    # at most one handshake for all five.
    assert after["connections"] - before["connections"] <= 1
    assert len(after["server_names"]) - len(before["server_names"]) <= 1


def test_a_streamed_body_arrives_whole_over_tls(env: Env) -> None:
    prefix = env.route("tls-stream", f"https://localhost:{env.trusted.port}")
    resp = env.get(f"{prefix}/big?chunks=4096")  # 4 MiB in 1 KiB chunks
    assert resp.status == 200
    assert len(resp.body) == 4096 * 1024 and resp.body == b"y" * (4096 * 1024)


def test_a_streamed_body_over_tls_reaches_a_reader_with_a_small_window_whole(env: Env) -> None:
    # The client's window is small, so the gateway's transport to it fills whenever the reader
    # is not reading at that instant: the upstream's TLS connection is held and released many
    # times on the way.
    prefix = env.route("tls-window", f"https://localhost:{env.trusted.port}")
    port = int(env.dp.proxy_url.rpartition(":")[2])
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(30)
        sock.connect(("127.0.0.1", port))
        sock.sendall(f"GET {prefix}/window?chunks=8192 HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".encode())
        data = bytearray()
        while chunk := sock.recv(4096):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"transfer-encoding: chunked" in head.lower()
    payload = _unchunk(body)
    assert len(payload) == 8192 * 1024 and payload == b"y" * (8192 * 1024)


def _unchunk(body: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while True:
        end = body.index(b"\r\n", pos)
        size = int(body[pos:end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += body[end + 2 : end + 2 + size]
        pos = end + 2 + size + 2


def test_health_checks_reach_an_https_upstream_trusted_through_the_configured_ca(env: Env) -> None:
    # The health checks' own client trusts the same CAs: a check that failed its handshake
    # would never reach the upstream's handler.
    before = env.trusted.stats()["health_hits"]
    env.route(
        "tls-health",
        f"https://localhost:{env.trusted.port}",
        health_check={"path": "/health", "interval_s": 1, "healthy": 1, "unhealthy": 2},
    )
    try:
        wait_for(lambda: env.trusted.stats()["health_hits"] >= before + 2, what="two health checks over TLS")
        assert env.get("/tls-health/hello").status == 200
    finally:
        deleted = env.cp.api("DELETE", f"/admin/routes/{env.route_ids['tls-health']}")
        assert deleted.status in (200, 204), deleted.body
