"""The flux ratio of two images of one field from the stars they share.

ZOGY needs F_r / F_n, the ratio of a source's PSF flux in the reference to that in the new
image, to well under a percent: a 2% error leaves 2% of every bright star in the difference.
Zero points from a catalog rarely reach that (a 512 x 512 chip may hold ten calibrators);
the stars both images measured do, as ZOGY's authors note.  `fit_flux_ratio` takes the PSF
fluxes of matched sources and returns the inverse-variance weighted mean of their ratios with
iterative sigma clipping (variables, blends, saturated cores), and its error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["FluxRatio", "fit_flux_ratio"]


@dataclass(frozen=True)
class FluxRatio:
    """``ratio`` = F_r / F_n and its 1-sigma ``error``, from ``n_stars`` stars (of ``n_matched``),
    with the clipped ratios' rms scatter ``scatter``."""

    ratio: float
    error: float
    n_stars: int
    n_matched: int
    scatter: float


def fit_flux_ratio(new_flux: np.ndarray, new_err: np.ndarray, ref_flux: np.ndarray, ref_err: np.ndarray, *,
                   min_snr: float = 20.0, clip_sigma: float = 3.0, max_iterations: int = 5) -> FluxRatio:
    """The weighted, clipped mean of ``ref_flux / new_flux`` over matched stars.

    Parameters
    ----------
    new_flux, new_err, ref_flux, ref_err : numpy.ndarray
        (n,) PSF fluxes and errors of the same n sources in the new and the reference image.
    min_snr : float
        Sources below this S/N in either image are left out.
    clip_sigma : float
        Ratios farther than this many (robust) standard deviations from the mean are rejected.
    max_iterations : int
        Most rounds of clipping.

    Returns
    -------
    FluxRatio
        ``n_stars`` is 0 (and the ratio NaN) when no source qualifies.
    """
    new_flux, new_err, ref_flux, ref_err = (np.asarray(a, dtype=float) for a in (new_flux, new_err, ref_flux, ref_err))
    ok = (np.isfinite(new_flux) & np.isfinite(ref_flux) & (new_err > 0) & (ref_err > 0)
          & (new_flux > min_snr * new_err) & (ref_flux > min_snr * ref_err))
    n_matched = int(new_flux.size)
    if not ok.any():
        return FluxRatio(float("nan"), float("nan"), 0, n_matched, float("nan"))
    ratio = ref_flux[ok] / new_flux[ok]
    sigma = ratio * np.hypot(new_err[ok] / new_flux[ok], ref_err[ok] / ref_flux[ok])
    use = np.ones(ratio.size, dtype=bool)
    for _ in range(max_iterations):
        centre = float(np.median(ratio[use]))
        pull = (ratio - centre) / sigma
        spread = 1.4826 * float(np.median(np.abs(pull[use] - np.median(pull[use])))) if use.sum() > 2 else 1.0
        keep = np.abs(pull) <= clip_sigma * max(spread, 1.0)
        if np.array_equal(keep, use) or keep.sum() < 1:
            break
        use = keep
    w = 1.0 / sigma[use] ** 2
    mean = float(np.sum(w * ratio[use]) / np.sum(w))
    n = int(use.sum())
    chi2 = float(np.sum(w * (ratio[use] - mean) ** 2) / max(n - 1, 1))
    error = float(np.sqrt(max(chi2, 1.0) / np.sum(w)))
    scatter = float(np.std(ratio[use])) if n > 1 else float("nan")
    return FluxRatio(mean, error, n, n_matched, scatter)
