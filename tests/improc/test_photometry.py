"""Tests of improc.photometry: zero points, color terms, aperture corrections, limiting magnitudes."""

from __future__ import annotations

import numpy as np
import pytest
from photutils.aperture import CircularAperture

from improc.photometry import (PhotometryError, aperture_corrections, fit_zero_point, limiting_magnitude,
                               noise_equivalent_area)

ZP = 31.0
GAIN, SKY_VAR = 4.0, 2500.0  # e-/ADU; background variance inside a PSF footprint, ADU^2


def make_stars(rng, n=300, *, color_term=0.0, n_outliers=30):
    """Catalog magnitudes, colors and measured fluxes for a known zero point (and color term)."""
    mag = rng.uniform(15.0, 21.0, n)
    color = rng.uniform(0.3, 2.8, n)
    flux = 10 ** (-0.4 * (mag - ZP - color_term * color))
    flux_err = np.sqrt(flux / GAIN + SKY_VAR)
    measured = flux + rng.normal(0.0, flux_err)
    cat_err = np.full(n, 0.01)
    cat_mag = mag + rng.normal(0.0, cat_err)
    outliers = rng.choice(n, n_outliers, replace=False)  # variables, blends, bad matches
    cat_mag[outliers] += rng.choice([-1, 1], n_outliers) * rng.uniform(0.2, 2.0, n_outliers)
    return measured, flux_err, cat_mag, cat_err, color, outliers


def test_zero_point_with_noise_and_outliers():
    errors = []
    for seed in range(5):
        flux, flux_err, cat_mag, cat_err, _, outliers = make_stars(np.random.default_rng(seed))
        fit = fit_zero_point(flux, flux_err, cat_mag, cat_err)
        errors.append(fit.zp - ZP)
        assert not fit.used[outliers].any()
        assert fit.n_stars >= 300 - 30 - 6
        assert abs(fit.zp - ZP) < 4 * fit.dzp and 3e-4 < fit.dzp < 3e-3
        assert 0.01 < fit.scatter < 0.03
        assert fit.color_term == 0.0 and fit.dcolor_term == 0.0
    assert np.max(np.abs(errors)) < 0.003


def test_color_term_recovered():
    for seed in range(3):
        flux, flux_err, cat_mag, cat_err, color, outliers = make_stars(np.random.default_rng(10 + seed),
                                                                       color_term=0.08)
        fit = fit_zero_point(flux, flux_err, cat_mag, cat_err, color=color, color_term="fit")
        assert abs(fit.color_term - 0.08) < 0.005 and abs(fit.color_term - 0.08) < 4 * fit.dcolor_term
        assert abs(fit.zp - ZP) < 0.008 and abs(fit.zp - ZP) < 4 * fit.dzp
        assert not fit.used[outliers].any()
        # Ignoring the color term leaves the mean color times the term in the zero point.
        plain = fit_zero_point(flux, flux_err, cat_mag, cat_err)
        assert abs(plain.zp - (ZP + 0.08 * np.mean(color))) < 0.01


def test_zero_point_ignores_unusable_stars():
    flux, flux_err, cat_mag, cat_err, _, _ = make_stars(np.random.default_rng(20), n_outliers=0)
    flux[:5] = [0.0, -10.0, np.nan, np.inf, 100.0]
    cat_mag[4] = np.nan
    fit = fit_zero_point(flux, flux_err, cat_mag, cat_err)
    assert not fit.used[:5].any() and abs(fit.zp - ZP) < 0.003


def test_zero_point_errors():
    flux, flux_err, cat_mag, _, _, _ = make_stars(np.random.default_rng(21), n=4, n_outliers=0)
    with pytest.raises(PhotometryError, match=r"only 4 stars with positive flux .* need >= 5"):
        fit_zero_point(flux, flux_err, cat_mag)
    with pytest.raises(ValueError, match="flux_err must have length 4"):
        fit_zero_point(flux, flux_err[:3], cat_mag)
    with pytest.raises(ValueError, match="color_term='fit' needs color"):
        fit_zero_point(flux, flux_err, cat_mag, color_term="fit")
    with pytest.raises(ValueError, match="color_term must be 'none' or 'fit', got 'yes'"):
        fit_zero_point(flux, flux_err, cat_mag, color_term="yes")
    assert issubclass(PhotometryError, ValueError)


def moffat_stamp(size, alpha, beta, x0, y0, oversample=5):
    """Pixel-integrated (by oversampling) Moffat profile with unit total flux over the plane."""
    sub = (np.arange(size * oversample) + 0.5) / oversample - 0.5
    xx, yy = np.meshgrid(sub - x0, sub - y0)
    profile = (beta - 1) / (np.pi * alpha ** 2) * (1 + (xx ** 2 + yy ** 2) / alpha ** 2) ** (-beta)
    return profile.reshape(size, oversample, size, oversample).sum(axis=(1, 3)) / oversample ** 2


def test_aperture_corrections_recover_moffat_curve_of_growth():
    """Exact circular apertures on rendered, noisy Moffat stars; reference = true total flux."""
    rng = np.random.default_rng(30)
    alpha, beta = 3.0, 3.0  # FWHM = 2 alpha sqrt(2^(1/beta) - 1) = 3.06 pixels
    radii = [2.0, 3.0, 4.5, 6.0, 9.0]
    apfluxes, totals, truth = [], [], []
    for _ in range(40):
        x0, y0 = 30 + rng.uniform(-0.5, 0.5, 2)
        total = 10 ** rng.uniform(5.0, 6.0)
        model = moffat_stamp(61, alpha, beta, x0, y0)
        image = total * model + rng.normal(0.0, np.sqrt(total * model / GAIN + 25.0))
        apertures = [CircularAperture((x0, y0), r=radius) for radius in radii]
        apfluxes.append([ap.do_photometry(image, method="exact")[0][0] for ap in apertures])
        truth.append([2.5 * np.log10(ap.do_photometry(model, method="exact")[0][0]) for ap in apertures])
        totals.append(total)
    apcor = aperture_corrections(np.array(apfluxes), np.array(totals), weights=np.array(totals))
    np.testing.assert_allclose(apcor, np.mean(truth, axis=0), atol=0.005)
    assert np.all(np.diff(apcor) > 0) and np.all(apcor < 0) and apcor[0] < -0.5


