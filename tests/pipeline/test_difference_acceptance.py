"""Issue 10's acceptance on simulated 2048 x 2048 pairs, through the configured pipeline.

The figures are those of `bench/bench_difference.py` (its simulation and evaluation are used
here, one field per direction): three deep reference epochs (each 10 times the new epoch's
exposure) coadded by `make-ref`, a new epoch pointed 3.3" away and turned by 0.5 degree, 200
transients of S/N 3 to 50 in the new image (half on galaxies, 20 on nuclei), new 1.4" against
reference 0.9" and the reverse.  Runs ~2.5 minutes.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

_BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_difference.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_difference", _BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module             # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def outcomes():
    bench = _bench()
    return {label: bench.one_run(label, nx=2048, ny=2048, new_fwhm=new, ref_fwhms=refs, n_transients=200,
                                 keep=None, seed=31, ref_depth=10.0)
            for label, (new, refs) in bench.DIRECTIONS.items()}


def test_completeness(outcomes):
    faint = [o.completeness(5, 6) for o in outcomes.values()]
    for found, n in (o.completeness(10, 1e9) for o in outcomes.values()):
        assert n > 100 and found >= 0.95 * n                    # measured 100 %, 100 %
    found, n = map(sum, zip(*faint))                            # S/N 5-6, both directions: 12 of 21
    assert found >= 0.5 * n


def test_spurious_detections_after_the_cuts(outcomes):
    for o in outcomes.values():
        assert o.spurious <= 25                                 # measured 3 and 3 (cosmic rays flagged)


def test_psf_flux_on_the_difference(outcomes):
    for o in outcomes.values():
        assert len(o.ratios) > 40 and abs(o.bias) <= 0.02       # measured +0.16 and +0.78 %
        # measuring 1.6 (the static-mismatch error term), 341-px ZOGY tiles: 0.910 and 1.076 on this
        # field (one field's pull std varies by ~0.06 from chance with ~150 transients); pooled
        # over four fields per direction 1.05 and 1.06
        assert 0.9 <= o.pull_std() <= 1.1


def test_score_is_normalized_in_every_tile(outcomes):
    for o in outcomes.values():
        std, noise = np.asarray(o.tile_std), np.asarray(o.noise_tile_std)
        ok = np.isfinite(std) & np.isfinite(noise)
        assert ok.sum() == 36                                   # 6 x 6 tiles of 341-342 px, corners too
        std, noise = std[ok], noise[ok]
        # every tile within 1.00 +- 0.05 (144 of 144 tiles over four fields per direction, this
        # one among them: 0.961..1.030 and 0.977..1.019)
        assert np.all(np.abs(std - 1.0) <= 0.05)
        # White noise through the same subtraction (its PSFs, flags, weights, tiles and mesh) is
        # S_corr normalized right by construction; a tile's std scatters by 0.011 from chance
        # alone.  The images' tiles must scatter as the noise's do, about the same mean: a
        # normalization 5 % off in a quarter of the tiles would double the scatter.  Measured
        # over four fields: scatter 0.0134 and 0.0086 against the noise's 0.0115 and 0.0094.
        assert abs(np.mean(std) - np.mean(noise)) <= 0.01
        assert np.std(std) <= 1.3 * np.std(noise) + 0.003
