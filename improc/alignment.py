"""Resample an image (data, weight, flags) onto another image's pixel grid, and its PSF with it.

`warp_image` puts a reference image on the grid of a new image, both described by their fitted
(TAN-SIP) WCSs; `psf_on_grid` gives the reference PSF as it appears in the warped image.

Method
------
*Pixel mapping.*  Each target pixel ``(x, y)`` maps to the source position
``(x_s, y_s) = source_wcs.world_to_pixel(target_wcs.pixel_to_world(x, y))``.  The WCSs are
evaluated exactly on a coarse grid of nodes (every ``grid_step`` pixels) and the offsets
``x_s - x, y_s - y`` are interpolated between them by cubic splines (for the simulator's
third-order TAN-SIP and ``grid_step`` = 64, within 1e-9 pixel of the exact mapping).  The mapping
is applied in float32 (its rounding, < 2.5e-4 pixel on a 4096-pixel axis, is negligible).

*Speed.*  ``reproject.reproject_interp`` (the astropy-affiliated standard) takes 7-12 s on one
core for one 2048 x 4096 plane (bicubic; `bench/bench_subtraction.py`), as it evaluates both
WCSs at every pixel; this warp takes ~1.1 s for data, weight and flags together.

*Interpolation.*  The data are interpolated with the cardinal cubic B-spline
(`scipy.ndimage.map_coordinates`, order 3, after the spline prefilter), which reproduces a
band-limited image to a fraction of a percent for PSFs of FWHM >= 2.5 pixels.  Each weight of
this kernel is ``eta(d_x) eta(d_y)`` for an input pixel at ``(d_x, d_y)`` from the mapped
position; they sum to 1, and the 4 x 4 input pixels nearest to the mapped position carry all
weights above 2% (farther ones have ``|eta(d_x) eta(d_y)| < 0.021``).

*Flux.*  The output is multiplied by the area of a target pixel in source pixels,
``|det J|`` with ``J = d(x_s, y_s) / d(x, y)`` (interpolated like the mapping): the surface
brightness is kept, so a star's total flux (the sum of its pixels) is conserved through a change
of pixel scale.  Warp sky-subtracted data: a sky level per pixel does not scale with the pixel
area of a distorted WCS, a star's flux does.

*Bad pixels.*  Flagged, zero-weight or non-finite input pixels are replaced, before the
prefilter, by linear interpolation between the nearest good pixels of their row, so that their
values do not ring through the spline (its prefilter spreads a value over ~8 pixels).  A target
pixel is flagged with the OR of the flags of the 4 x 4 input pixels nearest to its mapped
position, plus ``EDGE`` when that footprint leaves the source image and ``NO_DATA`` when the
mapped position itself is off the source image; flagged pixels have weight 0.

*Noise.*  With input variance sigma^2 = 1/weight and ``A = |det J|``, the variance of a
warped pixel is ``A^2 sum_ij eta_i^2 eta_j^2 sigma_ij^2``.  We take sigma^2 locally constant
over the kernel's footprint (it is bilinearly interpolated at the mapped position), so the
variance is ``A^2 sigma^2(x_s, y_s) s(f_x) s(f_y)`` with ``s(f) = sum_k eta(k - f)^2`` of the
sub-pixel phase ``f`` (s = 1 at f = 0, 0.756 at f = 0.5): `Warped.weight` is its inverse.
Resampling correlates the noise of neighbouring pixels: the pixel variance is lowered by
``s(f_x) s(f_y)`` (down to 0.57) while the noise at the spatial frequencies of a PSF is not
(the spline passes them), and a sum of warped pixels holds the noise of the source pixels it
covers (``A`` per target pixel).  A matched filter, a PSF fit or an aperture
sum on the warped image sees noise of variance ``A sigma^2(x_s, y_s)`` per pixel:
`Warped.white_weight` is its inverse, the weight of the white noise with the same power at low
spatial frequencies (its power spectrum relative to that is `warp_noise_power`).  Use
``weight`` for pixel statistics (the chi^2 of a pixel) and ``white_weight`` for anything that
sums over a PSF (`improc.zogy.zogy_subtract`, PSF photometry, coaddition).

The interpolation is not a flux-weighted rebinning: for a target pixel larger than ~1.5 source
pixels (downsampling), noise aliases and a smoothing kernel would be better.  Reference and new
images of one survey differ in scale by far less.

Conventions: pixel coordinates are 0-based with pixel centres at integers; arrays are (ny, nx).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.fft
import scipy.ndimage as ndi
from astropy.wcs import WCS
from scipy.interpolate import make_interp_spline

from improc.flags import FLAGS_DTYPE, PixelFlag
from improc.psf import PixelPSF

__all__ = ["Warped", "PixelMapping", "warp_image", "map_pixels", "pixel_mapping", "local_jacobian",
           "psf_on_grid", "spline_noise_factor", "warp_noise_power", "fill_bad_pixels"]

#: A PSF given as a callable: ``psf(x, y)`` -> odd square stamp, star at the central pixel's centre.
PSFLike = PixelPSF | Callable[[float, float], np.ndarray]

#: Footprint of the flags of one output pixel: input offsets from floor(mapped position).
_FOOTPRINT = (-1, 0, 1, 2)
#: Half-step (pixels) of the finite differences giving the local Jacobian.
_JACOBIAN_STEP = 0.5
#: Target rows warped together (bounds the temporaries to a few MB).
_BAND_ROWS = 128


@dataclass(frozen=True, eq=False)
class Warped:
    """An image resampled onto another pixel grid (see the module docstring).

    Attributes
    ----------
    data : numpy.ndarray
        (ny, nx) float32 on the target grid, the source's units per target pixel (flux
        conserving); 0 where ``footprint`` is False.
    weight : numpy.ndarray
        (ny, nx) float32 inverse variance of each warped pixel (1/unit^2), the kernel weights
        propagated (``A^2 s(f_x) s(f_y) sigma^2``); 0 where ``flags`` is non-zero.
    white_weight : numpy.ndarray
        (ny, nx) float32 inverse variance of the white noise with the same power at the scales
        of a PSF as the (correlated) warped noise (``A sigma^2``); ``weight / white_weight =
        1 / (A s(f_x) s(f_y))``.  0 where ``flags`` is non-zero.
    flags : numpy.ndarray
        (ny, nx) uint16: the OR of the source flags of the 4 x 4 input pixels around each
        mapped position, ``EDGE`` where they leave the source image, ``NO_DATA`` off it.
    footprint : numpy.ndarray
        (ny, nx) bool: True where the mapped position falls on the source image.
    """

    data: np.ndarray
    weight: np.ndarray
    white_weight: np.ndarray
    flags: np.ndarray
    footprint: np.ndarray


@dataclass(frozen=True, eq=False)
class PixelMapping:
    """Where each target pixel falls on the source image.

    Attributes
    ----------
    coords : numpy.ndarray
        (2, ny, nx) float32: source positions (0-based pixels) ``y_s, x_s`` of the target pixel
        centres (the layout of `scipy.ndimage.map_coordinates`).
    area : numpy.ndarray
        (ny, nx) float32 ``|det J|``: a target pixel's area in source pixels.
    """

    coords: np.ndarray
    area: np.ndarray

    @property
    def x(self) -> np.ndarray:
        """(ny, nx) source x of each target pixel."""
        return self.coords[1]

    @property
    def y(self) -> np.ndarray:
        """(ny, nx) source y of each target pixel."""
        return self.coords[0]


def map_pixels(x: np.ndarray, y: np.ndarray, *, source_wcs: WCS, target_wcs: WCS
               ) -> tuple[np.ndarray, np.ndarray]:
    """Source pixel positions of target pixel positions, exactly through both WCSs.

    Parameters
    ----------
    x, y : numpy.ndarray
        0-based target pixel positions (any matching shapes).
    source_wcs, target_wcs : astropy.wcs.WCS
        Celestial WCSs of the source and target images (distortions included).

    Returns
    -------
    x_s, y_s : numpy.ndarray
        float64 source positions, shape of ``x``.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ra, dec = target_wcs.all_pix2world(x.ravel(), y.ravel(), 0)
    xs, ys = source_wcs.all_world2pix(ra, dec, 0, tolerance=1e-9, maxiter=50, quiet=True)
    return np.asarray(xs, dtype=float).reshape(x.shape), np.asarray(ys, dtype=float).reshape(x.shape)


