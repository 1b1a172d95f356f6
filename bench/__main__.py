"""``python -m bench``: the gateway against its baselines, in one run, on one machine.

See bench/README.md for what is measured and how to read it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from bench import dataset, gateway, load, nginx, procs, profile, report
from bench.load import LoadResult, RequestShape
from bench.procs import Placement, Service, Stack

SCENARIOS: Final = ("key-auth", "full", "jwt", "body-1k", "body-64k", "large-config", "workers-2")
RESULTS_DIR: Final = Path(__file__).resolve().parent / "results"
BODY_SIZES: Final = {"body-1k": 1024, "body-64k": 64 * 1024}


@dataclass
class Options:
    scenarios: tuple[str, ...]
    duration_s: float
    latency_duration_s: float
    warmup_s: float
    connections: int
    routes: int
    tenants: int
    keys: int
    loadgen: str
    pin: bool
    profile: bool
    profile_s: float
    profile_native: bool
    soak_min: float
    postgres_url: str
    redis_url: str | None
    out_dir: Path
    smoke: bool
    gateway_ref: str | None
    repeat: int
    nginx: bool


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench", description="Benchmark tenantgate against baselines.")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, from: {', '.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument("--smoke", action="store_true", help="seconds per scenario, low concurrency: proves it works")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per throughput run (default 10)")
    parser.add_argument("--latency-duration", type=float, default=10.0, help="seconds per 1-connection run")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure each group of rows this many times in turn and report the median round (default 1)",
    )
    parser.add_argument("--connections", type=int, default=50, help="concurrency of the throughput runs (default 50)")
    parser.add_argument("--routes", type=int, default=10_000, help="large-config: routes (default 10000)")
    parser.add_argument("--tenants", type=int, default=10_000, help="large-config: tenants (default 10000)")
    parser.add_argument("--keys", type=int, default=100_000, help="large-config: API keys (default 100000)")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--no-nginx", action="store_true", help="use bench.upstream and no nginx baseline even if nginx is installed"
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile of the key-auth path")
    parser.add_argument("--profile-seconds", type=float, default=15.0)
    parser.add_argument("--profile-native", action="store_true", help="include native frames (py-spy --native)")
    parser.add_argument("--soak", type=float, default=0.0, metavar="MINUTES", help="also soak: RSS start vs end")
    parser.add_argument(
        "--postgres-url",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="a maintenance database; the run creates its own database beside it and drops it",
    )
    parser.add_argument("--redis-url", default=None, help="default: claim a free database number on 127.0.0.1:6379")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--gateway-ref",
        default=None,
        metavar="REF",
        help="run the gateway from this git commit (e.g. HEAD) instead of the working tree",
    )
    args = parser.parse_args(argv)
    scenarios = tuple(s.strip() for s in args.scenarios.split(",") if s.strip())
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    if args.keys < args.tenants:
        parser.error("--keys must be at least --tenants (every tenant gets a key)")
    loadgen = args.loadgen
    if loadgen == "auto":
        loadgen = "wrk" if load.wrk_available() else "python"
    elif loadgen == "wrk" and not load.wrk_available():
        parser.error("--loadgen wrk: wrk is not installed (apt-get install wrk)")
    smoke = args.smoke
    return Options(
        scenarios=scenarios,
        duration_s=1.0 if smoke else args.duration,
        latency_duration_s=1.0 if smoke else args.latency_duration,
        warmup_s=0.0 if smoke else min(2.0, args.duration / 5),
        connections=4 if smoke else args.connections,
        routes=300 if smoke else args.routes,
        tenants=300 if smoke else args.tenants,
        keys=1000 if smoke else args.keys,
        loadgen=loadgen,
        pin=not args.no_pin,
        profile=not args.no_profile and not smoke and profile.py_spy() is not None,
        profile_s=args.profile_seconds,
        profile_native=args.profile_native,
        soak_min=args.soak,
        postgres_url=args.postgres_url,
        redis_url=args.redis_url,
        out_dir=args.output_dir,
        smoke=smoke,
        gateway_ref=args.gateway_ref,
        repeat=1 if smoke else args.repeat,
        nginx=not args.no_nginx and nginx.available(),
    )


@dataclass
class Run:
    """One benchmark run's state: options, placement, services, and the rows measured."""

    opts: Options
    place: Placement
    stack: Stack
    stamp: str
    src: Path | None = None
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def measure(
        self,
        name: str,
        url: str,
        shape: RequestShape,
        *,
        kind: str,
        workers: int = 1,
        direct: str | None = None,
        bare: str | None = None,
        features: list[str] | None = None,
        server_pinned: bool = True,
    ) -> dict[str, Any]:
        """A throughput run at the fixed concurrency and a latency run at one connection,
        after checking one request answers 200."""
        row: dict[str, Any] = {
            "name": name,
            "kind": kind,
            "request": {"method": shape.method, "path": shape.path, "body_bytes": len(shape.body)},
            "workers": workers,
            "server_cpus": self.place.server_cpus if server_pinned else None,
            "features": features or [],
            "direct": direct,
            "bare": bare,
        }
        row = self.rows.setdefault(name, row)
        if row.get("error"):
            return row  # failed in an earlier round: one error is enough
        probe = procs.http(shape.method, url + shape.path, headers=shape.headers, body=shape.body or None, timeout=15)
        row["probe_status"] = probe.status
        if probe.status != 200:
            row["error"] = f"probe answered {probe.status}: {probe.body[:200].decode(errors='replace')}"
            self.say(f"  {name}: {row['error']}")
            return row
        if self.opts.warmup_s:
            self._load(url, shape, self.opts.connections, self.opts.warmup_s)
        tp = self._load(url, shape, self.opts.connections, self.opts.duration_s)
        lat = self._load(url, shape, 1, self.opts.latency_duration_s)
        row.setdefault("rounds", []).append({"throughput": report.result_json(tp), "latency": report.result_json(lat)})
        report.settle(row)
        if tp.errors or lat.errors:
            row["error"] = f"{tp.errors + lat.errors} failed or non-2xx responses"
        if tp.requests == 0:
            row["error"] = "no request completed"
        self.say(
            f"  {name}: {tp.rps:.0f} req/s at {self.opts.connections} connections, p50 {tp.p50_ms:.2f} ms; "
            f"1 connection p50 {lat.p50_ms:.3f} ms"
        )
        return row

    def measure_gateway(
        self, name: str, url: str, shape: RequestShape, features: list[str], bare: str = "bare-proxy"
    ) -> dict[str, Any]:
        """A single-worker gateway scenario, compared with the GET baselines."""
        return self.measure(name, url, shape, kind="gateway", direct="direct", bare=bare, features=features)

    def rounds(self) -> range:
        """Each group of rows is measured this many times in turn, so a gateway row and its
        baselines are always minutes apart at most, whatever else the machine is doing."""
        return range(self.opts.repeat)

    def _load(self, url: str, shape: RequestShape, connections: int, seconds: float) -> LoadResult:
        return load.run(
            url,
            shape,
            connections=connections,
            duration_s=seconds,
            cpus=self.place.load_cpus,
            threads=self.place.load_cpu_count,
            tool=self.opts.loadgen,
            workdir=self.stack.workdir,
        )


