"""Measurements of the detections on a difference image, and the set they belong to.

A `MeasurementSet` is the product of measuring one image's cutouts: its `Measurements`, one row
per detection kept (detections dropped by the measurement cuts are not stored; those kept but
failing a softer cut have ``is_bad``).  The user guide's names, verbatim::

    ms = ds.get_measurement_set()
    for m in ms.measurements:
        m.flux_psf, m.flux_psf_err, m.x, m.y
        m.new_data, m.new_weight, m.new_flags      # stamps, loaded from the cutouts on first use
        m.ref_data, m.ref_weight, m.ref_flags
        m.sub_data, m.sub_weight, m.sub_flags

``m.get_data_from_cutouts(cutouts, detections)`` fills the stamps from products in hand (saves
a database look-up).  Fluxes are in the new image's ADU (a PSF fit on the difference image);
``mag_psf`` uses the new image's zero point.
"""

from __future__ import annotations

import uuid

import numpy as np
import sqlalchemy as sa
from sqlalchemy import ForeignKey, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from models.base import Base, TimestampMixin, UUIDMixin

__all__ = ["MeasurementSet", "Measurements"]

#: The Cutouts last read for measurements' stamps (their files are read once, not per measurement).
_RECENT_CUTOUTS: dict = {}

_STAMP_ATTRIBUTES = tuple(f"{image}_{plane}" for image in ("new", "ref", "sub")
                          for plane in ("data", "weight", "flags"))


class MeasurementSet(UUIDMixin, TimestampMixin, Base):
    """The measurements made on one image's cutouts (``measurements``, in detection order)."""

    __tablename__ = "measurement_sets"
    __table_args__ = (UniqueConstraint("cutouts_id", "provenance_id", name="uq_measurement_sets_cutouts_prov"),)

    cutouts_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("cutouts.id", ondelete="CASCADE"), index=True)
    provenance_id: Mapped[str] = mapped_column(ForeignKey("provenances.id", ondelete="RESTRICT"), index=True)
    num_detections: Mapped[int] = mapped_column(doc="Detections measured (kept or not).")
    num_kept: Mapped[int] = mapped_column(doc="Measurements stored (the others failed a dropping cut).")
    num_bad: Mapped[int] = mapped_column(default=0, doc="Stored measurements marked is_bad.")
    aper_radii: Mapped[list] = mapped_column(sa.JSON, default=list, doc="Aperture radii, pixels.")
    measurements: Mapped[list[Measurements]] = relationship(
        back_populates="measurement_set", cascade="all, delete-orphan", lazy="selectin",
        order_by="Measurements.index_in_sources")

    def __init__(self, *, cutouts=None, **kwargs):
        if cutouts is not None:
            kwargs.setdefault("cutouts_id", cutouts.id)
        super().__init__(**kwargs)
        self._cutouts = cutouts

    @sa.orm.reconstructor
    def _init_on_load(self) -> None:
        self._cutouts = None

    def __repr__(self) -> str:
        return (f"<MeasurementSet of cutouts {str(self.cutouts_id)[:8]}: {self.num_kept} of {self.num_detections} "
                f"detections kept, {self.num_bad} bad, prov {self.provenance_id}>")

    def cutouts(self):
        """The Cutouts the measurements were made on (loaded once)."""
        if self._cutouts is None:
            from models.context import context_of
            from models.cutouts import Cutouts

            with context_of(self).session() as session:
                self._cutouts = session.get(Cutouts, self.cutouts_id)
        return self._cutouts


