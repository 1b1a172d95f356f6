"""Faults under steady load, one at a time, against a real cluster on loopback: three data
planes behind a load balancer, a control plane, Postgres (through a forwarder the test cuts),
a redis-server of the module's own (killed and restarted), upstreams.

Steady load runs for the whole module: two tenants with high limits on a single-target and a
two-target route, and one tenant with a known limit (L per 6 s "minute") sending 3xL. Each test
is one fault, in order: it injects the fault, proves it took effect, holds it, brings the
component back and measures the time until the cluster is whole again; every response sent in
that span must be one the SPEC allows. The last test stops the load and checks what the whole
run must satisfy: the limited tenant admitted at most L (+1 %) in any window, and the usage API
counting exactly what each tenant sent.
"""

from __future__ import annotations

import contextlib
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from scripts.local_cluster import fresh_database
from tests.integration.faults import Forwarder, postgres_target, through
from tests.integration.harness import (
    ControlPlane,
    DataPlane,
    Processes,
    free_port,
    http,
    start_control_plane,
    start_data_plane,
    start_echo,
    wait_for,
)
from tests.resilience.support import (
    Client,
    Figures,
    HAProxy,
    Load,
    RedisServer,
    Sample,
    TcpBalancer,
    backend_of,
    max_in_window,
    respawn,
    start_balancer,
    time_until,
)

pytestmark = [pytest.mark.resilience, pytest.mark.integration]

MINUTE_S = 6  # TENANTGATE_RATELIMIT_MINUTE_S: a rate-limit "minute" of 6 s
LIMIT = 20  # the limited tenant's requests per minute
FLUSH_S = 0.5  # TENANTGATE_USAGE_FLUSH_INTERVAL_S
SEND_ALLOWANCE_S = 1.0  # how long one usage report may take to send on a busy machine
HOLD_SAMPLES = 150  # responses recorded while a fault holds (about 3 s of load)
RECOVER_TIMEOUT_S = 30.0
DP_ENV = {
    "TENANTGATE_RATELIMIT_MINUTE_S": str(MINUTE_S),
    "TENANTGATE_USAGE_FLUSH_INTERVAL_S": str(FLUSH_S),
    "TENANTGATE_DRAIN_TIMEOUT_S": "5",
    "TENANTGATE_ACCESS_LOG": "off",
    "TENANTGATE_TRUSTED_PROXIES": "127.0.0.1/32",
    # Closed until the rolling restart, which brings every node back in open mode.
    "TENANTGATE_RATELIMIT_FAILURE_MODE": "closed",
}


@dataclass
class Cluster:
    procs: Processes
    redis: RedisServer
    postgres: Forwarder
    cp: ControlPlane
    dps: dict[str, DataPlane]
    upstreams: dict[str, tuple[Any, str]]  # name → (Proc, listen address)
    balancer: HAProxy | TcpBalancer
    load: Load
    tenants: dict[str, str]  # name → id
    figures: Figures
    started: float = field(default_factory=time.monotonic)
    open_outage: tuple[float, float] | None = None  # when Redis was down in open mode
    killed_dp: tuple[str, float] | None = None  # which data plane was SIGKILLed, when

    def statuses(self) -> list[dict[str, Any]]:
        return [dp.status() for dp in self.dps.values()]


def _upstream_app(procs: Processes, name: str, listen: str | None = None) -> tuple[Any, str]:
    listen = listen or f"127.0.0.1:{free_port()}"
    proc = procs.spawn(f"upstream-{name}", ["-m", "tests.integration.upstream_app", "--listen", listen, "--name", name])
    wait_for(lambda: _answers(f"http://{listen}/_control/stats"), what=f"upstream {name}")
    return proc, listen


def _answers(url: str) -> bool:
    try:
        return http("GET", url, timeout=2).status == 200
    except OSError:
        return False


