"""Transformations from Gaia (G, BP-RP) to an instrument's photometric bands.

A zero point is measured by comparing instrumental magnitudes of stars with the
magnitudes those stars would have in the instrument's band.  Gaia gives G, BP and RP
for every star we match, so each band needs a transformation

    m_band = G + sum_k c_k (BP - RP)^k .

DECam g, r, i, z use the polynomials of R. Zhou (2020) that the Legacy Surveys (DR9, DR10)
calibrate with; they hold for -0.6 < BP - RP < 4.1, so colors are clipped to that range and
a star with no valid color gets the average color 1.4, as the Legacy Surveys do.

Any other band uses the generic fallback ``m_band = G``: the zero point then absorbs the
mean offset and the photometric calibration fits a linear color term against BP - RP.
"""

from __future__ import annotations

import numpy as np

__all__ = ["COLOR_RANGE", "AVERAGE_COLOR", "band_coefficients", "gaia_to_band"]

#: BP - RP range over which the polynomials were fitted.
COLOR_RANGE: tuple[float, float] = (-0.6, 4.1)

#: Color given to a star whose BP - RP is missing.
AVERAGE_COLOR: float = 1.4

# Coefficients c_0, c_1, ... of m_band - G as a polynomial in BP - RP (R. Zhou 2020).
_DECAM: dict[str, tuple[float, ...]] = {
    "g": (-0.1178631039, 0.3650113495, 0.5608615360, -0.2850687702, -1.0243473939,
          1.4378375491, 0.0679401731, -1.1713172509, 0.9107811975, -0.3374324004,
          0.0683946390, -0.0073089582, 0.0003230170),
    "r": (0.1139078673, -0.2868955307, 0.0013196434, 0.1029151074, 0.1196710702,
          -0.3729031390, 0.1859874242, 0.1370162451, -0.1808580848, 0.0803219195,
          -0.0180218196, 0.0020584707, -0.0000953486),
    "i": (0.3396481660, -0.6491867119, -0.3330769819, 0.4381097294, 0.5752125977,
          -1.4746570523, 1.2979140762, -0.6371018151, 0.1948940062, -0.0382055596,
          0.0046907449, -0.0003296841, 0.0000101480),
    "z": (0.4811198057, -0.9990015041, 0.1403990019, 0.2150988888, -0.2917655866,
          0.1326831887, -0.0259205004, 0.0018548776),
}

# The generic fallback: m_band = G.
_GENERIC: tuple[float, ...] = (0.0,)


def band_coefficients(band: str) -> tuple[float, ...]:
    """Polynomial coefficients of ``m_band - G`` in powers of BP - RP.

    Parameters
    ----------
    band : str
        Short band name (``"g"``, ``"r"``, ``"i"``, ``"z"``); DECam's long filter names such as
        ``"r DECam SDSS c0002 6415.0 1480.0"`` are reduced to their first letter.

    Returns
    -------
    tuple of float
        c_0, c_1, ...; ``(0.0,)`` (the generic fallback) for bands without a transformation.
    """
    short = band.strip().split(" ")[0] if band else ""
    return _DECAM.get(short, _GENERIC)


def gaia_to_band(g: np.ndarray, bp: np.ndarray, rp: np.ndarray, band: str) -> np.ndarray:
    """Predicted magnitudes in ``band`` of stars with Gaia magnitudes G, BP and RP.

    Parameters
    ----------
    g, bp, rp : numpy.ndarray
        Gaia mean magnitudes, shape (n,).  NaN BP or RP means "no color".
    band : str
        The instrument band; see `band_coefficients`.

    Returns
    -------
    numpy.ndarray
        Shape (n,) magnitudes; NaN where G is NaN.
    """
    g = np.asarray(g, dtype=float)
    color = np.asarray(bp, dtype=float) - np.asarray(rp, dtype=float)
    color = np.where(np.isfinite(color), color, AVERAGE_COLOR)
    color = np.clip(color, *COLOR_RANGE)
    return g + np.polynomial.polynomial.polyval(color, band_coefficients(band))
