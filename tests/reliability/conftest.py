"""Fixtures of the fault campaign: a simulated raw exposure with its Gaia folder, and fresh
installations (database + data root + configuration) on each back end.

The fast subset runs in every ``pytest``; the full matrices carry the ``campaign`` marker, which
``pyproject.toml`` deselects by default.  ``python -m tests.reliability`` runs everything and
prints the figures (also printed at the end of any session that ran campaign tests).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pipeline.conftest import make_field
from tests.reliability import figures
from tests.reliability.harness import Installation, new_installation

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


class Field:
    """One simulated 512 x 512 raw exposure and its Gaia folder (read-only)."""

    def __init__(self, folder: Path):
        made = make_field(folder, n=1, size=512)
        self.raw = made.paths[0]
        self.gaia = made.gaia_folder
        self.sim = made.sims[0]


@pytest.fixture(scope="session")
def field(tmp_path_factory) -> Field:
    return Field(tmp_path_factory.mktemp("campaign_field"))


@pytest.fixture
def installations(request, tmp_path, field):
    """``installations(kind)`` makes a fresh installation; all are removed after the test."""
    made: list[Installation] = []

    def make(kind: str) -> Installation:
        cluster = request.getfixturevalue("pg_cluster") if kind == "postgresql" else None
        install = new_installation(kind, tmp_path, field.gaia, pg_cluster=cluster)
        made.append(install)
        return install

    yield make
    for install in made:
        install.close()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if figures.FIGURES:
        terminalreporter.section("reliability campaign figures")
        for line in figures.lines():
            terminalreporter.write_line(line)
        figures.dump()