def _created(resp: Any) -> Any:
    assert resp.status in (200, 201), (resp.status, resp.body)
    return resp.json()


@pytest.fixture(scope="module")
def cluster(postgres_admin_url: str, tmp_path_factory: pytest.TempPathFactory, figures: Figures) -> Iterator[Cluster]:
    tmp: Path = tmp_path_factory.mktemp("faults")
    procs = Processes(tmp)
    redis = RedisServer(tmp / "redis")
    postgres: Forwarder | None = None
    balancer: HAProxy | TcpBalancer | None = None
    load: Load | None = None
    with fresh_database(postgres_admin_url) as database_url:
        try:
            redis.start()
            postgres = Forwarder(postgres_target(database_url)).start()
            cp = start_control_plane(procs, through(database_url, postgres))
            echo = start_echo(procs)
            upstreams = {name: _upstream_app(procs, name) for name in ("a", "b")}
            dps = {
                f"dp{i}": start_data_plane(procs, cp.cluster_addr, redis.url, TENANTGATE_NODE_ID=f"dp{i}", **DP_ENV)
                for i in (1, 2, 3)
            }
            balancer = start_balancer(procs, [backend_of(name, dp) for name, dp in dps.items()])
            tenants, clients = _configure(cp, echo, upstreams)
            version = cp.api("GET", "/admin/config").json()["version"]
            for dp in dps.values():
                wait_for(
                    lambda dp=dp: dp.status()["config_version"] >= version and dp.status()["redis_ok"],
                    what="every data plane synced and on Redis",
                )
            load = Load(balancer.url, clients)
            state = Cluster(procs, redis, postgres, cp, dps, upstreams, balancer, load, tenants, figures)
            load.start()
            wait_for(lambda: len(load.samples) >= HOLD_SAMPLES, what="the load to get going")
            yield state
        finally:
            if load is not None:
                load.stop()
            if balancer is not None:
                balancer.stop()
            procs.stop_all()
            if postgres is not None:
                postgres.stop()
            redis.stop()


def _configure(
    cp: ControlPlane, echo: str, upstreams: dict[str, tuple[Any, str]]
) -> tuple[dict[str, str], list[Client]]:
    high = {"rate_limit_per_minute": 1_000_000, "rate_limit_per_hour": 10_000_000, "monthly_quota": 100_000_000}
    suffix = uuid.uuid4().hex[:6]
    a = _created(cp.api("POST", "/admin/tenants", {"name": f"steady-a-{suffix}", "tier": "enterprise", **high}))
    b = _created(cp.api("POST", "/admin/tenants", {"name": f"steady-b-{suffix}", "tier": "enterprise", **high}))
    limited = _created(
        cp.api(
            "POST",
            "/admin/tenants",
            {
                "name": f"limited-{suffix}",
                "tier": "basic",
                "rate_limit_per_minute": LIMIT,
                "rate_limit_per_hour": 1_000_000,
                "monthly_quota": 100_000_000,
            },
        )
    )
    _created(cp.api("POST", "/admin/routes", {"path": "/steady/*", "upstream": echo}))
    _created(
        cp.api(
            "POST",
            "/admin/routes",
            {
                "path": "/multi/*",
                "upstreams": [{"url": f"http://{addr}", "weight": 1} for _, addr in upstreams.values()],
                "retries": 2,
            },
        )
    )
    tenants = {"steady-a": a["id"], "steady-b": b["id"], "limited": limited["id"]}
    clients = [
        Client("a1", "steady-a", a["api_key"], ["/steady/a", "/multi/a"], 15),
        Client("a2", "steady-a", a["api_key"], ["/multi/a2", "/steady/a2"], 15),
        Client("b1", "steady-b", b["api_key"], ["/steady/b", "/multi/b"], 15),
        # 3xL per minute: 3 * 20 / 6 s = 10 per second.
        Client("l1", "limited", limited["api_key"], ["/steady/limited"], 3 * LIMIT / MINUTE_S),
    ]
    return tenants, clients


