"""Tests of improc.psf_photometry: PSF fluxes with a fitted PixelPSF, and PSF star selection."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from improc.psf_fit import fit_psf
from improc.psf_photometry import psf_fluxes, render_sources, select_psf_stars
from tests.improc.test_psf import READ_NOISE, SKY, grid_positions, star_field

SHAPE = (2048, 2048)
N_BRIGHT = 250


@pytest.fixture(scope="module")
def field():
    """~950 isolated stars: 250 bright ones build the PSF, all are measured."""
    rng = np.random.default_rng(2024)
    x, y = grid_positions(SHAPE, 64, rng)
    flux = np.r_[10 ** rng.uniform(np.log10(3e4), 6, N_BRIGHT),
                 10 ** rng.uniform(3, np.log10(3e4), x.size - N_BRIGHT)]
    data, variance, _ = star_field(SHAPE, x, y, flux, seed=5)
    psf = fit_psf(data, x[:N_BRIGHT], y[:N_BRIGHT], background=0.0, noise=np.sqrt(SKY + READ_NOISE**2),
                  fwhm_guess=3.8)
    return data, variance, x, y, flux, psf


@pytest.mark.parametrize("fit_radius", [None, 4.0, 15.0])
def test_fluxes_unbiased_with_right_errors(field, fit_radius):
    data, variance, x, y, flux, psf = field
    result = psf_fluxes(data, x, y, psf, background=0.0, variance=variance, fit_radius=fit_radius)
    rel = result.flux / flux - 1.0
    pull = (result.flux - flux) / result.flux_err
    weights = (flux / result.flux_err) ** 2
    assert abs(np.average(rel, weights=weights)) < 0.005      # optimal average, all stars
    assert abs(np.mean(rel[:N_BRIGHT])) < 0.005
    assert 0.9 < np.std(pull) < 1.1
    assert 0.9 < np.std(pull[N_BRIGHT:]) < 1.1
    assert abs(np.mean(pull[N_BRIGHT:])) < 0.15
    assert 0.9 < np.median(result.chi2) < 1.1


def test_wrong_psf_is_seen_in_chi2(field):
    """Stars blurred beyond the PSF: their PSF fluxes come out low and the chi-square high."""
    data, variance, x, y, flux, psf = field
    blurred = gaussian_filter(data, 1.2)
    result = psf_fluxes(blurred, x[:N_BRIGHT], y[:N_BRIGHT], psf, background=0.0, variance=variance)
    assert np.median(result.chi2) > 3.0
    assert np.median(result.flux / flux[:N_BRIGHT]) < 0.97


def test_masked_and_edge_stars(field):
    data, variance, x, y, flux, psf = field
    k = N_BRIGHT + 3
    ix, iy = int(np.floor(x[k] + 0.5)), int(np.floor(y[k] + 0.5))
    mask = np.zeros(SHAPE, dtype=bool)
    mask[iy, ix] = True
    spoiled = data.copy()
    spoiled[iy, ix] = 1e9           # hidden by the mask
    spoiled[iy + 1, ix] = np.nan    # non-finite pixels are skipped
    plain = psf_fluxes(data, x[k:k + 1], y[k:k + 1], psf, background=0.0, variance=variance)
    masked = psf_fluxes(spoiled, x[k:k + 1], y[k:k + 1], psf, background=0.0, variance=variance, mask=mask)
    assert masked.flux[0] == pytest.approx(flux[k], abs=4 * masked.flux_err[0])
    assert masked.flux_err[0] > plain.flux_err[0]
    # a star half off the image is measured from what is left; one far outside gives NaN
    edge = psf_fluxes(data, np.array([-0.4, -100.0, np.nan]), np.array([500.0, 500.0, 3.0]), psf,
                      background=0.0, variance=variance)
    assert np.isfinite(edge.flux[0]) and np.isfinite(edge.flux_err[0])
    assert np.all(np.isnan(edge.flux[1:])) and np.all(np.isnan(edge.chi2[1:]))


def test_scalar_background_and_variance_and_empty_list(field):
    data, variance, x, y, flux, psf = field
    shifted = psf_fluxes(data + 100.0, x[:50], y[:50], psf, background=100.0, variance=SKY + READ_NOISE**2)
    exact = psf_fluxes(data, x[:50], y[:50], psf, background=np.zeros(SHAPE), variance=SKY + READ_NOISE**2)
    assert np.allclose(shifted.flux, exact.flux, rtol=1e-9)
    empty = psf_fluxes(data, np.array([]), np.array([]), psf, background=0.0, variance=1.0)
    assert empty.flux.shape == (0,)


def test_bad_arguments(field):
    data, variance, x, y, flux, psf = field
    with pytest.raises(ValueError, match=r"variance must have the shape of data \(2048, 2048\), got \(10, 10\)"):
        psf_fluxes(data, x, y, psf, background=0.0, variance=np.ones((10, 10)))
    with pytest.raises(ValueError, match=r"mask must have the shape of data"):
        psf_fluxes(data, x, y, psf, background=0.0, variance=1.0, mask=np.zeros(5, bool))
    with pytest.raises(ValueError, match="fit_radius must be > 0, got -2.0"):
        psf_fluxes(data, x, y, psf, background=0.0, variance=1.0, fit_radius=-2.0)
    with pytest.raises(ValueError, match="x and y must be 1-d arrays of the same length"):
        psf_fluxes(data, x, y[:3], psf, background=0.0, variance=1.0)


def catalogue():
    """Nine sources; only the first two should be chosen as PSF stars."""
    x = np.array([500.0, 800.0, 300.0, 1200.0, 1210.0, 10.0, 700.0, 1500.0, 900.0])
    y = np.array([500.0, 800.0, 300.0, 1200.0, 1205.0, 900.0, 100.0, 1500.0, 1800.0])
    flux = np.array([1e5, 2e5, 1e5, 1e5, 5e4, 1e5, 1e5, 1e5, 1e5])
    snr = np.array([200.0, 300.0, 20.0, 200.0, 150.0, 200.0, 200.0, 200.0, 200.0])
    flags = np.array([0, 0, 0, 0, 0, 0, 1, 0, 0])
    fwhm = np.array([3.8, 3.9, 3.8, 3.8, 3.8, 3.8, 3.8, 8.0, 3.7])
    peak = np.array([1e4, 2e4, 1e4, 1e4, 1e4, 1e4, 1e4, 1e4, 6e4])
    return x, y, flux, snr, flags, fwhm, peak


def test_render_sources_adds_every_clip_and_drops_what_is_off_the_image():
    from tests.improc.test_psf import gaussian_psf

    psf = gaussian_psf()
    shape, h = (40, 30), psf.size // 2
    x = np.array([15.2, 0.4, 29.3, -3.0, 12.0, 12.0, 45.0, 10.0, 5.0])
    y = np.array([20.1, 0.3, 39.4, 10.0, -50.0, 20.0, 20.0, 5.0, np.nan])
    flux = np.array([100.0, 50.0, 70.0, 30.0, 10.0, 20.0, 5.0, -1.0, 9.0])
    model = render_sources(shape, x, y, flux, psf)
    pad = 100       # room for every whole clip
    big = np.zeros((shape[0] + 2 * pad, shape[1] + 2 * pad))
    for xi, yi, fi in zip(x[:7], y[:7], flux[:7]):
        ix, iy = int(np.floor(xi + 0.5)) + pad, int(np.floor(yi + 0.5)) + pad
        big[iy - h:iy + h + 1, ix - h:ix + h + 1] += psf.get_clip(xi, yi, fi)
    np.testing.assert_allclose(model, big[pad:-pad, pad:-pad], atol=1e-12)
    assert model.sum() < 285.0 and model[20, 15] > 0      # partly off the image; negative flux, NaN left out


def test_select_psf_stars():
    x, y, flux, snr, flags, fwhm, peak = catalogue()
    chosen = select_psf_stars(x, y, flux, snr, flags, fwhm, image_shape=(2048, 2048), peak=peak,
                              saturation=5e4)
    # 2: faint; 3 and 4: each other's neighbour; 5: at the edge; 6: flagged; 7: too broad; 8: saturated
    assert chosen.tolist() == [True, True, False, False, False, False, False, False, False]
    # a faint enough neighbour does not count; the saturation cut needs both peak and saturation
    relaxed = select_psf_stars(x, y, flux, snr, flags, fwhm, image_shape=(2048, 2048), min_snr=10,
                               neighbor_flux_ratio=0.6, edge_margin=5.0)
    assert relaxed.tolist() == [True, True, True, True, False, True, False, False, True]


def test_select_psf_stars_bad_input():
    x, y, flux, snr, flags, fwhm, _ = catalogue()
    with pytest.raises(ValueError, match=r"snr must have the shape of x \(9,\), got \(3,\)"):
        select_psf_stars(x, y, flux, snr[:3], flags, fwhm, image_shape=(2048, 2048))
    with pytest.raises(ValueError, match="fwhm_tolerance > 0"):
        select_psf_stars(x, y, flux, snr, flags, fwhm, image_shape=(2048, 2048), fwhm_tolerance=0.0)
    none = select_psf_stars(x, y, flux, snr, flags, fwhm, image_shape=(2048, 2048), min_snr=1e6)
    assert not none.any()
