"""Real processes for integration tests: control planes, data planes and upstreams on random
loopback ports, each waited on with a deadline and always stopped."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ADMIN_TOKEN = "test-admin-token-0123456789abcdef"
CLUSTER_TOKEN = "test-cluster-token-0123456789abcdef"
READY_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    json_body: Any = None,
    timeout: float = 10.0,
) -> Response:
    all_headers = dict(headers or {})
    if json_body is not None:
        body = json.dumps(json_body).encode()
        all_headers.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=body, headers=all_headers, method=method)  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            return Response(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
    except urllib.error.HTTPError as exc:
        return Response(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())


def wait_for(predicate: Any, timeout: float = READY_TIMEOUT_S, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except OSError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


class Processes:
    """Starts processes for one test and stops them all at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[Proc] = []

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTGATE_")}
        full_env.update(env or {})
        log_path = self.tmp / f"{name}-{len(self.procs)}.log"
        log_file = log_path.open("wb")
        popen = subprocess.Popen(
            [sys.executable, *args],
            env=full_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log_file.close()
        proc = Proc(name, popen, log_path, full_env)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def dump_logs(self) -> str:
        return "\n".join(f"===== {p.name} =====\n{p.log()[-6000:]}" for p in self.procs)


@dataclass
class ControlPlane:
    proc: Proc
    admin_url: str
    cluster_addr: str

    def api(self, method: str, path: str, body: Any = None, token: str = ADMIN_TOKEN) -> Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return http(method, self.admin_url + path, headers=headers, json_body=body)


@dataclass
class DataPlane:
    proc: Proc
    proxy_url: str
    status_url: str

    def get(self, path: str, headers: dict[str, str] | None = None) -> Response:
        return http("GET", self.proxy_url + path, headers=headers)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = http("GET", self.status_url + "/status").json()
        return result


def start_control_plane(procs: Processes, database_url: str, **extra: str) -> ControlPlane:
    admin_port, cluster_port = free_port(), free_port()
    env = {
        "TENANTGATE_DATABASE_URL": database_url,
        "TENANTGATE_ADMIN_TOKEN": ADMIN_TOKEN,
        "TENANTGATE_CLUSTER_TOKEN": CLUSTER_TOKEN,
        "TENANTGATE_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
        "TENANTGATE_CLUSTER_LISTEN": f"127.0.0.1:{cluster_port}",
        "TENANTGATE_LOG_FORMAT": "text",
        **extra,
    }
    proc = procs.spawn("control-plane", ["-m", "control_plane"], env)
    cp = ControlPlane(proc, f"http://127.0.0.1:{admin_port}", f"127.0.0.1:{cluster_port}")
    wait_for(lambda: _ready(proc, cp.admin_url + "/readyz"), what=f"control plane ready\n{proc.log()}")
    return cp


def start_data_plane(
    procs: Processes, cp_addr: str, redis_url: str, *, wait_ready: bool = True, **extra: str
) -> DataPlane:
    proxy_port, status_port = free_port(), free_port()
    env = {
        "TENANTGATE_CP_ADDR": cp_addr,
        "TENANTGATE_CLUSTER_TOKEN": CLUSTER_TOKEN,
        "TENANTGATE_REDIS_URL": redis_url,
        "TENANTGATE_PROXY_LISTEN": f"127.0.0.1:{proxy_port}",
        "TENANTGATE_STATUS_LISTEN": f"127.0.0.1:{status_port}",
        "TENANTGATE_DATA_DIR": str(procs.tmp / f"dp-data-{proxy_port}"),
        "TENANTGATE_WORKERS": "1",
        "TENANTGATE_LOG_FORMAT": "text",
        **extra,
    }
    proc = procs.spawn("data-plane", ["-m", "data_plane"], env)
    dp = DataPlane(proc, f"http://127.0.0.1:{proxy_port}", f"http://127.0.0.1:{status_port}")
    if wait_ready:
        wait_for(lambda: _ready(proc, dp.status_url + "/readyz"), what=f"data plane ready\n{proc.log()}")
    else:
        wait_for(lambda: _answers(proc, dp.status_url + "/healthz"), what=f"data plane alive\n{proc.log()}")
    return dp


def start_echo(procs: Processes) -> str:
    port = free_port()
    proc = procs.spawn("echo", ["-m", "shared.echo_upstream", "--listen", f"127.0.0.1:{port}"])
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _answers(proc, url + "/"), what="echo upstream")
    return url


def _ready(proc: Proc, url: str) -> bool:
    if not proc.alive():
        raise AssertionError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log()}")
    try:
        return http("GET", url, timeout=2).status == 200
    except OSError:
        return False


def _answers(proc: Proc, url: str) -> bool:
    if not proc.alive():
        raise AssertionError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log()}")
    try:
        http("GET", url, timeout=2)
    except OSError:
        return False
    return True
