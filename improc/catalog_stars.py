"""Reference-catalog stars at the epoch of an image."""

from __future__ import annotations

import numpy as np
from astropy.time import Time

from improc.astrometry import propagate_proper_motion

__all__ = ["stars_at_epoch", "GAIA_DR3_EPOCH"]

#: Reference epoch of Gaia DR3 positions, Julian years; taken for stars without a ``ref_epoch``.
GAIA_DR3_EPOCH = 2016.0


def stars_at_epoch(ra: np.ndarray, dec: np.ndarray, pmra: np.ndarray, pmdec: np.ndarray,
                   ref_epoch: np.ndarray, *, mjd: float,
                   default_ref_epoch: float = GAIA_DR3_EPOCH) -> tuple[np.ndarray, np.ndarray]:
    """RA and Dec of catalog stars moved by their proper motions to an epoch.

    Parameters
    ----------
    ra, dec : numpy.ndarray
        Shape (n,) catalog positions at ``ref_epoch``, degrees (Gaia's ``ra``, ``dec``).
    pmra, pmdec : numpy.ndarray
        Shape (n,) proper motions, mas/yr, ``pmra`` including cos(dec) (Gaia's ``pmra``,
        ``pmdec``); NaN means none.
    ref_epoch : numpy.ndarray
        Shape (n,) epochs of the positions, Julian years (Gaia's ``ref_epoch``); NaN means
        ``default_ref_epoch``.
    mjd : float
        The wanted epoch, MJD (e.g. an image's).
    default_ref_epoch : float
        Epoch of positions whose ``ref_epoch`` is NaN, Julian years.

    Returns
    -------
    ra, dec : numpy.ndarray
        Shape (n,) positions at ``mjd``, degrees, ra in [0, 360).

    Raises
    ------
    ValueError
        If ``mjd`` or ``default_ref_epoch`` is not finite, or the arrays differ in shape.
    """
    if not np.isfinite(mjd):
        raise ValueError(f"mjd must be finite, got {mjd}")
    if not np.isfinite(default_ref_epoch):
        raise ValueError(f"default_ref_epoch must be finite, got {default_ref_epoch}")
    ra, dec = np.asarray(ra, dtype=float), np.asarray(dec, dtype=float)
    pmra, pmdec = np.asarray(pmra, dtype=float), np.asarray(pmdec, dtype=float)
    ref_epoch = np.asarray(ref_epoch, dtype=float)
    for name, array in (("dec", dec), ("pmra", pmra), ("pmdec", pmdec), ("ref_epoch", ref_epoch)):
        if array.shape != ra.shape:
            raise ValueError(f"{name} must have the shape of ra, {ra.shape}, got {array.shape}")
    epoch = Time(mjd, format="mjd").jyear
    ref_epoch = np.where(np.isfinite(ref_epoch), ref_epoch, default_ref_epoch)
    out_ra, out_dec = np.empty_like(ra), np.empty_like(dec)
    for value in np.unique(ref_epoch):
        sel = ref_epoch == value
        out_ra[sel], out_dec[sel] = propagate_proper_motion(ra[sel], dec[sel], pmra[sel], pmdec[sel],
                                                            from_epoch=float(value), to_epoch=epoch)
    return out_ra, out_dec