def start_upstream(run: Run) -> tuple[str, str]:
    port = procs.free_port()
    if run.opts.nginx:
        conf = nginx.write_config(run.stack.workdir / "nginx-upstream", "127.0.0.1", port, upstream=None)
        service = run.stack.spawn("nginx-upstream", nginx.command(conf), cpus=run.place.load_cpus)
        kind = "nginx (return 200, fixed body)"
    else:
        argv = [procs.python(), "-m", "bench.upstream", "--listen", f"127.0.0.1:{port}"]
        service = run.stack.spawn("upstream", argv, cpus=run.place.load_cpus)
        kind = "bench.upstream (asyncio protocol on uvloop, fixed body)"
    url = f"http://127.0.0.1:{port}"
    procs.wait_until(service, lambda: procs.answers(url + "/", 200), "upstream")
    return url, kind


def start_bare(run: Run, upstream: str, workers: int, cpus: str | None) -> tuple[Service, str]:
    port = procs.free_port()
    argv = [procs.python(), "-m", "bench.bare_proxy", "--listen", f"127.0.0.1:{port}", "--upstream", upstream]
    service = run.stack.spawn(f"bare-proxy-w{workers}", [*argv, "--workers", str(workers)], cpus=cpus)
    url = f"http://127.0.0.1:{port}"
    procs.wait_until(service, lambda: procs.answers(url + "/", 200), "bare proxy")
    return service, url


