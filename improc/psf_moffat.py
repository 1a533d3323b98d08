"""A constant elliptical Moffat PSF, for images with too few stars for a pixel model.

`fit_psf` (`improc.psf_fit`) needs `min_psf_stars` stars, and a pixel model fitted to two or
three stars follows their noise: PSF fluxes then disagree with apertures by up to 0.25 mag.
With fewer than ~5 stars a parametric profile with four shape parameters is the better model:

* `fit_moffat_psf` fits one Moffat profile -- FWHM, beta, ellipticity, angle, the same over the
  chip -- jointly to the stamps of 1 to a few dozen stars, each with its own flux, centre and
  local sky (``scipy.optimize.least_squares``; the fluxes and skies are solved linearly inside
  the fit, so only the shape and the centres are iterated);
* `default_moffat` is the no-star fallback: beta = `DEFAULT_BETA` and the FWHM that gives the
  size the extraction measured for the image's sources (`size_from_sources`), or a given FWHM;
* `moffat_pixel_psf` renders either into a degree-0 `~improc.psf.PixelPSF`, so saving, rendering
  and PSF photometry work unchanged.

The profile (the parametrization of `improc.sim_psf`, without its taper) is

    I(dx, dy) = (beta - 1) / (pi alpha**2) * (1 + q)**(-beta),
    q = x'**2 / alpha_a**2 + y'**2 / alpha_b**2,

with ``x'`` along the major axis (``angle_deg`` counter-clockwise from +x),
``alpha_a = alpha / sqrt(1 - e)``, ``alpha_b = alpha sqrt(1 - e)``, ``e = 1 - b/a`` the
ellipticity and ``alpha = fwhm / (2 sqrt(2**(1/beta) - 1))``: ``fwhm`` is the geometric mean of
the FWHM along the axes, of the profile *before* integration over the pixels, and the profile
integrates to 1 over the plane.  Model pixels are integrated by ``oversample**2`` midpoint samples.

Inside the fit the shape is ``(ln fwhm, beta, eta1, eta2)`` with ``e = 1 - exp(-|eta|)`` and
``angle = atan2(eta2, eta1) / 2``: the quadratic form is ``exp(-S) / alpha**2`` with
``S = [[eta1, eta2], [eta2, -eta1]]``, positive definite for every eta, with no wrap of the angle.

Accuracy (tests/improc/test_psf_moffat.py): three stars of S/N ~ 300 drawn from a Moffat give
the FWHM within 2 % and beta within 10 %, and PSF fluxes with the rendered `PixelPSF` within 1 %
of the true total fluxes.  Real PSFs are not exactly Moffat profiles: the fit's ``chi2`` grows
with the stars' S/N when they are not, and `improc.photometry_quality` tells whether the PSF
fluxes can be trusted against apertures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import sep
from scipy.optimize import least_squares
from scipy.sparse import lil_matrix

from improc.errors import BadDataError
from improc.extraction import stellar_locus
from improc.psf import PixelPSF, cut_stamps, nearest_pixel
from improc.psf_photometry import checked_fit_inputs

__all__ = ["DEFAULT_BETA", "MoffatFitError", "MoffatFit", "moffat_stamps", "fit_moffat_psf", "default_moffat",
           "size_from_sources", "moffat_pixel_psf"]

#: beta of the no-star default, and of fits whose stars cannot constrain it.  Moffat profiles
#: fitted (by `fit_moffat_psf`) to the Legacy Surveys' PSFEx models of the seven legacypipe
#: DECam CCDs (../shared/data/legacypipe) have beta 3.3 to 5.3, median 3.9; the two stars of
#: testcase8 give 3.5 +- 0.2; pure Kolmogorov seeing gives 4.8 (Trujillo et al. 2001) and the
#: optics' wings lower it.  With the size matched to the extraction's (`default_moffat`), the
#: PSF fluxes of stars of beta 2.5 to 5 measured with beta = 3.5 are within 1.1 % of the truth.
DEFAULT_BETA = 3.5

#: Half-light radius**2 (pixels**2) that sep's pixel sampling adds and the extraction removes,
#: 2 ln 2 / 12 (see `improc.extraction`); also what pixel integration adds to a profile.
_R50_BOX_TERM = 2.0 * np.log(2.0) / 12.0


class MoffatFitError(BadDataError):
    """The Moffat profile cannot be fitted: no usable star or pixel, or the fit did not converge."""


@dataclass(frozen=True, eq=False)
class MoffatFit:
    """A Moffat PSF, fitted to stars or the no-star default.

    Attributes
    ----------
    fwhm : float
        Geometric mean of the FWHM along the axes, pixels, before pixel integration.
    beta : float
        Moffat power index.
    ellipticity : float
        ``1 - b/a`` of the isophotes, in [0, 1).
    angle_deg : float
        Major-axis angle, degrees counter-clockwise from +x, in [0, 180).
    fwhm_err, beta_err, ellipticity_err : float
        1-sigma errors from the fit's covariance, scaled up by sqrt(chi2) when chi2 > 1; NaN
        for the default, and ``beta_err`` NaN when beta was fixed.
    beta_fitted : bool
        Whether beta was fitted (False: given by the caller, fixed to `DEFAULT_BETA` because
        the stars could not constrain it, or the default).
    kind : {"fitted", "default"}
        "fitted": fitted to ``n_stars`` stars; "default": no star, see `default_moffat`.
    n_stars : int
        Number of stars fitted (0 for the default).
    chi2 : float
        Reduced chi-square of the joint fit (NaN for the default).  Near 1 when the profile
        describes the stars; larger for bright stars of a PSF that is not a Moffat profile.
    star_chi2 : numpy.ndarray
        Shape (n_stars,): reduced chi-square of each star's pixels (a binary or a galaxy stands out).
    index : numpy.ndarray
        Shape (n_stars,): indices into the given ``x, y`` of the stars fitted (the others were
        unusable).
    x, y : numpy.ndarray
        Shape (n_stars,): fitted star centres, 0-based pixels.
    flux, flux_err : numpy.ndarray
        Shape (n_stars,): fitted total fluxes (the profile integrates to 1) and their errors.
    sky : numpy.ndarray
        Shape (n_stars,): fitted local sky under each star, above the given background.
    """

    fwhm: float
    beta: float
    ellipticity: float
    angle_deg: float
    fwhm_err: float
    beta_err: float
    ellipticity_err: float
    beta_fitted: bool
    kind: Literal["fitted", "default"]
    n_stars: int
    chi2: float
    star_chi2: np.ndarray
    index: np.ndarray
    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    flux_err: np.ndarray
    sky: np.ndarray

    @property
    def is_default(self) -> bool:
        """True for the no-star default (its shape was not measured on stars)."""
        return self.kind == "default"


# --- the profile ------------------------------------------------------------------------------

def _alpha(fwhm, beta):
    return fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))


def _eta(ellipticity: float, angle_deg: float) -> tuple[float, float]:
    r = -np.log1p(-ellipticity)
    return r * np.cos(np.radians(2 * angle_deg)), r * np.sin(np.radians(2 * angle_deg))


def _quadratic_form(fwhm: float, beta: float, eta1: float, eta2: float) -> tuple[float, float, float]:
    """Coefficients (cxx, cxy, cyy) of q = cxx dx**2 + 2 cxy dx dy + cyy dy**2."""
    r = np.hypot(eta1, eta2)
    sinhc = np.sinh(r) / r if r > 1e-12 else 1.0
    inv_a2 = 1.0 / _alpha(fwhm, beta) ** 2
    return (inv_a2 * (np.cosh(r) - sinhc * eta1), -inv_a2 * sinhc * eta2,
            inv_a2 * (np.cosh(r) + sinhc * eta1))


def _render(shape: tuple[float, float, float, float], dx: np.ndarray, dy: np.ndarray, half: int,
            oversample: int) -> np.ndarray:
    """Pixel-integrated unit-flux profiles (n, 2 half + 1, 2 half + 1) of stars at (dx, dy) from
    the centre of their stamps' central pixels; ``shape`` is (fwhm, beta, eta1, eta2)."""
    fwhm, beta, eta1, eta2 = shape
    cxx, cxy, cyy = _quadratic_form(fwhm, beta, eta1, eta2)
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    off = (np.arange(-half, half + 1)[:, None] + sub[None, :]).ravel()        # (S * os,)
    u = off[None, None, :] - np.asarray(dx, float)[:, None, None]              # (n, 1, S os)
    v = off[None, :, None] - np.asarray(dy, float)[:, None, None]              # (n, S os, 1)
    q = cxx * u * u + 2.0 * cxy * u * v + cyy * v * v
    norm = (beta - 1.0) / (np.pi * _alpha(fwhm, beta) ** 2) / oversample**2
    fine = norm * (1.0 + q) ** (-beta)
    size = 2 * half + 1
    return fine.reshape(len(fine), size, oversample, size, oversample).sum(axis=(2, 4))


