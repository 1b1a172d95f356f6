"""Run docker-compose.yml's topology as local processes, and smoke-test it through the load balancer.

No Docker needed: the machine's own Postgres (a fresh database) and Redis stand in for the
compose ones, HAProxy from the distribution (``apt-get install haproxy``) is the load balancer.
Everything else comes from the compose files themselves, so this proves what compose runs:

- every service built from the tenantgate image (``migrate``, the control planes, the data
  planes, the echo upstream) runs with its compose ``command`` and ``environment`` (secrets
  generated for the variables of ``deploy/compose.env.example``), in ``depends_on`` order,
  each waited on with the image's own health check (``deploy/healthcheck.py``);
- the load balancer runs ``deploy/haproxy/haproxy.cfg`` itself, with only the addresses changed;
- addresses are rewritten: ``service:port`` → ``127.0.0.1:<free port>`` for each service here.

Prometheus and Grafana are not started (they only observe).

    python scripts/local_cluster.py                 # start, smoke test, stop (exit 0 if it passed)
    python scripts/local_cluster.py --keep-running  # start, smoke test, serve until Ctrl-C

The smoke test: create a tenant and a route through control plane #1's admin API; request
through the load balancer with the tenant's key until every data plane served it (the
balancer's ``X-Served-By``); then add a key and revoke the first through control plane #2 and
see both changes through the balancer on every data plane.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import functools
import io
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit, urlunsplit

import yaml

from shared.embedded import die_with_parent, free_port

ROOT: Final = Path(__file__).resolve().parents[1]
COMPOSE_FILE: Final = ROOT / "docker-compose.yml"
HAPROXY_CFG: Final = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
ENV_EXAMPLE: Final = ROOT / "deploy" / "compose.env.example"
HEALTHCHECK: Final = ROOT / "deploy" / "healthcheck.py"

START_DEADLINE_S: Final = 60.0
SMOKE_DEADLINE_S: Final = 30.0
STOP_GRACE_S: Final = 20.0
IMAGE: Final = "tenantgate:latest"
SMOKE_ROUTE: Final = "/smoke/*"

# Services compose runs that only observe the cluster: not started here.
OBSERVERS: Final = frozenset({"prometheus", "grafana"})
# Backing services: the machine's own Postgres and Redis stand in for them.
BACKING: Final = frozenset({"postgres", "redis"})
# The CLI command of each role → the module it execs (shared/cli.py does the same).
ROLE_MODULES: Final = {
    "control-plane": ["-m", "control_plane", "serve"],
    "migrate": ["-m", "control_plane", "migrate"],
    "data-plane": ["-m", "data_plane"],
}
_INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(?:[:?-][^}]*)?\}")
_T = TypeVar("_T")


class ClusterError(RuntimeError):
    """The topology could not be started or failed its smoke test; the message says where."""


# --- the topology, read from the compose files ---------------------------------------------


@dataclass
class Service:
    name: str
    kind: str  # "control-plane" | "data-plane" | "migrate" | "echo" | "lb"
    command: list[str]
    environment: dict[str, str]
    depends_on: dict[str, str]
    ports: dict[int, int] = field(default_factory=dict)  # container port → local port


@dataclass
class Topology:
    services: dict[str, Service]
    secrets: dict[str, str]
    lb_address: str | None  # the balancer's fixed compose address, if it has one

    def of_kind(self, kind: str) -> list[Service]:
        return [s for s in self.services.values() if s.kind == kind]


def generated_secrets(env_example: Path = ENV_EXAMPLE) -> dict[str, str]:
    """A random value for every variable the compose env file declares."""
    names = [
        line.split("=", 1)[0].strip()
        for line in env_example.read_text().splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    ]
    return {name: secrets.token_urlsafe(24) for name in names}


def _interpolate(value: str, variables: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in variables:
            raise ClusterError(f"docker-compose.yml uses ${{{name}}}, which deploy/compose.env.example does not set")
        return variables[name]

    return _INTERPOLATION.sub(replace, value)


def _kind(name: str, spec: Mapping[str, Any]) -> str | None:
    image = str(spec.get("image", ""))
    if image.startswith("haproxy"):
        return "lb"
    if image != IMAGE:
        return None
    if "entrypoint" in spec:
        entry = list(spec["entrypoint"])
        if entry[-2:] == ["-m", "shared.echo_upstream"]:
            return "echo"
        raise ClusterError(f"service {name}: unknown entrypoint {entry}")
    role = str(spec["command"][0])
    if role not in ROLE_MODULES:
        raise ClusterError(f"service {name}: unknown command {role!r}")
    return role


def load_topology(compose_file: Path = COMPOSE_FILE, env_example: Path = ENV_EXAMPLE) -> Topology:
    compose: dict[str, Any] = yaml.safe_load(compose_file.read_text())
    variables = generated_secrets(env_example)
    services: dict[str, Service] = {}
    lb_address: str | None = None
    for name, spec in compose["services"].items():
        kind = _kind(name, spec)
        if kind is None:
            continue
        env: dict[str, str] = {}
        if "env_file" in spec:
            # The env file's variables (TENANTGATE_* only: the others configure other images).
            env.update({k: v for k, v in variables.items() if k.startswith("TENANTGATE_")})
        env.update({k: _interpolate(str(v), variables) for k, v in (spec.get("environment") or {}).items()})
        depends = spec.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {d: "service_started" for d in depends}
        deps = {d: str(c.get("condition", "service_started")) for d, c in depends.items()}
        services[name] = Service(name, kind, [str(c) for c in spec.get("command", [])], env, deps)
        if kind == "lb":
            networks = spec.get("networks") or {}
            if isinstance(networks, dict):
                for net in networks.values():
                    lb_address = (net or {}).get("ipv4_address", lb_address)
    return Topology(services, variables, lb_address)


def start_order(topology: Topology) -> list[Service]:
    """Services in ``depends_on`` order (dependencies first)."""
    order: list[Service] = []
    seen: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            raise ClusterError(f"depends_on cycle: {' → '.join((*path, name))}")
        if name in seen or name not in topology.services:
            return
        for dep in topology.services[name].depends_on:
            visit(dep, (*path, name))
        seen.add(name)
        order.append(topology.services[name])

    for name in topology.services:
        visit(name, ())
    return order


# --- addresses: compose names → loopback ports ----------------------------------------------


def _listen_port(value: str) -> int:
    return int(value.rpartition(":")[2])


def container_ports(service: Service, haproxy_cfg: str) -> set[int]:
    """The ports a service listens on inside its container."""
    env = service.environment
    if service.kind == "control-plane":
        return {_listen_port(env["TENANTGATE_ADMIN_LISTEN"]), _listen_port(env["TENANTGATE_CLUSTER_LISTEN"])}
    if service.kind == "data-plane":
        return {_listen_port(env["TENANTGATE_PROXY_LISTEN"]), _listen_port(env["TENANTGATE_STATUS_LISTEN"])}
    if service.kind == "echo":
        return {_listen_port(service.command[service.command.index("--listen") + 1])}
    if service.kind == "lb":
        return {_listen_port(m) for m in re.findall(r"^\s*bind\s+(\S+)", haproxy_cfg, re.MULTILINE)}
    return set()


def assign_ports(topology: Topology, haproxy_cfg: str) -> None:
    for service in topology.services.values():
        service.ports = {p: free_port() for p in sorted(container_ports(service, haproxy_cfg))}


def local_address(topology: Topology, host: str, port: int) -> str:
    """Where the compose address ``host:port`` is reached here."""
    service = topology.services.get(host)
    if service is None or port not in service.ports:
        raise ClusterError(f"{host}:{port} is not a port of a service started here")
    return f"127.0.0.1:{service.ports[port]}"


def local_environment(
    topology: Topology, service: Service, *, database_url: str, redis_url: str, data_dir: Path
) -> dict[str, str]:
    """The service's compose environment with every address made local."""
    env: dict[str, str] = {}
    for name, value in service.environment.items():
        if name == "TENANTGATE_DATABASE_URL":
            value = database_url
        elif name == "TENANTGATE_REDIS_URL":
            value = redis_url
        elif name.endswith("_LISTEN"):
            value = local_address(topology, service.name, _listen_port(value))
        elif name == "TENANTGATE_CP_ADDR":
            host, _, port = value.rpartition(":")
            value = local_address(topology, host, int(port))
        elif name == "TENANTGATE_TRUSTED_PROXIES" and topology.lb_address:
            # The balancer reaches the data planes from loopback here.
            value = value.replace(topology.lb_address, "127.0.0.1")
        env[name] = value
    env["TENANTGATE_DATA_DIR"] = str(data_dir)
    env.setdefault("TENANTGATE_LOG_FORMAT", "text")
    return env


