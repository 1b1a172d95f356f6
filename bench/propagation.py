"""Config propagation: from the admin API's 2xx to the change being served by every data plane.

    python -m bench.propagation [--changes 100] [--large-routes 10000] [--large-tenants 10000]
                                [--large-keys 100000] [--full-apply-runs 3] [--out FILE]

One control plane and three data-plane nodes (one worker each) on a fresh Postgres database
(dropped at the end), with a Redis database number of the run's own. Measured at two sizes,
a small config (10 routes, 10 tenants) and a large one (loaded with COPY, see bench.dataset):

- propagation: ``--changes`` admin writes, alternately a new route and a new API key; for
  each, the time from the 2xx to the moment all three nodes answer a request that needs it
  (each node polled on its own keep-alive connection). p50, p99, max.
- data-plane RSS at the large size.
- a full snapshot of the large config applied by a node that already serves (from its disk
  snapshot of the small config), ``--full-apply-runs`` times: its apply time, and the worst
  latency of a request loop on that node while it applies, against the same loop's latency
  before and the same loop's on a node with nothing to apply (medians over the runs).
- where each change's time goes (``stages``), from the processes' logs.

Prints JSON (and writes it to ``--out``). Not a test: the machine is shared, read ratios and
orders of magnitude, not the last digit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import multiprocessing.synchronize
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import client as http_client
from pathlib import Path
from typing import Any, Final

from bench import dataset
from bench.gateway import ADMIN_TOKEN, CLUSTER_TOKEN, claim_redis, create_database, drop_database
from bench.procs import Service, Stack, answers, free_port, http, python, wait_until

POSTGRES_ADMIN_URL: Final = "postgresql://postgres@127.0.0.1:5432/postgres"
NODES: Final = 3
POLL_TIMEOUT_S: Final = 60.0
KEYS_PER_TENANT: Final = 40
UNLIMITED: Final = {"tier": "enterprise", "rate_limit_per_minute": 10**9, "rate_limit_per_hour": 10**9}
_APPLIED: Final = re.compile(
    r"snapshot applied config_version=(\d+) kind=(\w+) compile_ms=([\d.]+) apply_ms=([\d.]+)"
    r"(?: routes=\d+ receive_ms=([\d.]+))?"
)
_BUILT: Final = re.compile(r"snapshot built config_version=(\d+)")


def _log_time(line: str) -> float:
    """The Unix time of a text log line (its first 23 characters, local time, milliseconds)."""
    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _log_events(service: Service, pattern: re.Pattern[str]) -> list[tuple[int, float]]:
    """(version, Unix time) of every line of ``service``'s log that ``pattern`` matches."""
    out = []
    for line in service.log_path.read_text(errors="replace").splitlines():
        m = pattern.search(line)
        if m:
            out.append((int(m[1]), _log_time(line)))
    return out


@dataclass
class Node:
    service: Service
    host: str
    proxy_port: int
    status_url: str
    data_dir: Path

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = http("GET", self.status_url + "/status", timeout=5).json()
        return result

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.service.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
        return 0.0

    def last_full_apply(self) -> tuple[float, int, float, float, float]:
        """(when it ended as a Unix time, version, compile_ms, apply_ms, receive_ms) of the last
        full snapshot; receive_ms, from its first part's arrival to its last's, is 0 for a
        snapshot received as one message."""
        text = self.service.log_path.read_text(errors="replace")
        for line in reversed(text.splitlines()):
            m = _APPLIED.search(line)
            if m and m[2] == "full":
                ended = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                return ended, int(m[1]), float(m[3]), float(m[4]), float(m[5] or 0)
        raise RuntimeError(f"{self.service.name} applied no full snapshot")

    def applied(self) -> list[tuple[int, str, float, float]]:
        """(version, kind, compile_ms, apply_ms) of every update this node logged."""
        return [
            (int(m[1]), m[2], float(m[3]), float(m[4]))
            for m in _APPLIED.finditer(self.service.log_path.read_text(errors="replace"))
        ]


