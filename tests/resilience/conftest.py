"""The resilience suite's table of figures: every module adds rows to one session-wide
:class:`Figures`, written to a file as it grows and printed at the end of the run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.resilience.support import Figures

_FIGURES: list[Figures] = []


@pytest.fixture(scope="session")
def figures(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Figures]:
    table = Figures(tmp_path_factory.mktemp("resilience") / "figures.md")
    _FIGURES.append(table)
    yield table


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for table in _FIGURES:
        if table.rows:
            terminalreporter.section("resilience figures")
            terminalreporter.write_line(f"(also in {table.path})")
            terminalreporter.write_line(table.table())
