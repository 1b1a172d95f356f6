"""Processes the benchmark starts: each in its own session (so its children stop with it),
optionally pinned to CPUs with ``taskset``, logged to a file, and always stopped.

Also the machine facts a report needs to be read honestly: CPU count, load average, commit.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

STOP_TIMEOUT_S: Final = 15.0
READY_TIMEOUT_S: Final = 60.0
REPO_ROOT: Final = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class HttpAnswer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    json_body: Any = None,
    timeout: float = 30.0,
) -> HttpAnswer:
    all_headers = dict(headers or {})
    if json_body is not None:
        body = json.dumps(json_body).encode()
        all_headers.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=body, headers=all_headers, method=method)  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            return HttpAnswer(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
    except urllib.error.HTTPError as exc:
        return HttpAnswer(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())


@dataclass
class Service:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    cpus: str | None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the process (it stops its own children), then SIGKILL its whole session
        if anything of it is still there after the timeout."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=STOP_TIMEOUT_S)
        # The session id is the leader's pid: whatever it started and left behind goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)


class ServiceFailed(RuntimeError):
    """A service exited or did not become ready; the message carries the end of its log."""


@dataclass
class Stack:
    """Every service one benchmark run starts; :meth:`stop_all` stops them in reverse order."""

    workdir: Path
    services: list[Service] = field(default_factory=list)
    # Every process ever started (name, pid), for the report: a caller can check all are gone.
    started: list[tuple[str, int]] = field(default_factory=list)

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cpus: str | None = None,
        cwd: Path = REPO_ROOT,
    ) -> Service:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTGATE_")}
        full_env.update(env or {})
        command = list(argv)
        if cpus is not None:
            command = ["taskset", "-c", cpus, *command]
        log_path = self.workdir / f"{name}-{len(self.services)}.log"
        with log_path.open("wb") as log_file:
            popen = subprocess.Popen(
                command,
                env=full_env,
                cwd=cwd,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        service = Service(name, popen, log_path, cpus)
        self.services.append(service)
        self.started.append((name, popen.pid))
        return service

    def stop(self, service: Service) -> None:
        service.stop()
        if service in self.services:
            self.services.remove(service)

    def stop_all(self) -> None:
        for service in reversed(self.services):
            service.stop()
        self.services.clear()


def wait_until(service: Service, ready: Callable[[], bool], what: str, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not service.alive():
            raise ServiceFailed(f"{service.name} exited with {service.popen.returncode}:\n{service.log_tail()}")
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise ServiceFailed(f"timed out after {timeout:.0f}s waiting for {what}:\n{service.log_tail()}")


def answers(url: str, expect: int | None = None) -> bool:
    status = http("GET", url, timeout=2).status
    return expect is None or status == expect


def export_tree(ref: str, dest: Path) -> str:
    """Write the tree of git ``ref`` (e.g. HEAD) to ``dest``; returns its full commit id.
    Measuring a commit rather than the working tree keeps a run reproducible while the
    working tree changes."""
    commit = _git("rev-parse", "--verify", f"{ref}^{{commit}}")
    if not commit:
        raise RuntimeError(f"--gateway-ref {ref}: not a commit")
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=REPO_ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return commit


def python() -> str:
    return sys.executable


def tenantgate_command() -> list[str]:
    """The installed ``tenantgate`` console script beside this interpreter, else the module."""
    script = Path(sys.executable).parent / "tenantgate"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from shared.cli import main; sys.exit(main())"]


# -- CPU placement ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Which CPUs the load generator (and the upstream) get, and which the servers under test
    get; ``None`` means unpinned. ``note`` says what was done, for the report."""

    load_cpus: str | None
    server_cpus: str | None
    note: str

    @property
    def load_cpu_count(self) -> int:
        return _count(self.load_cpus) if self.load_cpus else (os.cpu_count() or 1)


def _count(cpus: str) -> int:
    total = 0
    for part in cpus.split(","):
        lo, _, hi = part.partition("-")
        total += (int(hi) - int(lo) + 1) if hi else 1
    return total


def placement(pin: bool) -> Placement:
    cpus = sorted(os.sched_getaffinity(0))
    if not pin:
        return Placement(None, None, "not pinned (--no-pin)")
    if shutil.which("taskset") is None:
        return Placement(None, None, "not pinned: taskset is not installed")
    if len(cpus) < 2:
        return Placement(None, None, f"not pinned: only {len(cpus)} CPU available")
    # The load generator and the upstream (both far cheaper per request than a Python
    # proxy) share the last CPU; the server under test gets the others.
    load = str(cpus[-1])
    server = ",".join(str(c) for c in cpus[:-1])
    return Placement(
        load,
        server,
        f"load generator and upstream pinned to CPU {load}; server under test (gateway worker, "
        f"bare proxy, nginx proxy) pinned to CPU {server}; multi-worker scenarios run unpinned",
    )


# -- machine facts ---------------------------------------------------------------------------

HIGH_LOAD_PER_CPU: Final = 0.5


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def machine_info() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "commit": _git("rev-parse", "HEAD"),
        "worktree_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "nginx": _version(["nginx", "-v"]),
        "wrk": _version(["wrk", "--version"]),
    }


def load_is_high(load1: float) -> bool:
    return load1 > HIGH_LOAD_PER_CPU * (os.cpu_count() or 1)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip()


def _version(command: list[str]) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0] if text else ""


# -- memory ----------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def children(pid: int) -> list[int]:
    """Direct child pids (Linux /proc)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found.extend(int(p) for p in (task / "children").read_text().split())
    return found