class Probe:
    """A keep-alive HTTP connection to one node, asked one request at a time."""

    def __init__(self, node: Node) -> None:
        self._conn = http_client.HTTPConnection(node.host, node.proxy_port, timeout=30)

    def get(self, path: str, key: str) -> int:
        try:
            self._conn.request("GET", path, headers={"X-API-Key": key})
            resp = self._conn.getresponse()
            resp.read()
            return resp.status
        except (OSError, http_client.HTTPException):
            self._conn.close()
            return 0


def start_control_plane(stack: Stack, database_url: str, cluster_port: int | None = None) -> tuple[Service, str, str]:
    admin_port, cluster_port = free_port(), cluster_port or free_port()
    env = {
        "TENANTGATE_DATABASE_URL": database_url,
        "TENANTGATE_ADMIN_TOKEN": ADMIN_TOKEN,
        "TENANTGATE_CLUSTER_TOKEN": CLUSTER_TOKEN,
        "TENANTGATE_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
        "TENANTGATE_CLUSTER_LISTEN": f"127.0.0.1:{cluster_port}",
        "TENANTGATE_LOG_LEVEL": "info",
        "TENANTGATE_LOG_FORMAT": "text",
    }
    service = stack.spawn("control-plane", [python(), "-m", "control_plane"], env=env)
    admin_url = f"http://127.0.0.1:{admin_port}"
    wait_until(service, lambda: answers(admin_url + "/readyz", 200), "control plane /readyz", timeout=120)
    return service, admin_url, f"127.0.0.1:{cluster_port}"


def start_node(stack: Stack, cluster_addr: str, redis_url: str, name: str, data_dir: Path, ready: bool = True) -> Node:
    proxy_port, status_port = free_port(), free_port()
    env = {
        "TENANTGATE_CP_ADDR": cluster_addr,
        "TENANTGATE_CLUSTER_TOKEN": CLUSTER_TOKEN,
        "TENANTGATE_REDIS_URL": redis_url,
        "TENANTGATE_PROXY_LISTEN": f"127.0.0.1:{proxy_port}",
        "TENANTGATE_STATUS_LISTEN": f"127.0.0.1:{status_port}",
        "TENANTGATE_DATA_DIR": str(data_dir),
        "TENANTGATE_NODE_ID": name,
        "TENANTGATE_WORKERS": "1",
        "TENANTGATE_LOG_LEVEL": "info",
        "TENANTGATE_LOG_FORMAT": "text",
        "TENANTGATE_ACCESS_LOG": "off",
    }
    service = stack.spawn(name, [python(), "-m", "data_plane"], env=env)
    node = Node(service, "127.0.0.1", proxy_port, f"http://127.0.0.1:{status_port}", data_dir)
    wait_until(service, lambda: answers(node.status_url + ("/readyz" if ready else "/healthz")), f"{name} up", 120)
    return node


def api(admin_url: str, method: str, path: str, body: Any = None) -> Any:
    return api_versioned(admin_url, method, path, body)[0]


def api_versioned(admin_url: str, method: str, path: str, body: Any = None) -> tuple[Any, int]:
    """The answer's body and the config version it committed (``X-Config-Version``, else 0)."""
    answer = http(method, admin_url + path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, json_body=body)
    if answer.status >= 300:
        raise RuntimeError(f"{method} {path} -> {answer.status}: {answer.body[:300]!r}")
    return (answer.json() if answer.body else None), int(answer.headers.get("x-config-version", 0))


