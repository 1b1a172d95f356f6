"""deploy/grafana: the dashboard is valid JSON and every metric it queries is one the code defines."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
_METRIC = re.compile(r"\btenantgate_[a-z0-9_]+")
_SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def _defined_names() -> set[str]:
    names = set()
    for package in ("control_plane", "data_plane", "shared"):
        for path in (ROOT / package).rglob("*.py"):
            names.update(re.findall(r"[\"'](tenantgate_[a-z0-9_]+)[\"']", path.read_text()))
    return names


def test_every_dashboard_query_names_a_defined_metric() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "tenantgate.json").read_text())
    defined = _defined_names()
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel.get("targets", ())
        for name in _METRIC.findall(target["expr"])
    }
    assert queried
    for name in queried:
        base = next(
            (name.removesuffix(s) for s in _SUFFIXES if name.endswith(s) and name.removesuffix(s) in defined), name
        )
        assert base in defined, f"the dashboard queries {name}, which no module defines"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
