"""Load generation: wrk when installed (a Lua script sets method, headers and body and prints
the latency percentiles as JSON), else an equivalent Python generator (several processes,
raw asyncio sockets, keep-alive, a latency histogram per process merged at the end).

Both report the same :class:`LoadResult`. A response that is not 2xx/3xx counts in
``status_errors``; a benchmark run with any error is not a valid figure and is flagged.
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import os
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

WRK_MARKER: Final = "BENCH_JSON "


@dataclass(frozen=True)
class RequestShape:
    """One request, repeated: what every connection sends."""

    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass
class LoadResult:
    tool: str
    connections: int
    duration_s: float
    requests: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float
    connect_errors: int = 0
    read_errors: int = 0
    write_errors: int = 0
    timeouts: int = 0
    status_errors: int = 0

    @property
    def errors(self) -> int:
        return self.connect_errors + self.read_errors + self.write_errors + self.timeouts + self.status_errors

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["errors"] = self.errors
        return data


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run(
    base_url: str,
    shape: RequestShape,
    *,
    connections: int,
    duration_s: float,
    cpus: str | None,
    threads: int,
    tool: str,
    workdir: Path,
) -> LoadResult:
    if tool == "wrk":
        return run_wrk(base_url, shape, connections, duration_s, cpus, threads, workdir)
    return run_python(base_url, shape, connections, duration_s, cpus, threads)


# -- wrk -------------------------------------------------------------------------------------


def _lua_string(value: str | bytes) -> str:
    raw = value.encode() if isinstance(value, str) else value
    return '"' + "".join(f"\\{b:03d}" if not (32 <= b < 127) or b in (34, 92) else chr(b) for b in raw) + '"'


def wrk_script(shape: RequestShape) -> str:
    lines = [f"wrk.method = {_lua_string(shape.method)}"]
    for name, value in shape.headers.items():
        lines.append(f"wrk.headers[{_lua_string(name)}] = {_lua_string(value)}")
    if shape.body:
        if shape.body == shape.body[:1] * len(shape.body):
            lines.append(f"wrk.body = string.rep({_lua_string(shape.body[:1])}, {len(shape.body)})")
        else:
            lines.append(f"wrk.body = {_lua_string(shape.body)}")
    lines.append(
        """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,'
    .. '"p50":%.1f,"p90":%.1f,"p99":%.1f,"p999":%.1f,"max":%.1f,"mean":%.1f}\\n',
    "%s", summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max, latency.mean))
