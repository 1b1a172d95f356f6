"""The ``tenantgate`` console script.

``control-plane``, ``data-plane`` and ``migrate`` replace this process with the role's own
entry point (``python -m control_plane`` / ``python -m data_plane``), so what an operator
runs is exactly what ``up`` runs. This module imports neither plane.
"""

from __future__ import annotations

import argparse
import os
import sys

from shared import settings as tg_settings

USAGE = """usage: tenantgate COMMAND [options]

commands:
  up [--demo] [--workers N]   the whole gateway on this machine (embedded Postgres and Redis
                              unless TENANTGATE_DATABASE_URL / TENANTGATE_REDIS_URL are set)
  control-plane               one control plane replica (admin API + cluster gRPC)
  data-plane [--workers N]    one data plane node
  migrate                     apply database migrations and exit

Every command takes the settings as flags or TENANTGATE_* variables; see
`tenantgate COMMAND --help`.
"""

_ROLES = {
    "control-plane": ["-m", "control_plane", "serve"],
    "migrate": ["-m", "control_plane", "migrate"],
    "data-plane": ["-m", "data_plane"],
}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command in _ROLES:
        os.execv(sys.executable, [sys.executable, *_ROLES[command], *rest])  # noqa: S606
    if command == "up":
        return _up(rest)
    print(f"tenantgate: unknown command {command!r}\n\n{USAGE}", file=sys.stderr, end="")
    return 2


def _up(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tenantgate up", description="Run the whole gateway on this machine; Ctrl-C stops it."
    )
    parser.add_argument(
        "--demo", action="store_true", help="also start an echo upstream, a demo tenant and route"
    )
    tg_settings.add_arguments(parser)
    args = parser.parse_args(argv)
    with tg_settings.exit_on_bad_settings():
        settings = tg_settings.load(args)
    from shared import supervisor

    return supervisor.run(settings, demo=args.demo)


if __name__ == "__main__":
    sys.exit(main())
