"""Hostile clients against one data plane: slowloris, idle connections, oversized headers and
bodies, clients that never read their answer and a tenant flooding at 20x its limit, all at
once (tests/resilience/hostile.py, in a process of its own). Meanwhile the data plane must stay
within a memory bound and another tenant's p99 latency within 2x of what it is, at the same
moments, on an identical node nobody attacks (the unloaded p99, measured first in the same test,
is reported beside it)."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.client import HTTPConnection

import psutil
import pytest

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
from tests.resilience.hostile import ATTACKS
from tests.resilience.support import Figures, cpu_seconds, p99, rss_bytes, sched_stats

pytestmark = [pytest.mark.resilience, pytest.mark.integration]

MINUTE_S = 6
FLOOD_LIMIT = 30  # the flooding tenant's requests per (6 s) minute: 5 per second
FLOOD_RATE = 20 * FLOOD_LIMIT / MINUTE_S  # 20x its limit: 100 per second
SAMPLES = 4000  # victim requests per node and measurement: p99 is the 40th slowest
ROUNDS = 4  # the measurement's quarters, each compared on its own (p99: the 10th slowest of 1,000)
TARGET_RATIO = 2  # the noisy-neighbour bound: the attacked node's p99 over the unattacked one's
VICTIM_INTERVAL_S = 0.006
ATTACK_S = 70.0
SLOWLORIS, IDLE, UNREAD = 200, 300, 20
RSS_GROWTH_BOUND = 64 * 1024 * 1024
MAX_BODY = 1024 * 1024
# Which attacks run (comma-separated names from hostile.ATTACKS, "all" or "none"): all by default; one
# at a time shows what each costs the victim (see README.md).
ATTACKS_ENV = "TENANTGATE_TEST_HOSTILE_ATTACKS"


def _chosen_attacks() -> tuple[str, ...]:
    value = os.environ.get(ATTACKS_ENV, "").strip()
    if value in ("", "all"):
        return ATTACKS
    names = tuple(name.strip() for name in value.split(",") if name.strip() and name.strip() != "none")
    unknown = set(names) - set(ATTACKS)
    if unknown:
        raise pytest.UsageError(f"{ATTACKS_ENV}: unknown attacks {sorted(unknown)}; known: {', '.join(ATTACKS)}")
    return names


@dataclass
class Target:
    cp: ControlPlane
    dp: DataPlane  # the node under attack
    control: DataPlane  # an identical node nobody attacks
    victim_key: str
    hostile_key: str
    flood_key: str


def _tenant(cp: ControlPlane, name: str, per_minute: int) -> str:
    resp = cp.api(
        "POST",
        "/admin/tenants",
        {"name": name, "tier": "enterprise", "rate_limit_per_minute": per_minute, "rate_limit_per_hour": 10_000_000},
    )
    assert resp.status == 201, resp.body
    key: str = resp.json()["api_key"]
    return key


@pytest.fixture
def target(procs: Processes, database_url: str, redis_url: str) -> Iterator[Target]:
    cp = start_control_plane(procs, database_url)
    echo = start_echo(procs)
    big_addr = f"127.0.0.1:{free_port()}"
    big = procs.spawn("upstream-big", ["-m", "tests.integration.upstream_app", "--listen", big_addr, "--name", "big"])
    wait_for(lambda: http("GET", f"http://{big_addr}/_control/stats").status == 200, what=f"upstream {big.name}")
    for route in (
        {"path": "/svc/*", "upstream": echo, "methods": ["GET", "POST"], "max_body_bytes": MAX_BODY},
        {"path": "/big/*", "upstream": f"http://{big_addr}"},
    ):
        resp = cp.api("POST", "/admin/routes", route)
        assert resp.status == 201, resp.body
    keys = (_tenant(cp, "victim", 1_000_000), _tenant(cp, "hostile", 1_000_000), _tenant(cp, "flood", FLOOD_LIMIT))
    dp, control = (
        start_data_plane(
            procs,
            cp.cluster_addr,
            redis_url,
            TENANTGATE_RATELIMIT_MINUTE_S=str(MINUTE_S),
            TENANTGATE_RATELIMIT_TIMEOUT_MS="250",
            TENANTGATE_ACCESS_LOG="off",
        )
        for _ in range(2)
    )
    version = cp.api("GET", "/admin/config").json()["version"]
    for node in (dp, control):
        wait_for(lambda node=node: node.status()["config_version"] >= version, what="the data planes synced")
    yield Target(cp, dp, control, *keys)


def _victim_latencies(nodes: tuple[DataPlane, ...], key: str, count: int) -> list[list[float]]:
    """``count`` paced rounds of victim requests, one to each of ``nodes`` in turn (each on its
    own keep-alive connection): every node's latencies, measured side by side. Each must be 200."""
    conns = [HTTPConnection(*_address(node), timeout=10) for node in nodes]
    latencies: list[list[float]] = [[] for _ in nodes]
    try:
        next_at = time.monotonic()
        for i in range(count):
            for conn, measured in zip(conns, latencies, strict=True):
                start = time.perf_counter()
                conn.request("GET", f"/svc/victim/{i}", headers={"X-API-Key": key})
                resp = conn.getresponse()
                resp.read()
                measured.append(time.perf_counter() - start)
                assert resp.status == 200, (i, resp.status)
            next_at += VICTIM_INTERVAL_S
            time.sleep(max(0.0, next_at - time.monotonic()))
    finally:
        for conn in conns:
            conn.close()
    return latencies


