"""PSF photometry with a `~improc.psf.PixelPSF`, and the choice of stars to build the PSF from.

`psf_fluxes` fits, for each star independently, the amplitude of the PSF fixed at the given
position (a linear, inverse-variance weighted least-squares fit over the pixels within
``fit_radius``).  The model sums to 1 over its stamp, so the fluxes are the flux within the
stamp, which for the default stamp of ~10 FWHM is the total flux to ~0.1 % (see `improc.psf`).

`psf_positions` refits positions with the PSF (e.g. on an image with the neighbours' models
subtracted, see `improc.crowded_photometry`), and `model_aperture_sums` gives what a star's own
model puts into circular apertures, so that the light of neighbours can be taken out of
aperture fluxes too.

`select_psf_stars` picks bright, isolated, unsaturated, point-like sources for `fit_psf`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import sep
from scipy.spatial import cKDTree

from improc.psf import PixelPSF, cut_stamps, nearest_pixel, shifted_stamps

__all__ = ["PSFFluxes", "add_clips", "checked_fit_inputs", "psf_fluxes", "psf_positions", "render_sources", "model_aperture_sums",
           "select_psf_stars"]

#: Stars processed together by `psf_fluxes` (bounds the memory of the rendered clips).
_CHUNK = 2048

#: Stars whose whole clips `render_sources` and `model_aperture_sums` make at a time (a few MB
#: of float64 clips and mosaic, reused from chunk to chunk).
_RENDER_CHUNK = 256


class PSFFluxes(NamedTuple):
    """Result of `psf_fluxes`, one value per star (NaN where no pixel could be used)."""

    flux: np.ndarray
    """PSF flux, in data units."""
    flux_err: np.ndarray
    """1-sigma error of the flux from the variance: ``1 / sqrt(sum(psf**2 / variance))``."""
    chi2: np.ndarray
    """Reduced chi-square of the fit: ``sum((data - flux psf)**2 / variance) / (n_pixels - 1)``."""


def _as_positions(x, y) -> tuple[np.ndarray, np.ndarray]:
    x = np.atleast_1d(np.asarray(x, dtype=float))
    y = np.atleast_1d(np.asarray(y, dtype=float))
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"x and y must be 1-d arrays of the same length, got shapes {x.shape} and {y.shape}")
    return x, y


def _check_image(name: str, value, shape: tuple[int, int], allow_scalar: bool = True) -> None:
    if value is None or (allow_scalar and np.ndim(value) == 0):
        return
    if np.shape(value) != shape:
        raise ValueError(f"{name} must have the shape of data {shape}, got {np.shape(value)}")


def checked_fit_inputs(data, x, y, *, background, variance, mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate the arrays of a PSF fit: a 2-d image, 1-d positions, maps of the image's shape.

    Returns ``data`` as an array and ``x, y`` as 1-d float arrays; ValueError names the argument.
    """
    data = np.asarray(data)
    if data.ndim != 2:
        raise ValueError(f"data must be a 2-d (ny, nx) image, got shape {data.shape}")
    x, y = _as_positions(x, y)
    for name, value in (("background", background), ("variance", variance)):
        _check_image(name, value, data.shape)
    _check_image("mask", mask, data.shape, allow_scalar=False)
    return data, x, y


