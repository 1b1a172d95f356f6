"""Redis killed under load and started again, against real data planes and a redis-server of
this test's own: open mode keeps serving on local limits (limit ÷ live nodes) and says so in
/status, closed mode answers 503 with Retry-After, and both go back to Redis by themselves."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import (
    DataPlane,
    Processes,
    http,
    start_control_plane,
    start_data_plane,
    start_echo,
    wait_for,
)
from tests.integration.test_rate_limits import _create_db
from tests.resilience.support import RedisServer

pytestmark = pytest.mark.integration


class Setup:
    def __init__(self, redis: RedisServer, opened: list[DataPlane], closed: DataPlane, key: str, path: str) -> None:
        self.redis, self.opened, self.closed, self.key, self.path = redis, opened, closed, key, path


@pytest.fixture(scope="module")
def setup(postgres_admin_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = Path(tmp_path_factory.mktemp("rate-limit-failover"))
    name = f"tg_test_rlf_{uuid.uuid4().hex[:10]}"
    asyncio.run(_create_db(postgres_admin_url, name))
    redis = RedisServer(tmp, append_only=False)
    procs = Processes(tmp)
    try:
        redis.start()
        cp = start_control_plane(procs, postgres_admin_url.rsplit("/", 1)[0] + f"/{name}")
        env = {"TENANTGATE_RATELIMIT_TIMEOUT_MS": "200"}
        opened = [start_data_plane(procs, cp.cluster_addr, redis.url, **env) for _ in range(2)]
        closed = start_data_plane(procs, cp.cluster_addr, redis.url, TENANTGATE_RATELIMIT_FAILURE_MODE="closed", **env)
        upstream = start_echo(procs)
        tenant = cp.api("POST", "/admin/tenants", {"name": "T", "rate_limit_per_minute": 30, "max_concurrency": 0})
        route = cp.api("POST", "/admin/routes", {"path": "/f/*", "upstream": upstream})
        assert tenant.status == 201 and route.status == 201
        version = route.json()["config_version"]
        for dp in [*opened, closed]:
            wait_for(lambda dp=dp: dp.status()["config_version"] >= version, what="config on every node")
            wait_for(lambda dp=dp: dp.status()["ratelimit_mode"] == "redis", what="decided in Redis")
        for dp in [*opened, closed]:
            wait_for(lambda dp=dp: dp.status()["ratelimit_live_nodes"] == 3, what="every node seen live")
        yield Setup(redis, opened, closed, tenant.json()["api_key"], "/f/x")
    except BaseException:
        print(procs.dump_logs())
        raise
    finally:
        procs.stop_all()
        redis.kill()
        asyncio.run(_create_db(postgres_admin_url, name, drop=True))


def _get(dp: DataPlane, setup: Setup) -> int:
    return http("GET", dp.proxy_url + setup.path, headers={"X-API-Key": setup.key}, timeout=10).status


def test_redis_killed_under_load_then_restarted(setup: Setup) -> None:
    seen: Counter[int] = Counter()
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            seen[_get(setup.opened[0], setup)] += 1

    loader = threading.Thread(target=load)
    loader.start()
    try:
        wait_for(lambda: sum(seen.values()) > 20, what="load running")
        setup.redis.kill()

        for dp in setup.opened:
            wait_for(lambda dp=dp: dp.status()["ratelimit_mode"] == "local", what="open mode falls back")
            assert dp.status()["redis_ok"] is False
        wait_for(lambda: setup.closed.status()["ratelimit_mode"] == "closed", what="closed mode says so")

        # Closed mode: 503 with Retry-After for a limited route.
        refused = http("GET", setup.closed.proxy_url + setup.path, headers={"X-API-Key": setup.key})
        assert refused.status == 503
        assert refused.json()["error"]["code"] == "ratelimit_unavailable"
        assert refused.headers["retry-after"] == "1"

        # Open mode, on a node nobody loads: its share of the limit, 30 ÷ 3 live nodes.
        statuses = Counter(_get(setup.opened[1], setup) for _ in range(20))
        assert statuses == {200: 10, 429: 10}

        setup.redis.start()
        for dp in [*setup.opened, setup.closed]:
            wait_for(lambda dp=dp: dp.status()["ratelimit_mode"] == "redis", what="back to Redis")
            assert dp.status()["redis_ok"] is True
        assert _get(setup.closed, setup) in (200, 429)
    finally:
        stop.set()
        loader.join(timeout=30)
    # The loaded node never failed a request: every answer was a decision.
    assert set(seen) <= {200, 429}, seen
    assert seen[200] > 0
