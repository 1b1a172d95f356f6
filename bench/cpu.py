"""CPU time per request: the figure that stays put on a busy machine.

Requests per second move with whatever else the CPUs are doing; the CPU time a server spends
per request hardly does. This runs the bare proxy and one-worker data planes (the working
tree, and with ``--gateway-ref`` a commit beside it, on the same control plane) and, in
alternating rounds, loads each for a while at a fixed concurrency while reading the server's
user + system CPU time from ``/proc/<pid>/stat`` before and after::

    python -m bench.cpu --gateway-ref HEAD~3 --rounds 3 --duration 5

It prints µs of CPU per request for each row and round, the median, and the ratio of each
gateway row to the bare proxy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench import gateway, load, procs
from bench.__main__ import Run, parse_args, start_bare, start_upstream
from bench.load import RequestShape

_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) * _TICK_S


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--gateway-ref", default=None, help="also measure the data plane of this commit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--scenarios", default="key-auth,full")
    args = parser.parse_args(argv)
    opts = parse_args(["--no-profile"])
    workdir = Path(tempfile.mkdtemp(prefix="tg-bench-cpu-"))
    run = Run(opts, procs.placement(True), procs.Stack(workdir), "cpu")
    rows: dict[str, list[float]] = {}
    load_start = procs.load_average()
    db_name, db_url = gateway.create_database(opts.postgres_url)
    redis = gateway.claim_redis(opts.redis_url)
    try:
        upstream, _ = start_upstream(run)
        bare, bare_url = start_bare(run, upstream, 1, run.place.server_cpus)
        cp = gateway.start_control_plane(run.stack, db_url, run.place.load_cpus, None)
        dps = {"tree": gateway.start_data_plane(run.stack, cp, redis.url, 1, run.place.server_cpus, "cpu-dp", None)}
        if args.gateway_ref:
            src = workdir / "gateway-src"
            commit = procs.export_tree(args.gateway_ref, src)
            dps[commit[:7]] = gateway.start_data_plane(
                run.stack, cp, redis.url, 1, run.place.server_cpus, "cpu-dp-ref", src
            )
        fixture = gateway.configure(cp, upstream)
        for dp in dps.values():
            dp.wait_version(fixture.version)
        shapes = {
            "key-auth": RequestShape("GET", gateway.PLAIN_PATH, {"X-API-Key": fixture.plain_key}),
            "full": RequestShape("GET", gateway.FULL_PATH, {"X-API-Key": fixture.full_key}),
        }
        targets: list[tuple[str, int, str, RequestShape]] = [
            ("bare-proxy", bare.pid, bare_url, RequestShape("GET", gateway.PLAIN_PATH))
        ]
        for label, dp in dps.items():
            for scenario in args.scenarios.split(","):
                targets.append((f"{scenario} ({label})", dp.service.pid, dp.proxy_url, shapes[scenario]))
        for i in range(args.rounds):
            for name, pid, url, shape in targets:
                before = cpu_seconds(pid)
                result = load.run(
                    url,
                    shape,
                    connections=args.connections,
                    duration_s=args.duration,
                    cpus=run.place.load_cpus,
                    threads=run.place.load_cpu_count,
                    tool=opts.loadgen,
                    workdir=workdir,
                )
                spent = cpu_seconds(pid) - before
                if result.errors or not result.requests:
                    raise RuntimeError(f"{name}: {result.errors} errors, {result.requests} requests")
                per = spent / result.requests * 1e6
                rows.setdefault(name, []).append(per)
                print(f"round {i + 1} {name}: {per:.1f} µs CPU/request, {result.rps:.0f} req/s", file=sys.stderr)
    finally:
        run.stack.stop_all()
        gateway.drop_database(opts.postgres_url, db_name)
        redis.release()
        shutil.rmtree(workdir, ignore_errors=True)
    load_end = procs.load_average()
    bare_us = statistics.median(rows["bare-proxy"])
    print(f"{'row':<28} {'µs CPU/req (median)':>20} {'x bare':>8}   rounds")
    for name, values in rows.items():
        median = statistics.median(values)
        rounds = " ".join(f"{v:.0f}" for v in values)
        print(f"{name:<28} {median:>20.1f} {median / bare_us:>8.2f}   {rounds}")
    print(f"load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end; {run.place.note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
