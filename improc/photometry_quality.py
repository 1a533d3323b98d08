"""Whether an image's PSF fluxes can be trusted, judged against its aperture fluxes.

A PSF model that does not describe the stars (a pixel model fitted to two noisy stars, a Moffat
default whose shape was never measured, a PSF that varies more than the model) gives PSF fluxes
that disagree with apertures.  `check_psf_photometry` compares the two on bright stars:

    d = -2.5 log10(psf_flux / aper_flux)          (mag; > 0: PSF fluxes fainter)

with ``aper_flux`` the aperture fluxes corrected to the normalization of the PSF fluxes (to the
flux within the PSF stamp, in practice the total).  The median of d says whether the PSF
fluxes are biased, its robust scatter (beyond what the flux errors explain) whether they are
noisier than the apertures should allow.  The verdict is "trusted" only when enough stars show
neither; otherwise the pipeline should use aperture photometry and flag the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["PSFPhotometryCheck", "check_psf_photometry"]

_MAG_PER_FRAC = 2.5 / np.log(10.0)       # 1.0857: d(mag) = 1.0857 d(flux) / flux
_MAD_TO_SIGMA = 1.4826
_MEDIAN_EFFICIENCY = 1.2533              # error of a median / error of a mean, Gaussian data

Verdict = Literal["trusted", "too_few_stars", "uncertain", "offset", "scatter"]


@dataclass(frozen=True)
class PSFPhotometryCheck:
    """Result of `check_psf_photometry`.

    Attributes
    ----------
    trusted : bool
        True when ``verdict`` is "trusted".
    verdict : {"trusted", "too_few_stars", "uncertain", "offset", "scatter"}
        "too_few_stars": fewer than ``min_stars`` bright stars, nothing can be verified;
        "uncertain": the median is too poorly measured (its error exceeds ``max_offset_mag``)
        to verify it; "offset": ``|median_mag| > max_offset_mag``; "scatter": the scatter
        beyond the flux errors exceeds ``max_scatter_mag``; "trusted": none of these.
    n_stars : int
        Number of stars compared.
    median_mag : float
        Median of ``-2.5 log10(psf_flux / aper_flux)`` over them (NaN with no star).
    median_err_mag : float
        Its 1-sigma error, 1.2533 * scatter / sqrt(n) (NaN with fewer than 2 stars).
    scatter_mag : float
        Robust scatter, 1.4826 * MAD (NaN with fewer than 2 stars).
    excess_scatter_mag : float
        sqrt(max(scatter**2 - median expected variance, 0)), the scatter the flux errors do not
        explain (the scatter itself when no errors are given).
    """

    trusted: bool
    verdict: Verdict
    n_stars: int
    median_mag: float
    median_err_mag: float
    scatter_mag: float
    excess_scatter_mag: float


def _as_1d(name: str, value, shape: tuple[int, ...] | None) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(value, dtype=float))
    if arr.ndim != 1 or (shape is not None and arr.shape != shape):
        raise ValueError(f"{name} must be a 1-d array{'' if shape is None else f' of shape {shape}'}, "
                         f"got shape {arr.shape}")
    return arr


def check_psf_photometry(psf_flux: np.ndarray, aper_flux: np.ndarray, *, psf_flux_err: np.ndarray | None = None,
                         aper_flux_err: np.ndarray | None = None, min_snr: float = 20.0, min_stars: int = 3,
                         max_offset_mag: float = 0.03, max_scatter_mag: float = 0.05) -> PSFPhotometryCheck:
    """Decide whether PSF fluxes agree with aperture fluxes on bright stars.

    Parameters
    ----------
    psf_flux, aper_flux : numpy.ndarray
        Shape (n,): PSF fluxes and aperture fluxes corrected to the same normalization (e.g.
        total), of point sources.  Pairs with a non-finite or non-positive value are ignored.
    psf_flux_err, aper_flux_err : numpy.ndarray, optional
        Shape (n,): their 1-sigma errors.  With ``aper_flux_err``, only stars whose aperture
        S/N reaches ``min_snr`` are compared; with both, the scatter they explain is removed
        (their quadrature sum, an upper bound as the two fluxes share pixels).
    min_snr : float
        Faintest aperture S/N compared (needs ``aper_flux_err``).
    min_stars : int
        Fewest stars for a verdict other than "too_few_stars" (>= 1).
    max_offset_mag : float
        Largest accepted ``|median|``, mag (and largest accepted error of the median).
    max_scatter_mag : float
        Largest accepted scatter beyond the flux errors, mag.

    Returns
    -------
    PSFPhotometryCheck
        The verdict and the numbers that decided it.

    Raises
    ------
    ValueError
        If the arrays disagree in shape or an option is out of range.
    """
    psf_flux = _as_1d("psf_flux", psf_flux, None)
    aper_flux = _as_1d("aper_flux", aper_flux, psf_flux.shape)
    psf_err = None if psf_flux_err is None else _as_1d("psf_flux_err", psf_flux_err, psf_flux.shape)
    aper_err = None if aper_flux_err is None else _as_1d("aper_flux_err", aper_flux_err, psf_flux.shape)
    if min_stars < 1 or not (min_snr >= 0 and max_offset_mag > 0 and max_scatter_mag > 0):
        raise ValueError(f"need min_stars >= 1, min_snr >= 0, max_offset_mag > 0 and max_scatter_mag > 0, got "
                         f"{min_stars}, {min_snr}, {max_offset_mag} and {max_scatter_mag}")
    use = np.isfinite(psf_flux) & np.isfinite(aper_flux) & (psf_flux > 0) & (aper_flux > 0)
    if aper_err is not None:
        use &= np.nan_to_num(aper_flux / aper_err, nan=-1.0) >= min_snr
    d = -2.5 * np.log10(psf_flux[use] / aper_flux[use])
    n = int(d.size)
    median = float(np.median(d)) if n else float("nan")
    scatter = float(_MAD_TO_SIGMA * np.median(np.abs(d - median))) if n >= 2 else float("nan")
    expected = 0.0
    if psf_err is not None and aper_err is not None and n:
        frac2 = (psf_err[use] / psf_flux[use]) ** 2 + (aper_err[use] / aper_flux[use]) ** 2
        expected = float(np.median(_MAG_PER_FRAC**2 * frac2))
    excess = float(np.sqrt(max(scatter**2 - expected, 0.0))) if n >= 2 else float("nan")
    median_err = _MEDIAN_EFFICIENCY * scatter / np.sqrt(n) if n >= 2 else float("nan")
    if n < min_stars:
        verdict: Verdict = "too_few_stars"
    elif n >= 2 and median_err > max_offset_mag:
        verdict = "uncertain"
    elif abs(median) > max_offset_mag:
        verdict = "offset"
    elif n >= 2 and excess > max_scatter_mag:
        verdict = "scatter"
    else:
        verdict = "trusted"
    return PSFPhotometryCheck(trusted=verdict == "trusted", verdict=verdict, n_stars=n, median_mag=median,
                              median_err_mag=float(median_err), scatter_mag=scatter, excess_scatter_mag=excess)