def _served_everywhere(probes: list[Probe], path: str, key: str) -> float:
    """Seconds until every probe's node answers 200 (each polled in its own thread)."""
    started = time.perf_counter()
    done = [0.0] * len(probes)

    def poll(i: int) -> None:
        deadline = time.monotonic() + POLL_TIMEOUT_S
        while time.monotonic() < deadline:
            if probes[i].get(path, key) == 200:
                done[i] = time.perf_counter() - started
                return
            time.sleep(0.001)
        raise RuntimeError(f"{path} not served within {POLL_TIMEOUT_S}s")

    threads = [threading.Thread(target=poll, args=(i,)) for i in range(len(probes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return max(done)


@dataclass(frozen=True)
class Change:
    kind: str
    version: int
    committed: float  # Unix time of the 2xx
    served_s: float  # from the 2xx to every node serving it


def measure_propagation(
    admin_url: str, cp: Service, nodes: list[Node], upstream: str, changes: int, tag: str
) -> dict[str, Any]:
    tenant = api(admin_url, "POST", "/admin/tenants", {"name": f"prop-{tag}", **UNLIMITED})
    probes = [Probe(n) for n in nodes]
    api(admin_url, "POST", "/admin/routes", {"path": f"/prop-{tag}/*", "upstream": upstream})
    _served_everywhere(probes, f"/prop-{tag}/x", tenant["api_key"])
    done: list[Change] = []
    for i in range(changes):
        if i % 2 == 0:
            _, version = api_versioned(
                admin_url, "POST", "/admin/routes", {"path": f"/prop-{tag}-{i}/*", "upstream": upstream}
            )
            committed = time.time()
            seconds = _served_everywhere(probes, f"/prop-{tag}-{i}/x", tenant["api_key"])
            done.append(Change("route", version, committed, seconds))
        else:
            if i % KEYS_PER_TENANT == KEYS_PER_TENANT - 1:  # a tenant holds at most 50 live keys
                tenant = api(admin_url, "POST", "/admin/tenants", {"name": f"prop-{tag}-{i}", **UNLIMITED})
            body, version = api_versioned(admin_url, "POST", f"/admin/tenants/{tenant['id']}/keys", {})
            committed = time.time()
            seconds = _served_everywhere(probes, f"/prop-{tag}/x", body["key"])
            done.append(Change("key", version, committed, seconds))
    by_kind = {kind: [c.served_s for c in done if c.kind == kind] for kind in ("route", "key")}
    return {
        "all": _summary([c.served_s for c in done]),
        **{kind: _summary(v) for kind, v in by_kind.items()},
        "stages": _stages(done, cp, nodes),
    }


def _stages(done: list[Change], cp: Service, nodes: list[Node]) -> dict[str, Any]:
    """Where the time of each change went, from the processes' logs (millisecond clocks, one
    machine): the 2xx → the control plane has built the version → the slowest node has
    applied it → every node serves it. The build may end before the 2xx reaches the client."""
    built = _log_events(cp, _BUILT)
    applied = [_log_events(n.service, _APPLIED) for n in nodes]

    def first(events: list[tuple[int, float]], version: int) -> float | None:
        return next((t for v, t in events if v >= version), None)

    cp_built, dp_applied = [], []
    for change in done:
        b = first(built, change.version)
        a = [first(events, change.version) for events in applied]
        if b is not None:
            cp_built.append(b - change.committed)
        if all(t is not None for t in a):
            dp_applied.append(max(t for t in a if t is not None) - change.committed)
    return {"cp_built_after_2xx": _summary(cp_built), "all_nodes_applied_after_2xx": _summary(dp_applied)}


def _summary(values: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values)
    if not ms:
        return {}
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 1),
        "p99_ms": round(ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))], 1),
        "max_ms": round(ms[-1], 1),
    }


def wait_version(nodes: list[Node], version: int, timeout: float = 600) -> None:
    for node in nodes:

        def reached(node: Node = node) -> bool:
            return int(node.status()["config_version"]) >= version

        wait_until(node.service, reached, f"{node.service.name} at version {version}", timeout)


