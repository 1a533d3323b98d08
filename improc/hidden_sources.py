"""Sources that a first detection missed: too faint for it, or hidden next to brighter ones.

SExtractor's deblending (sep) keeps a faint peak on a bright neighbour's wing only if it holds
a ``deblend_cont`` fraction of the whole blend, so a star a few FWHM from one a hundred times
brighter is lost; and a first pass run at a conservative threshold misses the faint sources.
`find_hidden_sources` looks for both on the image minus a model of the sources already found
(typically their PSF models), away from extended sources, as DAOPHOT's second pass does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import sep
from astropy.table import Table
from scipy.spatial import cKDTree

from improc.extraction import SourceFlag, extract_sources

__all__ = ["find_hidden_sources"]


def find_hidden_sources(data: np.ndarray, model: np.ndarray, known_x: np.ndarray, known_y: np.ndarray, *,
                        point_like: np.ndarray, extent: np.ndarray, background: np.ndarray | float,
                        variance: np.ndarray | float, min_separation: float,
                        max_separation: float | None,
                        point_fwhm: float, aperture_radii: Sequence[float], gain: float | None = None,
                        model_error: float = 0.02, fwhm_tolerance: float = 0.3,
                        **detection: object) -> Table:
    """Sources that the first detection missed: too faint, or merged into a brighter neighbour.

    The known sources are subtracted (``model``, e.g. their PSF models) and `extract_sources`
    runs on what is left (with the ``detection`` options, e.g. a matched filter), within
    ``max_separation`` of a known point source if given (to look only for neighbours hidden
    in their light), and not within the ``extent`` of a known extended source (a PSF cannot
    model it, and its residual would break into spurious pieces).  The noise adds the sources' Poisson noise and a
    ``model_error`` fraction of the model (its imperfection near bright cores), so that the
    residuals of the subtracted sources are not detected.  Detections closer than
    ``min_separation`` to a known source are dropped (residuals of that source, or a blend
    already measured as one), and so are those whose size (``fwhm``, twice the half-light
    radius) is not within ``fwhm_tolerance`` of ``point_fwhm`` (the sharp or shapeless
    residuals of an imperfect model); the others get the `SourceFlag.RESIDUAL` flag.

    Parameters
    ----------
    data
        (ny, nx) image, not background-subtracted.
    model
        (ny, nx) model of the known sources (e.g. PSF models of them all), background-subtracted
        units.
    known_x, known_y
        Positions of all the known sources, 0-based pixels.
    point_like
        Bool, shape of ``known_x``: which known sources are point sources.
    extent
        Shape of ``known_x``: radius (pixels) of a disc covering each source's footprint, e.g.
        twice ``sqrt(npix / pi)``.
    background, gain
        As for `extract_sources`.
    variance
        Background (sky and read) variance, scalar or (ny, nx).
    min_separation, max_separation
        Pixels, e.g. 2 and 5 FWHM; ``max_separation`` None searches the whole image.
    point_fwhm
        Size (``fwhm`` column of `extract_sources`) of the point sources, pixels.
    aperture_radii
        Radii of the apertures measured (on the residual image), pixels.
    model_error
        Fractional error of ``model`` added to the detection noise.
    fwhm_tolerance
        Largest fractional difference of a new source's size from ``point_fwhm``.
    **detection
        Other options of `extract_sources` (threshold, minarea, filter_type, saturation, mask...).

    Returns
    -------
    astropy.table.Table
        The new sources, with the columns of `extract_sources` measured on ``data - model``;
        a table without columns if there is nowhere to search.

    Raises
    ------
    ValueError
        As `extract_sources`, or if ``model`` has another shape than ``data`` or ``point_like``
        another length than ``known_x``.
    """
    data = np.asarray(data)
    model = np.asarray(model, dtype=float)
    known = np.column_stack([np.asarray(known_x, float), np.asarray(known_y, float)])
    point_like = np.asarray(point_like, dtype=bool)
    extent = np.nan_to_num(np.asarray(extent, dtype=float))
    if model.shape != data.shape:
        raise ValueError(f"model must have the data shape {data.shape}, got {model.shape}")
    if point_like.shape != (len(known),) or extent.shape != (len(known),):
        raise ValueError(f"point_like and extent must have the length of known_x, {len(known)}, got "
                         f"{point_like.shape} and {extent.shape}")
    outside = (np.zeros(data.shape, dtype=bool) if max_separation is None
               else ~_within(data.shape, known[point_like], max_separation))
    for (x, y), radius in zip(known[~point_like], extent[~point_like]):
        _paint_disc(outside, x, y, radius)
    mask = detection.pop("mask", None)
    mask = outside if mask is None else (np.asarray(mask, bool) | outside)
    if mask.all():
        return Table()
    model = model.astype(np.float32)       # float32 temporaries: ample for a noise map
    noise = np.square(model_error * model)
    if gain is not None:
        noise += np.clip(model, 0.0, None) / np.float32(gain)
    noise += np.asarray(variance, dtype=np.float32)
    np.sqrt(noise, out=noise)
    # where the model itself is noisy (the far wings of a PSF fitted to few stars, scaled by a
    # very bright star), the residual's own local scatter is the noise to beat
    residual = np.asarray(data, dtype=np.float32) - model
    del model
    box = int(min(32, *data.shape))
    local = sep.Background(np.ascontiguousarray(residual - np.asarray(background, np.float32)),
                           mask=mask, bw=box, bh=box, fw=3, fh=3).rms()
    noise = np.maximum(noise, local)
    found = extract_sources(residual, background=background, noise=noise, gain=gain, mask=mask,
                            aperture_radii=aperture_radii, **detection)
    if len(found) and len(known):
        distance, _ = cKDTree(known).query(np.column_stack([found["x"], found["y"]]))
        point_sized = np.abs(np.asarray(found["fwhm"], float) / point_fwhm - 1.0) <= fwhm_tolerance
        found = found[(distance >= min_separation) & point_sized]
    found["flags"] |= int(SourceFlag.RESIDUAL)
    return found


def _paint_disc(image: np.ndarray, x: float, y: float, radius: float) -> None:
    """Set to True the pixels of a bool image within ``radius`` of (x, y)."""
    ny, nx = image.shape
    x0, x1 = max(int(np.floor(x - radius)), 0), min(int(np.ceil(x + radius)) + 1, nx)
    y0, y1 = max(int(np.floor(y - radius)), 0), min(int(np.ceil(y + radius)) + 1, ny)
    if x0 < x1 and y0 < y1:
        yy, xx = np.mgrid[y0:y1, x0:x1]
        image[y0:y1, x0:x1] |= (xx - x) ** 2 + (yy - y) ** 2 <= radius**2


def _within(shape: tuple[int, int], points: np.ndarray, radius: float) -> np.ndarray:
    """(ny, nx) bool: pixels within ``radius`` of one of the (x, y) points."""
    within = np.zeros(shape, dtype=bool)
    ix = np.rint(points[:, 0]).astype(int) if len(points) else np.zeros(0, int)
    iy = np.rint(points[:, 1]).astype(int) if len(points) else np.zeros(0, int)
    on = (ix >= 0) & (ix < shape[1]) & (iy >= 0) & (iy < shape[0])
    for x, y in zip(ix[on], iy[on]):      # discs around the nearest pixels, as a distance transform
        _paint_disc(within, x, y, radius)
    return within
