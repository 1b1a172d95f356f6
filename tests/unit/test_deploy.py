"""The compose file describes a cluster whose pieces agree with each other and with the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.cli import _ROLES

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_compose_has_postgres_redis_a_control_plane_and_two_data_planes() -> None:
    services = _compose()["services"]

    assert {"postgres", "redis", "control-plane", "dp1", "dp2"} <= set(services)
    assert services["control-plane"]["command"][0] == "control-plane"
    assert [services[dp]["command"][0] for dp in ("dp1", "dp2")] == ["data-plane", "data-plane"]


def test_compose_commands_are_real_cli_commands() -> None:
    for name, service in _compose()["services"].items():
        if "build" in service:
            assert service["command"][0] in _ROLES, name


def test_data_planes_point_at_the_control_plane_cluster_port() -> None:
    services = _compose()["services"]
    cluster_port = services["control-plane"]["environment"]["TENANTGATE_CLUSTER_LISTEN"].rsplit(":", 1)[1]

    for dp in ("dp1", "dp2"):
        env = services[dp]["environment"]
        assert env["TENANTGATE_CP_ADDR"] == f"control-plane:{cluster_port}"
        assert env["TENANTGATE_REDIS_URL"].startswith("redis://redis:")


def test_admin_port_is_published_only_on_loopback() -> None:
    ports = _compose()["services"]["control-plane"]["ports"]

    assert all(str(p).startswith("127.0.0.1:") for p in ports)


def test_dockerfile_runs_as_non_root_with_the_cli_as_entrypoint() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()

    assert "\nUSER tenantgate\n" in text
    assert 'ENTRYPOINT ["tenantgate"]' in text