def moffat_stamps(fwhm: float, beta: float, *, ellipticity: float = 0.0, angle_deg: float = 0.0,
                  size: int, dx: np.ndarray | float = 0.0, dy: np.ndarray | float = 0.0,
                  oversample: int = 5) -> np.ndarray:
    """Pixel-integrated Moffat profiles of unit total flux on square stamps.

    Parameters
    ----------
    fwhm, beta, ellipticity, angle_deg : float
        The profile (see the module docstring); fwhm in pixels.
    size : int
        Odd side of the stamps, pixels.
    dx, dy : numpy.ndarray or float
        Shape (n,) or scalars: star centres relative to the centre of the central pixel, pixels.
    oversample : int
        Midpoint samples per pixel and axis.

    Returns
    -------
    numpy.ndarray
        Shape (n, size, size); each sums to the fraction of the light on the stamp (< 1).

    Raises
    ------
    ValueError
        If an argument is out of range.
    """
    _check_shape(fwhm, beta, ellipticity)
    if not isinstance(size, (int, np.integer)) or size < 1 or size % 2 == 0:
        raise ValueError(f"size must be a positive odd integer, got {size!r}")
    if not isinstance(oversample, (int, np.integer)) or oversample < 1:
        raise ValueError(f"oversample must be an integer >= 1, got {oversample!r}")
    dx, dy = np.broadcast_arrays(np.atleast_1d(np.asarray(dx, float)), np.atleast_1d(np.asarray(dy, float)))
    return _render((fwhm, beta, *_eta(ellipticity, angle_deg)), dx, dy, size // 2, oversample)


def _check_shape(fwhm: float, beta: float, ellipticity: float) -> None:
    if not (np.isfinite(fwhm) and fwhm > 0):
        raise ValueError(f"fwhm must be a finite number > 0, got {fwhm}")
    if not (np.isfinite(beta) and beta > 1):
        raise ValueError(f"beta must be a finite number > 1, got {beta}")
    if not 0 <= ellipticity < 1:
        raise ValueError(f"ellipticity must be in [0, 1), got {ellipticity}")


# --- the fit ----------------------------------------------------------------------------------

@dataclass
class _Stamps:
    """Background-subtracted stamps (n, S, S), their inverse variances (0 = unusable) and
    variances (inf = unusable), and the stars' offsets from the centres of the stamps."""

    data: np.ndarray
    weight: np.ndarray
    var: np.ndarray
    dx: np.ndarray
    dy: np.ndarray

    def select(self, keep: np.ndarray) -> _Stamps:
        return _Stamps(self.data[keep], self.weight[keep], self.var[keep], self.dx[keep], self.dy[keep])


def _cut(data, x, y, background, variance, mask, half: int) -> _Stamps:
    ix, iy, dx, dy = nearest_pixel(x, y)
    stamps, inside = cut_stamps(data, ix, iy, half, data.shape)
    stamps -= cut_stamps(background, ix, iy, half, data.shape)[0]
    var = cut_stamps(variance, ix, iy, half, data.shape)[0]
    good = inside & np.isfinite(stamps) & np.isfinite(var) & (var > 0)
    if mask is not None:
        good &= ~cut_stamps(mask, ix, iy, half, data.shape)[0].astype(bool)
    var = np.where(good, var, np.inf)
    return _Stamps(np.where(good, stamps, 0.0), np.where(good, 1.0 / var, 0.0), var, dx, dy)


class _Problem:
    """The joint fit: parameters ``[ln fwhm, (beta), eta1, eta2, ddx_1, ddy_1, ..., ddx_n, ddy_n]``
    (ddx, ddy: moves of each centre); fluxes and skies are solved linearly for each evaluation."""

    def __init__(self, stamps: _Stamps, beta: float | None, oversample: int):
        self.st, self.fixed_beta, self.os = stamps, beta, oversample
        self.n_global = 3 if beta is not None else 4
        self.half = stamps.data.shape[1] // 2

    def unpack(self, p: np.ndarray):
        g = self.n_global
        beta = self.fixed_beta if self.fixed_beta is not None else p[1]
        shape = (float(np.exp(p[0])), float(beta), float(p[g - 2]), float(p[g - 1]))
        moves = p[g:].reshape(-1, 2)
        return shape, moves

    def models(self, p: np.ndarray) -> np.ndarray:
        shape, moves = self.unpack(p)
        return _render(shape, self.st.dx + moves[:, 0], self.st.dy + moves[:, 1], self.half, self.os)

    def linear(self, model: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Weighted least-squares flux and sky of each star for fixed profiles, and the flux variance."""
        w, d = weight, self.st.data
        a11, a12, a22 = (w * model**2).sum((1, 2)), (w * model).sum((1, 2)), w.sum((1, 2))
        b1, b2 = (w * model * d).sum((1, 2)), (w * d).sum((1, 2))
        det = a11 * a22 - a12**2
        safe = np.where(det > 0, det, 1.0)
        flux, sky = (a22 * b1 - a12 * b2) / safe, (a11 * b2 - a12 * b1) / safe
        return np.where(det > 0, flux, 0.0), np.where(det > 0, sky, 0.0), np.where(det > 0, a22 / safe, np.inf)

    def residuals(self, p: np.ndarray, weight: np.ndarray) -> np.ndarray:
        model = self.models(p)
        flux, sky, _ = self.linear(model, weight)
        return (np.sqrt(weight) * (self.st.data - flux[:, None, None] * model - sky[:, None, None])).ravel()

    def sparsity(self) -> lil_matrix:
        n, npix = self.st.data.shape[0], self.st.data[0].size
        pattern = lil_matrix((n * npix, self.n_global + 2 * n), dtype=int)
        pattern[:, :self.n_global] = 1
        for i in range(n):
            pattern[i * npix:(i + 1) * npix, self.n_global + 2 * i: self.n_global + 2 * i + 2] = 1
        return pattern


def _core_mask(problem: _Problem, p: np.ndarray, radius: float) -> np.ndarray:
    _, moves = problem.unpack(p)
    off = np.arange(-problem.half, problem.half + 1)
    u = off[None, None, :] - (problem.st.dx + moves[:, 0])[:, None, None]
    v = off[None, :, None] - (problem.st.dy + moves[:, 1])[:, None, None]
    return u**2 + v**2 <= radius**2


def _solve(problem: _Problem, p0: np.ndarray, bounds, weight: np.ndarray):
    result = least_squares(problem.residuals, p0, bounds=bounds, args=(weight,), x_scale="jac",
                           jac_sparsity=problem.sparsity(), method="trf", xtol=1e-10, ftol=1e-10,
                           max_nfev=200)
    if result.status <= 0:
        raise MoffatFitError(f"the Moffat fit to {problem.st.data.shape[0]} stars did not converge: "
                             f"{result.message}")
    return result


def _core_usable(stamps: _Stamps, fwhm_guess: float) -> np.ndarray:
    """Stars with at least half of their core (1.5 fwhm_guess) usable."""
    half = stamps.data.shape[1] // 2
    off = np.arange(-half, half + 1)
    core = (off[None, :] ** 2 + off[:, None] ** 2) <= (1.5 * fwhm_guess) ** 2
    return ((stamps.weight > 0) & core).sum(axis=(1, 2)) >= 0.5 * core.sum()


def _check_fit_options(fwhm_guess, beta, stamp_size, oversample, max_shift, clip_sigma, gain, beta_bounds,
                       max_beta_err) -> int:
    if not (np.isfinite(fwhm_guess) and fwhm_guess > 0):
        raise ValueError(f"fwhm_guess must be a finite number > 0, got {fwhm_guess}")
    lo, hi = beta_bounds
    if not 1 < lo < hi:
        raise ValueError(f"beta_bounds must be (low, high) with 1 < low < high, got {beta_bounds}")
    if beta is not None and not lo <= beta <= hi:
        raise ValueError(f"beta must be None or within beta_bounds {beta_bounds}, got {beta}")
    size = 2 * int(np.ceil(4 * fwhm_guess)) + 1 if stamp_size is None else stamp_size
    if not isinstance(size, (int, np.integer)) or size < 5 or size % 2 == 0:
        raise ValueError(f"stamp_size must be an odd integer >= 5, got {stamp_size!r}")
    if not isinstance(oversample, (int, np.integer)) or oversample < 1:
        raise ValueError(f"oversample must be an integer >= 1, got {oversample!r}")
    if not (max_shift > 0 and clip_sigma > 0 and (gain is None or gain > 0)
            and (max_beta_err is None or max_beta_err > 0)):
        raise ValueError(f"need max_shift > 0, clip_sigma > 0, gain > 0 or None, max_beta_err > 0 or None; "
                         f"got {max_shift}, {clip_sigma}, {gain}, {max_beta_err}")
    return int(size)


def fit_moffat_psf(data: np.ndarray, x: np.ndarray, y: np.ndarray, *, background: np.ndarray | float,
                   variance: np.ndarray | float, fwhm_guess: float, mask: np.ndarray | None = None,
                   gain: float | None = None, beta: float | None = None, stamp_size: int | None = None,
                   oversample: int = 5, max_shift: float = 1.0, clip_sigma: float = 5.0,
                   beta_bounds: tuple[float, float] = (1.5, 20.0), max_beta_err: float | None = 0.5) -> MoffatFit:
    """Fit one elliptical Moffat profile jointly to the stamps of a few stars.

    Each star has its own flux, centre and constant local sky (above ``background``); the
    profile's FWHM, beta, ellipticity and angle are shared.  The fit minimizes the
    inverse-variance weighted residuals of all stamp pixels.  It runs twice: the second time
    without the pixels farther than 1.5 FWHM from a star that deviated by more than
    ``clip_sigma`` (neighbours, defects) and, with ``gain``, with the stars' Poisson variance
    from the first fit's models added (weights never come from the noisy data, so the fit is not
    biased by them).

    Parameters
    ----------
    data : numpy.ndarray
        (ny, nx) image.
    x, y : numpy.ndarray
        Shape (n,): approximate star centres, 0-based pixels (e.g. windowed centroids).  Stars
        off the image, or with less than half of their core (1.5 ``fwhm_guess``) usable, are
        left out.
    background : numpy.ndarray or float
        Background to subtract, (ny, nx) or a constant.
    variance : numpy.ndarray or float
        Background (sky + read-noise) variance of ``data``, (ny, nx) or a constant.
    fwhm_guess : float
        Starting FWHM, pixels (sep's size, ~25 % larger than a Moffat's FWHM, is close enough).
    mask : numpy.ndarray, optional
        (ny, nx) bool, True for pixels not to use; non-finite data or variance are not used either.
    gain : float, optional
        Electrons per data unit, for the stars' Poisson noise; None leaves it out (the fit stays
        unbiased, ``chi2`` is then > 1 for bright stars).
    beta : float, optional
        None fits beta; a number fixes it (e.g. `DEFAULT_BETA` for faint stars).
    stamp_size : int, optional
        Odd side of the fitted stamps; None means ``2 ceil(4 fwhm_guess) + 1``.
    oversample : int
        Midpoint samples per pixel and axis when integrating the profile over pixels.
    max_shift : float
        Largest move of a star's centre from the given one, pixels.
    clip_sigma : float
        Outlier threshold for pixels outside the cores, in sigma.
    beta_bounds : tuple of float
        Range of beta searched (``1 < low < high``).
    max_beta_err : float or None
        When beta is fitted and its 1-sigma error exceeds this (faint stars: at a total S/N of
        ~40 it is ~0.5), or it ends on a bound, beta is fixed to `DEFAULT_BETA` and the fit
        repeated (``beta_fitted`` then False); None keeps the fitted beta whatever its error.

    Returns
    -------
    MoffatFit
        ``kind`` "fitted", with the shape, its errors, the chi-square and each star's fit.

    Raises
    ------
    MoffatFitError
        If no star is usable or the fit does not converge.
    ValueError
        If arrays have inconsistent shapes or an option is out of range.
    """
    data, x, y = checked_fit_inputs(data, x, y, background=background, variance=variance, mask=mask)
    size = _check_fit_options(fwhm_guess, beta, stamp_size, oversample, max_shift, clip_sigma, gain, beta_bounds,
                              max_beta_err)
    ny, nx = data.shape
    use = np.flatnonzero(np.isfinite(x) & np.isfinite(y) & (x > -0.5) & (x < nx - 0.5) & (y > -0.5) & (y < ny - 0.5))
    stamps = _cut(data, x[use], y[use], background, variance, mask, size // 2)
    core = _core_usable(stamps, fwhm_guess)
    use, stamps = use[core], stamps.select(core)
    if use.size == 0:
        raise MoffatFitError(f"no usable star for the Moffat fit: {x.size} given, none on the image with at "
                             f"least half of its core unmasked", figures={"n_stars": int(x.size), "usable": 0})
    problem = _Problem(stamps, beta, oversample)
    n = use.size
    start = [np.log(fwhm_guess)] + ([] if beta is not None else [DEFAULT_BETA]) + [0.0, 0.0] + [0.0] * (2 * n)
    lower = [np.log(0.2 * fwhm_guess)] + ([] if beta is not None else [beta_bounds[0]]) + [-3.0, -3.0]
    upper = [np.log(5.0 * fwhm_guess)] + ([] if beta is not None else [beta_bounds[1]]) + [3.0, 3.0]
    bounds = (np.array(lower + [-max_shift] * (2 * n)), np.array(upper + [max_shift] * (2 * n)))
    result = _solve(problem, np.array(start), bounds, stamps.weight)
    weight = _second_pass_weights(problem, result.x, clip_sigma, gain)
    result = _solve(problem, result.x, bounds, weight)
    fit = _fit_result(problem, result, weight, use, x[use], y[use])
    at_bound = min(abs(fit.beta - b) for b in beta_bounds) < 1e-3 * fit.beta
    if beta is None and max_beta_err is not None and (at_bound or not fit.beta_err <= max_beta_err):
        fixed = _Problem(stamps, DEFAULT_BETA, oversample)
        bounds = (np.delete(bounds[0], 1), np.delete(bounds[1], 1))
        fit = _fit_result(fixed, _solve(fixed, np.delete(result.x, 1), bounds, weight), weight, use, x[use],
                          y[use])
    return fit


def _second_pass_weights(problem: _Problem, p: np.ndarray, clip_sigma: float, gain: float | None) -> np.ndarray:
    """Weights without the outlying pixels beyond 1.5 FWHM of the stars and, with a gain, with the
    Poisson variance of the first fit's models."""
    st = problem.st
    model = problem.models(p)
    flux, sky, _ = problem.linear(model, st.weight)
    stars = flux[:, None, None] * model
    chi = (st.data - stars - sky[:, None, None]) * np.sqrt(st.weight)
    outer = ~_core_mask(problem, p, 1.5 * np.exp(p[0]))
    weight = np.where(outer & (np.abs(chi) > clip_sigma), 0.0, st.weight)
    if gain is not None:
        weight = np.where(weight > 0, 1.0 / (st.var + np.maximum(stars, 0.0) / gain), 0.0)
    return weight


