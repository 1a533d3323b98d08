"""ZOGY on one tile: the Fourier filters of Zackay, Ofek & Gal-Yam (2016) and one window's products.

`improc.zogy.zogy_subtract` cuts an image pair into windows and calls `tile_filters` with each
window's PSFs and noise, then `subtract_window`; the equations and output conventions are in
the docstring of `improc.zogy`.

Cost.  Per window: the data filters at the window size (two transforms of the PSFs, forward
transforms of N and R, inverse ones of D, S_N and S_R), and the variances of S and D
(``V (x) k^2``) on a grid binned 2 x 2: the binned variance image (each 2 x 2 block's mean
variance) is convolved with the kernel summed over each block's four pixels, and the result,
exact at even pixels for a variance constant over each block, is interpolated bilinearly to the
odd ones.  This is exact on a smooth sky; next to a bright star's core, whose source noise
varies within a block, S_corr's normalization is approximate to a few percent.  The kernels
are computed on a small grid (twice the larger PSF stamp), which holds them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft

__all__ = ["TileFilters", "Window", "tile_bounds", "tile_filters", "read_window", "subtract_window",
           "window_shape", "relative_power", "median_sigma"]

#: Sub-sampling step of the images when taking a median noise.
_NOISE_SAMPLE_STEP = 3


def tile_bounds(shape: tuple[int, int], tile_size: int) -> np.ndarray:
    """Cores of the tiles: the image cut into equal parts of at most ``tile_size`` per side.

    Parameters
    ----------
    shape : tuple of int
        (ny, nx) of the image.
    tile_size : int
        Largest side of a core, pixels.

    Returns
    -------
    numpy.ndarray
        (n_tiles, 4) int ``y0, y1, x0, x1`` (half-open), row-major.
    """
    edges = [np.linspace(0, n, int(np.ceil(n / tile_size)) + 1).round().astype(int) for n in shape]
    return np.array([(y0, y1, x0, x1) for y0, y1 in zip(edges[0][:-1], edges[0][1:])
                     for x0, x1 in zip(edges[1][:-1], edges[1][1:])], dtype=int)


def median_sigma(values: np.ndarray, bad: np.ndarray, *, inverse: bool = False) -> float:
    """Square root of the median of ``values`` (a variance, or with ``inverse`` an inverse
    variance) over the good pixels, sub-sampled; nan if there is none."""
    step = _NOISE_SAMPLE_STEP
    sample = values[::step, ::step][~bad[::step, ::step]]
    if sample.size == 0:
        sample = values[~bad]
    if sample.size == 0:
        return float("nan")
    median = float(np.median(sample))
    return float(np.sqrt(1.0 / median if inverse else median)) if median > 0 else float("nan")


def _cut(image: np.ndarray, y0: int, x0: int, shape: tuple[int, int], fill, dtype) -> np.ndarray:
    """``image[y0:y0+ly, x0:x0+lx]`` as ``dtype``, ``fill`` where the window leaves the image."""
    out = np.full(shape, fill, dtype=dtype)
    ny, nx = image.shape
    sy0, sy1 = max(y0, 0), min(y0 + shape[0], ny)
    sx0, sx1 = max(x0, 0), min(x0 + shape[1], nx)
    if sy1 > sy0 and sx1 > sx0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return out


@dataclass(frozen=True)
class Window:
    """One window of both images: data and variances (0 on bad pixels), the background noise."""

    new: np.ndarray
    ref: np.ndarray
    var_new: np.ndarray
    var_ref: np.ndarray
    sigma_new: float
    sigma_ref: float


def read_window(new: tuple[np.ndarray, np.ndarray], ref: tuple[np.ndarray, np.ndarray],
                bad: np.ndarray, origin: tuple[int, int], shape: tuple[int, int]) -> Window | None:
    """The window of ``shape`` at ``origin`` (y, x; may reach beyond the image, read as bad) of
    both (data, weight) pairs; None if every pixel is bad."""
    bad_w = _cut(bad, *origin, shape, True, bool)
    if bad_w.all():
        return None
    planes = []
    for data, weight in (new, ref):
        values = _cut(data, *origin, shape, 0.0, np.float32)
        values[bad_w] = 0.0
        w = _cut(weight, *origin, shape, 0.0, np.float32)
        planes += [values, np.divide(np.float32(1.0), w, where=~bad_w,
                                     out=np.zeros(shape, np.float32))]
    return Window(new=planes[0], ref=planes[2], var_new=planes[1], var_ref=planes[3],
                  sigma_new=median_sigma(planes[1], bad_w), sigma_ref=median_sigma(planes[3], bad_w))


def window_shape(core: tuple[int, int], margin: int) -> tuple[int, int]:
    """An FFT-friendly even window (ny, nx) >= core + 2 margin whose half is FFT-friendly too."""
    out = []
    for n in core:
        size = int(n) + 2 * int(margin)
        size += size % 2
        while (scipy.fft.next_fast_len(size, real=True) != size
               or scipy.fft.next_fast_len(size // 2, real=True) != size // 2):
            size += 2
        out.append(size)
    return out[0], out[1]


def relative_power(power, shape: tuple[int, int]) -> np.ndarray:
    """``G(fy, fx)`` on the rfft2 grid of ``shape``, normalized to 1 at 0 (ones if None)."""
    fy = scipy.fft.fftfreq(shape[0])[:, None]
    fx = scipy.fft.rfftfreq(shape[1])[None, :]
    if power is None:
        return np.ones((shape[0], fx.size), dtype=np.float32)
    values = np.broadcast_to(np.asarray(power(fy, fx), dtype=float), (shape[0], fx.size))
    if not (np.all(np.isfinite(values)) and np.all(values > 0)):
        raise ValueError("ref_noise_power must be finite and > 0 at every frequency")
    return (values / values[0, 0]).astype(np.float32)


def _wrapped(stamp: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A centred odd stamp in a float32 array of ``shape`` with its centre at [0, 0] (wrapped)."""
    out = np.zeros(shape, dtype=np.float32)
    h = stamp.shape[0] // 2
    out[:h + 1, :h + 1] = stamp[h:, h:]
    out[:h + 1, -h:] = stamp[h:, :h]
    out[-h:, :h + 1] = stamp[:h, h:]
    out[-h:, -h:] = stamp[:h, :h]
    return out


