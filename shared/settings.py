"""Process settings: one frozen, typed object built once at start from ``TENANTGATE_*`` and CLI flags.

This is the only module that reads the environment. Every setting is also a CLI flag
(``TENANTGATE_DATABASE_URL`` ↔ ``--database-url``); a flag wins over the environment.
A bad value raises :class:`SettingsError` naming the setting; entry points turn it into
one line on stderr and exit code 2 (see :func:`exit_on_bad_settings`).

Settings configure the process. Tenants, routes and limits are not settings: they are
the versioned snapshot the control plane distributes.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import socket
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Final, NoReturn
from urllib.parse import urlsplit

ENV_PREFIX: Final = "TENANTGATE_"

DEFAULT_CP_ADDR: Final = "127.0.0.1:8005"
DEFAULT_PROXY_LISTEN: Final = "0.0.0.0:8000"
DEFAULT_STATUS_LISTEN: Final = "0.0.0.0:8100"
DEFAULT_ADMIN_LISTEN: Final = "127.0.0.1:8001"
DEFAULT_CLUSTER_LISTEN: Final = "0.0.0.0:8005"
DEFAULT_REDIS_URL: Final = "redis://127.0.0.1:6379/0"
DEFAULT_DATA_DIR: Final = "./.tenantgate"
DEFAULT_LOG_LEVEL: Final = "info"
DEFAULT_LOG_FORMAT: Final = "json"
DEFAULT_RATELIMIT_FAILURE_MODE: Final = "open"
DEFAULT_RATELIMIT_TIMEOUT_MS: Final = "25"
DEFAULT_RATELIMIT_MINUTE_S: Final = "60"
MIN_TOKEN_LENGTH: Final = 16
LOG_LEVELS: Final = ("debug", "info", "warning", "error")


class SettingsError(Exception):
    """A setting is missing or has a bad value. ``str()`` is the one line shown to the operator."""

    def __init__(self, name: str, message: str) -> None:
        self.name = name
        super().__init__(f"{ENV_PREFIX}{name} (--{_flag(name)}): {message}")


class Secret:
    """A string whose repr and str hide it. Call :meth:`reveal` where the value is really needed."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and secrets.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: Secret | None
    redis_url: Secret
    redis_cluster: bool
    admin_token: Secret | None
    cluster_token: Secret | None
    cp_addr: HostPort
    proxy_listen: HostPort
    status_listen: HostPort
    admin_listen: HostPort
    cluster_listen: HostPort
    data_dir: Path
    log_level: str
    log_format: str
    ratelimit_failure_mode: str
    ratelimit_timeout_ms: int
    ratelimit_minute_s: int
    node_id: str
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    workers: int
    usage_flush_interval_s: float = 5.0
    usage_spool_max_bytes: int = 64 * 1024 * 1024
    metrics_tenant_labels: bool = False
    access_log: bool = True
    access_log_sample: float = 1.0
    # After SIGTERM a data plane worker stops accepting and lets requests in flight finish for
    # at most this long before it cuts them (keep it below the orchestrator's grace period).
    drain_timeout_s: float = 10.0
    # TLS on the cluster port: the control plane's certificate and key (PEM), and the CA a
    # data plane verifies it with (a data plane with a CA never speaks plaintext).
    cluster_tls_cert: Path | None = None
    cluster_tls_key: Path | None = None
    cluster_tls_ca: Path | None = None
    # CA certificates a data plane trusts for HTTPS upstreams besides the system's store.
    upstream_ca_file: Path | None = None
    # While the cluster token is rotated, the control plane also accepts the previous one.
    cluster_token_previous: Secret | None = None
    # Names of the settings given explicitly (flag or environment) rather than defaulted.
    explicit: frozenset[str] = frozenset()


# --- parsers: each takes the raw string and returns the typed value or raises ValueError ---


def _parse_host_port(raw: str) -> HostPort:
    host, sep, port_s = raw.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {raw!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"port must be a number, got {port_s!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0-65535, got {port}")
    return HostPort(host, port)


def _parse_postgres_url(raw: str) -> Secret:
    parts = urlsplit(raw)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError("expected a postgresql:// URL, e.g. postgresql://user:password@host:5432/dbname")
    return Secret(raw)


def _parse_redis_url(raw: str) -> Secret:
    parts = urlsplit(raw)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError("expected a redis:// or rediss:// URL, e.g. redis://127.0.0.1:6379/0")
    return Secret(raw)


def _parse_token(raw: str) -> Secret:
    if len(raw) < MIN_TOKEN_LENGTH:
        raise ValueError(f"must be at least {MIN_TOKEN_LENGTH} characters (use a random value)")
    if any(c.isspace() for c in raw) or not raw.isprintable():
        raise ValueError("must not contain whitespace or control characters")
    return Secret(raw)


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected 1/0/true/false, got {raw!r}")


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {raw!r}")
        return value

    return parse