def probe_during_full_apply(
    stack: Stack,
    database_url: str,
    cp: Service,
    cluster_addr: str,
    redis_url: str,
    seed_dir: Path,
    control: Node,
    path: str,
    key: str,
    run: int = 0,
) -> tuple[dict[str, Any], Service]:
    """Restart the control plane (so no delta reaches back to the seed's version), start a node
    from (a copy of) the small config on disk while it is down, loop requests on it, then let
    the control plane return: the node receives the large config whole while serving. The
    same loop on ``control``, a node with nothing to apply, tells what the machine's load
    alone costs. Returns the figures and the control plane now running."""
    stack.stop(cp)
    data_dir = seed_dir.with_name(f"{seed_dir.name}-run{run}")
    shutil.copytree(seed_dir, data_dir)
    node = start_node(stack, cluster_addr, redis_url, f"dp-probe-{run}", data_dir, ready=True)
    # Each loop in a process of its own: threads of this one would wait for each other's
    # turn at the interpreter, and for this process's own work, and count it as latency.
    context = multiprocessing.get_context("fork")
    stop = context.Event()
    results: multiprocessing.Queue[tuple[str, list[tuple[float, float, int]]]] = context.Queue()
    loops = [
        context.Process(target=_request_loop, args=(name, target, path, key, stop, results))
        for name, target in (("applying", node), ("control", control))
    ]
    for process in loops:
        process.start()
    samples: dict[str, list[tuple[float, float, int]]] = {}
    try:
        time.sleep(2.0)  # the baseline, while the node serves from disk
        port = int(cluster_addr.rsplit(":", 1)[1])
        cp, admin_url, _ = start_control_plane(stack, database_url, cluster_port=port)
        big = api(admin_url, "GET", "/admin/config")["version"]
        wait_until(node.service, lambda: node.status()["config_version"] >= big, "full snapshot applied", 600)
        time.sleep(1.0)
    finally:
        stop.set()
        for _ in loops:
            name, got = results.get(timeout=60)
            samples[name] = got
        for process in loops:
            process.join()
    end, _, compile_ms, apply_ms, receive_ms = node.last_full_apply()
    # From the first part's arrival: receiving is part of taking a snapshot in.
    start = end - (apply_ms + receive_ms) / 1000

    def during(out: list[tuple[float, float, int]]) -> list[float]:
        # Requests that were in flight at any moment of the apply.
        return [lat for wall, lat, _ in out if wall <= end and wall + lat / 1000 >= start]

    applying, control_lat = during(samples["applying"]), during(samples["control"])
    baseline = [lat for wall, lat, _ in samples["applying"] if wall < start - 0.5]
    figures = {
        "apply_ms": apply_ms,
        "receive_ms": receive_ms,
        "compile_ms": compile_ms,
        "requests_during_apply": len(applying),
        "non_200": sum(1 for _, _, status in samples["applying"] if status != 200),
        "baseline_p50_ms": round(statistics.median(baseline), 2) if baseline else None,
        "during_apply_p50_ms": round(statistics.median(applying), 2) if applying else None,
        "during_apply_worst_ms": round(max(applying), 2) if applying else None,
        "control_node_during_apply_worst_ms": round(max(control_lat), 2) if control_lat else None,
        "rss_after_mb": node.rss_mb(),
    }
    stack.stop(node.service)
    return figures, cp


def _request_loop(
    name: str,
    target: Node,
    path: str,
    key: str,
    stop: multiprocessing.synchronize.Event,
    results: multiprocessing.Queue[tuple[str, list[tuple[float, float, int]]]],
) -> None:
    """One request at a time on one keep-alive connection, 1 ms apart, until ``stop``: (Unix
    time sent, latency ms, status) of each, put on ``results`` under ``name``."""
    probe = Probe(target)
    out = []
    while not stop.is_set():
        wall, t0 = time.time(), time.perf_counter()
        status = probe.get(path, key)
        out.append((wall, (time.perf_counter() - t0) * 1000, status))
        time.sleep(0.001)
    results.put((name, out))


