"""The ``tenantgate`` console script.

``control-plane``, ``data-plane`` and ``migrate`` replace this process with the role's own
entry point (``python -m control_plane`` / ``python -m data_plane``), so what an operator
runs is exactly what ``up`` runs. This module imports neither plane.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
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
  apply -f FILE [--dry-run]   make tenants and routes match a YAML file, through the admin API
                              (--dry-run: only show the changes)
  export                      print the tenants and routes as such a YAML file

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
    if command in ("apply", "export"):
        return _declarative(command, rest)
    print(f"tenantgate: unknown command {command!r}\n\n{USAGE}", file=sys.stderr, end="")
    return 2


def _up(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tenantgate up", description="Run the whole gateway on this machine; Ctrl-C stops it."
    )
    parser.add_argument("--demo", action="store_true", help="also start an echo upstream, a demo tenant and route")
    tg_settings.add_arguments(parser)
    args = parser.parse_args(argv)
    with tg_settings.exit_on_bad_settings():
        settings = _local_cluster_tls(tg_settings.load(args))
    from shared import supervisor

    return supervisor.run(settings, demo=args.demo)


def _local_cluster_tls(settings: tg_settings.Settings) -> tg_settings.Settings:
    """``up`` runs its data plane beside its control plane and connects it to 127.0.0.1. With
    TLS on the cluster port, that data plane trusts the control plane's own certificate
    unless CLUSTER_TLS_CA names another CA, so the certificate must name 127.0.0.1: refused
    here in one line rather than by a data plane that never becomes ready."""
    cert = settings.cluster_tls_cert
    if cert is None:
        return settings
    from cryptography import x509

    certificate = x509.load_pem_x509_certificates(cert.read_bytes())[0]
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        addresses = names.get_values_for_type(x509.IPAddress)
    except x509.ExtensionNotFound:
        addresses = []
    if ipaddress.ip_address("127.0.0.1") not in addresses:
        raise tg_settings.SettingsError(
            "CLUSTER_TLS_CERT",
            "must name 127.0.0.1 (an IP address in subjectAltName) for `tenantgate up`, whose data plane"
            " connects to the control plane there",
        )
    if settings.cluster_tls_ca is None:
        settings = dataclasses.replace(settings, cluster_tls_ca=cert)
    return settings


def _declarative(command: str, argv: list[str]) -> int:
    descriptions = {
        "apply": "Make the tenants and routes match a YAML file: show the changes, then make them.",
        "export": "Print the tenants and routes as a YAML file for `tenantgate apply`.",
    }
    parser = argparse.ArgumentParser(prog=f"tenantgate {command}", description=descriptions[command])
    if command == "apply":
        parser.add_argument("-f", "--file", required=True, metavar="FILE", help="the YAML file ('-': standard input)")
        parser.add_argument("--dry-run", action="store_true", help="only show the changes; change nothing")
    parser.add_argument(
        "--admin-url", metavar="URL", help="the admin API, e.g. http://127.0.0.1:8001 (default: from ADMIN_LISTEN)"
    )
    tg_settings.add_arguments(parser)
    args = parser.parse_args(argv)
    with tg_settings.exit_on_bad_settings():
        settings = tg_settings.load(args)
    from shared import declarative

    if settings.admin_token is None:
        print(
            f"tenantgate {command}: an admin token is required: set TENANTGATE_ADMIN_TOKEN or pass --admin-token",
            file=sys.stderr,
        )
        return 2
    try:
        url = declarative.admin_base_url(settings, args.admin_url)
    except declarative.UsageError as exc:
        print(f"tenantgate {command}: {exc}", file=sys.stderr)
        return 2
    client = declarative.AdminClient(url, settings.admin_token)
    if command == "apply":
        return declarative.run_apply(client, args.file, dry_run=args.dry_run)
    return declarative.run_export(client)


if __name__ == "__main__":
    sys.exit(main())
