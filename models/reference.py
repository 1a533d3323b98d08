"""References: calibrated images registered as what new images of a field are compared with.

A `Reference` points at an image (one exposure's, or a coadd) and at the calibration products
of that image it is to be used with -- background, sources, PSF, WCS and zero point, pinned when
the reference is registered, so a reference always means the same pixels, PSF and calibration.
Its provenance (process ``referencing``) has those products' provenances upstream.  It covers
the footprint of its image, in one filter; it may be limited in time (``valid_from_mjd``,
``valid_until_mjd``) and be marked bad (``is_bad``, ``bad_reason``) without being deleted.

`Reference.find_for` is the documented choice of a reference for a new image: among the valid
references of the provenance in the image's filter whose footprint covers at least
``min_overlap`` of the image, the deepest (``lim_mag``), then the sharpest (``fwhm_arcsec``),
then the most recently registered, then by id -- the same answer on every back end.  Several
overlapping references are thus handled by choosing one, always the same one, and
`Reference.candidates_for` lists them all.

The user guide's ``ds.get_reference()`` returns a Reference; it reads like the reference image
(``ref.data``, ``ref.weight``, ``ref.flags``, ``ref.mjd``... are the image's: ``ref.image``),
not aligned with the new image nor scaled to it.
"""

from __future__ import annotations

import uuid

import numpy as np
import sqlalchemy as sa
from sqlalchemy import ForeignKey, Index, UniqueConstraint, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from improc import footprint
from models.base import Base, TimestampMixin, UUIDMixin, session_scope

__all__ = ["Reference"]

_FLOAT = sa.Double