# --- what a response may be ------------------------------------------------------------------


def _normal(sample: Sample) -> bool:
    """A response every moment of the run may give: 200, or 429 to the limited tenant."""
    if not sample.from_gateway:
        return False
    return sample.status == 200 or (sample.status == 429 and sample.tenant == "limited" and sample.retry_after)


@dataclass
class Phase:
    name: str
    fault_at: float
    restored_at: float
    recovered_at: float
    ended_at: float
    samples: list[Sample]

    @property
    def recover_s(self) -> float:
        return self.recovered_at - self.restored_at


def _run_phase(
    cluster: Cluster,
    name: str,
    inject: Callable[[], None],
    took_effect: Callable[[], object],
    restore: Callable[[], None],
    recovered: Callable[[], object],
) -> Phase:
    load = cluster.load
    fault_at = time.monotonic()
    inject()
    wait_for(took_effect, timeout=RECOVER_TIMEOUT_S, what=f"{name}: the fault to show")
    held_from = len(load.samples)
    wait_for(lambda: len(load.samples) - held_from >= HOLD_SAMPLES, what=f"{name}: load while the fault holds")
    restored_at = time.monotonic()
    restore()
    time_until(recovered, RECOVER_TIMEOUT_S, f"{name}: recovery")
    recovered_at = time.monotonic()
    after = len(load.samples)
    wait_for(lambda: len(load.samples) - after >= HOLD_SAMPLES, what=f"{name}: load after recovery")
    ended_at = time.monotonic()
    return Phase(name, fault_at, restored_at, recovered_at, ended_at, load.between(fault_at, ended_at))


def _record(cluster: Cluster, phase: Phase, failed: list[Sample], allowed: int, bound: str) -> None:
    cluster.figures.add(
        f"faults: {phase.name}",
        bound,
        not failed,
        requests=len(phase.samples),
        failed=len(failed),
        spec_allowed_errors=allowed,
        recover_s=phase.recover_s,
    )


def _failures(samples: list[Sample], allowed: Callable[[Sample], bool] = lambda s: False) -> list[Sample]:
    return [s for s in samples if not _normal(s) and not allowed(s)]


def _describe(failed: list[Sample]) -> str:
    return "\n".join(f"{s.client} at {s.sent:.3f}: {s.status} {s.served_by} {s.detail}" for s in failed[:10])


# --- the faults, in order ----------------------------------------------------------------------


def test_baseline_serves_every_request(cluster: Cluster) -> None:
    start = time.monotonic()
    wait_for(lambda: len(cluster.load.between(start, time.monotonic())) >= HOLD_SAMPLES, what="baseline load")
    samples = cluster.load.between(cluster.started - 3600, time.monotonic())
    failed = _failures(samples)
    served_by = {s.served_by for s in samples if s.served_by}
    cluster.figures.add("faults: baseline", "0 failed", not failed, requests=len(samples), failed=len(failed))
    assert not failed, _describe(failed)
    if isinstance(cluster.balancer, HAProxy):
        assert served_by == set(cluster.dps), served_by


def test_control_plane_killed(cluster: Cluster) -> None:
    def restore() -> None:
        cluster.cp.proc = respawn(cluster.procs, cluster.cp.proc, ["-m", "control_plane"])

    phase = _run_phase(
        cluster,
        "control plane SIGKILL",
        lambda: cluster.cp.proc.stop(signal.SIGKILL),
        lambda: not any(s["cp_connected"] for s in cluster.statuses()),
        restore,
        lambda: all(s["cp_connected"] for s in cluster.statuses()),
    )
    failed = _failures(phase.samples)
    _record(cluster, phase, failed, 0, "0 failed")
    assert not failed, _describe(failed)


