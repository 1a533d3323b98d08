"""Transformations from Gaia (G, BP-RP) to a camera's photometric bands.

A zero point is measured by comparing instrumental magnitudes of stars with the magnitudes
those stars would have in the camera's band.  Gaia gives G, BP and RP for every star we match,
so each band of each camera needs a transformation

    m_band = G + sum_k c_k (BP - RP)^k ,   for BP - RP within the range it was fitted on.

A transformation belongs to a camera (its filter curves and detector), not to a band's name:
an instrument declares one `BandTransform` per band it can calibrate
(`models.instrument.Instrument.transforms`), and a band without one is calibrated on G with a
fitted colour term and flagged (`improc.photometric_calibration`), never with another camera's.

Published tables that instrument definitions may name (`PUBLISHED_TRANSFORMS`):

- ``decam_zhou2020``: DECam g, r, i, z, the polynomials of R. Zhou (2020) that the Legacy
  Surveys (DR9, DR10) calibrate with; they hold for -0.6 < BP - RP < 4.1, so colours are
  clipped to that range and a star with no valid colour gets the average colour 1.4, as the
  Legacy Surveys do.

A table enters the photometric calibration's provenance by content: `table_digest`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

__all__ = ["BandTransform", "DECAM_ZHOU2020", "PUBLISHED_TRANSFORMS", "gaia_to_band", "table_digest",
           "transform_table"]


@dataclass(frozen=True)
class BandTransform:
    """``m_band = G + sum_k coefficients[k] (BP - RP)^k`` for one band of one camera.

    Parameters
    ----------
    coefficients : tuple of float
        c_0, c_1, ... (mag, mag per mag^k of BP - RP); at least one, all finite.
    color_range : tuple of float
        (bluest, reddest) BP - RP the polynomial was fitted on; colours outside are clipped to it.
    average_color : float
        BP - RP given to a star without one (no BP or RP); inside ``color_range``.

    Raises
    ------
    ValueError
        If a value is out of its range; the message names it.
    """

    coefficients: tuple[float, ...]
    color_range: tuple[float, float]
    average_color: float = 1.4

    def __post_init__(self) -> None:
        coefficients = tuple(float(c) for c in self.coefficients)
        if not coefficients or not all(math.isfinite(c) for c in coefficients):
            raise ValueError(f"coefficients must be one or more finite numbers, got {self.coefficients!r}")
        low, high = (float(v) for v in self.color_range)
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"color_range must be finite (bluest, reddest) with bluest < reddest, "
                             f"got {self.color_range!r}")
        average = float(self.average_color)
        if not low <= average <= high:
            raise ValueError(f"average_color must be in color_range {(low, high)}, got {self.average_color!r}")
        # normalised to plain floats, so that equal tables hash (and compare) equal
        object.__setattr__(self, "coefficients", coefficients)
        object.__setattr__(self, "color_range", (low, high))
        object.__setattr__(self, "average_color", average)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, where: str = "transform") -> BandTransform:
        """Build from ``{coefficients: [...], color_range: [lo, hi], average_color: x}`` (as in a
        YAML instrument definition; ``average_color`` optional).

        Raises
        ------
        ValueError
            Unknown or missing keys, or a value out of range; the message starts with ``where``.
        """
        if not isinstance(values, Mapping):
            raise ValueError(f"{where} must be a mapping with coefficients and color_range, got {values!r}")
        known = {"coefficients", "color_range", "average_color"}
        unknown = sorted(set(values) - known)
        missing = sorted({"coefficients", "color_range"} - set(values))
        if unknown or missing:
            raise ValueError(f"{where}: unknown keys {unknown} / missing keys {missing}; known: {sorted(known)}")
        try:
            return cls(coefficients=tuple(values["coefficients"]), color_range=tuple(values["color_range"]),
                       average_color=values.get("average_color", 1.4))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None

    def as_dict(self) -> dict[str, Any]:
        """The transformation as plain JSON values (what `from_mapping` reads)."""
        return {"coefficients": list(self.coefficients), "color_range": list(self.color_range),
                "average_color": self.average_color}

    def colors(self, bp: np.ndarray, rp: np.ndarray) -> np.ndarray:
        """BP - RP as the polynomial sees it: the average colour where missing, clipped to the range."""
        color = np.asarray(bp, dtype=float) - np.asarray(rp, dtype=float)
        color = np.where(np.isfinite(color), color, self.average_color)
        return np.clip(color, *self.color_range)

    def magnitudes(self, g: np.ndarray, bp: np.ndarray, rp: np.ndarray) -> np.ndarray:
        """Band magnitudes of stars with Gaia G, BP, RP (shape (n,); NaN where G is NaN)."""
        return np.asarray(g, dtype=float) + np.polynomial.polynomial.polyval(self.colors(bp, rp),
                                                                                 self.coefficients)


def gaia_to_band(g: np.ndarray, bp: np.ndarray, rp: np.ndarray, transform: BandTransform) -> np.ndarray:
    """Predicted magnitudes in a band of stars with Gaia magnitudes G, BP and RP.

    Parameters
    ----------
    g, bp, rp : numpy.ndarray
        Gaia mean magnitudes, shape (n,).  NaN BP or RP means "no colour".
    transform : BandTransform
        The camera's transformation for the band.

    Returns
    -------
    numpy.ndarray
        Shape (n,) magnitudes; NaN where G is NaN.
    """
    return transform.magnitudes(g, bp, rp)


def table_digest(table: Mapping[str, BandTransform]) -> str:
    """A content digest of a camera's band -> transformation table (what provenances record).

    Every coefficient, range and average colour of every band enters, in a canonical form: two
    tables with the same numbers give the same digest wherever they were written.

    Returns
    -------
    str
        ``"sha256:"`` and 16 hex digits.
    """
    canonical = json.dumps({band: table[band].as_dict() for band in sorted(table)}, sort_keys=True,
                           separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()[:16]


def transform_table(value: str | Mapping[str, Any] | None, *, where: str = "transforms") -> dict[str, BandTransform]:
    """A band -> `BandTransform` table from an instrument definition's ``transforms`` value.

    Parameters
    ----------
    value : str, mapping or None
        The name of a published table (`PUBLISHED_TRANSFORMS`), or a mapping band ->
        ``{coefficients, color_range, average_color}`` (or `BandTransform`), or None (no table).
    where : str
        Where the value comes from, for error messages.

    Raises
    ------
    ValueError
        An unknown table name, or an invalid band entry; the message names ``where`` and the band.
    """
    if value is None:
        return {}
    if isinstance(value, str):
        if value not in PUBLISHED_TRANSFORMS:
            raise ValueError(f"{where}: unknown published transformation table {value!r}; known: "
                             f"{', '.join(sorted(PUBLISHED_TRANSFORMS))}, or a mapping band -> "
                             "{coefficients, color_range, average_color}")
        return dict(PUBLISHED_TRANSFORMS[value])
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a table name or a mapping band -> transformation, got {value!r}")
    return {str(band): entry if isinstance(entry, BandTransform)
            else BandTransform.from_mapping(entry, where=f"{where}.{band}")
            for band, entry in value.items()}


_ZHOU2020_RANGE = (-0.6, 4.1)

#: DECam g, r, i, z (R. Zhou 2020, as calibrated by the Legacy Surveys DR9 / DR10); read-only.
DECAM_ZHOU2020: Mapping[str, BandTransform] = MappingProxyType({
    "g": BandTransform(coefficients=(
        -0.1178631039, 0.3650113495, 0.5608615360, -0.2850687702, -1.0243473939,
        1.4378375491, 0.0679401731, -1.1713172509, 0.9107811975, -0.3374324004,
        0.0683946390, -0.0073089582, 0.0003230170), color_range=_ZHOU2020_RANGE),
    "r": BandTransform(coefficients=(
        0.1139078673, -0.2868955307, 0.0013196434, 0.1029151074, 0.1196710702,
        -0.3729031390, 0.1859874242, 0.1370162451, -0.1808580848, 0.0803219195,
        -0.0180218196, 0.0020584707, -0.0000953486), color_range=_ZHOU2020_RANGE),
    "i": BandTransform(coefficients=(
        0.3396481660, -0.6491867119, -0.3330769819, 0.4381097294, 0.5752125977,
        -1.4746570523, 1.2979140762, -0.6371018151, 0.1948940062, -0.0382055596,
        0.0046907449, -0.0003296841, 0.0000101480), color_range=_ZHOU2020_RANGE),
    "z": BandTransform(coefficients=(
        0.4811198057, -0.9990015041, 0.1403990019, 0.2150988888, -0.2917655866,
        0.1326831887, -0.0259205004, 0.0018548776), color_range=_ZHOU2020_RANGE),
})

#: Published tables an instrument definition may name (``transforms: decam_zhou2020``).
PUBLISHED_TRANSFORMS: dict[str, Mapping[str, BandTransform]] = {"decam_zhou2020": DECAM_ZHOU2020}