class Measurements(UUIDMixin, Base):
    """One detection's measurements on the difference image (columns in `improc.measurements`)."""

    __tablename__ = "measurements"
    __table_args__ = (UniqueConstraint("measurement_set_id", "index_in_sources",
                                       name="uq_measurements_set_index"),)

    measurement_set_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("measurement_sets.id", ondelete="CASCADE"),
                                                          index=True)
    index_in_sources: Mapped[int] = mapped_column(doc="Row of the detection in the detections and the cutouts.")
    x: Mapped[float] = mapped_column(sa.Double, doc="PSF-fit position, 0-based pixels of the new image.")
    y: Mapped[float] = mapped_column(sa.Double)
    ra: Mapped[float] = mapped_column(sa.Double, doc="Through the new image's fitted WCS, degrees.")
    dec: Mapped[float] = mapped_column(sa.Double)
    sign: Mapped[int] = mapped_column(doc="+1 brighter than the reference, -1 fainter.")
    flux_psf: Mapped[float] = mapped_column(sa.Double, doc="PSF flux on the difference, new image's ADU.")
    flux_psf_err: Mapped[float] = mapped_column(sa.Double)
    mag_psf: Mapped[float | None] = mapped_column(sa.Double, default=None,
                                                  doc="Magnitude of |flux_psf| with the new image's zero point.")
    mag_psf_err: Mapped[float | None] = mapped_column(sa.Double, default=None)
    snr: Mapped[float] = mapped_column(sa.Double)
    flux_apertures: Mapped[list] = mapped_column(sa.JSON, default=list, doc="ADU, at MeasurementSet.aper_radii.")
    flux_apertures_err: Mapped[list] = mapped_column(sa.JSON, default=list)
    centroid_offset: Mapped[float | None] = mapped_column(sa.Double, default=None, doc="Pixels.")
    centroid_offset_sigma: Mapped[float | None] = mapped_column(sa.Double, default=None,
                                                                doc="centroid_offset over its noise.")
    elongation: Mapped[float | None] = mapped_column(sa.Double, default=None)
    width_ratio: Mapped[float | None] = mapped_column(sa.Double, default=None)
    n_bad_pixels: Mapped[int] = mapped_column(default=0)
    bad_fraction: Mapped[float | None] = mapped_column(sa.Double, default=None,
                                                       doc="Fraction of bad pixels within 1 FWHM.")
    negative_fraction: Mapped[float | None] = mapped_column(sa.Double, default=None)
    dipole_ratio: Mapped[float | None] = mapped_column(sa.Double, default=None)
    is_bad: Mapped[bool] = mapped_column(default=False)
    bad_reasons: Mapped[str | None] = mapped_column(sa.String(256), default=None,
                                                    doc="Comma-separated names of the failed cuts.")
    measurement_set: Mapped[MeasurementSet] = relationship(back_populates="measurements")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._stamps: dict[str, np.ndarray] = {}

    @sa.orm.reconstructor
    def _init_on_load(self) -> None:
        self._stamps = {}

    def __repr__(self) -> str:
        bad = f" bad ({self.bad_reasons})" if self.is_bad else ""
        return (f"<Measurements #{self.index_in_sources} at ({self.x:.1f}, {self.y:.1f}): flux "
                f"{self.flux_psf:.1f} +- {self.flux_psf_err:.1f} ADU (S/N {self.snr:.1f}){bad}>")

    def _own_cutouts(self):
        """The Cutouts of this measurement's set, through the parent if it is loaded, else by id
        (a measurement from ``ms.measurements`` outside any session); the last few are kept."""
        parent = self.__dict__.get("measurement_set")
        if parent is not None:
            return parent.cutouts()
        from models.context import context_of

        with context_of(self).session() as session:
            cutouts_id = session.scalar(sa.select(MeasurementSet.cutouts_id).where(
                MeasurementSet.id == self.measurement_set_id))
        held = _RECENT_CUTOUTS.pop(cutouts_id, None)
        if held is None:
            from models.context import context_of
            from models.cutouts import Cutouts

            with context_of(self).session() as session:
                held = session.get(Cutouts, cutouts_id)
        _RECENT_CUTOUTS[cutouts_id] = held
        while len(_RECENT_CUTOUTS) > 4:
            _RECENT_CUTOUTS.pop(next(iter(_RECENT_CUTOUTS)))
        return held

    def get_data_from_cutouts(self, cutouts=None, detections=None) -> None:
        """Fill the nine stamps from ``cutouts`` (default: the set's own); ``detections`` is
        accepted for the user guide's call and not needed (the index is the row)."""
        cutouts = cutouts if cutouts is not None else self._own_cutouts()
        for name in _STAMP_ATTRIBUTES:
            image, plane = name.split("_")
            self._stamps[name] = cutouts.stamp(self.index_in_sources, image, plane)

    def _stamp(self, name: str) -> np.ndarray:
        if name not in self._stamps:
            self.get_data_from_cutouts()
        return self._stamps[name]

    new_data = property(lambda self: self._stamp("new_data"), doc="(size, size) stamp of the new image.")
    new_weight = property(lambda self: self._stamp("new_weight"))
    new_flags = property(lambda self: self._stamp("new_flags"))
    ref_data = property(lambda self: self._stamp("ref_data"), doc="The reference, warped and scaled to the new.")
    ref_weight = property(lambda self: self._stamp("ref_weight"))
    ref_flags = property(lambda self: self._stamp("ref_flags"))
    sub_data = property(lambda self: self._stamp("sub_data"), doc="The difference image.")
    sub_weight = property(lambda self: self._stamp("sub_weight"))
    sub_flags = property(lambda self: self._stamp("sub_flags"))
