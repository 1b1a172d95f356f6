"""``tenantgate up --demo``: the newcomer's command, with embedded Postgres and Redis."""

from __future__ import annotations

import ipaddress
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from cryptography import x509

from tests.integration.certs import self_signed
from tests.integration.harness import free_port, http

pytestmark = pytest.mark.integration

UP_DEADLINE_S = 120.0


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        # As a server would: a connection in TIME_WAIT does not make the port taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _start_up(
    tmp_path: Path, ports: dict[str, int], *extra: str
) -> tuple[subprocess.Popen[str], queue.Queue[str], threading.Thread]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTGATE_")}
    args = [
        sys.executable,
        "-m",
        "shared.cli",
        "up",
        "--demo",
        "--workers",
        "2",
        "--data-dir",
        str(tmp_path / "data"),
        "--proxy-listen",
        f"127.0.0.1:{ports['proxy']}",
        "--status-listen",
        f"127.0.0.1:{ports['status']}",
        "--admin-listen",
        f"127.0.0.1:{ports['admin']}",
        "--cluster-listen",
        f"127.0.0.1:{ports['cluster']}",
        *extra,
    ]
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return proc, lines, thread


def _read_until(lines: queue.Queue[str], marker: str, seen: list[str]) -> None:
    deadline = time.monotonic() + UP_DEADLINE_S
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        seen.append(line)
        if marker in line:
            return
    raise AssertionError(f"no {marker!r} within {UP_DEADLINE_S}s:\n{''.join(seen)}")


def test_up_demo_serves_the_demo_route_and_stops_cleanly(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("proxy", "status", "admin", "cluster")}
    proc, lines, pump = _start_up(tmp_path, ports)
    seen: list[str] = []
    try:
        _read_until(lines, "Press Ctrl-C to stop.", seen)
        output = "".join(seen)
        key = re.search(r"demo API key (\S+)", output)
        assert key is not None, output
        assert re.search(r"admin token\s+\S{20,}", output), output
        children = psutil.Process(proc.pid).children(recursive=True)

        with_key = http("GET", f"http://127.0.0.1:{ports['proxy']}/demo/hello", headers={"X-API-Key": key.group(1)})
        without = http("GET", f"http://127.0.0.1:{ports['proxy']}/demo/hello")

        assert with_key.status == 200 and with_key.json()["path"] == "/demo/hello"
        assert without.status == 401
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        pump.join(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()
    assert code == 0, "".join(seen)
    assert all(_port_free(port) for port in ports.values())
    leftovers = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert leftovers == []
    data_dir = str(tmp_path / "data")
    assert not [p for p in psutil.process_iter(["cmdline"]) if data_dir in " ".join(p.info["cmdline"] or [])]


def test_up_with_tls_on_the_cluster_port_serves_its_data_plane_over_it(tmp_path: Path) -> None:
    # Only the certificate and key: the local data plane trusts that certificate itself.
    cert, key = self_signed(tmp_path, x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    ports = {name: free_port() for name in ("proxy", "status", "admin", "cluster")}
    proc, lines, pump = _start_up(tmp_path, ports, "--cluster-tls-cert", str(cert), "--cluster-tls-key", str(key))
    seen: list[str] = []
    try:
        _read_until(lines, "Press Ctrl-C to stop.", seen)
        output = "".join(seen)
        demo_key = re.search(r"demo API key (\S+)", output)
        assert demo_key is not None, output
        served = http("GET", f"http://127.0.0.1:{ports['proxy']}/demo/hello", headers={"X-API-Key": demo_key.group(1)})
        assert served.status == 200
        # A control plane with a certificate serves its cluster port over TLS only.
        assert http("GET", f"http://127.0.0.1:{ports['status']}/status").json()["cp_connected"] is True
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        pump.join(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()
    assert code == 0, "".join(seen)


def test_up_refuses_a_cluster_certificate_its_data_plane_could_not_verify(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, x509.DNSName("cp.example.com"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTGATE_")}
    args = ["up", "--data-dir", str(tmp_path / "data"), "--cluster-tls-cert", str(cert), "--cluster-tls-key", str(key)]
    done = subprocess.run(
        [sys.executable, "-m", "shared.cli", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "TENANTGATE_CLUSTER_TLS_CERT" in lines[0] and "127.0.0.1" in lines[0]
    assert not (tmp_path / "data").exists()  # refused before anything started
