"""Tests of improc.photometry_quality: PSF fluxes judged against aperture fluxes."""

from __future__ import annotations

import numpy as np
import pytest
import sep

from improc.photometry_quality import check_psf_photometry
from improc.psf_moffat import default_moffat, moffat_pixel_psf, moffat_stamps
from improc.psf_photometry import psf_fluxes

SHAPE = (300, 300)
NOISE = 5.0


def _field(rng, *, fwhm=4.0, beta=3.5):
    """25 isolated Moffat stars (S/N ~ 30 to 1000) on a noisy, sky-subtracted image."""
    g = np.arange(30.0, 280.0, 55.0)
    x, y = (a.ravel() + rng.uniform(-0.5, 0.5, a.size) for a in np.meshgrid(g, g))
    flux = 10 ** rng.uniform(3.3, 5.3, x.size)
    image = np.zeros(SHAPE)
    h = 25
    for xi, yi, fi in zip(x, y, flux):
        ix, iy = int(np.floor(xi + 0.5)), int(np.floor(yi + 0.5))
        image[iy - h:iy + h + 1, ix - h:ix + h + 1] += fi * moffat_stamps(fwhm, beta, size=2 * h + 1, dx=xi - ix,
                                                                         dy=yi - iy)[0]
    return image + rng.normal(0.0, NOISE, SHAPE), x, y, flux


def _psf_and_aperture(data, x, y, psf, fwhm):
    """PSF fluxes and 5-FWHM aperture fluxes corrected by the model's own fraction in them."""
    psf_fit = psf_fluxes(data, x, y, psf, background=0.0, variance=NOISE**2)
    radius = 5.0 * fwhm
    aper, aper_err, _ = sep.sum_circle(data, x, y, radius, err=NOISE, subpix=5)
    clip = psf.get_clip(150.0, 150.0)
    c = clip.shape[0] // 2
    fraction = sep.sum_circle(np.ascontiguousarray(clip), [float(c)], [float(c)], radius, subpix=5)[0][0]
    return psf_fit, aper / fraction, aper_err / fraction


def test_right_psf_is_trusted_and_a_wrong_one_is_not():
    rng = np.random.default_rng(1)
    data, x, y, _ = _field(rng)
    right = moffat_pixel_psf(default_moffat(fwhm=4.0), image_shape=SHAPE)
    psf_fit, aper, aper_err = _psf_and_aperture(data, x, y, right, 4.0)
    check = check_psf_photometry(psf_fit.flux, aper, psf_flux_err=psf_fit.flux_err, aper_flux_err=aper_err)
    assert check.trusted and check.verdict == "trusted"
    assert abs(check.median_mag) < 0.01 and check.n_stars >= 10
    # a PSF 25 % too narrow: PSF fluxes too faint (the aperture correction is the true profile's)
    narrow = moffat_pixel_psf(default_moffat(fwhm=3.0), image_shape=SHAPE)
    psf_fit = psf_fluxes(data, x, y, narrow, background=0.0, variance=NOISE**2)
    check = check_psf_photometry(psf_fit.flux, aper, psf_flux_err=psf_fit.flux_err, aper_flux_err=aper_err)
    assert not check.trusted and check.verdict == "offset" and check.median_mag > 0.03


def test_verdicts_on_plain_arrays():
    rng = np.random.default_rng(2)
    aper = np.full(30, 1e4)
    # two stars cannot verify anything; non-positive or NaN pairs are ignored
    check = check_psf_photometry([1e4, 1e4, -5.0, np.nan], [1e4, 1e4, 1e4, 1e4])
    assert check.verdict == "too_few_stars" and not check.trusted and check.n_stars == 2
    # a scatter of 0.1 mag among bright stars (errors 0.01 mag) is too much ...
    psf = aper * 10 ** (-0.4 * rng.normal(0.0, 0.1, 30))
    err = np.full(30, 1e2)
    check = check_psf_photometry(psf, aper, psf_flux_err=err, aper_flux_err=err)
    assert check.verdict == "scatter" and 0.07 < check.excess_scatter_mag < 0.13
    # ... unless the flux errors explain it (S/N 15: faint stars left out with min_snr 10)
    err = np.full(30, 1e4 / 15.0)
    check = check_psf_photometry(psf, aper, psf_flux_err=err, aper_flux_err=err, min_snr=10.0)
    assert check.verdict == "trusted" and check.excess_scatter_mag < 0.05
    assert check_psf_photometry(psf, aper, psf_flux_err=err, aper_flux_err=err).verdict == "too_few_stars"
    # three stars scattered by 0.2 mag: the median is not known to 0.03 mag
    check = check_psf_photometry(aper[:3] * 10 ** (-0.4 * np.array([0.2, -0.2, 0.0])), aper[:3])
    assert check.verdict == "uncertain" and check.median_err_mag > 0.03
    # a clean 0.05 mag offset
    check = check_psf_photometry(aper * 10 ** (-0.4 * 0.05), aper)
    assert check.verdict == "offset" and check.median_mag == pytest.approx(0.05)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"aper_flux must be a 1-d array of shape \(3,\)"):
        check_psf_photometry(np.ones(3), np.ones(2))
    with pytest.raises(ValueError, match="need min_stars >= 1"):
        check_psf_photometry(np.ones(3), np.ones(3), min_stars=0)