def _parse_networks(raw: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    nets = []
    for item in raw.split(","):
        item = item.strip()
        if item:
            try:
                nets.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"not an IP address or CIDR network: {item!r}") from None
    return tuple(nets)


def _parse_workers(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"expected a positive integer, got {raw!r}") from None
    if not 1 <= value <= 256:
        raise ValueError(f"expected 1-256, got {value}")
    return value


def _int_range(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"expected an integer, got {raw!r}") from None
        if not low <= value <= high:
            raise ValueError(f"expected {low}-{high}, got {value}")
        return value

    return parse


def _parse_seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {raw!r}") from None
    if not 0.05 <= value <= 3600:
        raise ValueError(f"expected 0.05-3600 seconds, got {raw!r}")
    return value


def _parse_bytes(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"expected a number of bytes, got {raw!r}") from None
    if not 1024 <= value <= 2**40:
        raise ValueError(f"expected 1024 bytes to 1 TiB, got {value}")
    return value


def _parse_fraction(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"expected a number from 0 to 1, got {raw!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"expected a number from 0 to 1, got {raw!r}")
    return value


def _pem_file(kind: str) -> Callable[[str], Path]:
    """A readable PEM file holding a certificate (chain) or a private key."""

    def parse(raw: str) -> Path:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        path = Path(raw)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read {raw!r}: {exc.strerror}") from None
        try:
            if kind == "key":
                serialization.load_pem_private_key(data, password=None)
            else:
                x509.load_pem_x509_certificates(data)
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f"{raw!r} is not a PEM {'private key' if kind == 'key' else 'certificate'}: {exc}"
            ) from None
        return path

    return parse


def _check_cluster_tls(values: Mapping[str, Any]) -> None:
    """The certificate and key come together, and belong together."""
    cert, key = values["cluster_tls_cert"], values["cluster_tls_key"]
    if (cert is None) != (key is None):
        missing = "CLUSTER_TLS_KEY" if key is None else "CLUSTER_TLS_CERT"
        raise SettingsError(missing, "is required when the other of CLUSTER_TLS_CERT/CLUSTER_TLS_KEY is set")
    if cert is not None and key is not None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        public = x509.load_pem_x509_certificates(cert.read_bytes())[0].public_key()
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
        if private.public_key().public_bytes(serialization.Encoding.DER, spki) != public.public_bytes(
            serialization.Encoding.DER, spki
        ):
            raise SettingsError("CLUSTER_TLS_KEY", "is not the private key of the certificate in CLUSTER_TLS_CERT")


def _parse_node_id(raw: str) -> str:
    if not raw or len(raw) > 128 or not all(c.isalnum() or c in "-_.:" for c in raw):
        raise ValueError("expected 1-128 characters of letters, digits, '-', '_', '.', ':'")
    return raw


def _default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


