"""PSF: the spatially varying point-spread function fitted on an image's stars."""

from __future__ import annotations

import uuid
from pathlib import Path

import h5py
import numpy as np
import sqlalchemy as sa
from sqlalchemy import ForeignKey, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from improc.psf import PixelPSF
from models.base import Base, TimestampMixin, UUIDMixin
from models.file_store import FileBackedMixin

__all__ = ["PSF"]


class PSF(UUIDMixin, TimestampMixin, FileBackedMixin, Base):
    """A pixelized, spatially varying PSF (`improc.psf.PixelPSF`) stored in an HDF5 file."""

    __tablename__ = "psfs"
    __table_args__ = (UniqueConstraint("sources_id", "provenance_id", name="uq_psfs_sources_prov"),)
    file_extension = ".h5"

    sources_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("source_lists.id", ondelete="CASCADE"), index=True)
    provenance_id: Mapped[str] = mapped_column(ForeignKey("provenances.id", ondelete="RESTRICT"), index=True)
    fwhm_pixels: Mapped[float]
    fwhm_arcsec: Mapped[float | None] = mapped_column(
        doc="FWHM times the pixel scale of the image's own WCS (the seeing; scale errors of a "
            "header WCS are far below a percent).")
    num_stars: Mapped[int]
    kind: Mapped[str] = mapped_column(sa.String(16), default="pixel",
                                      doc="pixel (fitted pixel model), moffat (fitted to few stars) or "
                                          "moffat_default (no star: the sources' or a nominal size).")
    beta: Mapped[float | None] = mapped_column(default=None, doc="Moffat power index (Moffat kinds).")
    quality_flags: Mapped[int] = mapped_column(default=0, doc="models.quality.QualityFlag bits.")

    def __init__(self, *, model: PixelPSF | None = None, sources=None, **kwargs):
        if model is not None:
            kwargs.setdefault("fwhm_pixels", float(model.fwhm_pixels))
        if sources is not None:
            kwargs.setdefault("sources_id", sources.id)
        super().__init__(**kwargs)
        self._model = model

    @sa.orm.reconstructor
    def _init_on_load(self) -> None:
        self._model = None

    def __repr__(self) -> str:
        seeing = f' ({self.fwhm_arcsec:.2f}")' if self.fwhm_arcsec is not None else ""
        return (f"<PSF of sources {str(self.sources_id)[:8]}: {self.kind}, FWHM {self.fwhm_pixels:.2f} px"
                f"{seeing}, {self.num_stars} stars, prov {self.provenance_id}>")

    @property
    def model(self) -> PixelPSF:
        """The PSF model, read from the file on first use."""
        if self._model is None:
            self.load_file()
        return self._model

    def get_clip(self, x: float, y: float, flux: float = 1.0) -> np.ndarray:
        """PSF stamp of a star at image position (x, y), normalized to ``flux``."""
        return self.model.get_clip(x, y, flux)

    def _write(self, path: Path) -> None:
        with h5py.File(path, "w") as f:
            for key, value in self.model.to_arrays().items():
                if isinstance(value, np.ndarray):
                    f.create_dataset(key, data=value, track_times=False)
                else:
                    f.attrs[key] = value

    def _read(self, path: Path) -> None:
        with h5py.File(path, "r") as f:
            arrays = {key: f[key][()] for key in f.keys()}
            arrays.update({key: (v.item() if hasattr(v, "item") and np.ndim(v) == 0 else v)
                           for key, v in f.attrs.items()})
        self._model = PixelPSF.from_arrays(arrays)
