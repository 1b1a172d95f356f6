"""The data plane keeps serving without its control plane: from memory while the control
plane is gone, and from disk when it restarts meanwhile; it follows every kind of change,
a node that missed an update asks for the whole config and gets it, and a whole config too
large for one message arrives in parts, all of them or none."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable
from types import TracebackType

import asyncpg
import grpc
import pytest
from grpc import aio

from bench import dataset
from shared._generated.tenantgate.v1 import cluster_pb2, snapshot_pb2
from tests.integration.harness import (
    CLUSTER_TOKEN,
    DataPlane,
    Processes,
    Response,
    free_port,
    http,
    start_control_plane,
    start_data_plane,
    start_echo,
    wait_for,
)

pytestmark = pytest.mark.integration


def test_data_plane_restarted_while_control_plane_is_down_serves_from_disk(
    procs: Processes, database_url: str, redis_url: str
) -> None:
    cp = start_control_plane(procs, database_url)
    data_dir = procs.tmp / "dp-state"
    dp = start_data_plane(procs, cp.cluster_addr, redis_url, TENANTGATE_DATA_DIR=str(data_dir))
    upstream = start_echo(procs)
    key = cp.api("POST", "/admin/tenants", {"name": "A"}).json()["api_key"]
    version = cp.api("POST", "/admin/routes", {"path": "/api/*", "upstream": upstream}).json()["config_version"]
    wait_for(lambda: dp.status()["config_version"] >= version, what="route on the data plane")
    snapshot = data_dir / "snapshot.pb"
    wait_for(snapshot.exists, what="snapshot saved to disk")

    cp.proc.stop(signal.SIGKILL)
    assert dp.get("/api/x", {"X-API-Key": key}).status == 200  # from memory
    wait_for(lambda: not dp.status()["cp_connected"], what="data plane to notice the control plane is gone")
    dp.proc.stop()
    restarted = start_data_plane(procs, cp.cluster_addr, redis_url, TENANTGATE_DATA_DIR=str(data_dir))

    status = restarted.status()
    assert (status["snapshot_source"], status["cp_connected"], status["config_version"]) == ("disk", False, version)
    assert restarted.get("/api/x", {"X-API-Key": key}).status == 200
    assert restarted.get("/api/x").status == 401
    assert stat.S_IMODE(os.stat(snapshot).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o700

    # The control plane returns on the same address: the node reconnects by itself.
    start_control_plane(procs, database_url, TENANTGATE_CLUSTER_LISTEN=cp.cluster_addr)
    wait_for(lambda: restarted.status()["cp_connected"], timeout=30, what="reconnection")
    assert restarted.status()["config_version"] == version


# A tenant whose limits the traffic of these tests never reaches.
UNLIMITED = {"name": "A", "tier": "enterprise", "rate_limit_per_minute": 10**6, "rate_limit_per_hour": 10**8}


def _served(dp: DataPlane, path: str, key: str | None, status: int) -> bool:
    return dp.get(path, {"X-API-Key": key} if key else None).status == status


def test_every_kind_of_admin_change_is_served_by_the_data_plane(
    procs: Processes, database_url: str, redis_url: str
) -> None:
    cp = start_control_plane(procs, database_url)
    dp = start_data_plane(procs, cp.cluster_addr, redis_url)
    upstream = start_echo(procs)
    latencies: dict[str, float] = {}

    def change(name: str, method: str, path: str, body: object, served: Callable[[], bool]) -> Response:
        resp = cp.api(method, path, body)
        assert resp.status in (200, 201, 204), (name, resp.status, resp.body)
        started = time.monotonic()
        wait_for(served, what=f"{name} served by the data plane")
        latencies[name] = time.monotonic() - started
        return resp

    route = change(
        "route create",
        "POST",
        "/admin/routes",
        {"path": "/api/*", "upstream": upstream},
        lambda: _served(dp, "/api/x", None, 401),  # the route is live and wants a key
    ).json()
    tenant = cp.api("POST", "/admin/tenants", {"name": "A", "tier": "free"})
    started = time.monotonic()
    key, tid = tenant.json()["api_key"], tenant.json()["id"]
    wait_for(lambda: _served(dp, "/api/x", key, 200), what="the new tenant's key")
    latencies["tenant create"] = time.monotonic() - started
    change(
        "route update",
        "PATCH",
        f"/admin/routes/{route['id']}",
        {"tiers": ["premium"]},
        lambda: _served(dp, "/api/x", key, 403),
    )
    change(
        "tenant update", "PATCH", f"/admin/tenants/{tid}", {"tier": "premium"}, lambda: _served(dp, "/api/x", key, 200)
    )
    second = cp.api("POST", f"/admin/tenants/{tid}/keys", {}).json()
    started = time.monotonic()
    wait_for(lambda: _served(dp, "/api/x", second["key"], 200), what="the new key")
    latencies["key create"] = time.monotonic() - started
    change(
        "key revoke",
        "DELETE",
        f"/admin/tenants/{tid}/keys/{second['id']}",
        None,
        lambda: _served(dp, "/api/x", second["key"], 401),
    )
    assert _served(dp, "/api/x", key, 200)  # the other key lives on
    change(
        "tenant deactivate",
        "PATCH",
        f"/admin/tenants/{tid}",
        {"is_active": False},
        lambda: _served(dp, "/api/x", key, 403),
    )
    change("tenant delete", "DELETE", f"/admin/tenants/{tid}", None, lambda: _served(dp, "/api/x", key, 401))
    change(
        "route methods update",
        "PATCH",
        f"/admin/routes/{route['id']}",
        {"methods": ["POST"]},
        lambda: _served(dp, "/api/x", None, 405),
    )
    change("route delete", "DELETE", f"/admin/routes/{route['id']}", None, lambda: _served(dp, "/api/x", None, 404))
    # Deltas carried every change: the stream sent one full snapshot, at connection.
    log = dp.proc.log()
    assert log.count("kind=full") == 1, log
    assert log.count("kind=delta") >= 9, log
    print("propagation seconds:", {k: round(v, 3) for k, v in latencies.items()})


def test_control_plane_killed_under_traffic_loses_no_request_and_data_planes_catch_up(
    procs: Processes, database_url: str, redis_url: str
) -> None:
    cp = start_control_plane(procs, database_url)
    dps = [start_data_plane(procs, cp.cluster_addr, redis_url) for _ in range(2)]
    upstream = start_echo(procs)
    key = cp.api("POST", "/admin/tenants", UNLIMITED).json()["api_key"]
    version = cp.api("POST", "/admin/routes", {"path": "/api/*", "upstream": upstream}).json()["config_version"]
    for dp in dps:
        wait_for(lambda dp=dp: dp.status()["config_version"] >= version, what="route on every data plane")

    stop = threading.Event()
    results: list[int] = []
    errors: list[str] = []

    def client(dp: DataPlane) -> None:
        while not stop.is_set():
            try:
                results.append(dp.get("/api/x", {"X-API-Key": key}).status)
            except OSError as exc:
                errors.append(repr(exc))

    clients = [threading.Thread(target=client, args=(dps[i % 2],)) for i in range(4)]
    for thread in clients:
        thread.start()
    try:
        wait_for(lambda: len(results) > 50, what="traffic before the kill")
        cp.proc.stop(signal.SIGKILL)
        for dp in dps:
            wait_for(lambda dp=dp: not dp.status()["cp_connected"], what="data plane to notice")
        served_before = len(results)
        wait_for(lambda: len(results) > served_before + 100, what="traffic while the control plane is down")
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=30)
    assert errors == []
    assert set(results) == {200}, {s: results.count(s) for s in set(results)}

    # A control plane returns on the same address; changes made through it reach both nodes.
    back = start_control_plane(procs, database_url, TENANTGATE_CLUSTER_LISTEN=cp.cluster_addr)
    version = back.api("POST", "/admin/routes", {"path": "/new/*", "upstream": upstream}).json()["config_version"]
    for dp in dps:
        wait_for(lambda dp=dp: dp.get("/new/x", {"X-API-Key": key}).status == 200, what="catch up after the outage")
        assert dp.status()["cp_connected"] and dp.status()["config_version"] == version


async def _restore_older_database(database_url: str) -> None:
    """What restoring an older backup does to the config: fewer objects, a lower version."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("DELETE FROM routes; DELETE FROM config_changes; UPDATE config_version SET version = 2")
    finally:
        await conn.close()