def local_haproxy_config(topology: Topology, text: str) -> str:
    """``deploy/haproxy/haproxy.cfg`` with every ``bind`` and ``server`` address made local."""
    lb = topology.of_kind("lb")[0]
    out = []
    for line in text.splitlines():
        bind = re.match(r"^(\s*bind\s+)(\S+)(.*)$", line)
        server = re.match(r"^(\s*server\s+\S+\s+)([\w.-]+):(\d+)(.*)$", line)
        if bind:
            line = f"{bind.group(1)}{local_address(topology, lb.name, _listen_port(bind.group(2)))}{bind.group(3)}"
        elif server:
            host, port, rest = server.group(2), int(server.group(3)), server.group(4)
            check = re.search(r"\bport\s+(\d+)", rest)
            if check:
                rest = rest.replace(
                    check.group(0), f"port {local_address(topology, host, int(check.group(1))).split(':')[1]}"
                )
            line = f"{server.group(1)}{local_address(topology, host, port)}{rest}"
        out.append(line)
    return "\n".join(out) + "\n"


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None
    )


# --- processes ---------------------------------------------------------------------------------


@dataclass
class Running:
    service: Service
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-chars:]


def _http(
    method: str, url: str, *, headers: Mapping[str, str] | None = None, body: Any = None, timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    data = None
    all_headers = dict(headers or {})
    if body is not None:
        data = json.dumps(body).encode()
        all_headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, headers=all_headers, method=method)  # noqa: S310 - loopback
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def _wait(predicate: Callable[[], _T | None], deadline_s: float, what: str) -> _T:
    deadline = time.monotonic() + deadline_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
        except OSError as exc:
            last = exc
        else:
            if result:
                return result
            last = result
        time.sleep(0.05)
    raise ClusterError(f"timed out after {deadline_s:.0f}s waiting for {what} (last: {last!r})")