def test_postgres_cut(cluster: Cluster) -> None:
    def cp_ready(expected: int) -> bool:
        return http("GET", cluster.cp.admin_url + "/readyz", timeout=2).status == expected

    phase = _run_phase(
        cluster,
        "Postgres cut",
        cluster.postgres.cut,
        lambda: cp_ready(503),
        cluster.postgres.restore,
        lambda: cp_ready(200),
    )
    failed = _failures(phase.samples)
    _record(cluster, phase, failed, 0, "0 failed")
    assert not failed, _describe(failed)
    # The control plane takes writes again once Postgres is back.
    resp = cluster.cp.api("PATCH", f"/admin/tenants/{cluster.tenants['steady-b']}", {"name": "steady-b-after-pg"})
    assert resp.status == 200, resp.body


def _redis_phase(cluster: Cluster, name: str) -> Phase:
    return _run_phase(
        cluster,
        name,
        cluster.redis.kill,
        lambda: not any(s["redis_ok"] for s in cluster.statuses()),
        cluster.redis.start,
        lambda: all(s["redis_ok"] for s in cluster.statuses()),
    )


def test_redis_killed_in_closed_mode(cluster: Cluster) -> None:
    phase = _redis_phase(cluster, "Redis SIGKILL (closed)")

    # Closed mode: 503 with Retry-After from a data plane while Redis is gone, nothing else.
    def refused_closed(s: Sample) -> bool:
        return s.from_gateway and s.status == 503 and s.retry_after and s.sent <= phase.recovered_at + 0.5

    allowed = [s for s in phase.samples if refused_closed(s)]
    failed = _failures(phase.samples, refused_closed)
    _record(cluster, phase, failed, len(allowed), "only 503 + Retry-After while Redis is down")
    assert allowed, "closed mode answered nothing with 503 while Redis was down"
    assert not failed, _describe(failed)


def test_rolling_restart_of_every_data_plane(cluster: Cluster) -> None:
    """SIGTERM, drain, start again (now in open failure mode), wait until the balancer
    sends it traffic, next: no request may fail."""
    start = time.monotonic()
    for name, dp in cluster.dps.items():
        assert dp.proc.stop(signal.SIGTERM, timeout=20) == 0, dp.proc.log()[-3000:]
        dp.proc = respawn(cluster.procs, dp.proc, ["-m", "data_plane"], TENANTGATE_RATELIMIT_FAILURE_MODE="open")
        back = time.monotonic()
        wait_for(lambda dp=dp: _answers(dp.status_url + "/readyz"), what=f"{name} ready again")
        if isinstance(cluster.balancer, HAProxy):
            wait_for(
                lambda name=name, back=back: any(
                    s.served_by == name and s.status == 200 for s in cluster.load.between(back, time.monotonic())
                ),
                what=f"the balancer to send {name} traffic again",
            )
    end = time.monotonic()
    samples = cluster.load.between(start, end)
    failed = _failures(samples)
    cluster.figures.add(
        "faults: rolling restart of 3 DPs (SIGTERM)",
        "0 failed",
        not failed,
        requests=len(samples),
        failed=len(failed),
        duration_s=end - start,
    )
    assert not failed, _describe(failed)


def test_redis_killed_in_open_mode(cluster: Cluster) -> None:
    phase = _redis_phase(cluster, "Redis SIGKILL (open)")
    cluster.open_outage = (phase.fault_at, phase.recovered_at)
    failed = _failures(phase.samples)
    _record(cluster, phase, failed, 0, "0 failed (local limits)")
    assert not failed, _describe(failed)


