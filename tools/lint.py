"""Run every static check the project holds itself to: ruff format, ruff lint, mypy --strict.

python tools/lint.py          # check
python tools/lint.py --fix    # also apply ruff's fixes and formatting
"""

from __future__ import annotations

import subprocess
import sys


def main() -> int:
    fix = "--fix" in sys.argv[1:]
    steps = [
        ["ruff", "format", *([] if fix else ["--check"]), "."],
        ["ruff", "check", *(["--fix"] if fix else []), "."],
        ["mypy"],
    ]
    failed = 0
    for step in steps:
        print("$", " ".join(step), flush=True)
        failed |= subprocess.call([sys.executable, "-m", *step])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
