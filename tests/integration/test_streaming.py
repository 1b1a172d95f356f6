"""Bodies stream through a real data plane in both directions without being held whole: a
200 MB upload and a 200 MB download to a slow reader leave the data plane's resident memory
flat; chunked bodies, content encodings, HEAD and 100-continue behave as a client expects."""

from __future__ import annotations

import gzip
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.harness import wait_for
from tests.integration.proxy_env import ProxyEnv, proxy_env
from tests.integration.rawhttp import exchange

pytestmark = pytest.mark.integration

BIG = 200 * 1024 * 1024
# How much the data plane's RSS may grow while 200 MB pass through it.
RSS_GROWTH_LIMIT = 50 * 1024 * 1024


@dataclass
class Env:
    proxy: ProxyEnv
    key: str


@pytest.fixture(scope="module")
def env(postgres_admin_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp: Path = tmp_path_factory.mktemp("streaming")
    with proxy_env(postgres_admin_url, redis_url, tmp) as proxy:
        tenant = proxy.tenant("Streamer")
        proxy.route(path="/stream/*", max_body_bytes=0, timeout_ms=60_000)
        yield Env(proxy, tenant["api_key"])


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class RssSampler:
    """Samples a process's RSS every few milliseconds in a thread; ``peak`` is the largest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = rss_bytes(pid)
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pid))

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


def _warm_up(env: Env) -> None:
    """One small exchange each way so pools, buffers and code paths exist before the baseline."""
    resp = exchange(env.proxy.port, _head("POST", "/stream/warm", env.key, 1024 * 1024) + b"x" * 1024 * 1024)
    assert resp.status == 200
    resp = exchange(env.proxy.port, _head("GET", "/stream/warm?bytes=1048576", env.key))
    assert resp.status == 200 and len(resp.body) == 1024 * 1024


def _head(method: str, target: str, key: str, length: int | None = None, *extra: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: gateway.test", f"X-API-Key: {key}", *extra]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_200_mb_request_body_streams_with_flat_memory(env: Env) -> None:
    _warm_up(env)
    block = b"u" * (256 * 1024)
    with (
        RssSampler(env.proxy.dp.proc.popen.pid) as rss,
        socket.create_connection(("127.0.0.1", env.proxy.port)) as sock,
    ):
        sock.settimeout(60)
        sock.sendall(_head("POST", "/stream/upload?case=big-upload", env.key, BIG))
        for _ in range(BIG // len(block)):
            sock.sendall(block)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(65536)
            assert chunk, "the gateway closed the connection without an answer"
            head += chunk

    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    (entry,) = env.proxy.seen("case=big-upload")
    assert entry["body_bytes"] == BIG
    print(f"200 MB upload: DP RSS {rss.baseline / 2**20:.1f} MiB -> peak {rss.peak / 2**20:.1f} MiB")
    assert rss.growth < RSS_GROWTH_LIMIT, f"RSS grew by {rss.growth / 2**20:.1f} MiB"


def test_200_mb_response_to_a_slow_reader_streams_with_flat_memory(env: Env) -> None:
    _warm_up(env)
    received = 0
    with RssSampler(env.proxy.dp.proc.popen.pid) as rss, socket.socket() as sock:
        # A small receive window and pauses between reads: the client is far slower than the
        # upstream, so only backpressure keeps the gateway from buffering the difference.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.settimeout(60)
        sock.connect(("127.0.0.1", env.proxy.port))
        sock.sendall(_head("GET", f"/stream/download?bytes={BIG}", env.key))
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            buffer += sock.recv(65536)
        head, _, body = buffer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert b"transfer-encoding: chunked" in head.lower()
        tail = body
        reads = 0
        while True:
            chunk = sock.recv(64 * 1024)
            if not chunk:
                break
            tail = (tail + chunk)[-16:]
            received += len(chunk)
            reads += 1
            if reads % 16 == 0:
                time.sleep(0.002)
            if tail.endswith(b"0\r\n\r\n"):
                break
        received += len(body)

    # Chunk framing adds a few bytes per chunk on top of the payload.
    assert BIG <= received < BIG + BIG // 100
    print(f"200 MB download: DP RSS {rss.baseline / 2**20:.1f} MiB -> peak {rss.peak / 2**20:.1f} MiB")
    assert rss.growth < RSS_GROWTH_LIMIT, f"RSS grew by {rss.growth / 2**20:.1f} MiB"


def test_chunked_request_body_is_forwarded_whole(env: Env) -> None:
    body = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (b"hello ", b"chunked ", b"world")) + b"0\r\n\r\n"
    resp = exchange(
        env.proxy.port,
        _head("POST", "/stream/chunked?case=chunked-up", env.key, None, "Transfer-Encoding: chunked") + body,
    )

    assert resp.status == 200
    (entry,) = env.proxy.seen("case=chunked-up")
    assert entry["body_bytes"] == len(b"hello chunked world")


def test_content_encoding_passes_through_untouched(env: Env) -> None:
    compressed = gzip.compress(b"compressed payload " * 100)
    resp = exchange(
        env.proxy.port, _head("GET", f"/stream/gz?gzip={compressed.hex()}", env.key, None, "Accept-Encoding: gzip")
    )

    assert resp.status == 200
    assert resp.header("Content-Encoding") == "gzip"
    assert resp.body == compressed  # not inflated on the way


def test_compressed_request_body_is_not_inflated(env: Env) -> None:
    compressed = gzip.compress(b"z" * 100_000)
    resp = exchange(
        env.proxy.port,
        _head("POST", "/stream/gzup?case=gzip-up", env.key, len(compressed), "Content-Encoding: gzip") + compressed,
    )

    assert resp.status == 200
    (entry,) = env.proxy.seen("case=gzip-up")
    assert entry["body_bytes"] == len(compressed)
    assert ["Content-Encoding", "gzip"] in entry["headers"]


def test_head_is_answered_without_a_body(env: Env) -> None:
    with socket.create_connection(("127.0.0.1", env.proxy.port), timeout=10) as sock:
        # HEAD then GET on one connection: if the gateway sent a body after the HEAD, the GET's
        # answer would be misread from it.
        sock.sendall(_head("HEAD", "/stream/h?case=head", env.key) + _head("GET", "/stream/h?case=after-head", env.key))
        data = b""
        while data.count(b"HTTP/1.1 ") < 2 or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk

    first, _, rest = data.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200")
    assert b"content-length:" in first.lower()  # the length the GET would have
    assert rest.startswith(b"HTTP/1.1 200"), rest[:100]
    assert [e["method"] for e in env.proxy.seen("case=head")] == ["HEAD"]


def test_expect_continue_gets_100_then_the_answer(env: Env) -> None:
    with socket.create_connection(("127.0.0.1", env.proxy.port), timeout=10) as sock:
        sock.sendall(_head("PUT", "/stream/c?case=continue", env.key, 5, "Expect: 100-continue"))
        interim = b""
        while b"\r\n\r\n" not in interim:
            chunk = sock.recv(65536)
            assert chunk
            interim += chunk
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(b"hello")
        final = interim.partition(b"\r\n\r\n")[2]
        while b"\r\n\r\n" not in final:
            final += sock.recv(65536)

    assert final.startswith(b"HTTP/1.1 200")
    (entry,) = env.proxy.seen("case=continue")
    assert entry["body_bytes"] == 5


def test_client_going_away_aborts_the_upstream_exchange(env: Env) -> None:
    with socket.create_connection(("127.0.0.1", env.proxy.port), timeout=10) as sock:
        sock.sendall(_head("GET", "/stream/slow?sleep=1&case=abandoned", env.key))
        wait_for(lambda: env.proxy.seen("case=abandoned"), timeout=10, what="the request to reach the upstream")
    # The client is gone before the upstream answers: the gateway must drop the upstream side.
    entry = wait_for(
        lambda: next((e for e in env.proxy.seen("case=abandoned") if "aborted" in e), None),
        timeout=10,
        what="the upstream to finish its sleep",
    )
    assert entry["aborted"] is True