def local_jacobian(x: float, y: float, *, source_wcs: WCS, target_wcs: WCS) -> np.ndarray:
    """The local linear map ``J`` from target pixel offsets to source pixel offsets at (x, y).

    Parameters
    ----------
    x, y : float
        0-based target pixel position.
    source_wcs, target_wcs : astropy.wcs.WCS
        The WCSs of the source and target images.

    Returns
    -------
    numpy.ndarray
        (2, 2): ``J @ (dx, dy) = (dx_s, dy_s)``; ``|det J|`` is a target pixel's area in source
        pixels.
    """
    h = _JACOBIAN_STEP
    xs, ys = map_pixels(np.array([x - h, x + h, x, x]), np.array([y, y, y - h, y + h]),
                        source_wcs=source_wcs, target_wcs=target_wcs)
    return np.array([[xs[1] - xs[0], xs[3] - xs[2]], [ys[1] - ys[0], ys[3] - ys[2]]]) / (2 * h)


def _nodes(n: int, step: int) -> np.ndarray:
    """Coarse nodes from 0 to n - 1 (at least to 3), at most ``step`` apart, at least 4 of them."""
    count = max(4, int(np.ceil((n - 1) / step)) + 1)
    return np.linspace(0.0, max(n - 1.0, 3.0), count)