def start_nginx_proxy(run: Run, upstream: str) -> str:
    port = procs.free_port()
    conf = nginx.write_config(
        run.stack.workdir / "nginx-proxy", "127.0.0.1", port, upstream=upstream.removeprefix("http://")
    )
    service = run.stack.spawn("nginx-proxy", nginx.command(conf), cpus=run.place.server_cpus)
    url = f"http://127.0.0.1:{port}"
    procs.wait_until(service, lambda: procs.answers(url + "/", 200), "nginx proxy")
    return url


def memory(run: Run, dp: gateway.DataPlane) -> dict[str, Any]:
    pids = dp.worker_pids()
    run.stack.started.extend((f"{dp.service.name}-worker", pid) for pid in pids if pid != dp.service.pid)
    per_worker = [procs.rss_bytes(pid) for pid in pids]
    return {"workers": len(pids), "rss_mb_per_worker": [round(r / 2**20, 1) if r else None for r in per_worker]}


def profile_path(run: Run, dp: gateway.DataPlane, name: str, shape: RequestShape) -> dict[str, Any]:
    out = run.opts.out_dir / f"{run.stamp}-profile-{name}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    pid = dp.worker_pids()[0]
    run.say(f"  profiling the {name} path with py-spy for {run.opts.profile_s:.0f}s (pid {pid}) ...")
    sampler = profile.record(pid, run.opts.profile_s, out, native=run.opts.profile_native)
    # Load a little longer than the sampler runs, so every sample is under load.
    result = run._load(dp.proxy_url, shape, run.opts.connections, run.opts.profile_s + 2)
    _, err = sampler.communicate(timeout=run.opts.profile_s + 60)
    if sampler.returncode != 0 or not out.exists():
        return {"error": f"py-spy failed ({sampler.returncode}): {err.decode(errors='replace')[-500:]}"}
    summary = profile.summarise(out)
    summary["raw_file"] = str(out)
    summary["native"] = run.opts.profile_native
    summary["rps_while_sampled"] = result.rps
    return summary


def soak(run: Run, dp: gateway.DataPlane, shape: RequestShape) -> dict[str, Any]:
    """Load for ``--soak`` minutes in chunks, RSS read after each: the first reading (after a
    chunk of load, so pools and caches are warm) against the last says whether memory grows."""
    total_s = run.opts.soak_min * 60
    chunk_s = max(5.0, min(60.0, total_s / 10))
    run.say(f"  soak: {run.opts.soak_min:g} min of load at {run.opts.connections} connections ...")
    before = memory(run, dp)["rss_mb_per_worker"]
    samples: list[dict[str, Any]] = []
    start = time.monotonic()
    requests = errors = 0
    while time.monotonic() - start < total_s:
        result = run._load(
            dp.proxy_url, shape, run.opts.connections, min(chunk_s, total_s - (time.monotonic() - start))
        )
        requests += result.requests
        errors += result.errors
        samples.append({"at_s": round(time.monotonic() - start, 1), "rps": result.rps, **memory(run, dp)})
    first, last = samples[0]["rss_mb_per_worker"], samples[-1]["rss_mb_per_worker"]
    growth = [round(b - a, 1) if a is not None and b is not None else None for a, b in zip(first, last, strict=False)]
    run.say(f"  soak: RSS {first} MB after the first {chunk_s:.0f}s, {last} MB at the end")
    return {
        "minutes": run.opts.soak_min,
        "request": shape.path,
        "requests": requests,
        "errors": errors,
        "rss_mb_before_load": before,
        "samples": samples,
        "rss_mb_start": first,
        "rss_mb_end": last,
        "rss_mb_growth": growth,
    }


