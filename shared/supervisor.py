"""``tenantgate up``: the whole gateway on one machine, running exactly what production runs.

It starts embedded Postgres and Redis unless URLs are given, then the control plane
(``python -m control_plane``) and the data plane (``python -m data_plane --workers N``) as
child processes, and with ``--demo`` an echo upstream plus a demo tenant and route. Ctrl-C
(or SIGTERM) stops everything in reverse order; children also die with it if it is killed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Final

from shared import keys
from shared import settings as tg_settings
from shared.embedded import EmbeddedError, EmbeddedPostgres, EmbeddedRedis, die_with_parent, free_port
from shared.settings import HostPort, Secret, Settings

READY_DEADLINE_S: Final = 90.0
STOP_GRACE_S: Final = 15.0
DEMO_ROUTE: Final = "/demo/*"
SECRETS_FILE: Final = "secrets.json"
DEMO_FILE: Final = "demo.json"


class UpError(RuntimeError):
    """``up`` cannot continue; the message says why and what to do."""


def say(message: str) -> None:
    print(f"tenantgate: {message}", flush=True)


@dataclasses.dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]


class Cluster:
    def __init__(self, settings: Settings, demo: bool) -> None:
        self.settings = settings
        self.demo = demo
        self.data_dir = settings.data_dir.resolve()
        self.children: list[Child] = []
        self.postgres: EmbeddedPostgres | None = None
        self.redis: EmbeddedRedis | None = None
        self.stopping = False

    # --- start ---

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        settings = self._with_tokens(self.settings)
        # A person reads this terminal: readable lines, and only what needs attention.
        if "LOG_FORMAT" not in settings.explicit:
            settings = dataclasses.replace(settings, log_format="text")
        if "LOG_LEVEL" not in settings.explicit:
            settings = dataclasses.replace(settings, log_level="warning")
        if "DATABASE_URL" not in settings.explicit:
            say(f"starting embedded Postgres in {self.data_dir / 'postgres'} ...")
            self.postgres = EmbeddedPostgres(self.data_dir / "postgres")
            settings = dataclasses.replace(settings, database_url=Secret(self.postgres.start()))
        if "REDIS_URL" not in settings.explicit:
            say("starting embedded Redis ...")
            self.redis = EmbeddedRedis(self.data_dir / "redis")
            settings = dataclasses.replace(settings, redis_url=Secret(self.redis.start()))
        cluster_port = settings.cluster_listen.port
        settings = dataclasses.replace(settings, cp_addr=HostPort("127.0.0.1", cluster_port))
        self.settings = settings

        say(f"starting the control plane (admin API {settings.admin_listen}, cluster {settings.cluster_listen}) ...")
        self._spawn("control plane", ["-m", "control_plane", "serve"], settings, exclude=("WORKERS",))
        self._wait_ready("control plane", f"http://{_local(settings.admin_listen)}/readyz")
        say(f"starting the data plane ({settings.workers} workers, proxy {settings.proxy_listen}) ...")
        self._spawn("data plane", ["-m", "data_plane"], settings, exclude=("NODE_ID",))
        self._wait_ready("data plane", f"http://{_local(settings.status_listen)}/readyz")
        demo_key = self._start_demo() if self.demo else None
        self._summary(demo_key)

    def _with_tokens(self, settings: Settings) -> Settings:
        """Use the given tokens, else the ones generated on a previous run, else new ones."""
        path = self.data_dir / SECRETS_FILE
        stored: dict[str, str] = {}
        if path.exists():
            with contextlib.suppress(ValueError, OSError):
                stored = json.loads(path.read_text())
        changed = False
        for field in ("admin_token", "cluster_token"):
            if getattr(settings, field) is None:
                value = stored.get(field) or keys.generate_token(prefix="")
                changed |= stored.get(field) != value
                stored[field] = value
                if field == "admin_token":
                    settings = dataclasses.replace(settings, admin_token=Secret(value))
                else:
                    settings = dataclasses.replace(settings, cluster_token=Secret(value))
        if changed:
            _write_private(path, json.dumps(stored))
        return settings

    def _spawn(self, name: str, args: list[str], settings: Settings, exclude: tuple[str, ...] = ()) -> None:
        env = dict(os.environ)
        env.update(tg_settings.to_environ(settings, exclude=exclude))
        proc = subprocess.Popen(
            [sys.executable, *args],
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches only us; we stop children in order
            preexec_fn=die_with_parent,
        )
        self.children.append(Child(name, proc))

    def _wait_ready(self, name: str, url: str) -> None:
        deadline = time.monotonic() + READY_DEADLINE_S
        child = self.children[-1]
        last_note = time.monotonic()
        while time.monotonic() < deadline and not self.stopping:
            if child.proc.poll() is not None:
                raise UpError(f"the {name} exited at start (code {child.proc.returncode}); its error is above")
            if _get(url, {}) == 200:
                return
            if time.monotonic() - last_note > 5:
                say(f"waiting for the {name} to become ready ...")
                last_note = time.monotonic()
            time.sleep(0.1)
        if not self.stopping:
            raise UpError(f"the {name} was not ready within {READY_DEADLINE_S:.0f}s ({url})")

    # --- demo ---

    def _start_demo(self) -> str:
        admin = f"http://{_local(self.settings.admin_listen)}"
        proxy = f"http://{_local(self.settings.proxy_listen)}"
        token = self.settings.admin_token.reveal() if self.settings.admin_token else ""
        path = self.data_dir / DEMO_FILE
        demo: dict[str, Any] = {}
        with contextlib.suppress(ValueError, OSError):
            demo = json.loads(path.read_text())
        # Reuse the previous run's echo port so the stored demo route still points at it.
        port = int(demo.get("echo_port") or 0)
        if not port or not _port_free(port):
            port = free_port()
        say(f"starting the demo echo upstream on 127.0.0.1:{port} ...")
        self._spawn_echo(port)
        key = demo.get("api_key")
        if not key or _get(f"{proxy}/demo/hello", {"X-API-Key": key}) == 401:
            created = _post(admin, token, "/admin/tenants", {"name": "demo", "tier": "free"})
            key = created["api_key"]
            demo = {"tenant_id": created["id"], "api_key": key}
        if demo.get("echo_port") != port:
            # A new route for a new port; a higher priority makes it win over an older demo route.
            priority = int(demo.get("route_priority", -1)) + 1
            _post(
                admin,
                token,
                "/admin/routes",
                {"path": DEMO_ROUTE, "upstream": f"http://127.0.0.1:{port}", "priority": priority},
            )
            demo.update(echo_port=port, route_priority=priority)
        _write_private(path, json.dumps(demo))
        deadline = time.monotonic() + 10
        while _get(f"{proxy}/demo/hello", {"X-API-Key": key}) != 200:
            if time.monotonic() > deadline:
                raise UpError("the demo route did not answer through the data plane within 10s")
            time.sleep(0.05)
        return str(key)

    def _spawn_echo(self, port: int) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shared.echo_upstream", "--listen", f"127.0.0.1:{port}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        self.children.append(Child("echo upstream", proc))

    def _summary(self, demo_key: str | None) -> None:
        s = self.settings
        token = s.admin_token.reveal() if s.admin_token else ""
        lines = [
            "",
            "tenantgate is up.",
            f"  proxy        http://{_local(s.proxy_listen)}",
            f"  status       http://{_local(s.status_listen)}/status",
            f"  admin API    http://{_local(s.admin_listen)}   (docs: /docs)",
            f"  admin token  {token}",
            f"  data dir     {self.data_dir}",
        ]
        if demo_key:
            lines += [
                "",
                f"  demo API key {demo_key}",
                "  try:",
                f'    curl -H "X-API-Key: {demo_key}" http://{_local(s.proxy_listen)}/demo/hello',
            ]
        lines += ["", "Press Ctrl-C to stop."]
        print("\n".join(lines), flush=True)

    # --- run and stop ---

    def wait(self) -> int:
        while not self.stopping:
            for child in self.children:
                if child.proc.poll() is not None:
                    say(f"the {child.name} exited unexpectedly (code {child.proc.returncode}); stopping")
                    return 1
            time.sleep(0.2)
        return 0

    def stop(self) -> None:
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in reversed(self.children):
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                say(f"the {child.name} did not stop in time; killing it")
                child.proc.kill()
                child.proc.wait()
        if self.redis is not None:
            self.redis.stop()
        if self.postgres is not None:
            self.postgres.stop()


def run(settings: Settings, demo: bool) -> int:
    cluster = Cluster(settings, demo)

    def on_signal(_signum: int, _frame: object) -> None:
        cluster.stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        cluster.start()
        code = cluster.wait()
    except (UpError, EmbeddedError, OSError) as exc:
        print(f"tenantgate up: {exc}", file=sys.stderr)
        code = 1
    finally:
        say("stopping ...")
        cluster.stop()
        say("stopped.")
    return code


# --- helpers ---


def _local(addr: HostPort) -> str:
    host = "127.0.0.1" if addr.host in ("0.0.0.0", "", "::") else addr.host
    return str(HostPort(host, addr.port))


def _port_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _request(url: str, headers: dict[str, str], data: bytes | None = None) -> tuple[int, bytes]:
    method = "POST" if data is not None else "GET"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)  # noqa: S310 - loopback
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - our own loopback URL
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def _get(url: str, headers: dict[str, str]) -> int:
    return _request(url, headers)[0]


def _post(admin: str, token: str, path: str, body: dict[str, Any]) -> Any:
    status, raw = _request(
        admin + path,
        {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        json.dumps(body).encode(),
    )
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = raw.decode("utf-8", "replace")
    if status != 201:
        raise UpError(f"admin API {path} answered {status}: {parsed}")
    return parsed
