"""Golden fingerprints: a step's results may change only together with its version.

The figures of every default step on a fixed simulated exposure are compared with those stored in
``pipeline/fingerprints.json`` for the step's version (see `pipeline.fingerprints`).
"""

from __future__ import annotations

import pytest

from pipeline.fingerprints import compute_fingerprints, rounded, same_figures, stored_fingerprints


@pytest.fixture(scope="module")
def current(tmp_path_factory):
    return compute_fingerprints(tmp_path_factory.mktemp("fingerprints"))


def test_every_step_has_a_fingerprint_for_its_version(current):
    stored = stored_fingerprints()
    for process, entry in current.items():
        assert process in stored, f"{process} has no golden fingerprint: python -m pipeline.fingerprints --update"
        assert stored[process]["version"] == entry["version"], (
            f"{process} is now version {entry['version']}, its fingerprint is of {stored[process]['version']}: "
            "record it with python -m pipeline.fingerprints --update")


def test_results_change_only_with_the_version(current):
    stored = stored_fingerprints()
    for process, entry in current.items():
        if stored.get(process, {}).get("version") != entry["version"]:
            continue    # reported by the test above
        assert same_figures(entry["figures"], stored[process]["figures"]), (
            f"the results of {process} changed under version {entry['version']}: bump its version "
            "(provenances must change with results), then python -m pipeline.fingerprints --update")


def test_rounding_hides_float_noise_but_not_changes():
    assert rounded(1.0000000001) == rounded(0.9999999999) == 1.0
    assert rounded(31.0212) != rounded(31.0217)
    assert rounded([1, 2.000000001]) == [1, 2.0]


def test_figures_match_within_the_tolerance_only():
    assert same_figures({"n": 3, "sum": 140000.0}, {"n": 3, "sum": 140010.0})    # 7e-5: libraries' noise
    assert not same_figures({"n": 3, "sum": 140000.0}, {"n": 3, "sum": 140030.0})
    assert not same_figures({"n": 3, "sum": 1.0}, {"n": 4, "sum": 1.0})
    assert not same_figures({"n": 3}, {"n": 3, "sum": 1.0})
    assert same_figures([1.0, 2.0], [1.00001, 2.0]) and not same_figures([1.0], [1.0, 2.0])
    assert not same_figures(1.0, "1.0") and same_figures(0.0, 0.0)