def execute(run: Run) -> dict[str, Any]:
    opts, place, stack = run.opts, run.place, run.stack
    want = set(opts.scenarios)
    result: dict[str, Any] = {}
    upstream, upstream_kind = start_upstream(run)
    result["upstream"] = upstream_kind
    run.say(f"upstream: {upstream_kind} at {upstream}")
    _, bare_url = start_bare(run, upstream, 1, place.server_cpus)
    nginx_url = start_nginx_proxy(run, upstream) if opts.nginx else None
    if nginx_url is None:
        run.notes.append(
            "no nginx reverse-proxy baseline: nginx is not installed (apt-get install nginx-light) or --no-nginx"
        )

    if opts.gateway_ref is not None:
        run.src = stack.workdir / "gateway-src"
        result["gateway_commit"] = procs.export_tree(opts.gateway_ref, run.src)
    else:
        result["gateway_commit"] = "working tree"
    run.say(f"gateway under test: {result['gateway_commit']}")
    db_name, db_url = gateway.create_database(opts.postgres_url)
    redis = gateway.claim_redis(opts.redis_url)
    try:
        result.update(_gateway_scenarios(run, upstream, bare_url, nginx_url, db_url, redis.url, want))
    finally:
        stack.stop_all()
        gateway.drop_database(opts.postgres_url, db_name)
        redis.release()
    return result


