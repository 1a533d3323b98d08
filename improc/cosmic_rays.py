"""Cosmic rays in one exposure by Laplacian edge detection (van Dokkum 2001, PASP 113, 1420).

A cosmic ray deposits charge in one pixel or a short track, with edges sharper than any source
seen through the atmosphere and the optics; the PSF smooths every real source over several
pixels.  L.A.Cosmic measures that sharpness with the Laplacian of the image subsampled by two
(so that a one-pixel spike keeps its full contrast), its negative half clipped and binned back:

    L+ = max(2 I - I_y - I_x, 0), averaged over the four pairs of a pixel's up/down and
         left/right neighbours  (the subsampled Laplacian of kernel [[0,-1,0],[-1,4,-1],[0,-1,0]])
    S  = L+ / (2 N)        N the pixel's noise, from the 5 x 5 median of the variance (a cosmic
                           ray's own charge must not raise the noise it is judged against)
    S' = S - M5(S)         a smooth source's Laplacian, which varies slowly, taken out
    F  = M3(I) - M7(M3(I)) fine structure: what a star's core has over its surroundings, which
                           a 3 x 3 median keeps and a one- to three-pixel hit loses

A pixel is hit when ``S' > sigma_clip`` and ``L+ / F > contrast`` (a star's core has F
comparable with L+; the paper's ``f_lim``, ~2 for well-sampled images, up to 5 for
undersampled ones).  The hits' 3 x 3 neighbours join when ``S' > sigma_clip``, and theirs when
``S' > neighbor_fraction * sigma_clip`` (a track's fainter ends); a group that touches a pixel
already known bad (a saturated star's wings, a dead column's neighbours) is left out.  Found
pixels are replaced by the median of their good 5 x 5 neighbours and the search repeats within
4 pixels of them (the reach of the windows below), for tracks whose pixels shield each other,
until it finds nothing new.

Computation.  L+ and a first S with 0.8 of the image's median noise (below nearly every
pixel's noise, so a superset of the hits) are full-frame; the medians are computed only at
those candidates, on windows gathered from the image: a few thousand pixels on a sparse field,
a few percent of a crowded one.
"""

from __future__ import annotations

import warnings

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage

__all__ = ["find_cosmic_rays", "laplacian_plus"]


def laplacian_plus(image: np.ndarray) -> np.ndarray:
    """L+ of L.A.Cosmic: the positive Laplacian of ``image`` subsampled by 2, binned back.

    On the subsampled grid, each of a pixel's four sub-pixels has one neighbour vertically and
    one horizontally outside the pixel (the other two are itself), so its Laplacian
    ``4 v - sum(neighbours)`` is ``2 v - v_vertical - v_horizontal``.  Edges repeat the border.

    Parameters
    ----------
    image : numpy.ndarray
        (ny, nx) image.

    Returns
    -------
    numpy.ndarray
        (ny, nx) float32 L+, >= 0 (a one-pixel spike of height A on a flat image: 2 A).
    """
    padded = np.pad(np.asarray(image, dtype=np.float32), 1, mode="edge")
    return _lplus(padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:])


def _lplus(centre, up, down, left, right) -> np.ndarray:
    twice = 2.0 * centre
    total = np.zeros(np.shape(centre), np.float32)
    term = np.empty_like(total)
    for vertical in (twice - up, twice - down):
        for horizontal in (left, right):
            np.subtract(vertical, horizontal, out=term)
            np.maximum(term, 0.0, out=term)
            total += term
    total *= np.float32(0.25)
    return total


