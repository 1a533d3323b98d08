"""Background: the sky level and noise of an image, stored compactly as a mesh."""

from __future__ import annotations

import uuid
from pathlib import Path

import h5py
import numpy as np
import sqlalchemy as sa
from sqlalchemy import ForeignKey, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from improc.background import BackgroundMesh
from models.base import Base, TimestampMixin, UUIDMixin
from models.file_store import FileBackedMixin

__all__ = ["Background"]


class Background(UUIDMixin, TimestampMixin, FileBackedMixin, Base):
    """The background of one image: a mesh of sky level and rms in an HDF5 file.

    ``counts`` and ``variance`` rebuild full-size (ny, nx) maps from the mesh.
    """

    __tablename__ = "backgrounds"
    __table_args__ = (UniqueConstraint("image_id", "provenance_id", name="uq_backgrounds_image_prov"),)
    file_extension = ".h5"

    image_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    provenance_id: Mapped[str] = mapped_column(ForeignKey("provenances.id", ondelete="RESTRICT"), index=True)
    box_size: Mapped[int]
    filter_size: Mapped[int]
    level_median: Mapped[float]
    rms_median: Mapped[float]

    def __init__(self, *, mesh: BackgroundMesh | None = None, image=None, **kwargs):
        if mesh is not None:
            kwargs.setdefault("box_size", int(mesh.box_size))
            kwargs.setdefault("filter_size", int(mesh.filter_size))
            kwargs.setdefault("level_median", float(mesh.median_level))
            kwargs.setdefault("rms_median", float(mesh.median_rms))
        if image is not None:
            kwargs.setdefault("image_id", image.id)
        super().__init__(**kwargs)
        self._mesh = mesh

    @sa.orm.reconstructor
    def _init_on_load(self) -> None:
        self._mesh = None

    def __repr__(self) -> str:
        return (f"<Background of image {str(self.image_id)[:8]}: level {self.level_median:.2f} ADU, "
                f"rms {self.rms_median:.2f} ADU, box {self.box_size} px, prov {self.provenance_id}>")

    @property
    def mesh(self) -> BackgroundMesh:
        """The mesh, read from the file on first use."""
        if self._mesh is None:
            self.load_file()
        return self._mesh

    @property
    def counts(self) -> np.ndarray:
        """Full-size background level map, ADU, (ny, nx)."""
        return self.mesh.counts()

    @property
    def variance(self) -> np.ndarray:
        """Full-size background variance map, ADU^2, (ny, nx)."""
        return self.mesh.variance()

    def _write(self, path: Path) -> None:
        mesh = self.mesh
        with h5py.File(path, "w") as f:
            # no creation times in the file: one provenance, one content, byte for byte
            f.create_dataset("level", data=mesh.level, track_times=False)
            f.create_dataset("rms", data=mesh.rms, track_times=False)
            f.attrs["box_size"] = mesh.box_size
            f.attrs["filter_size"] = mesh.filter_size
            f.attrs["shape"] = np.asarray(mesh.shape)

    def _read(self, path: Path) -> None:
        with h5py.File(path, "r") as f:
            self._mesh = BackgroundMesh(level=f["level"][()], rms=f["rms"][()],
                                        box_size=int(f.attrs["box_size"]),
                                        filter_size=int(f.attrs["filter_size"]),
                                        shape=tuple(int(v) for v in f.attrs["shape"]))
