"""Where a data plane worker's CPU goes, sampled with py-spy while it is under load.

py-spy writes collapsed stacks (``frame;frame;... count``); from them this module reports
each function's own share of the samples (the leaf frame: where the CPU was) and its
inclusive share (anywhere on the stack), plus the own time grouped by package, so the
figures can be read as "aiohttp's HTTP parser: 12 %, the pipeline's auth: 3 %".
py-spy is optional (``pip install py-spy``); without it the profile step is skipped and says so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Final

_FRAME: Final = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")
TOP: Final = 25


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


def record(pid: int, seconds: float, out: Path, *, native: bool, rate: int = 200) -> subprocess.Popen[bytes]:
    """Start sampling ``pid`` for ``seconds`` in the background; wait on the returned process."""
    binary = py_spy()
    assert binary is not None
    command = [
        binary,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--output",
        str(out),
    ]
    # Non-blocking sampling never pauses the worker (so it barely slows it); py-spy can only
    # unwind native frames from a paused process.
    command.append("--native" if native else "--nonblocking")
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _short_file(path: str) -> str:
    for marker in ("/site-packages/", "/lib/python3"):
        if marker in path:
            tail = path.split(marker, 1)[1]
            return tail.split("/", 1)[1] if marker == "/lib/python3" and "/" in tail else tail
    for root in ("data_plane/", "shared/", "bench/"):
        index = path.find("/" + root)
        if index >= 0:
            return path[index + 1 :]
    return path


def _package(file: str) -> str:
    if file.startswith(("data_plane/", "shared/")):
        parts = file.split("/")
        return "/".join(parts[:2]) if len(parts) > 2 else file
    head = file.split("/", 1)[0]
    return head.removesuffix(".py") or file


def _frame(text: str) -> tuple[str, str]:
    match = _FRAME.match(text)
    if match is None:
        return text, "?"
    return match["func"], _short_file(match["file"])


def summarise(raw: Path) -> dict[str, Any]:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    # The project's own functions, inclusive: what each stage of the pipeline costs in all.
    ours: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack_text.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        total += count
        func, file = frames[-1]
        own[f"{func} ({file})"] += count
        packages[_package(file)] += count
        for name in {f"{fn} ({fl})" for fn, fl in frames}:
            inclusive[name] += count
        for name in {f"{fn} ({fl})" for fn, fl in frames if fl.startswith(("data_plane/", "shared/"))}:
            ours[name] += count

    def share(counter: Counter[str], top: int) -> list[dict[str, Any]]:
        return [{"function": k, "samples": v, "share": round(v / total, 4)} for k, v in counter.most_common(top)]

    return {
        "samples": total,
        "own": share(own, TOP),
        "inclusive": share(inclusive, TOP),
        "project_inclusive": share(ours, 40),
        "packages": [{"package": k, "samples": v, "share": round(v / total, 4)} for k, v in packages.most_common(TOP)]
        if total
        else [],
    }


def format_summary(summary: dict[str, Any], top: int = 15) -> str:
    lines = [f"samples: {summary['samples']}", "own time (where the CPU was):"]
    lines += [f"  {e['share'] * 100:5.1f}%  {e['function']}" for e in summary["own"][:top]]
    lines.append("own time by package:")
    lines += [f"  {e['share'] * 100:5.1f}%  {e['package']}" for e in summary["packages"][:top]]
    lines.append("the project's functions, inclusive (on the stack):")
    lines += [f"  {e['share'] * 100:5.1f}%  {e['function']}" for e in summary["project_inclusive"][:top]]
    return "\n".join(lines)
