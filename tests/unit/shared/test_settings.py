"""shared.settings: parsing, precedence, required settings, errors, secrets, to_environ."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
from dataclasses import fields
from pathlib import Path

import pytest

from shared import settings
from shared.settings import HostPort, Secret, Settings, SettingsError

pytestmark = pytest.mark.unit

TOKEN = "0123456789abcdef-token"  # 22 printable ASCII characters, no whitespace
OTHER_TOKEN = "fedcba9876543210-other"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tenantgate")
    settings.add_arguments(parser)
    return parser


def _load(env: dict[str, str] | None = None, argv: list[str] | None = None, **kwargs: object) -> Settings:
    """Load from an explicit environment (never the real one) and optional CLI flags."""
    args = _parser().parse_args(argv) if argv is not None else None
    return settings.load(args, environ=env or {}, **kwargs)  # type: ignore[arg-type]


def _env(**values: str) -> dict[str, str]:
    return {settings.ENV_PREFIX + name: value for name, value in values.items()}


def _values(s: Settings) -> dict[str, object]:
    """The setting values only (not bookkeeping such as which ones were explicit)."""
    return {f.name: getattr(s, f.name) for f in fields(s) if f.name != "explicit"}


# --- defaults ---


def test_defaults_when_nothing_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    s = _load()
    assert s.database_url is None
    assert s.redis_url == Secret("redis://127.0.0.1:6379/0")
    assert s.redis_cluster is False
    assert s.admin_token is None
    assert s.cluster_token is None
    assert s.cp_addr == HostPort("127.0.0.1", 8005)
    assert s.proxy_listen == HostPort("0.0.0.0", 8000)
    assert s.status_listen == HostPort("0.0.0.0", 8100)
    assert s.admin_listen == HostPort("127.0.0.1", 8001)
    assert s.cluster_listen == HostPort("0.0.0.0", 8005)
    assert s.data_dir == Path("./.tenantgate")
    assert s.log_level == "info"
    assert s.log_format == "json"
    assert s.ratelimit_failure_mode == "open"
    assert s.trusted_proxies == ()
    assert s.workers == 6


def test_default_node_id_is_hostname_dash_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "host-a")
    assert _load().node_id == f"host-a-{os.getpid()}"


def test_default_workers_is_one_when_cpu_count_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert _load().workers == 1


def test_empty_environment_value_counts_as_unset() -> None:
    s = _load(_env(CP_ADDR="", LOG_LEVEL=""))
    assert s.cp_addr == HostPort("127.0.0.1", 8005)
    assert s.log_level == "info"


# --- parsing of each kind ---


def test_host_port_is_parsed() -> None:
    assert _load(_env(CP_ADDR="cp.internal:9005")).cp_addr == HostPort("cp.internal", 9005)


def test_host_port_accepts_bracketed_ipv6() -> None:
    s = _load(_env(PROXY_LISTEN="[::1]:8080"))
    assert s.proxy_listen == HostPort("::1", 8080)
    assert str(s.proxy_listen) == "[::1]:8080"


def test_host_port_str_is_host_colon_port() -> None:
    assert str(HostPort("10.0.0.1", 80)) == "10.0.0.1:80"


@pytest.mark.parametrize("port", ["0", "65535"])
def test_host_port_accepts_port_range_bounds(port: str) -> None:
    assert _load(_env(STATUS_LISTEN=f"h:{port}")).status_listen == HostPort("h", int(port))


def test_postgres_url_accepts_both_schemes() -> None:
    a = _load(_env(DATABASE_URL="postgres://u:p@db:5432/tg")).database_url
    b = _load(_env(DATABASE_URL="postgresql://u:p@db:5432/tg")).database_url
    assert a is not None and a.reveal() == "postgres://u:p@db:5432/tg"
    assert b is not None and b.reveal() == "postgresql://u:p@db:5432/tg"


@pytest.mark.parametrize("url", ["redis://r:6379/1", "rediss://r:6380/0", "unix:///tmp/redis.sock"])
def test_redis_url_accepts_redis_rediss_and_unix(url: str) -> None:
    assert _load(_env(REDIS_URL=url)).redis_url.reveal() == url


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", "yes", "on", " On "])
def test_bool_true_spellings(raw: str) -> None:
    assert _load(_env(REDIS_CLUSTER=raw)).redis_cluster is True


@pytest.mark.parametrize("raw", ["0", "false", "False", "no", "off"])
def test_bool_false_spellings(raw: str) -> None:
    assert _load(_env(REDIS_CLUSTER=raw)).redis_cluster is False


def test_tokens_are_wrapped_in_secret() -> None:
    s = _load(_env(ADMIN_TOKEN=TOKEN, CLUSTER_TOKEN=OTHER_TOKEN))
    assert isinstance(s.admin_token, Secret)
    assert s.admin_token.reveal() == TOKEN
    assert isinstance(s.cluster_token, Secret)
    assert s.cluster_token.reveal() == OTHER_TOKEN


def test_token_of_exactly_minimum_length_is_accepted() -> None:
    token = "x" * settings.MIN_TOKEN_LENGTH
    s = _load(_env(ADMIN_TOKEN=token))
    assert s.admin_token is not None
    assert s.admin_token.reveal() == token


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("LOG_LEVEL", "DEBUG", "debug"),
        ("LOG_LEVEL", "warning", "warning"),
        ("LOG_FORMAT", "Text", "text"),
        ("RATELIMIT_FAILURE_MODE", " closed ", "closed"),
    ],
)
def test_choices_are_normalised_to_lower_case(name: str, raw: str, expected: str) -> None:
    assert getattr(_load(_env(**{name: raw})), name.lower()) == expected


def test_trusted_proxies_parses_addresses_and_networks() -> None:
    s = _load(_env(TRUSTED_PROXIES=" 10.0.0.0/8, 192.168.1.7 ,,2001:db8::/32"))
    assert s.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.168.1.7/32"),
        ipaddress.ip_network("2001:db8::/32"),
    )


def test_trusted_proxies_host_bits_are_masked() -> None:
    assert _load(_env(TRUSTED_PROXIES="10.1.2.3/8")).trusted_proxies == (ipaddress.ip_network("10.0.0.0/8"),)


@pytest.mark.parametrize("raw", ["1", "256"])
def test_workers_bounds_are_accepted(raw: str) -> None:
    assert _load(_env(WORKERS=raw)).workers == int(raw)


def test_node_id_accepts_allowed_characters() -> None:
    assert _load(_env(NODE_ID="dp-1_eu.west:a")).node_id == "dp-1_eu.west:a"


def test_data_dir_is_a_path() -> None:
    assert _load(_env(DATA_DIR="/var/lib/tg")).data_dir == Path("/var/lib/tg")


# --- precedence ---


def test_flag_beats_environment() -> None:
    s = _load(_env(CP_ADDR="env-host:1", LOG_LEVEL="error"), ["--cp-addr", "flag-host:2"])
    assert s.cp_addr == HostPort("flag-host", 2)
    # A setting without a flag still comes from the environment.
    assert s.log_level == "error"


def test_flag_is_used_without_environment() -> None:
    s = _load({}, ["--admin-token", TOKEN, "--redis-cluster", "yes", "--workers", "3"])
    assert s.admin_token == Secret(TOKEN)
    assert s.redis_cluster is True
    assert s.workers == 3


ALL_SETTINGS = (
    "DATABASE_URL",
    "REDIS_URL",
    "REDIS_CLUSTER",
    "ADMIN_TOKEN",
    "CLUSTER_TOKEN",
    "CP_ADDR",
    "PROXY_LISTEN",
    "STATUS_LISTEN",
    "ADMIN_LISTEN",
    "CLUSTER_LISTEN",
    "DATA_DIR",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "RATELIMIT_FAILURE_MODE",
    "NODE_ID",
    "TRUSTED_PROXIES",
    "WORKERS",
)


@pytest.mark.parametrize("name", ALL_SETTINGS)
def test_every_setting_has_a_flag(name: str) -> None:
    flag = "--" + name.lower().replace("_", "-")
    args = _parser().parse_args([flag, "some-value"])
    assert getattr(args, f"setting_{name}") == "some-value"


def test_bad_flag_value_beats_good_environment_and_is_reported() -> None:
    with pytest.raises(SettingsError) as exc_info:
        _load(_env(WORKERS="2"), ["--workers", "zero"])
    assert exc_info.value.name == "WORKERS"


# --- required settings ---


def test_required_setting_missing_raises_naming_it() -> None:
    with pytest.raises(SettingsError) as exc_info:
        _load({}, require=("CLUSTER_TOKEN",))
    assert exc_info.value.name == "CLUSTER_TOKEN"
    assert str(exc_info.value) == "TENANTGATE_CLUSTER_TOKEN (--cluster-token): is required and not set"


def test_required_setting_empty_counts_as_missing() -> None:
    with pytest.raises(SettingsError) as exc_info:
        _load(_env(DATABASE_URL=""), require=("DATABASE_URL",))
    assert str(exc_info.value).startswith("TENANTGATE_DATABASE_URL (--database-url): ")


def test_required_setting_present_loads() -> None:
    s = _load(_env(CLUSTER_TOKEN=TOKEN), require=("CLUSTER_TOKEN",))
    assert s.cluster_token == Secret(TOKEN)


def test_required_setting_given_by_flag_loads() -> None:
    s = _load({}, ["--database-url", "postgresql://db/tg"], require=("DATABASE_URL",))
    assert s.database_url == Secret("postgresql://db/tg")


# --- bad values ---


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("DATABASE_URL", "mysql://db/tg"),
        ("DATABASE_URL", "db:5432"),
        ("REDIS_URL", "http://r:6379"),
        ("REDIS_URL", "127.0.0.1:6379"),
        ("REDIS_CLUSTER", "maybe"),
        ("ADMIN_TOKEN", "short"),
        ("ADMIN_TOKEN", "x" * (settings.MIN_TOKEN_LENGTH - 1)),
        ("ADMIN_TOKEN", "0123456789abcdef with space"),
        ("CLUSTER_TOKEN", "0123456789abcdef\tx"),
        ("CLUSTER_TOKEN", "0123456789abcdef\x01x"),
        ("CP_ADDR", "no-port"),
        ("CP_ADDR", ":8005"),
        ("CP_ADDR", "host:"),
        ("PROXY_LISTEN", "host:http"),
        ("STATUS_LISTEN", "host:65536"),
        ("ADMIN_LISTEN", "host:-1"),
        ("CLUSTER_LISTEN", "[::1]"),
        ("LOG_LEVEL", "verbose"),
        ("LOG_FORMAT", "xml"),
        ("RATELIMIT_FAILURE_MODE", "half"),
        ("NODE_ID", "has space"),
        ("NODE_ID", "slash/no"),
        ("NODE_ID", "n" * 129),
        ("TRUSTED_PROXIES", "10.0.0.0/8,not-an-ip"),
        ("TRUSTED_PROXIES", "10.0.0.0/33"),
        ("WORKERS", "0"),
        ("WORKERS", "257"),
        ("WORKERS", "two"),
        ("WORKERS", "1.5"),
    ],
)
def test_bad_value_raises_settings_error_naming_the_setting(name: str, raw: str) -> None:
    with pytest.raises(SettingsError) as exc_info:
        _load(_env(**{name: raw}))
    assert exc_info.value.name == name
    flag = name.lower().replace("_", "-")
    assert str(exc_info.value).startswith(f"TENANTGATE_{name} (--{flag}): ")


def test_bad_value_message_says_what_was_expected() -> None:
    with pytest.raises(SettingsError) as exc_info:
        _load(_env(WORKERS="257"))
    assert str(exc_info.value) == "TENANTGATE_WORKERS (--workers): expected 1-256, got 257"


def test_bad_value_error_has_no_chained_cause() -> None:
    with pytest.raises(SettingsError) as exc_info:
        _load(_env(STATUS_LISTEN="h:x"))
    assert exc_info.value.__cause__ is None
    assert exc_info.value.__suppress_context__ is True


def test_bad_secret_value_is_not_echoed_in_the_error() -> None:
    with pytest.raises(SettingsError) as exc_info:
        _load(_env(ADMIN_TOKEN="tooshort-secret"))
    assert "tooshort-secret" not in str(exc_info.value)


def test_exit_on_bad_settings_prints_one_line_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc_info, settings.exit_on_bad_settings("tg-test"):
        _load(_env(LOG_FORMAT="xml"))
    assert exc_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "tg-test: invalid setting TENANTGATE_LOG_FORMAT (--log-format): expected one of json, text, got 'xml'\n"
    )


def test_exit_on_bad_settings_lets_good_code_through() -> None:
    with settings.exit_on_bad_settings():
        s = _load()
    assert s.log_format == "json"


# --- Secret ---


def test_secret_repr_and_str_hide_the_value() -> None:
    secret = Secret("hunter2-hunter2-hunter2")
    assert repr(secret) == "Secret('**********')"
    assert str(secret) == "Secret('**********')"
    assert f"{secret}" == "Secret('**********')"
    assert secret.reveal() == "hunter2-hunter2-hunter2"


def test_settings_repr_does_not_leak_secrets() -> None:
    s = _load(_env(ADMIN_TOKEN=TOKEN, CLUSTER_TOKEN=OTHER_TOKEN, DATABASE_URL="postgresql://u:pw-xyz@db/tg"))
    text = repr(s)
    assert TOKEN not in text
    assert OTHER_TOKEN not in text
    assert "pw-xyz" not in text
    assert "Secret('**********')" in text


def test_secret_equality_compares_values() -> None:
    assert Secret("abc") == Secret("abc")
    assert Secret("abc") != Secret("abd")
    assert Secret("abc") != "abc"
    assert hash(Secret("abc")) == hash(Secret("abc"))


def test_secret_equality_with_non_ascii_value() -> None:
    # _parse_token accepts any printable characters, so such a Secret can come from the environment.
    s = _load(_env(ADMIN_TOKEN="pässwörd-pässwörd"))
    assert s.admin_token == Secret("pässwörd-pässwörd")


# --- to_environ ---


def test_to_environ_round_trips_every_setting_through_load() -> None:
    env = _env(
        DATABASE_URL="postgresql://u:p@db:5432/tg",
        REDIS_URL="rediss://r:6380/2",
        REDIS_CLUSTER="1",
        ADMIN_TOKEN=TOKEN,
        CLUSTER_TOKEN=OTHER_TOKEN,
        CP_ADDR="cp:9005",
        PROXY_LISTEN="[::]:8000",
        STATUS_LISTEN="0.0.0.0:8100",
        ADMIN_LISTEN="127.0.0.1:8001",
        CLUSTER_LISTEN="[::1]:8005",
        DATA_DIR="/var/lib/tenantgate",
        LOG_LEVEL="debug",
        LOG_FORMAT="text",
        RATELIMIT_FAILURE_MODE="closed",
        NODE_ID="dp-7",
        TRUSTED_PROXIES="10.0.0.0/8,2001:db8::/32",
        WORKERS="4",
        USAGE_FLUSH_INTERVAL_S="0.5",
        USAGE_SPOOL_MAX_BYTES="4096",
        METRICS_TENANT_LABELS="1",
        ACCESS_LOG="off",
        ACCESS_LOG_SAMPLE="0.25",
        DRAIN_TIMEOUT_S="10",
        RATELIMIT_MINUTE_S="60",
        RATELIMIT_TIMEOUT_MS="25",
    )
    original = _load(env)
    exported = settings.to_environ(original)
    assert exported == {
        "TENANTGATE_DATABASE_URL": "postgresql://u:p@db:5432/tg",
        "TENANTGATE_REDIS_URL": "rediss://r:6380/2",
        "TENANTGATE_REDIS_CLUSTER": "1",
        "TENANTGATE_ADMIN_TOKEN": TOKEN,
        "TENANTGATE_CLUSTER_TOKEN": OTHER_TOKEN,
        "TENANTGATE_CP_ADDR": "cp:9005",
        "TENANTGATE_PROXY_LISTEN": "[::]:8000",
        "TENANTGATE_STATUS_LISTEN": "0.0.0.0:8100",
        "TENANTGATE_ADMIN_LISTEN": "127.0.0.1:8001",
        "TENANTGATE_CLUSTER_LISTEN": "[::1]:8005",
        "TENANTGATE_DATA_DIR": "/var/lib/tenantgate",
        "TENANTGATE_LOG_LEVEL": "debug",
        "TENANTGATE_LOG_FORMAT": "text",
        "TENANTGATE_RATELIMIT_FAILURE_MODE": "closed",
        "TENANTGATE_NODE_ID": "dp-7",
        "TENANTGATE_TRUSTED_PROXIES": "10.0.0.0/8,2001:db8::/32",
        "TENANTGATE_WORKERS": "4",
        "TENANTGATE_USAGE_FLUSH_INTERVAL_S": "0.5",
        "TENANTGATE_USAGE_SPOOL_MAX_BYTES": "4096",
        "TENANTGATE_METRICS_TENANT_LABELS": "1",
        "TENANTGATE_ACCESS_LOG": "0",
        "TENANTGATE_ACCESS_LOG_SAMPLE": "0.25",
        "TENANTGATE_DRAIN_TIMEOUT_S": "10.0",
        "TENANTGATE_RATELIMIT_MINUTE_S": "60",
        "TENANTGATE_RATELIMIT_TIMEOUT_MS": "25",
    }
    assert _load(exported) == original


def test_to_environ_round_trips_defaults_through_load() -> None:
    original = _load(_env(NODE_ID="dp-1", WORKERS="2"))
    exported = settings.to_environ(original)
    # Unset optional settings are left out rather than exported empty.
    assert "TENANTGATE_DATABASE_URL" not in exported
    assert "TENANTGATE_ADMIN_TOKEN" not in exported
    assert "TENANTGATE_CLUSTER_TOKEN" not in exported
    assert exported["TENANTGATE_REDIS_CLUSTER"] == "0"
    assert exported["TENANTGATE_TRUSTED_PROXIES"] == ""
    assert _values(_load(exported)) == _values(original)


def test_to_environ_exclude_leaves_settings_out() -> None:
    original = _load(_env(NODE_ID="dp-1", WORKERS="2"))
    exported = settings.to_environ(original, exclude=("NODE_ID", "WORKERS"))
    assert "TENANTGATE_NODE_ID" not in exported
    assert "TENANTGATE_WORKERS" not in exported
    assert exported["TENANTGATE_CP_ADDR"] == "127.0.0.1:8005"


def test_to_environ_only_emits_prefixed_names() -> None:
    exported = settings.to_environ(_load(_env(NODE_ID="dp-1", WORKERS="2")))
    assert all(name.startswith("TENANTGATE_") for name in exported)
    assert all(isinstance(value, str) for value in exported.values())