class Reference(UUIDMixin, TimestampMixin, Base):
    """A calibrated image registered as the reference of its footprint and filter."""

    __tablename__ = "refs"
    __table_args__ = (
        UniqueConstraint("image_id", "provenance_id", name="uq_refs_image_prov"),
        Index("ix_refs_filter_dec", "filter", "mindec", "maxdec"),
    )

    provenance_id: Mapped[str] = mapped_column(ForeignKey("provenances.id", ondelete="RESTRICT"), index=True)
    image_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    background_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("backgrounds.id", ondelete="CASCADE"))
    sources_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("source_lists.id", ondelete="CASCADE"))
    psf_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("psfs.id", ondelete="CASCADE"))
    wcs_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("world_coordinates.id", ondelete="CASCADE"))
    zp_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("zero_points.id", ondelete="CASCADE"))
    instrument: Mapped[str] = mapped_column(sa.String(64))
    filter: Mapped[str] = mapped_column(sa.String(64))
    section_id: Mapped[str | None] = mapped_column(sa.String(32), default=None)
    target: Mapped[str | None] = mapped_column(sa.String(256), default=None)
    ra_corner_00: Mapped[float] = mapped_column(_FLOAT, doc="Footprint corners through the fitted WCS, degrees.")
    ra_corner_10: Mapped[float] = mapped_column(_FLOAT)
    ra_corner_11: Mapped[float] = mapped_column(_FLOAT)
    ra_corner_01: Mapped[float] = mapped_column(_FLOAT)
    dec_corner_00: Mapped[float] = mapped_column(_FLOAT)
    dec_corner_10: Mapped[float] = mapped_column(_FLOAT)
    dec_corner_11: Mapped[float] = mapped_column(_FLOAT)
    dec_corner_01: Mapped[float] = mapped_column(_FLOAT)
    minra: Mapped[float] = mapped_column(_FLOAT)
    maxra: Mapped[float] = mapped_column(_FLOAT)
    mindec: Mapped[float] = mapped_column(_FLOAT)
    maxdec: Mapped[float] = mapped_column(_FLOAT)
    lim_mag: Mapped[float | None] = mapped_column(_FLOAT, default=None, doc="Depth of the pinned zero point.")
    fwhm_arcsec: Mapped[float | None] = mapped_column(_FLOAT, default=None, doc="Seeing of the pinned PSF.")
    valid_from_mjd: Mapped[float | None] = mapped_column(_FLOAT, default=None)
    valid_until_mjd: Mapped[float | None] = mapped_column(_FLOAT, default=None)
    is_bad: Mapped[bool] = mapped_column(default=False)
    bad_reason: Mapped[str | None] = mapped_column(sa.String(512), default=None)

    #: Corner column suffixes in polygon order.
    CORNERS = ("00", "10", "11", "01")

    def __repr__(self) -> str:
        bad = f" BAD ({self.bad_reason})" if self.is_bad else ""
        depth = f", limit {self.lim_mag:.2f}" if self.lim_mag is not None else ""
        seeing = f', seeing {self.fwhm_arcsec:.2f}"' if self.fwhm_arcsec is not None else ""
        return (f"<Reference {self.instrument} {self.filter} of image {str(self.image_id)[:8]}{depth}{seeing}"
                f"{bad}, prov {self.provenance_id}>")

    #: Image attributes a Reference passes through (the user guide treats it as the image).
    _IMAGE_ATTRIBUTES = frozenset({"data", "weight", "flags", "wcs", "header", "mjd", "end_mjd", "exp_time",
                                   "nx", "ny", "ra", "dec", "type", "describe", "extra"})

    @property
    def image(self):
        """The reference image (loaded once)."""
        image = self.__dict__.get("_image")
        if image is None:
            from models.context import context_of
            from models.image import Image

            with context_of(self).session() as session:
                image = session.get(Image, self.image_id)
            self.__dict__["_image"] = image
        return image

    def __getattr__(self, name: str):
        if name in Reference._IMAGE_ATTRIBUTES:
            return getattr(self.image, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def valid_at(self, mjd: float) -> bool:
        """Whether the reference applies to an image taken at ``mjd`` (its validity dates)."""
        return ((self.valid_from_mjd is None or self.valid_from_mjd <= mjd)
                and (self.valid_until_mjd is None or mjd <= self.valid_until_mjd))

    @classmethod
    def set_validity(cls, reference_id, *, valid_from_mjd: float | None = None,
                     valid_until_mjd: float | None = None, is_bad: bool | None = None,
                     bad_reason: str | None = None, session: Session | None = None) -> None:
        """Change a stored reference's registration: when it applies, or that it must not be used.

        These are the only columns of a Reference that change after it is saved (like an
        image's badness bits): they say which new images may use it, not what it is.
        """
        values = {k: v for k, v in (("valid_from_mjd", valid_from_mjd), ("valid_until_mjd", valid_until_mjd),
                                    ("is_bad", is_bad), ("bad_reason", bad_reason)) if v is not None}
        if not values:
            return
        with session_scope(session) as sess:
            sess.execute(sa.update(cls).where(cls.id == reference_id).values(**values))

    def set_corners(self, ra: np.ndarray, dec: np.ndarray) -> None:
        """Set the footprint (corners in `CORNERS` order, degrees) and its bounding box."""
        for suffix, r, d in zip(self.CORNERS, ra, dec):
            setattr(self, f"ra_corner_{suffix}", float(r) % 360.0)
            setattr(self, f"dec_corner_{suffix}", float(d))
        minra, maxra, mindec, maxdec = footprint.polygon_bounds(np.asarray(ra), np.asarray(dec))
        self.minra, self.maxra = float(minra[0]), float(maxra[0])
        self.mindec, self.maxdec = float(mindec[0]), float(maxdec[0])

    @property
    def corners(self) -> tuple[np.ndarray, np.ndarray]:
        return (np.array([getattr(self, f"ra_corner_{s}") for s in self.CORNERS]),
                np.array([getattr(self, f"dec_corner_{s}") for s in self.CORNERS]))

    def overlap_with(self, image) -> float:
        """Fraction of ``image``'s footprint that this reference covers."""
        ra, dec = image.corners
        ref_ra, ref_dec = self.corners
        return float(footprint.overlap_fractions(ref_ra[None, :], ref_dec[None, :], ra, dec, of="target")[0])

    @classmethod
    def candidates_for(cls, image, provenance_id: str, *, session: Session | None = None) -> list[Reference]:
        """Valid references of ``provenance_id`` in the image's filter whose box meets its footprint."""
        ra, dec = image.corners
        minra, maxra, mindec, maxdec = (float(v[0]) for v in footprint.polygon_bounds(ra, dec))
        with session_scope(session) as sess:
            rows = sess.scalars(select(cls).where(
                cls.provenance_id == provenance_id, cls.filter == image.filter, cls.is_bad.is_(False),
                cls.mindec <= maxdec, cls.maxdec >= mindec)).all()
        return [r for r in rows if r.valid_at(image.mjd)]

    @classmethod
    def find_for(cls, image, provenance_id: str, *, min_overlap: float = 0.85,
                 session: Session | None = None) -> Reference | None:
        """The reference of ``provenance_id`` for ``image`` (the choice is in the module docstring).

        Returns None when none covers ``min_overlap`` of the image.
        """
        usable = [r for r in cls.candidates_for(image, provenance_id, session=session)
                  if r.image_id != image.id and r.overlap_with(image) >= min_overlap]
        if not usable:
            return None

        def rank(r: Reference):
            return (-(r.lim_mag if r.lim_mag is not None else -np.inf),
                    r.fwhm_arcsec if r.fwhm_arcsec is not None else np.inf,
                    -(r.created_at.timestamp() if r.created_at else 0.0), str(r.id))

        return sorted(usable, key=rank)[0]
