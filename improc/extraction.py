"""Source detection and measurement on an image array (sep, i.e. SExtractor as a library).

`extract_sources` finds sources above ``threshold`` times the noise, deblends them, and measures
each one:

* ``x, y``: windowed centroid (SExtractor's XWIN/YWIN) with a Gaussian window of
  ``sigma = fwhm / 2.3548`` of the object itself, started from the isophotal barycentre;
* ``fwhm``: twice the half-light radius, ``2 * r50`` (exact for a Gaussian profile), measured in
  a circle of radius ``6 a`` with the pixels of other detected objects left out, and with the
  1/12 px**2 variance that sep's pixel-uniform aperture sampling adds removed in quadrature
  (so it is the FWHM of the pixel-integrated profile, as a PSF fit would see it);
* circular-aperture fluxes on the background-subtracted image, with errors from the noise map
  and, if ``gain`` is given, the sources' Poisson noise;
* ``class_star``: how well the object's half-light radius agrees with the stellar locus (see
  `stellar_locus` and `extract_sources`), and ``is_star``.

`estimate_fwhm` returns the FWHM of the point sources of a table.  The usual two-pass use is
what ``aperture_radii=None`` does: detect, estimate the FWHM, then measure apertures of
(1, 2, 3, 5) x FWHM; `aperture_photometry` re-measures apertures on an existing table.

Coordinates are 0-based pixel indices: ``(x, y) = (0, 0)`` is the centre of ``data[0, 0]``.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Literal

import astropy.units as u
import numpy as np
import sep
from astropy.table import Column, Table
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from improc.background import as_image
from improc.errors import BadDataError

__all__ = ["TooFewSourcesError", "TooManySourcesError", "PixelBufferFullError", "SourceFlag",
           "DEFAULT_FILTER_KERNEL", "FWHM_APERTURE_MULTIPLES", "extract_sources", "aperture_photometry",
           "estimate_fwhm", "stellar_locus"]

#: SExtractor's default.conv: 3x3 "all-ground" kernel, FWHM about 2 pixels.
DEFAULT_FILTER_KERNEL = np.array([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=np.float32)
DEFAULT_FILTER_KERNEL.setflags(write=False)

#: Aperture radii, in units of the FWHM, used when ``aperture_radii`` is None.
FWHM_APERTURE_MULTIPLES: tuple[float, ...] = (1.0, 2.0, 3.0, 5.0)

_GAUSSIAN_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))  # 2.3548
_MIN_LOCUS_SOURCES = 5       # fewest clean bright sources to define the stellar locus
_MIN_STAR_SNR = 10.0         # is_star needs at least this isophotal signal-to-noise
_MIN_CLASS_STAR = 0.1        # ... and class_star at least this (|z| < 2.15)
_R50_SNR_SCATTER = 2.0       # FWHM scatter of a point source is about this * FWHM / snr
# sep's apertures spread each pixel's value uniformly over it, which adds the variance of a
# 1-pixel box, 1/12 px**2 per axis, to the profile; for a Gaussian this is 2 ln2 / 12 in r50**2.
_R50_BOX_TERM = 2.0 * np.log(2.0) / 12.0


class PixelBufferFullError(RuntimeError):
    """sep's process-wide buffer of object pixels is too small for an image (a setting to raise,
    not bad data)."""


class TooManySourcesError(BadDataError):
    """More sources than ``max_sources``: a threshold far too low for the image, or junk data."""


class TooFewSourcesError(BadDataError):
    """Too few clean, bright point sources to measure the image's FWHM: an image without stars."""


