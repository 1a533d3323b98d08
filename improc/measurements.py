"""Measurements of detections on a difference image, and the cuts that reject bad ones.

`measure_detections` takes a difference image D (ADU, scaled so that a fit of its PSF P_D gives
a transient's flux in the new image's ADU), its inverse-variance weight and flags, P_D, and the
positions of detections, and returns one row per detection (`COLUMNS` lists names, units and
meanings).  Per detection, on ``s = sign * D`` with ``sign`` that of the PSF flux (so a negative
detection is measured as the mirror of a positive one):

* **PSF flux**: the position is refined by Gauss-Newton fits of ``a P + b dP/dx + c dP/dy`` (P at
  the current position, derivatives by forward differences; 3 passes) to the pixels within
  ``fit_radius`` of the detection; a refined position more than ``max_shift`` from the detection,
  or a fit whose amplitude is not significant (< 3 sigma), keeps the detection's position.  The
  flux is then the linear, inverse-variance weighted fit of P at that position over the pixels
  within ``fit_radius`` of it: ``flux = sum(w P D) / sum(w P**2)``, ``err = 1 / sqrt(sum(w P**2))``.
* **Aperture fluxes** (sep's ``sum_circle``, flagged pixels excluded) at the PSF position.
* **Shape**: Gaussian-windowed moments of s and of the PSF model (window sigma 0.6 x the PSF FWHM,
  centred on the PSF position, the same pixels): ``width_ratio = sqrt(T_s / T_psf)`` with
  ``T = Qxx + Qyy`` (about 1 for a point source, well below 1 for a cosmic-ray-like spike, above
  1 for an extended blob), ``elongation = sqrt(l1 / l2)`` of the moments of s.  The windowed
  centroid of s, and its distance from the windowed centroid of the PSF model at the PSF
  position (``centroid_offset``; 0 for a point source whatever the PSF's asymmetry) in pixels
  and in units of the windowed centroid's noise from the weight (``centroid_offset_sigma``: a
  faint source's centroid wanders by a pixel, a bright dipole's by many sigma; the PSF position
  shares the noise, so a point source's offset is typically 0.5 of these units).
* **Bad pixels**: pixels within ``fit_radius`` of the detection that are off the image, flagged
  (``mask_flags``) or without weight (``n_bad_pixels``), and the fraction of those within 1 FWHM
  of the PSF position (``bad_fraction``).
* **Negative pixels**: the fraction of good pixels within ``fit_radius`` with ``s < 0``.
* **Dipole**: s filtered by a Gaussian of the PSF's FWHM, in units of its noise (a matched-filter
  significance map); within ``fit_radius`` of the detection, P is its largest value and N its
  largest negative one in absolute value.  ``dipole_ratio = N / P`` if N >= 3 (a negative lobe
  that is itself significant), else 0: about 1 for the positive-negative pair that a misaligned
  or PSF-mismatched star leaves, 0 for a point source (pixel by pixel, noise alone would give a
  faint source's a "negative lobe" of half its light).

Sky positions are left to the caller (the WCS of the image, through the PSF positions).

`apply_cuts` applies thresholds ``{column: (min, max)}`` to such a table and says which failed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
import scipy.fft
import sep
from astropy.table import Column, Table

from improc.flags import PixelFlag
from improc.psf import PixelPSF, cut_stamps, nearest_pixel

__all__ = ["COLUMNS", "PSFLike", "measure_detections", "static_mismatch_flux", "CutResult", "apply_cuts"]

#: Detections measured together (bounds the memory of the stamps).
_CHUNK = 1024
#: Step of the forward differences of the PSF, pixels.
_STEP = 0.1
#: Gauss-Newton passes of the position fit.
_PASSES = 3
#: Sigma of the Gaussian window of the moments, in units of the PSF's FWHM.
_WINDOW_FWHM = 0.6
#: Matched-filter significance from which a negative lobe counts in ``dipole_ratio``: noise
#: reaches -3 sigma within a 2-FWHM disc about once in a hundred detections.
_LOBE_SIGMA = 3.0
#: Radius, in units of the PSF's FWHM, of the disc of ``bad_fraction``.
_CORE_FWHM = 1.0

#: Output columns: name -> (unit, description).
COLUMNS: dict[str, tuple[str, str]] = {
    "x": ("pix", "detection position x, 0-based (as given)"),
    "y": ("pix", "detection position y, 0-based (as given)"),
    "x_psf": ("pix", "position x of the PSF fit (the detection's if not refined)"),
    "y_psf": ("pix", "position y of the PSF fit (the detection's if not refined)"),
    "flux_psf": ("adu", "PSF flux in the new image's ADU (negative for negative detections)"),
    "flux_psf_err": ("adu", "1-sigma error of flux_psf from the weight"),
    "snr_psf": ("", "flux_psf / flux_psf_err"),
    "chi2_psf": ("", "reduced chi-square of the PSF fit"),
    "sign": ("", "+1 for a positive detection, -1 for a negative one (sign of the PSF flux "
                 "fitted at the detection)"),
    "x_centroid": ("pix", "windowed centroid x of sign * D (NaN if its windowed sum is not > 0)"),
    "y_centroid": ("pix", "windowed centroid y of sign * D (NaN if its windowed sum is not > 0)"),
    "centroid_offset": ("pix", "distance from the windowed centroid of sign * D to that of the PSF model at the "
                               "PSF position"),
    "centroid_offset_sigma": ("", "centroid_offset over the 1-sigma noise of the windowed centroid (from the "
                                  "weight; about twice the offset's own, as the PSF position shares the noise)"),
    "elongation": ("", "sqrt of the ratio of the eigenvalues of the windowed second moments (>= 1; "
                       "NaN if one is not > 0)"),
    "width_ratio": ("", "sqrt(windowed Qxx + Qyy of sign * D / the same of the PSF), 0 if not > 0"),
    "n_bad_pixels": ("", "pixels within fit_radius that are off the image, flagged or without weight"),
    "bad_fraction": ("", "fraction of the pixels within 1 FWHM of the PSF position that are bad"),
    "negative_fraction": ("", "fraction of the good pixels within fit_radius with sign * D < 0"),
    "dipole_ratio": ("", "most negative over most positive matched-filter significance of sign * D within "
                         "fit_radius, 0 unless the negative lobe reaches -3 sigma"),
}


#: A PSF: a `improc.psf.PixelPSF`, or ``psf(x, y)`` giving an odd square stamp of a star at the
#: centre of its central pixel, summing to 1 (e.g. ``ZogyResult.psf_at``).
PSFLike = PixelPSF | Callable[[float, float], np.ndarray]


def _centred_stamps(psf: PSFLike, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The PSF's centred stamps (n, s, s) at (x, y), each summing to 1."""
    if isinstance(psf, PixelPSF):
        stamps = np.tensordot(psf.coefficients(x, y), psf.basis, axes=1)
        return stamps.reshape(x.size, psf.size, psf.size)
    stamps = [np.asarray(psf(float(a), float(b)), dtype=float) for a, b in zip(x, y)]
    shapes = {st.shape for st in stamps}
    if len(shapes) > 1 or any(len(sh) != 2 or sh[0] != sh[1] or sh[0] % 2 == 0 for sh in shapes):
        raise ValueError(f"psf must give square stamps of one odd side, got shapes {sorted(shapes)}")
    stamps = np.stack(stamps) if stamps else np.zeros((0, 1, 1))
    totals = stamps.sum(axis=(1, 2))
    if not np.all(np.isfinite(totals) & (totals > 0)):
        raise ValueError("psf gave a stamp that does not sum to a finite value > 0")
    return stamps / totals[:, None, None]