def test_aperture_corrections_analytic_with_outliers_and_default_reference():
    rng = np.random.default_rng(31)
    radii = np.array([2.0, 3.0, 4.0, 6.0, 8.0, 12.0])
    growth = 1 - (1 + (radii / 3.0) ** 2) ** (1 - 3.0)  # Moffat enclosed fraction
    totals = 10 ** rng.uniform(4.5, 6.0, 60)
    ap = totals[:, None] * growth[None, :]
    ap = ap + rng.normal(0.0, np.sqrt(ap / GAIN + np.pi * radii ** 2 * 100.0))
    ap[:4, :3] *= 0.5  # neighbours in the small apertures' sky annulus, say
    apcor = aperture_corrections(ap, totals, weights=totals)
    np.testing.assert_allclose(apcor, 2.5 * np.log10(growth), atol=0.005)
    relative = aperture_corrections(ap)  # reference = largest aperture
    assert relative[-1] == 0.0
    np.testing.assert_allclose(relative, 2.5 * np.log10(growth / growth[-1]), atol=0.005)


def test_aperture_corrections_errors():
    with pytest.raises(ValueError, match=r"apfluxes must have shape \(n, n_ap\)"):
        aperture_corrections(np.ones(5))
    with pytest.raises(ValueError, match="reference_flux and weights must have length 3"):
        aperture_corrections(np.ones((3, 2)), np.ones(4))
    bad = np.ones((4, 2))
    bad[:2, 0] = -1.0
    with pytest.raises(PhotometryError, match="aperture 0 has only 2 stars with positive fluxes, need >= 3"):
        aperture_corrections(bad)


def test_limiting_magnitude_matches_monte_carlo_psf_photometry():
    """Optimal PSF photometry of stars at the predicted limit has S/N = 5."""
    rng = np.random.default_rng(40)
    fwhm, noise = 4.0, 12.0
    sigma = fwhm / 2.3548
    yy, xx = np.mgrid[:41, :41] - 20.0
    psf = np.exp(-(xx ** 2 + yy ** 2) / (2 * sigma ** 2))
    psf /= psf.sum()
    m_lim = limiting_magnitude(fwhm_pixels=fwhm, sky_noise_adu=noise, zero_point=ZP)
    flux = 10 ** (-0.4 * (m_lim - ZP))
    images = flux * psf + rng.normal(0.0, noise, (4000, 41, 41))
    estimates = np.tensordot(images, psf, axes=2) / np.sum(psf ** 2)  # optimal linear PSF flux
    assert abs(flux / np.std(estimates) - 5.0) < 0.15
    assert abs(np.mean(estimates) / flux - 1) < 0.02
    # One magnitude deeper needs 2.5x less noise; a 10-sigma limit is 0.753 mag brighter.
    deeper = limiting_magnitude(fwhm_pixels=fwhm, sky_noise_adu=noise / 2.5, zero_point=ZP)
    assert deeper == pytest.approx(m_lim + 0.995, abs=1e-3)
    ten_sigma = limiting_magnitude(fwhm_pixels=fwhm, sky_noise_adu=noise, zero_point=ZP, snr=10)
    assert ten_sigma == pytest.approx(m_lim - 0.7526, abs=1e-3)


def test_noise_equivalent_area_gaussian_and_stamp():
    fwhm = 3.5
    sigma = fwhm / 2.3548
    assert noise_equivalent_area(fwhm_pixels=fwhm) == pytest.approx(4 * np.pi * sigma ** 2, rel=1e-4)
    yy, xx = np.mgrid[:51, :51] - 25.0
    gauss = np.exp(-(xx ** 2 + yy ** 2) / (2 * sigma ** 2))
    assert noise_equivalent_area(psf=3.0 * gauss) == pytest.approx(4 * np.pi * sigma ** 2, rel=0.01)
    # A Moffat with the same FWHM has wings: larger noise area, brighter limit.
    beta = 2.5
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
    moffat = (1 + (xx ** 2 + yy ** 2) / alpha ** 2) ** (-beta)
    assert noise_equivalent_area(psf=moffat) > 1.2 * noise_equivalent_area(fwhm_pixels=fwhm)
    m_gauss = limiting_magnitude(fwhm_pixels=fwhm, sky_noise_adu=10.0, zero_point=ZP)
    m_moffat = limiting_magnitude(fwhm_pixels=fwhm, psf=moffat, sky_noise_adu=10.0, zero_point=ZP)
    assert m_moffat < m_gauss
    with pytest.raises(ValueError, match="fwhm_pixels must be > 0 when no psf stamp is given, got None"):
        noise_equivalent_area()
    with pytest.raises(ValueError, match="psf must be a 2-D stamp with positive sum"):
        noise_equivalent_area(psf=np.zeros((5, 5)))
    with pytest.raises(ValueError, match="sky_noise_adu and snr must be > 0, got -1.0 and 5.0"):
        limiting_magnitude(fwhm_pixels=3.0, sky_noise_adu=-1.0, zero_point=ZP)
