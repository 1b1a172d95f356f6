"""The cluster port across replicas and failures: two control planes on one Postgres with
data planes split between them, a replica that dies, an idle stream kept alive, a wrong
cluster token, and TLS."""

from __future__ import annotations

import ipaddress
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509

from tests.integration.certs import self_signed
from tests.integration.harness import (
    CLUSTER_TOKEN,
    Processes,
    start_control_plane,
    start_data_plane,
    start_echo,
    wait_for,
)

pytestmark = pytest.mark.integration

LOOPBACK = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))

UNLIMITED = {"name": "A", "tier": "enterprise", "rate_limit_per_minute": 10**6, "rate_limit_per_hour": 10**8}


def test_two_replicas_serve_every_node_and_a_dead_replicas_nodes_show_disconnected(
    procs: Processes, database_url: str, redis_url: str
) -> None:
    a = start_control_plane(procs, database_url)
    b = start_control_plane(procs, database_url)
    dp_a = start_data_plane(procs, a.cluster_addr, redis_url, TENANTGATE_NODE_ID="dp-a")
    dp_b = start_data_plane(procs, b.cluster_addr, redis_url, TENANTGATE_NODE_ID="dp-b")
    upstream = start_echo(procs)
    key = a.api("POST", "/admin/tenants", UNLIMITED).json()["api_key"]

    # A change through either replica reaches the nodes of both.
    a.api("POST", "/admin/routes", {"path": "/via-a/*", "upstream": upstream})
    b.api("POST", "/admin/routes", {"path": "/via-b/*", "upstream": upstream})
    for dp in (dp_a, dp_b):
        for path in ("/via-a/x", "/via-b/x"):
            wait_for(lambda dp=dp, path=path: dp.get(path, {"X-API-Key": key}).status == 200, what=path)

    def statuses() -> dict[str, str]:
        return {n["node_id"]: n["status"] for n in a.api("GET", "/admin/nodes").json()}

    # Either replica answers for every node.
    wait_for(lambda: statuses() == {"dp-a": "synced", "dp-b": "synced"}, what="both nodes synced")
    assert {n["node_id"]: n["status"] for n in b.api("GET", "/admin/nodes").json()} == statuses()

    # Replica B dies without a word: its node keeps serving, and once no replica has vouched
    # for it for three heartbeats, A reports it disconnected. Meanwhile dp-a's stream idles
    # through several keepalive pings and must survive them.
    idle_since = time.monotonic()
    b.proc.stop(signal.SIGKILL)
    assert dp_b.get("/via-a/x", {"X-API-Key": key}).status == 200
    wait_for(lambda: statuses()["dp-b"] == "disconnected", timeout=40, what="dp-b disconnected")
    assert statuses()["dp-a"] == "synced"
    wait_for(lambda: time.monotonic() - idle_since > 21, timeout=40, interval=0.5, what="two keepalive periods")

    version = a.api("POST", "/admin/routes", {"path": "/after-idle/*", "upstream": upstream}).json()["config_version"]
    wait_for(lambda: dp_a.get("/after-idle/x", {"X-API-Key": key}).status == 200, what="change after idling")
    assert dp_a.status()["config_version"] == version
    # The same stream carried it: dp-a connected once, and never lost its control plane.
    assert a.proc.log().count("data plane connected node_id=dp-a") == 1
    assert "unavailable" not in dp_a.proc.log()
    assert "too_many_pings" not in dp_a.proc.log() + a.proc.log()


def test_wrong_cluster_token_is_refused_with_one_clear_line(
    procs: Processes, database_url: str, redis_url: str
) -> None:
    cp = start_control_plane(procs, database_url)
    dp = start_data_plane(
        procs, cp.cluster_addr, redis_url, wait_ready=False, TENANTGATE_CLUSTER_TOKEN="not-the-cluster-token-at-all"
    )
    wait_for(lambda: cp.proc.log().count("refused a data plane with a wrong cluster token") >= 3, what="retries")
    status = dp.status()
    assert (status["cp_connected"], status["config_version"]) == (False, 0)
    assert "refused the cluster token; check TENANTGATE_CLUSTER_TOKEN" in status["last_error"]
    # Retried with backoff, but said once.
    assert dp.proc.log().count("refused the cluster token") == 1, dp.proc.log()
    assert cp.api("GET", "/admin/nodes").json() == []


