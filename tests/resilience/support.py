"""What the resilience suite runs besides the gateway itself: a load balancer in front of the
data planes (HAProxy when installed, else a small TCP round-robin balancer with HAProxy's
``option redispatch``), a redis-server of the suite's own that can be killed, steady load that
records every response, and the table of figures the suite prints at the end."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from shared.embedded import redis_binary
from tests.integration.harness import DataPlane, Proc, Processes, free_port, http, wait_for

# --- processes restarted on the same ports ---------------------------------------------------


def respawn(procs: Processes, proc: Proc, args: list[str], **env: str) -> Proc:
    """``proc`` started again with the same environment (so the same ports, node id and data
    directory), plus ``env``."""
    return procs.spawn(proc.name, args, {**proc.env, **env})


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` from /proc (what the kernel charges the process)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sched_stats(pid: int) -> tuple[float, float, int]:
    """The main thread of ``pid`` (an event loop's) from /proc/<pid>/schedstat: seconds on a CPU,
    seconds runnable but waiting for one, and how many times it was scheduled in."""
    on_cpu, waiting, slices = Path(f"/proc/{pid}/schedstat").read_text().split()
    return int(on_cpu) / 1e9, int(waiting) / 1e9, int(slices)


# --- Redis of the suite's own ------------------------------------------------------------------


APPEND_ONLY = ["--appendonly", "yes", "--appendfsync", "always"]


class RedisServer:
    """A redis-server on a random port that a test kills (SIGKILL) and starts again on the same
    port. By default append-only with ``fsync always``, as a production Redis holding rate-limit
    counters would be: a restart keeps every acknowledged counter (``append_only=False``: a
    restart starts empty)."""

    def __init__(self, workdir: Path, *, append_only: bool = True) -> None:
        self.port = free_port()
        self.workdir = workdir
        self._persistence = APPEND_ONLY if append_only else ["--appendonly", "no"]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = redis_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        with (self.workdir / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--dir",
                    str(self.workdir),
                    *self._persistence,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait_for(self.answers, timeout=15, what="redis-server to answer PING")

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class LoopServer:
    """A TCP server on 127.0.0.1:<port> with an event loop of its own in a thread. :meth:`stop`
    cancels every connection it holds and closes the loop, so nothing is left running after."""

    def __init__(self) -> None:
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise AssertionError(f"{type(self).__name__} did not start")

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        self._background()
        self._started.set()
        await self._stop.wait()
        server.close()
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _background(self) -> None:
        """Start tasks that run beside the server (none by default)."""

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)


class SlowLink(LoopServer):
    """A TCP forwarder that delays every chunk a client sends by ``delay_s`` before passing it
    on (answers come back at once): a Redis that is reachable and healthy, only far away."""

    def __init__(self, target_port: int, delay_s: float) -> None:
        self.target_port = target_port
        self.delay_s = delay_s
        super().__init__()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer, self.delay_s), _pipe(up_reader, writer, 0.0))


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay_s: float) -> None:
    try:
        while data := await src.read(65536):
            if delay_s:
                await asyncio.sleep(delay_s)
            dst.write(data)
            await dst.drain()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.close()


# --- the load balancer -------------------------------------------------------------------------


@dataclass
class Backend:
    name: str
    proxy_port: int
    status_port: int


def backend_of(name: str, dp: DataPlane) -> Backend:
    return Backend(name, _port(dp.proxy_url), _port(dp.status_url))


def _port(url: str) -> int:
    return int(url.rpartition(":")[2])


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if Path(p).exists()), None
    )


# The data-plane part of deploy/haproxy/haproxy.cfg (round robin, /readyz health checks on the
# status port, two retries with redispatch on connection failures, X-Served-By), with health
# checks every 500 ms so that a test does not wait on the production 2 s interval.
HAPROXY_CFG = """\
global
    maxconn 4096

defaults
    mode http
    timeout connect 3s
    timeout client 65s
    timeout server 65s
    timeout http-request 10s
    timeout http-keep-alive 10s
    retries 2
    option redispatch

frontend proxy
    bind 127.0.0.1:{port}
    default_backend data_planes

backend data_planes
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    http-response set-header X-Served-By %[srv_name]
    default-server inter 500ms fall 2 rise 1
{servers}
"""


class HAProxy:
    """Debian's haproxy in the foreground with :data:`HAPROXY_CFG`."""

    kind = "haproxy"

    def __init__(self, procs: Processes, backends: Sequence[Backend], binary: str) -> None:
        self.port = free_port()
        servers = "\n".join(
            f"    server {b.name} 127.0.0.1:{b.proxy_port} check port {b.status_port}" for b in backends
        )
        cfg = procs.tmp / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.format(port=self.port, servers=servers))
        log_path = procs.tmp / "haproxy.log"
        with log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                [binary, "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        wait_for(self._accepts, timeout=15, what="haproxy to listen")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accepts(self) -> bool:
        if self.popen.poll() is not None:
            raise AssertionError(f"haproxy exited with {self.popen.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
            return True
        return False

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


class TcpBalancer(LoopServer):
    """Round robin over TCP with HAProxy's ``option redispatch``: a connection that a backend
    refuses goes to the next one. Backends whose /readyz is not 200 are skipped (checked every
    500 ms, like the HAProxy configuration above). Connection level only, so it cannot name the
    backend in a header: responses carry no X-Served-By."""

    kind = "tcp"

    def __init__(self, backends: Sequence[Backend]) -> None:
        self.backends = list(backends)
        self._ready = {b.name: True for b in backends}
        self._order = itertools.cycle(range(len(backends)))
        self._checker: asyncio.Task[None] | None = None
        super().__init__()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _background(self) -> None:
        self._checker = asyncio.get_running_loop().create_task(self._check())

    async def _check(self) -> None:
        while True:
            for b in self.backends:
                try:
                    resp = await asyncio.to_thread(http, "GET", f"http://127.0.0.1:{b.status_port}/readyz", timeout=1)
                    self._ready[b.name] = resp.status == 200
                except OSError:
                    self._ready[b.name] = False
            await asyncio.sleep(0.5)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        for _ in range(len(self.backends)):
            b = self.backends[next(self._order)]
            if not self._ready[b.name]:
                continue
            try:
                upstream = await asyncio.open_connection("127.0.0.1", b.proxy_port)
                break
            except OSError:
                continue
        if upstream is None:
            writer.close()
            return
        up_reader, up_writer = upstream
        await asyncio.gather(_pipe(reader, up_writer, 0.0), _pipe(up_reader, writer, 0.0))


def start_balancer(procs: Processes, backends: Sequence[Backend]) -> HAProxy | TcpBalancer:
    """HAProxy when installed, unless TENANTGATE_TEST_BALANCER=tcp asks for the fallback."""
    binary = haproxy_binary()
    if binary and os.environ.get("TENANTGATE_TEST_BALANCER", "haproxy") != "tcp":
        return HAProxy(procs, backends, binary)
    return TcpBalancer(backends)


# --- steady load -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One request of the load: when it left and came back (monotonic), and what came back."""

    client: str
    tenant: str
    sent: float
    done: float
    status: int  # 0: no HTTP answer at all (connection refused or reset)
    served_by: str
    from_gateway: bool  # the answer came from a data plane (it carries X-Request-ID)
    retry_after: bool
    detail: str = ""


@dataclass
class Client:
    name: str
    tenant: str
    key: str
    paths: Sequence[str]
    rate: float  # requests per second


@dataclass
class Load:
    """Clients that each send ``rate`` requests per second (one at a time, keep-alive) through
    ``base_url`` until stopped, recording every response."""

    base_url: str
    clients: Sequence[Client]
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Load:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[Sample]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        return list(self.samples)

    def between(self, start: float, end: float) -> list[Sample]:
        return [s for s in list(self.samples) if start <= s.sent <= end]

    async def _main(self) -> None:
        await asyncio.gather(*(self._run(c) for c in self.clients))

    async def _run(self, client: Client) -> None:
        interval = 1.0 / client.rate
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            next_at = time.monotonic()
            for i in itertools.count():
                if self._stop.is_set():
                    return
                path = client.paths[i % len(client.paths)]
                sent = time.monotonic()
                try:
                    async with session.get(self.base_url + path, headers={"X-API-Key": client.key}) as resp:
                        body = await resp.read()
                        sample = Sample(
                            client.name,
                            client.tenant,
                            sent,
                            time.monotonic(),
                            resp.status,
                            resp.headers.get("X-Served-By", ""),
                            "X-Request-ID" in resp.headers,
                            "Retry-After" in resp.headers,
                            "" if resp.status < 400 else body[:200].decode("utf-8", "replace"),
                        )
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    sample = Sample(client.name, client.tenant, sent, time.monotonic(), 0, "", False, False, repr(exc))
                self.samples.append(sample)
                next_at = max(next_at + interval, time.monotonic() - interval)
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))


