"""Concurrency: eight processes on one image, and eight on a fresh database, on both back ends
(CI runs one of the two per back end; the campaign runs all four, and eight genuine ``python``
processes on a fresh database of each back end).

Every process exits 0, the installation holds exactly one set of products (no duplicate for any
(parents, provenance)), nothing deadlocks (each worker has a deadline), and a process that lost
a race says so in one line (``note: ... had just been saved by another process``), with no
traceback and no SQL in its output.
"""

from __future__ import annotations

import pytest

from tests.reliability.conftest import BACKENDS
from tests.reliability.figures import record
from tests.reliability.harness import ONE_SET, Worker, assert_one_consistent_set, excerpt_copies, exec_worker

PROCESSES = 8

#: CI runs one scenario per back end; the campaign runs both on both.
ONE_IMAGE = ["sqlite", pytest.param("postgresql", marks=[pytest.mark.postgres, pytest.mark.campaign])]
FRESH = [pytest.param("sqlite", marks=pytest.mark.campaign), pytest.param("postgresql", marks=pytest.mark.postgres)]


def _check_outputs(outputs: list[str]) -> None:
    for text in outputs:
        assert "Traceback" not in text and "[SQL" not in text and "INSERT" not in text, text
        assert len(text.encode()) < 2000, f"{len(text)} bytes of output:\n{text}"


def _finish(install, workers, backend: str, what: str) -> None:
    codes = [w.wait(timeout=300) for w in workers]
    outputs = [w.output() for w in workers]
    record(f"concurrent processes ({what})", backend, len(codes))
    record(f"concurrent processes that exited 0 ({what})", backend, sum(c == 0 for c in codes))
    record("races lost and resolved (one-line notes)", backend, sum(o.count("note:") for o in outputs))
    assert codes == [0] * len(codes), "\n---\n".join(outputs)
    _check_outputs(outputs)
    # concurrent fills of the catalog cache agree on one excerpt (unique per key and box)
    copies = excerpt_copies(install.context())
    record("catalog excerpt copies", backend, copies)
    assert copies == 0
    assert_one_consistent_set(install, {**ONE_SET, "catalog_excerpts": 1})


@pytest.mark.parametrize("backend", ONE_IMAGE)
def test_processes_on_one_image(installations, field, tmp_path, backend):
    install = installations(backend)
    for args in (("db", "upgrade"), ("ingest", str(field.raw))):
        assert install.cli(*args)[0] == 0
    workers = [Worker([install.argv("run")], tmp_path / f"w{k}.log") for k in range(PROCESSES)]
    _finish(install, workers, backend, "one image")


@pytest.mark.parametrize("backend", FRESH)
def test_processes_on_a_fresh_database(installations, field, tmp_path, backend):
    install = installations(backend)
    workers = [Worker(install.commands(field.raw), tmp_path / f"w{k}.log") for k in range(PROCESSES)]
    _finish(install, workers, backend, "fresh database")


class _Exec:
    """A genuine process with the `Worker` interface `_finish` uses."""

    def __init__(self, commands, log):
        self.log, self.handle = log, exec_worker(commands, log)

    def wait(self, timeout):
        return self.handle.wait(timeout=timeout)

    def output(self):
        return self.log.read_text(errors="replace")


@pytest.mark.campaign
@pytest.mark.parametrize("backend", BACKENDS)
def test_genuine_processes_on_a_fresh_database(installations, field, tmp_path, backend):
    """The same with eight new Python processes (``python -m tests.reliability.driver``)."""
    install = installations(backend)
    workers = [_Exec(install.commands(field.raw), tmp_path / f"x{k}.log") for k in range(PROCESSES)]
    _finish(install, workers, backend, "fresh database, genuine processes")