def _fit_result(problem: _Problem, result, weight: np.ndarray, index: np.ndarray, x0: np.ndarray,
                y0: np.ndarray) -> MoffatFit:
    """The MoffatFit of a converged least-squares result."""
    model = problem.models(result.x)
    flux, sky, flux_var = problem.linear(model, weight)
    resid = result.fun.reshape(model.shape)
    npix = (weight > 0).sum(axis=(1, 2))
    n_free = result.x.size + 2 * len(flux)
    chi2 = float((resid**2).sum() / max(npix.sum() - n_free, 1))
    star_chi2 = (resid**2).sum(axis=(1, 2)) / np.maximum(npix - 4, 1)
    jac = result.jac.toarray() if hasattr(result.jac, "toarray") else np.asarray(result.jac)
    cov = np.linalg.pinv(jac.T @ jac) * max(chi2, 1.0)
    (fwhm, beta, eta1, eta2), moves = problem.unpack(result.x)
    r = np.hypot(eta1, eta2)
    g = problem.n_global
    # d e / d eta = exp(-r) along eta: the error of |eta| projected on its direction
    direction = np.array([eta1, eta2]) / r if r > 0 else np.array([1.0, 0.0])
    var_r = float(direction @ cov[g - 2:g, g - 2:g] @ direction)
    return MoffatFit(
        fwhm=fwhm, beta=beta, ellipticity=float(1.0 - np.exp(-r)),
        angle_deg=float(np.degrees(0.5 * np.arctan2(eta2, eta1)) % 180.0),
        fwhm_err=float(fwhm * np.sqrt(cov[0, 0])),
        beta_err=float(np.sqrt(cov[1, 1])) if problem.fixed_beta is None else float("nan"),
        ellipticity_err=float(np.exp(-r) * np.sqrt(var_r)), beta_fitted=problem.fixed_beta is None,
        kind="fitted", n_stars=len(flux), chi2=chi2, star_chi2=star_chi2, index=index, x=x0 + moves[:, 0],
        y=y0 + moves[:, 1], flux=flux, flux_err=np.sqrt(flux_var * max(chi2, 1.0)), sky=sky)


