"""Cutouts: new / ref / sub stamps of data, weight and flags around every detection, one HDF5 file.

The stamps of a difference image's detections (`improc.cutouts.make_cutouts`): for each detection
``i`` and each of ``new`` (the science image), ``ref`` (the reference warped onto its grid and
scaled to it) and ``sub`` (the difference), arrays ``<image>_data``, ``<image>_weight`` and
``<image>_flags`` of shape (n, size, size), with ``stamp[j, k] = image[y0[i] + j, x0[i] + k]``
(padding off the image: data 0, weight 0, flags NO_DATA).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import h5py
import numpy as np
import sqlalchemy as sa
from sqlalchemy import ForeignKey, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from improc.cutouts import Cutouts as StampSet, Stamps
from models.base import Base, TimestampMixin, UUIDMixin
from models.file_store import FileBackedMixin

__all__ = ["Cutouts"]

IMAGES = ("new", "ref", "sub")
PLANES = ("data", "weight", "flags")


class Cutouts(UUIDMixin, TimestampMixin, FileBackedMixin, Base):
    """The stamps of the detections of one difference image (`improc.cutouts.Cutouts` in a file)."""

    __tablename__ = "cutouts"
    __table_args__ = (UniqueConstraint("sources_id", "provenance_id", name="uq_cutouts_sources_prov"),)
    file_extension = ".h5"

    sources_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("source_lists.id", ondelete="CASCADE"), index=True)
    provenance_id: Mapped[str] = mapped_column(ForeignKey("provenances.id", ondelete="RESTRICT"), index=True)
    size: Mapped[int] = mapped_column(doc="Side of every stamp, pixels.")
    num_cutouts: Mapped[int]

    def __init__(self, *, stamps: StampSet | None = None, sources=None, **kwargs):
        if stamps is not None:
            kwargs.setdefault("size", int(stamps.size))
            kwargs.setdefault("num_cutouts", len(stamps.x))
        if sources is not None:
            kwargs.setdefault("sources_id", sources.id)
        super().__init__(**kwargs)
        self._stamps = stamps

    @sa.orm.reconstructor
    def _init_on_load(self) -> None:
        self._stamps = None

    def __repr__(self) -> str:
        return (f"<Cutouts of detections {str(self.sources_id)[:8]}: {self.num_cutouts} x 3 x {self.size}x"
                f"{self.size}, prov {self.provenance_id}>")

    @property
    def stamps(self) -> StampSet:
        """All stamps, read from the file on first use."""
        if self._stamps is None:
            self.load_file()
        return self._stamps

    def stamp(self, index: int, image: str, plane: str) -> np.ndarray:
        """One (size, size) stamp: ``image`` new, ref or sub; ``plane`` data, weight or flags."""
        if image not in IMAGES or plane not in PLANES:
            raise KeyError(f"image must be one of {IMAGES} and plane one of {PLANES}, got {image!r}, {plane!r}")
        return getattr(getattr(self.stamps, image), plane)[index]

    def _write(self, path: Path) -> None:
        stamps = self.stamps
        with h5py.File(path, "w") as f:
            for image in IMAGES:
                for plane in PLANES:
                    f.create_dataset(f"{image}_{plane}", data=getattr(getattr(stamps, image), plane),
                                     track_times=False, compression="gzip", compression_opts=1, shuffle=True)
            for name in ("x0", "y0", "x", "y"):
                f.create_dataset(name, data=getattr(stamps, name), track_times=False)
            f.attrs["size"] = int(stamps.size)

    def _read(self, path: Path) -> None:
        with h5py.File(path, "r") as f:
            planes = {image: Stamps(*(f[f"{image}_{plane}"][()] for plane in PLANES)) for image in IMAGES}
            self._stamps = StampSet(**planes, x0=f["x0"][()], y0=f["y0"][()], x=f["x"][()], y=f["y"][()],
                                    size=int(f.attrs["size"]))
