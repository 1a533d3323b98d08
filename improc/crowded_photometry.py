"""PSF fluxes of stars that overlap: one weighted least-squares fit of all the fluxes at once.

`improc.psf_photometry.psf_fluxes` fits each star alone, so a neighbour's light within the fit
radius biases it.  `deblended_psf_fluxes` fits every star's flux together (positions fixed, as
DAOPHOT's ALLSTAR does once positions are known): it minimises

    sum over pixels of  w * (data - background - sum_j f_j p_j)**2

over the pixels within ``fit_radius`` of any star, ``p_j`` the PSF of star j at its position
(`PixelPSF.get_clip`), cut at ``model_radius``.  The stars' light beyond ``model_radius`` (the
outer wings of the whole stamps) is not fitted but subtracted from the data as known, with the
fluxes of a first fit: a bright star's wing then no longer biases a faint neighbour (+4 % for
the fainter of a 1:10 pair 2 FWHM apart without it), and the faint star cannot take the bright
star's flux through the wings of a PSF fitted to few stars either.

The normal equations ``N f = b`` (``N_ij = sum w p_i p_j``) are symmetric and positive
semi-definite and sparse (``N_ij`` is zero unless the clips of i and j overlap); ``N`` is built
once per fit from the clips (a sparse ``A.T W A``) and solved by conjugate gradients
preconditioned with its diagonal, each step a sparse product of a few entries per star.
Two detections of one star make ``N`` singular: CG then shares the flux between them instead
of diverging, as an iterative subtraction of the neighbours' models can.  An isolated star
gets the `psf_fluxes` result.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
from scipy import sparse

from improc.psf import PixelPSF, nearest_pixel
from improc.psf_photometry import PSFFluxes, _render, checked_fit_inputs

__all__ = ["deblended_psf_fluxes"]

#: Stars whose whole clips are rendered at a time.
_CHUNK = 256


class _Clips:
    """Every star's unit-flux clip, cut at the model radius, on the compact set of the pixels that
    some clip touches: ``index`` maps each clip pixel to a position in ``pixels`` (flat image
    indices), so that rendering and projecting never touch the rest of the frame."""

    def __init__(self, shape: tuple[int, int], x: np.ndarray, y: np.ndarray, psf: PixelPSF, radius: float,
                 extent: float):
        self.shape = shape
        self.ok = np.isfinite(x) & np.isfinite(y)
        xs, ys = np.where(self.ok, x, psf.x0), np.where(self.ok, y, psf.y0)
        ix, iy, dx, dy = nearest_pixel(xs, ys)
        c = psf.size // 2
        h = min(c, int(np.ceil(extent)) + 1)       # the clip is 0 beyond ``extent``
        off = np.arange(-h, h + 1)
        yy, xx = iy[:, None, None] + off[None, :, None], ix[:, None, None] + off[None, None, :]
        inside = (yy >= 0) & (yy < shape[0]) & (xx >= 0) & (xx < shape[1]) & self.ok[:, None, None]
        near = (off[None, None, :] - dx[:, None, None]) ** 2 + (off[None, :, None] - dy[:, None, None]) ** 2
        self.unit = np.empty((xs.size, psf.size, psf.size), np.float32)      # whole stamps, for the model image
        for start in range(0, xs.size, _CHUNK):        # few clips at a time
            part = slice(start, start + _CHUNK)
            self.unit[part] = psf.get_clips(xs[part], ys[part], dtype=np.float32)
        clips = self.unit[:, c - h:c + h + 1, c - h:c + h + 1]
        self.clip = np.where(inside & (near <= extent**2), clips, 0.0).astype(np.float32)
        self.disc = (near <= radius**2) & inside       # each star's own fit disc
        flat = np.where(inside, yy * shape[1] + xx, -1)
        self.pixels, index = np.unique(flat, return_inverse=True)
        self.index = index.reshape(flat.shape)
        self.clip[~inside] = 0.0

    def gather(self, image: np.ndarray | float) -> np.ndarray:
        """The values of an (ny, nx) image (or a constant) at ``pixels``, float64."""
        if np.ndim(image) == 0:
            return np.full(self.pixels.size, float(image))
        return np.asarray(image).ravel()[np.clip(self.pixels, 0, None)].astype(np.float64)

    def render(self, flux: np.ndarray) -> np.ndarray:
        """The stars with these fluxes (non-finite fluxes count as 0) at ``pixels``."""
        weights = self.clip * np.nan_to_num(flux)[:, None, None]
        return np.bincount(self.index.ravel(), weights=weights.ravel(), minlength=self.pixels.size)

    def project(self, values: np.ndarray) -> np.ndarray:
        """For each star, the sum of its clip times ``values`` (given at ``pixels``; shape (n,))."""
        return (self.clip * values[self.index]).sum(axis=(1, 2), dtype=np.float64)

    def normal(self, weight: np.ndarray) -> sparse.csr_matrix:
        """The normal matrix ``N = A.T diag(weight) A`` (n, n), sparse: ``N_ij`` is the sum over
        the pixels of ``weight p_i p_j``, non-zero only for stars whose clips overlap.

        ``A`` (pixels, n) holds the clips.  With N at hand a conjugate-gradient step costs a
        product with a few entries per star instead of a rendering and a projection of every
        clip pixel.
        """
        design = self._design
        return (design.T @ (sparse.diags(weight) @ design)).tocsr()

    @cached_property
    def _design(self) -> sparse.csr_matrix:
        used = self.clip != 0
        star = np.broadcast_to(np.arange(self.clip.shape[0])[:, None, None], self.clip.shape)[used]
        return sparse.csr_matrix((self.clip[used].astype(np.float64), (self.index[used], star)),
                                 shape=(self.pixels.size, self.clip.shape[0]))


def _wings(clips: _Clips, shape: tuple[int, int], x: np.ndarray, y: np.ndarray, flux: np.ndarray,
           size: int) -> tuple[np.ndarray, np.ndarray]:
    """At ``clips.pixels``: the light of the stars' whole stamps beyond the model radius, for
    these fluxes (non-positive ones left out, as in the model image); and the (ny, nx) frame it
    was rendered on, to be reused for the model image (a fresh frame costs its page faults)."""
    positive = np.where(np.isfinite(flux) & (flux > 0), flux, 0.0)
    whole = _render(shape, x, y, positive, lambda idx: clips.unit[idx] * positive[idx, None, None], size)
    return clips.gather(whole) - clips.render(positive), whole


def _region(clips: _Clips) -> np.ndarray:
    """Bool at ``clips.pixels``: the pixels within the fit radius of some star."""
    hits = np.bincount(clips.index[clips.disc], minlength=clips.pixels.size)
    return (hits > 0) & (clips.pixels >= 0)


def _solve(clips: _Clips, weighted_data: np.ndarray, weight: np.ndarray, start: np.ndarray,
           n_steps: int, rtol: float) -> np.ndarray:
    """Diagonally preconditioned conjugate gradients for ``N f = b`` from ``start``."""
    normal = clips.normal(weight)
    diag = normal.diagonal()
    solvable = clips.ok & (diag > 0)
    scale = np.where(solvable, 1.0 / np.where(solvable, diag, 1.0), 0.0)
    f = np.where(solvable, np.nan_to_num(start), 0.0)
    b = clips.project(weighted_data)
    r = np.where(solvable, b - normal @ f, 0.0)
    z = scale * r
    p, rz = z.copy(), r @ z
    norm_b = np.sqrt(np.sum(scale * b**2)) or 1.0
    for _ in range(n_steps):
        if np.sqrt(max(rz, 0.0)) <= rtol * norm_b:
            break
        q = np.where(solvable, normal @ p, 0.0)
        alpha = rz / (p @ q)
        f += alpha * p
        r -= alpha * q
        z = scale * r
        rz, rz_old = r @ z, rz
        p = z + (rz / rz_old) * p
    return np.where(solvable, f, np.nan)


def deblended_psf_fluxes(data: np.ndarray, x: np.ndarray, y: np.ndarray, psf: PixelPSF, *,
                         background: np.ndarray | float, variance: np.ndarray | float,
                         mask: np.ndarray | None = None, gain: float | None = None,
                         fit_radius: float | None = None, model_radius: float | None = None,
                         n_steps: int = 50, rtol: float = 1e-6) -> tuple[PSFFluxes, np.ndarray]:
    """PSF fluxes of stars that may overlap, all fitted together (see the module docstring).

    The first fit weights pixels by ``1 / variance``; a second, with the wings of the first
    subtracted, by ``1 / (variance + model / gain)``, the Poisson variance of the fitted model
    rather than of the noisy pixels (which would bias the fluxes).  Memory: the clips of all
    stars, ``4 n size**2`` bytes, and two (ny, nx) float64 images.

    Parameters
    ----------
    data, x, y, psf, background, mask
        As for `improc.psf_photometry.psf_fluxes`.
    variance : ndarray or float
        Background (sky and read) variance of ``data``, (ny, nx) or a constant.
    gain : float, optional
        Electrons per data unit, for the sources' Poisson variance; None leaves it out.
    fit_radius : float, optional
        Pixels around each star that enter the fit; None means 2 FWHM (``psf.fwhm_pixels``).
    model_radius : float, optional
        In the fit, each star's model is cut at this radius (pixels); None means
        ``fit_radius``: stars are coupled only where their fit discs overlap.  Further out a
        PSF fitted to few stars is mostly noise, through which a faint star could take a
        bright star's flux; the light beyond it is subtracted with the first fit's fluxes.
    n_steps : int
        Most conjugate-gradient steps per fit.
    rtol : float
        Relative residual of the preconditioned normal equations at which CG stops.

    Returns
    -------
    fluxes : PSFFluxes
        ``flux``; ``flux_err``, ``1 / sqrt(N_ii)``, the error of a star's flux were its
        neighbours' known (for an isolated star its exact error); ``chi2``, the reduced
        chi-square of the joint model over the star's own disc.  NaN for stars with no usable
        pixel or a non-finite position.
    model : ndarray
        (ny, nx) image of all the stars with their fitted fluxes, whole PSF stamps
        (`render_sources`: stars of non-positive flux left out).

    Raises
    ------
    ValueError
        If arrays have inconsistent shapes, ``fit_radius`` is not > 0 or ``gain`` not > 0.
    """
    data, x, y = checked_fit_inputs(data, x, y, background=background, variance=variance, mask=mask)
    radius = 2.0 * psf.fwhm_pixels if fit_radius is None else float(fit_radius)
    extent = radius if model_radius is None else float(model_radius)
    if not (radius > 0 and extent >= radius) or (gain is not None and not gain > 0):
        raise ValueError(f"need fit_radius > 0, model_radius >= fit_radius and gain > 0 or None, got "
                         f"{fit_radius}, {model_radius} and {gain}")
    clips = _Clips(data.shape, x, y, psf, radius, extent)
    values, var = clips.gather(data), clips.gather(variance)
    usable = _region(clips) & np.isfinite(values) & np.isfinite(var) & (var > 0)
    if mask is not None:
        usable &= clips.gather(mask) == 0
    residual = np.where(usable, values - clips.gather(background), 0.0)
    has_wings = extent < psf.size // 2
    flux = np.zeros(x.size)
    model = wings = np.zeros(clips.pixels.size)
    frame = None
    for k in range(2 if gain is not None or has_wings else 1):
        total = var if k == 0 or gain is None else var + np.clip(model + wings, 0.0, None) / gain
        weight = np.where(usable, 1.0 / np.where(usable, total, 1.0), 0.0)
        flux = _solve(clips, weight * (residual - wings), weight, flux, n_steps, rtol)
        model = clips.render(flux)
        if k == 0 and has_wings:
            wings, frame = _wings(clips, data.shape, x, y, flux, psf.size)
            wings *= usable
    residual = residual - wings
    weight_disc = weight[clips.index] * clips.disc
    diag = (clips.clip.astype(np.float64) ** 2 * weight_disc).sum(axis=(1, 2))
    npix = (weight_disc > 0).sum(axis=(1, 2))
    misfit = ((residual - model)[clips.index] ** 2 * weight_disc).sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        err = np.where(diag > 0, 1.0 / np.sqrt(diag), np.nan)
        chi2 = np.where(npix > 1, misfit / (npix - 1), np.nan)
    bad = ~np.isfinite(flux) | ~(diag > 0)
    flux = np.where(bad, np.nan, flux)
    # the model image from the whole unit clips already rendered (as `render_sources` would)
    model = _render(data.shape, x, y, flux, lambda idx: clips.unit[idx] * flux[idx, None, None], psf.size,
                    out=frame)
    return PSFFluxes(flux, np.where(bad, np.nan, err), np.where(bad, np.nan, chi2)), model
