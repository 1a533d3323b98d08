"""The spatially varying Moffat PSF of simulated images, and the rendering of point sources.

The PSF at chip position ``(x, y)`` is an elliptical Moffat profile

    f(dx, dy) = (1 + q)**(-beta) * taper(rho),    q = x'**2 / alpha_a**2 + y'**2 / alpha_b**2,

with ``x'`` along the major axis (at angle ``theta`` counter-clockwise from the +x axis),
``alpha_a = alpha / sqrt(1 - e)``, ``alpha_b = alpha * sqrt(1 - e)`` and
``alpha = fwhm / (2 sqrt(2**(1/beta) - 1))``: the FWHM along the axes are ``fwhm / sqrt(1 - e)``
and ``fwhm * sqrt(1 - e)``, whose geometric mean is ``fwhm``, and ``e = 1 - b/a`` is the
ellipticity.  ``rho = alpha sqrt(q)`` is the equivalent circular radius; the taper (a smooth
step in ``rho**2``) brings the profile to 0 between ``0.8 R`` and ``R = radius_fwhm * fwhm``,
so the PSF has a finite support and no sharp edge.

The profile is integrated over each pixel by ``oversample x oversample`` midpoint sampling and
normalized to a sum of exactly 1 over its support, so a star of flux F adds exactly F to the
image.  `PsfField.stamp` returns exactly the function used to render stars.

FWHM, ellipticity and angle vary smoothly over the chip.  With ``u, v`` in [-1, 1] from
edge to edge (0 at the centre):

    fwhm  = fwhm0 * (1 + variation * (0.35 u + 0.15 v + 0.25 (u**2 + v**2)))
    e     = e0 * (1 + 0.25 (u**2 + v**2))
    theta = theta0 + 20 deg * (0.7 u - 0.5 v)

so the FWHM is ``fwhm0`` at the centre and grows by ``variation`` from corner (0, 0) to corner
(nx - 1, ny - 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

__all__ = ["PsfField", "RenderedSources", "render_point_sources"]

#: Stars rendered together in one vectorized batch (bounds memory to a few tens of MB).
_CHUNK = 256
#: Inner edge of the taper as a fraction of the support radius.
_TAPER_INNER = 0.8


@dataclass(frozen=True, kw_only=True)
class PsfField:
    """The true, position-dependent PSF of a simulated chip.

    Attributes
    ----------
    nx, ny : int
        Chip size, pixels.
    fwhm_pix : float
        FWHM at the chip centre (geometric mean of the axes), pixels.
    fwhm_variation : float
        Fractional FWHM change from corner (0, 0) to corner (nx - 1, ny - 1).
    ellipticity : float
        ``1 - b/a`` at the chip centre; reaches 1.5 times this at the corners.
    position_angle_deg : float
        Major-axis angle at the chip centre, degrees counter-clockwise from the +x axis.
    beta : float
        Moffat power index (> 1).
    radius_fwhm : float
        Support radius in units of the local FWHM (the taper ends there).
    oversample : int
        Sub-pixel samples per axis used to integrate the profile over a pixel.
    """

    nx: int
    ny: int
    fwhm_pix: float
    fwhm_variation: float
    ellipticity: float
    position_angle_deg: float
    beta: float
    radius_fwhm: float = 5.0
    oversample: int = 3

    def shape_at(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """FWHM, ellipticity and major-axis angle at chip positions.

        Parameters
        ----------
        x, y : numpy.ndarray
            0-based pixel positions (may lie off the chip: the polynomials extrapolate).

        Returns
        -------
        fwhm : numpy.ndarray
            Pixels (geometric mean of the axes' FWHM).
        ellipticity : numpy.ndarray
            ``1 - b/a``.
        theta : numpy.ndarray
            Major-axis angle, radians counter-clockwise from +x.
        """
        u = (np.asarray(x, dtype=float) - (self.nx - 1) / 2.0) / max((self.nx - 1) / 2.0, 1.0)
        v = (np.asarray(y, dtype=float) - (self.ny - 1) / 2.0) / max((self.ny - 1) / 2.0, 1.0)
        r2 = u * u + v * v
        fwhm = self.fwhm_pix * (1.0 + self.fwhm_variation * (0.35 * u + 0.15 * v + 0.25 * r2))
        ellipticity = self.ellipticity * (1.0 + 0.25 * r2)
        theta = np.deg2rad(self.position_angle_deg + 20.0 * (0.7 * u - 0.5 * v))
        return fwhm, ellipticity, theta

    @cached_property
    def half_size(self) -> int:
        """Half width of every star stamp, pixels: the support plus a margin, over the whole chip."""
        gx, gy = np.meshgrid(np.linspace(0, self.nx - 1, 9), np.linspace(0, self.ny - 1, 9))
        fwhm, ell, _ = self.shape_at(gx, gy)
        radius = self.radius_fwhm * fwhm.max() / np.sqrt(1.0 - ell.max())
        return int(np.ceil(radius)) + 1

    def stamp(self, x: float, y: float, size: int | None = None) -> np.ndarray:
        """The PSF of a star at ``(x, y)``, centred on the central pixel of an odd-sized stamp.

        Parameters
        ----------
        x, y : float
            0-based chip position setting the PSF shape (the star sits at the centre of the
            stamp's central pixel, whatever the fractional part of x and y).
        size : int or None
            Odd stamp width.  None gives the whole support, ``2 * half_size + 1``, summing to
            1.  A smaller stamp is a cut-out of it (summing to the flux fraction it holds); a
            larger one is padded with zeros.

        Returns
        -------
        numpy.ndarray
            Shape (size, size), float64.

        Raises
        ------
        ValueError
            If ``size`` is not a positive odd integer.
        """
        full = self.stamps(np.array([x], dtype=float), np.array([y], dtype=float),
                           phase_x=np.zeros(1), phase_y=np.zeros(1))[0]
        if size is None:
            return full
        if int(size) != size or size < 1 or size % 2 == 0:
            raise ValueError(f"PSF stamp size must be a positive odd integer, got {size!r}")
        h_full, h = full.shape[0] // 2, int(size) // 2
        out = np.zeros((2 * h + 1, 2 * h + 1))
        k = min(h, h_full)
        out[h - k:h + k + 1, h - k:h + k + 1] = full[h_full - k:h_full + k + 1,
                                                    h_full - k:h_full + k + 1]
        return out

    def stamps(self, x: np.ndarray, y: np.ndarray, *, phase_x: np.ndarray,
               phase_y: np.ndarray) -> np.ndarray:
        """Normalized, pixel-integrated PSF stamps of stars, shape (n, S, S), S = 2 half_size + 1.

        Parameters
        ----------
        x, y : numpy.ndarray
            Shape (n,): chip positions that set each PSF's shape.
        phase_x, phase_y : numpy.ndarray
            Shape (n,): position of each star relative to the centre of its stamp's central
            pixel, pixels (in [-0.5, 0.5] when the stamp is centred on the nearest pixel).

        Returns
        -------
        numpy.ndarray
            Shape (n, S, S), float64, each summing to 1.
        """
        fwhm, ell, theta = self.shape_at(x, y)
        alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / self.beta) - 1.0))
        inv_a2 = (1.0 - ell) / alpha**2          # 1 / alpha_a**2
        inv_b2 = 1.0 / ((1.0 - ell) * alpha**2)  # 1 / alpha_b**2
        c, s = np.cos(theta), np.sin(theta)
        coef_a = (c * c * inv_a2 + s * s * inv_b2)[:, None, None].astype(np.float32)
        coef_b = (2.0 * c * s * (inv_a2 - inv_b2))[:, None, None].astype(np.float32)
        coef_c = (s * s * inv_a2 + c * c * inv_b2)[:, None, None].astype(np.float32)
        outer = (self.radius_fwhm * fwhm) ** 2 / alpha**2   # taper limits in units of q
        q_out = outer[:, None, None].astype(np.float32)
        q_span = ((1.0 - _TAPER_INNER**2) * outer)[:, None, None].astype(np.float32)
        h = self.half_size
        grid = np.arange(-h, h + 1, dtype=float)
        offsets = (np.arange(self.oversample) + 0.5) / self.oversample - 0.5
        # sub-pixel sample offsets from each star, float32: shapes (n, 1, S) and (n, S, 1)
        dxs = [(grid[None, None, :] + o - np.asarray(phase_x, float)[:, None, None])
               .astype(np.float32) for o in offsets]
        dys = [(grid[None, :, None] + o - np.asarray(phase_y, float)[:, None, None])
               .astype(np.float32) for o in offsets]
        total = np.zeros((len(fwhm), 2 * h + 1, 2 * h + 1), dtype=np.float64)
        neg_beta = np.float32(-self.beta)
        for dy in dys:
            cyy = coef_c * dy * dy
            cxy = coef_b * dy
            for dx in dxs:
                q = (coef_a * dx + cxy) * dx + cyy
                w = np.clip((q_out - q) / q_span, 0.0, 1.0)
                total += np.power(1.0 + q, neg_beta) * (w * w * (3.0 - 2.0 * w))
        total /= total.sum(axis=(1, 2), keepdims=True)
        return total


@dataclass(frozen=True, eq=False)
class RenderedSources:
    """Point sources added to an image.

    Attributes
    ----------
    image : numpy.ndarray
        Shape (ny, nx), float64: the sources' counts, ADU.
    peak : numpy.ndarray
        Shape (n,): each source's brightest pixel, ADU (sky excluded).
    snr : numpy.ndarray
        Shape (n,): expected signal-to-noise ratio of optimal (PSF-weighted) photometry of
        the isolated source on the given sky, ``sqrt(sum (F p)**2 / var)`` with
        ``var = (sky + F p) / gain + (read_noise / gain)**2`` (ADU**2).
    """

    image: np.ndarray
    peak: np.ndarray
    snr: np.ndarray


def render_point_sources(psf: PsfField, x: np.ndarray, y: np.ndarray, flux: np.ndarray,
                         shape: tuple[int, int], *, sky: np.ndarray, gain: float,
                         read_noise: float) -> RenderedSources:
    """Add point sources to an empty image with the true PSF, each on its own stamp.

    Parameters
    ----------
    psf : PsfField
        The PSF of the chip.
    x, y : numpy.ndarray
        Shape (n,): 0-based source centroids; sources off the image contribute the part of
        their stamp that overlaps it.
    flux : numpy.ndarray
        Shape (n,): total counts, ADU.
    shape : tuple of int
        ``(ny, nx)`` of the image.
    sky : numpy.ndarray
        Shape (n,): sky level under each source, ADU (for the expected S/N only).
    gain : float
        Electrons per ADU.
    read_noise : float
        Read noise, electrons.

    Returns
    -------
    RenderedSources
        The image of the sources, their peak pixel values and expected S/N.
    """
    ny, nx = shape
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    flux = np.asarray(flux, dtype=float)
    n = x.size
    peak, snr = np.zeros(n), np.zeros(n)
    h = psf.half_size
    grid = np.arange(-h, h + 1)
    indices, values = [], []
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(start + _CHUNK, n))
        cx, cy = np.rint(x[sl]).astype(np.int64), np.rint(y[sl]).astype(np.int64)
        stamps = psf.stamps(x[sl], y[sl], phase_x=x[sl] - cx, phase_y=y[sl] - cy)
        counts = stamps * flux[sl, None, None]
        peak[sl] = counts.max(axis=(1, 2))
        var = (sky[sl, None, None] + counts) / gain + (read_noise / gain) ** 2
        snr[sl] = np.sqrt((counts**2 / var).sum(axis=(1, 2)))
        iy = cy[:, None, None] + grid[None, :, None]
        ix = cx[:, None, None] + grid[None, None, :]
        inside = (iy >= 0) & (iy < ny) & (ix >= 0) & (ix < nx)
        indices.append((iy * nx + ix)[inside])
        values.append(counts[inside])
    image = np.zeros(ny * nx)
    if indices:
        image = np.bincount(np.concatenate(indices), weights=np.concatenate(values),
                            minlength=ny * nx)
    return RenderedSources(image=image.reshape(ny, nx), peak=peak, snr=snr)
