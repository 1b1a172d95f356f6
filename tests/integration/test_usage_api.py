"""ReportUsage and the usage API on a real control plane: batches sent over gRPC as a data
plane would, read back through ``GET /admin/tenants/{id}/usage``; and ``/metrics``."""

from __future__ import annotations

import time
import urllib.parse
import uuid
from typing import Any

import grpc
import pytest

from shared._generated.tenantgate.v1 import cluster_pb2, cluster_pb2_grpc
from shared.usage import BUCKET_COUNT
from tests.integration.harness import ADMIN_TOKEN, CLUSTER_TOKEN, ControlPlane, Processes, http, start_control_plane

pytestmark = pytest.mark.integration

MINUTE = int(time.time()) // 60 * 60 - 120  # two minutes ago, within today (UTC) unless just past midnight
ROUTE = str(uuid.uuid4())


def _report(cp: ControlPlane, *batches: cluster_pb2.UsageBatch, token: str = CLUSTER_TOKEN) -> cluster_pb2.UsageAck:
    with grpc.insecure_channel(cp.cluster_addr) as channel:
        stub = cluster_pb2_grpc.ClusterStub(channel)
        ack: cluster_pb2.UsageAck = stub.ReportUsage(
            iter(batches), metadata=(("authorization", f"Bearer {token}"),), timeout=10
        )
        return ack


def _batch(node: str, seq: int, tenant_id: str, requests: int, *, minute: int = MINUTE, **kw: int) -> Any:
    buckets = [0] * BUCKET_COUNT
    buckets[2] = requests // 2  # 2.5-5 ms
    buckets[6] = requests - requests // 2  # 50-100 ms
    record = cluster_pb2.UsageRecord(
        tenant_id=tenant_id,
        route_id=ROUTE,
        minute=minute,
        status_class=kw.pop("status_class", 2),
        requests=requests,
        bytes_in=kw.pop("bytes_in", 0),
        bytes_out=kw.pop("bytes_out", 0),
        latency_buckets=buckets,
        **kw,
    )
    return cluster_pb2.UsageBatch(node_id=node, seq=seq, records=[record])


def _usage(cp: ControlPlane, tenant_id: str, token: str = ADMIN_TOKEN, **params: str) -> Any:
    query = urllib.parse.urlencode(params)
    return cp.api("GET", f"/admin/tenants/{tenant_id}/usage?{query}", token=token)


def test_report_usage_and_read_it_back(procs: Processes, database_url: str) -> None:
    cp = start_control_plane(procs, database_url)
    acme = cp.api("POST", "/admin/tenants", {"name": "Acme", "monthly_quota": 1000}).json()
    beta = cp.api("POST", "/admin/tenants", {"name": "Beta", "monthly_quota": 0}).json()

    # A batch sent twice (in one stream, and again later) counts once.
    first = _batch("dp-1", 1, acme["id"], 10, bytes_in=100, bytes_out=1000)
    ack = _report(cp, first, first, _batch("dp-1", 2, acme["id"], 4, status_class=4, rejected=4))
    assert (ack.stored, ack.duplicates) == (2, 1)
    assert (_report(cp, first).stored, _report(cp, first).duplicates) == (0, 1)
    # Another node's seq 1 is another batch; a minute later is another period.
    _report(cp, _batch("dp-2", 1, acme["id"], 6, status_class=5, errors=6, minute=MINUTE + 60))
    _report(cp, _batch("dp-2", 2, beta["id"], 3))

    body = _usage(cp, acme["id"], granularity="minute", **{"from": _iso(MINUTE - 3600)}).json()
    assert body["tenant_id"] == acme["id"] and body["granularity"] == "minute"
    assert [(p["start"], p["requests"]) for p in body["series"]] == [(_iso(MINUTE), 14), (_iso(MINUTE + 60), 6)]
    totals = body["totals"]
    assert (totals["requests"], totals["errors"], totals["rejected"]) == (20, 6, 4)
    assert (totals["bytes_in"], totals["bytes_out"]) == (100, 1000)
    assert 2.5 <= totals["latency_ms_p50"] <= 100 and 50 <= totals["latency_ms_p99"] <= 100
    # Admitted this month: everything but the 4 refused.
    assert body["quota"] == {"monthly_quota": 1000, "used": 16, "remaining": 984}

    hourly = _usage(cp, acme["id"], granularity="hour", **{"from": _iso(MINUTE - 7200)}).json()
    assert sum(p["requests"] for p in hourly["series"]) == 20 and len(hourly["series"]) in (1, 2)
    daily = _usage(cp, acme["id"], granularity="day").json()
    assert daily["totals"]["requests"] == 20
    assert daily["series"][-1]["start"].endswith("T00:00:00Z")
    assert _usage(cp, beta["id"], granularity="day").json()["quota"] == {
        "monthly_quota": 0,
        "used": 3,
        "remaining": None,
    }
    # An empty range: no points, null latencies.
    empty = _usage(cp, acme["id"], **{"from": "2020-01-01T00:00:00Z", "to": "2020-01-02T00:00:00Z"}).json()
    assert empty["series"] == [] and empty["totals"]["requests"] == 0 and empty["totals"]["latency_ms_p50"] is None

    # Who may read it: admin, viewer, and a tenant_admin of that tenant only.
    viewer = cp.api("POST", "/admin/tokens", {"name": "v", "role": "viewer"}).json()["token"]
    mine = cp.api("POST", "/admin/tokens", {"name": "t", "role": "tenant_admin", "tenant_id": acme["id"]}).json()
    assert _usage(cp, acme["id"], token=viewer).status == 200
    assert _usage(cp, acme["id"], token=mine["token"]).json()["totals"]["requests"] == 20
    other = _usage(cp, beta["id"], token=mine["token"])
    assert other.status == 404 and other.json()["error"]["code"] == "not_found"
    assert _usage(cp, acme["id"], token="").status == 401
    assert _usage(cp, str(uuid.uuid4())).status == 404
    assert _usage(cp, "not-a-uuid").status == 404

    # Bad parameters: the SPEC error body, never a traceback.
    for params in (
        {"granularity": "week"},
        {"from": "yesterday"},
        {"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"},
        {"granularity": "minute", "from": "2020-01-01T00:00:00Z", "to": "2021-01-01T00:00:00Z"},
    ):
        resp = _usage(cp, acme["id"], **params)
        assert resp.status == 422, (params, resp.body)
        error = resp.json()["error"]
        assert error["code"] == "invalid_request" and error["request_id"] and error["message"], error

    # A wrong cluster token stores nothing.
    with pytest.raises(grpc.RpcError) as refused:
        _report(cp, _batch("dp-9", 1, acme["id"], 99), token="wrong-token-0123456789abcdef")
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _usage(cp, acme["id"], granularity="day").json()["totals"]["requests"] == 20

    # /metrics: no token needed; counts the batches; shows no secret and no tenant.
    metrics = http("GET", cp.admin_url + "/metrics")
    assert metrics.status == 200
    text = metrics.body.decode()
    assert 'tenantgate_cp_usage_batches_total{result="stored"} 4.0' in text
    assert 'tenantgate_cp_usage_batches_total{result="duplicate"} 3.0' in text
    assert 'route="/admin/tenants/{tenant_id}/usage"' in text
    for secret in (ADMIN_TOKEN, CLUSTER_TOKEN, acme["api_key"], acme["id"], beta["id"], mine["token"]):
        assert secret not in text


def _iso(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
