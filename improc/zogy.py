"""ZOGY image subtraction (Zackay, Ofek & Gal-Yam 2016, ApJ 830, 27) in tiles, and its detections.

`zogy_subtract` takes a new image N and a reference R already on N's pixel grid
(`improc.alignment.warp_image`), both sky-subtracted, with their PSFs, noise and flux scalings,
and returns the proper difference image D, its PSF P_D, the proper score S and the corrected
score S_corr.  `detect_peaks` finds the transients on S_corr.

Equations (numbers of the paper; hats are Fourier transforms, bars complex conjugates).  With
F_n = 1 and F_r = ``flux_ratio`` (a source of 1 ADU in N has F_r ADU in R), sigma_n, sigma_r the
background noise of N and R and P_n, P_r their PSFs (each summing to 1)::

    den    = sigma_n^2 F_r^2 |P_r^|^2 + sigma_r^2 F_n^2 |P_n^|^2
    D^     = (F_r P_r^ N^ - F_n P_n^ R^) / sqrt(den)                      (13)
    F_D    = F_r F_n / sqrt(sigma_n^2 F_r^2 + sigma_r^2 F_n^2)              (15)
    P_D^   = F_r F_n P_r^ P_n^ / (F_D sqrt(den))                           (14)
    S      = F_D D (x) P_D-bar = S_N - S_R,  S_N = k_n (x) N,  S_R = k_r (x) R   (12, 17)
    k_n^   = F_n F_r^2 conj(P_n^) |P_r^|^2 / den,  k_r^ = F_r F_n^2 conj(P_r^) |P_n^|^2 / den  (28, 29)
    V(S_N) = V_n (x) k_n^2,  V(S_R) = V_r (x) k_r^2                         (26, 27)
    V_ast  = sigma_x^2 [(dS_N/dx)^2 + (dS_R/dx)^2] + sigma_y^2 [(dS_N/dy)^2 + (dS_R/dy)^2]  (30-33)
    S_corr = S / sqrt(V(S_N) + V(S_R) + V_ast)                             (25)

V_n and V_r are the per-pixel variance images (1/weight: background and source noise) and
sigma_x, sigma_y the registration noise in pixels.  The derivatives are 4th-order central
differences (S_N and S_R are smooth).  A warped reference has correlated noise: given its
relative power spectrum G (``ref_noise_power``, `improc.alignment.warp_noise_power`), sigma_r^2
becomes sigma_r^2 G(f) in ``den`` (which keeps D white) and V(S_R) and R's part of D's variance
are scaled by ``sum |k|^2 G / sum |k|^2`` of their filter.

Conventions of the output:

* **Sign**: D, S and S_corr are positive where the new image is brighter (a fading source is a
  negative detection).
* **D is in ADU of the new image, flux-normalized**: ``data = D_paper / F_D``, so that a PSF fit
  of ``psf_d`` to ``data`` gives the source's flux in the new image's ADU (the PSF sums to 1).
  The paper's unit-variance D is ``data * flux_d`` (per tile).  Its weight is the propagated
  variance ``V_n (x) d_n^2 + V_r (x) d_r^2`` (d_n, d_r the real-space filters of eq. 13) in
  those units: in a source-free area ``1 / weight = sigma_n^2 + (sigma_r / F_r)^2`` and the
  noise of D is white there (its pixels are independent).
* **S** is the paper's score (eq. 12, 17) with D_paper of unit variance; **S_corr** is in units
  of its standard deviation: threshold it in sigma.

Tiles.  The PSFs vary over a chip: the image is cut into tiles of at most ``tile_size`` pixels
per side (equal cores), each processed with its own PSFs (evaluated at the tile centre),
sigma_n and sigma_r (the medians of the variance images over the tile), extended by ``margin``
pixels of real data on each side (zeros beyond the image) to an FFT-friendly size; only the
core is kept.  The margin exceeds the reach of the filters of S and S_corr, so a core is what a
convolution of the whole image with that tile's filters gives (to 1e-4 sigma; D's filter on the
sharper image has faint far wings, 1% of the noise rms): there are no seams, only the change of
PSF from one tile to the next.

Bad pixels (flags != 0, weight <= 0 or non-finite in either image) are set to 0 in both images
and in both variance images before the transforms: they add no signal and no noise, so S_corr
keeps unit variance next to them, but the light a hole hides leaves residuals over the reach of
the PSFs.  D's flags are the OR of both images' flags, each bad pixel's spread over a square of
half-side ``mask_dilation_fwhm`` times the larger FWHM, or further where it hides light: to the
distance where that light (interpolated from the row's good pixels, summed over 2 FWHM, in
units of the noise) times the broader PSF's profile falls below ``hidden_light_nsigma`` (so a
saturated star flags its wings, a cosmic ray on the sky only its neighbours).  ``EDGE`` covers
a border of the base width and ``NO_DATA`` marks bad pixels that had no flag.  D, S and S_corr
are 0 in tiles without a valid pixel.

Computation (`improc.zogy_tile`): scipy.fft real transforms in float32 at FFT-friendly sizes;
per tile, the data filters on the window's grid and the variances on a grid binned 2 x 2.

Example (a reference warped onto the new image, both with fitted WCSs and PixelPSFs)::

    from functools import partial
    warped = warp_image(ref - ref_sky, ref_weight, ref_flags, source_wcs=ref_wcs,
                        target_wcs=new_wcs, target_shape=new.shape)
    jacobian = local_jacobian(nx / 2, ny / 2, source_wcs=ref_wcs, target_wcs=new_wcs)
    result = zogy_subtract(
        new - new_sky, warped.data, new_weight=new_weight, ref_weight=warped.white_weight,
        new_flags=new_flags, ref_flags=warped.flags, new_psf=new_psf,
        ref_psf=partial(psf_on_grid, ref_psf, source_wcs=ref_wcs, target_wcs=new_wcs),
        ref_noise_power=partial(warp_noise_power, jacobian=jacobian),
        flux_ratio=10 ** (0.4 * (ref_zp - new_zp)), astrometric_sigma=(0.02, 0.02))
    candidates = detect_peaks(result.score_corr, threshold=5.0, mask=result.flags != 0)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from astropy.table import Table
from scipy import ndimage

from improc.alignment import fill_bad_pixels
from improc.flags import FLAGS_DTYPE, PixelFlag
from improc.psf import PixelPSF, monomials, n_terms
from improc.zogy_tile import (median_sigma, read_window, relative_power, subtract_window,
                              tile_bounds, tile_filters, window_shape)

__all__ = ["TiledPSF", "ZogyResult", "zogy_subtract", "detect_peaks", "tile_bounds", "residual_background"]

#: A PSF given as a callable: ``psf(x, y)`` -> odd square stamp, star at the central pixel's centre.
PSFLike = PixelPSF | Callable[[float, float], np.ndarray]

#: A relative noise power spectrum: ``G(fy, fx)`` at frequencies in cycles per pixel, G(0, 0) = 1.
NoisePower = Callable[[np.ndarray, np.ndarray], np.ndarray]

@dataclass(frozen=True, eq=False)
class ZogyResult:
    """The products of `zogy_subtract` (see the module docstring for the conventions).

    Attributes
    ----------
    data : numpy.ndarray
        (ny, nx) float32 D, ADU of the new image: a PSF fit of ``psf_d`` gives a source's flux
        in the new image; positive for sources brighter in the new image.
    weight : numpy.ndarray
        (ny, nx) float32 inverse variance of ``data`` (1/ADU^2); 0 in tiles without data.
    flags : numpy.ndarray
        (ny, nx) uint16 `improc.flags.PixelFlag` bits: both images' flags, spread.
    score : numpy.ndarray
        (ny, nx) float32 S (eq. 17), in the paper's units (D of unit variance).
    score_corr : numpy.ndarray
        (ny, nx) float32 S_corr (eq. 25), in standard deviations.
    psf_d : numpy.ndarray
        (n_tiles, size, size) float64 P_D of each tile, summing to 1, centred on the central
        pixel (zeros for a tile without data).
    flux_d : numpy.ndarray
        (n_tiles,) F_D of each tile (eq. 15, F_n = 1); nan for a tile without data.
    sigma_new, sigma_ref : numpy.ndarray
        (n_tiles,) background noise of N and R used in each tile, ADU (nan without data).
    tiles : numpy.ndarray
        (n_tiles, 4) int: each tile's core ``y0, y1, x0, x1`` (half-open), in row-major order.
    """

    data: np.ndarray
    weight: np.ndarray
    flags: np.ndarray
    score: np.ndarray
    score_corr: np.ndarray
    psf_d: np.ndarray
    flux_d: np.ndarray
    sigma_new: np.ndarray
    sigma_ref: np.ndarray
    tiles: np.ndarray

    def tile_index(self, x: np.ndarray | float, y: np.ndarray | float) -> np.ndarray:
        """Index of the tile whose core holds each position (clipped to the image)."""
        return self.tiled_psf.tile_index(x, y)

    @property
    def tiled_psf(self) -> TiledPSF:
        """P_D per tile as a callable PSF."""
        return TiledPSF(stamps=self.psf_d, tiles=self.tiles)

    def psf_at(self, x: float, y: float) -> np.ndarray:
        """P_D of the tile holding image position (x, y): a stamp summing to 1."""
        return self.psf_d[int(self.tile_index(x, y)[0])]

    def psf_model(self, degree: int = 2) -> PixelPSF:
        """P_D as a spatially varying `improc.psf.PixelPSF`, fitted to the tiles' stamps.

        Parameters
        ----------
        degree : int
            Largest polynomial degree; lowered until the tiles constrain it (as many tiles as
            terms, and more tile centres than the degree along each axis).

        Returns
        -------
        PixelPSF
            Usable with `improc.psf_photometry.psf_fluxes` on ``data``.

        Raises
        ------
        ValueError
            If no tile has data.
        """
        ny = int(self.tiles[:, 1].max())
        nx = int(self.tiles[:, 3].max())
        valid = np.isfinite(self.flux_d)
        if not valid.any():
            raise ValueError("no tile of the difference has data, so it has no PSF")
        tiles = self.tiles[valid]
        cy = (tiles[:, 0] + tiles[:, 1] - 1) / 2.0
        cx = (tiles[:, 2] + tiles[:, 3] - 1) / 2.0
        n_axis = min(np.unique(cx).size, np.unique(cy).size)
        degree = max(0, min(int(degree), n_axis - 1))
        while degree > 0 and n_terms(degree) > len(tiles):
            degree -= 1
        x0, y0, xs, ys = (nx - 1) / 2.0, (ny - 1) / 2.0, max(nx / 2.0, 1.0), max(ny / 2.0, 1.0)
        design = monomials((cx - x0) / xs, (cy - y0) / ys, degree)
        size = self.psf_d.shape[1]
        coeffs, *_ = np.linalg.lstsq(design, self.psf_d[valid].reshape(len(tiles), -1), rcond=None)
        return PixelPSF(basis=coeffs.reshape(-1, size, size), degree=degree, x0=x0, y0=y0,
                        xscale=xs, yscale=ys, image_shape=(ny, nx))


@dataclass(frozen=True, eq=False)
class TiledPSF:
    """A PSF given per tile (P_D of a tiled subtraction): ``psf(x, y)`` is the stamp of the tile
    whose core holds (x, y).  Usable wherever a `PSFLike` callable is (`improc.measurements`).

    Attributes
    ----------
    stamps : numpy.ndarray
        (n_tiles, size, size) stamps, each summing to 1 (zeros for a tile without data).
    tiles : numpy.ndarray
        (n_tiles, 4) int cores ``y0, y1, x0, x1`` in row-major order (`tile_bounds`).
    """

    stamps: np.ndarray
    tiles: np.ndarray

    def tile_index(self, x: np.ndarray | float, y: np.ndarray | float) -> np.ndarray:
        """Index of the tile whose core holds each position (clipped to the image)."""
        x = np.atleast_1d(np.asarray(x, dtype=float))
        y = np.atleast_1d(np.asarray(y, dtype=float))
        ys = np.unique(self.tiles[:, 0])
        xs = np.unique(self.tiles[:, 2])
        iy = np.clip(np.searchsorted(ys, np.floor(y + 0.5), side="right") - 1, 0, ys.size - 1)
        ix = np.clip(np.searchsorted(xs, np.floor(x + 0.5), side="right") - 1, 0, xs.size - 1)
        return iy * xs.size + ix

    def __call__(self, x: float, y: float) -> np.ndarray:
        stamp = np.asarray(self.stamps[int(self.tile_index(x, y)[0])], dtype=float)
        if not stamp.any():     # a tile without data: the nearest tile that has some
            valid = np.flatnonzero(self.stamps.reshape(len(self.stamps), -1).any(axis=1))
            cy = (self.tiles[valid, 0] + self.tiles[valid, 1]) / 2.0
            cx = (self.tiles[valid, 2] + self.tiles[valid, 3]) / 2.0
            stamp = np.asarray(self.stamps[valid[np.argmin(np.hypot(cx - x, cy - y))]], dtype=float)
        return stamp


def _stamp(psf: PSFLike, x: float, y: float, what: str) -> np.ndarray:
    """A PSF stamp at (x, y) summing to 1; ValueError naming ``what`` if it is not odd and square."""
    stamp = psf.image_at(x, y) if isinstance(psf, PixelPSF) else np.asarray(psf(x, y), dtype=float)
    if stamp.ndim != 2 or stamp.shape[0] != stamp.shape[1] or stamp.shape[0] % 2 == 0:
        raise ValueError(f"{what} must give square stamps with an odd side, got shape {stamp.shape}")
    total = stamp.sum()
    if not (np.isfinite(total) and total > 0):
        raise ValueError(f"{what} gave a stamp summing to {total} at ({x:.1f}, {y:.1f})")
    return stamp / total


def _fwhm(stamp: np.ndarray) -> float:
    """FWHM (pixels) of a centred stamp: the diameter of the disc of its area above half peak."""
    return float(2.0 * np.sqrt(np.count_nonzero(stamp >= 0.5 * stamp.max()) / np.pi))


def _or_box(flags: np.ndarray, radius: int) -> np.ndarray:
    """Each pixel's flags OR-ed with those within a square of half-side ``radius`` (Chebyshev)."""
    out = flags
    width = 2 * radius + 1
    for axis in (0, 1):
        n = out.shape[axis]
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        table = np.pad(out, pad)   # table[i] = OR of padded[i : i + span]
        span = 1
        while 2 * span <= width:
            m = table.shape[axis]
            lo = [slice(None)] * 2
            hi = [slice(None)] * 2
            lo[axis], hi[axis] = slice(0, m - span), slice(span, m)
            table = table[tuple(lo)] | table[tuple(hi)]
            span *= 2
        a = [slice(None)] * 2
        b = [slice(None)] * 2
        a[axis], b[axis] = slice(0, n), slice(width - span, width - span + n)
        out = table[tuple(a)] | table[tuple(b)]
    return out


