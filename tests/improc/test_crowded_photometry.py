"""Tests of improc.crowded_photometry: joint PSF fluxes of overlapping stars.

The PSF is built directly from a known basis (a pixel-integrated Moffat stamp, or a known linear
variation between two of them), and the stars are rendered with that same PSF, so every
difference from the truth is noise or a property of the fit.
"""

from __future__ import annotations

import numpy as np
import pytest

from improc.crowded_photometry import deblended_psf_fluxes
from improc.psf import PixelPSF
from improc.psf_photometry import psf_fluxes, render_sources

FWHM = 3.5          # Moffat parameter; the pixel-integrated model has psf.fwhm_pixels ~ 3.6
STAMP = 31          # ~9 FWHM: holds 99.9 % of a beta = 3 Moffat
SKY = 100.0
SIGMA = 10.0        # background noise per pixel
GAIN = 1.0


def moffat_stamp(fwhm: float = FWHM, *, beta: float = 3.0, size: int = STAMP, oversample: int = 7) -> np.ndarray:
    """A circular Moffat integrated over the pixels of a (size, size) stamp, centred, summing to 1."""
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    sub = (np.arange(size * oversample) + 0.5) / oversample - 0.5 - size // 2
    yy, xx = np.meshgrid(sub, sub, indexing="ij")
    fine = (1.0 + (xx**2 + yy**2) / alpha**2) ** (-beta)
    stamp = fine.reshape(size, oversample, size, oversample).sum(axis=(1, 3))
    return stamp / stamp.sum()


def moffat_psf(shape: tuple[int, int], *, degree: int = 0) -> PixelPSF:
    """Degree 0: the Moffat of FWHM ``FWHM`` everywhere.  Degree 1: a PSF that goes linearly
    from a FWHM-3 Moffat at the left edge (u = -1) to a FWHM-4 one at the right edge (u = +1)."""
    if degree == 0:
        basis = moffat_stamp()[None]
    else:
        narrow, wide = moffat_stamp(3.0), moffat_stamp(4.0)
        basis = np.stack([(wide + narrow) / 2, (wide - narrow) / 2, np.zeros_like(wide)])
    ny, nx = shape
    return PixelPSF(basis=basis, degree=degree, x0=(nx - 1) / 2, y0=(ny - 1) / 2, xscale=nx / 2,
                    yscale=ny / 2, image_shape=shape)