# name → (parser, default or None when unset means None, help)
_SPECS: Final[dict[str, tuple[Callable[[str], Any], str | None, str]]] = {
    "DATABASE_URL": (_parse_postgres_url, None, "Postgres URL of the control plane's database"),
    "REDIS_URL": (_parse_redis_url, DEFAULT_REDIS_URL, "Redis URL for shared counters"),
    "REDIS_CLUSTER": (_parse_bool, "0", "1 when REDIS_URL points at a Redis Cluster"),
    "ADMIN_TOKEN": (_parse_token, None, "bootstrap admin token for the admin API"),
    "CLUSTER_TOKEN": (_parse_token, None, "shared secret data planes present to the control plane"),
    "CLUSTER_TOKEN_PREVIOUS": (
        _parse_token,
        None,
        "control plane: a second cluster token still accepted while data planes move to a new one",
    ),
    "CP_ADDR": (_parse_host_port, DEFAULT_CP_ADDR, "control plane gRPC address a data plane connects to"),
    "PROXY_LISTEN": (_parse_host_port, DEFAULT_PROXY_LISTEN, "data plane proxy listener"),
    "STATUS_LISTEN": (_parse_host_port, DEFAULT_STATUS_LISTEN, "data plane status listener"),
    "ADMIN_LISTEN": (_parse_host_port, DEFAULT_ADMIN_LISTEN, "control plane admin API listener"),
    "CLUSTER_LISTEN": (_parse_host_port, DEFAULT_CLUSTER_LISTEN, "control plane gRPC listener"),
    "DATA_DIR": (Path, DEFAULT_DATA_DIR, "directory for local state"),
    "LOG_LEVEL": (_choice(*LOG_LEVELS), DEFAULT_LOG_LEVEL, "log level"),
    "LOG_FORMAT": (_choice("json", "text"), DEFAULT_LOG_FORMAT, "log format"),
    "RATELIMIT_FAILURE_MODE": (
        _choice("open", "closed"),
        DEFAULT_RATELIMIT_FAILURE_MODE,
        "what the data plane does when Redis is unreachable",
    ),
    "RATELIMIT_TIMEOUT_MS": (
        _int_range(1, 10_000),
        DEFAULT_RATELIMIT_TIMEOUT_MS,
        "longest wait for Redis on one rate-limit decision before falling back",
    ),
    "RATELIMIT_MINUTE_S": (
        _int_range(1, 60),
        DEFAULT_RATELIMIT_MINUTE_S,
        "length of a rate-limit minute in seconds (hour = 60 of them); below 60 only for tests",
    ),
    "NODE_ID": (_parse_node_id, None, "this node's id (default: hostname-pid)"),
    "TRUSTED_PROXIES": (_parse_networks, "", "CIDRs whose X-Forwarded-* headers are trusted"),
    "WORKERS": (_parse_workers, None, "worker processes (default: CPU count)"),
    "USAGE_FLUSH_INTERVAL_S": (_parse_seconds, "5", "seconds between a data plane's usage reports"),
    "USAGE_SPOOL_MAX_BYTES": (
        _parse_bytes,
        str(64 * 1024 * 1024),
        "bound of a data plane node's on-disk spool of unsent usage batches",
    ),
    "METRICS_TENANT_LABELS": (_parse_bool, "0", "1 to label data plane request metrics with tenant ids"),
    "ACCESS_LOG": (_parse_bool, "on", "on/off: one JSON line per request on the data plane's stdout"),
    "ACCESS_LOG_SAMPLE": (_parse_fraction, "1", "fraction of requests (0-1) written to the access log"),
    "DRAIN_TIMEOUT_S": (_parse_seconds, "10", "seconds a data plane lets requests in flight finish after SIGTERM"),
    "CLUSTER_TLS_CERT": (_pem_file("cert"), None, "control plane: PEM certificate (chain) for TLS on the cluster port"),
    "CLUSTER_TLS_KEY": (_pem_file("key"), None, "control plane: PEM private key of CLUSTER_TLS_CERT"),
    "CLUSTER_TLS_CA": (
        _pem_file("cert"),
        None,
        "data plane: PEM CA that signs the control plane's cluster certificate",
    ),
    "UPSTREAM_CA_FILE": (
        _pem_file("cert"),
        None,
        "data plane: PEM CA certificates trusted for HTTPS upstreams besides the system's",
    ),
}


def _flag(name: str) -> str:
    return name.lower().replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--flag`` per setting to ``parser`` (values stay raw strings until :func:`load`)."""
    group = parser.add_argument_group("settings (each also TENANTGATE_<NAME> in the environment)")
    for name, (_, _, help_text) in _SPECS.items():
        group.add_argument(f"--{_flag(name)}", dest=f"setting_{name}", metavar=name, help=help_text)


def load(
    args: argparse.Namespace | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    require: Sequence[str] = (),
) -> Settings:
    """Build the settings from flags (``args``, from a parser prepared by :func:`add_arguments`)
    and the environment. ``require`` names settings that have no default but this role needs."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    explicit: set[str] = set()
    for name, (parse, default, _) in _SPECS.items():
        raw = getattr(args, f"setting_{name}", None) if args is not None else None
        if raw is None:
            raw = env.get(ENV_PREFIX + name)
        if raw:
            explicit.add(name)
        if raw is None or raw == "":
            if name in require:
                raise SettingsError(name, "is required and not set")
            raw = default
        if raw is None:
            values[name.lower()] = None
            continue
        try:
            values[name.lower()] = parse(raw)
        except ValueError as exc:
            raise SettingsError(name, str(exc)) from None
    if values["node_id"] is None:
        values["node_id"] = _default_node_id()
    if values["workers"] is None:
        values["workers"] = max(1, os.cpu_count() or 1)
    _check_cluster_tls(values)
    return Settings(**values, explicit=frozenset(explicit))


def to_environ(settings: Settings, *, exclude: Sequence[str] = ()) -> dict[str, str]:
    """The environment that recreates ``settings`` in a child process (secrets revealed).
    ``exclude`` names settings the child should decide for itself (e.g. ``NODE_ID``)."""
    env: dict[str, str] = {}
    skip = {name.lower() for name in exclude}
    for f in fields(Settings):
        value = getattr(settings, f.name)
        if value is None or f.name in skip or f.name == "explicit":
            continue
        if isinstance(value, Secret):
            text = value.reveal()
        elif isinstance(value, bool):
            text = "1" if value else "0"
        elif isinstance(value, tuple):
            text = ",".join(str(v) for v in value)
        else:
            text = str(value)
        env[ENV_PREFIX + f.name.upper()] = text
    return env


@contextmanager
def exit_on_bad_settings(program: str = "tenantgate") -> Iterator[None]:
    """Turn a :class:`SettingsError` into one line on stderr and exit code 2."""
    try:
        yield
    except SettingsError as exc:
        _die(program, str(exc))


def _die(program: str, message: str) -> NoReturn:
    print(f"{program}: invalid setting {message}", file=sys.stderr)
    raise SystemExit(2)