def _difference_flags(new_flags: np.ndarray, ref_flags: np.ndarray, bad: np.ndarray,
                      radius_of_bad: np.ndarray, radii: list[int]) -> np.ndarray:
    """Both images' flags (NO_DATA for unflagged bad pixels), each bad pixel's spread over the
    square of half-side ``radii[radius_of_bad]``, and EDGE over a border of ``radii[0]``."""
    flags = (new_flags.astype(FLAGS_DTYPE) | ref_flags.astype(FLAGS_DTYPE))
    flags[bad & (flags == 0)] = int(PixelFlag.NO_DATA)
    spread = _or_box(flags, radii[0])
    ny, nx = flags.shape
    for k in range(1, len(radii)):
        chosen = radius_of_bad == k
        rows, cols = np.flatnonzero(chosen.any(axis=1)), np.flatnonzero(chosen.any(axis=0))
        if rows.size == 0:
            continue
        r = radii[k]
        box = np.s_[max(rows[0] - r, 0):min(rows[-1] + r + 1, ny),
                    max(cols[0] - r, 0):min(cols[-1] + r + 1, nx)]
        spread[box] |= _or_box(np.where(chosen[box], flags[box], FLAGS_DTYPE(0)), r)
    edge = FLAGS_DTYPE(PixelFlag.EDGE)
    r = radii[0]
    for border in (np.s_[:r, :], np.s_[-r:, :], np.s_[:, :r], np.s_[:, -r:]):
        spread[border] |= edge
    return spread


