"""Stamps of the new, reference and difference images around detections.

`make_cutouts` cuts, for each position, a ``size`` x ``size`` stamp of the data, weight and
flags of three aligned images (new, ref, sub), vectorized over positions.  The stamp of a
position (x, y) is centred on the pixel that holds it, ``(ix, iy) = (floor(x + 0.5),
floor(y + 0.5))`` (0-based, pixel centres at integers, as in `improc.psf`), so
``stamp[j, i] = image[y0 + j, x0 + i]`` with ``x0 = ix - size // 2`` and ``y0 = iy - size // 2``.

Stamp pixels off the image are padded: data 0 (not NaN: sums, convolutions and scorers stay
finite, and the zero weight says the pixel has no information), weight 0, flags ``NO_DATA``.
The arrays have one leading axis over positions, shape (n, size, size), so that a product can
store the nine planes and the offsets as datasets of one HDF5 file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from improc.flags import FLAGS_DTYPE, PixelFlag

__all__ = ["ImagePlanes", "Stamps", "Cutouts", "cut_planes", "make_cutouts"]

#: Edge stamps cut together (bounds the memory of their index arrays: size**2 * 8 bytes each).
_CHUNK = 4096


class ImagePlanes(NamedTuple):
    """The three (ny, nx) planes of one image: ADU, inverse variance (1/ADU**2), flag bits."""

    data: np.ndarray
    weight: np.ndarray
    flags: np.ndarray


@dataclass(frozen=True, eq=False)
class Stamps:
    """Stamps of one image around n positions.

    Attributes
    ----------
    data : ndarray
        (n, size, size), the image's dtype; 0 off the image.
    weight : ndarray
        (n, size, size), the weight's dtype; 0 off the image.
    flags : ndarray
        (n, size, size) uint16; ``NO_DATA`` is added off the image.
    """

    data: np.ndarray
    weight: np.ndarray
    flags: np.ndarray


@dataclass(frozen=True, eq=False)
class Cutouts:
    """Stamps of the new, reference and difference images around n positions.

    Attributes
    ----------
    new, ref, sub : Stamps
        The stamps of each image, each plane (n, size, size).
    x0, y0 : ndarray
        (n,) int64, image pixel of each stamp's ``[0, 0]``: ``stamp[j, i] = image[y0 + j, x0 + i]``.
    x, y : ndarray
        (n,) float64, the positions asked for (0-based pixels); the stamp's central pixel holds them.
    size : int
        Side of the stamps, pixels (odd).
    """

    new: Stamps
    ref: Stamps
    sub: Stamps
    x0: np.ndarray
    y0: np.ndarray
    x: np.ndarray
    y: np.ndarray
    size: int

    def __len__(self) -> int:
        return int(self.x0.size)


def _checked_planes(name: str, planes) -> ImagePlanes:
    """The (data, weight, flags) of an image as ImagePlanes, checked for shape; ValueError names it."""
    try:
        planes = ImagePlanes(*planes)
    except TypeError:
        raise ValueError(f"{name} must be (data, weight, flags), got {type(planes).__name__}") from None
    shape = np.shape(planes.data)
    if len(shape) != 2:
        raise ValueError(f"{name}.data must be a 2-d (ny, nx) image, got shape {shape}")
    for part in ("weight", "flags"):
        if np.shape(getattr(planes, part)) != shape:
            raise ValueError(f"{name}.{part} must have the shape of {name}.data {shape}, "
                             f"got {np.shape(getattr(planes, part))}")
    return planes


def _checked_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1 or size % 2 == 0:
        raise ValueError(f"size must be a positive odd integer, got {size!r}")
    return int(size)


def _positions(x, y) -> tuple[np.ndarray, np.ndarray]:
    x = np.atleast_1d(np.asarray(x, dtype=float))
    y = np.atleast_1d(np.asarray(y, dtype=float))
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"x and y must be 1-d arrays of one length, got shapes {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("x and y must be finite, found NaN or inf")
    return x, y


def _corners(x: np.ndarray, y: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Image pixel (x0, y0) of the corner of each stamp."""
    half = size // 2
    return (np.floor(x + 0.5).astype(np.int64) - half, np.floor(y + 0.5).astype(np.int64) - half)