def _gateway_scenarios(
    run: Run,
    upstream: str,
    bare_url: str,
    nginx_url: str | None,
    db_url: str,
    redis_url: str,
    want: set[str],
) -> dict[str, Any]:
    opts, place, stack = run.opts, run.place, run.stack
    out: dict[str, Any] = {}
    run.say("starting the control plane and a data plane (1 worker) ...")
    cp = gateway.start_control_plane(stack, db_url, place.load_cpus, run.src)
    dp = gateway.start_data_plane(stack, cp, redis_url, 1, place.server_cpus, "bench-dp", run.src)
    fixture = gateway.configure(cp, upstream)
    dp.wait_version(fixture.version)
    features = gateway.detect(cp, dp, fixture)
    out["features"] = features
    run.say(f"features: {json.dumps(features)}")
    out["memory"] = {"small_config": memory(run, dp)}

    plain = {"X-API-Key": fixture.plain_key}
    full = {"X-API-Key": fixture.full_key}
    get = RequestShape("GET", gateway.PLAIN_PATH)
    on = ["key_auth"]
    full_on = on + [f for f in ("rate_limit_enforced", "usage_api", "dp_metrics_endpoint") if features.get(f)]

    jwt_shape: RequestShape | None = None
    if "jwt" in want:
        if fixture.jwt_token is None or not features.get("jwt_rs256"):
            run.rows["jwt"] = {"name": "jwt", "kind": "gateway", "skipped": fixture.jwt_skip_reason}
            run.say(f"  jwt: skipped: {fixture.jwt_skip_reason}")
        else:
            jwt_shape = RequestShape("GET", gateway.FULL_PATH, {"Authorization": f"Bearer {fixture.jwt_token}"})
    for i in run.rounds():
        run.say(f"measuring (GET), round {i + 1} of {opts.repeat} ...")
        run.measure("direct", upstream, get, kind="baseline")
        run.measure("bare-proxy", bare_url, get, kind="baseline", direct="direct", bare="bare-proxy")
        if nginx_url:
            run.measure("nginx-proxy", nginx_url, get, kind="baseline", direct="direct", bare="bare-proxy")
        if "key-auth" in want:
            run.measure_gateway("key-auth", dp.proxy_url, RequestShape("GET", gateway.PLAIN_PATH, plain), on)
        if "full" in want:
            run.measure_gateway("full", dp.proxy_url, RequestShape("GET", gateway.FULL_PATH, full), full_on)
        if jwt_shape is not None:
            run.measure_gateway("jwt", dp.proxy_url, jwt_shape, ["jwt_rs256", *full_on[1:]])

    for scenario, size in BODY_SIZES.items():
        if scenario not in want:
            continue
        body = b"x" * size
        ctype = {"Content-Type": "application/octet-stream"}
        shape = RequestShape("POST", gateway.PLAIN_PATH, ctype, body)
        gw_shape = RequestShape("POST", gateway.PLAIN_PATH, {**ctype, **plain}, body)
        d, b = f"direct/{scenario}", f"bare-proxy/{scenario}"
        for i in run.rounds():
            run.say(f"measuring (POST, {size} byte body), round {i + 1} of {opts.repeat} ...")
            run.measure(d, upstream, shape, kind="baseline")
            run.measure(b, bare_url, shape, kind="baseline", direct=d, bare=b)
            if nginx_url:
                run.measure(f"nginx-proxy/{scenario}", nginx_url, shape, kind="baseline", direct=d, bare=b)
            run.measure(f"key-auth/{scenario}", dp.proxy_url, gw_shape, kind="gateway", direct=d, bare=b, features=on)

    if "workers-2" in want:
        bare2, bare2_url = start_bare(run, upstream, 2, None)
        dp2 = gateway.start_data_plane(stack, cp, redis_url, 2, None, "bench-dp-w2", run.src)
        dp2.wait_version(fixture.version)
        out["memory"]["small_config_2_workers"] = memory(run, dp2)
        b2 = "bare-proxy/workers-2"
        for i in run.rounds():
            run.say(f"measuring 2 workers (unpinned: both take every CPU), round {i + 1} of {opts.repeat} ...")
            run.measure(b2, bare2_url, get, kind="baseline", workers=2, direct="direct", bare=b2, server_pinned=False)
            run.measure(
                "key-auth/workers-2",
                dp2.proxy_url,
                RequestShape("GET", gateway.PLAIN_PATH, plain),
                kind="gateway",
                workers=2,
                direct="direct",
                bare=b2,
                features=on,
                server_pinned=False,
            )
        stack.stop(dp2.service)
        stack.stop(bare2)

    if opts.profile:
        out["profile"] = {}
        if "key-auth" in want:
            shape = RequestShape("GET", gateway.PLAIN_PATH, plain)
            out["profile"]["key-auth"] = profile_path(run, dp, "key-auth", shape)
        if "full" in want:
            shape = RequestShape("GET", gateway.FULL_PATH, full)
            out["profile"]["full"] = profile_path(run, dp, "full", shape)
    elif not opts.smoke and profile.py_spy() is None:
        run.notes.append("py-spy is not installed: no profile (pip install py-spy)")

    if "large-config" in want:
        run.say(f"loading {opts.routes} routes, {opts.tenants} tenants, {opts.keys} keys (SQL COPY) ...")
        loaded = dataset.load(db_url, upstream, opts.routes, opts.tenants, opts.keys)
        propagation_s = dp.wait_version(loaded.version)
        time.sleep(0.5)  # let the worker settle after the swap before reading RSS
        out["dataset"] = {
            "routes": loaded.routes,
            "tenants": loaded.tenants,
            "keys": loaded.keys,
            "sql_load_s": loaded.load_s,
            "until_served_s": round(propagation_s, 3),
        }
        out["memory"]["large_config"] = memory(run, dp)
        run.say(f"  loaded in {loaded.load_s:.1f}s, served after {propagation_s:.1f}s more; {out['memory']}")
        large = RequestShape("GET", loaded.path, {"X-API-Key": loaded.api_key})
        b = "bare-proxy/large-config"
        for i in run.rounds():
            run.say(f"measuring the large configuration, round {i + 1} of {opts.repeat} ...")
            # Its own bare-proxy baseline, measured beside it (the upstream answers any path alike).
            run.measure(b, bare_url, large, kind="baseline", direct="direct", bare=b)
            run.measure_gateway("large-config", dp.proxy_url, large, on, bare=b)

    if opts.soak_min > 0:
        shape = RequestShape("GET", gateway.FULL_PATH, full)
        out["soak"] = soak(run, dp, shape)
    out["control_plane_rss_mb"] = round((procs.rss_bytes(cp.service.pid) or 0) / 2**20, 1)
    return out