class SourceFlag(enum.IntFlag):
    """Bits of the ``flags`` column; the first eight are sep's own (``sep.OBJ_*``, ``sep.APER_*``)."""

    MERGED = 1             #: deblended from a blend of several objects
    TRUNCATED = 2          #: footprint touches the image edge
    DEBLEND_OVERFLOW = 4   #: deblending ran out of memory; object may be a blend
    SINGULAR = 8           #: singular second moments; a, b, theta are not meaningful
    APER_TRUNCATED = 16    #: an aperture crosses the image edge
    APER_HAS_MASKED = 32   #: an aperture contains masked pixels
    APER_ALL_MASKED = 64   #: an aperture is entirely masked
    APER_NONPOSITIVE = 128  #: an aperture has non-positive flux
    MASKED = 256           #: footprint touches a masked (or NaN) pixel
    SATURATED = 512        #: footprint touches a pixel at or above ``saturation``
    WINPOS_FAILED = 1024   #: windowed centroid failed; ``x, y`` are the isophotal barycentre
    RESIDUAL = 2048        #: found only once the models of the other sources were subtracted
    #: (`improc.hidden_sources`)


_APERTURE_BITS = (SourceFlag.APER_TRUNCATED | SourceFlag.APER_HAS_MASKED
                  | SourceFlag.APER_ALL_MASKED | SourceFlag.APER_NONPOSITIVE)
#: Flags that do not keep a source out of the stellar locus: its apertures, and deblending
#: (a deblended star's size is measured with its neighbours' pixels left out).
_LOCUS_IGNORED = _APERTURE_BITS | SourceFlag.MERGED




