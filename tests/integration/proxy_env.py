"""One control plane, data plane and recording upstream shared by a whole test module (the proxy
tests send many requests through one set of processes instead of starting one per test)."""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import _admin_execute, _with_database
from tests.integration.harness import (
    ControlPlane,
    DataPlane,
    Processes,
    _answers,
    free_port,
    start_control_plane,
    start_data_plane,
    wait_for,
)


@dataclass
class ProxyEnv:
    cp: ControlPlane
    dp: DataPlane
    procs: Processes
    upstream: str  # the recorder's base URL
    redis_url: str

    @property
    def port(self) -> int:
        return int(self.dp.proxy_url.rsplit(":", 1)[1])

    def route(self, **fields: Any) -> dict[str, Any]:
        resp = self.cp.api("POST", "/admin/routes", {"upstream": self.upstream, **fields})
        assert resp.status == 201, resp.body
        body: dict[str, Any] = resp.json()
        self.sync(int(body["config_version"]))
        return body

    def tenant(self, name: str, **fields: Any) -> dict[str, Any]:
        resp = self.cp.api("POST", "/admin/tenants", {"name": name, "tier": "enterprise", **fields})
        assert resp.status == 201, resp.body
        body: dict[str, Any] = resp.json()
        self.sync(int(body["config_version"]))
        return body

    def sync(self, version: int) -> None:
        wait_for(lambda: self.dp.status()["config_version"] >= version, what=f"version {version} on the data plane")

    def recorded(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(self.upstream + "/__recorded", timeout=10) as resp:  # noqa: S310
            result: list[dict[str, Any]] = json.loads(resp.read())
            return result

    def with_data_plane(self, **dp_settings: str) -> ProxyEnv:
        """Another data plane on the same control plane and upstream, synced to its config
        (for tests that must stop one). The caller stops it; the module's teardown does too."""
        dp = start_data_plane(self.procs, self.cp.cluster_addr, self.redis_url, **dp_settings)
        other = ProxyEnv(self.cp, dp, self.procs, self.upstream, self.redis_url)
        other.sync(int(self.dp.status()["config_version"]))
        return other

    def seen(self, marker: str) -> list[dict[str, Any]]:
        """Requests the upstream received whose target contains ``marker``."""
        return [entry for entry in self.recorded() if marker in entry["target"]]


def start_recorder(procs: Processes) -> str:
    port = free_port()
    proc = procs.spawn("recorder", ["-m", "tests.integration.recorder", "--listen", f"127.0.0.1:{port}"])
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _answers(proc, url + "/__recorded"), what="recording upstream")
    return url


@contextmanager
def proxy_env(postgres_admin_url: str, redis_url: str, tmp: Path, **dp_settings: str) -> Iterator[ProxyEnv]:
    """A fresh database, a CP, a DP and a recorder for one module; everything torn down after."""
    name = f"tg_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin_execute(postgres_admin_url, f'CREATE DATABASE "{name}"'))
    procs = Processes(tmp)
    try:
        cp = start_control_plane(procs, _with_database(postgres_admin_url, name))
        dp = start_data_plane(procs, cp.cluster_addr, redis_url, **dp_settings)
        yield ProxyEnv(cp, dp, procs, start_recorder(procs), redis_url)
    except BaseException:
        print(procs.dump_logs())
        raise
    finally:
        procs.stop_all()
        asyncio.run(_admin_execute(postgres_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
