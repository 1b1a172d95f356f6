"""data_plane.accesslog: JSON lines written off the request path, sampled, without secrets."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from data_plane.accesslog import AccessLog
from shared import settings as tg_settings

pytestmark = pytest.mark.unit


def _log(tmp_path: Path, **env: str) -> tuple[AccessLog, Path]:
    settings = tg_settings.load(environ={"TENANTGATE_NODE_ID": "node-1", **env})
    path = tmp_path / "access.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    return AccessLog(settings, fd=fd, rng=random.Random(7)), path


async def test_one_json_line_per_request_without_the_query(tmp_path: Path) -> None:
    log, path = _log(tmp_path)
    assert log.enabled
    log.record("rid-1", "tenant-1", "route-1", "GET", "/a/b?api_key=sekrit&x=1", 200, 12.3456, 10.0, 5, 42)
    log.record("rid-2", None, None, "POST", "/nowhere", 404, 0.5, None, 0, 90)
    assert path.read_bytes() == b""  # nothing written on the request path
    await log.flush()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["request_id"] for e in lines] == ["rid-1", "rid-2"]
    first = lines[0]
    assert first["path"] == "/a/b" and "sekrit" not in path.read_text()
    assert (first["tenant_id"], first["route_id"], first["status"]) == ("tenant-1", "route-1", 200)
    assert (first["duration_ms"], first["upstream_ms"], first["bytes_in"], first["bytes_out"]) == (12.346, 10.0, 5, 42)
    assert first["type"] == "access" and first["node_id"] == "node-1" and first["ts"].endswith("Z")
    assert lines[1]["tenant_id"] is None and lines[1]["upstream_ms"] is None


async def test_sampling_keeps_about_the_fraction_asked(tmp_path: Path) -> None:
    log, path = _log(tmp_path, TENANTGATE_ACCESS_LOG_SAMPLE="0.25")
    for i in range(2000):
        log.record(f"r{i}", None, None, "GET", "/", 200, 1.0, None, 0, 0)
    await log.flush()
    kept = len(path.read_text().splitlines())
    assert 400 <= kept <= 600


def test_off_or_zero_sample_disables_it(tmp_path: Path) -> None:
    assert not _log(tmp_path, TENANTGATE_ACCESS_LOG="off")[0].enabled
    assert not _log(tmp_path, TENANTGATE_ACCESS_LOG_SAMPLE="0")[0].enabled


def test_bad_settings_name_themselves() -> None:
    with pytest.raises(tg_settings.SettingsError, match="ACCESS_LOG_SAMPLE"):
        tg_settings.load(environ={"TENANTGATE_ACCESS_LOG_SAMPLE": "1.5"})
    with pytest.raises(tg_settings.SettingsError, match="USAGE_FLUSH_INTERVAL_S"):
        tg_settings.load(environ={"TENANTGATE_USAGE_FLUSH_INTERVAL_S": "soon"})
    with pytest.raises(tg_settings.SettingsError, match="USAGE_SPOOL_MAX_BYTES"):
        tg_settings.load(environ={"TENANTGATE_USAGE_SPOOL_MAX_BYTES": "10"})


async def test_hostile_values_stay_one_valid_json_line_each(tmp_path: Path) -> None:
    log, path = _log(tmp_path)
    nasty = '/a"b\\c\n\x00\u2028é/%22'
    log.record('rid"\n', 'tenant"x', "route\\y", 'G"ET\r\n', nasty + "?q=1", 400, 0.1234, 2.0, 0, 0)
    log.record("rid-2", None, None, "GET", "/", 200, 1.0, None, 0, 0)
    await log.flush()
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["path"] == nasty and first["method"] == 'G"ET\r\n' and first["request_id"] == 'rid"\n'
    assert (first["tenant_id"], first["route_id"], first["duration_ms"]) == ('tenant"x', "route\\y", 0.123)
    assert lines[0].isascii()


async def test_timestamps_follow_each_line_across_seconds(tmp_path: Path) -> None:
    log, path = _log(tmp_path)
    log._pending = [  # two lines a second apart, formatted in one flush
        (1_700_000_000.5, "r1", None, None, "GET", "/", 200, 1.0, None, 0, 0),
        (1_700_000_001.25, "r2", None, None, "GET", "/", 200, 1.0, None, 0, 0),
    ]
    await log.flush()
    stamps = [json.loads(line)["ts"] for line in path.read_text().splitlines()]
    assert stamps == ["2023-11-14T22:13:20.500Z", "2023-11-14T22:13:21.250Z"]
