"""Coadds of images already on one pixel grid: a clipped weighted mean, or the proper coadd.

The inputs (`CoaddInput`) are calibrated images resampled onto the same target grid by the
caller (`improc.alignment.warp_image`): data in ADU with the sky subtracted or given, an
inverse-variance ``weight`` (1/ADU**2), ``flags`` (non-zero = bad, `improc.flags.PixelFlag`),
the photometric zero point and, for the proper coadd, the PSF on that grid (`PSFLike`, e.g.
`improc.alignment.psf_on_grid`).  Nothing here warps.  A resampled image's noise is correlated:
give it ``weight = Warped.weight`` (pixel statistics, for the rejection and the output's pixel
weight) and ``white_weight = Warped.white_weight`` (the noise a PSF-sized sum sees, for the image
weights, the output's ``white_weight`` and the proper coadd).

Photometric scale
-----------------
Input ``i`` is brought to the output zero point ``zp`` by the flux scale
``s_i = 10**(-0.4 (zp_i - zp))``: ``v_i = s_i (data_i - sky_i)`` with variance
``var_i = s_i**2 / weight_i``.  A source of magnitude m then has the same flux
``10**(-0.4 (m - zp))`` in every ``v_i`` and in the coadd.

Weighted mean (`weighted_mean_coadd`)
-------------------------------------
``coadd = sum_i c_i u_i v_i / sum_i c_i u_i`` where ``u_i`` (0 or 1) says whether pixel i is
used and ``c_i`` is one weight per image, by default the inverse of the image's median scaled
(white) variance, its sky noise: per-pixel weights that include the sources' Poisson noise would favour,
in a star's core, the images where the core is faint (the worse seeing) and bias fluxes low.
The output weight is the exact inverse variance ``(sum c_i u_i)**2 / sum c_i**2 u_i var_i``,
which is the sum of the used (scaled) weights wherever the inputs' variances are proportional to
their sky variances (background-limited pixels).

Outlier rejection (`Rejection`), one pass per pixel against the median, robust to cosmic rays
and satellite trails:

1. the reference ``m`` is the median of the valid ``v_i`` (valid: weight > 0, finite, no bit of
   ``mask_flags``), with variance ``var_m = (pi / 2) / sum_valid 1 / var_i``;
2. ``v_i`` is rejected when ``|v_i - m| > sigma * sqrt(var_i + var_m) + source_tolerance * M``,
   ``M`` the largest ``|m|`` within ``source_window`` x ``source_window`` pixels: the term in ``M``
   lets star and galaxy profiles differ between images of different seeing (a core in the best
   seeing exceeds the median by about ``(FWHM_median / FWHM_best)**2 - 1``, a wing in the worst
   seeing exceeds the median at that radius by more, but not the median's peak nearer the star),
   and still rejects a cosmic ray or a trail on the sky or on faint objects (a cosmic ray on a
   bright star's core stays);
3. rejections grow by ``grow`` pixels (into the 8 neighbours, ``grow`` times, whatever their
   values, so that the growth is unbiased for the noise): the faint edges of trails and cosmic
   rays, below the noise pixel by pixel, go with their cores;
4. pixels with fewer than ``min_inputs`` (>= 3) valid inputs are not clipped; if every valid
   input of a pixel was rejected, all are used.

Output flags: pixels without any valid input get ``NO_DATA`` and the OR of the inputs' flags
there (e.g. ``SATURATED`` in the core of a star saturated in every image); their data and weight
are 0.

Proper coadd (`proper_coadd`)
-----------------------------
Zackay & Ofek (2017, ApJ 836, 187), with every flux scale 1 after scaling and sigma_j the
median white noise of image j over a tile:
``R^ = sum_j conj(P^_j) M^_j / sigma_j**2 / sqrt(sum_j |P^_j|**2 / sigma_j**2)`` and
``P^_R = sqrt(sum_j |P^_j|**2 / sigma_j**2) / F_R`` with ``F_R**2 = sum_j 1 / sigma_j**2``.
The image returned is ``R / F_R``: output ADU, white noise of variance ``1 / F_R**2`` where the
noise is the sky's, PSF ``P_R`` (normalized to 1).  It is the sufficient statistic for point
sources, as deep as any combination can be.  ``M_j`` is ``v_j`` with its rejected and invalid
pixels replaced by the clipped weighted mean (so one set of rejections serves both coadds).
The PSF varies over a chip: the image is processed in square tiles (``tile_size``) each with the
inputs' PSFs at the tile centre (padded by the PSF size, so the tiles join without seams from the
FFT; the PSF of the output changes from tile to tile); ``tile_size=None`` uses the chip-centre PSF
everywhere.  The output variance is propagated per pixel, ``sum_j k_j**2 (x) var_j`` (a
convolution, ``k_j`` the real-space filter from ``v_j`` to the output, ``var_j`` the white
variance), so it includes the sources' Poisson noise and the filled pixels (with the weighted
mean's variance).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.fft
from scipy import ndimage

from improc.flags import FLAGS_DTYPE, PixelFlag
from improc.psf import PixelPSF

__all__ = ["PSFLike", "CoaddInput", "Rejection", "Coadd", "ProperCoadd", "flux_scales",
           "weighted_mean_coadd", "coadd_psf", "proper_coadd"]

#: Elements of one (n_images, rows, nx) working array (bounds the memory of a chunk).
_CHUNK_ELEMENTS = 4_000_000


#: A PSF: a `improc.psf.PixelPSF`, or ``psf(x, y)`` giving an odd square stamp of a star at the
#: centre of its central pixel (e.g. ``lambda x, y: improc.alignment.psf_on_grid(...)``).
PSFLike = PixelPSF | Callable[[float, float], np.ndarray]


@dataclass(frozen=True, eq=False)
class CoaddInput:
    """One image on the target grid, as the coadd needs it.

    Attributes
    ----------
    data : ndarray
        (ny, nx) ADU, on the coadd's pixel grid.
    weight : ndarray
        (ny, nx) inverse variance, 1/ADU**2; 0 for pixels without data.
    flags : ndarray
        (ny, nx) integer bits (`improc.flags.PixelFlag`).
    zero_point : float
        ``mag = -2.5 log10(flux in ADU) + zero_point``.
    sky : ndarray or float
        Sky to subtract, (ny, nx) ADU or a constant; 0 when the data are sky-subtracted.
    psf : PixelPSF, callable or None
        The image's PSF on the target grid (`PSFLike`); needed by `proper_coadd` and `coadd_psf`
        only.
    white_weight : ndarray or None
        (ny, nx) inverse variance of the white noise with the power of the pixel noise at the
        scales of a PSF, for a resampled image (`improc.alignment.Warped.white_weight`, with
        ``weight = Warped.weight``); None means ``weight`` (noise independent between pixels).
        The rejection uses ``weight``; the image weights, the coadd's ``white_weight`` and the
        proper coadd use this.

    Raises
    ------
    ValueError
        If an array has the wrong dimension or shape, or the zero point is not finite.
    """

    data: np.ndarray
    weight: np.ndarray
    flags: np.ndarray
    zero_point: float
    sky: np.ndarray | float = 0.0
    psf: PSFLike | None = None
    white_weight: np.ndarray | None = None

    def __post_init__(self) -> None:
        data = np.asarray(self.data)
        if data.ndim != 2:
            raise ValueError(f"data must be a 2-d (ny, nx) image, got shape {data.shape}")
        for name in ("weight", "flags") + (("white_weight",) if self.white_weight is not None else ()):
            if np.shape(getattr(self, name)) != data.shape:
                raise ValueError(f"{name} must have the shape of data {data.shape}, "
                                 f"got {np.shape(getattr(self, name))}")
        if not np.issubdtype(np.asarray(self.flags).dtype, np.integer):
            raise ValueError(f"flags must be integers, got {np.asarray(self.flags).dtype}")
        if np.ndim(self.sky) != 0 and np.shape(self.sky) != data.shape:
            raise ValueError(f"sky must be a number or have the shape of data {data.shape}, "
                             f"got {np.shape(self.sky)}")
        if not np.isfinite(self.zero_point):
            raise ValueError(f"zero_point must be finite, got {self.zero_point}")
        object.__setattr__(self, "zero_point", float(self.zero_point))

    @property
    def shape(self) -> tuple[int, int]:
        """(ny, nx) of the image."""
        return np.shape(self.data)


@dataclass(frozen=True, eq=False)
class Coadd:
    """A weighted-mean coadd.

    Attributes
    ----------
    data : ndarray
        (ny, nx) float32, ADU at ``zero_point``, sky-subtracted; 0 where no input has data.
    weight : ndarray
        (ny, nx) float32 inverse variance of each pixel, 1/ADU**2; 0 where no input has data.
    white_weight : ndarray
        (ny, nx) float32 the same from the inputs' ``white_weight``: the weight for anything that
        sums over a PSF (equal to ``weight`` when no input gave a ``white_weight``).
    flags : ndarray
        (ny, nx) uint16: ``NO_DATA`` plus the OR of the inputs' flags where no input is valid.
    n_used : ndarray
        (ny, nx) uint16, inputs combined at each pixel (after rejection).
    zero_point : float
        Zero point of the coadd.
    scales : ndarray
        (n_images,) flux scale of each input to the coadd's zero point.
    image_weights : ndarray
        (n_images,) the combination weight ``c_i`` of each input, 1/ADU**2 at the output scale.
    n_rejected : ndarray
        (n_images,) valid pixels of each input rejected as outliers.
    """

    data: np.ndarray
    weight: np.ndarray
    white_weight: np.ndarray
    flags: np.ndarray
    n_used: np.ndarray
    zero_point: float
    scales: np.ndarray
    image_weights: np.ndarray
    n_rejected: np.ndarray


@dataclass(frozen=True, eq=False)
class ProperCoadd:
    """A proper coadd (Zackay & Ofek 2017) and its PSF per tile.

    Attributes
    ----------
    data : ndarray
        (ny, nx) float32, ADU at ``zero_point``: ``R / F_R``, sky-subtracted.
    weight : ndarray
        (ny, nx) float32 inverse variance, 1/ADU**2, propagated per pixel from the inputs' white
        variances (the proper image's noise is white where theirs is); 0 without data.
    flags : ndarray
        (ny, nx) uint16, as for `Coadd`.
    zero_point : float
        Zero point of the coadd.
    psf_stamps : ndarray
        (n_tiles_y, n_tiles_x, size, size) PSF of each tile, centred, each summing to 1.
    tile_y_edges, tile_x_edges : ndarray
        Pixel edges of the tiles: tile (j, i) covers rows ``tile_y_edges[j]:tile_y_edges[j+1]``.
    mean : Coadd
        The clipped weighted mean whose rejections (and values, in rejected pixels) were used.
    """

    data: np.ndarray
    weight: np.ndarray
    flags: np.ndarray
    zero_point: float
    psf_stamps: np.ndarray
    tile_y_edges: np.ndarray
    tile_x_edges: np.ndarray
    mean: Coadd

    def psf_at(self, x: float, y: float) -> np.ndarray:
        """The PSF stamp (size, size) of the tile holding pixel (x, y), centred, summing to 1."""
        j = int(np.clip(np.searchsorted(self.tile_y_edges, np.floor(y + 0.5), side="right") - 1,
                        0, self.psf_stamps.shape[0] - 1))
        i = int(np.clip(np.searchsorted(self.tile_x_edges, np.floor(x + 0.5), side="right") - 1,
                        0, self.psf_stamps.shape[1] - 1))
        return self.psf_stamps[j, i]


@dataclass(frozen=True, kw_only=True)
class Rejection:
    """How outliers are rejected, pixel by pixel, before the mean (see the module docstring).

    Attributes
    ----------
    sigma : float
        Threshold in standard deviations of ``v_i - median`` (> 0).
    grow : int
        Pixels by which rejections grow into their neighbours (>= 0; 0: no growth).
    source_tolerance : float
        Extra allowed deviation, as a fraction of the largest ``|median|`` within
        ``source_window`` (>= 0): profiles of sources differ with the seeing.
    source_window : int
        Odd side, pixels, of the square over which that maximum is taken; about twice the worst
        FWHM covers the wings of a star in the worst seeing.
    min_inputs : int
        Pixels with fewer valid inputs than this (>= 3) are not clipped.

    Raises
    ------
    ValueError
        On construction, naming the attribute out of range.
    """

    sigma: float = 5.0
    grow: int = 2
    source_tolerance: float = 1.0
    source_window: int = 9
    min_inputs: int = 3

    def __post_init__(self) -> None:
        if not self.sigma > 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if not self.source_tolerance >= 0:
            raise ValueError(f"source_tolerance must be >= 0, got {self.source_tolerance}")
        for name, low in (("grow", 0), ("source_window", 1), ("min_inputs", 3)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.source_window % 2 == 0:
            raise ValueError(f"source_window must be odd, got {self.source_window}")


def flux_scales(zero_points: Sequence[float], zero_point: float) -> np.ndarray:
    """Flux scales ``10**(-0.4 (zp_i - zero_point))`` that bring each image to ``zero_point``."""
    return 10.0 ** (-0.4 * (np.asarray(zero_points, dtype=float) - float(zero_point)))


def _checked_inputs(inputs: Sequence[CoaddInput], zero_point: float | None) -> tuple[float, np.ndarray]:
    """Validate the list of inputs; the output zero point and the inputs' flux scales."""
    if len(inputs) == 0:
        raise ValueError("inputs must hold at least one CoaddInput, got none")
    for k, inp in enumerate(inputs):
        if not isinstance(inp, CoaddInput):
            raise ValueError(f"inputs[{k}] must be a CoaddInput, got {type(inp).__name__}")
        if inp.shape != inputs[0].shape:
            raise ValueError(f"inputs must share one grid: inputs[{k}] has shape {inp.shape}, "
                             f"inputs[0] {inputs[0].shape}")
    zps = [inp.zero_point for inp in inputs]
    zp = float(np.median(zps)) if zero_point is None else float(zero_point)
    if not np.isfinite(zp):
        raise ValueError(f"zero_point must be finite, got {zero_point}")
    return zp, flux_scales(zps, zp)


def _valid(inp: CoaddInput, rows: slice, mask_flags: int) -> np.ndarray:
    """Pixels of rows of an input that may be combined."""
    w = np.asarray(inp.weight[rows])
    return ((w > 0) & np.isfinite(w) & np.isfinite(inp.data[rows])
            & ((np.asarray(inp.flags[rows]) & mask_flags) == 0))


def _default_image_weights(inputs: Sequence[CoaddInput], scales: np.ndarray, mask_flags: int) -> np.ndarray:
    """Inverse of each image's median scaled (white) variance, from every 4th row and column."""
    out = np.zeros(len(inputs))
    sub = (slice(None, None, 4), slice(None, None, 4))
    for k, inp in enumerate(inputs):
        ok = _valid(inp, sub[0], mask_flags)[:, sub[1]]
        w = np.asarray(inp.weight if inp.white_weight is None else inp.white_weight)[sub][ok]
        out[k] = float(np.median(w)) / scales[k] ** 2 if w.size else 0.0
    return out


def _load(inputs: Sequence[CoaddInput], scales: np.ndarray, rows: slice,
          mask_flags: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Scaled values, variances, white variances (both 0 where invalid) and validity, each
    (n_images, rows, nx); the white variances are the variances if no input has a white weight."""
    shape = (len(inputs), rows.stop - rows.start, inputs[0].shape[1])
    v, var = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    white = np.zeros(shape, np.float32) if any(inp.white_weight is not None for inp in inputs) else var
    valid = np.zeros(shape, bool)
    for k, inp in enumerate(inputs):
        ok = _valid(inp, rows, mask_flags)
        sky = inp.sky if np.ndim(inp.sky) == 0 else inp.sky[rows]
        s = np.float32(scales[k])
        np.multiply(np.asarray(inp.data[rows], np.float32) - np.asarray(sky, np.float32), s, out=v[k],
                    where=ok)
        np.divide(s * s, np.asarray(inp.weight[rows], np.float32), out=var[k], where=ok)
        if white is not var:
            w = inp.weight if inp.white_weight is None else inp.white_weight
            w = np.asarray(w[rows], np.float32)
            ok &= w > 0
            np.divide(s * s, w, out=white[k], where=ok)
            var[k][~ok] = 0.0
        valid[k] = ok
    return v, var, white, valid


def _median(v: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median over the first axis of the valid values (0 where none) and the count of them."""
    ordered = np.where(valid, v, np.float32(np.nan))
    ordered.sort(axis=0)                       # NaN (invalid) sort last
    count = valid.sum(axis=0)
    lo, hi = np.maximum(count - 1, 0) // 2, count // 2
    m = 0.5 * (np.take_along_axis(ordered, lo[None], 0)[0] + np.take_along_axis(ordered, hi[None], 0)[0])
    return np.where(count > 0, m, np.float32(0.0)), count


def _rejections(v: np.ndarray, var: np.ndarray, valid: np.ndarray, count: np.ndarray,
                rejection: Rejection) -> np.ndarray:
    """Pixels (n_images, rows, nx) rejected as outliers (module docstring, steps 1-3)."""
    m, _ = _median(v, valid)
    inv = np.divide(np.float32(1.0), var, out=np.zeros_like(var), where=valid).sum(axis=0)
    var_m = np.divide(np.float32(np.pi / 2), inv, out=np.zeros_like(inv), where=inv > 0)
    window = rejection.source_window
    local = ndimage.maximum_filter1d(ndimage.maximum_filter1d(np.abs(m), window, axis=0), window, axis=1)
    threshold = (np.float32(rejection.sigma) * np.sqrt(var + var_m)
                 + np.float32(rejection.source_tolerance) * local)
    clippable = valid & (count >= rejection.min_inputs)
    reject = clippable & (np.abs(v - m) > threshold)
    if rejection.grow and reject.any():
        reject = clippable & ndimage.binary_dilation(reject, np.ones((1, 3, 3), bool),
                                                     iterations=rejection.grow)
    return reject


def _chunks(ny: int, rows: int, halo: int):
    """Row slices (core, extended by ``halo``, core within extended) covering ``ny`` rows."""
    for r0 in range(0, ny, rows):
        r1 = min(ny, r0 + rows)
        e0, e1 = max(0, r0 - halo), min(ny, r1 + halo)
        yield slice(r0, r1), slice(e0, e1), slice(r0 - e0, r1 - e0)


def _image_weights(inputs, scales, mask_flags: int, image_weights) -> np.ndarray:
    """The combination weights: given (checked) or the default."""
    if image_weights is None:
        return _default_image_weights(inputs, scales, mask_flags)
    c = np.asarray(image_weights, dtype=float)
    if c.shape != (len(inputs),) or not np.all(np.isfinite(c) & (c >= 0)) or not c.sum() > 0:
        raise ValueError(f"image_weights must be {len(inputs)} finite values >= 0, not all 0, "
                         f"got {image_weights!r}")
    return c


def _combine(inputs: Sequence[CoaddInput], zero_point: float | None, image_weights,
             mask_flags: int | None, rejection: Rejection | None,
             keep_use: bool) -> tuple[Coadd, np.ndarray | None]:
    """The weighted mean `Coadd`, and the (n_images, ny, nx) used-pixel masks if asked."""
    zp, scales = _checked_inputs(inputs, zero_point)
    if rejection is not None and not isinstance(rejection, Rejection):
        raise ValueError(f"rejection must be a Rejection or None, got {type(rejection).__name__}")
    mask_flags = int(sum(PixelFlag)) if mask_flags is None else int(mask_flags)
    c = _image_weights(inputs, scales, mask_flags, image_weights)
    (ny, nx), n = inputs[0].shape, len(inputs)
    out = {"data": np.zeros((ny, nx), np.float32), "weight": np.zeros((ny, nx), np.float32),
           "white_weight": np.zeros((ny, nx), np.float32), "flags": np.zeros((ny, nx), FLAGS_DTYPE),
           "n_used": np.zeros((ny, nx), np.uint16)}
    n_rejected = np.zeros(n, np.int64)
    use_all = np.zeros((n, ny, nx), bool) if keep_use else None
    halo = 0 if rejection is None else rejection.grow + rejection.source_window // 2
    for core, ext, inner in _chunks(ny, max(16, _CHUNK_ELEMENTS // (n * nx)), halo):
        v, var, white, valid = _load(inputs, scales, ext, mask_flags)
        valid &= (c > 0)[:, None, None]                 # an image of weight 0 is not used
        count = valid.sum(axis=0)
        use = valid
        if rejection is not None:
            use = valid & ~_rejections(v, var, valid, count, rejection)
            use |= valid & ~use.any(axis=0)            # everything rejected: use all
        use, valid = use[:, inner], valid[:, inner]
        _mean_rows(out, core, v[:, inner], var[:, inner], None if white is var else white[:, inner], use, c)
        n_rejected += (valid & ~use).sum(axis=(1, 2))
        none = count[inner] == 0
        if none.any():
            carried = np.bitwise_or.reduce([np.asarray(inp.flags[core]) for inp in inputs])
            out["flags"][core] = np.where(none, carried.astype(FLAGS_DTYPE) | PixelFlag.NO_DATA, 0)
        if keep_use:
            use_all[:, core] = use
    return Coadd(**out, zero_point=zp, scales=scales, image_weights=c, n_rejected=n_rejected), use_all


def _mean_rows(out: dict, core: slice, v: np.ndarray, var: np.ndarray, white: np.ndarray | None,
               use: np.ndarray, c: np.ndarray) -> None:
    """Fill rows ``core`` of the output data, weights and n_used from the used pixels
    (``white`` None: the white variances are the variances)."""
    wu = np.where(use, c.astype(np.float32)[:, None, None], np.float32(0.0))
    den = wu.sum(axis=0)
    good = den > 0
    out["data"][core] = np.divide((wu * v).sum(axis=0), den, out=np.zeros_like(den), where=good)
    for name, variance in (("weight", var), ("white_weight", white)):
        if variance is None:
            out[name][core] = out["weight"][core]
            continue
        var_out = np.divide((wu * wu * variance).sum(axis=0), den * den, out=np.zeros_like(den), where=good)
        out[name][core] = np.divide(np.float32(1.0), var_out, out=np.zeros_like(den), where=var_out > 0)
    out["n_used"][core] = use.sum(axis=0)


def weighted_mean_coadd(inputs: Sequence[CoaddInput], *, zero_point: float | None = None,
                        image_weights: Sequence[float] | None = None, mask_flags: int | None = None,
                        rejection: Rejection | None = Rejection()) -> Coadd:
    """Clipped inverse-variance weighted mean of images on one grid (see the module docstring).

    Parameters
    ----------
    inputs : sequence of CoaddInput
        The images, all of one shape (ny, nx), already on the target grid.
    zero_point : float or None
        Zero point of the coadd; None means the median of the inputs' zero points.
    image_weights : sequence of float or None
        Combination weight of each image at the output scale (1/ADU**2), e.g. to weight by
        point-source depth; None means the inverse of each image's median scaled variance.
    mask_flags : int or None
        Input flag bits that make a pixel unusable; None means any bit.
    rejection : Rejection or None
        How outliers are rejected; None combines every valid pixel.

    Returns
    -------
    Coadd
        The coadd, its weight, flags, number of inputs per pixel and what was rejected.

    Raises
    ------
    ValueError
        If no input is given, the inputs differ in shape, or ``image_weights`` is invalid.
    """
    coadd, _ = _combine(inputs, zero_point, image_weights, mask_flags, rejection, keep_use=False)
    return coadd


def _stamp(psf: PSFLike, x: float, y: float, size: int | None) -> np.ndarray:
    """A PSF's centred stamp at (x, y), cut or zero-padded to ``size``, summing to 1."""
    stamp = psf.image_at(x, y) if isinstance(psf, PixelPSF) else np.asarray(psf(x, y), dtype=float)
    if stamp.ndim != 2 or stamp.shape[0] != stamp.shape[1] or stamp.shape[0] % 2 == 0:
        raise ValueError(f"a PSF stamp must be square with an odd side, got shape {stamp.shape}")
    if size is not None:
        pad = (size - stamp.shape[0]) // 2
        stamp = np.pad(stamp, pad) if pad >= 0 else stamp[-pad:pad, -pad:pad]
    total = stamp.sum()
    if not (np.isfinite(total) and total > 0):
        raise ValueError(f"a PSF stamp sums to {total} at ({x:.1f}, {y:.1f})")
    return stamp / total


def _psf_stamps(inputs: Sequence[CoaddInput], x: float, y: float, size: int | None) -> np.ndarray:
    """The inputs' centred PSF stamps at (x, y), (n_images, size, size), each summing to 1."""
    if size is not None and (isinstance(size, bool) or not isinstance(size, (int, np.integer))
                             or size < 1 or size % 2 == 0):
        raise ValueError(f"size must be a positive odd integer or None, got {size!r}")
    for k, inp in enumerate(inputs):
        if inp.psf is None:
            raise ValueError(f"inputs[{k}] has no psf")
    stamps = [_stamp(inp.psf, x, y, size) for inp in inputs]
    largest = max(st.shape[0] for st in stamps)
    return np.stack([np.pad(st, (largest - st.shape[0]) // 2) for st in stamps])


def coadd_psf(inputs: Sequence[CoaddInput], coadd: Coadd, x: float, y: float, *,
              size: int | None = None) -> np.ndarray:
    """The PSF of a weighted-mean coadd at (x, y): ``sum_i c_i p_i(x, y) / sum_i c_i``, centred.

    Exact where every input was used; where some were masked or rejected the PSF of that pixel
    is the same sum over the inputs used there.  The recommended PSF of a coadd is the one the
    ordinary calibration fits on it (it includes what the resampling did to the PSF); this one
    serves as a check or a fallback.

    Parameters
    ----------
    inputs : sequence of CoaddInput
        The inputs of the coadd, each with a ``psf``.
    coadd : Coadd
        The result of `weighted_mean_coadd` on these inputs.
    x, y : float
        Position, 0-based pixels.
    size : int or None
        Odd side of the stamp (each input's stamp is cut or padded to it and renormalized);
        None: the largest of the inputs' stamps.

    Returns
    -------
    ndarray
        (size, size) stamp of a star at the centre of its central pixel, summing to 1.

    Raises
    ------
    ValueError
        If an input has no PSF, a PSF stamp is not odd and square, ``size`` is not odd, or the
        inputs and the coadd disagree in number.
    """
    if len(inputs) != coadd.image_weights.size:
        raise ValueError(f"coadd was made from {coadd.image_weights.size} inputs, got {len(inputs)}")
    stamps = _psf_stamps(inputs, x, y, size)
    c = coadd.image_weights
    return np.tensordot(c / c.sum(), stamps, axes=1)


def _tile_edges(n: int, tile_size: int | None) -> np.ndarray:
    """Edges of tiles of about ``tile_size`` pixels covering ``n`` pixels (one tile if None)."""
    if tile_size is None or tile_size >= n:
        return np.array([0, n])
    count = int(np.ceil(n / tile_size))
    return np.round(np.linspace(0, n, count + 1)).astype(int)


def _centred_spectrum(stamp: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """rfft2 over ``shape`` of an odd stamp whose central pixel is put at (0, 0)."""
    grid = np.zeros(shape)
    size = stamp.shape[0]
    grid[:size, :size] = stamp
    grid = np.roll(grid, (-(size // 2), -(size // 2)), axis=(0, 1))
    return scipy.fft.rfft2(grid)


def _filled(v, var, use, mean: Coadd, rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray]:
    """Values and (white) variances of the inputs in a region, rejected pixels replaced by the mean's."""
    m = mean.data[rows, cols]
    mw = mean.white_weight[rows, cols]
    m_var = np.divide(1.0, mw, out=np.zeros(mw.shape, np.float32), where=mw > 0)
    u = use[:, rows, cols]
    return (np.where(u, v[:, :, cols], m[None]).astype(float),
            np.where(u, var[:, :, cols], m_var[None]).astype(float))


def _proper_tile(values: np.ndarray, variances: np.ndarray, inv_var: np.ndarray,
                 stamps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Proper image, its variance (padded region) and PSF of one tile, all float64.

    ``values`` and ``variances`` (n_images, ny, nx) are the filled inputs over the tile and its
    margin, ``inv_var`` (n_images,) the ``1 / sigma_j**2`` of each input (0: not used) and
    ``stamps`` (n_images, size, size) their PSFs at the tile centre.
    """
    shape = tuple(scipy.fft.next_fast_len(n, real=True) for n in values.shape[1:])
    spectra = [_centred_spectrum(s, shape) for s in stamps]
    power = sum(a * np.abs(p) ** 2 for a, p in zip(inv_var, spectra))
    f_r = np.sqrt(inv_var.sum())
    denom = np.sqrt(power) + 1e-12 * np.sqrt(power.max())
    image = np.zeros(shape[0] * (shape[1] // 2 + 1), complex).reshape(power.shape)
    var_spec = np.zeros_like(image)
    for a, p, val, var in zip(inv_var, spectra, values, variances):
        if a == 0:
            continue
        kernel = a * np.conj(p) / denom / f_r
        image += kernel * scipy.fft.rfft2(val, s=shape)
        k2 = scipy.fft.irfft2(kernel, s=shape) ** 2
        var_spec += scipy.fft.rfft2(k2) * scipy.fft.rfft2(var, s=shape)
    ny, nx = values.shape[1:]
    out = scipy.fft.irfft2(image, s=shape)[:ny, :nx]
    out_var = scipy.fft.irfft2(var_spec, s=shape)[:ny, :nx]
    psf = scipy.fft.irfft2(power ** 0.5 / f_r, s=shape) if f_r > 0 else np.zeros(shape)
    h = stamps[0].shape[0] // 2
    psf = np.roll(psf, (h, h), axis=(0, 1))[:2 * h + 1, :2 * h + 1]
    return out, out_var, psf / psf.sum() if psf.sum() > 0 else psf


def proper_coadd(inputs: Sequence[CoaddInput], *, zero_point: float | None = None,
                 tile_size: int | None = 512, psf_size: int | None = None,
                 image_weights: Sequence[float] | None = None, mask_flags: int | None = None,
                 rejection: Rejection | None = Rejection()) -> ProperCoadd:
    """Proper coadd of Zackay & Ofek (2017) of images on one grid (see the module docstring).

    Parameters
    ----------
    inputs : sequence of CoaddInput
        The images, all of one shape (ny, nx), on the target grid, each with a ``psf``.
    zero_point : float or None
        Zero point of the coadd; None means the median of the inputs' zero points.
    tile_size : int or None
        Side of the square tiles, pixels, each with the PSFs at its centre; None: one tile, the
        chip-centre PSFs.
    psf_size : int or None
        Odd side of the inputs' PSF stamps (cut or padded, renormalized) and of the output's;
        None: the largest of the inputs' own.
    image_weights, mask_flags, rejection
        As for `weighted_mean_coadd`, whose rejections (and values, in rejected and invalid
        pixels) the proper coadd uses.  The weights enter only the weighted mean: the proper
        coadd weighs each image by its own noise and PSF.

    Returns
    -------
    ProperCoadd
        The proper image (ADU at ``zero_point``), its weight, flags, per-tile PSF, and the
        weighted mean it was filled from.

    Raises
    ------
    ValueError
        As `weighted_mean_coadd`, or if an input has no PSF or ``tile_size`` is not >= 16.
    """
    if tile_size is not None and not (isinstance(tile_size, (int, np.integer)) and tile_size >= 16):
        raise ValueError(f"tile_size must be an integer >= 16 or None, got {tile_size!r}")
    for k, inp in enumerate(inputs):
        if isinstance(inp, CoaddInput) and inp.psf is None:
            raise ValueError(f"inputs[{k}] has no psf; the proper coadd needs every input's PSF")
    mean, use = _combine(inputs, zero_point, image_weights, mask_flags, rejection, keep_use=True)
    mask_flags = int(sum(PixelFlag)) if mask_flags is None else int(mask_flags)
    ny, nx = inputs[0].shape
    y_edges, x_edges = _tile_edges(ny, tile_size), _tile_edges(nx, tile_size)
    data, variance = np.zeros((ny, nx), np.float32), np.zeros((ny, nx), np.float32)
    psfs = []
    for y0, y1 in zip(y_edges[:-1], y_edges[1:]):
        row_psfs = []
        for x0, x1 in zip(x_edges[:-1], x_edges[1:]):
            stamps = _psf_stamps(inputs, (x0 + x1 - 1) // 2, (y0 + y1 - 1) // 2, psf_size)
            margin = stamps.shape[1]
            rows = slice(max(0, y0 - margin), min(ny, y1 + margin))
            cols = slice(max(0, x0 - margin), min(nx, x1 + margin))
            v, _, white, _ = _load(inputs, mean.scales, rows, mask_flags)
            values, variances = _filled(v, white, use, mean, rows, cols)
            core = (slice(y0 - rows.start, y1 - rows.start), slice(x0 - cols.start, x1 - cols.start))
            used = use[:, y0:y1, x0:x1]
            inv_var = np.array([1.0 / np.median(var[core][u]) if u.any() else 0.0
                                for var, u in zip(variances, used)])
            out, out_var, psf = _proper_tile(values, variances, inv_var, stamps)
            data[y0:y1, x0:x1] = out[core]
            variance[y0:y1, x0:x1] = out_var[core]
            row_psfs.append(psf)
        psfs.append(row_psfs)
    has_data = mean.n_used > 0
    weight = np.divide(np.float32(1.0), variance, out=np.zeros_like(variance), where=has_data & (variance > 0))
    data[~has_data] = 0.0
    return ProperCoadd(data=data, weight=weight, flags=mean.flags.copy(), zero_point=mean.zero_point,
                       psf_stamps=np.array(psfs), tile_y_edges=y_edges, tile_x_edges=x_edges, mean=mean)