def _rewrapped(kernel: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A kernel wrapped around [0, 0] on its grid, wrapped the same way on a grid of ``shape``.

    Offsets 0 .. ceil(n/2) - 1 of each axis go to the start, the negative ones to the end.
    """
    ly, lx = kernel.shape
    py, px = (ly + 1) // 2, (lx + 1) // 2
    out = np.zeros(shape, dtype=kernel.dtype)
    for src_y, dst_y in ((slice(0, py), slice(0, py)),
                         (slice(py, ly), slice(shape[0] - (ly - py), shape[0]))):
        for src_x, dst_x in ((slice(0, px), slice(0, px)),
                             (slice(px, lx), slice(shape[1] - (lx - px), shape[1]))):
            out[dst_y, dst_x] = kernel[src_y, src_x]
    return out


def _multiplicity(shape: tuple[int, int]) -> np.ndarray:
    """How many full-plane frequencies each rfft2 element stands for (1 or 2)."""
    count = np.full(shape[1] // 2 + 1, 2.0, dtype=np.float32)
    count[0] = 1.0
    if shape[1] % 2 == 0:
        count[-1] = 1.0
    return count[None, :]


def _power_ratio(spectrum: np.ndarray, power: np.ndarray, count: np.ndarray) -> float:
    """``sum |spectrum|^2 power / sum |spectrum|^2`` over the full frequency plane."""
    abs2 = (spectrum.real**2 + spectrum.imag**2) * count
    total = float(abs2.sum(dtype=np.float64))
    return float((abs2 * power).sum(dtype=np.float64)) / total if total > 0 else 1.0


@dataclass(frozen=True)
class _Spectra:
    """Eqs. 13-15, 28, 29 on one frequency grid (rfft2 layout, complex64)."""

    d_new: np.ndarray    # D^ = d_new N^ - d_ref R^
    d_ref: np.ndarray
    k_new: np.ndarray    # S^ = k_new N^ - k_ref R^
    k_ref: np.ndarray
    psf_d: np.ndarray | None    # P_D^


def _spectra(p_new: np.ndarray, p_ref: np.ndarray, shape: tuple[int, int], power: np.ndarray, *,
             flux_ratio: float, a: float, b: float, flux_d: float | None) -> _Spectra:
    """The filters on the rfft2 grid of ``shape`` (F_n = 1, F_r = flux_ratio); P_D^ only if
    ``flux_d`` is given."""
    pn = scipy.fft.rfft2(_wrapped(p_new, shape))
    pr = scipy.fft.rfft2(_wrapped(p_ref, shape))
    abs_pn2 = pn.real**2 + pn.imag**2
    abs_pr2 = pr.real**2 + pr.imag**2
    den = np.float32(a) * abs_pr2 + np.float32(b) * power * abs_pn2
    np.maximum(den, np.float32(1e-30), out=den)
    inv_sqrt = 1.0 / np.sqrt(den)
    fr = np.float32(flux_ratio)
    return _Spectra(d_new=fr * pr * inv_sqrt, d_ref=pn * inv_sqrt,
                    k_new=(fr * fr) * np.conj(pn) * (abs_pr2 / den),
                    k_ref=fr * np.conj(pr) * (abs_pn2 / den),
                    psf_d=None if flux_d is None else (fr / np.float32(flux_d)) * pr * pn * inv_sqrt)


@dataclass(frozen=True)
class TileFilters:
    """What one window needs: its data filters, its variance kernels, P_D and F_D.

    Attributes
    ----------
    data : _Spectra
        Filters on the window's frequency grid.
    var_kernels : tuple of numpy.ndarray
        rfft2 of the block-summed squares of k_n, k_r, d_n, d_r on the binned window grid, the
        reference's already scaled for its coloured noise.
    psf_d : numpy.ndarray
        P_D stamp (size, size), sum 1, centred on the central pixel.
    flux_d : float
        F_D (eq. 15).
    """

    data: _Spectra
    var_kernels: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    psf_d: np.ndarray
    flux_d: float


def tile_filters(p_new: np.ndarray, p_ref: np.ndarray, window: tuple[int, int], *,
                 flux_ratio: float, sigma_new: float, sigma_ref: float,
                 power_window: np.ndarray, power_kernel: np.ndarray, kernel_size: int
                 ) -> TileFilters:
    """The filters of one window from its PSFs (odd stamps summing to 1) and noise levels.

    ``power_window`` and ``power_kernel`` are R's relative noise power G on the rfft2 grids of
    the window and of the (kernel_size, kernel_size) kernel grid (`relative_power`).
    """
    a = sigma_new**2 * flux_ratio**2
    b = sigma_ref**2
    flux_d = flux_ratio / np.sqrt(a + b)
    kw = dict(flux_ratio=flux_ratio, a=a, b=b)
    data = _spectra(p_new, p_ref, window, power_window, flux_d=None, **kw)
    small_shape = (kernel_size, kernel_size)
    small = _spectra(p_new, p_ref, small_shape, power_kernel, flux_d=flux_d, **kw)
    count = _multiplicity(small_shape)
    scales = (1.0, _power_ratio(small.k_ref, power_kernel, count),
              1.0, _power_ratio(small.d_ref, power_kernel, count))
    binned = (window[0] // 2, window[1] // 2)
    kernels = tuple(_binned_square_spectrum(spectrum, small_shape, binned, scale)
                    for spectrum, scale in zip((small.k_new, small.k_ref, small.d_new, small.d_ref),
                                               scales))
    size = max(p_new.shape[0], p_ref.shape[0])
    return TileFilters(data=data, var_kernels=kernels,
                       psf_d=_stamp_of(small.psf_d, small_shape, size), flux_d=float(flux_d))


def _binned_square_spectrum(spectrum: np.ndarray, small_shape: tuple[int, int],
                            binned: tuple[int, int], scale: float) -> np.ndarray:
    """rfft2, on the binned window grid, of ``scale`` times the kernel squared, block-summed.

    With q = k^2 on the fine grid, ``Q(D) = sum_{u, v in {0, 1}} q(2 D - (u, v))``: the weight of
    a 2 x 2 block of variance in the variance of an even pixel.
    """
    kernel = scipy.fft.irfft2(spectrum, s=small_shape)
    kernel *= kernel
    summed = (kernel + np.roll(kernel, 1, axis=0) + np.roll(kernel, 1, axis=1)
              + np.roll(kernel, (1, 1), axis=(0, 1)))[::2, ::2]
    summed *= np.float32(scale)
    return scipy.fft.rfft2(_rewrapped(summed, binned))


def _stamp_of(spectrum: np.ndarray, shape: tuple[int, int], size: int) -> np.ndarray:
    """The centred (size, size) float64 stamp of the real-space image of ``spectrum``, sum 1."""
    image = scipy.fft.irfft2(spectrum, s=shape).astype(float)
    h = size // 2
    stamp = np.roll(image, (h, h), axis=(0, 1))[:size, :size]
    return stamp / stamp.sum()


def _binned(image: np.ndarray) -> np.ndarray:
    """Means of 2 x 2 blocks (even shape)."""
    out = image[0::2, 0::2] + image[1::2, 0::2]
    out += image[0::2, 1::2]
    out += image[1::2, 1::2]
    out *= np.float32(0.25)
    return out


def _upsampled(coarse: np.ndarray) -> np.ndarray:
    """Values at even pixels to every pixel, bilinearly (wrapped at the far edges)."""
    ny, nx = coarse.shape
    out = np.empty((2 * ny, 2 * nx), dtype=coarse.dtype)
    right = np.roll(coarse, -1, axis=1)
    out[0::2, 0::2] = coarse
    out[0::2, 1::2] = 0.5 * (coarse + right)
    out[1::2, :] = 0.5 * (out[0::2, :] + np.roll(out[0::2, :], -1, axis=0))
    return out


def _derivative(image: np.ndarray, axis: int, core: tuple[slice, slice]) -> np.ndarray:
    """4th-order central difference along ``axis`` over ``core`` (at least 2 pixels inside)."""
    (ys, xs) = core
    if axis == 1:
        rows = image[ys]
        return (8.0 * (rows[:, xs.start + 1:xs.stop + 1] - rows[:, xs.start - 1:xs.stop - 1])
                - (rows[:, xs.start + 2:xs.stop + 2] - rows[:, xs.start - 2:xs.stop - 2])) / 12.0
    cols = image[:, xs]
    return (8.0 * (cols[ys.start + 1:ys.stop + 1] - cols[ys.start - 1:ys.stop - 1])
            - (cols[ys.start + 2:ys.stop + 2] - cols[ys.start - 2:ys.stop - 2])) / 12.0


def subtract_window(window: Window, f: TileFilters, astrometric_sigma: tuple[float, float],
                    core: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """D (ADU of N), its weight, S and S_corr over the ``core`` of one window (float32).

    ``core`` lies at least 2 pixels inside the window.
    """
    n, r, var_n, var_r = window.new, window.ref, window.var_new, window.var_ref
    shape = n.shape
    irfft2, rfft2 = scipy.fft.irfft2, scipy.fft.rfft2
    nh, rh = rfft2(n), rfft2(r)
    d = irfft2(f.data.d_new * nh - f.data.d_ref * rh, s=shape)[core]
    sx, sy = astrometric_sigma
    v_ast = None
    if sx > 0 or sy > 0:
        s_new = irfft2(f.data.k_new * nh, s=shape)
        s_ref = irfft2(f.data.k_ref * rh, s=shape)
        score = s_new[core] - s_ref[core]
        v_ast = np.zeros(score.shape, dtype=np.float32)
        for sigma, axis in ((sx, 1), (sy, 0)):
            if sigma > 0:
                v_ast += np.float32(sigma**2) * (_derivative(s_new, axis, core)**2
                                                 + _derivative(s_ref, axis, core)**2)
        del s_new, s_ref
    else:
        score = irfft2(f.data.k_new * nh - f.data.k_ref * rh, s=shape)[core]
    del nh, rh
    binned = (shape[0] // 2, shape[1] // 2)
    vnh, vrh = rfft2(_binned(var_n)), rfft2(_binned(var_r))
    kn, kr, dn, dr = f.var_kernels
    var_s = _upsampled(irfft2(vnh * kn + vrh * kr, s=binned))[core]
    var_d = _upsampled(irfft2(vnh * dn + vrh * dr, s=binned))[core]
    if v_ast is not None:
        var_s += v_ast
    # where every contributing pixel is masked the variances are rounding noise: below 1e-4 of
    # their value on an unmasked sky (sigma^2 times the sum of the squared kernel) S_corr and
    # the weight are 0
    sky_n, sky_r = np.float32(window.sigma_new**2), np.float32(window.sigma_ref**2)
    floor_s = np.float32(1e-4) * (sky_n * kn[0, 0].real + sky_r * kr[0, 0].real)
    floor_d = np.float32(1e-4) * (sky_n * dn[0, 0].real + sky_r * dr[0, 0].real)
    score_corr = np.divide(score, np.sqrt(np.maximum(var_s, floor_s)), where=var_s > floor_s,
                           out=np.zeros(score.shape, np.float32))
    flux_d = np.float32(f.flux_d)
    weight = np.divide(flux_d * flux_d, var_d, where=var_d > floor_d,
                       out=np.zeros(score.shape, np.float32))
    d /= flux_d
    return d, weight, score, score_corr