def test_one_data_plane_killed(cluster: Cluster) -> None:
    victim = "dp2"
    dp = cluster.dps[victim]

    def kill() -> None:
        cluster.killed_dp = (victim, time.monotonic())
        dp.proc.stop(signal.SIGKILL)

    def restore() -> None:
        dp.proc = respawn(cluster.procs, dp.proc, ["-m", "data_plane"])

    def serves_again() -> bool:
        since = cluster.load.between(cluster.killed_dp[1] + 0.5, time.monotonic()) if cluster.killed_dp else []
        if isinstance(cluster.balancer, HAProxy):
            return any(s.served_by == victim and s.status == 200 for s in since)
        return http("GET", dp.status_url + "/readyz", timeout=2).status == 200

    phase = _run_phase(
        cluster, f"data plane {victim} SIGKILL", kill, lambda: not dp.proc.alive(), restore, serves_again
    )
    kill_at = cluster.killed_dp[1] if cluster.killed_dp else phase.fault_at
    # The requests the killed node had in flight are lost with it (one per client at most);
    # everything sent after the kill must be routed around it.
    allowed = [s for s in phase.samples if s.sent <= kill_at and not _normal(s)]
    failed = _failures(phase.samples, lambda s: s.sent <= kill_at and s.status in (0, 502))
    _record(
        cluster, phase, failed, len(allowed), f"only requests in flight on {victim} (≤ {len(cluster.load.clients)})"
    )
    assert len(allowed) <= len(cluster.load.clients), _describe(allowed)
    assert not failed, _describe(failed)


def test_one_upstream_target_killed(cluster: Cluster) -> None:
    proc, listen = cluster.upstreams["b"]

    def restore() -> None:
        cluster.upstreams["b"] = _upstream_app(cluster.procs, "b", listen)

    def b_serves() -> bool:
        stats = http("GET", f"http://{listen}/_control/stats", timeout=2).json()
        return bool(stats["hits"] > 0)

    phase = _run_phase(
        cluster,
        "upstream target b SIGKILL",
        lambda: proc.stop(signal.SIGKILL),
        lambda: not proc.alive(),
        restore,
        b_serves,
    )
    failed = _failures(phase.samples)
    _record(cluster, phase, failed, 0, "0 failed (GET retried on the other target)")
    assert not failed, _describe(failed)


def test_control_plane_restart_has_no_data_plane_impact(cluster: Cluster) -> None:
    start = time.monotonic()
    # SIGTERM, as an orchestrator does, with its default 30 s grace before SIGKILL.
    code = cluster.cp.proc.stop(signal.SIGTERM, timeout=30)
    shutdown_s = time.monotonic() - start
    log = cluster.cp.proc.log()[-3000:]
    cluster.cp.proc = respawn(cluster.procs, cluster.cp.proc, ["-m", "control_plane"])
    assert code == 0, f"the control plane exited with {code} {shutdown_s:.1f}s after SIGTERM\n{log}"
    recover_s = time_until(
        lambda: _answers(cluster.cp.admin_url + "/readyz") and all(s["cp_connected"] for s in cluster.statuses()),
        RECOVER_TIMEOUT_S,
        "the control plane back and every data plane connected",
    )
    # A change made on the restarted control plane reaches every data plane.
    version = cluster.cp.api("PATCH", f"/admin/tenants/{cluster.tenants['steady-a']}", {"name": "a-after-cp"}).json()[
        "config_version"
    ]
    for dp in cluster.dps.values():
        wait_for(lambda dp=dp: dp.status()["config_version"] >= version, what="the change on every data plane")
    end = time.monotonic()
    samples = cluster.load.between(start, end)
    failed = _failures(samples)
    cluster.figures.add(
        "faults: control plane restart (SIGTERM)",
        "0 failed",
        not failed,
        requests=len(samples),
        failed=len(failed),
        shutdown_s=shutdown_s,
        recover_s=recover_s,
    )
    assert not failed, _describe(failed)


# --- what the whole run must satisfy --------------------------------------------------------


def test_limits_held_and_usage_counted_exactly(cluster: Cluster) -> None:
    samples = cluster.load.stop()
    _check_limits(cluster, samples)
    _check_usage(cluster, samples)