def psf_fluxes(data: np.ndarray, x: np.ndarray, y: np.ndarray, psf: PixelPSF, *,
               background: np.ndarray | float, variance: np.ndarray | float,
               mask: np.ndarray | None = None, fit_radius: float | None = None) -> PSFFluxes:
    """Fit the flux of each star with the PSF fixed at its position.

    For each star the model ``psf.get_clip(x, y)`` (the PSF at that image position, shifted to
    the sub-pixel position) is fitted as ``data - background = flux * model`` by linear least
    squares with weights ``1 / variance`` over the pixels within ``fit_radius`` of (x, y).  With
    the true variance the flux is unbiased and ``flux_err`` its standard deviation.

    Parameters
    ----------
    data : ndarray
        (ny, nx) image.
    x, y : ndarray
        Star positions, 0-based pixels, shape (n,).  Stars near or beyond the edge use the
        pixels that are on the image.
    psf : PixelPSF
        The PSF of the image.
    background : ndarray or float
        Background to subtract, (ny, nx) or a constant.
    variance : ndarray or float
        Per-pixel variance of ``data``, (ny, nx) or a constant.  It should not be derived from
        the noisy data pixel by pixel (that biases the fluxes low); the background variance plus
        the Poisson variance of a smooth model of the sources is right.
    mask : ndarray of bool, optional
        (ny, nx), True for pixels not to use.  Pixels with non-finite data or variance, or
        variance <= 0, are not used either.
    fit_radius : float, optional
        Radius in pixels of the fitted disc; None means 2 FWHM (``psf.fwhm_pixels``), which
        keeps ~95 % of the attainable signal-to-noise.  At most half the PSF stamp is used.

    Returns
    -------
    PSFFluxes
        ``flux``, ``flux_err`` and ``chi2`` (reduced), each shape (n,).

    Raises
    ------
    ValueError
        If arrays have inconsistent shapes or ``fit_radius`` is not > 0.
    """
    data, x, y = checked_fit_inputs(data, x, y, background=background, variance=variance, mask=mask)
    radius = 2.0 * psf.fwhm_pixels if fit_radius is None else float(fit_radius)
    if not radius > 0:
        raise ValueError(f"fit_radius must be > 0, got {fit_radius}")
    half = min(psf.size // 2, int(np.ceil(radius)))
    out = np.full((3, x.size), np.nan)
    for start in range(0, x.size, _CHUNK):
        part = slice(start, start + _CHUNK)
        out[:, part] = _fit_chunk(data, x[part], y[part], psf, background, variance, mask, radius, half)
    return PSFFluxes(*out)


def _fit_chunk(data, x, y, psf: PixelPSF, background, variance, mask, radius: float, half: int) -> np.ndarray:
    """Fluxes, errors and reduced chi-squares (3, n) of a chunk of stars."""
    finite = np.isfinite(x) & np.isfinite(y)
    xs, ys = np.where(finite, x, psf.x0), np.where(finite, y, psf.y0)
    model = psf.get_clips(xs, ys, window=half)
    stamps, w = _weighted_stamps(data, xs, ys, psf, background, variance, mask, radius, half)
    w[~finite] = 0.0
    spp = (w * model**2).sum(axis=(1, 2))
    npix = (w > 0).sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        flux = (w * model * stamps).sum(axis=(1, 2)) / spp
        err = 1.0 / np.sqrt(spp)
        chi2 = (w * (stamps - flux[:, None, None] * model) ** 2).sum(axis=(1, 2)) / (npix - 1)
    bad = (npix < 2) | ~(spp > 0)
    return np.where(bad, np.nan, np.stack([flux, err, chi2]))


def psf_positions(data: np.ndarray, x: np.ndarray, y: np.ndarray, psf: PixelPSF, *,
                  background: np.ndarray | float, variance: np.ndarray | float,
                  mask: np.ndarray | None = None, fit_radius: float | None = None,
                  flux: np.ndarray | None = None, max_shift: float = 1.0,
                  n_iter: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Star positions refined by fitting the PSF (flux and position) around the given ones.

    Each Gauss-Newton pass fits ``stamp = a p + b dp/dx + c dp/dy`` by weighted linear least
    squares over the pixels within ``fit_radius`` of the given position (``p`` the PSF at the
    current position, see `psf_fluxes`) and moves the star by ``(b / a, c / a)``.  On an image
    from which the neighbours' models have been subtracted this gives positions free of the
    pull that a bright neighbour's wing exerts on a windowed centroid.  The PSF model is
    centred by the windowed-centroid convention (`improc.psf`), so for isolated stars the two
    agree.

    With ``flux`` given, ``data`` is a residual image from which *all* the stars were
    subtracted at the given positions with these fluxes (e.g. the model of
    `deblended_psf_fluxes`); each star's own model is added back to its stamp before the fit,
    so one residual image serves every star.

    Parameters
    ----------
    data, x, y, psf, background, variance, mask, fit_radius
        As for `psf_fluxes`.
    flux : ndarray, optional
        Shape (n,): fluxes of the stars' own models subtracted from ``data`` (see above).
    max_shift : float
        Stars whose fitted position moves further than this (pixels) from the given one, or
        whose fit fails (no usable pixels, flux not positive), keep the given position.
    n_iter : int
        Gauss-Newton passes (>= 1).

    Returns
    -------
    x, y : ndarray
        Refined positions, shape (n,).

    Raises
    ------
    ValueError
        As `psf_fluxes`, or if ``max_shift`` is not > 0 or ``n_iter`` < 1.
    """
    x0, y0 = _as_positions(x, y)
    if not max_shift > 0 or n_iter < 1:
        raise ValueError(f"need max_shift > 0 and n_iter >= 1, got {max_shift} and {n_iter}")
    radius = 2.0 * psf.fwhm_pixels if fit_radius is None else float(fit_radius)
    half = min(psf.size // 2, int(np.ceil(radius)))
    own = np.zeros(x0.size) if flux is None else np.broadcast_to(np.asarray(flux, dtype=float), x0.shape)
    xs, ys = x0.copy(), y0.copy()
    for start in range(0, x0.size, _CHUNK):
        part = slice(start, start + _CHUNK)
        xs[part], ys[part] = _position_chunk(data, x0[part], y0[part], np.nan_to_num(own[part]), psf,
                                             background, variance, mask, radius, half, n_iter)
    far = ~(np.hypot(xs - x0, ys - y0) <= max_shift)
    return np.where(far, x0, xs), np.where(far, y0, ys)


def _position_chunk(data, x0, y0, own, psf: PixelPSF, background, variance, mask, radius: float,
                    half: int, n_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Newton PSF positions of a chunk of stars on stamps fixed at their given pixels."""
    ok = np.isfinite(x0) & np.isfinite(y0)
    px, py = np.where(ok, x0, psf.x0), np.where(ok, y0, psf.y0)
    ix, iy, _, _ = nearest_pixel(px, py)
    stamps, w = _weighted_stamps(data, px, py, psf, background, variance, mask, radius, half)
    # float32 moves (as the neighbours' models subtracted from ``data``): ~1e-7 of the peak, far
    # below the noise, at a third of the matrix products' time
    stamps += own[:, None, None] * psf.get_clips(px, py, window=half, dtype=np.float32)
    xs, ys = px.copy(), py.copy()
    for _ in range(n_iter):
        cols = shifted_stamps(psf.stamps_at(xs, ys).astype(np.float32), xs - ix, ys - iy, window=half,
                              derivatives=True)
        normal = np.stack([np.stack([(w * a * b).sum(axis=(1, 2)) for b in cols], -1) for a in cols], -2)
        rhs = np.stack([(w * a * stamps).sum(axis=(1, 2)) for a in cols], -1)
        solvable = ok & (np.abs(np.linalg.det(normal)) > 0)
        sol = np.zeros((x0.size, 3))
        sol[solvable] = np.linalg.solve(normal[solvable], rhs[solvable][:, :, None])[:, :, 0]
        move = solvable & (sol[:, 0] > 0)
        safe = np.where(move, sol[:, 0], 1.0)
        xs = np.where(move, xs + sol[:, 1] / safe, xs)
        ys = np.where(move, ys + sol[:, 2] / safe, ys)
    return np.where(ok, xs, x0), np.where(ok, ys, y0)


def _weighted_stamps(data, x, y, psf: PixelPSF, background, variance, mask, radius: float,
                     half: int) -> tuple[np.ndarray, np.ndarray]:
    """Background-subtracted stamps (n, 2 half + 1, 2 half + 1) and their fit weights (0 outside
    the disc of ``radius`` around each star and on unusable pixels)."""
    ix, iy, dx, dy = nearest_pixel(x, y)
    stamps, inside = cut_stamps(data, ix, iy, half, data.shape)
    stamps -= cut_stamps(background, ix, iy, half, data.shape)[0]
    var = cut_stamps(variance, ix, iy, half, data.shape)[0]
    off = np.arange(-half, half + 1)
    near = ((off[None, None, :] - dx[:, None, None]) ** 2
            + (off[None, :, None] - dy[:, None, None]) ** 2) <= radius**2
    good = inside & near & np.isfinite(stamps) & np.isfinite(var) & (var > 0)
    if mask is not None:
        good &= ~cut_stamps(mask, ix, iy, half, data.shape)[0].astype(bool)
    w = np.where(good, 1.0 / np.where(good, var, 1.0), 0.0)
    return np.where(good, stamps, 0.0), w


def render_sources(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, flux: np.ndarray,
                   psf: PixelPSF) -> np.ndarray:
    """A noiseless (ny, nx) image of point sources: each is ``flux * psf.get_clip(x, y)``.

    Used to build the Poisson variance of a smooth model of the sources for `psf_fluxes`
    (``variance = background variance + model / gain``).  Sources with non-finite or
    non-positive flux are left out; parts of stamps off the image are dropped.
    """
    return _render(shape, x, y, flux, lambda idx: psf.get_clips(x[idx], y[idx], flux[idx]), psf.size)


def _render(shape: tuple[int, int], x, y, flux, clips_of, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """`render_sources` with ``clips_of(idx)`` giving the flux-scaled clips of stars ``idx``;
    into ``out`` (float64, ``shape``; overwritten) if given."""
    x, y = _as_positions(x, y)
    flux = np.broadcast_to(np.asarray(flux, dtype=float), x.shape)
    keep = np.flatnonzero(np.isfinite(x) & np.isfinite(y) & np.isfinite(flux) & (flux > 0))
    if out is None:
        model = np.zeros(shape, dtype=np.float64)
    else:
        model = out
        model.fill(0.0)
    ix, iy, _, _ = nearest_pixel(x[keep], y[keep])
    for start in range(0, keep.size, _RENDER_CHUNK):
        part = slice(start, start + _RENDER_CHUNK)
        add_clips(model, clips_of(keep[part]), ix[part], iy[part])
    return model


def add_clips(image: np.ndarray, clips: np.ndarray, ix: np.ndarray, iy: np.ndarray) -> None:
    """Add odd-sized clips (n, S, S) to an (ny, nx) image in place, each centred on pixel
    (ix, iy); the parts off the image are dropped.

    Clip by clip, in order: each addition touches only the clip's own box (no full-frame
    temporary), and every pixel sums its clips in the order given.
    """
    ny, nx = image.shape
    h = clips.shape[1] // 2
    for clip, cx, cy in zip(clips, ix.tolist(), iy.tolist()):
        x0, x1, y0, y1 = cx - h, cx + h + 1, cy - h, cy + h + 1
        if x0 >= 0 and y0 >= 0 and x1 <= nx and y1 <= ny:
            image[y0:y1, x0:x1] += clip
        elif x1 > 0 and y1 > 0 and x0 < nx and y0 < ny:
            image[max(y0, 0):min(y1, ny), max(x0, 0):min(x1, nx)] += \
                clip[max(-y0, 0):clip.shape[0] - max(y1 - ny, 0), max(-x0, 0):clip.shape[1] - max(x1 - nx, 0)]


def model_aperture_sums(psf: PixelPSF, x: np.ndarray, y: np.ndarray, flux: np.ndarray,
                        radii: tuple[float, ...] | list[float], *, subpix: int = 5) -> np.ndarray:
    """What each star's own PSF model puts into circular apertures centred on it, as sep sums it.

    Each star's clip (``flux * psf.get_clip(x, y)``, at its sub-pixel position, moved with
    float32 products as in the model images of `deblended_psf_fluxes`) is laid on its own cell
    of a mosaic and summed by ``sep.sum_circle`` with the same sub-pixel sampling as the image
    apertures, so the sums use exactly the pixel weights of the apertures on the image.
    Subtracting these from apertures on a model of all the stars leaves the light of each star's
    neighbours in its apertures.

    Parameters
    ----------
    psf : PixelPSF
        The PSF.
    x, y : ndarray
        Star positions, 0-based pixels, shape (n,).
    flux : ndarray
        Model fluxes, shape (n,); non-finite or non-positive fluxes give 0.
    radii : sequence of float
        Aperture radii, pixels (> 0).
    subpix : int
        sep's sub-pixel sampling (0: exact overlap), as used for the image apertures.

    Returns
    -------
    ndarray
        Shape (n, len(radii)).

    Raises
    ------
    ValueError
        If the arrays disagree in shape or a radius is not > 0.
    """
    x, y = _as_positions(x, y)
    flux = np.broadcast_to(np.asarray(flux, dtype=float), x.shape)
    radii = [float(r) for r in radii]
    if not radii or min(radii) <= 0:
        raise ValueError(f"radii must be a non-empty sequence of values > 0, got {radii}")
    out = np.zeros((x.size, len(radii)))
    good = np.flatnonzero(np.isfinite(x) & np.isfinite(y) & np.isfinite(flux) & (flux > 0))
    cell = psf.size + 2 * int(np.ceil(max(radii)))       # apertures never reach the next clip
    per_row = 32
    for start in range(0, good.size, _RENDER_CHUNK):
        idx = good[start:start + _RENDER_CHUNK]
        clips = psf.get_clips(x[idx], y[idx], flux[idx], dtype=np.float32)      # as the model images' clips
        rows = -(-idx.size // per_row)
        mosaic = np.zeros((rows * cell, per_row * cell))
        k = np.arange(idx.size)
        cx, cy = (k % per_row) * cell + cell // 2, (k // per_row) * cell + cell // 2
        h = psf.size // 2
        for j in range(idx.size):
            mosaic[cy[j] - h:cy[j] + h + 1, cx[j] - h:cx[j] + h + 1] = clips[j]
        _, _, dx, dy = nearest_pixel(x[idx], y[idx])
        for i, radius in enumerate(radii):
            out[idx, i] = sep.sum_circle(mosaic, cx + dx, cy + dy, radius, subpix=subpix)[0]
    return out


def select_psf_stars(x: np.ndarray, y: np.ndarray, flux: np.ndarray, snr: np.ndarray, flags: np.ndarray,
                     fwhm: np.ndarray, *, image_shape: tuple[int, int], min_snr: float = 50.0,
                     isolation_radius: float | None = None, neighbor_flux_ratio: float = 0.01,
                     edge_margin: float | None = None, peak: np.ndarray | None = None,
                     saturation: float | None = None, fwhm_tolerance: float = 0.25,
                     isolation_radius_fwhm: float = 5.0) -> np.ndarray:
    """Choose bright, isolated, unsaturated, point-like sources to build the PSF from.

    A source is chosen if all of these hold: its values are finite; ``flags == 0``;
    ``snr >= min_snr``; ``peak < saturation`` (when both are given); it lies at least
    ``edge_margin`` from the image edges; its FWHM is within ``fwhm_tolerance`` (fractional) of
    the median FWHM of the sources that passed the previous cuts (rejects galaxies, cosmic rays,
    blends); and no other source of flux >= ``neighbor_flux_ratio`` times its own lies within
    ``isolation_radius``.

    Parameters
    ----------
    x, y : ndarray
        Positions of all detected sources, 0-based pixels, shape (n,).
    flux, snr, flags, fwhm : ndarray
        Their fluxes, signal-to-noise ratios, integer flags (any nonzero flag rejects), and
        FWHMs in pixels, shape (n,).
    image_shape : tuple of int
        (ny, nx) of the image.
    min_snr : float
        Lowest signal-to-noise ratio accepted.
    isolation_radius : float, optional
        Radius in pixels; None means ``isolation_radius_fwhm`` times the median FWHM.
    neighbor_flux_ratio : float
        Neighbours fainter than this fraction of the source's flux do not count.
    edge_margin : float, optional
        Smallest distance in pixels from the image edges; None means ``isolation_radius``.
    peak : ndarray, optional
        Highest pixel value of each source, including background, in the units of ``saturation``.
    saturation : float, optional
        Level at or above which a source counts as saturated (use the non-linearity limit).
    fwhm_tolerance : float
        Largest accepted fractional deviation from the median FWHM.
    isolation_radius_fwhm : float
        The isolation radius when ``isolation_radius`` is None, in units of the median FWHM of
        the sources that passed the S/N, flag and saturation cuts (5: half the default PSF stamp).

    Returns
    -------
    ndarray of bool
        (n,), True for the chosen stars.

    Raises
    ------
    ValueError
        If the arrays do not all have the same shape, or an option is out of range.
    """
    x, y = _as_positions(x, y)
    arrays = {"flux": flux, "snr": snr, "flags": flags, "fwhm": fwhm}
    if peak is not None:
        arrays["peak"] = peak
    for name, value in arrays.items():
        if np.shape(value) != x.shape:
            raise ValueError(f"{name} must have the shape of x {x.shape}, got {np.shape(value)}")
    if min_snr < 0 or neighbor_flux_ratio < 0 or fwhm_tolerance <= 0:
        raise ValueError(f"need min_snr >= 0, neighbor_flux_ratio >= 0, fwhm_tolerance > 0; got "
                         f"{min_snr}, {neighbor_flux_ratio}, {fwhm_tolerance}")
    if not isolation_radius_fwhm >= 0:
        raise ValueError(f"isolation_radius_fwhm must be >= 0, got {isolation_radius_fwhm}")
    flux, snr, fwhm = (np.asarray(a, dtype=float) for a in (flux, snr, fwhm))
    good = np.isfinite(x) & np.isfinite(y) & np.isfinite(flux) & np.isfinite(fwhm) & (fwhm > 0)
    good &= (np.asarray(flags) == 0) & (np.nan_to_num(snr, nan=-1.0) >= min_snr)
    if peak is not None and saturation is not None:
        good &= np.nan_to_num(np.asarray(peak, dtype=float), nan=np.inf) < saturation
    if not good.any():
        return good
    median_fwhm = float(np.median(fwhm[good]))
    good &= np.abs(fwhm / median_fwhm - 1.0) <= fwhm_tolerance
    radius = isolation_radius_fwhm * median_fwhm if isolation_radius is None else float(isolation_radius)
    margin = radius if edge_margin is None else float(edge_margin)
    ny, nx = image_shape
    good &= (x >= margin - 0.5) & (x <= nx - 0.5 - margin) & (y >= margin - 0.5) & (y <= ny - 0.5 - margin)
    return good & ~_has_neighbour(x, y, flux, radius, neighbor_flux_ratio)


def _has_neighbour(x: np.ndarray, y: np.ndarray, flux: np.ndarray, radius: float, ratio: float) -> np.ndarray:
    """True for sources with another source of flux >= ratio times theirs within radius."""
    crowded = np.zeros(x.size, dtype=bool)
    finite = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    if finite.size < 2 or radius <= 0:
        return crowded
    pairs = cKDTree(np.column_stack([x[finite], y[finite]])).query_pairs(radius, output_type="ndarray")
    i, j = finite[pairs[:, 0]], finite[pairs[:, 1]]
    fi, fj = np.nan_to_num(flux[i], nan=np.inf), np.nan_to_num(flux[j], nan=np.inf)
    crowded[i[~(fj < ratio * fi)]] = True
    crowded[j[~(fi < ratio * fj)]] = True
    return crowded