def _address(node: DataPlane) -> tuple[str, int]:
    host, _, port = node.proxy_url.removeprefix("http://").rpartition(":")
    return host, int(port)


def _clients_connected(pid: int, port: int) -> int:
    """How many client connections to ``port`` the process ``pid`` has accepted and holds open."""
    return sum(
        1
        for conn in psutil.Process(pid).net_connections(kind="tcp")
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_ESTABLISHED
    )


class RssSampler:
    """The peak RSS of a process, sampled every 100 ms in the background."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.peak


def test_hostile_clients_leave_other_tenants_and_memory_alone(
    procs: Processes, target: Target, figures: Figures
) -> None:
    """The victim's latency is measured on the attacked node and, at the same moments, on an
    identical node nobody attacks: what the shared machine does meanwhile weighs on both alike,
    and the bound compares the two."""
    dp, pid, nodes = target.dp, target.dp.proc.popen.pid, (target.dp, target.control)
    attacks = _chosen_attacks()
    connections = {"slowloris": SLOWLORIS, "idle": IDLE, "unread": UNREAD}
    _victim_latencies(nodes, target.victim_key, 100)  # warm up: connections, caches
    unloaded, unloaded_control = _victim_latencies(nodes, target.victim_key, SAMPLES)
    rss_before = rss_bytes(pid)

    host, port = _address(dp)
    cfg = {
        "host": host,
        "port": port,
        "seconds": ATTACK_S,
        "key": target.hostile_key,
        "flood_key": target.flood_key,
        "flood_rate": FLOOD_RATE,
        "slowloris": SLOWLORIS,
        "idle": IDLE,
        "unread": UNREAD,
        "attacks": list(attacks),
    }
    attack = procs.spawn("hostile", ["-m", "tests.resilience.hostile", json.dumps(cfg)])
    attack_started = time.monotonic()
    sampler = RssSampler(pid)
    try:
        # Every attack connection is open (accepted by the data plane) before the victim measures.
        wait_for(
            lambda: _clients_connected(pid, port) >= sum(n for name, n in connections.items() if name in attacks),
            timeout=ATTACK_S / 2,
            what="the hostile connections to be open",
        )
        started, dp_cpu, attack_cpu = time.monotonic(), cpu_seconds(pid), cpu_seconds(attack.popen.pid)
        sched_before = [sched_stats(node.proc.popen.pid) for node in nodes]
        loaded, control = _victim_latencies(nodes, target.victim_key, SAMPLES)
        elapsed = time.monotonic() - started
        sched = [
            tuple(after - before for after, before in zip(sched_stats(node.proc.popen.pid), earlier, strict=True))
            for node, earlier in zip(nodes, sched_before, strict=True)
        ]
        dp_cpu, attack_cpu = cpu_seconds(pid) - dp_cpu, cpu_seconds(attack.popen.pid) - attack_cpu
        assert attack.alive(), f"the attack ended {elapsed:.1f}s in, before the measurement did"
    finally:
        peak = sampler.stop()
        attack.popen.send_signal(signal.SIGTERM)
        attack_s = time.monotonic() - attack_started
    assert attack.popen.wait(timeout=30) == 0, attack.log()
    outcome: dict[str, dict[str, int]] = json.loads(attack.log().strip().splitlines()[-1])
    print(json.dumps(outcome), file=sys.stderr)

    p99_before, p99_during, p99_control = p99(unloaded), p99(loaded), p99(control)
    # The bound holds in the typical stretch of the attack: the ratio of each quarter of the
    # measurement (the same moments on both nodes), their median. A real isolation failure
    # shows in every quarter; a scheduling hiccup of this shared machine in one does not decide.
    quarter = SAMPLES // ROUNDS
    ratios = sorted(
        p99(loaded[i : i + quarter]) / p99(control[i : i + quarter]) for i in range(0, quarter * ROUNDS, quarter)
    )
    median_ratio = statistics.median(ratios)
    latency_ok = median_ratio <= TARGET_RATIO
    growth = peak - rss_before
    memory_ok = growth <= RSS_GROWTH_BOUND
    figures.add(
        "hostile: other tenant's latency",
        f"p99 on the attacked node ≤ {TARGET_RATIO}x p99 on the unattacked node, same moments"
        f" (median of {ROUNDS} quarters)",
        latency_ok,
        attacks="all" if attacks == ATTACKS else "+".join(attacks) or "none",
        samples=SAMPLES,
        p99_unloaded_ms=p99_before * 1000,
        p99_unloaded_control_ms=p99(unloaded_control) * 1000,
        p99_attacked_ms=p99_during * 1000,
        p99_control_ms=p99_control * 1000,
        ratio=p99_during / p99_control,
        quarter_ratios="/".join(f"{r:.2f}" for r in ratios),
        median_ratio=median_ratio,
        ratio_to_unloaded=p99_during / p99_before,
        dp_cpu_pct=100 * dp_cpu / elapsed,
        control_cpu_pct=100 * sched[1][0] / elapsed,
        # How long each node's event loop, runnable, waited for a CPU (per time it was scheduled
        # in): what the machine's other work costs each node, apart from its own work.
        runq_wait_us=f"{1e6 * sched[0][1] / max(1, sched[0][2]):.0f}/{1e6 * sched[1][1] / max(1, sched[1][2]):.0f}",
        scheduled_in=f"{sched[0][2]}/{sched[1][2]}",
        attackers_cpu_pct=100 * attack_cpu / elapsed,
    )
    figures.add(
        "hostile: data plane memory",
        f"RSS growth ≤ {RSS_GROWTH_BOUND >> 20} MiB",
        memory_ok,
        rss_before_mib=rss_before / 2**20,
        rss_peak_mib=peak / 2**20,
        growth_mib=growth / 2**20,
    )
    flood = outcome.get("flood", {})
    admitted = flood.get("200", 0)
    # 20x the limit while the attack lasted: at most the limit per window it touched is admitted.
    flood_bound = FLOOD_LIMIT * (math.ceil(attack_s / MINUTE_S) + 1)
    expected = {
        "big_header": set(outcome.get("big_header", {})) == {"400"},
        "big_body": set(outcome.get("big_body", {})) == {"413"},
        "flood": bool(flood) and set(flood) <= {"200", "429"} and admitted <= flood_bound,
        "unread": outcome.get("unread") == {"held to the end": UNREAD},
    }
    answers_ok = all(ok for name, ok in expected.items() if name in attacks)
    figures.add(
        "hostile: answers to the attackers",
        f"big header 400, big body 413, flood 429 (≤ {flood_bound} admitted), unread held",
        answers_ok,
        **{k: json.dumps(v).replace(",", ";") for k, v in sorted(outcome.items())},
    )
    assert latency_ok, (p99_control, p99_during, ratios)
    assert memory_ok, growth
    assert answers_ok, outcome
    # And the node is whole afterwards.
    assert dp.get("/svc/after", headers={"X-API-Key": target.victim_key}).status == 200


STALLED = 40
# Per stalled stream. What the data plane may hold for one (data_plane/upstream/http1.py,
# data_plane/proxy.py): the upstream body's buffer (at most twice 32 KiB plus one 64 KiB read)
# and the client transport's (its 64 KiB high-water mark plus one chunk), about 256 KiB, doubled.
# Measured 130-210 KiB each; 1.4-1.9 MiB while the upstream was read on regardless.
STALLED_BOUND = 512 * 1024


def test_clients_that_never_read_hold_a_bounded_buffer_each(target: Target, figures: Figures) -> None:
    dp, pid = target.dp, target.dp.proc.popen.pid
    assert dp.get("/big/warm?chunks=64", headers={"X-API-Key": target.victim_key}).status == 200
    before = rss_bytes(pid)
    host, _, port = dp.proxy_url.removeprefix("http://").rpartition(":")
    socks = []
    try:
        for _ in range(STALLED):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((host, int(port)))
            sock.sendall(
                b"GET /big/x?chunks=5120 HTTP/1.1\r\nHost: gateway\r\nX-API-Key: %s\r\n\r\n"
                % target.victim_key.encode()
            )
            socks.append(sock)
        # The memory the stalled streams hold stops growing once every buffer is full.
        readings: list[int] = []

        def settled() -> bool:
            readings.append(rss_bytes(pid))
            return len(readings) >= 10 and max(readings[-10:]) - min(readings[-10:]) < 1024 * 1024

        wait_for(settled, timeout=30, interval=0.2, what="the data plane's memory to settle")
        per_stream = (readings[-1] - before) / STALLED
    finally:
        for sock in socks:
            sock.close()
    ok = per_stream <= STALLED_BOUND
    figures.add(
        "hostile: memory per client that never reads a 5 MiB answer",
        f"≤ {STALLED_BOUND >> 10} KiB each",
        ok,
        clients=STALLED,
        kib_each=per_stream / 1024,
    )
    assert ok, per_stream