def test_data_plane_ahead_of_a_restored_database_gets_its_config_whole(
    procs: Processes, database_url: str, redis_url: str
) -> None:
    cp = start_control_plane(procs, database_url)
    dp = start_data_plane(procs, cp.cluster_addr, redis_url)
    upstream = start_echo(procs)
    key = cp.api("POST", "/admin/tenants", UNLIMITED).json()["api_key"]
    for path in ("/a/*", "/b/*", "/c/*"):
        ahead = cp.api("POST", "/admin/routes", {"path": path, "upstream": upstream}).json()["config_version"]
    wait_for(lambda: dp.status()["config_version"] == ahead, what="the routes on the data plane")
    cp.proc.stop()
    asyncio.run(_restore_older_database(database_url))

    back = start_control_plane(procs, database_url, TENANTGATE_CLUSTER_LISTEN=cp.cluster_addr)
    # The node's version (5) is one this database never reached: after a grace it is sent
    # the config as it is here, whole, and serves it.
    wait_for(lambda: dp.get("/a/x", {"X-API-Key": key}).status == 404, timeout=40, what="the restored config")
    assert dp.status()["config_version"] == 2 < ahead
    assert "holds a version this config never reached" in back.proc.log()
    version = back.api("POST", "/admin/routes", {"path": "/d/*", "upstream": upstream}).json()["config_version"]
    wait_for(lambda: dp.get("/d/x", {"X-API-Key": key}).status == 200, what="a change after the restore")
    assert dp.status()["config_version"] == version


