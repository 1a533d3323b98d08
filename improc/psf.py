"""A spatially varying pixelized PSF model (PSFEx-like) and its fit to stars.

Conventions
-----------
Pixel coordinates are 0-based: pixel ``[iy, ix]`` of an (ny, nx) image covers
``ix - 0.5 <= x < ix + 0.5`` and ``iy - 0.5 <= y < iy + 0.5``; its centre is at (x, y) = (ix, iy).

The model is a polynomial in the scaled image coordinates
``u = (x - x0) / xscale`` and ``v = (y - y0) / yscale`` whose coefficients are pixel stamps::

    P(x, y) = sum_k  u**i_k * v**j_k * basis[k]

with the terms ordered as in PSFEx: for j = 0 .. degree, for i = 0 .. degree - j
(degree 2: ``1, u, u**2, v, u*v, v**2``).  x0, y0 is the image centre and xscale, yscale half
the image size, so u and v run over [-1, 1] on the chip.

``P(x, y)`` is the pixel-integrated ("effective") PSF of a star whose centre falls exactly on
the centre of the central pixel of the stamp, sampled at pixel centres.  **It sums to exactly 1
over the stamp at every position**, so a flux measured with the model is the flux within a
size x size box.  The default stamp of ~10 FWHM holds 99.9 % of the light of a Moffat beta = 3
star (99.8 % at 8 FWHM), so PSF fluxes are total fluxes to ~0.1 %; any remaining constant
fraction is absorbed by the photometric zero point.

A star at a sub-pixel position is rendered by a Fourier phase shift of the model, which is
exact for a well-sampled (band-limited) PSF, FWHM >~ 2.5 pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import scipy.fft
from scipy import ndimage

__all__ = ["PixelPSF", "fit_psf", "min_psf_stars", "n_terms", "monomials", "nearest_pixel", "cut_stamps"]


def n_terms(degree: int) -> int:
    """Number of polynomial terms ``(degree + 1) (degree + 2) / 2`` of a model of this degree."""
    return (degree + 1) * (degree + 2) // 2


def monomials(u: np.ndarray, v: np.ndarray, degree: int) -> np.ndarray:
    """The monomials ``u**i v**j`` (i + j <= degree) in PSFEx order, shape (n, n_terms)."""
    u = np.atleast_1d(np.asarray(u, dtype=float))
    v = np.atleast_1d(np.asarray(v, dtype=float))
    terms = [u**i * v**j for j in range(degree + 1) for i in range(degree + 1 - j)]
    return np.stack(terms, axis=-1)


def nearest_pixel(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Integer pixel holding (x, y) and the offset of (x, y) from its centre.

    Returns ``ix, iy, dx, dy`` with ``ix = floor(x + 0.5)`` and ``dx = x - ix`` in [-0.5, 0.5).
    """
    ix = np.floor(np.asarray(x, dtype=float) + 0.5)
    iy = np.floor(np.asarray(y, dtype=float) + 0.5)
    return ix.astype(np.int64), iy.astype(np.int64), x - ix, y - iy


