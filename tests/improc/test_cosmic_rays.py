"""Cosmic rays by Laplacian edge detection (`improc.cosmic_rays`), against the simulator's truth."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from improc.cosmic_rays import find_cosmic_rays, laplacian_plus
from improc.sim_detector import FLAG_COSMIC_RAY
from improc.simulator import SimulationParams, simulate_image

GAIN, READ_NOISE = 4.0, 5.0     # the simulator's defaults, e-/ADU and e-


def _variance(image: np.ndarray) -> np.ndarray:
    """The variance preprocessing gives: Poisson from the image itself (a hit raises its own)."""
    return np.maximum(image, 0) / GAIN + (READ_NOISE / GAIN) ** 2


def _gaussian(shape, x, y, fwhm, flux):
    yy, xx = np.indices(shape)
    sigma = fwhm / 2.3548
    return flux * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)


def test_laplacian_plus_of_a_spike_and_of_a_plane():
    image = np.full((9, 9), 100.0, np.float32)
    assert np.all(laplacian_plus(image) == 0)
    image[4, 4] += 50.0
    lplus = laplacian_plus(image)
    assert lplus[4, 4] == pytest.approx(100.0)          # 2 A for a one-pixel spike of height A
    assert lplus[4, 3] == 0 and lplus[3, 4] == 0         # beside it the Laplacian is negative


def test_a_spike_is_found_and_a_star_of_the_same_peak_is_not():
    rng = np.random.default_rng(3)
    model = np.full((64, 64), 1000.0) + _gaussian((64, 64), 40.3, 20.7, fwhm=3.0, flux=60000.0)
    image = (model + rng.normal(0, np.sqrt(_variance(model)))).astype(np.float32)
    peak = model[21, 40] - 1000.0                        # the star's peak above the sky, ~6,000 ADU
    image[45, 12] += peak                                # a one-pixel hit as high as the star
    image[50, 30:32] += 0.3 * peak                       # a two-pixel track
    hits = find_cosmic_rays(image, _variance(image))
    assert hits[45, 12] and hits[50, 30] and hits[50, 31]
    assert not hits[15:27, 34:47].any()                  # the star keeps every pixel
    assert hits.sum() <= 5                               # the hits, at most a neighbour more each


def test_simulated_frames_hits_found_stars_and_noise_left(request):
    found, strong, false, star_cores = 0, 0, 0, 0
    for fwhm in (0.7, 1.4):
        sim = simulate_image(SimulationParams(nx=1024, ny=1024, fwhm_arcsec=fwhm, star_density=30000.0,
                                              n_cosmic_rays=150, seed=11))
        truth = (sim.flags & FLAG_COSMIC_RAY) != 0
        bad = (sim.flags & ~np.uint16(FLAG_COSMIC_RAY)) != 0
        hits = find_cosmic_rays(sim.data, _variance(sim.data), bad)
        significance = (sim.data - np.median(sim.data)) / np.sqrt(_variance(sim.data))
        # (a track touching a bad pixel is left alone by design)
        bright = truth & ~ndimage.binary_dilation(bad, structure=np.ones((3, 3)), iterations=3) & (significance > 8)
        found += int(np.sum(hits & bright))
        strong += int(bright.sum())
        false += int(np.sum(hits & ~ndimage.binary_dilation(truth, structure=np.ones((3, 3)))))
        assert not (hits & bad).any()
        stars = sim.stars[sim.stars["in_image"] & (sim.stars["snr"] > 20) & ~sim.stars["saturated"]]
        x, y = np.round(stars["x"]).astype(int), np.round(stars["y"]).astype(int)
        inside = (x > 0) & (x < 1023) & (y > 0) & (y < 1023)
        clean = ~ndimage.binary_dilation(truth, iterations=3)[y[inside], x[inside]]
        star_cores += int(np.sum(hits[y[inside], x[inside]][clean]))
    # measured: 100 % of 8-sigma hit pixels, 4 false pixels over 2 x 1024^2, no star core

    assert strong > 400 and found >= 0.99 * strong
    assert false <= 20
    assert star_cores == 0


def test_what_touches_a_bad_pixel_is_left_alone():
    rng = np.random.default_rng(5)
    model = np.full((48, 48), 1000.0) + _gaussian((48, 48), 24, 24, fwhm=3.0, flux=4e6)
    image = (model + rng.normal(0, np.sqrt(_variance(model)))).astype(np.float32)
    bad = image > 50000.0                                # a saturated core, its wings sharp against it
    image[bad] = 50000.0
    image[5, 5] += 5000.0                                # and a hit far from it
    hits = find_cosmic_rays(image, _variance(image), bad)
    assert hits[5, 5] and not (hits & ndimage.binary_dilation(bad, iterations=6)).any()


def test_bad_arguments_are_refused():
    image = np.zeros((10, 10), np.float32)
    with pytest.raises(ValueError, match="one shape"):
        find_cosmic_rays(image, np.ones((10, 11)))
    with pytest.raises(ValueError, match="must be > 0"):
        find_cosmic_rays(image, np.ones((10, 10)), sigma_clip=0)
    assert not find_cosmic_rays(image, np.zeros((10, 10))).any()     # no pixel with a known noise
