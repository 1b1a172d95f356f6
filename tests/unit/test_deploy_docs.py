"""The operator docs stay true to the code: every setting documented with its real default,
every documented command and path real."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared import settings as tg_settings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def _settings_table() -> dict[str, tuple[str, str]]:
    """setting → (default cell, role cell) from docs/configuration.md's table."""
    rows = {}
    for line in (DOCS / "configuration.md").read_text().splitlines():
        match = re.match(r"^\| `([A-Z0-9_]+)` \| ([^|]*) \| ([^|]*) \|", line)
        if match:
            assert match.group(1) not in rows, f"{match.group(1)} documented twice"
            rows[match.group(1)] = (match.group(2).strip(), match.group(3).strip())
    return rows


def test_every_setting_is_documented_and_nothing_else() -> None:
    documented = set(_settings_table())
    real = set(tg_settings._SPECS)

    assert real - documented == set(), f"add to docs/configuration.md: {sorted(real - documented)}"
    assert documented - real == set(), f"not settings (any more): {sorted(documented - real)}"


@pytest.mark.parametrize("name", sorted(tg_settings._SPECS))
def test_documented_default_is_the_real_default(name: str) -> None:
    default_cell, role_cell = _settings_table()[name]
    default = tg_settings._SPECS[name][1]

    if default:
        assert default_cell == f"`{default}`", name
    else:
        assert default_cell.startswith("("), f"{name} has no default; the docs say {default_cell}"
    assert role_cell, name


def test_the_docs_pages_link_to_each_other_and_to_files_that_exist() -> None:
    for page in DOCS.glob("*.md"):
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_every_tenantgate_command_in_the_docs_exists() -> None:
    from shared.cli import _ROLES

    commands = set(_ROLES) | {"up", "apply", "export"}
    for page in DOCS.glob("*.md"):
        text = page.read_text()
        for used in re.findall(r"(?m)^(?:\$ )?tenantgate ([a-z][a-z-]*)|`tenantgate ([a-z][a-z-]*)", text):
            used = used[0] or used[1]
            assert used in commands, f"{page.name}: tenantgate {used}"


def _served_paths() -> list[re.Pattern[str]]:
    from typing import Any, cast

    from control_plane.app import create_app

    app = create_app(cast(Any, None))  # building the app touches no state
    paths = list(app.openapi()["paths"])
    return [re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", p) + "$") for p in paths]


def test_every_admin_api_path_in_the_docs_is_served() -> None:
    served = _served_paths()
    for page in DOCS.glob("*.md"):
        for used in re.findall(r"/admin/[A-Za-z0-9_\-/{}$]+", page.read_text()):
            path = re.sub(r"\$[A-Z_]+|\{[^}]+\}", "x", used.rstrip("/"))
            assert any(p.match(path) for p in served), f"{page.name}: {used} is not an admin API path"