def max_in_window(times: Iterable[float], window: float) -> int:
    """The most of ``times`` that fall in any interval of length ``window``."""
    ordered = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(ordered):
        while t - ordered[lo] > window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def p99(latencies: Sequence[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def time_until(predicate: Callable[[], object], timeout: float, what: str) -> float:
    """Seconds until ``predicate`` holds (AssertionError after ``timeout``)."""
    start = time.monotonic()
    wait_for(predicate, timeout=timeout, interval=0.05, what=what)
    return time.monotonic() - start


# --- the table of figures ------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    figures: dict[str, str]
    bound: str
    ok: bool


@dataclass
class Figures:
    """Rows collected by the suite; printed as one table at the end of the run and written to
    ``path`` as the run goes."""

    path: Path
    rows: list[Row] = field(default_factory=list)

    def add(self, scenario: str, bound: str, ok: bool, **figures: object) -> None:
        self.rows.append(Row(scenario, {k: _fmt(v) for k, v in figures.items()}, bound, ok))
        self.path.write_text(self.table() + "\n")

    def table(self) -> str:
        lines = [
            "| scenario | figures | bound | ok |",
            "|---|---|---|---|",
        ]
        for row in self.rows:
            figures = ", ".join(f"{k}={v}" for k, v in row.figures.items())
            lines.append(f"| {row.scenario} | {figures} | {row.bound} | {'yes' if row.ok else 'NO'} |")
        return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)