def _interpolation_matrix(nodes: np.ndarray, n: int) -> np.ndarray:
    """(n, len(nodes)) float32 matrix of the cubic spline through ``nodes`` evaluated at 0..n-1."""
    spline = make_interp_spline(nodes, np.eye(nodes.size), k=3)
    return spline(np.arange(n, dtype=float)).astype(np.float32)


class _MappingGrid:
    """The mapping evaluated exactly on coarse nodes, interpolated to any band of target rows."""

    def __init__(self, source_wcs: WCS, target_wcs: WCS, shape: tuple[int, int], step: int):
        ny, nx = shape
        self.shape = shape
        xn, yn = _nodes(nx, step), _nodes(ny, step)
        gx, gy = np.meshgrid(xn, yn)
        xs, ys = map_pixels(gx, gy, source_wcs=source_wcs, target_wcs=target_wcs)
        h = _JACOBIAN_STEP
        jac = [map_pixels(gx + dx, gy + dy, source_wcs=source_wcs, target_wcs=target_wcs)
               for dx, dy in ((h, 0.0), (-h, 0.0), (0.0, h), (0.0, -h))]
        dxs_dx, dys_dx = (jac[0][0] - jac[1][0]) / (2 * h), (jac[0][1] - jac[1][1]) / (2 * h)
        dxs_dy, dys_dy = (jac[2][0] - jac[3][0]) / (2 * h), (jac[2][1] - jac[3][1]) / (2 * h)
        area = np.abs(dxs_dx * dys_dy - dxs_dy * dys_dx)
        ax = _interpolation_matrix(xn, nx)
        self.ay = _interpolation_matrix(yn, ny)
        # node rows interpolated along x once: (n_y_nodes, nx) each
        self.rows = [(values.astype(np.float32) @ ax.T) for values in (ys - gy, xs - gx, area)]

    def band(self, y0: int, y1: int) -> PixelMapping:
        """The mapping of target rows y0 .. y1 - 1."""
        nx = self.shape[1]
        ay = self.ay[y0:y1]
        coords = np.empty((2, y1 - y0, nx), dtype=np.float32)
        np.matmul(ay, self.rows[0], out=coords[0])
        coords[0] += np.arange(y0, y1, dtype=np.float32)[:, None]
        np.matmul(ay, self.rows[1], out=coords[1])
        coords[1] += np.arange(nx, dtype=np.float32)[None, :]
        return PixelMapping(coords=coords, area=ay @ self.rows[2])


def pixel_mapping(*, source_wcs: WCS, target_wcs: WCS, target_shape: tuple[int, int],
                  grid_step: int = 64) -> PixelMapping:
    """Source positions and pixel areas of every target pixel (see the module docstring).

    Parameters
    ----------
    source_wcs, target_wcs : astropy.wcs.WCS
        The WCSs of the source and target images.
    target_shape : tuple of int
        (ny, nx) of the target image.
    grid_step : int
        Spacing of the exactly computed nodes, pixels.

    Returns
    -------
    PixelMapping
        Source positions and areas, float32.
    """
    grid = _MappingGrid(source_wcs, target_wcs, tuple(target_shape), grid_step)
    return grid.band(0, target_shape[0])