WATCH_SERVICE = "tenantgate.v1.Cluster"
WATCH_METHOD = f"/{WATCH_SERVICE}/Watch"


class LossyLink:
    """Relays Watch streams from data planes to a control plane, as they are (bytes, the
    token, the control plane's headers), and can lose the next delta the control plane
    sends, or a part of the next snapshot sent in parts, as a link that dropped a message
    would. Its gRPC server runs on its own event loop in a thread."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.addr = f"127.0.0.1:{free_port()}"
        self.lost: list[int] = []  # versions of the deltas lost
        self.lost_parts: list[tuple[int, int]] = []  # (version, index) of the parts lost
        self._lose = threading.Event()
        self._lose_part: int | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="lossy-link", daemon=True)
        self._server: aio.Server | None = None

    def __enter__(self) -> LossyLink:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def __exit__(
        self, _type: type[BaseException] | None, _exc: BaseException | None, _tb: TracebackType | None
    ) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def lose_next_delta(self) -> None:
        self._lose.set()

    def lose_part(self, index: int) -> None:
        """Lose the next snapshot part numbered ``index``."""
        self._lose_part = index

    async def _start(self) -> None:
        server = aio.server()
        # No (de)serialisers: messages pass as the bytes they are.
        handler = grpc.stream_stream_rpc_method_handler(self._watch)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(WATCH_SERVICE, {"Watch": handler}),))
        server.add_insecure_port(self.addr)
        await server.start()
        self._server = server

    async def _stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    async def _watch(self, requests: AsyncIterator[bytes], context: aio.ServicerContext) -> None:
        token = tuple((k, v) for k, v in context.invocation_metadata() or () if k == "authorization")
        async with aio.insecure_channel(self.target) as channel:
            call = channel.stream_stream(WATCH_METHOD)(metadata=token)

            async def upstream() -> None:
                async for request in requests:
                    await call.write(request)
                await call.done_writing()

            sending = asyncio.create_task(upstream())
            try:
                await context.send_initial_metadata(tuple(await call.initial_metadata()))
                async for raw in call:
                    update = cluster_pb2.ConfigUpdate.FromString(raw)
                    if update.HasField("delta") and self._lose.is_set():
                        self._lose.clear()
                        self.lost.append(update.delta.upserts.version)
                        continue
                    if update.HasField("part") and update.part.index == self._lose_part:
                        self._lose_part = None
                        self.lost_parts.append((update.part.version, update.part.index))
                        continue
                    await context.write(raw)
            except aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")
            finally:
                sending.cancel()
                await asyncio.gather(sending, return_exceptions=True)


def test_a_data_plane_that_missed_a_delta_asks_for_the_whole_config_and_gets_it(
    procs: Processes, database_url: str, redis_url: str
) -> None:
    cp = start_control_plane(procs, database_url)
    upstream = start_echo(procs)
    with LossyLink(cp.cluster_addr) as link:
        dp = start_data_plane(procs, link.addr, redis_url, TENANTGATE_NODE_ID="dp-lossy")
        key = cp.api("POST", "/admin/tenants", UNLIMITED).json()["api_key"]
        held = cp.api("POST", "/admin/routes", {"path": "/a/*", "upstream": upstream}).json()["config_version"]
        wait_for(lambda: _served(dp, "/a/x", key, 200), what="the first route")

        link.lose_next_delta()
        lost = cp.api("POST", "/admin/routes", {"path": "/lost/*", "upstream": upstream}).json()["config_version"]
        wait_for(lambda: link.lost == [lost], what="the delta lost on the way")
        assert dp.status()["config_version"] == held
        assert _served(dp, "/lost/x", key, 404)

        # The next delta does not apply to the version the node holds: it says so (a resync,
        # not a refusal) and is sent the whole config, which carries the lost change too.
        latest = cp.api("POST", "/admin/routes", {"path": "/b/*", "upstream": upstream}).json()["config_version"]
        wait_for(lambda: dp.status()["config_version"] == latest, what="the whole config after the resync")
        assert _served(dp, "/lost/x", key, 200) and _served(dp, "/b/x", key, 200) and _served(dp, "/a/x", key, 200)

        dp_log, cp_log = dp.proc.log(), cp.proc.log()
        assert f"asking for a full snapshot reason=delta from version {lost}, but version {held} is held" in dp_log
        assert "data plane asked for a full snapshot" in cp_log
        assert [line.split("kind=")[1].split()[0] for line in dp_log.splitlines() if "snapshot applied" in line][
            -1
        ] == "full"
        # Not a rejection: nothing counts it as one, and the node shows synced without an error.
        assert "tenantgate_dp_config_nacks_total 0.0" in http("GET", dp.status_url + "/metrics").body.decode()
        assert "tenantgate_cp_config_nacks_total 0.0" in http("GET", cp.admin_url + "/metrics").body.decode()

        def node() -> dict[str, object]:
            [only] = cp.api("GET", "/admin/nodes").json()
            return dict(only)

        wait_for(lambda: node()["status"] == "synced", what="the node synced")
        assert (node()["config_version"], node()["last_error"]) == (latest, None)


# A config that takes several SnapshotParts (256 KiB each): 8,000 keys weigh about 0.9 MB.
PARTS_CONFIG = {"routes": 30, "tenants": 200, "keys": 8000}


async def _watch_whole(cluster_addr: str, parts: bool) -> list[cluster_pb2.ConfigUpdate]:
    """Open a Watch stream as a data plane would, saying whether it takes parts, and read
    what the control plane sends until a snapshot is whole."""
    async with aio.insecure_channel(cluster_addr, options=[("grpc.max_receive_message_length", 1 << 28)]) as channel:
        call = channel.stream_stream(
            WATCH_METHOD,
            request_serializer=cluster_pb2.WatchRequest.SerializeToString,
            response_deserializer=cluster_pb2.ConfigUpdate.FromString,
        )(metadata=(("authorization", f"Bearer {CLUSTER_TOKEN}"),))
        hello = cluster_pb2.Hello(node_id=f"raw-{parts}", software_version="raw", snapshot_parts=parts)
        await call.write(cluster_pb2.WatchRequest(hello=hello))
        got: list[cluster_pb2.ConfigUpdate] = []
        async with asyncio.timeout(30):
            while not got or (got[-1].HasField("part") and not got[-1].part.last):
                got.append(await call.read())
        call.cancel()
        return got


def test_a_large_config_reaches_a_data_plane_in_parts_and_an_older_node_whole(
    procs: Processes, database_url: str, redis_url: str
) -> None:
    cp = start_control_plane(procs, database_url)
    upstream = start_echo(procs)
    loaded = dataset.load(database_url, upstream, **PARTS_CONFIG)
    dp = start_data_plane(procs, cp.cluster_addr, redis_url)
    wait_for(lambda: dp.status()["config_version"] >= loaded.version, what="the large config on the data plane")
    assert dp.get(loaded.path, {"X-API-Key": loaded.api_key}).status == 200
    applied = [line for line in dp.proc.log().splitlines() if "snapshot applied" in line]
    assert len(applied) == 1 and "kind=full" in applied[0] and "receive_ms=" in applied[0]
    # One update, however many parts carried it.
    cp_metrics = http("GET", cp.admin_url + "/metrics").body.decode()
    assert 'tenantgate_cp_config_updates_sent_total{kind="full"} 1.0' in cp_metrics

    # On the wire: a node that does not say it takes parts (an older one) gets one Snapshot
    # message; one that does gets parts, numbered, the last marked, that make the same snapshot.
    [single] = asyncio.run(_watch_whole(cp.cluster_addr, parts=False))
    assert single.WhichOneof("kind") == "snapshot"
    assert (single.snapshot.version, len(single.snapshot.api_keys)) == (loaded.version, PARTS_CONFIG["keys"])
    parts = asyncio.run(_watch_whole(cp.cluster_addr, parts=True))
    assert len(parts) >= 3 and all(u.WhichOneof("kind") == "part" for u in parts)
    assert [u.part.index for u in parts] == list(range(len(parts)))
    assert [u.part.last for u in parts] == [False] * (len(parts) - 1) + [True]
    assert {u.part.version for u in parts} == {loaded.version}
    assert max(len(u.part.data) for u in parts) < 300 * 1024
    assert snapshot_pb2.Snapshot.FromString(b"".join(u.part.data for u in parts)) == single.snapshot


def test_a_snapshot_missing_a_part_is_refused_whole_and_the_next_version_heals(
    procs: Processes, database_url: str, redis_url: str
) -> None:
    cp = start_control_plane(procs, database_url)
    upstream = start_echo(procs)
    loaded = dataset.load(database_url, upstream, **PARTS_CONFIG)
    with LossyLink(cp.cluster_addr) as link:
        link.lose_part(1)
        dp = start_data_plane(procs, link.addr, redis_url, wait_ready=False, TENANTGATE_NODE_ID="dp-parts")

        def node() -> dict[str, object]:
            nodes = [n for n in cp.api("GET", "/admin/nodes").json() if n["node_id"] == "dp-parts"]
            return dict(nodes[0]) if nodes else {}

        wait_for(lambda: node().get("status") == "nacked", what="the broken snapshot refused")
        assert link.lost_parts == [(loaded.version, 1)]
        assert node()["last_error"] == f"part 2 of version {loaded.version} came where part 1 was due"
        # Nothing of the parts that did arrive is served: the node holds no config at all.
        assert http("GET", dp.status_url + "/readyz").status == 503
        assert dp.status()["config_version"] == 0
        assert "tenantgate_dp_config_nacks_total 1.0" in http("GET", dp.status_url + "/metrics").body.decode()

        # The refused version is not sent again; the next one is, whole, and heals the node.
        latest = cp.api("POST", "/admin/routes", {"path": "/after/*", "upstream": upstream}).json()["config_version"]
        wait_for(lambda: dp.status()["config_version"] == latest, what="the next version, whole")
        assert http("GET", dp.status_url + "/readyz").status == 200
        assert dp.get(loaded.path, {"X-API-Key": loaded.api_key}).status == 200
        assert dp.get("/after/x", {"X-API-Key": loaded.api_key}).status == 200
        wait_for(lambda: node().get("status") == "synced", what="the node synced")
        assert node()["last_error"] is None