def star_image(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, flux: np.ndarray, psf: PixelPSF,
               rng: np.random.Generator, *, gain: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sky + stars (``psf.get_clip`` at their sub-pixel positions) + Gaussian noise of variance
    ``SIGMA**2`` (plus ``stars / gain`` if ``gain``).  Returns the image and the noiseless stars."""
    stars = render_sources(shape, x, y, flux, psf)
    variance = SIGMA**2 + (0.0 if gain is None else stars / gain)
    return SKY + stars + rng.normal(0.0, 1.0, shape) * np.sqrt(variance), stars


def grid(shape: tuple[int, int], spacing: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A square grid of positions ``spacing`` apart, each moved randomly within its pixel."""
    xs = np.arange(spacing, shape[1] - spacing / 2, spacing)
    ys = np.arange(spacing, shape[0] - spacing / 2, spacing)
    x, y = (a.ravel() for a in np.meshgrid(xs, ys))
    return x + rng.uniform(-0.5, 0.5, x.size), y + rng.uniform(-0.5, 0.5, y.size)


def spread_positions(shape: tuple[int, int], n: int, min_separation: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random positions, no two closer than ``min_separation``."""
    x, y = np.empty(0), np.empty(0)
    while x.size < n:
        px, py = rng.uniform(5.0, shape[1] - 5.0), rng.uniform(5.0, shape[0] - 5.0)
        if np.all((x - px) ** 2 + (y - py) ** 2 >= min_separation**2):
            x, y = np.append(x, px), np.append(y, py)
    return x, y


@pytest.fixture(scope="module")
def isolated():
    """36 isolated stars (40 px apart), fluxes 1e3 to 5e4 (S/N ~15 to 700)."""
    shape = (300, 300)
    rng = np.random.default_rng(11)
    psf = moffat_psf(shape)
    x, y = grid(shape, 40.0, rng)
    flux = 10 ** rng.uniform(3.0, 4.7, x.size)
    data, _ = star_image(shape, x, y, flux, psf, rng)
    return data, x, y, flux, psf


def test_isolated_stars_match_psf_fluxes_and_truth(isolated):
    data, x, y, flux, psf = isolated
    fit, _ = deblended_psf_fluxes(data, x, y, psf, background=SKY, variance=SIGMA**2)
    alone = psf_fluxes(data, x, y, psf, background=SKY, variance=SIGMA**2)
    # the same least-squares problem: equal to far below the noise (measured 6e-6 sigma)
    assert np.max(np.abs(fit.flux - alone.flux) / alone.flux_err) < 1e-3
    assert np.allclose(fit.flux_err, alone.flux_err, rtol=1e-6)
    assert np.allclose(fit.chi2, alone.chi2, rtol=1e-3)
    pull = (fit.flux - flux) / fit.flux_err
    assert np.max(np.abs(pull)) < 4.0            # 36 stars: none beyond 4 sigma (measured 2.4)
    assert abs(np.mean(pull)) < 0.5              # 3 x the error of the mean of 36 (measured -0.09)
    assert 0.85 < np.median(fit.chi2) < 1.15     # measured 1.01
    # a background or variance map equal to the constant gives the same result
    maps, _ = deblended_psf_fluxes(data, x, y, psf, background=np.full(data.shape, SKY),
                                   variance=np.full(data.shape, SIGMA**2))
    assert np.allclose(maps.flux, fit.flux, rtol=1e-9)


def close_pairs(separation_fwhm: float, ratio: float, seed: int = 7):
    """81 pairs (400 x 400 image): a star of flux 2e4 and one of ``ratio`` times that,
    ``separation_fwhm`` FWHM apart in a random direction.  Returns data, x, y, flux, psf, n."""
    shape = (400, 400)
    rng = np.random.default_rng(seed)
    psf = moffat_psf(shape)
    bx, by = grid(shape, 40.0, rng)
    angle = rng.uniform(0.0, 2 * np.pi, bx.size)
    distance = separation_fwhm * psf.fwhm_pixels
    x, y = np.r_[bx, bx + distance * np.cos(angle)], np.r_[by, by + distance * np.sin(angle)]
    flux = np.r_[np.full(bx.size, 2e4), np.full(bx.size, 2e4 * ratio)]
    data, _ = star_image(shape, x, y, flux, psf, rng)
    return data, x, y, flux, psf, bx.size


@pytest.mark.parametrize("ratio", [1.0, 0.1])
@pytest.mark.parametrize("separation_fwhm", [1.5, 2.0, 3.0])
def test_close_pairs_unbiased_where_psf_fluxes_is_biased(separation_fwhm, ratio):
    data, x, y, flux, psf, n = close_pairs(separation_fwhm, ratio)
    # each star's model over the whole stamp: with the exact PSF the joint fit is unbiased
    fit, _ = deblended_psf_fluxes(data, x, y, psf, background=SKY, variance=SIGMA**2,
                                  model_radius=psf.size // 2)
    alone = psf_fluxes(data, x, y, psf, background=SKY, variance=SIGMA**2)
    pull = (fit.flux - flux) / fit.flux_err
    bias_alone = (alone.flux - flux) / alone.flux_err
    for member in (slice(0, n), slice(n, 2 * n)):
        # 81 stars: the error of the mean pull is 0.11; measured |mean| <= 0.08
        assert abs(np.mean(pull[member])) < 0.35
        assert 0.8 < np.std(pull[member]) < 1.3
    # psf_fluxes alone takes the neighbour's light: the fainter member is biased high by at
    # least 1.1 sigma (measured 1.2 sigma at 3 FWHM, 12 at 2 FWHM, 39 at 1.5 FWHM)
    assert np.mean(bias_alone[n:]) > 1.0
    assert np.mean(bias_alone[n:]) > 3 * abs(np.mean(pull[n:]))
    # relative bias of the fainter member (S/N ~ 30 at ratio 0.1): measured <= 0.3 %
    assert abs(np.mean(fit.flux[n:] / flux[n:]) - 1.0) < 0.01


@pytest.mark.parametrize("separation_fwhm", [1.5, 2.0, 3.0])
def test_default_model_radius_with_the_wings_subtracted_is_unbiased(separation_fwhm):
    """With the model cut at the fit radius (the default), a neighbour's wing beyond it is
    subtracted as known light (from a first fit), not fitted: the faint member of a 1:10 pair
    is unbiased to 1 % (measured +0.07 %, 0.00 %, +0.28 % at 1.5, 2, 3 FWHM; without the
    subtraction it was +1.9 %, +4.1 %, +2.8 %, and `psf_fluxes` gives +135 %, +43 %, +4.1 %)."""
    data, x, y, flux, psf, n = close_pairs(separation_fwhm, 0.1)
    fit, _ = deblended_psf_fluxes(data, x, y, psf, background=SKY, variance=SIGMA**2)
    alone = psf_fluxes(data, x, y, psf, background=SKY, variance=SIGMA**2)
    bias = np.mean(fit.flux[n:] / flux[n:]) - 1.0
    assert abs(bias) < 0.01
    assert np.mean(alone.flux[n:] / flux[n:]) - 1.0 > 0.02
    assert abs(np.mean((fit.flux[n:] - flux[n:]) / fit.flux_err[n:])) < 0.35   # 81 stars: 3 x 0.11
    assert abs(np.mean(fit.flux[:n] / flux[:n]) - 1.0) < 0.005     # the bright member: measured 0.02 %


def test_pulls_of_a_crowded_field_with_poisson_noise():
    """300 stars >= 2 FWHM apart (a third have a neighbour within 3 FWHM), fluxes 500 to 5e4
    with their Poisson noise: with ``gain`` the errors are right; without it they are far too small."""
    shape = (400, 400)
    rng = np.random.default_rng(0)
    psf = moffat_psf(shape)
    x, y = spread_positions(shape, 300, 2.0 * psf.fwhm_pixels, rng)
    flux = 10 ** rng.uniform(2.7, 4.7, x.size)
    data, _ = star_image(shape, x, y, flux, psf, rng, gain=GAIN)
    whole = psf.size // 2
    fit, _ = deblended_psf_fluxes(data, x, y, psf, background=SKY, variance=SIGMA**2, gain=GAIN,
                                  model_radius=whole)
    pull = (fit.flux - flux) / fit.flux_err
    assert 0.85 < np.std(pull) < 1.15            # measured 0.97
    assert abs(np.mean(pull)) < 0.2              # 3.5 x the error of the mean; measured -0.09
    assert 0.85 < np.median(fit.chi2) < 1.15
    no_gain, _ = deblended_psf_fluxes(data, x, y, psf, background=SKY, variance=SIGMA**2,
                                      model_radius=whole)
    assert np.std((no_gain.flux - flux) / no_gain.flux_err) > 1.5    # measured 2.2


def test_model_image_is_the_sum_of_the_rendered_stars():
    """With a spatially varying PSF: the model is `render_sources` of the fitted fluxes, stars of
    non-positive flux, off the image or without a position left out; it matches the truth."""
    shape = (240, 320)
    rng = np.random.default_rng(3)
    psf = moffat_psf(shape, degree=1)
    x, y = grid(shape, 40.0, rng)
    flux = 10 ** rng.uniform(3.5, 4.5, x.size)
    data, stars = star_image(shape, x, y, flux, psf, rng)
    data[5:16, 5:16] = SKY - 50.0           # a "star" on a hole gets a negative flux
    fx, fy = np.r_[x, 10.0, -100.0, np.nan], np.r_[y, 10.0, 50.0, 20.0]
    fit, model = deblended_psf_fluxes(data, fx, fy, psf, background=SKY, variance=SIGMA**2)
    assert fit.flux[x.size] < 0
    assert np.all(np.isnan(fit.flux[x.size + 1:]))
    rendered = render_sources(shape, fx, fy, fit.flux, psf)
    assert model.shape == shape
    assert np.max(np.abs(model - rendered)) < 1e-6 * rendered.max()     # float32 clips
    assert np.all(model[:25, :25] == 0.0)
    # the fluxes of the varying PSF are right, so the model is the noiseless image
    pull = (fit.flux[:x.size] - flux) / fit.flux_err[:x.size]
    assert abs(np.mean(pull)) < 0.6 and np.max(np.abs(pull)) < 4.0      # 35 stars
    assert np.sum(np.abs(model - stars)) < 0.01 * stars.sum()


def test_masked_pixels(isolated):
    data, x, y, flux, psf = isolated
    k = 3
    ix, iy = int(np.floor(x[k] + 0.5)), int(np.floor(y[k] + 0.5))
    spoiled = data.copy()
    mask = np.zeros(data.shape, dtype=bool)
    mask[iy, ix] = True
    spoiled[iy, ix] = 1e9                   # hidden by the mask
    spoiled[iy + 1, ix] = np.nan            # non-finite pixels are not used either
    j = 10                                  # a star entirely masked
    mask[int(y[j]) - 12:int(y[j]) + 13, int(x[j]) - 12:int(x[j]) + 13] = True
    plain, _ = deblended_psf_fluxes(data, x, y, psf, background=SKY, variance=SIGMA**2)
    fit, _ = deblended_psf_fluxes(spoiled, x, y, psf, background=SKY, variance=SIGMA**2, mask=mask)
    alone = psf_fluxes(spoiled, x, y, psf, background=SKY, variance=SIGMA**2, mask=mask)
    assert abs(fit.flux[k] - flux[k]) < 4 * fit.flux_err[k]
    assert fit.flux_err[k] > plain.flux_err[k]
    assert abs(fit.flux[k] - alone.flux[k]) < 1e-3 * alone.flux_err[k]
    assert np.isnan(fit.flux[j]) and np.isnan(fit.flux_err[j]) and np.isnan(fit.chi2[j])
    others = np.setdiff1d(np.arange(x.size), [k, j])
    assert np.allclose(fit.flux[others], plain.flux[others], rtol=1e-6)
    # unusable variance (0, inf, NaN) hides pixels as the mask does
    variance = np.full(data.shape, SIGMA**2)
    variance[iy, ix], variance[iy + 1, ix] = 0.0, np.inf
    no_mask, _ = deblended_psf_fluxes(np.where(np.isnan(spoiled), 0.0, spoiled), x[k:k + 1], y[k:k + 1], psf,
                                      background=SKY, variance=variance)
    assert no_mask.flux[0] == pytest.approx(fit.flux[k], rel=1e-6)


def test_stars_off_the_edge_and_without_positions(isolated):
    data, x, y, flux, psf = isolated
    ex = np.array([-0.4, -100.0, np.nan, x[0]])
    ey = np.array([150.3, 150.0, 20.0, np.nan])
    fit, model = deblended_psf_fluxes(data, np.r_[x, ex], np.r_[y, ey], psf, background=SKY, variance=SIGMA**2)
    ref, ref_model = deblended_psf_fluxes(data, x, y, psf, background=SKY, variance=SIGMA**2)
    # the extra entries change nothing for the others, nor in the model (no light there)
    assert np.allclose(fit.flux[:x.size], ref.flux, rtol=1e-8)
    # a star half off the image is measured from the pixels left, as psf_fluxes does
    edge = psf_fluxes(data, ex[:1], ey[:1], psf, background=SKY, variance=SIGMA**2)
    assert np.isfinite(fit.flux[x.size]) and fit.flux_err[x.size] > ref.flux_err.max()
    assert fit.flux[x.size] == pytest.approx(edge.flux[0], abs=1e-3 * edge.flux_err[0])
    assert np.allclose(model[:, 20:], ref_model[:, 20:])
    # one far outside, or without a position: NaN everywhere
    for column in fit:
        assert np.all(np.isnan(column[x.size + 1:]))
    empty, blank = deblended_psf_fluxes(data, np.array([]), np.array([]), psf, background=SKY, variance=1.0)
    assert empty.flux.shape == (0,) and blank.shape == data.shape and not blank.any()


def test_same_star_twice_shares_its_flux(isolated):
    """Two detections of one star make the normal equations singular: CG splits the flux."""
    data, x, y, flux, psf = isolated
    k = 5
    single, _ = deblended_psf_fluxes(data, x[k:k + 1], y[k:k + 1], psf, background=SKY, variance=SIGMA**2)
    twice, _ = deblended_psf_fluxes(data, x[[k, k]], y[[k, k]], psf, background=SKY, variance=SIGMA**2)
    assert np.all(np.isfinite(twice.flux))
    assert twice.flux.sum() == pytest.approx(single.flux[0], rel=1e-6)
    assert twice.flux[0] == pytest.approx(twice.flux[1], rel=1e-6)


def test_matches_dense_weighted_least_squares():
    """A group of 6 overlapping stars: the CG solution, errors and chi-squares equal those of
    the explicit least-squares problem (region, truncated models, weights as documented), with
    the stars' wings beyond the model radius, from a first solution, subtracted as known light."""
    shape = (80, 80)
    rng = np.random.default_rng(5)
    psf = moffat_psf(shape)
    x = 40.0 + np.array([0.0, 4.1, -3.2, 1.7, 7.9, -6.4]) + rng.uniform(-0.5, 0.5, 6)
    y = 40.0 + np.array([0.0, 1.3, 3.8, -4.6, -2.2, -1.1]) + rng.uniform(-0.5, 0.5, 6)
    flux = np.array([2e4, 8e3, 5e3, 1.2e4, 3e3, 6e3])
    data, _ = star_image(shape, x, y, flux, psf, rng)
    variance = SIGMA**2 * rng.uniform(0.8, 1.2, shape)
    fit_radius, model_radius = 5.0, 9.0
    fit, _ = deblended_psf_fluxes(data, x, y, psf, background=SKY, variance=variance, fit_radius=fit_radius,
                                  model_radius=model_radius, rtol=1e-10, n_steps=200)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    h = psf.size // 2
    columns, beyond, discs = [], [], []
    for xi, yi in zip(x, y):
        unit = np.zeros(shape)
        ix, iy = int(np.floor(xi + 0.5)), int(np.floor(yi + 0.5))
        unit[iy - h:iy + h + 1, ix - h:ix + h + 1] = psf.get_clip(xi, yi)
        r2 = (xx - xi) ** 2 + (yy - yi) ** 2
        columns.append(np.where(r2 <= model_radius**2, unit, 0.0))
        beyond.append(np.where(r2 > model_radius**2, unit, 0.0))
        discs.append(r2 <= fit_radius**2)
    region = np.any(discs, axis=0)
    design = np.stack([c[region] for c in columns], axis=1)
    w = 1.0 / variance[region]
    normal = design.T @ (w[:, None] * design)
    first = np.linalg.solve(normal, design.T @ (w * (data[region] - SKY)))
    wings = np.tensordot(np.clip(first, 0.0, None), np.stack(beyond), axes=1)
    expected = np.linalg.solve(normal, design.T @ (w * (data - SKY - wings)[region]))
    expected_err = 1.0 / np.sqrt(np.diag(normal))
    assert np.max(np.abs(fit.flux - expected) / expected_err) < 1e-4
    assert np.max(np.abs(first - expected) / expected_err) > 0.1     # the wings matter here
    # flux_err sums the star's own disc only (as psf_fluxes does); with model_radius >
    # fit_radius that is slightly less than N_ii over the whole region (measured 0.2 %)
    own_err = [1.0 / np.sqrt(np.sum(c[d] ** 2 / variance[d])) for c, d in zip(columns, discs)]
    assert np.allclose(fit.flux_err, own_err, rtol=1e-5)
    assert np.allclose(fit.flux_err, expected_err, rtol=1e-2)
    residual = (data - SKY - wings - np.tensordot(expected, np.stack(columns), axes=1)) ** 2 / variance
    chi2 = [residual[d].sum() / (d.sum() - 1) for d in discs]
    assert np.allclose(fit.chi2, chi2, rtol=1e-4)


@pytest.mark.parametrize("change, message", [
    (dict(data=np.zeros(100)), "data must be a 2-d"),
    (dict(x=np.zeros(3)), "x and y must be 1-d arrays of the same length"),
    (dict(background=np.zeros((5, 5))), "background must have the shape of data"),
    (dict(variance=np.ones((30, 20))), "variance must have the shape of data"),
    (dict(mask=np.zeros((20, 20), bool)), "mask must have the shape of data"),
    (dict(fit_radius=0.0), "fit_radius > 0"),
    (dict(fit_radius=np.nan), "fit_radius > 0"),
    (dict(fit_radius=5.0, model_radius=4.0), "model_radius >= fit_radius"),
    (dict(gain=0.0), "gain > 0"),
    (dict(gain=-2.0), "gain > 0"),
])
def test_invalid_input(change, message):
    shape = (20, 30)
    psf = moffat_psf(shape)
    args = dict(data=np.zeros(shape), x=np.array([10.0, 12.0]), y=np.array([8.0, 9.0]), background=0.0,
                variance=1.0, mask=None)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        deblended_psf_fluxes(args.pop("data"), args.pop("x"), args.pop("y"), psf, **args)