end
""".replace('"%s", summary', f"{_lua_string(WRK_MARKER)}, summary")
    )
    return "\n".join(lines)


def run_wrk(
    base_url: str,
    shape: RequestShape,
    connections: int,
    duration_s: float,
    cpus: str | None,
    threads: int,
    workdir: Path,
) -> LoadResult:
    script = workdir / f"wrk-{os.getpid()}-{time.monotonic_ns()}.lua"
    script.write_text(wrk_script(shape))
    threads = max(1, min(threads, connections))
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(script),
        base_url.rstrip("/") + shape.path,
    ]
    if cpus is not None:
        command = ["taskset", "-c", cpus, *command]
    out = subprocess.run(command, capture_output=True, text=True, timeout=duration_s + 60, check=False)
    script.unlink(missing_ok=True)
    for line in out.stdout.splitlines():
        if line.startswith(WRK_MARKER):
            data = json.loads(line[len(WRK_MARKER) :])
            break
    else:
        raise RuntimeError(f"wrk printed no summary (exit {out.returncode}):\n{out.stdout}\n{out.stderr}")
    seconds = data["duration_us"] / 1e6
    return LoadResult(
        tool="wrk",
        connections=connections,
        duration_s=round(seconds, 3),
        requests=data["requests"],
        rps=round(data["requests"] / seconds, 1) if seconds else 0.0,
        p50_ms=data["p50"] / 1000,
        p90_ms=data["p90"] / 1000,
        p99_ms=data["p99"] / 1000,
        p999_ms=data["p999"] / 1000,
        max_ms=data["max"] / 1000,
        mean_ms=round(data["mean"] / 1000, 4),
        connect_errors=data["connect"],
        read_errors=data["read"],
        write_errors=data["write"],
        timeouts=data["timeout"],
        status_errors=data["status"],
    )


# -- the Python load generator ---------------------------------------------------------------

# Latencies are kept as a histogram of 10 µs buckets: exact enough for p99.9 of requests that
# take 0.1 ms or more, and small to merge across processes.
BUCKET_US: Final = 10


def _request_bytes(host: str, shape: RequestShape) -> bytes:
    head = [f"{shape.method} {shape.path} HTTP/1.1", f"Host: {host}"]
    head += [f"{name}: {value}" for name, value in shape.headers.items()]
    if shape.body or shape.method in ("POST", "PUT", "PATCH"):
        head.append(f"Content-Length: {len(shape.body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + shape.body


class _BadResponse(Exception):
    pass


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one response; returns its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = -1
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                break
            await reader.readexactly(size + 2)
    elif length > 0:
        await reader.readexactly(length)
    elif length < 0 and status not in (204, 304) and status >= 200:
        raise _BadResponse("response without length on a keep-alive connection")
    return status


async def _connection(
    host: str, port: int, payload: bytes, deadline: float, hist: Counter[int], counts: Counter[str]
) -> None:
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        counts["connect"] += 1
        return
    clock = time.perf_counter
    try:
        while clock() < deadline:
            start = clock()
            try:
                writer.write(payload)
                status = await asyncio.wait_for(_read_response(reader), 10)
            except TimeoutError:
                counts["timeout"] += 1
                return
            except (OSError, asyncio.IncompleteReadError, ValueError, _BadResponse):
                counts["read"] += 1
                return
            hist[int((clock() - start) * 1e6) // BUCKET_US] += 1
            counts["requests"] += 1
            if status >= 400:
                counts["status"] += 1
    finally:
        writer.close()


def _worker(url: str, shape: RequestShape, connections: int, duration_s: float, queue: Any) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    payload = _request_bytes(parts.netloc, shape)
    hist: Counter[int] = Counter()
    counts: Counter[str] = Counter()

    async def main() -> float:
        start = time.perf_counter()
        deadline = start + duration_s
        await asyncio.gather(*(_connection(host, port, payload, deadline, hist, counts) for _ in range(connections)))
        return time.perf_counter() - start

    try:
        import uvloop

        elapsed = uvloop.run(main())
    except ImportError:
        elapsed = asyncio.run(main())
    queue.put({"hist": dict(hist), "counts": dict(counts), "elapsed": elapsed})


def _percentile(hist: Counter[int], total: int, q: float) -> float:
    if total == 0:
        return 0.0
    rank = max(1, math.ceil(total * q / 100))
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            return (bucket + 0.5) * BUCKET_US / 1000
    return max(hist) * BUCKET_US / 1000


def run_python(
    base_url: str, shape: RequestShape, connections: int, duration_s: float, cpus: str | None, processes: int
) -> LoadResult:
    processes = max(1, min(processes, connections))
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    per_proc = [connections // processes + (1 if i < connections % processes else 0) for i in range(processes)]
    workers = []
    cpu_list = _expand(cpus) if cpus else None
    for i, conns in enumerate(per_proc):
        proc = ctx.Process(target=_worker, args=(base_url, shape, conns, duration_s, queue), daemon=True)
        proc.start()
        if cpu_list and proc.pid is not None:
            os.sched_setaffinity(proc.pid, {cpu_list[i % len(cpu_list)]})
        workers.append(proc)
    results = [queue.get(timeout=duration_s + 60) for _ in workers]
    for proc in workers:
        proc.join(timeout=10)
    hist: Counter[int] = Counter()
    counts: Counter[str] = Counter()
    elapsed = 0.0
    for result in results:
        hist.update({int(k): v for k, v in result["hist"].items()})
        counts.update(result["counts"])
        elapsed = max(elapsed, result["elapsed"])
    total = sum(hist.values())
    mean = sum((b + 0.5) * BUCKET_US * n for b, n in hist.items()) / total / 1000 if total else 0.0
    return LoadResult(
        tool="python",
        connections=connections,
        duration_s=round(elapsed, 3),
        requests=counts["requests"],
        rps=round(counts["requests"] / elapsed, 1) if elapsed else 0.0,
        p50_ms=_percentile(hist, total, 50),
        p90_ms=_percentile(hist, total, 90),
        p99_ms=_percentile(hist, total, 99),
        p999_ms=_percentile(hist, total, 99.9),
        max_ms=(max(hist) + 1) * BUCKET_US / 1000 if hist else 0.0,
        mean_ms=round(mean, 4),
        connect_errors=counts["connect"],
        read_errors=counts["read"],
        timeouts=counts["timeout"],
        status_errors=counts["status"],
    )


def _expand(cpus: str) -> list[int]:
    out: list[int] = []
    for part in cpus.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out
