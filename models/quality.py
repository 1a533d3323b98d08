"""Quality flags of calibration products: how a product was made when the data allowed no better.

A product made the best way the data allow, when that is not the usual way, says so with a
bit of `QualityFlag` in its ``quality_flags`` column (0 = made the usual way) and states an
honest uncertainty; it is not bad (`models.image.ImageBadness` is for images that cannot be used).
"""

from __future__ import annotations

import enum

__all__ = ["QualityFlag", "quality_names"]


class QualityFlag(enum.IntFlag):
    """Bits of ``quality_flags`` on PSF, WorldCoordinates and ZeroPoint rows."""

    WCS_HEADER_CORRECTED = 1   #: 1-3 matched stars: the header WCS shifted (and rotated), not fitted
    WCS_HEADER_ONLY = 2        #: no star matched: the image's own WCS, with a stated uncertainty
    PSF_PARAMETRIC = 4         #: too few stars for a pixel model: a Moffat fitted to the few there are
    PSF_DEFAULT = 8            #: no star to fit: a Moffat of the sources' (or header's) FWHM
    PHOTOMETRY_APERTURE = 16   #: PSF fluxes untrusted: the zero point rests on aperture fluxes
    ZP_FEW_STARS = 32          #: one calibrator: the zero point rests on a single star
    ZP_UNCALIBRATED = 64       #: no calibrator: no zero point (NaN)
    BAND_UNCALIBRATED = 128    #: the instrument has no Gaia transformation for the band: zp of G, colour term fitted


def quality_names(bits: int | None) -> list[str]:
    """Names of the bits set in ``bits``."""
    return [flag.name for flag in QualityFlag if (bits or 0) & flag]