class LocalCluster:
    """The compose topology as local processes. Use as a context manager: everything started
    is stopped on exit, in reverse order."""

    def __init__(
        self,
        database_url: str,
        redis_url: str,
        workdir: Path,
        *,
        workers: int | None = None,
        compose_file: Path = COMPOSE_FILE,
        haproxy_cfg: Path = HAPROXY_CFG,
    ) -> None:
        self.database_url = database_url
        self.redis_url = redis_url
        self.workdir = workdir
        self.workers = workers
        self.haproxy_cfg = haproxy_cfg.read_text()
        self.topology = load_topology(compose_file)
        assign_ports(self.topology, self.haproxy_cfg)
        self.running: list[Running] = []

    # addresses of what runs
    def admin_url(self, service: str) -> str:
        svc = self.topology.services[service]
        return (
            f"http://{local_address(self.topology, service, _listen_port(svc.environment['TENANTGATE_ADMIN_LISTEN']))}"
        )

    def status_url(self, service: str) -> str:
        svc = self.topology.services[service]
        return (
            f"http://{local_address(self.topology, service, _listen_port(svc.environment['TENANTGATE_STATUS_LISTEN']))}"
        )

    @property
    def proxy_url(self) -> str:
        lb = self.topology.of_kind("lb")[0]
        dp = self.topology.of_kind("data-plane")[0]
        return (
            f"http://{local_address(self.topology, lb.name, _listen_port(dp.environment['TENANTGATE_PROXY_LISTEN']))}"
        )

    @property
    def echo_url(self) -> str:
        echo = self.topology.of_kind("echo")[0]
        return f"http://127.0.0.1:{next(iter(echo.ports.values()))}"

    @property
    def admin_token(self) -> str:
        return self.topology.secrets["TENANTGATE_ADMIN_TOKEN"]

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for service in start_order(self.topology):
            for dep, condition in service.depends_on.items():
                self._satisfy(service.name, dep, condition)
            self._start(service)
        # Like `docker compose up --wait`: done when every long-running service is healthy.
        for running in self.running:
            if running.service.kind != "migrate":
                _wait(functools.partial(self.healthy, running), START_DEADLINE_S, f"{running.service.name} healthy")

    def _start(self, service: Service) -> None:
        log_path = self.workdir / f"{service.name}.log"
        if service.kind == "lb":
            binary = haproxy_binary()
            if binary is None:
                raise ClusterError("haproxy is not installed (apt-get install haproxy)")
            cfg = self.workdir / "haproxy.cfg"
            cfg.write_text(local_haproxy_config(self.topology, self.haproxy_cfg))
            argv = [binary, "-db", "-f", str(cfg)]
            env = {"PATH": os.environ.get("PATH", "")}
        else:
            env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTGATE_")}
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
            env.update(
                local_environment(
                    self.topology,
                    service,
                    database_url=self.database_url,
                    redis_url=self.redis_url,
                    data_dir=self.workdir / f"{service.name}-data",
                )
            )
            argv = [sys.executable, *self._python_args(service)]
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                argv,
                env=env,
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches only this script, which stops them in order
                preexec_fn=die_with_parent,
            )
        self.running.append(Running(service, proc, log_path))

    def _python_args(self, service: Service) -> list[str]:
        if service.kind == "echo":
            return ["-m", "shared.echo_upstream", *self._local_args(service, service.command)]
        role, *args = service.command
        if service.kind == "data-plane" and self.workers is not None and "--workers" in args:
            args[args.index("--workers") + 1] = str(self.workers)
        return [*ROLE_MODULES[role], *args]

    def _local_args(self, service: Service, args: list[str]) -> list[str]:
        out = list(args)
        if "--listen" in out:
            at = out.index("--listen") + 1
            out[at] = local_address(self.topology, service.name, _listen_port(out[at]))
        return out

    def _find(self, name: str) -> Running:
        return next(r for r in self.running if r.service.name == name)

    def _satisfy(self, waiter: str, dep: str, condition: str) -> None:
        if dep in BACKING or dep in OBSERVERS:
            return
        running = self._find(dep)
        what = f"{dep} ({condition}, before {waiter})"
        if condition == "service_completed_successfully":
            try:
                code = running.proc.wait(timeout=START_DEADLINE_S)
            except subprocess.TimeoutExpired:
                raise ClusterError(f"{what}: still running after {START_DEADLINE_S:.0f}s") from None
            if code != 0:
                raise ClusterError(f"{what}: exited with {code}\n{running.log_tail()}")
        elif condition == "service_healthy":
            _wait(lambda: self.healthy(running), START_DEADLINE_S, what)
        elif running.proc.poll() is not None:
            raise ClusterError(f"{what}: exited with {running.proc.returncode}\n{running.log_tail()}")

    def healthy(self, running: Running) -> bool:
        """The compose health check of a service, run against its local process."""
        if running.proc.poll() is not None:
            raise ClusterError(f"{running.service.name} exited with {running.proc.returncode}\n{running.log_tail()}")
        service = running.service
        if service.kind == "lb":
            return self._balancer_sees_every_server_up()
        if service.kind == "echo":
            try:
                return _http("GET", self.echo_url + "/", timeout=2)[0] == 200
            except OSError:
                return False
        healthcheck = _load_healthcheck()
        cmdline = ["python", *self._python_args(service)]
        env = local_environment(
            self.topology, service, database_url=self.database_url, redis_url=self.redis_url, data_dir=self.workdir
        )
        ready, _ = healthcheck.check(cmdline, env)
        return bool(ready)

    def _balancer_sees_every_server_up(self) -> bool:
        """Every server of every backend is UP in the balancer's own statistics (CSV)."""
        match = re.search(r"^frontend stats\n\s*bind\s+(\S+)", self.haproxy_cfg, re.MULTILINE)
        if match is None:
            raise ClusterError("deploy/haproxy/haproxy.cfg has no 'frontend stats' to read server states from")
        lb = self.topology.of_kind("lb")[0]
        try:
            status, _, body = _http(
                "GET", f"http://{local_address(self.topology, lb.name, _listen_port(match.group(1)))}/stats;csv"
            )
        except OSError:
            return False
        if status != 200:
            return False
        rows = list(csv.DictReader(io.StringIO(body.decode().lstrip("# "))))
        servers = [r for r in rows if r["svname"] not in ("FRONTEND", "BACKEND")]
        return bool(servers) and all(r["status"].startswith("UP") for r in servers)

    def stop(self) -> None:
        for running in reversed(self.running):
            if running.proc.poll() is None:
                running.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for running in reversed(self.running):
            try:
                running.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                running.proc.kill()
                running.proc.wait()

    def stop_service(self, name: str) -> None:
        running = self._find(name)
        running.proc.send_signal(signal.SIGTERM)
        try:
            running.proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            running.proc.kill()
            running.proc.wait()

    def logs(self) -> str:
        return "\n".join(f"===== {r.service.name} =====\n{r.log_tail()}" for r in self.running)