def cut_planes(planes: ImagePlanes | tuple, x0: np.ndarray, y0: np.ndarray, size: int) -> Stamps:
    """Stamps (n, size, size) of one image's planes whose corners are at pixels (x0, y0).

    Parameters
    ----------
    planes : ImagePlanes or tuple
        (data, weight, flags) of one (ny, nx) image.
    x0, y0 : ndarray of int
        (n,) image pixel of each stamp's ``[0, 0]``; stamps may extend beyond the image.
    size : int
        Odd side of the stamps.

    Returns
    -------
    Stamps
        The stamps; pixels off the image have data 0, weight 0, flags ``NO_DATA``.

    Raises
    ------
    ValueError
        If the planes disagree in shape or ``size`` is not a positive odd integer.
    """
    planes = _checked_planes("planes", planes)
    size = _checked_size(size)
    x0 = np.atleast_1d(np.asarray(x0, dtype=np.int64))
    y0 = np.atleast_1d(np.asarray(y0, dtype=np.int64))
    arrays = [np.asarray(p) for p in planes[:2]] + [np.asarray(planes.flags).astype(FLAGS_DTYPE, copy=False)]
    ny, nx = arrays[0].shape
    out = [np.zeros((x0.size, size, size), a.dtype) for a in arrays]
    inner = (x0 >= 0) & (y0 >= 0) & (x0 + size <= nx) & (y0 + size <= ny)
    if inner.any():
        for k, a in enumerate(arrays):
            out[k][inner] = sliding_window_view(a, (size, size))[y0[inner], x0[inner]]
    edge = np.flatnonzero(~inner)
    off = np.arange(size)
    for start in range(0, edge.size, _CHUNK):
        idx = edge[start:start + _CHUNK]
        yy = y0[idx, None] + off[None, :]                 # (m, size)
        xx = x0[idx, None] + off[None, :]
        inside = ((yy >= 0) & (yy < ny))[:, :, None] & ((xx >= 0) & (xx < nx))[:, None, :]
        flat = np.clip(yy, 0, ny - 1)[:, :, None] * nx + np.clip(xx, 0, nx - 1)[:, None, :]
        for k, a in enumerate(arrays):
            out[k][idx] = np.where(inside, a.ravel().take(flat), PixelFlag.NO_DATA if k == 2 else 0)
    return Stamps(*out)


def make_cutouts(x: np.ndarray, y: np.ndarray, *, new: ImagePlanes | tuple, ref: ImagePlanes | tuple,
                 sub: ImagePlanes | tuple, size: int = 41) -> Cutouts:
    """Cut new / ref / sub stamps of data, weight and flags around positions.

    Parameters
    ----------
    x, y : ndarray
        (n,) positions, 0-based pixels of the (aligned) images; each stamp is centred on the
        pixel holding its position.
    new, ref, sub : ImagePlanes or tuple
        (data, weight, flags) of the new, reference and difference images, all (ny, nx).
    size : int
        Odd side of the stamps, pixels.

    Returns
    -------
    Cutouts
        Nine (n, size, size) planes, the stamps' corners and the positions.

    Raises
    ------
    ValueError
        If the images disagree in shape, the positions are not finite 1-d arrays of one length,
        or ``size`` is not a positive odd integer.
    """
    x, y = _positions(x, y)
    size = _checked_size(size)
    images = {name: _checked_planes(name, planes) for name, planes in (("new", new), ("ref", ref), ("sub", sub))}
    shapes = {name: np.shape(p.data) for name, p in images.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"new, ref and sub must be aligned images of one shape, got {shapes}")
    x0, y0 = _corners(x, y, size)
    stamps = {name: cut_planes(p, x0, y0, size) for name, p in images.items()}
    return Cutouts(**stamps, x0=x0, y0=y0, x=x, y=y, size=size)