class _ShiftedPSF:
    """The PSF of each detection of a chunk, shifted to any nearby position on its fixed stamp.

    The PSF is evaluated once per detection, at the detection; `at` moves it by a Fourier phase
    ramp (exact for a band-limited PSF) to a position within a pixel or two, on a stamp of side
    ``2 half + 1`` centred on the detection's pixel.
    """

    def __init__(self, psf: PSFLike, x: np.ndarray, y: np.ndarray, half: int):
        stamps = _centred_stamps(psf, x, y)
        self.size = stamps.shape[1]
        self.spectra = scipy.fft.rfft2(stamps)
        self.ix, self.iy, _, _ = nearest_pixel(x, y)
        self.half = half

    def at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Stamps (n, 2 half + 1, 2 half + 1) of unit-flux sources at (x, y)."""
        fy, fx = scipy.fft.fftfreq(self.size), scipy.fft.rfftfreq(self.size)
        phase = (np.exp(-2j * np.pi * np.outer(y - self.iy, fy))[:, :, None]
                 * np.exp(-2j * np.pi * np.outer(x - self.ix, fx))[:, None, :])
        shifted = scipy.fft.irfft2(self.spectra * phase, s=(self.size, self.size))
        pad = self.half - self.size // 2
        if pad >= 0:
            return np.pad(shifted, ((0, 0), (pad, pad), (pad, pad)))
        return shifted[:, -pad:pad, -pad:pad]


def _fwhm(stamp: np.ndarray) -> float:
    """FWHM (pixels) of a centred odd square stamp, measured as `PixelPSF.fwhm_pixels` does."""
    return PixelPSF(basis=stamp[None], degree=0, x0=0.0, y0=0.0, xscale=1.0, yscale=1.0,
                    image_shape=(1, 1)).fwhm_pixels


@dataclass
class _Stamps:
    """Data, inverse-variance weights (0 on bad pixels) and the bad-pixel mask of detections."""

    data: np.ndarray
    weight: np.ndarray
    bad: np.ndarray
    ix: np.ndarray
    iy: np.ndarray
    half: int

    def offsets(self) -> tuple[np.ndarray, np.ndarray]:
        """Pixel offsets (1, 1, size) in x and (1, size, 1) in y from the stamps' centres."""
        off = np.arange(-self.half, self.half + 1, dtype=float)
        return off[None, None, :], off[None, :, None]

    def disc(self, x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
        """Pixels within ``radius`` of the positions (x, y), (n, size, size)."""
        ox, oy = self.offsets()
        dx, dy = x - self.ix, y - self.iy
        return (ox - dx[:, None, None]) ** 2 + (oy - dy[:, None, None]) ** 2 <= radius**2


def _cut(data, weight, bad_map, x, y, half: int) -> _Stamps:
    """Stamps of half-size ``half`` around the pixels of (x, y), bad pixels zeroed."""
    ix, iy, _, _ = nearest_pixel(x, y)
    stamps, inside = cut_stamps(data, ix, iy, half, data.shape)
    w = cut_stamps(weight, ix, iy, half, data.shape)[0]
    flagged = cut_stamps(bad_map, ix, iy, half, data.shape)[0].astype(bool)
    bad = ~inside | flagged | ~(w > 0) | ~np.isfinite(stamps)
    return _Stamps(np.where(bad, 0.0, stamps), np.where(bad, 0.0, w), bad, ix, iy, half)


def _linear_flux(st: _Stamps, model: np.ndarray,
                 mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flux, error and reduced chi-square of ``data = flux * model`` over ``mask`` (NaN if none)."""
    w = np.where(mask, st.weight, 0.0)
    spp = (w * model**2).sum(axis=(1, 2))
    npix = (w > 0).sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        flux = (w * model * st.data).sum(axis=(1, 2)) / spp
        err = 1.0 / np.sqrt(spp)
        chi2 = (w * (st.data - flux[:, None, None] * model) ** 2).sum(axis=(1, 2)) / (npix - 1)
    bad = (npix < 2) | ~(spp > 0)
    return np.where(bad, np.nan, flux), np.where(bad, np.nan, err), np.where(bad, np.nan, chi2)


def _refine_positions(st: _Stamps, psf: _ShiftedPSF, x, y, model: np.ndarray, radius: float,
                      max_shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Newton PSF positions within ``max_shift`` of (x, y); (x, y) where the fit fails.

    ``model`` is the PSF at (x, y) on the stamps.  The derivatives are forward differences: the
    iteration stops where the residuals are orthogonal to P and to the approximate derivatives,
    which the true position satisfies on average, so their accuracy changes the convergence, not
    (to first order) the answer.
    """
    w = np.where(st.disc(x, y, radius), st.weight, 0.0)
    xs, ys = x.copy(), y.copy()
    moving = np.ones(x.size, bool)
    p = model
    for k in range(_PASSES):
        if k:
            p = psf.at(xs, ys)
        cols = (p, (psf.at(xs + _STEP, ys) - p) / _STEP, (psf.at(xs, ys + _STEP) - p) / _STEP)
        normal = np.stack([np.stack([(w * a * b).sum(axis=(1, 2)) for b in cols], -1) for a in cols], -2)
        rhs = np.stack([(w * a * st.data).sum(axis=(1, 2)) for a in cols], -1)
        ok = moving & np.isfinite(normal).all(axis=(1, 2)) & (np.abs(np.linalg.det(normal)) > 0)
        sol, cov00 = np.zeros((x.size, 3)), np.full(x.size, np.inf)
        sol[ok] = np.linalg.solve(normal[ok], rhs[ok][:, :, None])[:, :, 0]
        cov00[ok] = np.linalg.inv(normal[ok])[:, 0, 0]
        ok &= np.abs(sol[:, 0]) > 3.0 * np.sqrt(np.abs(cov00))
        moving &= ok
        safe = np.where(ok, sol[:, 0], 1.0)
        xs = np.where(ok, xs + sol[:, 1] / safe, xs)
        ys = np.where(ok, ys + sol[:, 2] / safe, ys)
    keep = moving & (np.hypot(xs - x, ys - y) <= max_shift)
    return np.where(keep, xs, x), np.where(keep, ys, y)


def _moments(values: np.ndarray, mask: np.ndarray, st: _Stamps, x, y, sigma_w: float):
    """Windowed centroid (x, y) and second moments (Qxx, Qyy, Qxy) of stamps, NaN if undefined."""
    ox, oy = st.offsets()
    dx = ox - (x - st.ix)[:, None, None]
    dy = oy - (y - st.iy)[:, None, None]
    wv = _window(mask, dx, dy, sigma_w) * values
    with np.errstate(divide="ignore", invalid="ignore"):
        total = wv.sum(axis=(1, 2))
        mx = (wv * dx).sum(axis=(1, 2)) / total
        my = (wv * dy).sum(axis=(1, 2)) / total
        ex, ey = dx - mx[:, None, None], dy - my[:, None, None]
        q = [(wv * a).sum(axis=(1, 2)) / total for a in (ex * ex, ey * ey, ex * ey)]
    good = total > 0
    nan = np.full(total.shape, np.nan)
    return [np.where(good, v, nan) for v in (x + mx, y + my, *q)]


def _window(mask: np.ndarray, dx: np.ndarray, dy: np.ndarray, sigma_w: float) -> np.ndarray:
    return np.where(mask, np.exp(-0.5 * (dx**2 + dy**2) / sigma_w**2), 0.0)


def _centroid_noise(st: _Stamps, s: np.ndarray, mask: np.ndarray, x, y, xc, yc,
                    sigma_w: float) -> tuple[np.ndarray, np.ndarray]:
    """1-sigma noise of the windowed centroid (xc, yc) of s from the pixels' variances: the
    centroid is sum(g s dx) / sum(g s), so to first order its x error is
    sqrt(sum(g**2 (dx - xc)**2 var)) / sum(g s)."""
    ox, oy = st.offsets()
    dx = ox - (x - st.ix)[:, None, None]
    dy = oy - (y - st.iy)[:, None, None]
    g = _window(mask, dx, dy, sigma_w)
    variance = np.divide(1.0, st.weight, out=np.zeros_like(st.weight), where=st.weight > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        total = (g * s).sum(axis=(1, 2))
        ex = ox - (xc - st.ix)[:, None, None]
        ey = oy - (yc - st.iy)[:, None, None]
        sx = np.sqrt((g**2 * ex**2 * variance).sum(axis=(1, 2))) / total
        sy = np.sqrt((g**2 * ey**2 * variance).sum(axis=(1, 2))) / total
    return sx, sy


def _shape_columns(st: _Stamps, s: np.ndarray, model: np.ndarray, x, y, fwhm: float) -> dict[str, np.ndarray]:
    """Centroid, centroid offset, elongation and width ratio of sign * D."""
    mask = ~st.bad
    sigma_w = _WINDOW_FWHM * fwhm
    xc, yc, qxx, qyy, qxy = _moments(s, mask, st, x, y, sigma_w)
    mx, my, pxx, pyy, _ = _moments(model, mask, st, x, y, sigma_w)
    sx, sy = _centroid_noise(st, s, mask, x, y, xc, yc, sigma_w)
    trace, det = qxx + qyy, qxx * qyy - qxy**2
    root = np.sqrt(np.maximum(trace**2 / 4 - det, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        l1, l2 = trace / 2 + root, trace / 2 - root
        elongation = np.where(l2 > 0, np.sqrt(l1 / l2), np.nan)
        width_ratio = np.sqrt(np.maximum(trace, 0.0) / (pxx + pyy))
        # In units of the centroid's own noise: the PSF position is fitted to the same pixels,
        # so for a point source the offset's scatter is about half that (conservative).
        offset_sigma = np.hypot((xc - mx) / sx, (yc - my) / sy)
    return {"x_centroid": xc, "y_centroid": yc, "centroid_offset": np.hypot(xc - mx, yc - my),
            "centroid_offset_sigma": np.where(np.isfinite(offset_sigma), offset_sigma, np.nan),
            "elongation": elongation, "width_ratio": width_ratio}


def _significance(st: _Stamps, s: np.ndarray, fwhm: float) -> np.ndarray:
    """s filtered by a unit-sum Gaussian G of the PSF's FWHM, over the noise of the filtered
    value, sqrt(sum(G**2 var)): G**2 is 1 / (4 pi sigma**2) times a unit-sum Gaussian of
    sigma / sqrt(2), so both are Gaussian filters.  Bad pixels count as 0 with no variance."""
    sigma = fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    variance = np.divide(1.0, st.weight, out=np.zeros_like(st.weight), where=st.weight > 0)
    filtered = ndimage.gaussian_filter(s, (0, sigma, sigma), mode="constant", truncate=3.0)
    noise2 = ndimage.gaussian_filter(variance, (0, sigma / np.sqrt(2.0), sigma / np.sqrt(2.0)),
                                     mode="constant", truncate=3.0) / (4.0 * np.pi * sigma**2)
    return np.divide(filtered, np.sqrt(noise2), out=np.zeros_like(filtered), where=noise2 > 0)


def _pixel_columns(st: _Stamps, s: np.ndarray, disc: np.ndarray, core: np.ndarray,
                   fwhm: float) -> dict[str, np.ndarray]:
    """Bad pixels, the fraction of negative pixels and the dipole ratio within the disc."""
    good = disc & ~st.bad
    n_good = good.sum(axis=(1, 2))
    significance = np.where(disc, _significance(st, s, fwhm), 0.0)
    positive = significance.max(axis=(1, 2))
    negative = -significance.min(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        negative_fraction = np.where(n_good > 0, (good & (s < 0)).sum(axis=(1, 2)) / n_good, np.nan)
        ratio = np.where((negative >= _LOBE_SIGMA) & (positive > 0), negative / positive, 0.0)
        bad_fraction = (core & st.bad).sum(axis=(1, 2)) / core.sum(axis=(1, 2))
    return {"n_bad_pixels": (disc & st.bad).sum(axis=(1, 2)).astype(np.int32), "bad_fraction": bad_fraction,
            "negative_fraction": negative_fraction, "dipole_ratio": ratio}


def _checked(data, weight, flags, x, y, aperture_radii, fit_radius, max_shift):
    data = np.asarray(data)
    if data.ndim != 2:
        raise ValueError(f"data must be a 2-d (ny, nx) image, got shape {data.shape}")
    for name, value in (("weight", weight), ("flags", flags)):
        if value is not None and np.shape(value) != data.shape:
            raise ValueError(f"{name} must have the shape of data {data.shape}, got {np.shape(value)}")
    x = np.atleast_1d(np.asarray(x, dtype=float))
    y = np.atleast_1d(np.asarray(y, dtype=float))
    if x.ndim != 1 or x.shape != y.shape or not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError(f"x and y must be finite 1-d arrays of one length, got shapes {x.shape} "
                         f"and {y.shape}")
    radii = [float(r) for r in np.atleast_1d(aperture_radii)]
    if not all(r > 0 for r in radii):
        raise ValueError(f"aperture_radii must all be > 0, got {radii}")
    if fit_radius is not None and not fit_radius > 0:
        raise ValueError(f"fit_radius must be > 0 or None, got {fit_radius}")
    if not max_shift >= 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    return data, x, y, radii


def _apertures(data, variance, bad, x, y, radii) -> dict[str, np.ndarray]:
    """sep aperture sums and errors at (x, y) for each radius."""
    out = {}
    for i, r in enumerate(radii):
        flux, err, _ = sep.sum_circle(data, x, y, r, var=variance, mask=bad, subpix=5)
        out[f"apflux_{i}"], out[f"apfluxerr_{i}"] = flux, err
    return out


def measure_detections(data: np.ndarray, x: np.ndarray, y: np.ndarray, psf: PSFLike, *,
                       weight: np.ndarray, flags: np.ndarray | None = None,
                       aperture_radii: tuple[float, ...] = (3.0, 5.0, 8.0),
                       fit_radius: float | None = None, max_shift: float = 1.0,
                       mask_flags: int | None = None) -> Table:
    """Measure detections on a difference image (see the module docstring for each quantity).

    Parameters
    ----------
    data : ndarray
        (ny, nx) difference image D, ADU scaled so that a fit of ``psf`` gives the flux in the
        new image's ADU; no background (0 on average).
    x, y : ndarray
        (n,) detection positions, 0-based pixels.
    psf : PixelPSF or callable
        PSF of D (`PSFLike`): a `improc.psf.PixelPSF`, or ``psf(x, y)`` returning an odd square
        stamp of a source at the centre of its central pixel (e.g. ``ZogyResult.psf_at``), all
        of one size.  It is evaluated once per detection and moved to sub-pixel positions by
        Fourier phase shifts (the PSF should be well sampled, FWHM >~ 2.5 pixels).
    weight : ndarray
        (ny, nx) inverse variance of D, 1/ADU**2; pixels <= 0 are not used.
    flags : ndarray or None
        (ny, nx) flag bits of D; pixels with a bit of ``mask_flags`` are not used.
    aperture_radii : sequence of float
        Radii, pixels, of the apertures: columns ``apflux_i``, ``apfluxerr_i``.
    fit_radius : float or None
        Radius, pixels, of the disc fitted and measured; None means 2 FWHM of the PSF.
    max_shift : float
        Largest move of the PSF position from the detection, pixels (0: fixed positions).
    mask_flags : int or None
        Flag bits that make a pixel unusable; None means any bit.

    Returns
    -------
    astropy.table.Table
        One row per detection with the columns of `COLUMNS` plus ``apflux_i, apfluxerr_i``
        (ADU); each column carries its unit and description; ``meta`` holds ``aperture_radii``,
        ``fit_radius`` and ``psf_fwhm`` (pixels).

    Raises
    ------
    ValueError
        If arrays disagree in shape, positions are not finite, an option is out of range, or
        ``psf`` gives stamps that are not square, odd and of one size, or do not sum to > 0.
    """
    data, x, y, radii = _checked(data, weight, flags, x, y, aperture_radii, fit_radius, max_shift)
    mask_flags = int(sum(PixelFlag)) if mask_flags is None else int(mask_flags)
    bad_map = ~(np.asarray(weight) > 0) | ~np.isfinite(data)
    if flags is not None:
        bad_map |= (np.asarray(flags) & mask_flags) != 0
    if isinstance(psf, PixelPSF):
        fwhm = psf.fwhm_pixels
    else:                       # at the median detection (the image centre if there is none)
        cx = np.median(x) if x.size else data.shape[1] / 2
        cy = np.median(y) if y.size else data.shape[0] / 2
        fwhm = _fwhm(_centred_stamps(psf, np.array([cx]), np.array([cy]))[0])
    radius = 2.0 * fwhm if fit_radius is None else float(fit_radius)
    half = int(np.ceil(radius + max_shift + 2 * fwhm)) + 1
    columns = {name: np.full(x.size, np.nan) for name in COLUMNS}
    for start in range(0, x.size, _CHUNK):
        part = slice(start, start + _CHUNK)
        for name, values in _measure_chunk(data, weight, bad_map, psf, x[part], y[part], radius,
                                           max_shift, fwhm, half).items():
            columns[name][part] = values
    # float32 planes: sep reads its pixels as C floats whatever the array's type
    variance = np.divide(np.float32(1.0), weight, out=np.zeros(data.shape, np.float32), where=~bad_map)
    sep_data = np.ascontiguousarray(np.where(bad_map, np.float32(0.0), data), dtype=np.float32)
    columns.update(_apertures(sep_data, variance, bad_map, columns["x_psf"], columns["y_psf"], radii))
    return _table(columns, radii, radius, fwhm)


def static_mismatch_flux(ref: np.ndarray, ref_weight: np.ndarray, ref_flags: np.ndarray, psf: PSFLike,
                         x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The static scene's flux at each detection as a PSF-model mismatch leaves it on D.

    The PSF models of both images are good to a percent or so, and the commonest error is in
    their width.  A width error turns every static source S into a residual on D of S convolved
    with a zero-sum kernel shaped like the PSF's Laplacian, so a PSF fit at a detection picks up
    about ``sum(L S)`` with ``L`` the Laplacian of the PSF: large for a star or a galaxy's cusp,
    small for a smooth galaxy's disc and zero for a flat sky.  This returns ``sum(L R) / sum(L P)``
    over the good pixels of each reference stamp R (the reference on the new image's grid and flux
    scale, centred on the detection's pixel), P being the PSF at the detection's position: a point
    source of P's shape gives its flux; for Gaussians, a source r times P's width gives
    ``(2 / (1 + r^2))^2`` of its flux: 0.16 for a blob twice as broad, 0.46 for a star seen
    through a reference PSF 1.4 times broader, 2.0 through one 1.4 times sharper.  The flux
    error adds a fraction of it (`pipeline.measuring`'s ``static_flux_error``).

    Parameters
    ----------
    ref, ref_weight, ref_flags : numpy.ndarray
        (n, s, s) reference stamps of data (sky-subtracted, new-image ADU), weight and flags, as
        cut by `improc.cutouts.make_cutouts` (odd ``s``); pixels with flags or weight <= 0 are
        not used.
    psf : PixelPSF or callable
        PSF of D (`PSFLike`), evaluated at each (x, y).
    x, y : numpy.ndarray
        (n,) detection positions, 0-based pixels (the stamps' centres are their pixels).

    Returns
    -------
    numpy.ndarray
        (n,) flux in the stamps' units (it can be negative, e.g. in a ring); NaN where no good
        pixel is under the PSF.
    """
    ref = np.asarray(ref, dtype=float)
    if ref.ndim != 3 or ref.shape[1] != ref.shape[2] or ref.shape[1] % 2 == 0:
        raise ValueError(f"ref must be (n, s, s) stamps of odd side, got shape {ref.shape}")
    x, y = np.atleast_1d(np.asarray(x, dtype=float)), np.atleast_1d(np.asarray(y, dtype=float))
    if x.shape != (ref.shape[0],) or y.shape != x.shape:
        raise ValueError(f"need one position per stamp: {ref.shape[0]} stamps, {x.size} and {y.size} positions")
    if x.size == 0:
        return np.zeros(0)
    good = (np.asarray(ref_flags) == 0) & (np.asarray(ref_weight) > 0) & np.isfinite(ref)
    # the PSF at each detection's sub-pixel position on the stamps' grid (far wings beyond the
    # cutout carry no weight worth having), and its 5-point Laplacian (zero beyond the stamp)
    stamps = _ShiftedPSF(psf, x, y, ref.shape[1] // 2).at(x, y)
    padded = np.pad(stamps, ((0, 0), (1, 1), (1, 1)))
    laplacian = (padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
                 - 4.0 * stamps)
    laplacian = np.where(good, laplacian, 0.0)
    norm = np.sum(laplacian * stamps, axis=(1, 2))
    total = np.sum(laplacian * np.where(good, ref, 0.0), axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm < 0, total / norm, np.nan)


def _measure_chunk(data, weight, bad_map, psf, x, y, radius, max_shift, fwhm,
                   half) -> dict[str, np.ndarray]:
    """The columns other than the apertures for a chunk of detections."""
    st = _cut(data, weight, bad_map, x, y, half)
    disc0 = st.disc(x, y, radius)
    shifted = _ShiftedPSF(psf, x, y, half)
    model = shifted.at(x, y)
    flux0, _, _ = _linear_flux(st, model, disc0)
    sign = np.where(np.nan_to_num(flux0) < 0, -1.0, 1.0)
    if max_shift > 0:
        xs, ys = _refine_positions(st, shifted, x, y, model, radius, max_shift)
        model = shifted.at(xs, ys)
    else:
        xs, ys = x, y
    flux, err, chi2 = _linear_flux(st, model, st.disc(xs, ys, radius))
    s = sign[:, None, None] * st.data
    out = {"x": x, "y": y, "x_psf": xs, "y_psf": ys, "flux_psf": flux, "flux_psf_err": err,
           "snr_psf": flux / err, "chi2_psf": chi2, "sign": sign}
    out.update(_shape_columns(st, s, model, xs, ys, fwhm))
    out.update(_pixel_columns(st, s, disc0, st.disc(xs, ys, _CORE_FWHM * fwhm), fwhm))
    return out


def _table(columns: dict[str, np.ndarray], radii: list[float], radius: float, fwhm: float) -> Table:
    table = Table()
    for name, values in columns.items():
        if name in COLUMNS:
            unit, description = COLUMNS[name]
        else:
            i = int(name.rsplit("_", 1)[1])
            kind = "error of the " if name.startswith("apfluxerr") else ""
            unit, description = "adu", f"{kind}flux in a circle of radius {radii[i]} pix at the PSF position"
        dtype = {"sign": np.int8, "n_bad_pixels": np.int32}.get(name, np.float64)
        table[name] = Column(np.asarray(values).astype(dtype), unit=unit or None, description=description)
    table.meta.update(aperture_radii=list(radii), fit_radius=radius, psf_fwhm=fwhm)
    return table


@dataclass(frozen=True, eq=False)
class CutResult:
    """Which detections fail which cuts.

    Attributes
    ----------
    is_bad : ndarray
        (n,) bool, True where any cut failed.
    failed : ndarray
        (n, n_cuts) bool, True where cut ``names[k]`` failed.
    names : tuple of str
        The cut columns, in the order of the mapping given.
    """

    is_bad: np.ndarray
    failed: np.ndarray
    names: tuple[str, ...]

    @property
    def failed_bits(self) -> np.ndarray:
        """(n,) uint64 with bit k set where cut ``names[k]`` failed (for storage)."""
        weights = np.left_shift(np.uint64(1), np.arange(len(self.names), dtype=np.uint64))
        return (self.failed.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)

    def reasons(self, i: int) -> list[str]:
        """Names of the cuts detection ``i`` failed."""
        return [name for name, bad in zip(self.names, self.failed[i]) if bad]


def apply_cuts(measurements: Table | np.ndarray,
               cuts: Mapping[str, tuple[float | None, float | None]]) -> CutResult:
    """Apply thresholds to measurement columns: a value passes if ``min <= value <= max``.

    Parameters
    ----------
    measurements : astropy.table.Table or structured ndarray
        One row per detection, e.g. from `measure_detections`.
    cuts : mapping
        Column name -> (min, max); None for a side without a bound.  A NaN value fails its cut.
        At most 64 cuts.

    Returns
    -------
    CutResult
        ``is_bad``, the failed cuts per detection and their names.

    Raises
    ------
    ValueError
        If a column is missing or not one value per row, a bound is NaN, min > max, or there
        are more than 64 cuts.
    """
    names = tuple(cuts)
    if len(names) > 64:
        raise ValueError(f"at most 64 cuts, got {len(names)}")
    columns = measurements.colnames if isinstance(measurements, Table) else (measurements.dtype.names or ())
    n = len(measurements)
    failed = np.zeros((n, len(names)), bool)
    for k, name in enumerate(names):
        if name not in columns:
            raise ValueError(f"no column {name!r} to cut on; columns: {', '.join(columns)}")
        bounds = cuts[name]
        if len(bounds) != 2:
            raise ValueError(f"cut {name!r} must be (min, max), got {bounds!r}")
        low = -np.inf if bounds[0] is None else float(bounds[0])
        high = np.inf if bounds[1] is None else float(bounds[1])
        if np.isnan(low) or np.isnan(high) or low > high:
            raise ValueError(f"cut {name!r} must have min <= max (None for no bound), got {bounds!r}")
        values = np.asarray(measurements[name], dtype=float)
        if values.shape != (n,):
            raise ValueError(f"column {name!r} must hold one value per row, got shape {values.shape}")
        failed[:, k] = ~((values >= low) & (values <= high))
    return CutResult(is_bad=failed.any(axis=1), failed=failed, names=names)
