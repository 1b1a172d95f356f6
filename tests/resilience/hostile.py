"""Hostile clients against one data plane, in a process of their own (so that their work does not
share an interpreter lock with the latency the test measures):

    python -m tests.resilience.hostile CONFIG_JSON

CONFIG_JSON: {"host", "port", "seconds", "key" (a tenant with high limits), "flood_key",
"flood_rate" (requests per second), "slowloris", "idle", "unread", "attacks" (optional: the names
below to run, default all)}. Runs the attacks at once for ``seconds`` (or until SIGTERM), then
prints one JSON line: per attack, what the data plane answered.

- slowloris: connections that send a request head one header line per second, never ending it;
- idle: connections that send nothing;
- big_header: requests with a 32 KiB header, one after another (expect 400);
- big_body: POSTs announcing 8 MiB to a route that takes 1 MiB, body sent in 64 KiB pieces
  (expect 413 before the whole body is sent);
- unread: requests for a 5 MiB streamed answer on connections that never read it;
- flood: one tenant at ``flood_rate`` over its limit, on keep-alive connections (expect 429).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections import Counter
from typing import Any

import aiohttp

BIG_HEADER = 32 * 1024
BIG_BODY = 8 * 1024 * 1024
PIECE = 64 * 1024
ATTACKS = ("slowloris", "idle", "big_header", "big_body", "unread", "flood")


class Attack:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.host: str = cfg["host"]
        self.port: int = cfg["port"]
        self.until = time.monotonic() + float(cfg["seconds"])
        self.results: dict[str, Counter[str]] = {}
        self._ended = asyncio.Event()

    def end(self) -> None:
        """Stop every attack now (SIGTERM)."""
        self.until = time.monotonic()
        self._ended.set()

    async def until_end(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ended.wait(), timeout=max(0.0, self.until - time.monotonic()))

    def count(self, attack: str, outcome: object) -> None:
        self.results.setdefault(attack, Counter())[str(outcome)] += 1

    @property
    def running(self) -> bool:
        return time.monotonic() < self.until

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self.host, self.port)

    async def slowloris(self) -> None:
        try:
            reader, writer = await self._open()
        except OSError as exc:
            self.count("slowloris", type(exc).__name__)
            return
        writer.write(b"GET /svc/slow HTTP/1.1\r\nHost: gateway\r\n")
        line = 0
        try:
            while self.running:
                await asyncio.sleep(1)
                line += 1
                writer.write(b"X-Slow-%d: x\r\n" % line)
                await writer.drain()
                if reader.at_eof():
                    break
            self.count("slowloris", "closed by server" if reader.at_eof() else "still open at end")
        except OSError:
            self.count("slowloris", "closed by server")
        finally:
            writer.close()

    async def idle(self) -> None:
        try:
            reader, writer = await self._open()
        except OSError as exc:
            self.count("idle", type(exc).__name__)
            return
        try:
            read = asyncio.ensure_future(reader.read(1))
            end = asyncio.ensure_future(self.until_end())
            await asyncio.wait({read, end}, return_when=asyncio.FIRST_COMPLETED)
            read.cancel()
            end.cancel()
            self.count("idle", "closed by server" if reader.at_eof() else "still open at end")
        except OSError:
            self.count("idle", "closed by server")
        finally:
            writer.close()

    async def big_header(self) -> None:
        head = b"GET /svc/h HTTP/1.1\r\nHost: gateway\r\nX-API-Key: %s\r\nX-Big: %s\r\nConnection: close\r\n\r\n" % (
            self.cfg["key"].encode(),
            b"a" * BIG_HEADER,
        )
        while self.running:
            self.count("big_header", await self._exchange(head, b""))
            await asyncio.sleep(0.1)

    async def big_body(self) -> None:
        head = (
            b"POST /svc/b HTTP/1.1\r\nHost: gateway\r\nX-API-Key: %s\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % (self.cfg["key"].encode(), BIG_BODY)
        )
        while self.running:
            self.count("big_body", await self._exchange(head, b"b" * BIG_BODY))
            await asyncio.sleep(0.2)

    async def _exchange(self, head: bytes, body: bytes) -> str:
        """Send ``head`` and as much of ``body`` as the server takes; the status it answered."""
        try:
            reader, writer = await self._open()
        except OSError as exc:
            return type(exc).__name__
        try:
            writer.write(head)
            answer = asyncio.ensure_future(reader.readline())
            for offset in range(0, len(body), PIECE):
                if answer.done():
                    break
                writer.write(body[offset : offset + PIECE])
                with contextlib.suppress(OSError):
                    await writer.drain()
            line = await asyncio.wait_for(answer, timeout=10)
            return line.split(b" ")[1].decode() if line.startswith(b"HTTP/1.") else f"no answer {line[:20]!r}"
        except (OSError, TimeoutError) as exc:
            return type(exc).__name__
        finally:
            writer.close()

    async def unread(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (self.host, self.port))
            sock.sendall(
                b"GET /big/x?chunks=5120 HTTP/1.1\r\nHost: gateway\r\nX-API-Key: %s\r\n\r\n" % self.cfg["key"].encode()
            )
            await self.until_end()
            self.count("unread", "held to the end")
        except OSError as exc:
            self.count("unread", type(exc).__name__)
        finally:
            sock.close()

    async def flood(self) -> None:
        interval = 1.0 / float(self.cfg["flood_rate"])
        headers = {"X-API-Key": self.cfg["flood_key"]}
        url = f"http://{self.host}:{self.port}/svc/flood"
        connector = aiohttp.TCPConnector(limit=8)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one() -> None:
                try:
                    async with session.get(url, headers=headers) as resp:
                        await resp.read()
                        self.count("flood", resp.status)
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    self.count("flood", type(exc).__name__)

            tasks: set[asyncio.Task[None]] = set()
            next_at = time.monotonic()
            while self.running:
                task = asyncio.create_task(one())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                # No catching up after a stall: the rate stays the rate.
                next_at = max(next_at + interval, time.monotonic() - interval)
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            await asyncio.gather(*tasks)

    async def run(self) -> dict[str, dict[str, int]]:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self.end)
        chosen = set(self.cfg.get("attacks", ATTACKS))
        unknown = chosen - set(ATTACKS)
        if unknown:
            raise ValueError(f"unknown attacks {sorted(unknown)}; known: {', '.join(ATTACKS)}")
        jobs = [self.until_end()]  # the process lasts its time even with no attack chosen
        for name in ("slowloris", "idle", "unread"):
            if name in chosen:
                jobs += [getattr(self, name)() for _ in range(int(self.cfg[name]))]
        jobs += [getattr(self, name)() for name in ("big_header", "big_body", "flood") if name in chosen]
        await asyncio.gather(*jobs)
        return {attack: dict(outcomes) for attack, outcomes in self.results.items()}


def main(argv: list[str]) -> int:
    cfg = json.loads(argv[0])
    # Attackers are other machines: here they yield the CPU to the data plane and the victim.
    os.nice(10)
    print(json.dumps(asyncio.run(Attack(cfg).run())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