@functools.cache
def _load_healthcheck() -> Any:
    """deploy/healthcheck.py, the image's HEALTHCHECK (a file, not a module of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tenantgate_healthcheck", HEALTHCHECK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the smoke test ------------------------------------------------------------------------------


@dataclass
class SmokeReport:
    data_planes: list[str]
    first_served_by_all_s: float  # route created on CP #1 → every data plane served it via the LB
    new_key_served_by_all_s: float  # key created on CP #2 → accepted by every data plane via the LB
    revoked_everywhere_s: float  # key revoked on CP #2 → refused by every data plane via the LB
    requests: int


class _Through:
    """Requests through the load balancer, counting and checking each answer."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.url = cluster.proxy_url
        self.count = 0

    def get(self, key: str) -> tuple[int, str, dict[str, Any] | None]:
        self.count += 1
        status, headers, body = _http("GET", self.url + "/smoke/hello", headers={"X-API-Key": key})
        served_by = headers.get("x-served-by", "")
        payload = json.loads(body) if status == 200 else None
        return status, served_by, payload


def _admin(cluster: LocalCluster, service: str, method: str, path: str, body: Any = None) -> Any:
    status, _, raw = _http(
        method,
        cluster.admin_url(service) + path,
        headers={"Authorization": f"Bearer {cluster.admin_token}"},
        body=body,
    )
    if status >= 300:
        raise ClusterError(f"{service} {method} {path} answered {status}: {raw.decode(errors='replace')}")
    return json.loads(raw)


