"""Entry point: ``python -m data_plane [--workers N] [--flags]``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from data_plane import server
from shared import logging as tg_logging
from shared import settings as tg_settings

log = logging.getLogger("data_plane")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tenantgate data-plane", description="Run a data plane node.")
    tg_settings.add_arguments(parser)
    # Internal: set by the supervisor on the workers it starts.
    parser.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--metrics-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    with tg_settings.exit_on_bad_settings():
        settings = tg_settings.load(args, require=("CLUSTER_TOKEN",))
    tg_logging.setup("data-plane", settings.log_level, settings.log_format)
    if settings.workers > 1:
        try:
            return server.supervise(settings, ["--reuse-port"])
        except OSError as exc:  # e.g. DATA_DIR not writable for the workers' metrics
            print(f"tenantgate data-plane: {exc}", file=sys.stderr)
            return 1
    try:
        server.run_event_loop(
            lambda: server.run_worker(settings, reuse_port=args.reuse_port, metrics_dir=args.metrics_dir)
        )
    except OSError as exc:
        print(f"tenantgate data-plane: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
