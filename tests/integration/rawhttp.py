"""Raw-socket HTTP for tests that must send bytes no HTTP client library would: smuggling,
malformed framing, header injection. Responses are parsed just enough to assert on."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RawResponse:
    status: int
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    # Whatever arrived after the first response (a second response means the gateway parsed
    # a smuggled request).
    rest: bytes = b""
    interim: list[int] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def json(self) -> Any:
        return json.loads(self.body)


def exchange(port: int, data: bytes, *, timeout: float = 10.0, host: str = "127.0.0.1") -> RawResponse:
    """Send ``data`` on a fresh connection and read the first final response. After an error
    answer (status >= 400) the connection must be closed by the server: everything it sent
    until then is kept in ``rest``. After a success, reading stops at the end of the body."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(data)
        buffer = b""
        deadline = time.monotonic() + timeout
        response: RawResponse | None = None
        closed = False
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                chunk = b""
            if not chunk:
                closed = True
                break
            buffer += chunk
            response = _complete(buffer)
            if response is not None and response.status < 400:
                return response
        response = _complete(buffer)
        if response is None:
            raise AssertionError(f"no complete response (closed={closed}) in {buffer[:300]!r}")
        if not closed:
            raise AssertionError(f"the server kept the connection open after a {response.status}")
        return response


def _complete(buffer: bytes) -> RawResponse | None:
    try:
        return parse(buffer, strict=True)
    except _Incomplete:
        return None


class _Incomplete(Exception):
    pass


def parse(raw: bytes, *, strict: bool = False) -> RawResponse:
    """Parse the first final response in ``raw``; ``strict``: raise ``_Incomplete`` if its head
    or body has not fully arrived yet."""
    interim: list[int] = []
    while True:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        if not sep:
            if strict:
                raise _Incomplete
            raise AssertionError(f"no complete response head in {raw[:300]!r}")
        lines = head.split(b"\r\n")
        version, status_text = lines[0].split(b" ", 2)[:2]
        status = int(status_text)
        headers = [
            (k.decode("latin-1").strip(), v.decode("latin-1").strip())
            for k, _, v in (line.partition(b":") for line in lines[1:])
        ]
        if 100 <= status < 200 and status != 101:
            interim.append(status)
            raw = rest
            continue
        break
    response = RawResponse(status, version.decode(), headers, b"", interim=interim)
    length = response.header("Content-Length")
    if response.header("Transfer-Encoding") == "chunked":
        try:
            body, rest = _dechunk(rest)
        except (ValueError, IndexError):
            if strict:
                raise _Incomplete from None
            raise
    elif length is not None:
        if strict and len(rest) < int(length):
            raise _Incomplete
        body, rest = rest[: int(length)], rest[int(length) :]
    else:
        body, rest = rest, b""
    response.body, response.rest = body, rest
    return response


def _dechunk(data: bytes) -> tuple[bytes, bytes]:
    out = bytearray()
    while True:
        size_line, sep, data = data.partition(b"\r\n")
        if not sep:
            raise ValueError("incomplete chunk size line")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            _trailer, sep, data = data.partition(b"\r\n")
            if not sep:
                raise ValueError("incomplete last chunk")
            return bytes(out), data
        if len(data) < size + 2:
            raise ValueError("incomplete chunk")
        out += data[:size]
        data = data[size + 2 :]