def _as_map(value: np.ndarray | float, shape: tuple[int, int], name: str) -> np.ndarray | float:
    """A scalar, or a native float32 (ny, nx) array, after checking the shape."""
    arr = np.asarray(value)
    if arr.ndim == 0:
        return float(arr)
    if arr.shape != shape:
        raise ValueError(f"{name} must be a scalar or have the data shape {shape}, got {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _prepare(data, background, noise, mask) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Background-subtracted image, noise map (bad pixels filled) and bad-pixel mask."""
    raw = as_image(data)
    shape = raw.shape
    sub = raw - _as_map(background, shape, "background")
    noise_map = np.broadcast_to(_as_map(noise, shape, "noise"), shape).astype(np.float32)
    bad = ~np.isfinite(sub)
    if mask is not None:
        mask_arr = np.asarray(mask)
        if mask_arr.shape != shape:
            raise ValueError(f"mask shape {mask_arr.shape} does not match data shape {shape}")
        bad |= mask_arr.astype(bool, copy=False)
    if bad.all():
        raise ValueError(f"data has no valid pixel: all {sub.size} are NaN, infinite or masked")
    good_noise = np.isfinite(noise_map) & (noise_map > 0)
    if np.ndim(noise) == 0 and not good_noise.flat[0]:
        raise ValueError(f"noise must be finite and > 0, got {noise}")
    bad |= ~good_noise
    if bad.all():
        raise ValueError("noise is not finite and > 0 on any unmasked pixel")
    sub[bad] = 0.0
    noise_map[bad] = np.median(noise_map[~bad], overwrite_input=True)     # partitions its own copy
    return raw, sub, noise_map, bad


def _touches(seg: np.ndarray, pixels: np.ndarray, n_objects: int) -> np.ndarray:
    """For each object, whether its footprint is on or next to one of ``pixels``."""
    n_pixels = np.count_nonzero(pixels)
    if n_pixels == 0:
        return np.zeros(n_objects, bool)
    if n_pixels > pixels.size // 32:        # a large area: one pass of a 3 x 3 dilation
        near = ndimage.binary_dilation(pixels, structure=np.ones((3, 3), bool))
        return np.bincount(seg[near], minlength=n_objects + 1)[1:] > 0
    # a few bad or saturated pixels (the usual case): the labels of their 3 x 3 neighbourhoods,
    # without a pass of the dilation over the whole frame
    ny, nx = pixels.shape
    ys, xs = np.nonzero(pixels)
    touched = np.zeros(n_objects + 1, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            yy, xx = ys + dy, xs + dx
            inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
            touched[seg[yy[inside], xx[inside]]] = True
    return touched[1:]


def _shape_and_centroid(sub, objs, seg, bad) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Half-light radius r50, windowed centroid (x, y) and the winpos-failure mask."""
    ids = np.arange(1, len(objs) + 1, dtype=np.int32)
    rmax = np.clip(6.0 * objs["a"], 3.0, 60.0)
    r50, _ = sep.flux_radius(sub, objs["x"], objs["y"], rmax, 0.5, mask=bad, segmap=seg,
                             seg_id=ids, subpix=5)
    r50 = np.where(np.isfinite(r50) & (r50 > 0), r50, np.nan)
    r50 = np.sqrt(np.clip(r50**2 - _R50_BOX_TERM, 0.01, None))
    sig = 2.0 * r50 / _GAUSSIAN_FWHM_PER_SIGMA
    fill = np.nanmedian(sig) if np.isfinite(sig).any() else 1.0
    sig = np.where(np.isfinite(sig), sig, fill)
    x, y, _ = sep.winpos(sub, objs["x"], objs["y"], sig, mask=bad)
    shift = np.hypot(x - objs["x"], y - objs["y"])
    failed = ~np.isfinite(shift) | (shift > np.maximum(2.0, 2.0 * sig * _GAUSSIAN_FWHM_PER_SIGMA))
    x = np.where(failed, objs["x"], x)
    y = np.where(failed, objs["y"], y)
    return r50, x, y, failed


def _isophotal_snr(objs, noise_map: np.ndarray, gain: float | None) -> np.ndarray:
    """Isophotal S/N: flux / sqrt(npix * noise_at_peak**2 + flux / gain)."""
    flux = objs["flux"].astype(float)
    var = objs["npix"] * noise_map[objs["ypeak"], objs["xpeak"]].astype(float) ** 2
    if gain is not None:
        var = var + np.clip(flux, 0.0, None) / gain
    return flux / np.sqrt(var)


def _smallest_size_peak(values: np.ndarray, width: float = 0.05, min_height: float = 0.2) -> float:
    """The smallest FWHM at which the size distribution has a well-populated peak.

    A Gaussian kernel density of log(FWHM) (bandwidth ``width``, i.e. 5%); peaks lower than
    ``min_height`` times the highest one are ignored, so a few cosmic rays do not count.
    """
    logv = np.log(values)
    grid = np.linspace(logv.min() - 3 * width, logv.max() + 3 * width, 512)
    density = np.exp(-0.5 * ((grid[:, None] - logv[None, :]) / width) ** 2).sum(axis=1)
    is_peak = np.zeros(grid.size, bool)
    is_peak[1:-1] = (density[1:-1] >= density[:-2]) & (density[1:-1] > density[2:])
    is_peak &= density >= min_height * density.max()
    return float(np.exp(grid[np.argmax(is_peak)]))


def stellar_locus(fwhm: np.ndarray, *, n_iter: int = 10, nsigma: float = 3.0,
                  min_sources: int = _MIN_LOCUS_SOURCES) -> tuple[float, float]:
    """Centre and spread of the point-source locus in a set of FWHM (or r50) values.

    Point sources are the smallest well-populated group of sizes: the locus starts at the
    smallest peak of the size distribution that reaches 20% of the highest peak (so galaxies,
    which are larger, may even outnumber the stars), then is refined by ``nsigma`` clipping
    about the median, the spread being 1.4826 x MAD with a floor of 2% of the centre.

    Parameters
    ----------
    fwhm
        1-D sizes of candidate point sources (bright and unflagged), pixels; non-finite or
        non-positive values are ignored.
    n_iter
        Maximum number of clipping iterations.
    nsigma
        Clipping half-width in units of the spread.
    min_sources
        Fewest usable values accepted; clipping also stops before keeping fewer.

    Returns
    -------
    centre, spread : float
        Median and robust standard deviation of the values kept, pixels.

    Raises
    ------
    ValueError
        If fewer than ``min_sources`` (default 5) usable values are given.
    """
    values = np.asarray(fwhm, dtype=float)
    values = values[np.isfinite(values) & (values > 0)]
    if values.size < min_sources:
        raise ValueError(f"need at least {min_sources} sources to find the stellar locus, "
                         f"got {values.size}")
    centre = _smallest_size_peak(values)
    keep = np.abs(values / centre - 1.0) <= 0.15
    if keep.sum() < min_sources:
        keep = np.ones(values.size, bool)
    for _ in range(n_iter):
        centre = float(np.median(values[keep]))
        spread = max(1.4826 * float(np.median(np.abs(values[keep] - centre))), 0.02 * centre)
        new_keep = np.abs(values - centre) <= nsigma * spread
        if new_keep.sum() < min_sources or np.array_equal(new_keep, keep):
            break
        keep = new_keep
    return centre, spread


def _locus_candidates(fwhm: np.ndarray, snr: np.ndarray, flags: np.ndarray,
                      min_snr: float) -> np.ndarray:
    return np.isfinite(fwhm) & (fwhm > 0) & (snr >= min_snr) & (flags == 0)


def _stellarity(fwhm: np.ndarray, snr: np.ndarray,
                flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """class_star = exp(-z**2 / 2), z the distance of FWHM from the stellar locus in sigma.

    The sigma of each object adds the locus spread and the size scatter expected from its S/N.
    NaN for all objects when fewer than 5 clean sources with S/N >= 20 define a locus.
    """
    candidates = _locus_candidates(fwhm, snr, flags & ~int(_LOCUS_IGNORED), 20.0)
    if candidates.sum() < _MIN_LOCUS_SOURCES:
        nan = np.full(fwhm.shape, np.nan)
        return nan, np.zeros(fwhm.shape, bool)
    centre, spread = stellar_locus(fwhm[candidates])
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = np.hypot(spread, _R50_SNR_SCATTER * centre / np.abs(snr))
        z = (fwhm - centre) / sigma
    class_star = np.where(np.isfinite(z), np.exp(-0.5 * z**2), 0.0)
    is_star = (class_star >= _MIN_CLASS_STAR) & (snr >= _MIN_STAR_SNR)
    return class_star, is_star


def _aperture_columns(sub, noise_map, bad, x, y, radii,
                      gain) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """apflux_i / apfluxerr_i for each radius and the OR of their aperture flags."""
    columns: dict[str, np.ndarray] = {}
    flags = np.zeros(len(x), np.int64)
    for i, radius in enumerate(radii):
        flux, err, flag = sep.sum_circle(sub, x, y, radius, err=noise_map, gain=gain, mask=bad,
                                         subpix=5)
        columns[f"apflux_{i}"] = np.asarray(flux, float)
        columns[f"apfluxerr_{i}"] = np.asarray(err, float)
        flags |= flag
    return columns, flags


def _check_radii(radii: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(r) for r in radii)
    if not values or not all(np.isfinite(r) and r > 0 for r in values):
        raise ValueError("aperture_radii must be a non-empty sequence of radii > 0 pixels, "
                         f"got {radii}")
    return values


def _check_gain(gain: float | None) -> float | None:
    if gain is not None and not (np.isfinite(gain) and gain > 0):
        raise ValueError(f"gain must be None or > 0 (e-/ADU), got {gain}")
    return None if gain is None else float(gain)


def aperture_photometry(data: np.ndarray, sources: Table, *, background: np.ndarray | float,
                        noise: np.ndarray | float, aperture_radii: Sequence[float],
                        mask: np.ndarray | None = None, gain: float | None = None) -> Table:
    """Measure circular-aperture fluxes at the ``x, y`` of an existing source table.

    Parameters
    ----------
    data, background, noise, mask, gain
        As for `extract_sources`.
    sources
        Table with ``x``, ``y`` (0-based pixels) and ``flags`` columns, e.g. from
        `extract_sources`.
    aperture_radii
        Radii in pixels; radius ``i`` gives columns ``apflux_i`` and ``apfluxerr_i``.

    Returns
    -------
    astropy.table.Table
        A copy of ``sources`` whose ``apflux_*``/``apfluxerr_*`` columns are replaced by the new
        ones and whose aperture flag bits are those of the new apertures;
        ``meta["aperture_radii"]`` lists the radii.

    Raises
    ------
    ValueError
        For bad ``data``, ``background``, ``noise``, ``mask``, ``gain`` or radii (see
        `extract_sources`), or a table without ``x``, ``y``, ``flags``.
    """
    missing = [c for c in ("x", "y", "flags") if c not in sources.colnames]
    if missing:
        raise ValueError(f"sources must have columns x, y, flags; missing {missing}")
    radii, gain = _check_radii(aperture_radii), _check_gain(gain)
    _, sub, noise_map, bad = _prepare(data, background, noise, mask)
    out = sources.copy()
    out.remove_columns([c for c in out.colnames if c.startswith(("apflux_", "apfluxerr_"))])
    x, y = np.asarray(out["x"], float), np.asarray(out["y"], float)
    columns, aper_flags = _aperture_columns(sub, noise_map, bad, x, y, radii, gain)
    for name, values in columns.items():
        out[name] = values
    out["flags"] = (np.asarray(out["flags"]) & ~int(_APERTURE_BITS)) | aper_flags
    out.meta["aperture_radii"] = list(radii)
    return out


def estimate_fwhm(sources: Table, *, min_snr: float = 20.0, min_sources: int = _MIN_LOCUS_SOURCES) -> float:
    """Robust FWHM of the bright, unflagged point sources of a table, in pixels.

    Uses the sources with ``snr >= min_snr``, ``flags == 0`` (aperture and MERGED bits
    ignored) and a finite ``fwhm``, and returns the centre of their locus (`stellar_locus`): sigma-clipped
    median, so that the few galaxies, blends and cosmic rays among them are rejected.

    Parameters
    ----------
    sources
        Table with ``fwhm``, ``snr`` and ``flags`` columns, e.g. from `extract_sources`.
    min_snr
        Smallest isophotal signal-to-noise ratio of a source used.
    min_sources
        Fewest qualifying sources accepted (>= 1).

    Returns
    -------
    float
        FWHM in pixels.

    Raises
    ------
    TooFewSourcesError
        If fewer than ``min_sources`` (default 5) sources qualify (the message gives the counts).
    ValueError
        If columns are missing, or ``min_sources`` < 1.
    """
    if int(min_sources) < 1:
        raise ValueError(f"min_sources must be >= 1, got {min_sources}")
    missing = [c for c in ("fwhm", "snr", "flags") if c not in sources.colnames]
    if missing:
        raise ValueError(f"sources must have columns fwhm, snr, flags; missing {missing}")
    fwhm = np.asarray(sources["fwhm"], float)
    flags = np.asarray(sources["flags"], np.int64) & ~int(_LOCUS_IGNORED)
    good = _locus_candidates(fwhm, np.asarray(sources["snr"], float), flags, min_snr)
    if good.sum() < min_sources:
        raise TooFewSourcesError(f"not enough sources to estimate the FWHM: {good.sum()} of {len(sources)} "
                         f"have snr >= {min_snr}, no flags but aperture and deblending ones and a "
                         f"valid fwhm; need {min_sources}")
    return stellar_locus(fwhm[good], min_sources=min_sources)[0]


def _check_detection_options(threshold, minarea, deblend_nthresh, deblend_cont, max_sources) -> None:
    if not (np.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be > 0 (sigma), got {threshold}")
    if int(minarea) < 1:
        raise ValueError(f"minarea must be >= 1 pixel, got {minarea}")
    if int(deblend_nthresh) < 1:
        raise ValueError(f"deblend_nthresh must be >= 1, got {deblend_nthresh}")
    if not 0.0 <= deblend_cont <= 1.0:
        raise ValueError(f"deblend_cont must be in [0, 1], got {deblend_cont}")
    if int(max_sources) < 1:
        raise ValueError(f"max_sources must be >= 1, got {max_sources}")


def _detect(sub, noise_map, bad, *, threshold, minarea, deblend_nthresh, deblend_cont,
            filter_kernel, filter_type, gain, max_sources) -> tuple[np.ndarray, np.ndarray]:
    """sep.extract on the background-subtracted image: objects and segmentation map."""
    kernel = None if filter_kernel is None else np.ascontiguousarray(filter_kernel, dtype=np.float32)
    if filter_type not in ("conv", "matched"):
        raise ValueError(f"filter_type must be 'conv' or 'matched', got {filter_type!r}")
    if kernel is not None and (kernel.ndim != 2 or kernel.size == 0 or not np.isfinite(kernel).all()):
        raise ValueError(f"filter_kernel must be a finite 2-D array or None, got shape {kernel.shape}")
    # No SExtractor "cleaning": it removes every detection that a model of its brighter
    # neighbours' wings could explain, and with real PSF wings (Moffat-like) it throws away a
    # large fraction of the genuine faint stars near bright ones (a third of the S/N 10-30 stars
    # of a moderately crowded field); spurious wing detections are rare without it.
    try:
        objs, seg = sep.extract(sub, float(threshold), err=noise_map, gain=gain, mask=bad,
                                minarea=int(minarea), filter_kernel=kernel, filter_type=filter_type,
                                deblend_nthresh=int(deblend_nthresh), deblend_cont=float(deblend_cont),
                                clean=False, segmentation_map=True)
    except Exception as exc:
        # sep's buffer of active object pixels is a process-wide setting that only the program
        # may choose (sep.set_extract_pixstack; the command line reads pipeline.sep_pixel_stack)
        if "pixel buffer full" not in str(exc):
            raise
        raise PixelBufferFullError(
            f"sep's object-pixel buffer ({sep.get_extract_pixstack()} pixels) filled up on this "
            f"{sub.shape[1]} x {sub.shape[0]} image at {threshold} sigma; raise it with "
            "sep.set_extract_pixstack (config pipeline.sep_pixel_stack for the command line), or "
            "check the background subtraction") from exc
    if len(objs) > max_sources:
        raise TooManySourcesError(f"found {len(objs)} sources, more than max_sources={max_sources}; "
                         f"raise the threshold ({threshold} sigma) or max_sources")
    return objs, seg


def _object_flags(raw, objs, seg, bad, saturation, winpos_failed) -> np.ndarray:
    """sep's object flags plus MASKED, SATURATED and WINPOS_FAILED."""
    flags = objs["flag"].astype(np.int64)
    flags[_touches(seg, bad, len(objs))] |= SourceFlag.MASKED
    if saturation is not None:
        with np.errstate(invalid="ignore"):
            saturated = raw >= saturation
        flags[_touches(seg, saturated, len(objs))] |= SourceFlag.SATURATED
    flags[winpos_failed] |= SourceFlag.WINPOS_FAILED
    return flags


def _merge_duplicates(x: np.ndarray, y: np.ndarray, objs: np.ndarray, flags: np.ndarray,
                      tolerance: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deblended fragments whose windowed centroids converge on one point are one source.

    sep's deblending sometimes splits a bright star into a core and a fragment of its wings;
    both windowed centroids then land on the star (within ``tolerance`` pixels), and the star
    would be listed, and measured, twice.  The brightest fragment of each such group is kept
    with the isophotal flux and area of the whole group and the OR of its flags (MERGED).

    Returns the rows to keep and the updated copies of ``objs`` and ``flags``.
    """
    keep = np.ones(len(x), dtype=bool)
    finite = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    pairs = cKDTree(np.column_stack([x[finite], y[finite]])).query_pairs(tolerance, output_type="ndarray")
    if len(pairs) == 0:
        return keep, objs, flags
    objs, flags = objs.copy(), flags.copy()
    graph = coo_matrix((np.ones(len(pairs)), (finite[pairs[:, 0]], finite[pairs[:, 1]])),
                       shape=(len(x), len(x)))
    _, group = connected_components(graph, directed=False)
    for members in np.split(np.argsort(group, kind="stable"), np.flatnonzero(np.diff(np.sort(group))) + 1):
        if len(members) < 2:
            continue
        best = members[np.argmax(objs["flux"][members])]
        objs["flux"][best] = objs["flux"][members].sum()
        objs["npix"][best] = objs["npix"][members].sum()
        flags[best] = np.bitwise_or.reduce(flags[members]) | SourceFlag.MERGED
        keep[members[members != best]] = False
    return keep, objs, flags


def _source_table(objs, x, y, fwhm, snr, flags, class_star, is_star) -> Table:
    pix = u.pix
    columns = [
        ("x", x, pix), ("y", y, pix),
        ("x_err", np.sqrt(np.clip(objs["errx2"], 0, None)), pix),
        ("y_err", np.sqrt(np.clip(objs["erry2"], 0, None)), pix),
        ("x_iso", objs["x"], pix), ("y_iso", objs["y"], pix),
        ("x_peak", objs["xpeak"].astype(np.int32), pix), ("y_peak", objs["ypeak"].astype(np.int32), pix),
        ("a", objs["a"], pix), ("b", objs["b"], pix), ("theta", objs["theta"], u.rad),
        ("flux_iso", objs["flux"], None), ("peak", objs["peak"], None),
        ("npix", objs["npix"].astype(np.int32), None), ("fwhm", fwhm, pix), ("snr", snr, None),
        ("flags", flags.astype(np.int64), None), ("class_star", class_star, None),
        ("is_star", is_star, None),
    ]
    table = Table()
    for name, values, unit in columns:
        values = np.asarray(values)
        if values.dtype.kind == "f":
            values = values.astype(np.float64)
        table[name] = Column(values, unit=unit)
    return table


def extract_sources(data: np.ndarray, *, background: np.ndarray | float, noise: np.ndarray | float,
                    mask: np.ndarray | None = None, threshold: float = 5.0, minarea: int = 5,
                    deblend_nthresh: int = 32, deblend_cont: float = 0.005,
                    filter_kernel: np.ndarray | None = DEFAULT_FILTER_KERNEL,
                    filter_type: Literal["conv", "matched"] = "conv",
                    aperture_radii: Sequence[float] | None = None, gain: float | None = None,
                    saturation: float | None = None, max_sources: int = 100_000,
                    exclude: np.ndarray | None = None, min_fwhm_sources: int = _MIN_LOCUS_SOURCES) -> Table:
    """Detect sources and measure positions, shapes, sizes and aperture fluxes.

    Parameters
    ----------
    data
        (ny, nx) image, not background-subtracted; any real dtype and byte order.  NaN and
        infinite pixels are treated as masked.
    background
        Sky level, a scalar or an (ny, nx) map (e.g. ``BackgroundMesh.counts()``), data units.
    noise
        Sky noise (standard deviation per pixel), scalar or (ny, nx) map, data units.  Pixels
        where it is not finite and > 0 are treated as masked.
    mask
        (ny, nx), True (non-zero) where pixels are bad; None masks nothing.  Masked pixels are
        never part of a detection and are left out of every sum.
    threshold
        Detection threshold in units of ``noise`` (per pixel, after filtering).
    minarea
        Minimum number of connected pixels above threshold.
    deblend_nthresh, deblend_cont
        Number of deblending levels and minimum contrast (1.0 switches deblending off).
    filter_kernel
        Detection filter; default SExtractor's 3x3 ``default.conv``; None detects on the
        unfiltered image.
    filter_type
        "conv": the image is convolved with the kernel normalised to unit sum and compared
        with ``threshold`` x ``noise``, as SExtractor does.  "matched": the filtered image is
        divided by its own noise, weighting pixels by the noise map (sep's matched filter,
        better where the noise varies strongly, as in coadds of partly overlapping frames).
    aperture_radii
        Aperture radii in pixels, giving ``apflux_i``/``apfluxerr_i`` for radius ``i``.  None
        means ``FWHM_APERTURE_MULTIPLES`` (1, 2, 3, 5) times the FWHM that `estimate_fwhm` finds
        among the detections (then also in ``meta["fwhm"]``).
    gain
        e-/ADU; if given, the sources' Poisson noise is added to flux errors.  None: sky only.
    saturation
        Level of ``data`` at or above which a pixel is saturated (SATURATED flag); None: no check.
    max_sources
        More detections than this is an error (the threshold is probably too low).
    exclude
        (ny, nx), True where no pixel may belong to a detection (e.g. outside a search area);
        unlike ``mask`` these pixels are good data: they count in the measurements and do
        not set MASKED.
    min_fwhm_sources
        With ``aperture_radii`` None: fewest sources from which `estimate_fwhm` measures the
        FWHM (its ``min_sources``).

    Returns
    -------
    astropy.table.Table
        One row per source: ``x, y`` windowed centroid; ``x_err, y_err`` errors of the
        isophotal barycentre ``x_iso, y_iso``; ``x_peak, y_peak`` brightest pixel; ``a, b,
        theta`` isophotal ellipse; ``flux_iso``; ``peak`` (above background); ``npix``;
        ``fwhm`` (2 x half-light radius); ``snr`` (isophotal, sky + Poisson if ``gain``);
        ``apflux_i, apfluxerr_i``; ``flags`` (`SourceFlag` bits); ``class_star`` in [0, 1]:
        ``exp(-z**2 / 2)`` with ``z`` the distance of the FWHM from the stellar locus (the
        `stellar_locus` of sources with S/N >= 20 and no flags but aperture and deblending
        ones) in units of the locus spread
        and the FWHM scatter expected at the source's S/N, NaN if fewer than 5 sources define
        the locus; ``is_star``: ``class_star >= 0.1`` and ``snr >= 10``.  Positions are
        0-based.  ``meta`` holds ``threshold`` and ``aperture_radii``.

    Raises
    ------
    ValueError
        If ``data`` is not a non-empty 2-D real array or has no valid pixel; if ``background``,
        ``noise`` or ``mask`` have another shape; if an option is out of range; if more than
        ``max_sources`` are found; if ``aperture_radii`` is None and `estimate_fwhm` fails.
    """
    _check_detection_options(threshold, minarea, deblend_nthresh, deblend_cont, max_sources)
    gain = _check_gain(gain)
    radii = None if aperture_radii is None else _check_radii(aperture_radii)
    raw, sub, noise_map, bad = _prepare(data, background, noise, mask)
    if exclude is not None and np.shape(exclude) != sub.shape:
        raise ValueError(f"exclude shape {np.shape(exclude)} does not match data shape {sub.shape}")
    search_bad = bad if exclude is None else bad | np.asarray(exclude, dtype=bool)
    objs, seg = _detect(sub, noise_map, search_bad, threshold=threshold, minarea=minarea,
                        deblend_nthresh=deblend_nthresh, deblend_cont=deblend_cont,
                        filter_kernel=filter_kernel, filter_type=filter_type, gain=gain,
                        max_sources=int(max_sources))
    r50, x, y, winpos_failed = _shape_and_centroid(sub, objs, seg, bad)
    flags = _object_flags(raw, objs, seg, bad, saturation, winpos_failed)
    keep, objs, flags = _merge_duplicates(x, y, objs, flags)
    objs, x, y, r50, flags = objs[keep], x[keep], y[keep], r50[keep], flags[keep]
    fwhm = 2.0 * r50
    snr = _isophotal_snr(objs, noise_map, gain)
    class_star, is_star = _stellarity(fwhm, snr, flags)
    table = _source_table(objs, x, y, fwhm, snr, flags, class_star, is_star)
    table.meta["threshold"] = float(threshold)
    if radii is None:
        table.meta["fwhm"] = estimate_fwhm(table, min_sources=min_fwhm_sources)
        radii = tuple(m * table.meta["fwhm"] for m in FWHM_APERTURE_MULTIPLES)
    columns, aper_flags = _aperture_columns(sub, noise_map, bad, x, y, radii, gain)
    for name, values in columns.items():
        table[name] = values
    table["flags"] |= aper_flags
    table.meta["aperture_radii"] = list(radii)
    return table