def _lplus_at(padded_image: np.ndarray, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
    """`laplacian_plus` at the pixels, from the image padded by `_padded`."""
    y, x = iy + _PAD, ix + _PAD
    return _lplus(padded_image[y, x], padded_image[y - 1, x], padded_image[y + 1, x],
                  padded_image[y, x - 1], padded_image[y, x + 1])


def _around(iy: np.ndarray, ix: np.ndarray, radius: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The distinct pixels within a (2r+1)^2 box of the given ones, on the image."""
    d = np.arange(-radius, radius + 1)
    y = (iy[:, None, None] + d[None, :, None]).repeat(d.size, axis=2).ravel()
    x = (ix[:, None, None] + d[None, None, :]).repeat(d.size, axis=1).ravel()
    on = (y >= 0) & (y < shape[0]) & (x >= 0) & (x < shape[1])
    flat = np.unique(y[on] * shape[1] + x[on])
    return flat // shape[1], flat % shape[1]


#: Margin of the padded planes windows are cut from (the fine structure's 9 x 9 windows).
_PAD = 4


def _padded(plane: np.ndarray) -> np.ndarray:
    """``plane`` with a `_PAD` margin repeating its border, for `_windows`."""
    return np.pad(plane, _PAD, mode="edge")


def _windows(padded: np.ndarray, iy: np.ndarray, ix: np.ndarray, radius: int) -> np.ndarray:
    """(n, 2r+1, 2r+1) windows centred on the pixels, from a plane padded by `_padded`."""
    side = 2 * radius + 1
    return sliding_window_view(padded, (side, side))[iy + _PAD - radius, ix + _PAD - radius]


def _noise(padded_variance: np.ndarray, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
    """Noise at the pixels: the square root of the 5 x 5 median of the variance."""
    return np.sqrt(np.median(_windows(padded_variance, iy, ix, 2).reshape(len(iy), 25), axis=1))


def _sharpness(padded_lplus: np.ndarray, noise: np.ndarray, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
    """S' at the pixels: (L+ less its 5 x 5 median) over twice the pixel's noise."""
    local = _windows(padded_lplus, iy, ix, 2).reshape(len(iy), 25)
    return (local[:, 12] - np.median(local, axis=1)) / (2.0 * noise)


def _fine_structure(padded_image: np.ndarray, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
    """F = M3(I) - M7(M3(I)) at the pixels, from 9 x 9 windows."""
    window = _windows(padded_image, iy, ix, 4)                            # (n, 9, 9)
    m3 = np.median(sliding_window_view(window, (3, 3), axis=(1, 2)).reshape(len(iy), 7, 7, 9), axis=3)
    return m3[:, 3, 3] - np.median(m3.reshape(len(iy), 49), axis=1)


def find_cosmic_rays(image: np.ndarray, variance: np.ndarray, bad: np.ndarray | None = None, *,
                     sigma_clip: float = 5.0, neighbor_fraction: float = 0.3, contrast: float = 3.0,
                     max_iterations: int = 4) -> np.ndarray:
    """Pixels hit by cosmic rays (L.A.Cosmic; see the module docstring).

    Parameters
    ----------
    image : numpy.ndarray
        (ny, nx) image in ADU, sky included or not.
    variance : numpy.ndarray
        (ny, nx) variance of ``image``, ADU^2, its Poisson term from the image itself (a hit's
        own charge raises it; the 5 x 5 median around each pixel is used).  Not finite or <= 0
        where unknown.
    bad : numpy.ndarray, optional
        (ny, nx) bool, pixels already known bad (saturated, defects): never reported, nor
        any group of sharp pixels touching them (a saturated star's wings, a dead column's
        neighbours).
    sigma_clip : float
        Least S' of a hit, in noise sigma.
    neighbor_fraction : float
        A hit's neighbours of the second ring join above ``neighbor_fraction * sigma_clip``.
    contrast : float
        Least L+ / F of a hit (the paper's ``f_lim``).
    max_iterations : int
        Most searches (each after replacing what the previous found).

    Returns
    -------
    numpy.ndarray
        (ny, nx) bool, True on the pixels hit (``bad`` pixels excluded).

    Raises
    ------
    ValueError
        If the planes are not 2-D of one shape or a threshold is not positive.
    """
    image = np.asarray(image, dtype=np.float32)
    variance = np.asarray(variance, dtype=np.float32)
    if image.ndim != 2 or variance.shape != image.shape:
        raise ValueError(f"image and variance must be 2-D planes of one shape, got {image.shape} and {variance.shape}")
    if bad is None:
        bad = np.zeros(image.shape, bool)
    bad = np.asarray(bad, bool)
    if bad.shape != image.shape:
        raise ValueError(f"bad must have the image's shape {image.shape}, got {bad.shape}")
    if not (sigma_clip > 0 and neighbor_fraction > 0 and contrast > 0 and max_iterations >= 1):
        raise ValueError("sigma_clip, neighbor_fraction and contrast must be > 0, max_iterations >= 1")
    known = np.isfinite(variance) & (variance > 0) & ~bad
    if not known.any():
        return np.zeros(image.shape, bool)
    # unknown variance: the largest known, which makes a pixel hard to call a hit
    variance = _padded(np.where(known, variance, np.float32(np.max(variance[known]))))
    # candidates: S above sigma_clip with 0.8 of the median noise (few pixels are quieter); the
    # median from every 7th pixel
    floor = float(np.sqrt(np.median(variance[_PAD:-_PAD:7, _PAD:-_PAD:7])))
    hits = np.zeros(image.shape, bool)
    rejected = np.zeros(image.shape, bool)
    # a saturated star's wings and a bad column's neighbours have sharp edges against the bad
    # pixels: what touches them is not a cosmic ray (nor trusted anyway)
    near_bad = ndimage.binary_dilation(bad, structure=np.ones((3, 3), bool))
    work = _padded(image)
    lplus = _padded(laplacian_plus(image))
    iy, ix = np.nonzero(lplus[_PAD:-_PAD, _PAD:-_PAD] > 1.6 * sigma_clip * floor)
    masked = _padded(bad)                   # bad pixels and hits: not used to fill a hit
    hit_y, hit_x = np.zeros(0, np.intp), np.zeros(0, np.intp)
    for _ in range(max_iterations):
        fresh = ~(hits[iy, ix] | rejected[iy, ix] | bad[iy, ix])
        iy, ix = iy[fresh], ix[fresh]
        if iy.size == 0:
            break
        noise = _noise(variance, iy, ix)
        keep = _sharpness(lplus, noise, iy, ix) > sigma_clip
        iy, ix, noise = iy[keep], ix[keep], noise[keep]
        fine = np.maximum(_fine_structure(work, iy, ix), 0.01 * noise)
        keep = lplus[iy + _PAD, ix + _PAD] / fine > contrast
        ny_, nx_ = iy[keep], ix[keep]
        if ny_.size == 0:
            break
        new = np.zeros(image.shape, bool)
        new[ny_, nx_] = True
        for threshold in (sigma_clip, neighbor_fraction * sigma_clip):
            gy, gx = _around(ny_, nx_, 1, image.shape)
            free = ~(new[gy, gx] | hits[gy, gx] | bad[gy, gx] | rejected[gy, gx])
            gy, gx = gy[free], gx[free]
            join = _sharpness(lplus, _noise(variance, gy, gx), gy, gx) > threshold if gy.size else np.zeros(0, bool)
            new[gy[join], gx[join]] = True
            ny_, nx_ = np.concatenate([ny_, gy[join]]), np.concatenate([nx_, gx[join]])
        drop = _touching(ny_, nx_, hit_y, hit_x, near_bad)
        if drop.any():
            rejected[ny_[drop], nx_[drop]] = True
            ny_, nx_ = ny_[~drop], nx_[~drop]
        if ny_.size == 0:
            break
        hits[ny_, nx_] = True
        hit_y, hit_x = np.concatenate([hit_y, ny_]), np.concatenate([hit_x, nx_])
        masked[ny_ + _PAD, nx_ + _PAD] = True
        _replace(work, ny_, nx_, masked)
        # only what lies within 4 pixels of a replaced one can change (L+ within 1, its 5 x 5
        # median within 3, the fine structure's 9 x 9 windows within 4): search there again
        uy, ux = _around(ny_, nx_, 1, image.shape)
        lplus[uy + _PAD, ux + _PAD] = _lplus_at(work, uy, ux)
        iy, ix = _around(ny_, nx_, 4, image.shape)
        above = lplus[iy + _PAD, ix + _PAD] > 1.6 * sigma_clip * floor
        iy, ix = iy[above], ix[above]
    return hits


def _touching(iy: np.ndarray, ix: np.ndarray, hit_y: np.ndarray, hit_x: np.ndarray,
              near_bad: np.ndarray) -> np.ndarray:
    """Which of the new pixels (iy, ix) are 8-connected, through new pixels or earlier hits
    (hit_y, hit_x), to a pixel of ``near_bad``: a breadth-first walk over the few pixels involved."""
    width = near_bad.shape[1]
    new_keys = iy.astype(np.int64) * width + ix
    members = set(new_keys.tolist()) | set((hit_y.astype(np.int64) * width + hit_x).tolist())
    seeds = new_keys[near_bad[iy, ix]].tolist()
    reached = set(seeds)
    steps = [dy * width + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    while seeds:
        key = seeds.pop()
        for step in steps:
            other = key + step
            # (the column test keeps a step from wrapping across the image's left or right edge)
            if other in members and other not in reached and abs(other % width - key % width) <= 1:
                reached.add(other)
                seeds.append(other)
    return np.isin(new_keys, np.fromiter(reached, np.int64, len(reached))) if reached else np.zeros(iy.size, bool)


def _replace(padded_image: np.ndarray, iy: np.ndarray, ix: np.ndarray, padded_masked: np.ndarray) -> None:
    """Set pixels of a padded image (in place) to the median of their 5 x 5 pixels not masked
    (the median of the image's sample where none is)."""
    values = _windows(padded_image, iy, ix, 2).reshape(iy.size, 25)
    usable = ~_windows(padded_masked, iy, ix, 2).reshape(iy.size, 25)
    filled = np.where(usable, values, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)        # all masked: the fallback below
        median = np.nanmedian(filled, axis=1)
    if not np.all(np.isfinite(median)):
        median[~np.isfinite(median)] = np.median(padded_image[_PAD:-_PAD:7, _PAD:-_PAD:7])
    padded_image[iy + _PAD, ix + _PAD] = median
