"""Kills: the pipeline in a worker process, SIGKILLed at every saving point of every product kind
and at random moments, on both back ends.  After each kill the checker finds nothing that
``db clean`` or a re-run cannot repair, and a re-run completes with exactly one set of products.

A worker's life is the operator's: ``db upgrade`` on a fresh installation, ``ingest`` of a raw
exposure, ``run``.  The saving points are those of `models.faults`; ``schema`` is the first
migration's transaction.
"""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest

from models.faults import POINTS
from tests.reliability.conftest import BACKENDS
from tests.reliability.figures import record
from tests.reliability.harness import Worker, assert_one_consistent_set, recover, repairable_only

FILE_KINDS = ("Exposure", "Image", "Background", "SourceList", "PSF", "CatalogExcerpt")
ROW_KINDS = ("WorldCoordinates", "ZeroPoint", "schema")

#: Every (point, kind): files have four saving points, rows without files (and the schema) two.
MATRIX = ([(point, kind) for kind in FILE_KINDS for point in POINTS]
          + [(point, kind) for kind in ROW_KINDS for point in ("before_commit", "after_commit")])

#: The fast subset run in CI: each point at least once per back end.
FAST = {"sqlite": {("temp_written", "Background"), ("file_in_place", "SourceList"),
                   ("before_commit", "Image"), ("after_commit", "PSF"), ("before_commit", "schema"),
                   ("file_in_place", "CatalogExcerpt")},
        "postgresql": {("file_in_place", "Exposure"), ("before_commit", "PSF"),
                       ("temp_written", "Image"), ("after_commit", "ZeroPoint")}}

#: What the checker must at least find right after a kill at a file's saving point (it finds every
#: leftover; files written earlier in the same save are orphans too).  After the commit: nothing.
EXPECTED = {"temp_written": {"temp file"}, "file_in_place": {"orphan file"},
            "before_commit": {"orphan file"}, "after_commit": set()}


def _cases():
    for backend in BACKENDS:
        name = getattr(backend, "values", [backend])[0]
        marks = list(getattr(backend, "marks", []))
        for point, kind in MATRIX:
            extra = [] if (point, kind) in FAST[name] else [pytest.mark.campaign]
            yield pytest.param(name, point, kind, marks=marks + extra, id=f"{name}-{point}-{kind}")


@pytest.mark.parametrize("backend, point, kind", list(_cases()))
def test_kill_at_a_saving_point(installations, field, tmp_path, backend, point, kind):
    install = installations(backend)
    worker = Worker(install.commands(field.raw), tmp_path / "worker.log", fault=f"{point}:{kind}")
    code = worker.wait()
    record("kills tried (saving points)", backend)
    assert code == -signal.SIGKILL, f"{point}:{kind} was never reached (exit {code}):\n{worker.output()}"
    found = set(repairable_only(install))
    expected = EXPECTED[point] if kind in FILE_KINDS else set()
    assert expected <= found, f"after a kill at {point}:{kind} the checker found {found}, expected {expected}"
    if point == "after_commit" or kind not in FILE_KINDS:
        assert found == set(), f"after a kill at {point}:{kind} the checker found {found}"
    recover(install, field.raw)
    assert_one_consistent_set(install)
    record("kills survived (saving points)", backend)


#: Random kills per back end: a few in CI, 60 in the campaign (>= 100 over both back ends).
RANDOM_TRIALS, RANDOM_FAST = 60, 2
_durations: dict[str, float] = {}


def _duration(installations, field, tmp_path, backend: str) -> float:
    """How long a worker's whole life takes (measured once per back end, unkilled)."""
    if backend not in _durations:
        install = installations(backend)
        worker = Worker(install.commands(field.raw), tmp_path / "calibration.log")
        assert worker.wait() == 0, worker.output()
        _durations[backend] = time.monotonic() - worker.started
        assert_one_consistent_set(install)
    return _durations[backend]


@pytest.mark.parametrize("trial", [pytest.param(i, marks=[] if i < RANDOM_FAST else [pytest.mark.campaign])
                                   for i in range(RANDOM_TRIALS)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_at_a_random_moment(installations, field, tmp_path, backend, trial):
    duration = _duration(installations, field, tmp_path, backend)
    delay = np.random.default_rng([trial, len(backend)]).uniform(0.0, 1.05 * duration)
    install = installations(backend)
    worker = Worker(install.commands(field.raw), tmp_path / "worker.log")
    while time.monotonic() - worker.started < delay and worker.poll() is None:
        time.sleep(0.005)
    worker.kill()
    code = worker.wait()
    record("kills tried (random)", backend)
    record("kills landed before the end (random)", backend, float(code == -signal.SIGKILL))
    assert code in (0, -signal.SIGKILL), worker.output()
    repairable_only(install)
    recover(install, field.raw)
    assert_one_consistent_set(install)
    record("kills survived (random)", backend)


def test_the_fault_hook_does_nothing_unless_told(monkeypatch):
    import os

    import models.faults
    from models.faults import ENVIRONMENT_VARIABLE, fault_point

    sent = []
    monkeypatch.setattr(models.faults.os, "kill", lambda pid, sig: sent.append(sig))
    monkeypatch.setattr(models.faults, "_reached", {})
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    fault_point("file_in_place", "Background")
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "file_in_place:Background:2:stop")
    for point, kind in [("temp_written", "Background"), ("file_in_place", "PSF"), ("file_in_place", "Background"),
                        ("file_in_place", "Background"), ("file_in_place", "Background")]:
        fault_point(point, kind)
    assert sent == [signal.SIGSTOP] and os.environ[ENVIRONMENT_VARIABLE]
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "before_commit:*")
    fault_point("before_commit", object())
    assert sent == [signal.SIGSTOP, signal.SIGKILL]
