"""Photometric calibration: zero points, aperture corrections and limiting magnitudes.

Conventions used throughout (magnitudes in the catalog's system, fluxes in ADU):

* zero point:            ``mag = -2.5 log10(flux) + zp``  (``+ color_term * color`` if fitted)
* aperture correction:   ``mag_total = -2.5 log10(apflux_i) + zp + apcor_i``, so ``apcor_i`` is
  ``2.5 log10(apflux_i / flux_total)`` and is negative for an aperture that misses light.
* limiting magnitude:    the magnitude of a point source measured at ``snr`` by optimal (PSF-fit)
  photometry on a background-limited image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from improc.errors import BadDataError

__all__ = [
    "ColorTermMode",
    "PhotometryError",
    "ZeroPointFit",
    "fit_zero_point",
    "aperture_corrections",
    "noise_equivalent_area",
    "limiting_magnitude",
]

#: ``"none"``: fit the zero point only; ``"fit"``: also fit a linear color term.
ColorTermMode = Literal["none", "fit"]

_MAG_PER_FRAC = 2.5 / np.log(10.0)  # 1.0857: d(mag) = 1.0857 d(flux) / flux
_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


class PhotometryError(BadDataError):
    """Photometric calibration failed; the message carries the numbers (stars, limits)."""


@dataclass(frozen=True)
class ZeroPointFit:
    """Result of `fit_zero_point`.

    Attributes
    ----------
    zp : float
        Zero point: ``mag = -2.5 log10(flux) + zp + color_term * color``, i.e. the zero point
        of a star of color 0 when a color term is fitted.
    dzp : float
        1-sigma uncertainty of ``zp`` (formal, scaled up by sqrt(reduced chi^2) when that exceeds 1).
    color_term : float
        Coefficient of ``color`` (0.0 when not fitted).
    dcolor_term : float
        Its uncertainty (0.0 when not fitted).
    n_stars : int
        Number of stars used after clipping.
    used : numpy.ndarray
        Shape (n,) bool, the stars used.
    scatter : float
        Root mean square of the magnitude residuals of the used stars.
    """

    zp: float
    dzp: float
    color_term: float
    dcolor_term: float
    n_stars: int
    used: np.ndarray
    scatter: float


def _as_1d(name: str, values, n: int | None = None) -> np.ndarray:
    array = np.asarray(values, dtype=float).ravel()
    if n is not None and len(array) != n:
        raise ValueError(f"{name} must have length {n} like instrumental_flux, got {len(array)}")
    return array


def _robust_std(values: np.ndarray) -> float:
    """1.4826 times the median absolute deviation from the median."""
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def _weighted_fit(design: np.ndarray, target: np.ndarray, sigma: np.ndarray):
    """Weighted least squares: coefficients, their covariance and the reduced chi^2."""
    a, b = design / sigma[:, None], target / sigma
    coef, *_ = np.linalg.lstsq(a, b, rcond=None)
    dof = max(len(target) - design.shape[1], 1)
    chi2_red = float(np.sum((b - a @ coef) ** 2) / dof)
    return coef, np.linalg.inv(a.T @ a), chi2_red


def _clipped_selection(design: np.ndarray, diff: np.ndarray, sigma: np.ndarray, valid: np.ndarray, *,
                       clip_sigma: float, min_stars: int, max_iter: int, start_width: float) -> np.ndarray:
    """Stars kept by iterative weighted fitting and clipping of normalised residuals.

    Starts robustly from the stars within max(5 MAD-sigma, start_width) of the median of diff;
    then clips beyond ``clip_sigma`` times the robust scatter of the normalised residuals, or of
    their expected scatter (1) if that is larger.
    """
    start = max(5.0 * _robust_std(diff[valid]), start_width)
    used = valid & (np.abs(diff - np.median(diff[valid])) <= start)
    for _ in range(max_iter):
        if used.sum() < min_stars:
            break
        coef, _, _ = _weighted_fit(design[used], diff[used], sigma[used])
        z = np.where(valid, (diff - design @ coef) / sigma, np.inf)
        # never tighter than the stars' own errors: with a few stars, a MAD of agreeing stars far
        # below their errors would clip the others for deviating by 1-2 sigma
        new_used = valid & (np.abs(z) <= clip_sigma * max(_robust_std(z[used]), 1.0))
        if np.array_equal(new_used, used):
            break
        used = new_used
    return used


def fit_zero_point(instrumental_flux: np.ndarray, flux_err: np.ndarray, catalog_mag: np.ndarray,
                   catalog_mag_err: np.ndarray | None = None, *, color: np.ndarray | None = None,
                   color_term: ColorTermMode = "none", clip_sigma: float = 3.0, min_stars: int = 5,
                   error_floor: float = 0.01, max_iter: int = 10) -> ZeroPointFit:
    """Sigma-clipped weighted fit of the zero point (and optionally a color term).

    Each star contributes ``catalog_mag + 2.5 log10(flux) = zp (+ color_term * color)`` with
    variance ``(1.0857 flux_err / flux)^2 + catalog_mag_err^2 + error_floor^2``.  The fit starts
    from the median, then alternately fits and rejects stars whose normalised residual exceeds
    ``clip_sigma`` times the robust (MAD) scatter of the normalised residuals (at least 1: a star
    is never rejected for deviating less than ``clip_sigma`` times its own error); rejected stars
    can return.

    Parameters
    ----------
    instrumental_flux : numpy.ndarray
        Shape (n,) fluxes in ADU; stars with flux <= 0 or non-finite values are not used.
    flux_err : numpy.ndarray
        Shape (n,) 1-sigma flux uncertainties, ADU.
    catalog_mag : numpy.ndarray
        Shape (n,) reference magnitudes in the image's band (e.g. from
        `improc.color_transforms.gaia_to_band`).
    catalog_mag_err : numpy.ndarray or None
        Shape (n,) reference magnitude uncertainties; None means 0.
    color : numpy.ndarray or None
        Shape (n,) color of each star (e.g. Gaia BP - RP); needed when ``color_term="fit"``.
    color_term : {"none", "fit"}
        Whether to fit a linear color term.
    clip_sigma : float
        Rejection threshold in units of the robust scatter.
    min_stars : int
        Fewest usable stars accepted (before and after clipping).
    error_floor : float
        Magnitude error added in quadrature to every star (catalog transformation errors,
        flat-field structure), so that the brightest stars do not dominate alone.
    max_iter : int
        Largest number of fit-and-clip iterations.

    Returns
    -------
    ZeroPointFit

    Raises
    ------
    PhotometryError
        If fewer than ``min_stars`` stars are usable or survive clipping.
    ValueError
        If array lengths disagree, ``color`` is missing for ``color_term="fit"``, or an
        option is out of range.
    """
    flux = _as_1d("instrumental_flux", instrumental_flux)
    n = len(flux)
    ferr, mag = _as_1d("flux_err", flux_err, n), _as_1d("catalog_mag", catalog_mag, n)
    mag_err = np.zeros(n) if catalog_mag_err is None else _as_1d("catalog_mag_err", catalog_mag_err, n)
    if color_term not in ("none", "fit"):
        raise ValueError(f"color_term must be 'none' or 'fit', got {color_term!r}")
    if color_term == "fit" and color is None:
        raise ValueError("color_term='fit' needs color, got None")
    if not clip_sigma > 0 or error_floor < 0 or min_stars < 2:
        raise ValueError(f"need clip_sigma > 0, error_floor >= 0, min_stars >= 2; got {clip_sigma}, "
                         f"{error_floor}, {min_stars}")
    col = np.zeros(n) if color is None else _as_1d("color", color, n)

    with np.errstate(divide="ignore", invalid="ignore"):
        m_inst = -2.5 * np.log10(flux)
        sigma = np.sqrt((_MAG_PER_FRAC * ferr / flux) ** 2 + mag_err ** 2 + error_floor ** 2)
    valid = (flux > 0) & np.isfinite(m_inst) & np.isfinite(mag) & np.isfinite(sigma) & (sigma > 0)
    if color_term == "fit":
        valid &= np.isfinite(col)
    if valid.sum() < min_stars:
        raise PhotometryError(f"only {valid.sum()} stars with positive flux and finite magnitudes, "
                              f"need >= {min_stars}")
    diff = np.where(valid, mag - m_inst, 0.0)  # placeholders keep invalid stars out of the arithmetic
    sigma = np.where(valid, sigma, 1.0)
    design = np.column_stack([np.ones(n), col]) if color_term == "fit" else np.ones((n, 1))
    used = _clipped_selection(design, diff, sigma, valid, clip_sigma=clip_sigma, min_stars=min_stars,
                              max_iter=max_iter, start_width=max(5.0 * error_floor, 1e-6))
    if used.sum() < min_stars:
        raise PhotometryError(f"only {used.sum()} of {valid.sum()} stars survive {clip_sigma}-sigma "
                              f"clipping, need >= {min_stars}")
    coef, cov, chi2_red = _weighted_fit(design[used], diff[used], sigma[used])
    err = np.sqrt(np.diag(cov) * max(chi2_red, 1.0))
    resid = diff[used] - design[used] @ coef
    fitted = color_term == "fit"
    return ZeroPointFit(zp=float(coef[0]), dzp=float(err[0]), color_term=float(coef[1]) if fitted else 0.0,
                        dcolor_term=float(err[1]) if fitted else 0.0, n_stars=int(used.sum()), used=used,
                        scatter=float(np.sqrt(np.mean(resid ** 2))))


def aperture_corrections(apfluxes: np.ndarray, reference_flux: np.ndarray | None = None, *,
                         weights: np.ndarray | None = None, mag_errors: np.ndarray | None = None,
                         clip_sigma: float = 3.0, min_stars: int = 3) -> np.ndarray:
    """Magnitude corrections from each aperture to a reference ("total") flux.

    Sign convention: ``mag_total = -2.5 log10(apflux_i) + zp + apcor_i``, so
    ``apcor_i = 2.5 log10(apflux_i / reference_flux)``; it is negative when the aperture misses
    light.  For each aperture the per-star values are combined by a sigma-clipped mean:

    * with ``mag_errors``: a random-effects weighted mean.  The variance of a star's value is
      modelled as ``k * mag_error**2 + s**2``: ``k`` scales the given (e.g. PSF-flux) errors to
      the aperture's (a large aperture holds more sky noise), and ``s`` is the true scatter of
      the corrections over the chip (the PSF changes: ~1 % for a 1-FWHM aperture).  ``k`` and
      ``s`` are fitted to the squared residuals, stars are weighted by the inverse of that
      variance and clipped beyond ``clip_sigma`` times its square root; so faint stars, whose
      large apertures are dominated by sky noise and by any error of the sky level, carry
      little weight, and bright stars are not clipped for the true variation;
    * otherwise: a mean with the given relative ``weights`` (None: equal), clipped beyond
      ``clip_sigma`` robust (MAD) standard deviations of the values.

    Parameters
    ----------
    apfluxes : numpy.ndarray
        Shape (n, n_ap): fluxes of n (isolated, bright, unsaturated) stars in n_ap apertures.
    reference_flux : numpy.ndarray or None
        Shape (n,) total flux of each star, e.g. its PSF flux normalised to total; None uses the
        last (largest) aperture, whose correction is then 0.
    weights : numpy.ndarray or None
        Shape (n,) relative weights of the stars (e.g. their S/N^2); None weighs them equally.
        Not with ``mag_errors``.
    mag_errors : numpy.ndarray or None
        Shape (n,) 1-sigma magnitude errors of the stars' photometry (e.g. of their PSF fluxes),
        for the random-effects mean above.
    clip_sigma : float
        Clipping threshold, in standard deviations.
    min_stars : int
        Fewest stars with positive fluxes needed for every aperture.

    Returns
    -------
    numpy.ndarray
        Shape (n_ap,) corrections in magnitudes.

    Raises
    ------
    PhotometryError
        If an aperture has fewer than ``min_stars`` usable stars.
    ValueError
        If shapes disagree, or both ``weights`` and ``mag_errors`` are given.
    """
    ap = np.asarray(apfluxes, dtype=float)
    if ap.ndim != 2:
        raise ValueError(f"apfluxes must have shape (n, n_ap), got shape {ap.shape}")
    n, n_ap = ap.shape
    if weights is not None and mag_errors is not None:
        raise ValueError("give weights or mag_errors, not both")
    ref = ap[:, -1] if reference_flux is None else _as_1d("reference_flux", reference_flux)
    w = np.ones(n) if weights is None else _as_1d("weights", weights)
    err = None if mag_errors is None else _as_1d("mag_errors", mag_errors)
    if len(ref) != n or len(w) != n:
        raise ValueError(f"reference_flux and weights must have length {n} (rows of apfluxes), "
                         f"got {len(ref)} and {len(w)}")
    if err is not None and len(err) != n:
        raise ValueError(f"mag_errors must have length {n} (rows of apfluxes), got {len(err)}")
    apcor = np.empty(n_ap)
    with np.errstate(divide="ignore", invalid="ignore"):
        delta = 2.5 * np.log10(ap / ref[:, None])
    for i in range(n_ap):
        good = np.isfinite(delta[:, i]) & (ap[:, i] > 0) & (ref > 0) & np.isfinite(w) & (w > 0)
        if err is not None:
            good &= np.isfinite(err) & (err > 0)
        if good.sum() < min_stars:
            raise PhotometryError(f"aperture {i} has only {good.sum()} stars with positive fluxes, "
                                  f"need >= {min_stars}")
        if err is None:
            apcor[i] = _clipped_weighted_mean(delta[good, i], w[good], clip_sigma, min_stars)
        else:
            apcor[i] = _random_effects_mean(delta[good, i], err[good], clip_sigma, min_stars)
    return apcor


def _clipped_weighted_mean(d: np.ndarray, w: np.ndarray, clip_sigma: float, min_stars: int) -> float:
    """Weighted mean, clipping values beyond ``clip_sigma`` robust standard deviations."""
    keep = np.abs(d - np.median(d)) <= clip_sigma * max(_robust_std(d), 1e-6)  # robust start
    if keep.sum() < min_stars:
        keep = np.ones(len(d), dtype=bool)
    for _ in range(10):
        mean = np.sum(w[keep] * d[keep]) / np.sum(w[keep])
        new_keep = np.abs(d - mean) <= clip_sigma * max(_robust_std(d[keep]), 1e-6)
        if np.array_equal(new_keep, keep) or new_keep.sum() < min_stars:
            break
        keep = new_keep
    return float(np.sum(w[keep] * d[keep]) / np.sum(w[keep]))


def _random_effects_mean(d: np.ndarray, err: np.ndarray, clip_sigma: float, min_stars: int) -> float:
    """Mean of ``d`` weighted by ``1 / (k err**2 + s**2)``, with ``k`` and ``s`` fitted to the
    squared residuals of the kept values (least squares of ``r**2`` on ``err**2`` and 1)."""
    e2 = err**2
    keep = np.abs(d - np.median(d)) <= 5.0 * max(_robust_std(d), 1e-6)  # broad robust start
    if keep.sum() < min_stars:
        keep = np.ones(len(d), dtype=bool)
    k, s2 = 1.0, float(max(_robust_std(d[keep]) ** 2 - np.median(e2[keep]), 0.0))
    for _ in range(20):
        var = k * e2 + s2 + 1e-12
        mean = np.sum(d[keep] / var[keep]) / np.sum(1.0 / var[keep])
        r2 = (d - mean) ** 2
        design = np.column_stack([e2, np.ones_like(e2)])[keep] / var[keep, None]   # Var(r2) ~ var**2
        k, s2 = (max(float(c), 0.0) for c in np.linalg.lstsq(design, r2[keep] / var[keep], rcond=None)[0])
        var = k * e2 + s2 + 1e-12
        new_keep = r2 <= clip_sigma**2 * var
        if np.array_equal(new_keep, keep) or new_keep.sum() < min_stars:
            break
        keep = new_keep
    return float(np.sum(d[keep] / var[keep]) / np.sum(1.0 / var[keep]))


def noise_equivalent_area(*, fwhm_pixels: float | None = None, psf: np.ndarray | None = None) -> float:
    """Noise-equivalent area (pixels) of optimal point-source photometry.

    ``neff = 1 / sum(p^2)`` for a PSF stamp ``p`` normalised to unit sum; for a Gaussian of
    standard deviation ``sigma = fwhm / 2.3548`` this is ``4 pi sigma^2`` (about 2.266 fwhm^2).

    Parameters
    ----------
    fwhm_pixels : float or None
        FWHM of a Gaussian PSF, pixels; used when ``psf`` is None.
    psf : numpy.ndarray or None
        A (ny, nx) PSF stamp (any normalisation, at least 99% of the light, non-negative sum).

    Returns
    -------
    float

    Raises
    ------
    ValueError
        If neither is given, the FWHM is not > 0, or the stamp sums to <= 0.
    """
    if psf is not None:
        stamp = np.asarray(psf, dtype=float)
        total = np.sum(stamp)
        if stamp.ndim != 2 or not total > 0:
            raise ValueError(f"psf must be a 2-D stamp with positive sum, got shape {stamp.shape}, "
                             f"sum {total}")
        return float(1.0 / np.sum((stamp / total) ** 2))
    if fwhm_pixels is None or not fwhm_pixels > 0:
        raise ValueError(f"fwhm_pixels must be > 0 when no psf stamp is given, got {fwhm_pixels}")
    return float(4.0 * np.pi * (fwhm_pixels / _FWHM_PER_SIGMA) ** 2)


def limiting_magnitude(*, sky_noise_adu: float, zero_point: float, fwhm_pixels: float | None = None,
                       psf: np.ndarray | None = None, snr: float = 5.0) -> float:
    """Magnitude of a point source detected at ``snr`` by optimal PSF photometry.

    Background-limited (the source's own photon noise is neglected, as it is near the limit):
    the flux error of a PSF fit is ``sky_noise_adu * sqrt(neff)`` with ``neff`` the
    noise-equivalent area (`noise_equivalent_area`), so the limit is
    ``-2.5 log10(snr * sky_noise_adu * sqrt(neff)) + zero_point``.

    Parameters
    ----------
    sky_noise_adu : float
        Per-pixel background noise (rms), ADU.
    zero_point : float
        ``mag = -2.5 log10(flux_adu) + zero_point``.
    fwhm_pixels : float or None
        Gaussian FWHM in pixels; used when ``psf`` is None.
    psf : numpy.ndarray or None
        PSF stamp; when given it is used instead of ``fwhm_pixels``.
    snr : float
        Signal-to-noise ratio of the limit (5 for the usual "5-sigma limiting magnitude").

    Returns
    -------
    float

    Raises
    ------
    ValueError
        If ``sky_noise_adu`` or ``snr`` is not > 0, or the PSF description is invalid.
    """
    if not sky_noise_adu > 0 or not snr > 0:
        raise ValueError(f"sky_noise_adu and snr must be > 0, got {sky_noise_adu} and {snr}")
    neff = noise_equivalent_area(fwhm_pixels=fwhm_pixels, psf=psf)
    return float(-2.5 * np.log10(snr * sky_noise_adu * np.sqrt(neff)) + zero_point)