@lru_cache(maxsize=1)
def _noise_factor_coefficients() -> tuple[float, ...]:
    """Coefficients (highest power first) of ``s(f)`` as a cubic polynomial in ``(f - 1/2)^2``.

    ``s(f) = sum_k eta(k - f)^2`` of the cardinal cubic spline ``eta`` is computed at 257
    phases by interpolating a unit impulse; it is exactly such a cubic (the fit is exact to
    1e-14).
    """
    n = 81
    delta = np.zeros(n)
    delta[n // 2] = 1.0
    coeffs = ndi.spline_filter1d(delta, order=3, mode="mirror")
    phases = np.linspace(0.0, 1.0, 257)
    pos = n // 2 + phases[:, None] + np.arange(-30, 31)[None, :]
    eta = ndi.map_coordinates(coeffs, [pos.ravel()], order=3, prefilter=False).reshape(pos.shape)
    return tuple(np.polyfit((phases - 0.5) ** 2, (eta**2).sum(axis=1), 3))


def spline_noise_factor(phase: np.ndarray) -> np.ndarray:
    """``s(f)``: the variance of a unit-variance white noise interpolated at sub-pixel phase f.

    Parameters
    ----------
    phase : numpy.ndarray
        Sub-pixel phases ``f = x - floor(x)`` in [0, 1).

    Returns
    -------
    numpy.ndarray
        float32, same shape: 1 at f = 0, 0.756 at f = 0.5.
    """
    u = np.asarray(phase, dtype=np.float32) - np.float32(0.5)
    u *= u
    c3, c2, c1, c0 = (np.float32(c) for c in _noise_factor_coefficients())
    out = u * c3
    out += c2
    out *= u
    out += c1
    out *= u
    out += c0
    return out


def warp_noise_power(fy: np.ndarray, fx: np.ndarray, *, jacobian: np.ndarray | None = None
                     ) -> np.ndarray:
    """Power spectrum of warped white noise relative to its zero-frequency power, ``G(fy, fx)``.

    Interpolating white noise of variance sigma^2 at sub-pixel phase ``f`` filters it by the
    spline's response ``H_f``; averaged over phases (a rotation or a non-integer shift sweeps
    them), the noise power at spatial frequency ``nu`` (cycles per source pixel) is
    ``sigma^2 G1(nu_x) G1(nu_y)`` with ``G1(nu) = sum_m eta^(nu + m)^2`` and the cardinal cubic
    spline's transform ``eta^(nu) = sinc(nu)^4 / ((2 + cos 2 pi nu) / 3)``: 1 at nu = 0, 0.486 at
    the Nyquist frequency, 0.874 on average (the mean of ``spline_noise_factor``).  A target
    frequency ``f`` is the source frequency ``J^-T f`` (folded into the source's band).  Pass
    it as ``ref_noise_power`` to `improc.zogy.zogy_subtract` for a warped reference, with the
    warp's `local_jacobian` at the image centre (``functools.partial``); without it the axes are
    taken as the source's, which changes G by 0.3% on average (1.5% at most) for a rotation of
    1 degree, 2.6% (7%) for a scale change of 4%.

    Parameters
    ----------
    fy, fx : numpy.ndarray
        Spatial frequencies (cycles per target pixel) along y and x; they broadcast together.
    jacobian : numpy.ndarray or None
        (2, 2) ``J`` of the warp (`local_jacobian`); None: the identity.

    Returns
    -------
    numpy.ndarray
        G, float64, the broadcast shape of ``fy`` and ``fx``.
    """
    fy, fx = np.broadcast_arrays(np.asarray(fy, dtype=float), np.asarray(fx, dtype=float))
    if jacobian is not None:
        inverse_t = np.linalg.inv(np.asarray(jacobian, dtype=float)).T
        fx, fy = (inverse_t[0, 0] * fx + inverse_t[0, 1] * fy,
                  inverse_t[1, 0] * fx + inverse_t[1, 1] * fy)
    # G1 has period 1: fold into [-1/2, 1/2)
    return _spline_power_1d((fy + 0.5) % 1.0 - 0.5) * _spline_power_1d((fx + 0.5) % 1.0 - 0.5)


def _spline_power_1d(nu: np.ndarray) -> np.ndarray:
    """``G1(nu) = sum_m eta^(nu + m)^2`` of the cardinal cubic spline for nu in [-1/2, 1/2]
    (terms |m| <= 3; the next ones are below 2e-7).

    ``eta^(nu + m)^2 = 9 sinc(nu + m)^8 / (2 + cos 2 pi nu)^2`` and ``sin pi (nu + m) = +-sin pi nu``.
    """
    sinc2 = np.sinc(nu) ** 2
    total = (sinc2 * sinc2) ** 2
    s2 = np.sin(np.pi * nu) ** 2
    s8 = (s2 * s2) ** 2
    for m in (-3, -2, -1, 1, 2, 3):
        t2 = (np.pi * (nu + m)) ** 2
        t4 = t2 * t2
        total += s8 / (t4 * t4)
    return total * 9.0 / (2.0 + np.cos(2.0 * np.pi * nu)) ** 2


def fill_bad_pixels(data: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """A float32 copy of ``data`` whose bad pixels are interpolated along their row.

    Each run of bad pixels gets the straight line between the nearest good pixels left and
    right of it (the nearest one's value at a row end; 0 in a row without a good pixel).

    Parameters
    ----------
    data : numpy.ndarray
        (ny, nx) image.
    bad : numpy.ndarray
        (ny, nx) bool, True for the pixels to replace.

    Returns
    -------
    numpy.ndarray
        (ny, nx) float32.
    """
    return _fill_bad_pixels(np.array(data, dtype=np.float32), np.asarray(bad, dtype=bool))


def _fill_bad_pixels(values: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """`fill_bad_pixels` in place on a float32 array (returned)."""
    out = values
    ny, nx = out.shape
    # runs of bad pixels along rows; a good column appended to every row ends runs at row ends
    flat = np.pad(bad, ((0, 0), (0, 1))).ravel().view(np.int8)
    edges = np.flatnonzero(np.diff(flat, prepend=np.int8(0)))
    if edges.size == 0:
        return out
    start, stop = edges[0::2], edges[1::2]
    row, col0 = np.divmod(start, nx + 1)
    col1 = stop - row * (nx + 1)                        # first good column after the run
    left = np.where(col0 > 0, out[row, np.maximum(col0 - 1, 0)], np.nan)
    right = np.where(col1 < nx, out[row, np.minimum(col1, nx - 1)], np.nan)
    left = np.where(np.isnan(left), right, left)
    right = np.where(np.isnan(right), left, right)
    length = stop - start
    run = np.repeat(np.arange(start.size), length)
    pos = np.arange(run.size) - np.repeat(np.cumsum(length) - length, length) + 1
    t = pos / (length[run] + 1.0)
    filled = left[run] + t * (right[run] - left[run])
    cols = col0[run] + pos - 1
    out[row[run], cols] = np.nan_to_num(filled, nan=0.0)
    return out


def _or_dilated(flags: np.ndarray, offsets: tuple[int, ...], pad: int, pad_value: int) -> np.ndarray:
    """Flags padded by ``pad`` (with ``pad_value``) and OR-ed over ``offsets`` along both axes.

    Element [j + pad, i + pad] of the result is the OR of input flags[j + b, i + a] for a, b in
    ``offsets`` (``pad_value`` off the input).
    """
    padded = np.pad(flags, pad, constant_values=pad_value)
    for axis in (0, 1):
        out = np.zeros_like(padded)
        n = padded.shape[axis]
        for k in offsets:
            src = [slice(None)] * 2
            dst = [slice(None)] * 2
            src[axis] = slice(max(k, 0), n + min(k, 0))
            dst[axis] = slice(max(-k, 0), n - max(k, 0))
            out[tuple(dst)] |= padded[tuple(src)]
        padded = out
    return padded


def _check_inputs(data, weight, flags) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    data = np.asarray(data)
    if data.ndim != 2:
        raise ValueError(f"data must be a 2-d (ny, nx) image, got shape {data.shape}")
    weight = np.asarray(weight)
    flags = np.asarray(flags)
    for name, value in (("weight", weight), ("flags", flags)):
        if value.shape != data.shape:
            raise ValueError(f"{name} must have the shape of data {data.shape}, got {value.shape}")
    if not np.issubdtype(flags.dtype, np.integer):
        raise ValueError(f"flags must be an integer array, got dtype {flags.dtype}")
    return data, weight, flags


def warp_image(data: np.ndarray, weight: np.ndarray, flags: np.ndarray, *, source_wcs: WCS,
               target_wcs: WCS, target_shape: tuple[int, int], grid_step: int = 64) -> Warped:
    """Resample an image (data, weight, flags) onto the pixel grid of another WCS.

    See the module docstring for the method, the flux and noise conventions.

    Parameters
    ----------
    data : numpy.ndarray
        (ny_s, nx_s) source image, preferably sky-subtracted (any units, e.g. ADU).
    weight : numpy.ndarray
        (ny_s, nx_s) inverse variance of ``data``; <= 0 marks a bad pixel.
    flags : numpy.ndarray
        (ny_s, nx_s) integer flags (`improc.flags.PixelFlag` bits); non-zero marks a bad pixel.
    source_wcs : astropy.wcs.WCS
        WCS of the source image (the fitted one).
    target_wcs : astropy.wcs.WCS
        WCS of the target grid (the new image's fitted WCS).
    target_shape : tuple of int
        (ny, nx) of the target grid.
    grid_step : int
        Spacing of the nodes where the WCSs are evaluated exactly, pixels (> 0).

    Returns
    -------
    Warped
        Data, weight, white-noise weight, flags and footprint on the target grid.

    Raises
    ------
    ValueError
        If the arrays do not match, ``target_shape`` is not two positive integers or
        ``grid_step`` is not > 0.
    """
    data, weight, flags = _check_inputs(data, weight, flags)
    shape = tuple(int(n) for n in np.ravel(target_shape))
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"target_shape must be (ny, nx) with both >= 1, got {target_shape}")
    if not (isinstance(grid_step, (int, np.integer)) and grid_step > 0):
        raise ValueError(f"grid_step must be an integer > 0, got {grid_step!r}")
    grid = _MappingGrid(source_wcs, target_wcs, shape, int(grid_step))
    bad = (flags != 0) | ~(weight > 0) | ~np.isfinite(data)
    sources = _Sources(data, weight, flags, bad)
    del bad
    out = Warped(data=np.empty(shape, np.float32), weight=np.empty(shape, np.float32),
                 white_weight=np.empty(shape, np.float32), flags=np.empty(shape, FLAGS_DTYPE),
                 footprint=np.empty(shape, bool))
    for y0 in range(0, shape[0], _BAND_ROWS):
        y1 = min(y0 + _BAND_ROWS, shape[0])
        sources.warp_band(grid.band(y0, y1), out, slice(y0, y1))
    return out


class _Sources:
    """The source planes prepared for interpolation: spline coefficients, variance, flags."""

    def __init__(self, data: np.ndarray, weight: np.ndarray, flags: np.ndarray, bad: np.ndarray):
        self.shape = data.shape
        clean = _fill_bad_pixels(np.array(data, dtype=np.float32), bad)
        self.coefficients = ndi.spline_filter(clean, order=3, output=np.float32, mode="mirror")
        del clean
        variance = np.zeros(weight.shape, dtype=np.float32)
        np.divide(np.float32(1.0), weight, out=variance, where=~bad)
        self.variance = _fill_bad_pixels(variance, bad)
        source = flags.astype(FLAGS_DTYPE)
        source[bad & (source == 0)] = int(PixelFlag.NO_DATA)
        self.pad = 2
        self.flags = _or_dilated(source, _FOOTPRINT, self.pad,
                                 int(PixelFlag.EDGE))

    def warp_band(self, m: PixelMapping, out: Warped, rows: slice) -> None:
        """Fill rows ``rows`` of ``out`` from the mapping of those rows."""
        ny_s, nx_s = self.shape
        x, y = m.x, m.y
        footprint = out.footprint[rows]
        np.logical_and((x >= -0.5) & (x < nx_s - 0.5), (y >= -0.5) & (y < ny_s - 0.5),
                       out=footprint)
        # truncation is floor for x + pad >= 0; positions further off are clipped (and NO_DATA)
        pad = np.float32(self.pad)
        ix = np.clip(x + pad, 0, nx_s + 2 * self.pad - 1).astype(np.int32)
        iy = np.clip(y + pad, 0, ny_s + 2 * self.pad - 1).astype(np.int32)
        flags = out.flags[rows]
        flags[...] = self.flags[iy, ix]
        flags[~footprint] |= FLAGS_DTYPE(PixelFlag.NO_DATA)
        data = out.data[rows]
        ndi.map_coordinates(self.coefficients, m.coords, order=3, prefilter=False, mode="mirror",
                            output=data)
        data *= m.area
        data[~footprint] = 0.0
        white = out.white_weight[rows]
        ndi.map_coordinates(self.variance, m.coords, order=1, prefilter=False, mode="nearest",
                            output=white)
        white *= m.area
        np.divide(np.float32(1.0), white, out=white, where=white > 0)
        white[flags != 0] = 0.0
        weight = out.weight[rows]
        weight[...] = spline_noise_factor(x % np.float32(1.0))
        weight *= spline_noise_factor(y % np.float32(1.0))
        weight *= m.area
        np.divide(white, weight, out=weight)


def _subpixel_shift(stamp: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """The stamp moved by (dx, dy) pixels by a Fourier phase ramp (exact if band-limited)."""
    ny, nx = stamp.shape
    spectrum = scipy.fft.rfft2(stamp)
    phase = (np.exp(-2j * np.pi * dy * scipy.fft.fftfreq(ny))[:, None]
             * np.exp(-2j * np.pi * dx * scipy.fft.rfftfreq(nx))[None, :])
    return scipy.fft.irfft2(spectrum * phase, s=stamp.shape)


def _stamp(psf: PSFLike, x: float, y: float) -> np.ndarray:
    """A PSF's stamp at (x, y), star at the central pixel's centre, summing to 1."""
    stamp = psf.image_at(x, y) if isinstance(psf, PixelPSF) else np.asarray(psf(x, y), dtype=float)
    if stamp.ndim != 2 or stamp.shape[0] != stamp.shape[1] or stamp.shape[0] % 2 == 0:
        raise ValueError(f"a PSF stamp must be square with an odd side, got shape {stamp.shape}")
    return stamp / stamp.sum()


def psf_on_grid(psf: PSFLike, x: float, y: float, *, source_wcs: WCS, target_wcs: WCS,
                size: int | None = None) -> np.ndarray:
    """The source image's PSF as `warp_image` renders it at target position (x, y).

    The source PSF is rendered at the source position of (x, y), moved to that position's
    sub-pixel phase (as the source pixels sample a star there), and interpolated with the warp's
    spline at the source positions of the target pixels around (x, y), through the local
    Jacobian of the mapping (rotation, scale, shear).  So the stamp is what the warp makes of a
    star at (x, y): the geometric transform of the PSF, with the warp's slight smoothing.

    Parameters
    ----------
    psf : PixelPSF or callable
        The source image's PSF: a `improc.psf.PixelPSF`, or ``psf(x_s, y_s)`` returning an odd
        square stamp centred on its central pixel.
    x, y : float
        0-based target position.
    source_wcs, target_wcs : astropy.wcs.WCS
        The WCSs given to `warp_image`.
    size : int or None
        Odd side of the output stamp; None gives that of the source stamp scaled by the linear
        pixel-scale ratio.

    Returns
    -------
    numpy.ndarray
        (size, size) float64 stamp summing to 1, the star at the centre of its central pixel,
        in the target pixel frame.

    Raises
    ------
    ValueError
        If ``size`` is not a positive odd integer or a stamp is not square and odd.
    """
    (xs,), (ys,) = map_pixels(np.array([x]), np.array([y]), source_wcs=source_wcs,
                              target_wcs=target_wcs)
    jac = local_jacobian(x, y, source_wcs=source_wcs, target_wcs=target_wcs)
    stamp = _stamp(psf, xs, ys)
    if size is None:
        size = 2 * int(np.ceil(stamp.shape[0] / 2 / np.sqrt(abs(np.linalg.det(jac))))) + 1
    if not isinstance(size, (int, np.integer)) or size < 1 or size % 2 == 0:
        raise ValueError(f"size must be a positive odd integer, got {size!r}")
    pad = 4
    phase_x, phase_y = xs - np.floor(xs + 0.5), ys - np.floor(ys + 0.5)
    shifted = _subpixel_shift(np.pad(stamp, pad), phase_x, phase_y)
    centre = stamp.shape[0] // 2 + pad
    h = size // 2
    dy, dx = np.mgrid[-h:h + 1, -h:h + 1].astype(float)
    src_x = centre + phase_x + jac[0, 0] * dx + jac[0, 1] * dy
    src_y = centre + phase_y + jac[1, 0] * dx + jac[1, 1] * dy
    out = ndi.map_coordinates(shifted, [src_y, src_x], order=3, mode="grid-constant", cval=0.0)
    return out / out.sum()