def cut_stamps(image: np.ndarray | float, ix: np.ndarray, iy: np.ndarray, half: int,
               shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Cut (2 half + 1)-square stamps centred on pixels (ix, iy) of an (ny, nx) image.

    Parameters
    ----------
    image : ndarray or float
        The (ny, nx) image, or a scalar that stands for a constant image.
    ix, iy : ndarray of int
        Central pixels, shape (n,).
    half : int
        Half-size of the stamps.
    shape : tuple of int
        (ny, nx) of the image.

    Returns
    -------
    stamps : ndarray
        Shape (n, 2 half + 1, 2 half + 1), float64; pixels off the image are 0.
    inside : ndarray of bool
        Same shape; False for pixels off the image.
    """
    off = np.arange(-half, half + 1)
    yy = np.asarray(iy)[:, None, None] + off[None, :, None]
    xx = np.asarray(ix)[:, None, None] + off[None, None, :]
    inside = (yy >= 0) & (yy < shape[0]) & (xx >= 0) & (xx < shape[1])
    if np.ndim(image) == 0:
        return np.where(inside, float(image), 0.0), inside
    values = image[np.clip(yy, 0, shape[0] - 1), np.clip(xx, 0, shape[1] - 1)].astype(float)
    return np.where(inside, values, 0.0), inside


def _fourier_shift(spectra: np.ndarray, dx: np.ndarray, dy: np.ndarray, size: int,
                   derivative: str | None = None) -> np.ndarray:
    """Inverse-transform rfft2 spectra (n, size, size//2 + 1) after shifting them by (dx, dy).

    ``derivative`` "x" or "y" returns the derivative of the shifted stamps with respect to the
    star's position instead.
    """
    fu = scipy.fft.rfftfreq(size)
    fv = scipy.fft.fftfreq(size)
    phase = (np.exp(-2j * np.pi * np.outer(dy, fv))[:, :, None]
             * np.exp(-2j * np.pi * np.outer(dx, fu))[:, None, :])
    if derivative == "x":
        phase = phase * (-2j * np.pi * fu)[None, None, :]
    elif derivative == "y":
        phase = phase * (-2j * np.pi * fv)[None, :, None]
    return scipy.fft.irfft2(spectra * phase, s=(size, size), workers=-1)


def _validated_basis(basis: np.ndarray, degree: int) -> np.ndarray:
    basis = np.array(basis, dtype=float)
    if basis.ndim != 3 or basis.shape[1] != basis.shape[2] or basis.shape[1] % 2 == 0:
        raise ValueError(f"basis must have shape (n_terms, size, size) with size odd, got {basis.shape}")
    if not isinstance(degree, (int, np.integer)) or degree < 0:
        raise ValueError(f"degree must be an integer >= 0, got {degree!r}")
    if basis.shape[0] != n_terms(degree):
        raise ValueError(f"basis of a degree-{degree} PSF must have {n_terms(degree)} terms, "
                         f"got {basis.shape[0]}")
    if not np.all(np.isfinite(basis)):
        raise ValueError("basis must be finite, found NaN or inf")
    basis.setflags(write=False)
    return basis


@dataclass(frozen=True, eq=False)
class PixelPSF:
    """Spatially varying PSF: a polynomial in (x, y) of normalized pixel stamps (PSFEx-like).

    See the module docstring for the conventions: pixel centres at integer coordinates, terms in
    PSFEx order, the model at every position sums to 1 over the stamp.

    Attributes
    ----------
    basis : ndarray
        (n_terms, size, size), size odd; term k multiplies the k-th monomial of
        ``u = (x - x0) / xscale`` and ``v = (y - y0) / yscale``.
    degree : int
        Degree of the polynomial.
    x0, y0 : float
        Image position (pixels) where u = v = 0, normally the image centre.
    xscale, yscale : float
        Scales of u and v in pixels, normally half the image size.
    image_shape : tuple of int
        (ny, nx) of the image the PSF belongs to.
    """

    basis: np.ndarray
    degree: int
    x0: float
    y0: float
    xscale: float
    yscale: float
    image_shape: tuple[int, int] = field(default=(0, 0))

    def __post_init__(self) -> None:
        object.__setattr__(self, "basis", _validated_basis(self.basis, self.degree))
        object.__setattr__(self, "degree", int(self.degree))
        for name in ("x0", "y0", "xscale", "yscale"):
            value = float(getattr(self, name))
            if not np.isfinite(value) or (name.endswith("scale") and value <= 0):
                raise ValueError(f"{name} must be finite{' and > 0' if 'scale' in name else ''}, "
                                 f"got {value}")
            object.__setattr__(self, name, value)
        shape = tuple(int(n) for n in np.ravel(self.image_shape))
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"image_shape must be (ny, nx) with both >= 1, got {self.image_shape}")
        object.__setattr__(self, "image_shape", shape)

    @property
    def size(self) -> int:
        """Side of the model stamp in pixels (odd)."""
        return self.basis.shape[1]

    def coefficients(self, x: np.ndarray | float, y: np.ndarray | float) -> np.ndarray:
        """Monomials of the scaled coordinates at image positions (x, y), shape (n, n_terms)."""
        return monomials((np.asarray(x, dtype=float) - self.x0) / self.xscale,
                         (np.asarray(y, dtype=float) - self.y0) / self.yscale, self.degree)

    def image_at(self, x: float, y: float) -> np.ndarray:
        """Model stamp (size, size) of a star at image position (x, y), centred on the central pixel.

        Parameters
        ----------
        x, y : float
            Image position (0-based pixels) at which the spatial variation is evaluated.

        Returns
        -------
        ndarray
            The stamp, summing to 1.
        """
        return np.tensordot(self.coefficients(x, y)[0], self.basis, axes=1)

    @cached_property
    def _spectra(self) -> np.ndarray:
        return scipy.fft.rfft2(self.basis, workers=-1)

    def get_clips(self, x: np.ndarray, y: np.ndarray, flux: np.ndarray | float = 1.0) -> np.ndarray:
        """Clips (n, size, size) of stars at image positions (x, y); see `get_clip`."""
        x = np.atleast_1d(np.asarray(x, dtype=float))
        y = np.atleast_1d(np.asarray(y, dtype=float))
        _, _, dx, dy = nearest_pixel(x, y)
        spectra = np.tensordot(self.coefficients(x, y), self._spectra, axes=1)
        clips = _fourier_shift(spectra, dx, dy, self.size)
        scale = np.broadcast_to(np.asarray(flux, dtype=float), x.shape) / clips.sum(axis=(1, 2))
        return clips * scale[:, None, None]

    def get_clip(self, x: float, y: float, flux: float = 1.0, *, size: int | None = None) -> np.ndarray:
        """Stamp of a star of total flux ``flux`` at image position (x, y).

        The central pixel of the stamp is image pixel ``(ix, iy) = (floor(x + 0.5), floor(y + 0.5))``
        and the star's centre lies at ``(x - ix, y - iy)`` (each in [-0.5, 0.5)) from the centre of
        that pixel; so ``image[iy - h: iy + h + 1, ix - h: ix + h + 1] += clip`` with
        ``h = size // 2`` adds the star at (x, y).  The sub-pixel shift is a Fourier phase shift.

        Parameters
        ----------
        x, y : float
            Star position, 0-based pixels.
        flux : float
            The clip sums to this.
        size : int or None
            Odd side of the clip; None means the model's size.  A smaller clip is cut from the
            centre and renormalized so that it still sums to ``flux``; a larger one is zero-padded.

        Returns
        -------
        ndarray
            The (size, size) clip.

        Raises
        ------
        ValueError
            If ``size`` is not a positive odd integer.
        """
        clip = self.get_clips(x, y)[0]
        if size is None or size == self.size:
            return clip * flux
        if not isinstance(size, (int, np.integer)) or size < 1 or size % 2 == 0:
            raise ValueError(f"size must be a positive odd integer, got {size!r}")
        pad = (size - self.size) // 2
        if pad > 0:
            clip = np.pad(clip, pad)
        else:
            clip = clip[-pad:self.size + pad, -pad:self.size + pad]
        return clip * (flux / clip.sum())

    @cached_property
    def fwhm_pixels(self) -> float:
        """FWHM (pixels) of the pixel-integrated PSF at the image centre, measured on the model.

        The model at (x0, y0) is interpolated 15x finer (band-limited) and the FWHM is the diameter
        of the circle whose area is that above half the peak (geometric mean of the axes).
        """
        factor = 15
        spectrum = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(self.image_at(self.x0, self.y0))))
        pad = (self.size * factor - self.size) // 2
        fine = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(np.pad(spectrum, pad)))).real
        area = np.count_nonzero(fine > 0.5 * fine.max()) / factor**2
        return float(2.0 * np.sqrt(area / np.pi))

    def to_arrays(self) -> dict[str, np.ndarray | float | int]:
        """Everything needed to rebuild the PSF, as arrays and numbers (for saving in a file)."""
        return {"basis": np.array(self.basis), "degree": self.degree, "x0": self.x0, "y0": self.y0,
                "xscale": self.xscale, "yscale": self.yscale,
                "image_shape": np.array(self.image_shape, dtype=np.int64)}

    @classmethod
    def from_arrays(cls, d: dict) -> PixelPSF:
        """Rebuild a PSF from the output of `to_arrays`.

        Raises
        ------
        ValueError
            If a key is missing or a value is invalid.
        """
        missing = {"basis", "degree", "x0", "y0", "xscale", "yscale", "image_shape"} - set(d)
        if missing:
            raise ValueError(f"PSF arrays lack {sorted(missing)}")
        return cls(basis=np.asarray(d["basis"]), degree=int(np.asarray(d["degree"])),
                   x0=float(np.asarray(d["x0"])), y0=float(np.asarray(d["y0"])),
                   xscale=float(np.asarray(d["xscale"])), yscale=float(np.asarray(d["yscale"])),
                   image_shape=tuple(int(n) for n in np.ravel(d["image_shape"])))


# ---------------------------------------------------------------------------------------------
# Fitting the model to stars
# ---------------------------------------------------------------------------------------------

#: Half-width (pixels) of the Lanczos kernel that moves star residuals onto the model grid.
_LANCZOS_A = 4

#: Median of a chi-square variable with one degree of freedom.
_CHI2_1_MEDIAN = 0.45494


def min_psf_stars(degree: int) -> int:
    """Fewest stars `fit_psf` accepts for a model of this degree: twice the number of terms."""
    return 2 * n_terms(degree)


def _lanczos_matrices(offsets: np.ndarray, size: int) -> np.ndarray:
    """Matrices (n, size, size) W with ``(W @ s)[q] ~ s(q + offset)``: resample onto a shifted grid."""
    t = np.arange(size)[None, :, None] + offsets[:, None, None] - np.arange(size)[None, None, :]
    kernel = np.sinc(t) * np.sinc(t / _LANCZOS_A) * (np.abs(t) < _LANCZOS_A)
    return kernel / kernel.sum(axis=2, keepdims=True)


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


def _residual_update(psf_basis: np.ndarray, stars: _Stars, resid: np.ndarray, weight: np.ndarray,
                     coeffs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit, pixel by pixel, a polynomial to the flux-normalized residuals moved onto the model grid.

    Returns the new basis, renormalized so the model sums to 1 at every position, the normal
    matrices of the fit (npix, n_terms, n_terms) and each active star's total weight.
    """
    a = stars.active
    f = stars.flux[a]
    shifted = (_lanczos_matrices(stars.dy[a], resid.shape[1]) @ resid[a]
               @ np.swapaxes(_lanczos_matrices(stars.dx[a], resid.shape[1]), 1, 2))
    npix = resid.shape[1] ** 2
    y = (shifted / f[:, None, None]).reshape(-1, npix)
    w = (weight[a] * (f**2)[:, None, None]).reshape(-1, npix)
    c = coeffs[a]
    wc = w[:, :, None] * c[:, None, :]                        # (n, P, K)
    normal = np.einsum("npk,nl->pkl", wc, c, optimize=True)
    rhs = np.einsum("npk,np->pk", wc, y, optimize=True)
    ridge = 1e-9 * np.trace(normal, axis1=1, axis2=2)[:, None, None] + 1e-300
    normal += ridge * np.eye(c.shape[1])
    update = np.linalg.solve(normal, rhs[:, :, None])[:, :, 0]
    basis = psf_basis + update.T.reshape(psf_basis.shape)
    sums = basis.sum(axis=(1, 2)) / basis[0].sum()
    basis /= basis[0].sum()
    basis[1:] -= sums[1:, None, None] * basis[0]
    return basis, normal, w.sum(axis=1)


def _reduce_rank(basis: np.ndarray, normal: np.ndarray, coeffs: np.ndarray, star_weight: np.ndarray,
                 core: np.ndarray) -> np.ndarray:
    """Remove the modes of spatial variation that the stars do not detect above the noise.

    The non-constant terms, scaled by the spread of the stars' (weighted) monomials, are
    decomposed over the core pixels (SVD in term space); a mode is kept if its energy exceeds
    three times the noise energy that the fit's normal matrices predict for it.  The dropped modes are
    projected out of every pixel, the constant term absorbing their mean over the stars, so the
    model still sums to 1.  With well-detected variation nothing changes; otherwise this cuts the
    noise of the model at the corners of the chip, where the polynomial extrapolates.
    """
    k = basis.shape[0]
    if k == 1:
        return basis
    flat = basis.reshape(k, -1)
    w = star_weight / star_weight.sum()
    mean = w @ coeffs
    centred = coeffs[:, 1:] - mean[1:]
    evals, evecs = np.linalg.eigh((centred * w[:, None]).T @ centred)
    if evals.min() <= 1e-12 * evals.max():
        return basis
    half = (evecs * np.sqrt(evals)) @ evecs.T
    core = core.ravel()
    u, s, _ = np.linalg.svd(half @ flat[1:, core], full_matrices=False)
    cov = np.linalg.inv(normal[core])[:, 1:, 1:].sum(axis=0)
    noise = np.einsum("kj,kl,lj->j", u, half @ cov @ half, u)
    keep = u[:, s**2 > 3.0 * noise]
    variation = np.linalg.solve(half, keep @ (keep.T @ (half @ flat[1:])))
    constant = flat[0] + mean[1:] @ (flat[1:] - variation)
    return np.vstack([constant[None], variation]).reshape(basis.shape)


def _recentre(basis: np.ndarray, sigma: float) -> np.ndarray:
    """Shift every term so that the model's first moments in a Gaussian window vanish everywhere.

    This fixes the convention for the star's centre (as a windowed centroid does) and removes
    the degeneracy between the model's centring and the stars' fitted positions.
    """
    size = basis.shape[1]
    off = np.arange(size) - size // 2
    window = np.exp(-0.5 * (off[None, :] ** 2 + off[:, None] ** 2) / sigma**2)
    moments = np.stack([window * off[None, :], window * off[:, None]])       # x and y weights
    spectrum = scipy.fft.rfft2(basis[0])
    grads = np.stack([scipy.fft.irfft2(spectrum * (2j * np.pi * f), s=(size, size))
                      for f in (scipy.fft.rfftfreq(size)[None, :], scipy.fft.fftfreq(size)[:, None])])
    response = np.einsum("myx,gyx->mg", moments, grads)                    # moment m per gradient g
    for _ in range(2):
        first = np.einsum("myx,kyx->km", moments, basis)
        amounts = -np.linalg.solve(response, first.T).T                    # (n_terms, 2)
        basis = basis + np.einsum("kg,gyx->kyx", amounts, grads)
    return basis


def _refine_stars(psf: PixelPSF, stars: _Stars, weight: np.ndarray, core: float) -> None:
    """Refit each active star's flux and position with the current model (one Gauss-Newton step)."""
    a = np.flatnonzero(stars.active)
    size = psf.size
    spectra = np.tensordot(psf.coefficients(stars.x[a], stars.y[a]), psf._spectra, axes=1)
    cols = [_fourier_shift(spectra, stars.dx[a], stars.dy[a], size, derivative=d) for d in (None, "x", "y")]
    off = np.arange(size) - size // 2
    r2 = ((off[None, None, :] - stars.dx[a, None, None]) ** 2
          + (off[None, :, None] - stars.dy[a, None, None]) ** 2)
    w = weight[a] * (r2 <= core**2)
    normal = np.stack([np.stack([(w * ci * cj).sum(axis=(1, 2)) for cj in cols], -1) for ci in cols], -2)
    rhs = np.stack([(w * ci * stars.data[a]).sum(axis=(1, 2)) for ci in cols], -1)
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
    off = np.arange(-int(np.ceil(fwhm)), int(np.ceil(fwhm)) + 1)
    disc = off[None, :] ** 2 + off[:, None] ** 2 <= fwhm**2
    return ndimage.binary_dilation(bumps, structure=disc[None])


def _reject_stars(chi: np.ndarray, stars: _Stars, core_mask: np.ndarray, clip_sigma: float) -> None:
    """Deactivate stars whose core chi-square is an outlier (binaries, galaxies, artefacts)."""
    a = np.flatnonzero(stars.active)
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
        raise ValueError(f"need at least {need} PSF stars for degree {degree}, "
                         f"got {np.count_nonzero(usable)} usable of {x.size}")
    idx = np.flatnonzero(usable)
    return _Stars(x=x[idx].copy(), y=y[idx].copy(), flux=np.array(f[idx]), active=np.ones(idx.size, bool))


def fit_psf(data: np.ndarray, x: np.ndarray, y: np.ndarray, *, background: np.ndarray | float,
            fwhm_guess: float, weight: np.ndarray | float | None = None,
            noise: np.ndarray | float | None = None, mask: np.ndarray | None = None,
            flux: np.ndarray | None = None, gain: float | None = None, stamp_size: int | None = None,
            degree: int = 2, max_stars: int = 500, clip_sigma: float = 3.0, n_iter: int = 4) -> PixelPSF:
    """Fit a spatially varying pixelized PSF to stars.

    Each pass computes every star's residual from the current model (rendered at the star's
    sub-pixel position by a Fourier shift), moves the flux-normalized residuals onto the model
    grid with a Lanczos-4 kernel, and fits, pixel by pixel, a polynomial in position to them
    (weighted, with pixels beyond ``clip_sigma``, neighbours found with a matched filter, and
    stars with outlying chi-square rejected); the model is re-centred so that its first moments
    in a Gaussian window of the FWHM vanish at every position (the windowed-centroid convention);
    then each star's flux and position are refit.  The first pass starts from a zero model;
    because later passes only interpolate residuals, interpolation errors do not bias the model.
    Finally, modes of spatial variation not detected above the noise are projected out
    (`_reduce_rank`), which lowers the noise at the corners of the chip.

    Parameters
    ----------
    data : ndarray
        (ny, nx) image.
    x, y : ndarray
        Positions (0-based pixels) of the PSF stars, e.g. chosen by `select_psf_stars`.
    background : ndarray or float
        Background to subtract, (ny, nx) or a constant.
    fwhm_guess : float
        Approximate FWHM in pixels: sets the stamp size and the core radius (2 FWHM) used to
        refit positions and to reject outlying stars.
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
        Degree of the polynomial in position.
    max_stars : int
        Most stars to use.
    clip_sigma : float
        Outlier threshold for pixels and for stars' chi-square, in sigma.
    n_iter : int
        Number of passes (>= 2).

    Returns
    -------
    PixelPSF
        The model, normalized to sum to 1 over the stamp everywhere.

    Raises
    ------
    ValueError
        For inconsistent arguments, or fewer usable stars than `min_psf_stars` (``degree``),
        before or after outlier rejection.
    """
    data = np.asarray(data)
    size = _check_fit_options(data, fwhm_guess, stamp_size, n_iter, clip_sigma, max_stars, gain)
    variance = _as_variance(weight, noise)
    stars = _initial_stars(data, x, y, flux, degree, max_stars)
    ny, nx = data.shape
    psf = PixelPSF(np.zeros((n_terms(degree), size, size)), degree, x0=(nx - 1) / 2, y0=(ny - 1) / 2,
                   xscale=nx / 2, yscale=ny / 2, image_shape=(ny, nx))
    off = np.arange(size) - size // 2
    core2 = off[None, :] ** 2 + off[:, None] ** 2 <= (2 * fwhm_guess) ** 2
    for it in range(n_iter):
        stars.cut(data, background, variance, mask, size // 2)
        if it == 0:
            model = np.zeros_like(stars.data)
            if flux is None:
                aperture = off[None, :] ** 2 + off[:, None] ** 2 <= (3 * fwhm_guess) ** 2
                stars.flux = (stars.data * aperture).sum(axis=(1, 2))
                stars.active &= stars.flux > 0
            stars.keep_brightest(max_stars)
        else:
            model = psf.get_clips(stars.x, stars.y, np.where(stars.active, stars.flux, 0.0))
        resid = stars.data - model
        weight_st = 1.0 / stars.var if it == 0 else _pixel_weights(stars, resid, model, gain, clip_sigma,
                                                                   fwhm_guess, core2)
        _check_enough(stars, degree)
        resid = np.where(weight_st > 0, resid, 0.0)
        coeffs = psf.coefficients(stars.x, stars.y)
        basis, normal, star_weight = _residual_update(psf.basis, stars, resid, weight_st, coeffs)
        basis = _recentre(basis, fwhm_guess / 2.3548)
        if it == n_iter - 1:
            basis = _reduce_rank(basis, normal, coeffs[stars.active], star_weight, core2)
        psf = PixelPSF(basis, degree, psf.x0, psf.y0, psf.xscale, psf.yscale, (ny, nx))
        if it < n_iter - 1:
            _refine_stars(psf, stars, weight_st, 2 * fwhm_guess)
    return psf


def _check_fit_options(data: np.ndarray, fwhm_guess: float, stamp_size: int | None, n_iter: int,
                       clip_sigma: float, max_stars: int, gain: float | None) -> int:
    """Validate the options of `fit_psf`; return the stamp size."""
    if data.ndim != 2:
        raise ValueError(f"data must be a 2-d (ny, nx) image, got shape {data.shape}")
    if not (np.isfinite(fwhm_guess) and fwhm_guess > 0):
        raise ValueError(f"fwhm_guess must be a finite number > 0, got {fwhm_guess}")
    size = 2 * int(np.ceil(5 * fwhm_guess)) + 1 if stamp_size is None else stamp_size
    if not isinstance(size, (int, np.integer)) or size < 3 or size % 2 == 0:
        raise ValueError(f"stamp_size must be an odd integer >= 3, got {stamp_size!r}")
    if n_iter < 2 or clip_sigma <= 0 or max_stars < 1 or (gain is not None and gain <= 0):
        raise ValueError(f"need n_iter >= 2, clip_sigma > 0, max_stars >= 1, gain > 0 or None; got "
                         f"n_iter={n_iter}, clip_sigma={clip_sigma}, max_stars={max_stars}, gain={gain}")
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


def _check_enough(stars: _Stars, degree: int) -> None:
    need, have = min_psf_stars(degree), int(np.count_nonzero(stars.active))
    if have < need:
        raise ValueError(f"need at least {need} PSF stars for degree {degree}, got {have} "
                         f"after rejecting {stars.active.size - have} of {stars.active.size} as outliers")
