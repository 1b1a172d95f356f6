"""The container image's HEALTHCHECK: is the role running in this container ready?

The image runs either plane, so the check reads the running command (PID 1's command line:
``python -m control_plane serve`` or ``python -m data_plane --workers 2``) to learn the role,
then builds that role's settings exactly as the role did (the same flags and ``TENANTGATE_*``
variables, through ``shared.settings``) to find where it listens:

- data plane: ``GET /readyz`` on ``STATUS_LISTEN`` (200 once a configuration snapshot is loaded);
- control plane: ``GET /readyz`` on ``ADMIN_LISTEN`` (200 while Postgres is reachable);
- migrate: a one-shot job, healthy while it runs.

Exit code 0 when ready, 1 otherwise (Docker's contract), with one line saying why.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from shared import settings as tg_settings
from shared.settings import HostPort

TIMEOUT_S = 2.0
_ROLES = ("control_plane", "data_plane")


def role_of(cmdline: Sequence[str]) -> tuple[str, list[str]]:
    """The role (``control_plane``, ``data_plane`` or ``migrate``) and its flags, from a
    command line such as ``python -m data_plane --workers 2``."""
    if "-m" not in cmdline:
        raise ValueError(f"not a tenantgate role: {' '.join(cmdline)!r}")
    at = list(cmdline).index("-m")
    module, rest = cmdline[at + 1] if at + 1 < len(cmdline) else "", list(cmdline[at + 2 :])
    if module not in _ROLES:
        raise ValueError(f"not a tenantgate role: {' '.join(cmdline)!r}")
    if module == "control_plane" and rest[:1] == ["migrate"]:
        return "migrate", rest[1:]
    if module == "control_plane" and rest[:1] == ["serve"]:
        rest = rest[1:]
    return module, rest


def ready_url(cmdline: Sequence[str], environ: Mapping[str, str]) -> str | None:
    """The readiness URL of the role ``cmdline`` runs, or None for a one-shot role."""
    role, flags = role_of(cmdline)
    if role == "migrate":
        return None
    parser = argparse.ArgumentParser(add_help=False)
    tg_settings.add_arguments(parser)
    args, _ = parser.parse_known_args(flags)
    settings = tg_settings.load(args, environ)
    addr = settings.status_listen if role == "data_plane" else settings.admin_listen
    return f"http://{_reachable(addr)}/readyz"


def _reachable(addr: HostPort) -> HostPort:
    """A wildcard listen address is reached on loopback."""
    if addr.host in ("", "0.0.0.0"):
        return HostPort("127.0.0.1", addr.port)
    if addr.host == "::":
        return HostPort("::1", addr.port)
    return addr


def check(cmdline: Sequence[str], environ: Mapping[str, str]) -> tuple[bool, str]:
    """(ready, why) for the role ``cmdline`` runs."""
    try:
        url = ready_url(cmdline, environ)
    except (ValueError, tg_settings.SettingsError) as exc:
        return False, str(exc)
    if url is None:
        return True, "one-shot role"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:  # noqa: S310 - our own listener
            return resp.status == 200, f"{url}: {resp.status}"
    except urllib.error.HTTPError as exc:
        return False, f"{url}: {exc.code}"
    except OSError as exc:
        return False, f"{url}: {exc}"


def main() -> int:
    cmdline = Path("/proc/1/cmdline").read_bytes().decode(errors="replace").split("\0")
    ready, why = check([part for part in cmdline if part], os.environ)
    print(("ready: " if ready else "not ready: ") + why)
    return 0 if ready else 1


if __name__ == "__main__":
    sys.exit(main())
