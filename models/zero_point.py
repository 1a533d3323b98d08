"""ZeroPoint: the photometric calibration of an image."""

from __future__ import annotations

import uuid

import numpy as np
import sqlalchemy as sa
from sqlalchemy import ForeignKey, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, TimestampMixin, UUIDMixin

__all__ = ["ZeroPoint"]


class ZeroPoint(UUIDMixin, TimestampMixin, Base):
    """Zero point defined by ``mag = -2.5 log10(adu) + zp`` for PSF fluxes, and aperture corrections.

    ``aper_cors[i]`` is added to the magnitude from aperture ``i`` (radius ``aper_radii[i]``
    pixels) to bring it onto the PSF-flux (total) scale.  ``lim_mag`` is the point-source
    magnitude at the photocal ``limit_snr`` (the image's depth).  Made from the image's sources
    (through their WCS), PSF and background, whose ids it records.

    ``band_transform`` is the instrument's Gaia-to-band transformation the catalog magnitudes
    came from (`improc.color_transforms.BandTransform.as_dict`), None when the instrument has
    none for the band: then ``zp`` and ``color_term`` calibrate ``mag = -2.5 log10(adu) + zp +
    color_term * (BP - RP)`` onto Gaia G, and ``quality_flags`` has BAND_UNCALIBRATED.
    ``calibrators`` lists the stars matched to the catalog, as JSON columns of equal length
    (`calibrator_table`): which calibrate the zero point and which were clipped, with their
    colours and residuals, so that the fit can be seen.
    """

    __tablename__ = "zero_points"
    __table_args__ = (UniqueConstraint("image_id", "wcs_id", "psf_id", "background_id", "provenance_id",
                                       name="uq_zero_points_inputs_prov"),)

    image_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    wcs_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("world_coordinates.id", ondelete="CASCADE"), index=True)
    psf_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("psfs.id", ondelete="CASCADE"), index=True)
    background_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("backgrounds.id", ondelete="CASCADE"),
                                                     index=True)
    provenance_id: Mapped[str] = mapped_column(ForeignKey("provenances.id", ondelete="RESTRICT"), index=True)
    zp: Mapped[float | None] = mapped_column(doc="None when no star calibrates (flag ZP_UNCALIBRATED).")
    dzp: Mapped[float | None]
    color_term: Mapped[float | None]
    num_stars: Mapped[int]
    scatter: Mapped[float | None]
    aper_radii: Mapped[list] = mapped_column(sa.JSON, default=list)
    aper_cors: Mapped[list] = mapped_column(sa.JSON, default=list)
    lim_mag: Mapped[float | None]
    flux_from: Mapped[str] = mapped_column(sa.String(16), default="psf",
                                           doc="psf, or aperture: the zero point rests on the largest "
                                               "aperture (PSF fluxes disagreed with it).")
    quality_flags: Mapped[int] = mapped_column(default=0, doc="models.quality.QualityFlag bits.")
    note: Mapped[str | None] = mapped_column(sa.String(512), default=None,
                                             doc="Why the zero point is what it is, when degraded.")
    band_transform: Mapped[dict | None] = mapped_column(
        sa.JSON, default=None, doc="The Gaia-to-band transformation used (coefficients, color_range, "
                                   "average_color); None: the band has none (BAND_UNCALIBRATED).")
    calibrators: Mapped[dict | None] = mapped_column(
        sa.JSON, default=None, doc="The matched stars as columns: source_row, gaia_source_id, bp_rp, "
                                   "catalog_mag, instrumental_mag, residual, used (None: no calibrator).")

    def __init__(self, *, image=None, wcs=None, psf=None, background=None, **kwargs):
        for name, parent in (("image", image), ("wcs", wcs), ("psf", psf), ("background", background)):
            if parent is not None:
                kwargs.setdefault(f"{name}_id", parent.id)
        super().__init__(**kwargs)

    def __repr__(self) -> str:
        from models.quality import quality_names

        lim = f", limit {self.lim_mag:.2f}" if self.lim_mag is not None else ""
        value = f"zp {self.zp:.4f} +- {self.dzp:.4f}" if self.zp is not None else "no zero point"
        flags = f" [{', '.join(quality_names(self.quality_flags))}]" if self.quality_flags else ""
        return (f"<ZeroPoint of image {str(self.image_id)[:8]}: {value} from {self.num_stars} stars{lim}{flags}, "
                f"prov {self.provenance_id}>")

    @property
    def aper_cor_radii(self) -> list:
        """The pixel radii of the apertures with known corrections (the user guide's name)."""
        return list(self.aper_radii)

    def calibrator_table(self):
        """The stars matched to the catalog (`calibrators`) as an `astropy.table.Table`, one row
        per star (missing values masked); an empty table when none was recorded."""
        from astropy.table import MaskedColumn, Table

        columns = self.calibrators or {}
        table = Table()
        for name, values in columns.items():
            missing = np.array([v is None for v in values], dtype=bool)
            filled = [0 if v is None else v for v in values]
            table[name] = MaskedColumn(filled, mask=missing) if missing.any() else filled
        return table

    def mag(self, flux_adu: np.ndarray, aperture: int | None = None) -> np.ndarray:
        """Calibrated magnitudes of fluxes in ADU (PSF fluxes, or aperture ``aperture``)."""
        flux = np.asarray(flux_adu, dtype=float)
        if self.zp is None:
            return np.full(flux.shape, np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            mag = -2.5 * np.log10(flux) + self.zp
        if aperture is not None:
            mag = mag + self.aper_cors[aperture]
        return np.where(flux > 0, mag, np.nan)
