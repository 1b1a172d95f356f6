"""nginx, when installed, in two roles: the fast upstream (a fixed small body from memory) and
a reverse proxy baseline (what a C proxy does on the same machine). One worker each, in the
foreground, all its files under the run's work directory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Final

from bench.upstream import BODY

_COMMON: Final = """
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
{user}
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 75s;
    client_max_body_size 0;
    server_tokens off;
{body}
}}
"""

_UPSTREAM: Final = """
    server {{
        listen {host}:{port} reuseport backlog=4096;
        default_type application/json;
        location / {{ return 200 '{body}'; }}
    }}
"""

_PROXY: Final = """
    upstream backend {{
        server {upstream};
        keepalive 256;
        keepalive_requests 10000000;
    }}
    server {{
        listen {host}:{port} reuseport backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
        }}
    }}
"""


def available() -> bool:
    return shutil.which("nginx") is not None


def write_config(prefix: Path, host: str, port: int, *, upstream: str | None) -> Path:
    """An nginx.conf under ``prefix``: the fixed-body upstream, or (``upstream`` given as
    HOST:PORT) a keep-alive reverse proxy to it."""
    prefix.mkdir(parents=True, exist_ok=True)
    if upstream is None:
        body = _UPSTREAM.format(host=host, port=port, body=BODY.decode().rstrip("\n"))
    else:
        body = _PROXY.format(host=host, port=port, upstream=upstream)
    # Workers of a root master run as "nobody" by default and could not write the temp dirs.
    user = "user root;" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(_COMMON.format(prefix=prefix, user=user, body=body))
    return conf


def command(conf: Path) -> list[str]:
    return ["nginx", "-c", str(conf), "-p", str(conf.parent)]
