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
exact for a well-sampled (band-limited) PSF, FWHM >~ 2.5 pixels.  The phase shift of an odd-sized
stamp is separable and real, so it is applied as two small matrices (`shift_matrices`, the
periodic sinc that the phase ramp is in pixel space): ``S_y @ stamp @ S_x.T``, the same numbers as
the FFTs to rounding, several times faster for one stamp, and a window of the clip costs only its
rows and columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["PixelPSF", "n_terms", "exponents", "monomials", "nearest_pixel", "cut_stamps", "half_maximum_fwhm",
           "shift_matrices", "shifted_stamps", "toeplitz_stack"]


#: Stars whose clips are rendered together (bounds the temporaries of `PixelPSF.get_clips`).
_CLIP_CHUNK = 256


def n_terms(degree: int) -> int:
    """Number of polynomial terms ``(degree + 1) (degree + 2) / 2`` of a model of this degree."""
    return (degree + 1) * (degree + 2) // 2


def exponents(degree: int) -> list[tuple[int, int]]:
    """Exponents (i, j) of the monomials ``u**i v**j`` of a degree, in PSFEx order."""
    return [(i, j) for j in range(degree + 1) for i in range(degree + 1 - j)]


def monomials(u: np.ndarray, v: np.ndarray, degree: int) -> np.ndarray:
    """The monomials ``u**i v**j`` (i + j <= degree) in PSFEx order, shape (n, n_terms)."""
    u = np.atleast_1d(np.asarray(u, dtype=float))
    v = np.atleast_1d(np.asarray(v, dtype=float))
    terms = [u**i * v**j for i, j in exponents(degree)]
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
    ix, iy = np.asarray(ix), np.asarray(iy)
    off = np.arange(-half, half + 1)
    rows = iy[:, None] + off[None, :]
    cols = ix[:, None] + off[None, :]
    # the stamp's pixels on the image: its rows on the image and its columns on the image
    inside = (((rows >= 0) & (rows < shape[0]))[:, :, None] & ((cols >= 0) & (cols < shape[1]))[:, None, :])
    if np.ndim(image) == 0:
        return np.where(inside, float(image), 0.0), inside
    image = np.asarray(image)
    side = 2 * half + 1
    stamps = np.empty((ix.size, side, side))
    whole = (ix >= half) & (ix < shape[1] - half) & (iy >= half) & (iy < shape[0] - half)
    if whole.any():
        # stamps wholly on the image are windows of it: one copy, without (n, side, side) index arrays
        stamps[whole] = sliding_window_view(image, (side, side))[iy[whole] - half, ix[whole] - half]
    if not whole.all():
        cut = ~whole
        values = image[np.clip(rows[cut], 0, shape[0] - 1)[:, :, None], np.clip(cols[cut], 0, shape[1] - 1)[:, None, :]]
        stamps[cut] = np.where(inside[cut], values, 0)
    return stamps, inside


def half_maximum_fwhm(stamp: np.ndarray, *, oversample: int = 15) -> float:
    """FWHM (pixels) of a centred, well-sampled PSF stamp: the diameter of the circle whose area
    is that above half the peak (geometric mean of the axes).

    The stamp is interpolated ``oversample`` times finer (band-limited, by zero-padding its
    spectrum).  Unlike a Gaussian's FWHM from second moments, this does not depend on the wings
    (beyond a few FWHM a Moffat's wings hold most of the second moment, and a noisy model's
    wings can make it anything).

    Parameters
    ----------
    stamp : numpy.ndarray
        (size, size) PSF stamp with an odd ``size``, peaked near its central pixel.
    oversample : int
        Interpolation factor (>= 1).

    Returns
    -------
    float
        The FWHM in pixels of the stamp.

    Raises
    ------
    ValueError
        If the stamp is not an odd square array or ``oversample`` is not >= 1.
    """
    stamp = np.asarray(stamp, dtype=float)
    if stamp.ndim != 2 or stamp.shape[0] != stamp.shape[1] or stamp.shape[0] % 2 == 0:
        raise ValueError(f"stamp must be a (size, size) array with an odd size, got shape {stamp.shape}")
    if not (isinstance(oversample, (int, np.integer)) and oversample >= 1):
        raise ValueError(f"oversample must be an integer >= 1, got {oversample!r}")
    size = stamp.shape[0]
    spectrum = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(stamp)))
    pad = (size * oversample - size) // 2
    fine = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(np.pad(spectrum, pad)))).real
    area = np.count_nonzero(fine > 0.5 * fine.max()) / oversample**2
    return float(2.0 * np.sqrt(area / np.pi))


