"""SourceList: the sources extracted from one image, as a FITS table with units."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from astropy.table import Table
from sqlalchemy import ForeignKey, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, TimestampMixin, UUIDMixin
from models.file_store import FileBackedMixin

__all__ = ["SourceList"]


class SourceList(UUIDMixin, TimestampMixin, FileBackedMixin, Base):
    """Sources found on one image, measured on the image minus its background.

    ``data`` is an astropy Table (columns ``x``, ``y`` 0-based pixels, ``apflux_<i>`` /
    ``apfluxerr_<i>`` for each aperture radius in ``aper_radii`` (pixels), ``psfflux`` /
    ``psffluxerr``, ``flags``, ``is_star``, ...).  Fluxes are ADU.  Sky positions are not stored:
    they depend on an astrometric solution, a product of its own, so they come from one::

        ra, dec = sources.radec(ds.get_wcs())
    """

    __tablename__ = "source_lists"
    # One list per image and provenance: the provenance fixes the background it was made with.
    __table_args__ = (UniqueConstraint("image_id", "provenance_id", name="uq_source_lists_image_prov"),)

    image_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    background_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("backgrounds.id", ondelete="CASCADE"), index=True, default=None,
        doc="The background subtracted before extraction (None for detections on a difference image).")
    provenance_id: Mapped[str] = mapped_column(ForeignKey("provenances.id", ondelete="RESTRICT"), index=True)
    num_sources: Mapped[int]
    aper_radii: Mapped[list] = mapped_column(sa.JSON, default=list)
    fwhm_pixels: Mapped[float | None]

    def __init__(self, *, data: Table | None = None, image=None, background=None, **kwargs):
        if data is not None:
            kwargs.setdefault("num_sources", len(data))
        if image is not None:
            kwargs.setdefault("image_id", image.id)
        if background is not None:
            kwargs.setdefault("background_id", background.id)
        super().__init__(**kwargs)
        self._data = data

    @sa.orm.reconstructor
    def _init_on_load(self) -> None:
        self._data = None

    def __repr__(self) -> str:
        fwhm = f", FWHM {self.fwhm_pixels:.2f} px" if self.fwhm_pixels is not None else ""
        return (f"<SourceList of image {str(self.image_id)[:8]}: {self.num_sources} sources{fwhm}, "
                f"prov {self.provenance_id}>")

    @property
    def data(self) -> Table:
        """The sources table, read from the file on first use."""
        if self._data is None:
            self.load_file()
        return self._data

    @property
    def x(self) -> np.ndarray:
        return np.asarray(self.data["x"], dtype=float)

    @property
    def y(self) -> np.ndarray:
        return np.asarray(self.data["y"], dtype=float)

    def radec(self, wcs) -> tuple[np.ndarray, np.ndarray]:
        """RA and Dec (degrees) of the sources through an astrometric solution.

        Parameters
        ----------
        wcs : WorldCoordinates or astropy.wcs.WCS
            Usually ``ds.get_wcs()``, the solution fitted to this very source list.
        """
        solution = getattr(wcs, "wcs", wcs)
        ra, dec = solution.pixel_to_world_values(self.x, self.y)
        return np.asarray(ra, dtype=float), np.asarray(dec, dtype=float)

    def apfluxadu(self, aperture: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Flux and error (ADU) in aperture number ``aperture`` (radius ``aper_radii[aperture]``)."""
        if not 0 <= aperture < len(self.aper_radii):
            raise IndexError(f"aperture {aperture} out of range; this source list has "
                             f"{len(self.aper_radii)} apertures {self.aper_radii}")
        return (np.asarray(self.data[f"apflux_{aperture}"], dtype=float),
                np.asarray(self.data[f"apfluxerr_{aperture}"], dtype=float))

    def psffluxadu(self) -> tuple[np.ndarray, np.ndarray]:
        """PSF-fit flux and error (ADU)."""
        return (np.asarray(self.data["psfflux"], dtype=float),
                np.asarray(self.data["psffluxerr"], dtype=float))

    def _write(self, path: Path) -> None:
        table = self.data.copy(copy_data=False)
        # The row holds the aperture radii; long free-form meta keys are not valid FITS cards.
        table.meta = {"APERRADS": ",".join(f"{r:.4f}" for r in self.aper_radii)}
        table.write(path, format="fits", overwrite=True)

    def _read(self, path: Path) -> None:
        table = Table.read(path, format="fits", hdu=1)
        table.meta.pop("APERRADS", None)
        self._data = table
