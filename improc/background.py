"""Sky background and background noise, estimated on a coarse mesh (SExtractor / sep style).

The image is cut into square boxes of ``box_size`` pixels.  In each box sep (the library form of
SExtractor) takes a sigma-clipped mode of the pixel histogram as the sky level and the clipped
standard deviation as the sky noise; the mesh of box values is then median-filtered over
``filter_size`` x ``filter_size`` boxes.  A full-size map is a bicubic spline through the mesh
nodes.  Only the mesh is kept (`BackgroundMesh`): it is small enough to store with an image, and
`BackgroundMesh.counts` / `BackgroundMesh.variance` rebuild the full maps on demand.

sep does not expose its mesh, so `estimate_background` reads the node values back from sep's
full-size maps: sep's map is a fixed linear function of the nodes, ``map = By @ mesh @ Bx.T``,
where ``By`` (ny, ny_mesh) and ``Bx`` (nx, nx_mesh) are the spline bases of `spline_basis`, and
the nodes follow by least squares.  `spline_basis` reproduces sep's ``bkg_line_flt_internal``
and ``makebackspline`` (which are SExtractor's ``backline`` and ``makebackspline``) exactly,
including two quirks that must be kept for the maps to agree:

* a node of mesh column ``i`` sits at pixel ``x = (i + 0.5) * box - 0.5`` but a node of mesh row
  ``j`` at ``y = (j + 0.5) * box`` (sep measures x from pixel centres, y from pixel edges);
* in the back-substitution of the natural-spline solve every second derivative is divided by 6
  after it has been used for its neighbour, so the derivatives are not exactly those of a
  textbook natural spline.  Beyond the outermost nodes the end cubic is extrapolated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import sep
from scipy import ndimage

__all__ = ["BackgroundMesh", "as_image", "estimate_background", "residual_background", "spline_basis"]


def _spline_second_derivatives(n_nodes: int) -> np.ndarray:
    """Matrix ``D`` (n_nodes, n_nodes) with sep's scaled second derivatives ``d = D @ nodes``.

    This is sep's tridiagonal recurrence (natural end conditions, unit node spacing) run on the
    identity matrix; it is linear in the node values, so one matrix describes it.
    """
    values = np.eye(n_nodes)
    deriv = np.zeros((n_nodes, n_nodes))
    if n_nodes < 3:
        return deriv
    u = np.zeros((n_nodes, n_nodes))
    for k in range(1, n_nodes - 1):
        coef = -1.0 / (deriv[k - 1] + 4.0)
        deriv[k] = coef
        u[k] = coef * (u[k - 1] - 6.0 * (values[k + 1] + values[k - 1] - 2.0 * values[k]))
    deriv[n_nodes - 1] = 0.0
    for k in range(n_nodes - 2, 0, -1):
        deriv[k] = (deriv[k] * deriv[k + 1] + u[k]) / 6.0
    return deriv


def spline_basis(n_pixels: int, n_nodes: int, box_size: int, *, pixel_offset: float) -> np.ndarray:
    """Weights (n_pixels, n_nodes) that turn mesh nodes into a map line the way sep does.

    Parameters
    ----------
    n_pixels
        Length of the image axis.
    n_nodes
        Number of mesh nodes along that axis.
    box_size
        Mesh box size in pixels.
    pixel_offset
        0.5 along x and 0.0 along y, to reproduce sep (see the module docstring).

    Returns
    -------
    numpy.ndarray
        ``line = basis @ nodes`` for the spline along one axis.
    """
    if n_nodes == 1:
        return np.ones((n_pixels, 1))
    deriv = _spline_second_derivatives(n_nodes)
    t = (np.arange(n_pixels) + pixel_offset) / box_size - 0.5
    seg = np.clip(np.floor(t).astype(int), 0, n_nodes - 2)
    d = t - seg
    c = 1.0 - d
    basis = (c**3 - c)[:, None] * deriv[seg] + (d**3 - d)[:, None] * deriv[seg + 1]
    rows = np.arange(n_pixels)
    basis[rows, seg] += c
    basis[rows, seg + 1] += d
    return basis


#: Rows of a full-size map computed at a time (float64 temporaries of a few MB).
_MAP_ROWS = 256


def _mesh_shape(shape: tuple[int, int], box_size: int) -> tuple[int, int]:
    return (shape[0] - 1) // box_size + 1, (shape[1] - 1) // box_size + 1


@dataclass(frozen=True, eq=False)
class BackgroundMesh:
    """Sky level and noise on a coarse mesh; rebuilds full-size maps.

    Attributes
    ----------
    level : numpy.ndarray
        (ny_mesh, nx_mesh) sky level at the mesh nodes after median filtering, in image units
        (ADU for a raw image).
    rms : numpy.ndarray
        (ny_mesh, nx_mesh) sky noise (standard deviation per pixel) at the mesh nodes, same units.
    box_size : int
        Side of a mesh box in pixels.
    filter_size : int
        Side, in boxes, of the median filter that was applied to the mesh.
    shape : tuple of int
        (ny, nx) of the image the mesh describes.

    Raises
    ------
    ValueError
        If the mesh shapes do not match ``ceil(shape / box_size)`` or values are not finite.
    """

    level: np.ndarray
    rms: np.ndarray
    box_size: int
    filter_size: int
    shape: tuple[int, int]
    _bases: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        shape = tuple(int(n) for n in self.shape)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"shape must be (ny, nx) with positive sizes, got {self.shape}")
        if int(self.box_size) < 1:
            raise ValueError(f"box_size must be >= 1, got {self.box_size}")
        expected = _mesh_shape(shape, int(self.box_size))
        for name in ("level", "rms"):
            arr = np.array(getattr(self, name), dtype=np.float64)
            if arr.shape != expected:
                raise ValueError(f"{name} must have mesh shape {expected} for image shape {shape} "
                                 f"and box_size {self.box_size}, got {arr.shape}")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"{name} must be finite at every mesh node")
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "box_size", int(self.box_size))
        object.__setattr__(self, "filter_size", int(self.filter_size))

    def _basis(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._bases:
            ny_mesh, nx_mesh = self.level.shape
            self._bases["y"] = spline_basis(self.shape[0], ny_mesh, self.box_size, pixel_offset=0.0)
            self._bases["x"] = spline_basis(self.shape[1], nx_mesh, self.box_size, pixel_offset=0.5)
        return self._bases["y"], self._bases["x"]

    def _full_map(self, mesh: np.ndarray, step: int = 1) -> np.ndarray:
        """``By @ mesh @ Bx.T`` as float32, in blocks of rows (no full-size float64 temporary);
        every ``step``-th row and column only."""
        by, bx = self._basis()
        out = np.empty((by[::step].shape[0], bx[::step].shape[0]), np.float32)
        for rows, block in self._map_blocks(mesh, step):
            out[rows] = block
        return out

    def _map_blocks(self, mesh: np.ndarray, step: int = 1):
        """The rows of `_full_map` block by block: (slice of rows, float32 block), for a caller
        that needs the map only once (the same values, without the full-size plane)."""
        by, bx = self._basis()
        by, bx = by[::step], bx[::step]
        right = np.ascontiguousarray(bx.T)
        for start in range(0, by.shape[0], _MAP_ROWS):
            rows = slice(start, start + _MAP_ROWS)
            yield rows, ((by[rows] @ mesh) @ right).astype(np.float32)

    def counts(self) -> np.ndarray:
        """Full (ny, nx) float32 map of the sky level (bicubic spline through the mesh)."""
        return self._full_map(self.level)

    def rms_map(self) -> np.ndarray:
        """Full (ny, nx) float32 map of the sky noise (standard deviation per pixel)."""
        return self._full_map(self.rms)

    def variance(self) -> np.ndarray:
        """Full (ny, nx) float32 map of the sky variance, the square of `rms_map`."""
        return np.square(self.rms_map())

    @property
    def median_level(self) -> float:
        """Median of the mesh sky levels (sep's ``globalback``)."""
        return float(np.median(self.level))

    @property
    def median_rms(self) -> float:
        """Median of the mesh sky noise values (sep's ``globalrms``)."""
        return float(np.median(self.rms))


def as_image(data: np.ndarray) -> np.ndarray:
    """``data`` as a native-byte-order float32 (ny, nx) array, as sep needs (FITS is big-endian).

    Raises
    ------
    ValueError
        If ``data`` is not 2-D, is empty, or is not real numbers.
    """
    arr = np.asarray(data)
    if arr.ndim != 2:
        raise ValueError(f"data must be a 2-D (ny, nx) array, got {arr.ndim} dimensions")
    if arr.size == 0:
        raise ValueError(f"data is empty, shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"data must be a real numeric array, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _prepared_image(data: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Native float32 copy of ``data`` with bad pixels zeroed, and the bad-pixel mask."""
    image = as_image(data)
    if np.shares_memory(image, np.asarray(data)):
        image = image.copy()  # bad pixels are zeroed below: never in the caller's array
    bad = ~np.isfinite(image)
    if mask is not None:
        mask_arr = np.asarray(mask)
        if mask_arr.shape != image.shape:
            raise ValueError(f"mask shape {mask_arr.shape} does not match data shape {image.shape}")
        bad |= mask_arr.astype(bool)
    if bad.all():
        raise ValueError(f"data has no valid pixel: all {image.size} are NaN, infinite or masked")
    image[bad] = 0.0
    return image, bad


def _nodes_from_map(full: np.ndarray, by: np.ndarray, bx: np.ndarray) -> np.ndarray:
    """Least-squares mesh nodes ``V`` with ``by @ V @ bx.T == full``."""
    rows = np.linalg.pinv(by) @ full.astype(np.float64)   # (ny_mesh, nx)
    return rows @ np.linalg.pinv(bx).T                     # (ny_mesh, nx_mesh)


def estimate_background(data: np.ndarray, *, mask: np.ndarray | None = None, box_size: int = 64,
                        filter_size: int = 3, filter_threshold: float = 0.0) -> BackgroundMesh:
    """Estimate the sky level and noise of an image on a mesh, as SExtractor does.

    Parameters
    ----------
    data
        (ny, nx) image, any real dtype and byte order.  NaN and infinite pixels are ignored
        (treated as masked).
    mask
        (ny, nx) array, True (non-zero) where a pixel must be ignored; None masks nothing.
        Sources need not be masked: the clipped-mode estimator rejects them.
    box_size
        Mesh box side in pixels (SExtractor's BACK_SIZE).  Must not exceed either image side.
    filter_size
        Median-filter size in boxes (BACK_FILTERSIZE); 1 means no filtering.
    filter_threshold
        A box is replaced by the filtered value only if it differs from it by at least this
        much, in image units (BACK_FILTERTHRESH).

    Returns
    -------
    BackgroundMesh
        The filtered mesh; ``.counts()`` and ``.rms_map()`` equal sep's ``Background.back()``
        and ``.rms()`` to float32 precision.

    Raises
    ------
    ValueError
        If ``data`` is not 2-D, is empty or has no valid pixel; if ``mask`` has another shape;
        if ``box_size`` or ``filter_size`` is < 1 or ``box_size`` exceeds an image side.
    """
    image, bad = _prepared_image(data, mask)
    box_size, filter_size = int(box_size), int(filter_size)
    if box_size < 1:
        raise ValueError(f"box_size must be >= 1, got {box_size}")
    if box_size > min(image.shape):
        raise ValueError(f"box_size {box_size} is larger than the image, shape {image.shape}")
    if filter_size < 1:
        raise ValueError(f"filter_size must be >= 1, got {filter_size}")
    bkg = sep.Background(image, mask=bad, bw=box_size, bh=box_size, fw=filter_size, fh=filter_size,
                         fthresh=float(filter_threshold))
    ny_mesh, nx_mesh = _mesh_shape(image.shape, box_size)
    by = spline_basis(image.shape[0], ny_mesh, box_size, pixel_offset=0.0)
    bx = spline_basis(image.shape[1], nx_mesh, box_size, pixel_offset=0.5)
    mesh = BackgroundMesh(level=_nodes_from_map(bkg.back(), by, bx),
                          rms=_nodes_from_map(bkg.rms(), by, bx),
                          box_size=box_size, filter_size=filter_size, shape=image.shape)
    mesh._bases.update(y=by, x=bx)
    return mesh


def _clipped_box_means(values: np.ndarray, usable: np.ndarray, box_size: int, clip_sigma: float,
                       n_iter: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sigma-clipped mean, standard deviation and number of pixels kept in each mesh box."""
    ny, nx = values.shape
    ny_mesh, nx_mesh = _mesh_shape(values.shape, box_size)
    if (ny, nx) == (ny_mesh * box_size, nx_mesh * box_size) and values.dtype == np.float32:
        padded, usable_padded = values, usable      # whole boxes: no padded copy
    else:
        padded = np.full((ny_mesh * box_size, nx_mesh * box_size), np.nan, dtype=np.float32)
        padded[:ny, :nx] = values
        usable_padded = np.zeros(padded.shape, bool)
        usable_padded[:ny, :nx] = usable
    boxes = padded.reshape(ny_mesh, box_size, nx_mesh, box_size).transpose(0, 2, 1, 3)
    boxes = boxes.reshape(ny_mesh * nx_mesh, box_size * box_size)       # a copy
    unusable = ~usable_padded.reshape(ny_mesh, box_size, nx_mesh, box_size).transpose(0, 2, 1, 3)
    boxes[unusable.reshape(boxes.shape)] = np.nan
    del padded, usable_padded, unusable
    boxes.sort(axis=1)       # NaN sort last
    n_finite = np.count_nonzero(np.isfinite(boxes), axis=1)
    centre = _sorted_median(boxes, n_finite)
    spread = 1.4826 * _sorted_median_deviation(boxes, n_finite, centre.astype(np.float32))
    out = np.empty((3, boxes.shape[0]))
    for start in range(0, boxes.shape[0], _CLIP_ROWS):
        rows = slice(start, start + _CLIP_ROWS)
        out[:, rows] = _clip_sorted(boxes[rows], n_finite[rows], centre[rows], spread[rows], clip_sigma, n_iter)
    level, rms, count = out.reshape(3, ny_mesh, nx_mesh)
    return level, rms, count.astype(np.int64)


def _sorted_median(ordered: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Median of the first ``n`` (finite) values of each row of sorted rows; NaN if n = 0."""
    lo = np.take_along_axis(ordered, np.maximum((n - 1) // 2, 0)[:, None], axis=1)[:, 0]
    hi = np.take_along_axis(ordered, np.maximum(n // 2, 0)[:, None], axis=1)[:, 0]
    return np.where(n > 0, 0.5 * (lo.astype(np.float64) + hi), np.nan)


def _sorted_median_deviation(ordered: np.ndarray, n: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Median of ``abs(row - centre)`` (float32) over the first ``n`` values of each sorted row; NaN if n = 0.

    The same values as sorting the deviations and taking `_sorted_median`, without a full-size
    temporary or a second sort: the deviations below the centre, read backwards, and those above
    it are two ascending runs (float32 rounding is symmetric: ``|x - c| == c - x`` for x < c), and
    the k-th smallest of two sorted runs is found by a binary search on how many come from the
    first, for all rows at once.

    Parameters
    ----------
    ordered
        (n_rows, n_values) float32 rows sorted ascending, the first ``n`` values finite.
    n
        (n_rows,) number of finite values of each row.
    centre
        (n_rows,) float32 centres.
    """
    rows = np.flatnonzero(n > 0)
    out = np.full(ordered.shape[0], np.nan)
    if rows.size == 0:
        return out
    # every row has values in the usual case: then no copy of the rows
    data = ordered if rows.size == ordered.shape[0] else ordered[rows]
    count, c = n[rows].astype(np.int64), centre[rows].astype(np.float32)
    index = np.arange(rows.size)
    # below: values < c, whose deviations c - x ascend read backwards from index below - 1
    below = np.minimum(np.count_nonzero(data < c[:, None], axis=1), count)
    above = count - below

    def low(i):     # the i-th smallest deviation of the values below the centre
        return c - data[index, np.clip(below - 1 - i, 0, data.shape[1] - 1)]

    def high(j):    # the j-th smallest deviation of the values at or above the centre
        return data[index, np.clip(below + j, 0, data.shape[1] - 1)] - c

    def kth(k):
        # smallest i (taken from the low run) with low(i) >= high(k - i): then the k + 1 smallest
        # are low(0..i-1) and high(0..k-i), the largest of them the k-th
        lo, hi = np.maximum(0, k + 1 - above), np.minimum(below, k + 1)
        while np.any(lo < hi):
            mid = (lo + hi) // 2
            ok = (mid >= below) | (k - mid < 0) | (low(mid) >= high(k - mid))
            hi, lo = np.where(ok, mid, hi), np.where(ok, lo, mid + 1)
        j = k + 1 - lo
        from_low = np.where(lo > 0, low(lo - 1), -np.inf)
        from_high = np.where(j > 0, high(j - 1), -np.inf)
        return np.maximum(from_low, from_high).astype(np.float32)

    out[rows] = 0.5 * (kth((count - 1) // 2).astype(np.float64) + kth(count // 2))
    return out


#: Mesh boxes clipped together by `_clip_sorted` (two float64 cumulative sums of theirs, a few MB).
_CLIP_ROWS = 32


def _clip_sorted(ordered: np.ndarray, n: np.ndarray, centre: np.ndarray, spread: np.ndarray, clip_sigma: float,
                 n_iter: int) -> np.ndarray:
    """Iterated sigma clip of each sorted row's finite values: the kept ones are a contiguous run.

    Each iteration's mean and standard deviation come from cumulative sums of the row taken
    about its first centre (so the squares do not lose precision to a large sky level), and the
    run's ends from a binary search of all the rows at once: a few lookups per row and iteration
    instead of a pass over the box's pixels, and no Python loop over the boxes.

    Parameters
    ----------
    ordered
        (n_rows, n_values) float32 rows sorted ascending, the first ``n`` values finite.
    n
        (n_rows,) number of finite values of each row.
    centre, spread
        (n_rows,) float64 starting centre and standard deviation (the median and the scaled MAD).
    clip_sigma
        Values further than this many standard deviations from the centre are left out.
    n_iter
        Clipping iterations.

    Returns
    -------
    numpy.ndarray
        (3, n_rows): clipped mean, standard deviation and number of values kept; NaN, NaN, 0 for
        a row without values, or whose centre or spread is not finite, or whose clip keeps none.
    """
    n = np.asarray(n, dtype=np.int64)
    origin = np.asarray(centre, dtype=np.float64)
    centre, spread, count = origin.copy(), np.asarray(spread, dtype=np.float64).copy(), n.copy()
    alive = (n > 0) & np.isfinite(centre) & np.isfinite(spread)
    width = ordered.shape[1]
    shifted = ordered.astype(np.float64)
    shifted -= origin[:, None]
    # prefix sums with a leading 0 column; the NaN tails only reach entries past each row's run
    sums = np.zeros((ordered.shape[0], width + 1))
    squares = np.zeros_like(sums)
    np.cumsum(shifted, axis=1, out=sums[:, 1:])
    np.square(shifted, out=shifted)
    np.cumsum(shifted, axis=1, out=squares[:, 1:])
    del shifted
    index = np.arange(ordered.shape[0])
    for _ in range(n_iter):
        alive &= np.isfinite(centre) & np.isfinite(spread)
        lo = _searchsorted_rows(ordered, n, np.where(alive, centre - clip_sigma * spread, 0.0), right=False)
        hi = _searchsorted_rows(ordered, n, np.where(alive, centre + clip_sigma * spread, 0.0), right=True)
        kept = hi - lo
        alive &= kept > 0
        safe = np.where(alive, kept, 1)
        mean = (sums[index, hi] - sums[index, lo]) / safe
        var = (squares[index, hi] - squares[index, lo]) / safe - mean * mean
        centre = np.where(alive, origin + mean, centre)
        spread = np.where(alive, np.sqrt(np.maximum(var, 0.0)), spread)
        count = np.where(alive, kept, count)
    return np.where(alive, np.stack([centre, spread, count]), np.array([np.nan, np.nan, 0.0])[:, None])


def _searchsorted_rows(ordered: np.ndarray, n: np.ndarray, values: np.ndarray, *, right: bool) -> np.ndarray:
    """``np.searchsorted(ordered[i, :n[i]], values[i], side)`` for every row i at once (a binary
    search in step over the rows; float32 rows compared with float64 values, as numpy does)."""
    lo, hi = np.zeros_like(n), n.copy()
    index = np.arange(ordered.shape[0])
    last = max(ordered.shape[1] - 1, 0)
    while True:
        open_ = lo < hi
        if not open_.any():
            return lo
        mid = (lo + hi) // 2
        value = ordered[index, np.minimum(mid, last)].astype(np.float64)
        after = value <= values if right else value < values       # the answer lies beyond mid
        lo = np.where(open_ & after, mid + 1, lo)
        hi = np.where(open_ & ~after, mid, hi)


def residual_background(residual: np.ndarray, *, mask: np.ndarray | None = None, box_size: int = 128,
                        filter_size: int = 3, clip_sigma: float = 3.0, min_fraction: float = 0.2,
                        smooth_sigma: float = 4.0, structure_sigma: float = 3.0,
                        n_iter: int = 5) -> BackgroundMesh:
    """Sky level left in an image whose sky and sources have been subtracted, on a mesh.

    `estimate_background` takes SExtractor's clipped mode of each box, which the wings of the
    sources in the box raise: in a field of a few thousand stars per 2k x 2k chip by a few
    hundredths of the sky noise, enough to bias faint PSF fluxes, large-aperture fluxes and
    the wings of a PSF model by several tenths of a percent.  Once the sources are modelled,
    what is left after subtracting sky and model is noise, the error of the sky, and whatever
    the model missed (galaxies' extended light, undetected sources).  This function masks the
    latter -- pixels where the residual smoothed by a Gaussian of ``smooth_sigma`` pixels
    exceeds ``structure_sigma`` times its noise, grown by ``2 smooth_sigma`` -- then measures
    the sky error as a sigma-clipped *mean* per box (unbiased for the symmetric residual
    noise), median-filters the mesh like `estimate_background`, and returns it as a mesh
    whose ``counts()`` is the correction to add to the sky.

    Parameters
    ----------
    residual
        (ny, nx) image minus its sky estimate minus a model of its sources.
    mask
        (ny, nx), True for pixels not to use: bad pixels, and pixels where the source model
        is unreliable (e.g. where it exceeds the noise).  Non-finite pixels are not used.
    box_size
        Mesh box side in pixels; must not exceed either image side.
    filter_size
        Median filter over the mesh, in boxes (1 = none).
    clip_sigma
        Pixels further than this from the box's mean, in units of its clipped standard
        deviation, are left out (after a first pass around the median and the MAD).
    min_fraction
        Boxes with fewer usable pixels than this fraction of their area get the median of the
        other boxes before filtering.
    smooth_sigma, structure_sigma
        Scale (pixels) and threshold (in noise units of the smoothed residual) of the mask of
        unmodelled positive structure; ``structure_sigma=inf`` masks nothing.
    n_iter
        Clipping iterations.

    Returns
    -------
    BackgroundMesh
        ``level``: the clipped means (the correction); ``rms``: the clipped standard deviations.

    Raises
    ------
    ValueError
        If ``residual`` is not 2-D or ``mask`` has another shape, if ``box_size`` is < 2 or
        larger than the image, if ``filter_size`` < 1, ``clip_sigma`` or ``smooth_sigma`` <= 0,
        or if no box has enough usable pixels.
    """
    values = np.asarray(residual)
    if not np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float64)
    if values.ndim != 2:
        raise ValueError(f"residual must be a 2-D (ny, nx) array, got {values.ndim} dimensions")
    usable = np.isfinite(values)
    if mask is not None:
        mask_arr = np.asarray(mask)
        if mask_arr.shape != values.shape:
            raise ValueError(f"mask shape {mask_arr.shape} does not match residual shape {values.shape}")
        usable &= ~mask_arr.astype(bool)
    box_size, filter_size = int(box_size), int(filter_size)
    if not 2 <= box_size <= min(values.shape):
        raise ValueError(f"box_size must be in [2, {min(values.shape)}] for an image of shape "
                         f"{values.shape}, got {box_size}")
    if filter_size < 1 or not clip_sigma > 0 or not smooth_sigma > 0:
        raise ValueError(f"need filter_size >= 1, clip_sigma > 0 and smooth_sigma > 0, got "
                         f"{filter_size}, {clip_sigma} and {smooth_sigma}")
    first = _residual_mesh(values, usable, box_size, filter_size, clip_sigma, min_fraction, n_iter)
    if np.isfinite(structure_sigma):
        usable &= ~_structure_mask(values, first, usable, smooth_sigma, structure_sigma)
    return _residual_mesh(values, usable, box_size, filter_size, clip_sigma, min_fraction, n_iter)


def _residual_mesh(values: np.ndarray, usable: np.ndarray, box_size: int, filter_size: int,
                   clip_sigma: float, min_fraction: float, n_iter: int) -> BackgroundMesh:
    """Clipped box means and standard deviations, gaps filled, median-filtered, as a mesh."""
    level, rms, count = _clipped_box_means(values, usable, box_size, clip_sigma, n_iter)
    good = (count >= min_fraction * box_size**2) & np.isfinite(level) & np.isfinite(rms)
    if not good.any():
        raise ValueError(f"no {box_size}-pixel box has {min_fraction:.0%} usable pixels")
    level = np.where(good, level, np.median(level[good]))
    rms = np.where(good, rms, np.median(rms[good]))
    if filter_size > 1:
        level = ndimage.median_filter(level, size=filter_size, mode="nearest")
        rms = ndimage.median_filter(rms, size=filter_size, mode="nearest")
    return BackgroundMesh(level=level, rms=rms, box_size=box_size, filter_size=filter_size,
                          shape=values.shape)


def _structure_mask(values: np.ndarray, mesh: BackgroundMesh, usable: np.ndarray, sigma: float,
                    threshold: float) -> np.ndarray:
    """Pixels near significant positive structure of ``values - mesh.counts()`` (normalized
    convolution; the noise is ``mesh.rms_map()``).

    The smoothing runs on 2 x 2 binned pixels when ``sigma >= 2``: structure a few pixels wide
    survives the binning, the noise of the smoothed map is the same, and it costs 8x less.
    """
    f = 2 if sigma >= 2 else 1
    ny, nx = values.shape
    by, bx = -(-ny // f), -(-nx // f)
    resid = np.zeros((by * f, bx * f), np.float32)       # padded with unusable pixels
    resid[:ny, :nx] = values
    for rows, counts in mesh._map_blocks(mesh.level):    # no full-size map of the sky
        resid[rows, :nx] -= counts
    resid[:ny, :nx][~usable] = 0.0
    resid = _block_means(resid, f)
    # the binned fraction of usable pixels, k / f**2, as _block_means gives it from 0s and 1s
    # (sums of small integers are exact in any order), from the booleans without a float plane
    use = np.zeros((by * f, bx * f), bool)
    use[:ny, :nx] = usable
    use = use.reshape(by, f, bx, f).sum(axis=(1, 3), dtype=np.uint8).astype(np.float32)
    use /= np.float32(f * f)
    weight = ndimage.gaussian_filter(use, sigma / f, truncate=3.0)
    smooth = ndimage.gaussian_filter(resid, sigma / f, truncate=3.0)
    # white noise through a unit-sum Gaussian
    noise = mesh._full_map(mesh.rms, step=f) / (2.0 * np.sqrt(np.pi) * sigma)
    # smooth / weight > threshold * noise where weight > 0.2 (float32 is ample for a threshold)
    found = (weight > 0.2) & (smooth > (threshold * noise) * weight)
    del weight, smooth
    if f > 1:       # back to full columns; the rows are repeated by the dilation
        found = np.repeat(found, f, axis=1)[:, :nx]
    grow = int(np.ceil(2 * sigma))
    return disc_dilation(found, grow, repeat=f, ny=ny)


def _block_means(image: np.ndarray, f: int) -> np.ndarray:
    """Means of the f x f blocks of a float32 image whose sides are multiples of f.

    For f = 2 the sums are ``(a00 + a01) + (a10 + a11)``, the order in which
    ``reshape(..).mean(axis=(1, 3))`` adds them (the same float32 values), from strided views
    at a fifth of the time; other f take that mean.
    """
    ny, nx = image.shape
    if f != 2:
        return image.reshape(ny // f, f, nx // f, f).mean(axis=(1, 3))
    pairs = np.add(image[:, 0::2], image[:, 1::2])       # (a00 + a01) on even rows, (a10 + a11) on odd
    out = np.add(pairs[0::2], pairs[1::2])
    out /= np.float32(4)
    return out


def disc_dilation(found: np.ndarray, radius: float, *, repeat: int = 1, ny: int | None = None) -> np.ndarray:
    """Binary dilation of the last two axes by the disc ``dx^2 + dy^2 <= radius^2``, as rows: the
    OR over row offsets dy of the image dilated along x by the disc's half-width at dy, shifted by
    dy (a few 1-d maximum filters instead of one pass per disc pixel); nothing beyond the edges.

    Parameters
    ----------
    found
        (..., ny', nx) booleans (an image, or a stack of stamps dilated one by one); each row stands
        for ``repeat`` rows of the image dilated.
    radius
        Disc radius in pixels.
    repeat
        Rows of the image per row of ``found`` (the dilation along x runs on ``found``'s rows, 1 /
        ``repeat`` of the work, before they are repeated).
    ny
        Rows of the image (``ny' * repeat`` cropped); default ``ny' * repeat``.

    Returns
    -------
    numpy.ndarray
        (..., ny, nx) booleans: `scipy.ndimage.binary_dilation` by that disc.
    """
    ny = found.shape[-2] * repeat if ny is None else ny
    out = np.zeros(found.shape[:-2] + (ny, found.shape[-1]), bool)
    offsets: dict[int, list[int]] = {}      # row offsets dy by the disc's half-width there
    reach = int(np.floor(radius))
    for dy in range(-reach, reach + 1):
        if abs(dy) >= ny:
            continue
        width = int(np.floor(np.sqrt(max(radius**2 - dy**2, 0.0))))
        while (width + 1) ** 2 + dy**2 <= radius**2:       # the disc's own test, not sqrt's rounding
            width += 1
        while width > 0 and width**2 + dy**2 > radius**2:
            width -= 1
        offsets.setdefault(width, []).append(dy)
    # one half-width at a time: a single dilated plane alive besides ``out``
    for width, dys in offsets.items():
        wide = ndimage.maximum_filter1d(found.view(np.uint8), 2 * width + 1, axis=-1, mode="constant").view(bool)
        if repeat > 1:
            wide = np.repeat(wide, repeat, axis=-2)[..., :ny, :]
        for dy in dys:
            if dy >= 0:
                out[..., dy:, :] |= wide[..., :ny - dy, :]
            else:
                out[..., :ny + dy, :] |= wide[..., -dy:, :]
    return out
