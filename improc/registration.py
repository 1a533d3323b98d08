"""Registration of two images from the sources they share: the shift that their WCSs miss.

When an image's WCS was not fitted to a catalog (no catalog covers the field, or too few of its
stars are on the chip), two images of one field can still be registered to each other: the
sources of one, carried through both WCSs onto the other's pixel grid, fall a constant offset
away from where the other measured them.  `fit_shift` measures that offset from matched sources,
with iterative clipping (proper motions, blends, variables), and states the scatter about it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from improc.matching import match_pixels

__all__ = ["Shift", "fit_shift"]


@dataclass(frozen=True)
class Shift:
    """Offset (``dx``, ``dy``, pixels) to add to predicted positions to reach the measured ones,
    its 1-sigma errors, the per-axis rms of the residuals about it (``rms_x``, ``rms_y``) and the
    number of sources used (``n``, of ``n_matched`` pairs)."""

    dx: float
    dy: float
    dx_err: float
    dy_err: float
    rms_x: float
    rms_y: float
    n: int
    n_matched: int


def fit_shift(x_pred: np.ndarray, y_pred: np.ndarray, x_meas: np.ndarray, y_meas: np.ndarray, *,
              radius: float = 3.0, clip_sigma: float = 3.0, max_iterations: int = 5) -> Shift:
    """The offset between predicted and measured positions of the same sources.

    Parameters
    ----------
    x_pred, y_pred : numpy.ndarray
        (n,) positions of one image's sources predicted on the other's grid (through the WCSs).
    x_meas, y_meas : numpy.ndarray
        (m,) positions the other image measured.
    radius : float
        Pairs within this distance (pixels) match, after removing the median offset of a first
        match within twice the radius.
    clip_sigma : float
        Pairs farther than this many rms from the mean offset are rejected.
    max_iterations : int
        Most rounds of clipping.

    Returns
    -------
    Shift
        ``n`` is 0 (offsets NaN) when nothing matches.
    """
    x_pred, y_pred, x_meas, y_meas = (np.asarray(a, dtype=float) for a in (x_pred, y_pred, x_meas, y_meas))
    nan = float("nan")
    i, j, _ = match_pixels(x_pred, y_pred, x_meas, y_meas, radius=2.0 * radius)
    if i.size == 0:
        return Shift(nan, nan, nan, nan, nan, nan, 0, 0)
    dx0 = float(np.median(x_meas[j] - x_pred[i]))
    dy0 = float(np.median(y_meas[j] - y_pred[i]))
    i, j, _ = match_pixels(x_pred + dx0, y_pred + dy0, x_meas, y_meas, radius=radius)
    if i.size == 0:
        return Shift(nan, nan, nan, nan, nan, nan, 0, 0)
    ddx, ddy = x_meas[j] - x_pred[i], y_meas[j] - y_pred[i]
    use = np.ones(i.size, dtype=bool)
    for _ in range(max_iterations):
        mx, my = float(np.mean(ddx[use])), float(np.mean(ddy[use]))
        r = np.hypot(ddx - mx, ddy - my)
        scale = float(np.sqrt(np.mean(r[use] ** 2))) if use.sum() > 2 else np.inf
        keep = r <= clip_sigma * max(scale, 1e-3)
        if np.array_equal(keep, use) or keep.sum() < 1:
            break
        use = keep
    n = int(use.sum())
    mx, my = float(np.mean(ddx[use])), float(np.mean(ddy[use]))
    rms_x = float(np.std(ddx[use])) if n > 1 else nan
    rms_y = float(np.std(ddy[use])) if n > 1 else nan
    err = np.sqrt(max(n - 1, 1))
    return Shift(mx, my, rms_x / err, rms_y / err, rms_x, rms_y, n, int(i.size))