# --- no stars -----------------------------------------------------------------------------------

def size_from_sources(fwhm: np.ndarray, snr: np.ndarray, *, flags: np.ndarray | None = None,
                      min_snr: float = 10.0, min_size: float = 1.5) -> float:
    """The size of the point sources of a list, from the extraction's ``fwhm`` (2 x r50) column.

    With at least 5 sources of ``snr >= min_snr``, no flags and a finite size of at least
    ``min_size``, the centre of their stellar locus (`improc.extraction.stellar_locus`: the
    smallest well-populated size, so galaxies do not count); with 1 to 4, their median (which a
    galaxy among them biases upwards and a cosmic ray downwards: prefer a header seeing then).

    Parameters
    ----------
    fwhm, snr : numpy.ndarray
        Shape (n,): the extraction's sizes (pixels) and signal-to-noise ratios.
    flags : numpy.ndarray, optional
        Shape (n,): integer flags; non-zero excludes a source (None: all count).
    min_snr : float
        Faintest source used.
    min_size : float
        Smallest size used, pixels: smaller sources are cosmic rays or hot pixels (point
        sources of a well-sampled image are > 2 pixels).

    Returns
    -------
    float
        The size, pixels, in the extraction's convention (for `default_moffat`).

    Raises
    ------
    MoffatFitError
        If no source qualifies.
    ValueError
        If the arrays differ in shape.
    """
    fwhm, snr = np.asarray(fwhm, float).ravel(), np.asarray(snr, float).ravel()
    flags = np.zeros(fwhm.shape, int) if flags is None else np.asarray(flags).ravel()
    if not fwhm.shape == snr.shape == flags.shape:
        raise ValueError(f"fwhm, snr and flags must have the same shape, got {fwhm.shape}, {snr.shape}, "
                         f"{flags.shape}")
    good = np.isfinite(fwhm) & (fwhm >= min_size) & (np.nan_to_num(snr, nan=-1.0) >= min_snr) & (flags == 0)
    if not good.any():
        raise MoffatFitError(f"no source with snr >= {min_snr}, no flags and a size >= {min_size} pixels "
                             f"among {fwhm.size}",
                             figures={"n_sources": int(fwhm.size), "usable": 0})
    if good.sum() >= 5:
        return float(stellar_locus(fwhm[good])[0])
    return float(np.median(fwhm[good]))