def _until_every_node(
    through: _Through, key: str, nodes: set[str], expect: int, what: str, check: Callable[[Any], None] | None = None
) -> float:
    """Request until every node of ``nodes`` answered ``expect``; a node that answered ``expect``
    must not answer anything else afterwards (a change never goes backwards). Seconds taken."""
    started = time.monotonic()
    done: set[str] = set()

    def step() -> bool:
        status, served_by, payload = through.get(key)
        if served_by not in nodes:
            raise ClusterError(f"{what}: answer from unknown node {served_by!r} (status {status})")
        if status == expect:
            if check is not None:
                check(payload)
            done.add(served_by)
        elif served_by in done:
            raise ClusterError(f"{what}: {served_by} answered {expect}, then {status}")
        return done == nodes

    _wait(step, SMOKE_DEADLINE_S, f"{what} on every data plane (so far: {sorted(done)})")
    return time.monotonic() - started


def smoke(cluster: LocalCluster) -> SmokeReport:
    """Raises :class:`ClusterError` on the first thing that is not as it should be."""
    cps = [s.name for s in cluster.topology.of_kind("control-plane")]
    if len(cps) < 2:
        raise ClusterError(f"the topology has {len(cps)} control planes; the smoke test needs two")
    first, second = cps[0], cps[1]
    nodes = {s.name for s in cluster.topology.of_kind("data-plane")}
    through = _Through(cluster)

    tenant = _admin(
        cluster, first, "POST", "/admin/tenants", {"name": f"smoke-{uuid.uuid4().hex[:8]}", "tier": "enterprise"}
    )
    _admin(cluster, first, "POST", "/admin/routes", {"path": SMOKE_ROUTE, "upstream": cluster.echo_url})

    def proxied(payload: Any) -> None:
        if payload["path"] != "/smoke/hello" or payload["headers"].get("X-Tenant-ID") != tenant["id"]:
            raise ClusterError(f"the upstream saw {payload['path']!r} for tenant {payload['headers']}")

    first_s = _until_every_node(through, tenant["api_key"], nodes, 200, "the new route", proxied)

    key = _admin(cluster, second, "POST", f"/admin/tenants/{tenant['id']}/keys")
    new_key_s = _until_every_node(through, key["key"], nodes, 200, f"a key created on {second}", proxied)

    keys = _admin(cluster, second, "GET", f"/admin/tenants/{tenant['id']}/keys")["items"]
    old = next(k for k in keys if k["id"] != key["id"])
    _admin(cluster, second, "DELETE", f"/admin/tenants/{tenant['id']}/keys/{old['id']}")
    revoked_s = _until_every_node(through, tenant["api_key"], nodes, 401, f"a key revoked on {second}")
    return SmokeReport(sorted(nodes), first_s, new_key_s, revoked_s, through.count)


