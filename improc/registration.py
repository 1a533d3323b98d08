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

__all__ = ["Shift", "fit_shift", "registration_sigma"]


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


def registration_sigma(x_pred: np.ndarray, y_pred: np.ndarray, x_meas: np.ndarray, y_meas: np.ndarray, *,
                       err_pred: tuple[np.ndarray, np.ndarray], err_meas: tuple[np.ndarray, np.ndarray],
                       radius: float = 1.5, clip_sigma: float = 3.0) -> tuple[float, float, int]:
    """The registration error of two images, per axis, from the sources both measured.

    The residuals ``measured - predicted`` of matched sources, taken about zero (an offset the
    WCSs miss is a registration error too), scatter by the registration error and by both
    centroids' errors; the latter are removed in quadrature:
    ``sigma_x**2 = mean(dx**2) - mean(err_x_pred**2 + err_x_meas**2)`` (>= 0), after clipping
    pairs beyond ``clip_sigma`` times the rms.

    Parameters
    ----------
    x_pred, y_pred : numpy.ndarray
        (n,) one image's sources carried onto the other's grid through both WCSs (moved by any
        fitted shift), pixels.
    x_meas, y_meas : numpy.ndarray
        (m,) the sources the other image measured, pixels.
    err_pred, err_meas : tuple of numpy.ndarray
        (x, y) 1-sigma centroid errors of the (n,) and (m,) sources, pixels.
    radius : float
        Pairs within this distance match, pixels.
    clip_sigma : float
        Pairs farther than this many rms from zero are left out.

    Returns
    -------
    tuple
        ``(sigma_x, sigma_y, n)``: the registration error per axis (pixels; NaN when fewer
        than 3 pairs remain) and the number of pairs used.
    """
    x_pred, y_pred, x_meas, y_meas = (np.asarray(a, dtype=float) for a in (x_pred, y_pred, x_meas, y_meas))
    i, j, _ = match_pixels(x_pred, y_pred, x_meas, y_meas, radius=radius)
    dx, dy = x_meas[j] - x_pred[i], y_meas[j] - y_pred[i]
    var_x = np.asarray(err_pred[0], float)[i] ** 2 + np.asarray(err_meas[0], float)[j] ** 2
    var_y = np.asarray(err_pred[1], float)[i] ** 2 + np.asarray(err_meas[1], float)[j] ** 2
    use = np.isfinite(dx + dy + var_x + var_y)
    for _ in range(5):
        if use.sum() < 3:
            return float("nan"), float("nan"), int(use.sum())
        scale = float(np.sqrt(np.mean(dx[use] ** 2 + dy[use] ** 2)))
        keep = use & (np.hypot(dx, dy) <= clip_sigma * max(scale, 1e-3))
        if np.array_equal(keep, use):
            break
        use = keep
    if use.sum() < 3:
        return float("nan"), float("nan"), int(use.sum())
    sx = float(np.sqrt(max(np.mean(dx[use] ** 2) - np.mean(var_x[use]), 0.0)))
    sy = float(np.sqrt(max(np.mean(dy[use] ** 2) - np.mean(var_y[use]), 0.0)))
    return sx, sy, int(use.sum())