def _extraction_size(fwhm: float, beta: float) -> float:
    """What the extraction's size (2 r50, pixel term removed) is for a circular Moffat: the r50
    of the pixel-integrated profile, measured by sep on a noiseless stamp of 16 FWHM."""
    size = 2 * int(np.ceil(8 * fwhm)) + 1
    stamp = _render((fwhm, beta, 0.0, 0.0), np.zeros(1), np.zeros(1), size // 2, 5)[0]
    c = float(size // 2)
    r50, _ = sep.flux_radius(np.ascontiguousarray(stamp), np.array([c]), np.array([c]), np.array([c]), 0.5,
                             normflux=np.array([1.0]), subpix=5)
    return float(2.0 * np.sqrt(r50[0] ** 2 - _R50_BOX_TERM))


def default_moffat(size_fwhm: float | None = None, *, fwhm: float | None = None,
                   beta: float = DEFAULT_BETA) -> MoffatFit:
    """The no-star PSF: a circular Moffat of fixed beta, sized from the sources or given.

    With ``size_fwhm``: the extraction's size of a source is twice its half-light radius
    (`improc.extraction`), ~26 % more than the FWHM of a Moffat profile of beta = 3; the
    returned profile has the half-light radius (light within 8 FWHM) ``size_fwhm / 2`` after
    pixel integration, which reproduces the extraction's size of simulated Moffat stars (beta
    2.5 to 4, FWHM 3 to 4.5 pixels) within 2 %.  With ``fwhm``: that FWHM (e.g. an instrument
    pipeline's seeing from the header, when its convention is a FWHM).

    Parameters
    ----------
    size_fwhm : float, optional
        The sources' size in the extraction's convention (``table.meta["fwhm"]`` of
        `extract_sources`, or `size_from_sources`), pixels.
    fwhm : float, optional
        The profile's FWHM, pixels.  Give exactly one of ``size_fwhm`` and ``fwhm``.
    beta : float
        Moffat power index (> 1.5 so that the half-light radius is finite and meaningful).

    Returns
    -------
    MoffatFit
        ``kind`` "default", ``n_stars`` 0, errors and chi-square NaN, empty per-star arrays.

    Raises
    ------
    ValueError
        If not exactly one size is given, it is not a finite number > 0.4 pixel, or ``beta`` is
        not > 1.5.
    """
    if (size_fwhm is None) == (fwhm is None):
        raise ValueError("give exactly one of size_fwhm (the extraction's size) and fwhm")
    value = size_fwhm if fwhm is None else fwhm
    if not (np.isfinite(value) and value > 2.0 * np.sqrt(_R50_BOX_TERM)):
        raise ValueError(f"{'size_fwhm' if fwhm is None else 'fwhm'} must be a finite number > "
                         f"{2.0 * np.sqrt(_R50_BOX_TERM):.2f} pixels, got {value}")
    if not (np.isfinite(beta) and beta > 1.5):
        raise ValueError(f"beta must be a finite number > 1.5, got {beta}")
    if fwhm is None:
        fwhm = float(size_fwhm) / 1.26
        for _ in range(20):                      # the size is nearly proportional to the FWHM
            step = size_fwhm / _extraction_size(fwhm, beta)
            fwhm *= step
            if abs(step - 1.0) < 1e-5:
                break
    empty = np.zeros(0)
    nan = float("nan")
    return MoffatFit(fwhm=float(fwhm), beta=float(beta), ellipticity=0.0, angle_deg=0.0, fwhm_err=nan,
                     beta_err=nan, ellipticity_err=nan, beta_fitted=False, kind="default", n_stars=0, chi2=nan,
                     star_chi2=empty, index=np.zeros(0, int), x=empty, y=empty, flux=empty, flux_err=empty,
                     sky=empty)


# --- as a PixelPSF ----------------------------------------------------------------------------

def moffat_pixel_psf(fit: MoffatFit, *, image_shape: tuple[int, int], stamp_size: int | None = None,
                     oversample: int = 5) -> PixelPSF:
    """The Moffat profile as a constant (degree 0) `PixelPSF`, usable wherever a fitted one is.

    The stamp is the pixel-integrated profile centred on the centre of its central pixel,
    normalized to sum to 1 (the PixelPSF convention: PSF fluxes are fluxes within the stamp;
    the default ~10 FWHM stamp holds 99.9 % of the light for beta = 3, 99.5 % for beta = 2.5).

    Parameters
    ----------
    fit : MoffatFit
        From `fit_moffat_psf` or `default_moffat`.
    image_shape : tuple of int
        (ny, nx) of the image (sets x0, y0 at its centre and the scales to half its size, as
        `fit_psf` does).
    stamp_size : int, optional
        Odd side of the model stamp; None means ``2 ceil(5 fwhm) + 1``.
    oversample : int
        Midpoint samples per pixel and axis.

    Returns
    -------
    PixelPSF
        Degree 0, one basis stamp.

    Raises
    ------
    ValueError
        If ``image_shape`` or ``stamp_size`` is invalid.
    """
    size = 2 * int(np.ceil(5 * fit.fwhm)) + 1 if stamp_size is None else stamp_size
    if not isinstance(size, (int, np.integer)) or size < 3 or size % 2 == 0:
        raise ValueError(f"stamp_size must be an odd integer >= 3, got {stamp_size!r}")
    stamp = moffat_stamps(fit.fwhm, fit.beta, ellipticity=fit.ellipticity, angle_deg=fit.angle_deg, size=int(size),
                          oversample=oversample)[0]
    ny, nx = (int(n) for n in image_shape)
    return PixelPSF((stamp / stamp.sum())[None], 0, x0=(nx - 1) / 2, y0=(ny - 1) / 2, xscale=nx / 2,
                    yscale=ny / 2, image_shape=(ny, nx))