# --- a fresh database on the machine's Postgres --------------------------------------------------


async def _execute(url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextmanager
def fresh_database(postgres_url: str) -> Iterator[str]:
    """A new database on the server of ``postgres_url`` (a maintenance database URL); dropped after."""
    name = f"tg_cluster_{uuid.uuid4().hex[:12]}"
    asyncio.run(_execute(postgres_url, f'CREATE DATABASE "{name}"'))
    try:
        yield urlunsplit(urlsplit(postgres_url)._replace(path=f"/{name}"))
    finally:
        asyncio.run(_execute(postgres_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# --- command line --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--postgres-url",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="a Postgres server's maintenance database; a fresh database is created there and dropped after",
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--workers", type=int, help="data plane workers per node (default: as in compose)")
    parser.add_argument("--keep-running", action="store_true", help="after the smoke test, serve until Ctrl-C")
    args = parser.parse_args(argv)
    if haproxy_binary() is None:
        print("local_cluster: haproxy is not installed (apt-get install haproxy)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="tg-cluster-") as tmp, fresh_database(args.postgres_url) as db:
        cluster = LocalCluster(db, args.redis_url, Path(tmp), workers=args.workers)
        try:
            with cluster:
                report = smoke(cluster)
                print(json.dumps(report.__dict__, indent=2))
                if args.keep_running:
                    _serve(cluster)
        except ClusterError as exc:
            print(f"local_cluster: {exc}\n{cluster.logs()}", file=sys.stderr)
            return 1
    return 0


def _serve(cluster: LocalCluster) -> None:
    print(
        f"proxy {cluster.proxy_url}   admin API "
        + ", ".join(cluster.admin_url(s.name) for s in cluster.topology.of_kind("control-plane"))
        + f"\nadmin token {cluster.admin_token}\nCtrl-C stops everything.",
        flush=True,
    )
    stop = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not stop:
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
