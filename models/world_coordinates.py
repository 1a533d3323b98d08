"""WorldCoordinates: the astrometric solution of an image, stored as FITS header text."""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from astropy.io import fits
from astropy.wcs import WCS
from sqlalchemy import ForeignKey, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, TimestampMixin, UUIDMixin

__all__ = ["WorldCoordinates"]


class WorldCoordinates(UUIDMixin, TimestampMixin, Base):
    """The astrometric solution of a source list against a reference catalog.

    ``wcs`` gives the astropy WCS (TAN-SIP, or the header WCS corrected by a shift when few stars
    match).  The image keeps the WCS it came with; use this one for sky positions
    (``sources.radec(wcs)``).  ``catalog_excerpt_id`` names the reference stars it was fitted to.
    """

    __tablename__ = "world_coordinates"
    __table_args__ = (UniqueConstraint("sources_id", "provenance_id", name="uq_world_coordinates_sources_prov"),)

    sources_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("source_lists.id", ondelete="CASCADE"), index=True)
    provenance_id: Mapped[str] = mapped_column(ForeignKey("provenances.id", ondelete="RESTRICT"), index=True)
    catalog_excerpt_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("catalog_excerpts.id", ondelete="RESTRICT"), index=True, default=None)
    header_text: Mapped[str] = mapped_column(sa.Text)
    rms_arcsec: Mapped[float | None] = mapped_column(doc="Rms of the matched stars' residuals, arcsec (None: none matched).")
    num_stars: Mapped[int]
    catalog: Mapped[str] = mapped_column(sa.String(64))
    model: Mapped[str] = mapped_column(sa.String(16), default="sip",
                                       doc="sip, tan, shift_rotation, shift (header corrected) or header.")
    uncertainty_arcsec: Mapped[float | None] = mapped_column(
        default=None, doc="Rms over the image of the 1-sigma radial error of a position, arcsec.")
    chi2: Mapped[float | None] = mapped_column(default=None)
    dof: Mapped[int | None] = mapped_column(default=None)
    quality_flags: Mapped[int] = mapped_column(default=0, doc="models.quality.QualityFlag bits.")
    note: Mapped[str | None] = mapped_column(sa.String(512), default=None,
                                             doc="Why the solution is what it is, when degraded.")

    def __init__(self, *, wcs: WCS | None = None, sources=None, **kwargs):
        if wcs is not None:
            kwargs.setdefault("header_text", wcs.to_header(relax=True).tostring(sep="\n"))
        if sources is not None:
            kwargs.setdefault("sources_id", sources.id)
        super().__init__(**kwargs)

    def __repr__(self) -> str:
        from models.quality import quality_names

        flags = f" [{', '.join(quality_names(self.quality_flags))}]" if self.quality_flags else ""
        error = f" +- {self.uncertainty_arcsec:.3f}\"" if self.uncertainty_arcsec is not None else ""
        return (f"<WorldCoordinates of sources {str(self.sources_id)[:8]}: {self.model}{error}, rms "
                f"{self.rms_arcsec:.3f}\" from {self.num_stars} {self.catalog} stars{flags}, prov "
                f"{self.provenance_id}>")

    @property
    def wcs(self) -> WCS:
        """The solution as an astropy WCS (with SIP distortion when fitted)."""
        return WCS(fits.Header.fromstring(self.header_text, sep="\n"))
