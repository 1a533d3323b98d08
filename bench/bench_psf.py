"""Time fit_psf (300 stars) and psf_fluxes (5000 stars) on a 2048 x 4096 image.

Run from the repository root: ``python bench/bench_psf.py``.  Prints wall-clock seconds (best of
three) and the accuracy reached on the same synthetic field (elliptical Moffat beta = 3,
FWHM ~3.8 px varying ~10 % across the chip, Poisson + read noise).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from improc.psf_fit import fit_psf  # noqa: E402
from improc.psf_photometry import psf_fluxes, select_psf_stars  # noqa: E402
from tests.improc.test_psf import READ_NOISE, SKY, render_stars  # noqa: E402

SHAPE = (4096, 2048)


def make_field(n_stars: int, rng: np.random.Generator):
    """A noisy, background-subtracted field of n_stars stars with random positions."""
    x = rng.uniform(5, SHAPE[1] - 6, n_stars)
    y = rng.uniform(5, SHAPE[0] - 6, n_stars)
    flux = 10 ** rng.uniform(3.0, 6.0, n_stars)
    model = np.zeros(SHAPE)
    h = 22
    for start in range(0, n_stars, 500):
        stamps = render_stars(x[start:start + 500], y[start:start + 500], SHAPE, 2 * h + 1, nsub=3)
        for k, stamp in enumerate(stamps):
            ix, iy = int(np.floor(x[start + k] + 0.5)), int(np.floor(y[start + k] + 0.5))
            y0, y1, x0, x1 = max(iy - h, 0), min(iy + h + 1, SHAPE[0]), max(ix - h, 0), min(ix + h + 1, SHAPE[1])
            model[y0:y1, x0:x1] += flux[start + k] * stamp[y0 - iy + h:y1 - iy + h, x0 - ix + h:x1 - ix + h]
    data = rng.poisson(model + SKY) + rng.normal(0.0, READ_NOISE, SHAPE) - SKY
    return data, model + SKY + READ_NOISE**2, x, y, flux


def best_of(n: int, func):
    times, result = [], None
    for _ in range(n):
        start = time.perf_counter()
        result = func()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    rng = np.random.default_rng(1)
    data, variance, x, y, flux = make_field(5000, rng)
    snr = flux / np.sqrt(flux + 60 * (SKY + READ_NOISE**2))
    chosen = np.flatnonzero(select_psf_stars(x, y, flux, snr, np.zeros(x.size, int), np.full(x.size, 3.8),
                                             image_shape=SHAPE, min_snr=50))
    chosen = chosen[np.argsort(-flux[chosen])][:300]
    print(f"image {SHAPE[0]} x {SHAPE[1]}, {x.size} stars, {chosen.size} PSF stars")
    noise = np.sqrt(SKY + READ_NOISE**2)
    t_fit, psf = best_of(3, lambda: fit_psf(data, x[chosen], y[chosen], background=0.0, noise=noise,
                                            fwhm_guess=3.8))
    t_phot, result = best_of(3, lambda: psf_fluxes(data, x, y, psf, background=0.0, variance=variance))
    print(f"fit_psf ({chosen.size} stars, stamp {psf.size} px): {t_fit:.3f} s")
    print(f"psf_fluxes ({x.size} stars): {t_phot:.3f} s")
    print(f"total: {t_fit + t_phot:.3f} s")
    isolated = select_psf_stars(x, y, flux, np.full(x.size, 1e9), np.zeros(x.size, int), np.full(x.size, 3.8),
                                image_shape=SHAPE, min_snr=0, neighbor_flux_ratio=0.001)
    rel = result.flux[isolated] / flux[isolated] - 1
    pull = (result.flux[isolated] - flux[isolated]) / result.flux_err[isolated]
    print(f"isolated stars: {isolated.sum()}, median flux bias {np.median(rel):+.4f}, "
          f"pull mean {pull.mean():+.3f} std {pull.std():.3f}")


if __name__ == "__main__":
    main()
