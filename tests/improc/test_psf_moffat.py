"""Tests of improc.psf_moffat: the Moffat PSF fitted to a few stars, the no-star default, and
its PixelPSF.

Truth: stars rendered by `_true_stamps` below, an elliptical Moffat written independently of the
module (coordinates rotated onto the major axis, 9 x 9 samples per pixel, normalized with the
analytic total), on a sky with Poisson and read noise.
"""

from __future__ import annotations

import numpy as np
import pytest

from improc.extraction import extract_sources
from improc.psf import PixelPSF
from improc.psf_moffat import (DEFAULT_BETA, MoffatFitError, default_moffat, fit_moffat_psf, moffat_pixel_psf,
                               moffat_stamps, size_from_sources)
from improc.psf_photometry import psf_fluxes

SHAPE = (200, 300)
SKY, GAIN, READ_NOISE = 300.0, 2.0, 6.0      # ADU, e-/ADU, e-
TRUTH = dict(fwhm=3.6, beta=2.8, ellipticity=0.12, angle_deg=35.0)


def _true_stamps(dx, dy, *, size: int, fwhm: float, beta: float, ellipticity: float, angle_deg: float,
                 oversample: int = 9) -> np.ndarray:
    """Unit-flux pixel-integrated elliptical Moffat stamps (n, size, size), star at (dx, dy) from
    the central pixel's centre."""
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    a, b = alpha / np.sqrt(1.0 - ellipticity), alpha * np.sqrt(1.0 - ellipticity)
    th = np.radians(angle_deg)
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    grid = (np.arange(size)[:, None] - size // 2 + sub[None, :]).ravel()
    out = []
    for ddx, ddy in zip(np.atleast_1d(dx), np.atleast_1d(dy)):
        u, v = np.meshgrid(grid - ddx, grid - ddy)
        major, minor = u * np.cos(th) + v * np.sin(th), -u * np.sin(th) + v * np.cos(th)
        prof = (beta - 1) / (np.pi * a * b) * (1 + (major / a) ** 2 + (minor / b) ** 2) ** (-beta)
        out.append(prof.reshape(size, oversample, size, oversample).mean(axis=(1, 3)))
    return np.array(out)


def _image(x, y, flux, rng, *, shape=SHAPE, truth=TRUTH):
    """Stars on a sky with noise; returns data (sky included), the true variance and the noiseless stars."""
    stars = np.zeros(shape)
    h = 40
    for xi, yi, fi in zip(x, y, flux):
        ix, iy = int(np.floor(xi + 0.5)), int(np.floor(yi + 0.5))
        stamp = fi * _true_stamps(xi - ix, yi - iy, size=2 * h + 1, **truth)[0]
        y0, y1, x0, x1 = max(iy - h, 0), min(iy + h + 1, shape[0]), max(ix - h, 0), min(ix + h + 1, shape[1])
        stars[y0:y1, x0:x1] += stamp[y0 - iy + h:y1 - iy + h, x0 - ix + h:x1 - ix + h]
    variance = (SKY + stars) / GAIN + (READ_NOISE / GAIN) ** 2
    return SKY + stars + rng.normal(0.0, np.sqrt(variance)), variance, stars


BKG_VAR = SKY / GAIN + (READ_NOISE / GAIN) ** 2
X3, Y3 = np.array([50.3, 150.7, 240.2]), np.array([60.6, 140.1, 90.45])
FLUX3 = np.array([2e5, 8e4, 1.2e5])         # S/N ~ 500, 300, 380


def test_moffat_stamps_match_an_independent_profile():
    ours = moffat_stamps(TRUTH["fwhm"], TRUTH["beta"], ellipticity=TRUTH["ellipticity"],
                         angle_deg=TRUTH["angle_deg"], size=41, dx=[0.3, -0.45], dy=[-0.2, 0.1], oversample=9)
    truth = _true_stamps([0.3, -0.45], [-0.2, 0.1], size=41, **TRUTH)
    assert np.max(np.abs(ours - truth)) < 1e-6 * truth.max()
    # unit total flux: the stamp of 11 FWHM misses (1 + r**2/alpha**2)**(1 - beta) ~ 0.3 % at beta 2.8
    assert 0.99 < ours[0].sum() < 1.0


@pytest.mark.parametrize("n_stars", [2, 3])
def test_fit_recovers_the_moffat_and_psf_fluxes(n_stars):
    rng = np.random.default_rng(10 + n_stars)
    x, y, flux = X3[:n_stars], Y3[:n_stars], FLUX3[:n_stars]
    data, variance, _ = _image(x, y, flux, rng)
    start_x, start_y = x + rng.normal(0, 0.2, n_stars), y + rng.normal(0, 0.2, n_stars)
    fit = fit_moffat_psf(data, start_x, start_y, background=SKY, variance=BKG_VAR, fwhm_guess=4.5, gain=GAIN)
    assert fit.kind == "fitted" and not fit.is_default and fit.n_stars == n_stars and fit.beta_fitted
    assert abs(fit.fwhm / TRUTH["fwhm"] - 1) < 0.02
    assert abs(fit.beta / TRUTH["beta"] - 1) < 0.10
    assert abs(fit.ellipticity - TRUTH["ellipticity"]) < 0.02
    assert abs(fit.angle_deg - TRUTH["angle_deg"]) < 5.0
    # the errors are honest: the truth within 4 sigma
    assert abs(fit.fwhm - TRUTH["fwhm"]) < 4 * fit.fwhm_err and abs(fit.beta - TRUTH["beta"]) < 4 * fit.beta_err
    assert 0.9 < fit.chi2 < 1.1 and np.all(fit.star_chi2 < 1.3)
    np.testing.assert_allclose(fit.x, x, atol=0.02)
    np.testing.assert_allclose(fit.y, y, atol=0.02)
    np.testing.assert_allclose(fit.flux, flux, rtol=0.01)
    np.testing.assert_allclose(fit.sky, 0.0, atol=0.5)
    # PSF photometry with the rendered PixelPSF: total fluxes within 1 % (the stamp of 10 FWHM
    # misses ~0.3 % at beta 2.8), flux errors consistent
    psf = moffat_pixel_psf(fit, image_shape=SHAPE)
    measured = psf_fluxes(data, x, y, psf, background=SKY, variance=variance)
    np.testing.assert_allclose(measured.flux, flux, rtol=0.01)
    assert np.all(np.abs(measured.flux - flux * 0.997) < 4 * measured.flux_err + 0.002 * flux)


def test_fit_of_one_faint_star_fixes_beta():
    rng = np.random.default_rng(3)
    data, _, _ = _image([150.2], [100.3], [3000.0], rng)       # S/N ~ 25
    fit = fit_moffat_psf(data, [150.0], [100.0], background=SKY, variance=BKG_VAR, fwhm_guess=4.5, gain=GAIN)
    assert not fit.beta_fitted and fit.beta == DEFAULT_BETA and np.isnan(fit.beta_err)
    assert abs(fit.fwhm / TRUTH["fwhm"] - 1) < 0.15 and fit.fwhm_err < 0.3
    forced = fit_moffat_psf(data, [150.0], [100.0], background=SKY, variance=BKG_VAR, fwhm_guess=4.5,
                            beta=3.0, gain=GAIN)
    assert forced.beta == 3.0 and not forced.beta_fitted


def test_fit_ignores_a_neighbour_and_masked_pixels():
    rng = np.random.default_rng(4)
    x, y, flux = X3, Y3, FLUX3
    data, _, _ = _image(np.r_[x, x[0] + 9.0], np.r_[y, y[0] - 5.0], np.r_[flux, 0.05 * flux[0]], rng)
    x, y = np.r_[x, np.nan, 400.0], np.r_[y, 10.0, 10.0]      # an invalid position and one off the image
    mask = np.zeros(SHAPE, bool)
    data[int(y[1]) - 1, int(x[1]) + 2] = 1e6            # a masked hot pixel next to a star's core
    mask[int(y[1]) - 1, int(x[1]) + 2] = True
    data[int(y[2]) + 8, int(x[2]) - 8] += 5000.0         # an unmasked cosmic ray in a wing
    fit = fit_moffat_psf(data, x, y, background=SKY, variance=BKG_VAR, fwhm_guess=4.5, gain=GAIN, mask=mask)
    assert fit.n_stars == 3 and fit.index.tolist() == [0, 1, 2]
    assert abs(fit.fwhm / TRUTH["fwhm"] - 1) < 0.02 and abs(fit.beta / TRUTH["beta"] - 1) < 0.10
    np.testing.assert_allclose(fit.flux, flux, rtol=0.01)


def test_fit_errors():
    data = np.zeros(SHAPE)
    with pytest.raises(MoffatFitError, match="no usable star for the Moffat fit: 2 given"):
        fit_moffat_psf(data, [-10.0, np.nan], [5.0, 5.0], background=0.0, variance=1.0, fwhm_guess=3.0)
    mask = np.ones(SHAPE, bool)
    with pytest.raises(MoffatFitError, match="none on the image with at least half of its core unmasked"):
        fit_moffat_psf(data, [50.0], [50.0], background=0.0, variance=1.0, fwhm_guess=3.0, mask=mask)
    with pytest.raises(ValueError, match="fwhm_guess must be a finite number > 0"):
        fit_moffat_psf(data, [50.0], [50.0], background=0.0, variance=1.0, fwhm_guess=-1.0)
    with pytest.raises(ValueError, match="stamp_size must be an odd integer >= 5"):
        fit_moffat_psf(data, [50.0], [50.0], background=0.0, variance=1.0, fwhm_guess=3.0, stamp_size=10)
    with pytest.raises(ValueError, match="beta must be None or within beta_bounds"):
        fit_moffat_psf(data, [50.0], [50.0], background=0.0, variance=1.0, fwhm_guess=3.0, beta=1.2)
    with pytest.raises(ValueError, match="variance must have the shape of data"):
        fit_moffat_psf(data, [50.0], [50.0], background=0.0, variance=np.ones((3, 3)), fwhm_guess=3.0)
    with pytest.raises(ValueError, match="beta must be a finite number > 1"):
        moffat_stamps(3.0, 1.0, size=11)


def test_default_matches_the_sources_size():
    """The no-star default has the size the extraction measures for stars of the true profile."""
    rng = np.random.default_rng(5)
    truth = dict(fwhm=4.0, beta=DEFAULT_BETA, ellipticity=0.0, angle_deg=0.0)
    g = np.arange(30.0, 280.0, 50.0)
    x, y = (a.ravel() + rng.uniform(-0.5, 0.5, a.size) for a in np.meshgrid(g, g[:4]))
    data, _, _ = _image(x, y, 10 ** rng.uniform(4.3, 5.3, x.size), rng, truth=truth)
    table = extract_sources(data, background=SKY, noise=np.sqrt(BKG_VAR), gain=GAIN)
    size = size_from_sources(table["fwhm"], table["snr"], flags=table["flags"])
    assert size == pytest.approx(table.meta["fwhm"], rel=0.01)
    fit = default_moffat(size)
    assert fit.is_default and fit.kind == "default" and fit.n_stars == 0 and not fit.beta_fitted
    assert fit.beta == DEFAULT_BETA and np.isnan(fit.chi2) and fit.x.size == 0
    assert abs(fit.fwhm / truth["fwhm"] - 1) < 0.02
    # fewer than 5 sources: their median; none: an error
    assert size_from_sources([4.0, 5.0, 4.2, 0.4], [30.0, 50.0, 8.0, 40.0]) == pytest.approx(4.5)
    with pytest.raises(MoffatFitError, match=r"no source with snr >= 10.0, no flags and a size >= 1.5 pixels"):
        size_from_sources([4.0, 1.0], [5.0, 30.0])
    # a seeing from elsewhere (e.g. the header)
    assert default_moffat(fwhm=4.2).fwhm == 4.2
    with pytest.raises(ValueError, match="size_fwhm must be a finite number"):
        default_moffat(0.1)
    with pytest.raises(ValueError, match="give exactly one of size_fwhm"):
        default_moffat(4.0, fwhm=3.0)


def test_pixel_psf_is_the_normalized_moffat():
    fit = default_moffat(5.0)
    psf = moffat_pixel_psf(fit, image_shape=SHAPE)
    assert isinstance(psf, PixelPSF) and psf.degree == 0 and psf.size == 2 * int(np.ceil(5 * fit.fwhm)) + 1
    assert psf.image_at(10.0, 190.0).sum() == pytest.approx(1.0)
    stamp = moffat_stamps(fit.fwhm, fit.beta, size=psf.size, dx=0.3, dy=-0.4)[0]
    clip = psf.get_clip(100.3, 49.6)                     # the Fourier shift of the model
    assert np.max(np.abs(clip - stamp / stamp.sum())) < 2e-3 * stamp.max()
    # the measured FWHM is that of the pixel-integrated profile, slightly larger
    assert fit.fwhm < psf.fwhm_pixels < 1.05 * fit.fwhm
    again = PixelPSF.from_arrays(psf.to_arrays())
    np.testing.assert_array_equal(again.basis, psf.basis)
    with pytest.raises(ValueError, match="stamp_size must be an odd integer >= 3"):
        moffat_pixel_psf(fit, image_shape=SHAPE, stamp_size=4)
