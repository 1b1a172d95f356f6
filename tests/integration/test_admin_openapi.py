"""schemathesis against the live admin API: no 5xx, and every response matches /openapi.json."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.harness import ADMIN_TOKEN, Processes, start_control_plane

pytestmark = pytest.mark.integration

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
    ]
)


def test_admin_api_conforms_to_its_openapi_document(procs: Processes, database_url: str, tmp_path: Path) -> None:
    if shutil.which("schemathesis") is None and not Path(sys.executable).with_name("schemathesis").exists():
        pytest.fail("schemathesis is not installed: pip install '.[test]'")
    cp = start_control_plane(procs, database_url)
    # Give the fuzzer a tenant so that tenant-scoped paths can succeed as well as fail.
    assert cp.api("POST", "/admin/tenants", {"name": "fuzz"}).status == 201
    executable = shutil.which("schemathesis") or str(Path(sys.executable).with_name("schemathesis"))

    result = subprocess.run(
        [
            executable,
            "run",
            f"{cp.admin_url}/openapi.json",
            "--checks",
            CHECKS,
            "--header",
            f"Authorization: Bearer {ADMIN_TOKEN}",
            "--max-examples",
            "10",
            "--seed",
            "20261204",
            "--workers",
            "1",
            "--phases",
            "examples,coverage,fuzzing",
            "--request-timeout",
            "10",
            "--no-color",
            "--report-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=tmp_path,
    )

    summary = result.stdout[-6000:]
    assert result.returncode == 0, f"{summary}\n{result.stderr[-2000:]}\n{cp.proc.log()[-3000:]}"
    assert "Traceback" not in cp.proc.log()