def _hidden_light_radii(images: tuple[np.ndarray, np.ndarray], weights: tuple[np.ndarray, np.ndarray],
                        bad: np.ndarray, psf: np.ndarray, fwhm: float, base: int,
                        nsigma: float) -> tuple[np.ndarray, list[int]]:
    """How far each bad pixel's flags spread: radii (``base``, 2 and 3.5 FWHM, the PSF stamp's
    half-side) and each pixel's index into them (0 for good pixels).

    The light a bad pixel hides is either image interpolated from the good pixels of its row
    (`improc.alignment.fill_bad_pixels`), in units of that image's median pixel noise, summed
    over about 2 FWHM around it (on a grid binned 4 x 4); the pixel needs the smallest radius
    where that sum times the PSF's profile (its largest value at that distance or beyond, over
    its peak) falls below ``nsigma``.
    """
    index = np.zeros(bad.shape, dtype=np.int8)
    half = psf.shape[0] // 2
    radii = sorted({base, half} | {int(np.ceil(k * fwhm)) for k in (2.0, 3.5) if base < k * fwhm < half})
    if not bad.any() or len(radii) == 1:
        return index, radii
    iy, ix = np.nonzero(bad)
    hidden = np.zeros(iy.size, dtype=np.float32)
    rows = np.flatnonzero(bad.any(axis=1))
    row_of = np.searchsorted(rows, iy)
    for image, weight in zip(images, weights):
        sigma = median_sigma(weight, bad, inverse=True)
        if np.isfinite(sigma):
            filled = fill_bad_pixels(image[rows], bad[rows])
            np.maximum(hidden, filled[row_of, ix] / np.float32(sigma), out=hidden)
    summed = _box_sums(iy, ix, np.maximum(hidden, 0), bad.shape, 2 * fwhm)
    # profile[r]: the PSF's largest value at distance >= r, over its peak
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    distance = np.rint(np.hypot(xx, yy)).astype(int).ravel()
    peak = np.zeros(distance.max() + 2)
    np.maximum.at(peak, distance, psf.ravel() / psf.max())
    profile = np.maximum.accumulate(peak[::-1])[::-1]
    needed = np.array([profile[min(r, profile.size - 1)] for r in radii])
    # the first radius where the hidden light fades below nsigma
    index[iy, ix] = np.minimum((summed * needed[:, None] >= nsigma).sum(axis=0), len(radii) - 1)
    return index, radii


