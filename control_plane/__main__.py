"""Entry point: ``python -m control_plane [serve|migrate] [--flags]``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from control_plane import app
from control_plane.errors import StoreUnavailable
from shared import logging as tg_logging
from shared import settings as tg_settings

log = logging.getLogger("control_plane")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tenantgate control-plane", description="Run a control plane replica.")
    parser.add_argument("command", nargs="?", choices=("serve", "migrate"), default="serve")
    tg_settings.add_arguments(parser)
    args = parser.parse_args(argv)
    required = ("DATABASE_URL",) if args.command == "migrate" else ("DATABASE_URL", "ADMIN_TOKEN", "CLUSTER_TOKEN")
    with tg_settings.exit_on_bad_settings():
        settings = tg_settings.load(args, require=required)
    tg_logging.setup("control-plane", settings.log_level, settings.log_format)
    try:
        if args.command == "migrate":
            count = asyncio.run(app.run_migrations(settings))
            print(f"migrations: {count} applied, schema up to date")
        else:
            asyncio.run(app.serve(settings))
    except (StoreUnavailable, OSError) as exc:
        print(f"tenantgate control-plane: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