def shift_matrices(offsets: np.ndarray, size: int, *, window: int | None = None,
                   derivative: bool = False, transposed: bool = False) -> np.ndarray:
    """Real matrices that move an odd-sized stamp by sub-pixel offsets along one axis.

    Moving a stamp of ``size`` pixels by ``d`` with the Fourier phase ramp ``exp(-2 pi i k d /
    size)`` is, in pixel space, the matrix ``S[q, p] = D(q - p - d)`` of the periodic sinc
    (Dirichlet kernel) ``D(t) = (1 + 2 sum_k cos(2 pi k t / size)) / size``, k = 1 .. size // 2;
    for an odd size it is real and exactly the FFT shift.  So a stamp moved by (dx, dy) is
    ``S(dy) @ stamp @ S(dx).T``.

    Parameters
    ----------
    offsets : ndarray
        Shifts in pixels, shape (n,); a positive one moves the content to larger indices.
    size : int
        Odd side of the stamps.
    window : int, optional
        Keep only the output pixels within ``window`` of the centre (``2 window + 1`` rows of
        ``S``); None keeps all.
    derivative : bool
        Return ``dS / d offset`` instead (the derivative of the moved stamp with respect to the
        star's position).
    transposed : bool
        Return ``S.T`` (contiguous), for the right-hand factor.

    Returns
    -------
    ndarray
        (n, m, size), or (n, size, m) if ``transposed``; m = ``2 window + 1`` or ``size``.
    """
    offsets = np.atleast_1d(np.asarray(offsets, dtype=float))
    k = np.arange(1, size // 2 + 1)
    lags = np.arange(-(size - 1), size)       # q - p over the stamp
    ramp = np.exp(-2j * np.pi * np.outer(offsets, k) / size)
    if derivative:
        ramp *= -2j * np.pi * k / size
    # D(lag - d) for every lag: cosines summed as the real part of one small complex product
    kernel = 2.0 * (ramp @ np.exp(2j * np.pi * np.outer(k, lags) / size)).real
    if not derivative:
        kernel += 1.0
    kernel /= size
    c = size // 2
    h = c if window is None else min(int(window), c)
    return toeplitz_stack(kernel, size, rows=slice(c - h, c + h + 1), transposed=transposed)


def toeplitz_stack(kernel: np.ndarray, size: int, *, rows: slice = slice(None),
                   transposed: bool = False) -> np.ndarray:
    """Matrices ``M[i, q, p] = kernel[i, q - p + size - 1]`` (n, size, size) from kernels given
    at the lags q - p = -(size - 1) .. size - 1, shape (n, 2 size - 1); only the rows ``rows``
    (and ``M.T``, contiguous, if ``transposed``)."""
    # each row of M is a reversed window of the kernel and each column a window: strided views,
    # then one contiguous copy, which matrix products need to be fast
    if transposed:
        return np.ascontiguousarray(sliding_window_view(kernel, size, axis=1)[:, ::-1, rows])
    return np.ascontiguousarray(sliding_window_view(kernel[:, ::-1], size, axis=1)[:, ::-1][:, rows])


def shifted_stamps(stamps: np.ndarray, dx: np.ndarray, dy: np.ndarray, *, window: int | None = None,
                   derivatives: bool = False) -> np.ndarray:
    """Odd-sized stamps (n, S, S) moved by (dx, dy) pixels (`shift_matrices`).

    Returns the central ``2 window + 1`` square (all of it for None), shape (n, m, m); with
    ``derivatives``, shape (3, n, m, m): the moved stamps and their derivatives with respect to
    the star's x and y.  The products run in the stamps' floating dtype (float32 stamps: half
    the work, for clips that are stored as float32 anyway).
    """
    size = stamps.shape[-1]
    dtype = stamps.dtype if stamps.dtype in (np.float32, np.float64) else np.float64
    rows_y = shift_matrices(dy, size, window=window).astype(dtype, copy=False)
    cols_x = shift_matrices(dx, size, window=window, transposed=True).astype(dtype, copy=False)
    left = rows_y @ stamps
    if not derivatives:
        return left @ cols_x
    return np.stack([left @ cols_x,
                     left @ shift_matrices(dx, size, window=window, derivative=True, transposed=True).astype(dtype, copy=False),
                     (shift_matrices(dy, size, window=window, derivative=True).astype(dtype, copy=False) @ stamps) @ cols_x])


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

    def stamps_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The model at image positions (x, y), not moved: (n, size, size), each summing to 1."""
        return np.tensordot(self.coefficients(x, y), self.basis, axes=1)

    def get_clips(self, x: np.ndarray, y: np.ndarray, flux: np.ndarray | float = 1.0, *,
                  window: int | None = None, dtype: type = np.float64) -> np.ndarray:
        """Clips (n, size, size) of stars at image positions (x, y); see `get_clip`.

        ``window``: only the central ``2 window + 1`` square of each clip, shape (n, m, m), with
        the values of the whole clip (scaled so that the whole clip sums to ``flux``).
        ``dtype``: np.float64, or np.float32 to move the stamps with float32 products (about
        1e-7 of the peak from the float64 clips, at ~60 % of the time).
        """
        x = np.atleast_1d(np.asarray(x, dtype=float))
        y = np.atleast_1d(np.asarray(y, dtype=float))
        flux = np.broadcast_to(np.asarray(flux, dtype=float), x.shape)
        _, _, dx, dy = nearest_pixel(x, y)
        m = self.size if window is None else 2 * min(int(window), self.size // 2) + 1
        if dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be np.float32 or np.float64, got {dtype!r}")
        clips = np.empty((x.size, m, m), dtype)
        # in chunks: the temporaries stay small (cache-sized, and no fresh pages to fault in)
        for start in range(0, x.size, _CLIP_CHUNK):
            part = slice(start, start + _CLIP_CHUNK)
            stamps = self.stamps_at(x[part], y[part])
            # a move keeps a stamp's sum (every column of a shift matrix sums to 1)
            scale = flux[part] / stamps.sum(axis=(1, 2))
            clips[part] = shifted_stamps(stamps.astype(dtype, copy=False), dx[part], dy[part], window=window)
            clips[part] *= scale[:, None, None]
        return clips

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
        return half_maximum_fwhm(self.image_at(self.x0, self.y0))

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
