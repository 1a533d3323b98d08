"""Fit a spatially varying pixelized PSF (`~improc.psf.PixelPSF`) to the stars of an image.

Each pass renders the current model at every star (`PixelPSF.get_clips`), moves each star's
flux-normalized residual onto the model's pixel grid with a Lanczos-4 kernel and adds it to the
model there, which gives each star's estimate of the PSF on the grid; the model is then refitted
to these estimates (weighted, with outlying pixels, neighbours and stars rejected), re-centred,
and the stars' fluxes and positions are refitted.  Because only residuals are interpolated,
interpolation errors do not bias the model.  Beyond 3 ``fwhm_guess`` the final model is a Moffat
tail fitted to its azimuthal profile from 2 ``fwhm_guess`` to the stamp's edge
(`~improc.psf_modes.radial_wings`): there the stars' pixels are noise.

The first two passes fit a PSFEx-like polynomial of degree <= 2, pixel by pixel; its modes of
variation that the stars detect above the noise (`~improc.psf_modes.principal_modes`) then seed
a low-rank model -- a mean stamp plus a few pixel modes whose amplitudes are polynomials of the
full ``degree`` (`improc.psf_modes`) -- fitted in the remaining passes.  A cubic variation (a
FWHM that changes quadratically over the chip) is followed to ~0.2 % of the peak, with the
noise of a model of a few terms per pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from improc.background import disc_dilation
from improc.errors import BadDataError
from improc.psf import PixelPSF, cut_stamps, n_terms, nearest_pixel, shifted_stamps, toeplitz_stack
from improc.psf_modes import (denoised, embed_coefficients, fit_coefficients, fit_modes, normalized,
                              principal_modes, radial_wings, recentred, to_basis)

__all__ = ["fit_psf", "min_psf_stars", "TooFewPSFStarsError"]


class TooFewPSFStarsError(BadDataError):
    """Fewer usable stars than the model's degree needs, before or after rejecting outliers."""


#: Half-width (pixels) of the Lanczos kernel that moves star residuals onto the model grid.
_LANCZOS_A = 4

#: Median of a chi-square variable with one degree of freedom.
_CHI2_1_MEDIAN = 0.45494

#: Degree of the pixel-wise polynomial of the first passes (PSFEx's usual choice).
_PIXELWISE_DEGREE = 2

#: Passes that fit the pixel-wise polynomial before the low-rank model takes over.
_PIXELWISE_PASSES = 2

#: Beyond this many ``fwhm_guess`` from the centre the model is a Moffat tail fitted to its
#: azimuthal profile (`improc.psf_modes.radial_wings`): ~1 % of a Moffat beta = 3 star's light,
#: far below the noise of a pixel-wise fit.
_WING_RADIUS_FWHM = 3.0


def min_psf_stars(degree: int) -> int:
    """Fewest stars `fit_psf` accepts for a model of this degree: twice the number of terms."""
    return 2 * n_terms(degree)


def _disc(size: int, radius: float) -> np.ndarray:
    """(size, size) booleans: the pixels of a stamp within ``radius`` of its central pixel."""
    off = np.arange(size) - size // 2
    return off[None, :] ** 2 + off[:, None] ** 2 <= radius**2


def _lanczos_matrices(offsets: np.ndarray, size: int, *, transposed: bool = False) -> np.ndarray:
    """Matrices (n, size, size) W with ``(W @ s)[q] ~ s(q + offset)``: resample onto a shifted grid
    (``W.T``, contiguous, if ``transposed``)."""
    t = np.arange(-(size - 1), size)[None, :] + offsets[:, None]        # W[q, p] depends on q - p only
    kernel = np.sinc(t) * np.sinc(t / _LANCZOS_A) * (np.abs(t) < _LANCZOS_A)
    w = toeplitz_stack(kernel, size)
    w /= w.sum(axis=2, keepdims=True)
    return np.ascontiguousarray(np.swapaxes(w, 1, 2)) if transposed else w