def test_during_a_token_rotation_both_tokens_are_accepted_and_no_other(
    procs: Processes, database_url: str, redis_url: str
) -> None:
    new_token = "the-new-cluster-token-0123456789"
    cp = start_control_plane(
        procs, database_url, TENANTGATE_CLUSTER_TOKEN=new_token, TENANTGATE_CLUSTER_TOKEN_PREVIOUS=CLUSTER_TOKEN
    )
    old_dp = start_data_plane(procs, cp.cluster_addr, redis_url)  # still on the previous token
    new_dp = start_data_plane(procs, cp.cluster_addr, redis_url, TENANTGATE_CLUSTER_TOKEN=new_token)
    stranger = start_data_plane(
        procs, cp.cluster_addr, redis_url, wait_ready=False, TENANTGATE_CLUSTER_TOKEN="neither-of-the-two-tokens"
    )
    assert old_dp.status()["cp_connected"] and new_dp.status()["cp_connected"]
    wait_for(lambda: "refused the cluster token" in stranger.status()["last_error"], what="the stranger refused")
    assert stranger.status()["config_version"] == 0


def test_cluster_port_with_tls(procs: Processes, database_url: str, redis_url: str) -> None:
    cert, key = self_signed(procs.tmp, LOOPBACK)
    tls = start_control_plane(
        procs, database_url, TENANTGATE_CLUSTER_TLS_CERT=str(cert), TENANTGATE_CLUSTER_TLS_KEY=str(key)
    )
    trusting = start_data_plane(procs, tls.cluster_addr, redis_url, TENANTGATE_CLUSTER_TLS_CA=str(cert))
    assert trusting.status()["cp_connected"] is True
    upstream = start_echo(procs)
    api_key = tls.api("POST", "/admin/tenants", UNLIMITED).json()["api_key"]
    tls.api("POST", "/admin/routes", {"path": "/api/*", "upstream": upstream})
    wait_for(lambda: trusting.get("/api/x", {"X-API-Key": api_key}).status == 200, what="config over TLS")

    # Plaintext to a TLS port gets nowhere.
    plain = start_data_plane(procs, tls.cluster_addr, redis_url, wait_ready=False)
    wait_for(lambda: plain.status()["last_error"] != "", what="plaintext refused")
    assert plain.status()["cp_connected"] is False

    # A node with a CA never falls back to plaintext.
    plain_cp = start_control_plane(procs, database_url)
    strict = start_data_plane(
        procs, plain_cp.cluster_addr, redis_url, wait_ready=False, TENANTGATE_CLUSTER_TLS_CA=str(cert)
    )
    wait_for(lambda: "over TLS" in strict.status()["last_error"], what="TLS required")
    assert strict.status()["cp_connected"] is False


@pytest.mark.parametrize(
    ("setting", "content", "message"),
    [
        ("TENANTGATE_CLUSTER_TLS_CERT", b"not a certificate", "is not a PEM certificate"),
        (
            "TENANTGATE_CLUSTER_TLS_KEY",
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            "is not a PEM private key",
        ),
    ],
)
def test_bad_tls_file_stops_the_control_plane_with_one_line(
    tmp_path: Path, setting: str, content: bytes, message: str
) -> None:
    cert, key = self_signed(tmp_path, LOOPBACK)
    bad = tmp_path / "bad.pem"
    bad.write_bytes(content)
    env = {
        "TENANTGATE_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none",
        "TENANTGATE_ADMIN_TOKEN": "admin-token-0123456789",
        "TENANTGATE_CLUSTER_TOKEN": "cluster-token-0123456789",
        "TENANTGATE_CLUSTER_TLS_CERT": str(cert),
        "TENANTGATE_CLUSTER_TLS_KEY": str(key),
        setting: str(bad),
    }
    done = subprocess.run(
        [sys.executable, "-m", "control_plane"], env=env, capture_output=True, timeout=30, check=False
    )
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and setting in lines[0] and message in lines[0], lines


def test_key_without_certificate_stops_the_data_plane_with_one_line(tmp_path: Path) -> None:
    _, key = self_signed(tmp_path, LOOPBACK)
    env = {"TENANTGATE_CLUSTER_TOKEN": "cluster-token-0123456789", "TENANTGATE_CLUSTER_TLS_KEY": str(key)}
    done = subprocess.run([sys.executable, "-m", "data_plane"], env=env, capture_output=True, timeout=30, check=False)
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "TENANTGATE_CLUSTER_TLS_CERT" in lines[0], lines