def _box_sums(iy: np.ndarray, ix: np.ndarray, values: np.ndarray, shape: tuple[int, int],
              side: float) -> np.ndarray:
    """At each (iy, ix), the sum of ``values`` (given at those pixels) within about ``side``
    pixels, on 4 x 4 blocks."""
    block = 4
    coarse = np.zeros((shape[0] // block + 1, shape[1] // block + 1), dtype=np.float32)
    np.add.at(coarse, (iy // block, ix // block), values)
    width = max(1, int(round(side / block))) | 1
    coarse = ndimage.uniform_filter(coarse, size=width, mode="constant") * np.float32(width * width)
    return coarse[iy // block, ix // block]


def _check_images(new, ref, new_weight, ref_weight, new_flags, ref_flags) -> list[np.ndarray]:
    """The six arrays, validated to be (ny, nx) of one shape, flags integer."""
    new = np.asarray(new)
    if new.ndim != 2:
        raise ValueError(f"new must be a 2-d (ny, nx) image, got shape {new.shape}")
    arrays = [new]
    for name, value in (("ref", ref), ("new_weight", new_weight), ("ref_weight", ref_weight),
                        ("new_flags", new_flags), ("ref_flags", ref_flags)):
        value = np.asarray(value)
        if value.shape != new.shape:
            raise ValueError(f"{name} must have the shape of new {new.shape}, got {value.shape}")
        if name.endswith("flags") and not np.issubdtype(value.dtype, np.integer):
            raise ValueError(f"{name} must be an integer array, got dtype {value.dtype}")
        arrays.append(value)
    return arrays


def _check_options(flux_ratio, astrometric_sigma, tile_size, margin, mask_dilation_fwhm,
                   hidden_light_nsigma) -> None:
    if not (np.isfinite(flux_ratio) and flux_ratio > 0):
        raise ValueError(f"flux_ratio must be finite and > 0, got {flux_ratio!r}")
    sigma = np.asarray(astrometric_sigma, dtype=float)
    if sigma.shape != (2,) or not np.all(np.isfinite(sigma)) or np.any(sigma < 0):
        raise ValueError(f"astrometric_sigma must be two finite values >= 0 (pixels), "
                         f"got {astrometric_sigma!r}")
    if not (isinstance(tile_size, (int, np.integer)) and tile_size >= 16):
        raise ValueError(f"tile_size must be an integer >= 16, got {tile_size!r}")
    if margin is not None and not (isinstance(margin, (int, np.integer)) and margin >= 2):
        raise ValueError(f"margin must be None or an integer >= 2, got {margin!r}")
    if not (np.isfinite(mask_dilation_fwhm) and mask_dilation_fwhm >= 0):
        raise ValueError(f"mask_dilation_fwhm must be >= 0, got {mask_dilation_fwhm!r}")
    if not (np.isfinite(hidden_light_nsigma) and hidden_light_nsigma > 0):
        raise ValueError(f"hidden_light_nsigma must be > 0, got {hidden_light_nsigma!r}")


def zogy_subtract(new: np.ndarray, ref: np.ndarray, *, new_weight: np.ndarray,
                  ref_weight: np.ndarray, new_flags: np.ndarray, ref_flags: np.ndarray,
                  new_psf: PSFLike, ref_psf: PSFLike, flux_ratio: float,
                  ref_noise_power: NoisePower | None = None,
                  astrometric_sigma: tuple[float, float] = (0.0, 0.0), tile_size: int = 384,
                  margin: int | None = None, mask_dilation_fwhm: float = 1.0,
                  hidden_light_nsigma: float = 3.0) -> ZogyResult:
    """ZOGY subtraction of a reference from a new image on the same pixel grid, in tiles.

    See the module docstring for the equations, the tiles and the output conventions.

    Parameters
    ----------
    new : numpy.ndarray
        (ny, nx) new image N, sky-subtracted, ADU.
    ref : numpy.ndarray
        (ny, nx) reference R on N's grid (`improc.alignment.Warped.data`), sky-subtracted.
    new_weight : numpy.ndarray
        (ny, nx) inverse variance of N (1/ADU^2), sky and source noise; <= 0 marks bad pixels.
    ref_weight : numpy.ndarray
        (ny, nx) inverse variance of R; for a warped reference its white-noise weight
        (`improc.alignment.Warped.white_weight`), the noise a PSF-sized filter sees.
    new_flags, ref_flags : numpy.ndarray
        (ny, nx) integer `improc.flags.PixelFlag` bits; non-zero marks bad pixels.
    new_psf : PixelPSF or callable
        PSF of N: a `improc.psf.PixelPSF` or ``psf(x, y)`` giving an odd square stamp centred
        on its central pixel, evaluated at each tile's centre.
    ref_psf : PixelPSF or callable
        PSF of R on N's grid, e.g. ``lambda x, y: improc.alignment.psf_on_grid(ref_pixel_psf,
        x, y, source_wcs=..., target_wcs=...)``.
    flux_ratio : float
        F_r / F_n: the reference's ADU per new-image ADU of the same source,
        ``10**(0.4 (zp_ref - zp_new))`` from the zero points (> 0).
    ref_noise_power : callable or None
        ``G(fy, fx)``: R's noise power spectrum relative to its zero-frequency power, at
        frequencies in cycles per pixel (broadcasting arrays), e.g.
        `improc.alignment.warp_noise_power` for a warped reference; None: white noise.
    astrometric_sigma : tuple of float
        Registration noise (sigma_x, sigma_y) in pixels of N (both >= 0), e.g. the combined
        astrometric rms of both WCS fits per axis.
    tile_size : int
        Largest side of a tile's core, pixels (>= 16).
    margin : int or None
        Pixels of data around each core (>= 2); None gives 1.5 times the half-side of the
        larger PSF stamp (at least 16), beyond the reach of the filters of S and S_corr.
    mask_dilation_fwhm : float
        Half-side of the square over which every bad pixel spreads its flags in D, in FWHM of
        the broader PSF (>= 0; at least 1 pixel).
    hidden_light_nsigma : float
        Bad pixels that hide light (a saturated star, a bleed trail, a hit on a galaxy) spread
        their flags further, to where that light times the broader PSF's profile falls below
        this many times the noise (> 0; see `_hidden_light_radii`): zeroing the light under a
        bad pixel leaves residuals over the reach of the PSFs.

    Returns
    -------
    ZogyResult
        D (ADU of N), its weight and flags, S, S_corr, P_D and F_D per tile.

    Raises
    ------
    ValueError
        If arrays do not match, an option is out of range, or a PSF gives an invalid stamp.
    """
    new, ref, new_weight, ref_weight, new_flags, ref_flags = _check_images(
        new, ref, new_weight, ref_weight, new_flags, ref_flags)
    _check_options(flux_ratio, astrometric_sigma, tile_size, margin, mask_dilation_fwhm,
                   hidden_light_nsigma)
    shape = new.shape
    bad = ((new_flags != 0) | (ref_flags != 0) | ~(new_weight > 0) | ~(ref_weight > 0)
           | ~np.isfinite(new) | ~np.isfinite(ref))
    plan = _plan(shape, new_psf, ref_psf, ref_noise_power, int(tile_size), margin)
    tiles, p_new, p_ref, size = plan.tiles, plan.p_new, plan.p_ref, plan.psf_size
    out = {name: np.zeros(shape, dtype=np.float32) for name in ("d", "w", "s", "sc")}
    psf_d = np.zeros((len(tiles), size, size))
    flux_d, sig_n, sig_r = (np.full(len(tiles), np.nan) for _ in range(3))
    sigma_xy = (float(astrometric_sigma[0]), float(astrometric_sigma[1]))
    for i, (y0, y1, x0, x1) in enumerate(tiles):
        win = read_window((new, new_weight), (ref, ref_weight), bad,
                          (y0 - plan.margin, x0 - plan.margin), plan.window)
        if win is None:
            continue
        sig_n[i], sig_r[i] = win.sigma_new, win.sigma_ref
        filters = tile_filters(p_new[i], p_ref[i], plan.window, flux_ratio=float(flux_ratio),
                               sigma_new=sig_n[i], sigma_ref=sig_r[i],
                               power_window=plan.power_window, power_kernel=plan.power_kernel,
                               kernel_size=plan.kernel_size)
        flux_d[i] = filters.flux_d
        psf_d[i] = _padded(filters.psf_d, size)
        core = np.s_[plan.margin:plan.margin + y1 - y0, plan.margin:plan.margin + x1 - x0]
        for name, values in zip(("d", "w", "s", "sc"), subtract_window(win, filters, sigma_xy, core)):
            out[name][y0:y1, x0:x1] = values
    fwhm = max(_fwhm(p) for p in p_new + p_ref)
    broad = max(p_new + p_ref, key=_fwhm)
    radius_of_bad, radii = _hidden_light_radii(
        (new, ref), (new_weight, ref_weight), bad, broad, fwhm,
        max(1, int(np.ceil(mask_dilation_fwhm * fwhm))), hidden_light_nsigma)
    flags = _difference_flags(new_flags, ref_flags, bad, radius_of_bad, radii)
    return ZogyResult(data=out["d"], weight=out["w"], flags=flags, score=out["s"],
                      score_corr=out["sc"], psf_d=psf_d, flux_d=flux_d, sigma_new=sig_n,
                      sigma_ref=sig_r, tiles=tiles)


@dataclass(frozen=True)
class _Plan:
    """The tiles, their PSF stamps and the transform sizes of one subtraction."""

    tiles: np.ndarray
    p_new: list[np.ndarray]
    p_ref: list[np.ndarray]
    psf_size: int
    margin: int
    window: tuple[int, int]
    kernel_size: int
    power_window: np.ndarray
    power_kernel: np.ndarray


def _plan(shape: tuple[int, int], new_psf: PSFLike, ref_psf: PSFLike,
          ref_noise_power: NoisePower | None, tile_size: int, margin: int | None) -> _Plan:
    """Tiles, both PSFs at their centres, the margin and the window and kernel grids."""
    tiles = tile_bounds(shape, tile_size)
    centres = [((y0 + y1 - 1) / 2.0, (x0 + x1 - 1) / 2.0) for y0, y1, x0, x1 in tiles]
    p_new = [_stamp(new_psf, cx, cy, "new_psf") for cy, cx in centres]
    p_ref = [_stamp(ref_psf, cx, cy, "ref_psf") for cy, cx in centres]
    psf_size = max(p.shape[0] for p in p_new + p_ref)
    margin = max(16, int(np.ceil(1.5 * (psf_size // 2)))) if margin is None else int(margin)
    core = (int(np.max(tiles[:, 1] - tiles[:, 0])), int(np.max(tiles[:, 3] - tiles[:, 2])))
    window = window_shape(tuple(max(n + 2 * margin, psf_size) for n in core), 0)
    kernel_size = min(window_shape((2 * psf_size, 2 * psf_size), 0)[0], *window)
    return _Plan(tiles=tiles, p_new=p_new, p_ref=p_ref, psf_size=psf_size, margin=margin,
                 window=window, kernel_size=kernel_size,
                 power_window=relative_power(ref_noise_power, window),
                 power_kernel=relative_power(ref_noise_power, (kernel_size, kernel_size)))


def _padded(stamp: np.ndarray, size: int) -> np.ndarray:
    """An odd stamp zero-padded (or cut) to (size, size) about its centre."""
    h, k = stamp.shape[0] // 2, size // 2
    out = np.zeros((size, size))
    m = min(h, k)
    out[k - m:k + m + 1, k - m:k + m + 1] = stamp[h - m:h + m + 1, h - m:h + m + 1]
    return out


def detect_peaks(score: np.ndarray, *, threshold: float = 5.0, mask: np.ndarray | None = None,
                 radius: int = 2) -> Table:
    """Local extrema of a score image beyond +/- threshold, with sub-pixel positions.

    A pixel is a peak if ``|score| >= threshold``, it is not masked, and its signed value is
    the most extreme (largest for positive, smallest for negative peaks) among the unmasked
    pixels within ``radius`` (a square).  Positions are refined by a parabola through the peak
    and its two neighbours along each axis (clipped to +/- 0.5 pixel).

    Parameters
    ----------
    score : numpy.ndarray
        (ny, nx) score in standard deviations, e.g. `ZogyResult.score_corr`.
    threshold : float
        Detection threshold (> 0), sigma; peaks beyond +threshold (brighter in the new image)
        and below -threshold (fainter: a fading variable) are both found.
    mask : numpy.ndarray or None
        (ny, nx) bool, True for pixels to ignore (e.g. ``ZogyResult.flags != 0``).
    radius : int
        Half-side of the neighbourhood in which a peak is the extremum (>= 1).

    Returns
    -------
    astropy.table.Table
        Columns ``x, y`` (0-based sub-pixel position), ``ix, iy`` (peak pixel), ``score`` (signed
        value at the peak pixel), by decreasing ``|score|``.

    Raises
    ------
    ValueError
        If the arrays do not match or an option is out of range.
    """
    score = np.asarray(score)
    if score.ndim != 2:
        raise ValueError(f"score must be a 2-d (ny, nx) image, got shape {score.shape}")
    if not (np.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be > 0, got {threshold!r}")
    if not (isinstance(radius, (int, np.integer)) and radius >= 1):
        raise ValueError(f"radius must be an integer >= 1, got {radius!r}")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != score.shape:
            raise ValueError(f"mask must have the shape of score {score.shape}, got {mask.shape}")
    ny, nx = score.shape
    candidate = np.abs(score) >= threshold
    if mask is not None:
        candidate &= ~mask
    iy, ix = np.nonzero(candidate)
    sign = np.sign(score[iy, ix])
    value = sign * score[iy, ix]
    keep = np.ones(iy.size, dtype=bool)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy == 0 and dx == 0:
                continue
            jy, jx = iy + dy, ix + dx
            inside = (jy >= 0) & (jy < ny) & (jx >= 0) & (jx < nx)
            jy, jx = np.clip(jy, 0, ny - 1), np.clip(jx, 0, nx - 1)
            other = sign * score[jy, jx]
            valid = inside if mask is None else inside & ~mask[jy, jx]
            # ties go to the first pixel in raster order
            earlier = (dy < 0) | ((dy == 0) & (dx < 0))
            beaten = (other > value) | ((other == value) & earlier)
            keep &= ~(valid & beaten)
    iy, ix, sign, value = iy[keep], ix[keep], sign[keep], value[keep]
    x = ix + _parabola_offset(score, iy, ix, sign, axis=1)
    y = iy + _parabola_offset(score, iy, ix, sign, axis=0)
    order = np.argsort(-value, kind="stable")
    return Table({"x": x[order], "y": y[order], "ix": ix[order], "iy": iy[order],
                  "score": (sign * value)[order].astype(float)})


def _parabola_offset(score: np.ndarray, iy: np.ndarray, ix: np.ndarray, sign: np.ndarray, *,
                     axis: int) -> np.ndarray:
    """Sub-pixel offset of the vertex of the parabola through a peak and its two neighbours."""
    n = score.shape[axis]
    pos = iy if axis == 0 else ix
    lo, hi = np.clip(pos - 1, 0, n - 1), np.clip(pos + 1, 0, n - 1)
    if axis == 0:
        left, right = score[lo, ix], score[hi, ix]
    else:
        left, right = score[iy, lo], score[iy, hi]
    centre = score[iy, ix]
    left, right, centre = sign * left, sign * right, sign * centre
    curvature = left - 2.0 * centre + right
    offset = np.divide(0.5 * (left - right), curvature, where=curvature < 0,
                       out=np.zeros(iy.size, dtype=float))
    return np.clip(offset, -0.5, 0.5)


def residual_background(image: np.ndarray, busy: np.ndarray, *, box: int = 64,
                        filter_size: int = 1) -> np.ndarray:
    """The smooth background left in a difference image or score: a sep mesh of ``box`` pixels
    (median-filtered over ``filter_size`` boxes, bicubic) over the pixels that are not ``busy``.

    Each image's own sky was estimated around its own objects (a galaxy's halo, a bright star's
    wings, on meshes of their own), so D keeps offsets of a few hundredths of its pixel noise
    over tens of pixels.  A matched filter sums them over the PSF's effective area: for a 1.4"
    PSF (~64 pixels) an offset of 0.1 sigma per pixel is 0.8 sigma in S.  On a simulated pair
    S_corr's tile means ranged from -0.64 to +0.30 and 11 of 64 tiles had a standard deviation
    off 1 by more than 5 %; without this background, 1 of 64.

    The offsets are largest along the chip's edges and flagged borders (0.1 sigma per pixel in
    D, +1 in S_corr, over the first 60 pixels) and often fill a single box, which a 3 x 3
    median filter of the mesh erases (its neighbours outvote it): on two simulated pairs 5 of
    128 tiles stayed 5-10 % off with it, none without it.  Sources are masked already, so the
    filter's usual job (boxes on bright stars) is not needed; by default there is none.  (D's
    PSF fluxes feel the unfiltered mesh's noise more: `pipeline.subtraction` keeps a 3 x 3
    filter for D.)  The box means are sep's clipped estimates; their noise (S_corr is
    correlated over the PSF's area, so a 64-pixel box holds ~64 independent values: 0.12
    sigma) changes the variance by about 1/64.

    Parameters
    ----------
    image : numpy.ndarray
        (ny, nx) D or S_corr.
    busy : numpy.ndarray
        (ny, nx) bool: pixels to leave out (flagged, or on sources with their wings: grow them
        first).
    box : int
        Mesh size, pixels (>= 8).
    filter_size : int
        Median filter over the mesh, in boxes (odd, >= 1; 1 = none).

    Returns
    -------
    numpy.ndarray
        (ny, nx) float32 background, 0 where the image is not finite.
    """
    import sep

    if box < 8 or filter_size < 1 or filter_size % 2 == 0:
        raise ValueError(f"need box >= 8 and an odd filter_size >= 1, got {box} and {filter_size}")
    image = np.asarray(image)
    busy = np.asarray(busy, bool) | ~np.isfinite(image)
    if busy.all():
        return np.zeros(image.shape, np.float32)
    data = np.ascontiguousarray(np.where(busy, 0.0, image), dtype=np.float32)
    return sep.Background(data, mask=busy, bw=box, bh=box, fw=filter_size, fh=filter_size).back().astype(np.float32)