def _placement_cpus(place: Placement) -> dict[str, Any]:
    return {"load_cpus": place.load_cpus, "server_cpus": place.server_cpus, "note": place.note}


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGTERM/SIGHUP behave like Ctrl-C, so ``finally`` blocks stop every process started."""

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    place = procs.placement(opts.pin)
    load_start = procs.load_average()
    info = procs.machine_info()
    if procs.load_is_high(load_start[0]):
        print(
            f"WARNING: 1-minute load average is {load_start[0]:.2f} on {info['cpu_count']} CPUs: "
            "other work is running and these figures are noise, not a measurement",
            file=sys.stderr,
        )
    workdir = Path(tempfile.mkdtemp(prefix="tg-bench-"))
    run = Run(opts, place, Stack(workdir), stamp)
    started = time.monotonic()
    failure: str | None = None
    result: dict[str, Any] = {}
    try:
        with _stop_on_signals():
            result = execute(run)
    except KeyboardInterrupt:
        failure = "interrupted"
    except Exception as exc:
        # Whatever failed, the report still says so and every process is stopped.
        traceback.print_exc()
        failure = f"{type(exc).__name__}: {exc}"
    finally:
        run.stack.stop_all()
    load_end = procs.load_average()
    rows = list(run.rows.values())
    for row in rows:
        report.compare(row, run.rows)
    full_report: dict[str, Any] = {
        "timestamp": stamp,
        "mode": "smoke" if opts.smoke else "full",
        "machine": {
            **info,
            "load_average_start": [round(x, 2) for x in load_start],
            "load_average_end": [round(x, 2) for x in load_end],
            "quiet": not procs.load_is_high(max(load_start[0], load_end[0])),
        },
        "placement": _placement_cpus(place),
        "settings": {
            "loadgen": opts.loadgen,
            "connections": opts.connections,
            "duration_s": opts.duration_s,
            "latency_duration_s": opts.latency_duration_s,
            "scenarios": list(opts.scenarios),
            "repeat": opts.repeat,
        },
        "results": rows,
        **result,
        "notes": run.notes,
        "processes": [{"name": name, "pid": pid} for name, pid in run.stack.started],
        "elapsed_s": round(time.monotonic() - started, 1),
        "error": failure,
    }
    path = report.write(full_report, opts.out_dir, stamp)
    print(report.table(rows))
    print(
        f"\nload average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end ({info['cpu_count']} CPUs); "
        f"{place.note}; load generator: {opts.loadgen}"
    )
    for key in ("features", "dataset", "memory", "soak"):
        if key in result:
            print(f"{key}: {json.dumps(result[key])}")
    for name, summary in result.get("profile", {}).items():
        if "own" in summary:
            print(f"profile of the {name} path:\n{profile.format_summary(summary, top=12)}")
        else:
            print(f"profile of the {name} path: {summary.get('error')}")
    for note in run.notes:
        print(f"note: {note}")
    print(f"report: {path} (and {opts.out_dir / 'latest.json'})")
    if failure:
        print(f"FAILED: {failure}", file=sys.stderr)
    if not failure:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"process logs kept in {workdir}", file=sys.stderr)
        return 1
    return 1 if any(row.get("error") for row in rows) else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
