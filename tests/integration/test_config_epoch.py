"""A data plane never takes deltas on top of another database's config: a version number
counts in one database's history (its config epoch), and a node holding a config of another
database is sent the whole config, whatever the version numbers say."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import pytest

from tests.conftest import fresh_database
from tests.integration.harness import (
    ControlPlane,
    DataPlane,
    Processes,
    start_control_plane,
    start_data_plane,
    start_echo,
    wait_for,
)

pytestmark = pytest.mark.integration

# A tenant whose limits the traffic of these tests never reaches.
UNLIMITED = {"tier": "enterprise", "rate_limit_per_minute": 10**6, "rate_limit_per_hour": 10**8}


async def _admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
def other_database_url(postgres_admin_url: str) -> Iterator[str]:
    """A second fresh database: "database B", with its own config history."""
    with fresh_database(postgres_admin_url) as url:
        yield url


async def _epoch(database_url: str) -> str:
    conn = await asyncpg.connect(database_url)
    try:
        epoch: str = await conn.fetchval("SELECT epoch FROM config_version WHERE id = 1")
        return epoch
    finally:
        await conn.close()


def _status(dp: DataPlane, path: str, key: str) -> int:
    return dp.get(path, {"X-API-Key": key}).status


def _route(cp: ControlPlane, path: str, upstream: str) -> int:
    version: int = cp.api("POST", "/admin/routes", {"path": path, "upstream": upstream}).json()["config_version"]
    return version


@pytest.mark.parametrize("offset", [0, -1], ids=["same-version", "behind"])
def test_a_node_synced_to_another_database_serves_this_ones_config_exactly(
    other_database_url: str, procs: Processes, database_url: str, redis_url: str, offset: int
) -> None:
    upstream = start_echo(procs)
    # Database A: the node follows it.
    cp_a = start_control_plane(procs, database_url)
    dp = start_data_plane(procs, cp_a.cluster_addr, redis_url, TENANTGATE_NODE_ID="dp-epoch")
    key_a = cp_a.api("POST", "/admin/tenants", {"name": "in A", **UNLIMITED}).json()["api_key"]
    held = _route(cp_a, "/a/*", upstream)
    held = _route(cp_a, "/shared/*", upstream)

    # Database B: other content, brought to the node's version number (or one short of it).
    cp_b = start_control_plane(procs, other_database_url)
    key_b = cp_b.api("POST", "/admin/tenants", {"name": "in B", **UNLIMITED}).json()["api_key"]
    version_b = _route(cp_b, "/shared/*", upstream)
    while version_b < held + offset:
        version_b = _route(cp_b, f"/b{version_b}/*", upstream)
    assert version_b == held + offset
    wait_for(lambda: dp.status()["config_version"] == held, what="the node synced to database A")
    assert _status(dp, "/a/x", key_a) == 200 and _status(dp, "/shared/x", key_b) == 401
    assert asyncio.run(_epoch(database_url)) != asyncio.run(_epoch(other_database_url))

    # The control plane comes back pointed at database B, on the address the node knows.
    cp_a.proc.stop()
    cp_b.proc.stop()
    back = start_control_plane(procs, other_database_url, TENANTGATE_CLUSTER_LISTEN=cp_a.cluster_addr)
    wait_for(lambda: _status(dp, "/shared/x", key_b) == 200, timeout=30, what="database B's config on the node")
    assert dp.status()["config_version"] == version_b
    assert _status(dp, "/shared/x", key_a) == 401  # a key of A only
    assert _status(dp, "/a/x", key_b) == 404  # a route of A only
    assert "data plane holds another config epoch; sending the whole config" in back.proc.log()
    assert "holds a version this config never reached" not in back.proc.log()

    def node() -> dict[str, object]:
        [only] = back.api("GET", "/admin/nodes").json()
        return dict(only)

    wait_for(lambda: node()["status"] == "synced", what="the node synced with database B")
    assert (node()["config_version"], node()["last_error"]) == (version_b, None)

    # From there on it follows B with deltas, as any node of B does.
    latest = _route(back, "/after/*", upstream)
    wait_for(lambda: _status(dp, "/after/x", key_b) == 200, what="a change of database B")
    assert dp.status()["config_version"] == latest
    applied = [line.split("kind=")[1].split()[0] for line in dp.proc.log().splitlines() if "snapshot applied" in line]
    assert applied[-2:] == ["full", "delta"]
    assert _status(dp, "/shared/x", key_a) == 401 and _status(dp, "/a/x", key_b) == 404


def test_a_restored_database_given_a_new_epoch_is_sent_whole_to_every_node(
    procs: Processes, database_url: str, redis_url: str
) -> None:
    """A backup restored into the database keeps the epoch it was taken with; giving it a new
    one (docs/operations.md) makes every node take the config whole, even at versions the
    restored history reaches again with other content."""
    upstream = start_echo(procs)
    cp = start_control_plane(procs, database_url)
    dp = start_data_plane(procs, cp.cluster_addr, redis_url)
    key = cp.api("POST", "/admin/tenants", {"name": "A", **UNLIMITED}).json()["api_key"]
    held = _route(cp, "/old/*", upstream)
    wait_for(lambda: _status(dp, "/old/x", key) == 200, what="the first route")
    before = asyncio.run(_epoch(database_url))

    # What a restore and the step after it do to the config: another history at the same
    # version number, then a new epoch. The control plane keeps running meanwhile.
    asyncio.run(
        _admin(
            database_url,
            "UPDATE routes SET path_pattern = '/restored/*'; DELETE FROM config_changes;"
            " UPDATE config_version SET epoch = gen_random_uuid()::text",
        )
    )
    assert asyncio.run(_epoch(database_url)) != before
    wait_for(lambda: _status(dp, "/restored/x", key) == 200, timeout=30, what="the restored config, whole")
    assert _status(dp, "/old/x", key) == 404
    assert dp.status()["config_version"] == held
    assert "the config epoch changed; publishing the whole config" in cp.proc.log()