@dataclass
class _Stars:
    """Working state of the stars during the fit: positions, fluxes, stamps of the current pass."""

    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    active: np.ndarray
    data: np.ndarray | None = None      # (n, S, S) background-subtracted stamps
    var: np.ndarray | None = None       # (n, S, S) background variance, inf where unusable
    dx: np.ndarray | None = None
    dy: np.ndarray | None = None

    def keep_brightest(self, max_stars: int) -> None:
        """Drop inactive stars and all but the ``max_stars`` brightest of the others."""
        order = np.flatnonzero(self.active)[np.argsort(-self.flux[self.active], kind="stable")]
        keep = np.sort(order[:max_stars])
        for name in ("x", "y", "flux", "active", "data", "var", "dx", "dy"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name)[keep])

    def cut(self, data: np.ndarray, background, variance, mask, half: int) -> None:
        """Cut stamps around the current positions; bad pixels get infinite variance."""
        ix, iy, self.dx, self.dy = nearest_pixel(self.x, self.y)
        shape = data.shape
        stamps, inside = cut_stamps(data, ix, iy, half, shape)
        stamps -= cut_stamps(background, ix, iy, half, shape)[0]
        var = cut_stamps(variance, ix, iy, half, shape)[0]
        good = inside & np.isfinite(stamps) & np.isfinite(var) & (var > 0)
        if mask is not None:
            good &= ~cut_stamps(mask, ix, iy, half, shape)[0].astype(bool)
        self.data = np.where(good, stamps, 0.0)
        self.var = np.where(good, var, np.inf)