def _check_limits(cluster: Cluster, samples: list[Sample]) -> None:
    # A request is admitted on Redis time somewhere between when it left and came back; only
    # answers that took under 0.25 s are counted, in windows 0.3 s shorter than the limit's,
    # so a window here is always inside one of the limiter's.
    admitted = [s.sent for s in samples if s.tenant == "limited" and s.status == 200 and s.done - s.sent < 0.25]
    window = MINUTE_S - 0.3
    if cluster.open_outage is not None:
        # While Redis was down in open mode each node admitted its share (L ÷ 3 nodes) on its
        # own, on top of what Redis had counted: up to 2L in a window overlapping the outage.
        lo, hi = cluster.open_outage
        outside = max(
            max_in_window([t for t in admitted if t < lo - MINUTE_S], window),
            max_in_window([t for t in admitted if t > hi + MINUTE_S], window),
        )
        overall = max_in_window(admitted, window)
    else:
        outside = overall = max_in_window(admitted, window)
    limit_ok = outside <= LIMIT * 1.01 and overall <= 2 * LIMIT * 1.01
    cluster.figures.add(
        "faults: limited tenant (L=20 per 6 s, sent 3xL)",
        "≤ L+1% per window; ≤ 2L overlapping the open-mode Redis outage",
        limit_ok,
        max_admitted_per_window=outside,
        max_admitted_overlapping_outage=overall,
        over_limit=max(0, outside - LIMIT),
    )
    assert limit_ok, (outside, overall)


def _usage_total(cluster: Cluster, tenant_id: str) -> int:
    now = datetime.now(UTC)
    span = f"from={(now - timedelta(days=1)):%Y-%m-%dT%H:%M:%SZ}&to={(now + timedelta(days=1)):%Y-%m-%dT%H:%M:%SZ}"
    resp = cluster.cp.api("GET", f"/admin/tenants/{tenant_id}/usage?{span}&granularity=hour")
    assert resp.status == 200, resp.body
    return int(resp.json()["totals"]["requests"])


def _check_usage(cluster: Cluster, samples: list[Sample]) -> None:
    sent = {name: sum(1 for s in samples if s.tenant == name and s.from_gateway) for name in cluster.tenants}
    # What a node that was SIGKILLed may take with it: the answers it counted since its last
    # write to the spool (one report interval, plus the previous report's send, which the next
    # interval waits for), and requests it had in flight (answered by nobody, yet maybe counted).
    lost_allowed = cut_allowed = 0
    if cluster.killed_dp is not None:
        victim, at = cluster.killed_dp
        window = FLUSH_S + SEND_ALLOWANCE_S
        # Behind the TCP fallback balancer answers do not name their node: count them all.
        lost_allowed = sum(1 for s in samples if s.served_by in (victim, "") and at - window <= s.done <= at)
        cut_allowed = sum(1 for s in samples if s.status in (0, 502) and not s.from_gateway and s.sent <= at)

    def settled() -> bool:
        return all(_usage_total(cluster, tid) == sent[name] for name, tid in cluster.tenants.items())

    with contextlib.suppress(AssertionError):  # what is still off is measured and asserted below
        wait_for(settled, timeout=10 * FLUSH_S + 10, what="usage totals equal to what each tenant sent")
    counted = {name: _usage_total(cluster, tid) for name, tid in cluster.tenants.items()}
    lost = sum(max(0, sent[n] - counted[n]) for n in sent)
    doubled = sum(max(0, counted[n] - sent[n]) for n in sent)
    ok = lost <= lost_allowed and doubled <= cut_allowed
    cluster.figures.add(
        "faults: usage after all faults",
        f"lost ≤ {lost_allowed} (SIGKILLed node's unspooled answers), doubled ≤ {cut_allowed} (cut in flight)",
        ok,
        sent=sum(sent.values()),
        counted=sum(counted.values()),
        lost=lost,
        doubled=doubled,
    )
    assert ok, (sent, counted)