def repeated_full_apply(
    runs: int, probe: Callable[[int, Service], tuple[dict[str, Any], Service]], cp: Service
) -> dict[str, Any]:
    """``runs`` full applies: each run's figures, and the medians of the worst request on the
    applying node, on the control node, and of their difference (what the apply itself adds
    over the machine's own hiccups, which hit both)."""
    every = []
    for run in range(runs):
        figures, cp = probe(run, cp)
        every.append(figures)
    worst = [f["during_apply_worst_ms"] for f in every if f["during_apply_worst_ms"] is not None]
    control = [
        f["control_node_during_apply_worst_ms"] for f in every if f["control_node_during_apply_worst_ms"] is not None
    ]
    excess = [a - c for a, c in zip(worst, control, strict=False)]
    return {
        "runs": every,
        "median_worst_applying_ms": round(statistics.median(worst), 2) if worst else None,
        "median_worst_control_ms": round(statistics.median(control), 2) if control else None,
        "median_worst_excess_ms": round(statistics.median(excess), 2) if excess else None,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="tg-bench-prop-"))
    stack = Stack(work)
    db_name, database_url = create_database(POSTGRES_ADMIN_URL)
    redis = claim_redis(None)
    report: dict[str, Any] = {"nodes": NODES, "changes": args.changes}
    try:
        upstream_port = free_port()
        echo = stack.spawn("echo", [python(), "-m", "shared.echo_upstream", "--listen", f"127.0.0.1:{upstream_port}"])
        upstream = f"http://127.0.0.1:{upstream_port}"
        wait_until(echo, lambda: answers(upstream + "/"), "echo upstream")
        cp, admin_url, cluster_addr = start_control_plane(stack, database_url)
        nodes = [start_node(stack, cluster_addr, redis.url, f"dp-{i}", work / f"dp-{i}") for i in range(NODES)]

        small = dataset.load(database_url, upstream, routes=10, tenants=10, keys=10)
        wait_version(nodes, small.version)
        report["small"] = {"routes": 10, "tenants": 10, "keys": 10}
        report["small"]["propagation"] = measure_propagation(admin_url, cp, nodes, upstream, args.changes, "small")
        seed = work / "seed"
        shutil.copytree(nodes[0].data_dir, seed)

        large = dataset.load(
            database_url, upstream, routes=args.large_routes, tenants=args.large_tenants, keys=args.large_keys
        )
        started = time.perf_counter()
        wait_version(nodes, large.version)
        report["large"] = {
            "routes": args.large_routes,
            "tenants": args.large_tenants,
            "keys": args.large_keys,
            "copy_load_s": large.load_s,
            "first_reach_all_nodes_s": round(time.perf_counter() - started, 2),
            "first_update": [a for a in nodes[0].applied() if a[0] == large.version][-1:],
        }
        report["large"]["propagation"] = measure_propagation(admin_url, cp, nodes, upstream, args.changes, "large")
        report["large"]["dp_rss_mb"] = [n.rss_mb() for n in nodes]
        deltas = [a[3] for a in nodes[0].applied() if a[1] == "delta" and a[0] > large.version]
        report["large"]["delta_apply_ms"] = _summary([d / 1000 for d in deltas])

        def probe(run: int, cp: Service) -> tuple[dict[str, Any], Service]:
            return probe_during_full_apply(
                stack, database_url, cp, cluster_addr, redis.url, seed, nodes[1], small.path, small.api_key, run
            )

        report["large"]["full_apply"] = repeated_full_apply(args.full_apply_runs, probe, cp)
    finally:
        stack.stop_all()
        drop_database(POSTGRES_ADMIN_URL, db_name)
        redis.release()
        if args.keep_logs is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            shutil.copytree(work, args.keep_logs, ignore=shutil.ignore_patterns("*-data", "seed*", "dp-*[0-9]"))
            shutil.rmtree(work, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.propagation", description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--large-routes", type=int, default=10_000)
    parser.add_argument("--large-tenants", type=int, default=10_000)
    parser.add_argument("--large-keys", type=int, default=100_000)
    parser.add_argument("--full-apply-runs", type=int, default=3, help="full applies measured (medians reported)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep-logs", type=Path, help="copy every process's log here")
    args = parser.parse_args(argv)
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