def _on_grid(psf: PixelPSF, stars: _Stars, resid: np.ndarray,
             weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each active star's estimate of the PSF on the model grid, (n, P), and its weights (n, P):
    the model at the star's position plus the flux-normalized residual moved onto the grid."""
    a = stars.active
    f = stars.flux[a]
    size = resid.shape[1]
    shifted = (_lanczos_matrices(stars.dy[a], size) @ resid[a]
               @ _lanczos_matrices(stars.dx[a], size, transposed=True))
    model = np.tensordot(psf.coefficients(stars.x[a], stars.y[a]), psf.basis, axes=1)
    y = (model + shifted / f[:, None, None]).reshape(len(f), -1)
    w = (weight[a] * (f**2)[:, None, None]).reshape(len(f), -1)
    return y, w


def _refine_stars(psf: PixelPSF, stars: _Stars, weight: np.ndarray, core: float) -> None:
    """Refit each active star's flux and position with the current model (one Gauss-Newton step)."""
    a = np.flatnonzero(stars.active)
    c = psf.size // 2
    h = min(c, int(np.ceil(core + 0.5)))        # the core (|dx|, |dy| <= 0.5) lies in this window
    cut = slice(c - h, c + h + 1)
    cols = shifted_stamps(psf.stamps_at(stars.x[a], stars.y[a]), stars.dx[a], stars.dy[a], window=h,
                          derivatives=True)
    off = np.arange(-h, h + 1)
    r2 = ((off[None, None, :] - stars.dx[a, None, None]) ** 2
          + (off[None, :, None] - stars.dy[a, None, None]) ** 2)
    w = weight[a][:, cut, cut] * (r2 <= core**2)
    data = stars.data[a][:, cut, cut]
    normal = np.stack([np.stack([(w * ci * cj).sum(axis=(1, 2)) for cj in cols], -1) for ci in cols], -2)
    rhs = np.stack([(w * ci * data).sum(axis=(1, 2)) for ci in cols], -1)
    ok = np.linalg.det(normal) > 0
    sol = np.full((len(a), 3), np.nan)
    sol[ok] = np.linalg.solve(normal[ok], rhs[ok][:, :, None])[:, :, 0]
    good = ok & (sol[:, 0] > 0)
    shift = np.clip(sol[good, 1:] / sol[good, :1], -0.5, 0.5)
    stars.flux[a[good]] = sol[good, 0]
    stars.x[a[good]] += shift[:, 0]
    stars.y[a[good]] += shift[:, 1]
    stars.active[a[~good]] = False


def _source_noise_per_flux(resid: np.ndarray, model: np.ndarray, var: np.ndarray, active: np.ndarray) -> float:
    """Variance per unit model flux (1 / gain) estimated from the residuals of bright pixels."""
    bright = active[:, None, None] & np.isfinite(var) & (model > 3.0 * var)
    if np.count_nonzero(bright) < 20:
        return 0.0
    excess = (resid[bright] ** 2 / _CHI2_1_MEDIAN - var[bright]) / model[bright]
    return max(float(np.median(excess)), 0.0)


def _neighbour_mask(chi: np.ndarray, fwhm: float, core: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels of positive bumps (neighbours) outside the core, grown by one FWHM.

    The chi map is smoothed with a Gaussian of the PSF's width (a matched filter, scaled to unit
    noise) so that neighbours too faint to clip pixel by pixel are found too.
    """
    sigma = fwhm / 2.3548
    smooth = ndimage.gaussian_filter(chi, sigma=(0, sigma, sigma), mode="constant", truncate=3.0)
    bumps = (smooth * (2.0 * np.sqrt(np.pi) * sigma) > threshold) & ~core
    return disc_dilation(bumps, fwhm)


def _reject_stars(chi: np.ndarray, stars: _Stars, core_mask: np.ndarray, clip_sigma: float) -> None:
    """Deactivate stars whose core chi-square is an outlier (binaries, galaxies, artefacts)."""
    a = np.flatnonzero(stars.active)
    if a.size == 0:         # all rejected already: the caller reports too few stars
        return
    used = core_mask & (chi[a] != 0)
    npix = used.sum(axis=(1, 2))
    chi2 = (chi[a] ** 2 * used).sum(axis=(1, 2)) / np.maximum(npix - 3, 1)
    med = np.median(chi2)
    spread = max(1.4826 * np.median(np.abs(chi2 - med)), np.sqrt(2.0 / max(np.median(npix), 1)))
    outlier = chi2 > med + clip_sigma * spread
    # at most a tenth of the stars per pass, the worst: with few stars, one pass of a model
    # still far from the truth must not throw away the stars that would improve it
    limit = max(1, len(a) // 10)
    if outlier.sum() > limit:
        outlier &= chi2 >= np.sort(chi2)[-limit]
    stars.active[a[outlier | (npix < 0.5 * core_mask.sum())]] = False


def _as_variance(weight, noise) -> np.ndarray | float:
    """Per-pixel background variance from an inverse-variance weight or a noise (sigma) image."""
    if (weight is None) == (noise is None):
        raise ValueError("give exactly one of weight (inverse variance) and noise (sigma)")
    if weight is not None:
        with np.errstate(divide="ignore"):
            return 1.0 / np.asarray(weight, dtype=float)
    return np.asarray(noise, dtype=float) ** 2


def _initial_stars(data, x, y, flux, degree: int, max_stars: int) -> _Stars:
    """Validate the star list, drop unusable entries, keep the ``max_stars`` brightest."""
    x = np.atleast_1d(np.asarray(x, dtype=float))
    y = np.atleast_1d(np.asarray(y, dtype=float))
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"x and y must be 1-d arrays of the same length, got shapes {x.shape} and {y.shape}")
    f = np.full(x.shape, np.nan) if flux is None else np.broadcast_to(np.asarray(flux, dtype=float), x.shape)
    ny, nx = data.shape
    usable = np.isfinite(x) & np.isfinite(y) & (x > -0.5) & (x < nx - 0.5) & (y > -0.5) & (y < ny - 0.5)
    if flux is not None:
        usable &= np.isfinite(f) & (f > 0)
    need = min_psf_stars(degree)
    if np.count_nonzero(usable) < need:
        raise TooFewPSFStarsError(f"need at least {need} PSF stars for degree {degree}, "
                         f"got {np.count_nonzero(usable)} usable of {x.size}")
    idx = np.flatnonzero(usable)
    return _Stars(x=x[idx].copy(), y=y[idx].copy(), flux=np.array(f[idx]), active=np.ones(idx.size, bool))


def fit_psf(data: np.ndarray, x: np.ndarray, y: np.ndarray, *, background: np.ndarray | float,
            fwhm_guess: float, weight: np.ndarray | float | None = None,
            noise: np.ndarray | float | None = None, mask: np.ndarray | None = None,
            flux: np.ndarray | None = None, gain: float | None = None, stamp_size: int | None = None,
            degree: int = 3, max_stars: int = 500, clip_sigma: float = 3.0, n_iter: int = 5) -> PixelPSF:
    """Fit a spatially varying pixelized PSF to stars (see the module docstring for the method).

    Parameters
    ----------
    data : ndarray
        (ny, nx) image.
    x, y : ndarray
        Positions (0-based pixels) of the PSF stars, e.g. chosen by `select_psf_stars`.
    background : ndarray or float
        Background to subtract, (ny, nx) or a constant.
    fwhm_guess : float
        Approximate FWHM in pixels: sets the stamp size, the core radius (2 FWHM) used to
        refit positions and to reject outlying stars, and the window of the centring convention.
    weight, noise : ndarray or float, optional
        Exactly one: inverse variance or sigma of the background noise, (ny, nx) or constant.
        Pixels with zero weight or non-finite noise are ignored.
    mask : ndarray of bool, optional
        (ny, nx), True for bad pixels.  Non-finite data are masked too.
    flux : ndarray, optional
        Approximate star fluxes; None means aperture sums within 3 ``fwhm_guess``.  Only the
        ``max_stars`` brightest stars are used.
    gain : float, optional
        Electrons per data unit, for the stars' Poisson noise; None estimates it from the residuals.
    stamp_size : int, optional
        Odd side of the model stamp; None means ``2 ceil(5 fwhm_guess) + 1`` (~10 FWHM).
    degree : int
        Degree of the polynomials of position that carry the PSF's variation.
    max_stars : int
        Most stars to use.
    clip_sigma : float
        Outlier threshold for pixels and for stars' chi-square, in sigma.
    n_iter : int
        Number of passes (>= 3): two pixel-wise ones, then low-rank ones.

    Returns
    -------
    PixelPSF
        The model, of the given degree, normalized to sum to 1 over the stamp everywhere.

    Raises
    ------
    TooFewPSFStarsError
        Fewer usable stars than `min_psf_stars` (``degree``), before or after outlier rejection.
    ValueError
        For inconsistent arguments.
    """
    data = np.asarray(data)
    size = _check_fit_options(data, fwhm_guess, stamp_size, n_iter, clip_sigma, max_stars, gain, degree)
    variance = _as_variance(weight, noise)
    stars = _initial_stars(data, x, y, flux, degree, max_stars)
    ny, nx = data.shape
    first = min(degree, _PIXELWISE_DEGREE)
    psf = PixelPSF(np.zeros((n_terms(first), size, size)), first, x0=(nx - 1) / 2, y0=(ny - 1) / 2,
                   xscale=nx / 2, yscale=ny / 2, image_shape=(ny, nx))
    core2 = _disc(size, 2 * fwhm_guess)
    aperture = _disc(size, 3 * fwhm_guess)
    coef = None         # the low-rank model's coefficients, from the hand-over on
    for it in range(n_iter):
        stars.cut(data, background, variance, mask, size // 2)
        if it == 0:
            model = np.zeros_like(stars.data)
            if flux is None:
                stars.flux = (stars.data * aperture).sum(axis=(1, 2))
                stars.active &= stars.flux > 0
            stars.keep_brightest(max_stars)
        else:
            model = psf.get_clips(stars.x, stars.y, np.where(stars.active, stars.flux, 0.0))
        resid = stars.data - model
        weight_st = (_first_weights(stars, aperture) if it == 0
                     else _pixel_weights(stars, resid, model, gain, clip_sigma, fwhm_guess, core2))
        _check_enough(stars, degree)
        resid = np.where(weight_st > 0, resid, 0.0)
        grid_y, grid_w = _on_grid(psf, stars, resid, weight_st)
        monos = psf.coefficients(stars.x[stars.active], stars.y[stars.active])
        star_weight = grid_w.sum(axis=1)
        if it < _PIXELWISE_PASSES:
            phi, normal = fit_modes(grid_y, grid_w, monos, psf.basis.reshape(len(psf.basis), -1))
            phi, _ = normalized(phi.reshape(-1, size, size))
            if it == _PIXELWISE_PASSES - 1:       # hand over to the low-rank model
                phi, coef = principal_modes(phi, normal, monos, star_weight, core2)
                coef = embed_coefficients(coef, first, degree)
        else:
            for _ in range(2):      # alternate: coefficients with the modes fixed, then the modes
                coef = fit_coefficients(grid_y, grid_w, monos, phi.reshape(len(phi), -1))
                phi, _ = fit_modes(grid_y, grid_w, np.column_stack([np.ones(len(monos)), monos @ coef.T]),
                                   phi.reshape(len(phi), -1))
                phi, coef = normalized(phi.reshape(-1, size, size), coef, monos, star_weight)
            phi = denoised(phi)
        phi = recentred(phi, fwhm_guess / 2.3548)
        low_rank = it >= _PIXELWISE_PASSES - 1
        psf = PixelPSF(to_basis(phi, coef) if low_rank else phi, degree if low_rank else first,
                       psf.x0, psf.y0, psf.xscale, psf.yscale, (ny, nx))
        if it < n_iter - 1:
            _refine_stars(psf, stars, weight_st, 2 * fwhm_guess)
    return PixelPSF(radial_wings(psf.basis, _WING_RADIUS_FWHM * fwhm_guess,
                                 fit_range=(2.0 * fwhm_guess, float(size // 2))), psf.degree, psf.x0, psf.y0,
                    psf.xscale, psf.yscale, (ny, nx))


def _check_fit_options(data: np.ndarray, fwhm_guess: float, stamp_size: int | None, n_iter: int,
                       clip_sigma: float, max_stars: int, gain: float | None, degree: int) -> int:
    """Validate the options of `fit_psf`; return the stamp size."""
    if data.ndim != 2:
        raise ValueError(f"data must be a 2-d (ny, nx) image, got shape {data.shape}")
    if not (np.isfinite(fwhm_guess) and fwhm_guess > 0):
        raise ValueError(f"fwhm_guess must be a finite number > 0, got {fwhm_guess}")
    if not isinstance(degree, (int, np.integer)) or degree < 0:
        raise ValueError(f"degree must be an integer >= 0, got {degree!r}")
    size = 2 * int(np.ceil(5 * fwhm_guess)) + 1 if stamp_size is None else stamp_size
    if not isinstance(size, (int, np.integer)) or size < 3 or size % 2 == 0:
        raise ValueError(f"stamp_size must be an odd integer >= 3, got {stamp_size!r}")
    if n_iter < _PIXELWISE_PASSES + 1 or clip_sigma <= 0 or max_stars < 1 or (gain is not None and gain <= 0):
        raise ValueError(f"need n_iter >= {_PIXELWISE_PASSES + 1}, clip_sigma > 0, max_stars >= 1, gain > 0 "
                         f"or None; got n_iter={n_iter}, clip_sigma={clip_sigma}, max_stars={max_stars}, "
                         f"gain={gain}")
    return int(size)


def _pixel_weights(stars: _Stars, resid: np.ndarray, model: np.ndarray, gain: float | None,
                   clip_sigma: float, fwhm: float, core: np.ndarray) -> np.ndarray:
    """Inverse variances of the stamp pixels, with the stars' Poisson noise, zero for outliers.

    Also deactivates stars whose core chi-square is an outlier.
    """
    per_flux = 1.0 / gain if gain is not None else _source_noise_per_flux(resid, model, stars.var, stars.active)
    var = stars.var + per_flux * np.maximum(model, 0.0)
    chi = np.where(np.isfinite(var), resid / np.sqrt(var), 0.0)
    _reject_stars(chi, stars, core, clip_sigma)
    bad = (np.abs(chi) > clip_sigma) | _neighbour_mask(chi, fwhm, core, clip_sigma + 1.0)
    return np.where(bad, 0.0, 1.0 / var)


def _first_weights(stars: _Stars, aperture: np.ndarray) -> np.ndarray:
    """Inverse variances for the first pass, zero for pixels far off the stars' median profile.

    The first pass has no model to clip against, and a star's weight grows as its flux squared:
    one unflagged hot column through a bright star's stamp would enter the model whole.  So
    each stamp, scaled by its aperture flux, is compared with the median of all of them, with a
    tolerance of half the median's local maximum (the stars' sub-pixel phases and the PSF's
    variation differ by less) plus 10 sigma of the noise.  ``aperture``: (S, S) booleans.
    """
    good = np.isfinite(stars.var)
    flux = (stars.data * aperture).sum(axis=(1, 2))      # unusable pixels are 0 in the stamps
    use = flux > 0
    if np.count_nonzero(use) < 3:
        return 1.0 / stars.var
    scaled = np.where(good[use], stars.data[use] / flux[use, None, None], np.nan)
    with np.errstate(all="ignore"):
        reference = np.nan_to_num(np.nanmedian(scaled, axis=0))
    local = ndimage.maximum_filter(np.abs(reference), size=3)
    expected = np.maximum(flux, 0.0)[:, None, None] * reference
    tolerance = 10.0 * np.sqrt(stars.var) + 0.5 * np.maximum(flux, 0.0)[:, None, None] * local
    far = np.abs(stars.data - expected) > tolerance
    return np.where(far, 0.0, 1.0 / stars.var)


def _check_enough(stars: _Stars, degree: int) -> None:
    need, have = min_psf_stars(degree), int(np.count_nonzero(stars.active))
    if have < need:
        raise TooFewPSFStarsError(f"need at least {need} PSF stars for degree {degree}, got {have} "
                         f"after rejecting {stars.active.size - have} of {stars.active.size} as outliers")
