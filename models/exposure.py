"""Exposures: one file as it came from a telescope or an archive, copied into the file store.

An `Exposure` row keeps the metadata read by its `Instrument` (time, exposure time, filter,
pointing, ...), the primary header, the ids of its sections, and where the copy of the original
file lives.  The same original file (same md5) is stored at most once per provenance: the
provenance of process ``"exposure"`` whose only parameter is the instrument name
(`exposure_provenance`).

Raw frames (``is_raw``) are turned into `models.image.Image` rows by preprocessing; reduced
products (DECam CP ``ooi`` files, resampled cutouts, simulator output) get their images at
ingestion (`models.image.ingest_file`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import sqlalchemy as sa
from astropy.io import fits
from sqlalchemy import ForeignKey, Index, UniqueConstraint, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from models.base import Base, TimestampMixin, UUIDMixin, session_scope
from models.file_store import FileBackedMixin, FileIntegrityError, FileStore, md5_of
from models.instrument import (BadInputError, Instrument, SectionInfo, get_instrument,
                               guess_instrument, header_to_dict, merged_header, open_fits)
from models.provenance import Provenance

__all__ = ["Exposure", "exposure_provenance", "EXPOSURE_CODE_VERSION"]

#: Code version of the "exposure" process (ingestion of original files).
EXPOSURE_CODE_VERSION = "1.0.0"


def exposure_provenance() -> Provenance:
    """The provenance of stored original files: process "exposure", no parameters.

    The instrument is a property of the data (a column), not a parameter of the process, so
    exposures of every instrument share one provenance and one tag can cover them all.
    """
    return Provenance(process="exposure", code_version=EXPOSURE_CODE_VERSION, parameters={})


def _original_suffix(path: Path) -> str:
    """The extension to keep: ``.fits``, ``.fits.fz``, ``.fits.gz``, ``.fit``..."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if len(suffixes) == 2 and suffixes[-1] in (".fz", ".gz", ".bz2") and suffixes[0] in (".fits", ".fit", ".fts"):
        return "".join(suffixes)
    return suffixes[-1] if suffixes and suffixes[-1] in (".fits", ".fit", ".fts", ".fz") else ".fits"


class Exposure(UUIDMixin, TimestampMixin, FileBackedMixin, Base):
    """One original file (raw frame or reduced product) and its metadata.

    Build one with `Exposure.from_file`; store it with `models.saving.save_products` (which
    copies the original into the file store) or, with its images, `models.image.ingest_file`.
    """

    __tablename__ = "exposures"
    __table_args__ = (
        UniqueConstraint("origin_md5", "provenance_id", name="uq_exposures_origin_md5_provenance_id"),
        Index("ix_exposures_mjd", "mjd"),
        Index("ix_exposures_instrument_filter", "instrument", "filter"),
    )

    provenance_id: Mapped[str] = mapped_column(ForeignKey("provenances.id", ondelete="RESTRICT"),
                                               index=True)
    instrument: Mapped[str] = mapped_column(sa.String(64))
    mjd: Mapped[float] = mapped_column(sa.Double, doc="Start of the exposure, MJD (UTC).")
    exp_time: Mapped[float] = mapped_column(sa.Double, doc="Exposure time, seconds.")
    filter: Mapped[str] = mapped_column(sa.String(64))
    airmass: Mapped[float | None] = mapped_column(sa.Double)
    ra: Mapped[float | None] = mapped_column(sa.Double, doc="Pointing RA, degrees.")
    dec: Mapped[float | None] = mapped_column(sa.Double, doc="Pointing Dec, degrees.")
    target: Mapped[str | None] = mapped_column(sa.String(256))
    project: Mapped[str | None] = mapped_column(sa.String(128))
    section_ids: Mapped[list[str]] = mapped_column(sa.JSON, default=list)
    header: Mapped[dict] = mapped_column(default=dict, doc="Primary header cards.")
    origin: Mapped[str] = mapped_column(sa.String(1024), doc="Name of the original file.")
    origin_md5: Mapped[str] = mapped_column(sa.String(32), doc="md5 of the original file.")
    is_raw: Mapped[bool] = mapped_column(default=False,
                                         doc="A raw frame (to preprocess) rather than a reduced product.")

    def __repr__(self) -> str:
        return (f"<Exposure {self.instrument} {self.origin} mjd={self.mjd:.5f} {self.filter} "
                f"{self.exp_time}s>")

    # -- building ----------------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike, instrument: str | Instrument | None = None, *,
                  provenance: Provenance | None = None) -> Exposure:
        """An Exposure (in memory, not saved) for an original file.

        Parameters
        ----------
        path : str or path-like
            The original FITS file (raw frame or reduced product).
        instrument : str or Instrument, optional
            Default: guessed from the primary header (`models.instrument.guess_instrument`).
        provenance : Provenance, optional
            Default: `exposure_provenance` of the instrument.

        Returns
        -------
        Exposure
            With its ``provenance_id`` set; its file is copied into the store when it is saved.

        Raises
        ------
        BadInputError
            Corrupt or truncated file, no image HDU, missing header keywords (names file and keyword),
        or a weight / mask companion file given instead of its image.
        UnknownInstrumentError
            The instrument cannot be guessed (names the file and its INSTRUME).
        """
        path = Path(path)
        hdul = open_fits(path)
        inst = get_instrument(instrument) if instrument is not None else guess_instrument(
            hdul[0].header, filename=path)
        companion = inst.companion_of(path)
        if companion is not None:
            raise BadInputError(companion)
        sections = inst.section_hdus(hdul, filename=path.name)
        first = next(iter(sections.values()))
        header = merged_header(hdul[0].header, hdul[first].header if first else None)
        obs = inst.observation(header, filename=path.name)
        provenance = provenance or exposure_provenance()
        exposure = cls(
            provenance_id=provenance.id, instrument=inst.name, mjd=obs.mjd, exp_time=obs.exp_time,
            filter=obs.filter, airmass=obs.airmass, ra=obs.ra, dec=obs.dec, target=obs.target,
            project=obs.project, section_ids=list(sections),
            header=header_to_dict(hdul[0].header), origin=path.name, origin_md5=md5_of(path),
            is_raw=inst.is_raw(header),
        )
        exposure.file_extension = _original_suffix(path)
        exposure._source_path = path
        exposure._hdul = hdul
        exposure._provenance = provenance
        return exposure

    @classmethod
    def find_existing(cls, origin_md5: str, provenance_id: str,
                      session: Session | None = None) -> Exposure | None:
        """The stored exposure of this original file and provenance, or None."""
        with session_scope(session) as sess:
            return sess.scalars(select(cls).where(cls.origin_md5 == origin_md5,
                                                  cls.provenance_id == provenance_id)).one_or_none()

    # -- files -------------------------------------------------------------------------------------

    def file_stem(self, store: FileStore) -> str:
        """``storage.file_name_convention`` with section ``all``, type ``raw`` / ``reduced`` and
        name ``<original name>-<start of the id>`` (unique: a failed save never touches another
        exposure's file)."""
        name = self.origin
        for suffix in (".fz", ".gz", ".bz2", ".fits", ".fit", ".fts"):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
        name = f"{name[:60]}-{self.id.hex[:8]}"
        return store.stem(
            instrument=self.instrument, mjd=self.mjd, section="all", filter=self.filter,
            type="raw" if self.is_raw else "reduced", process="exposure", prov=self.provenance_id,
            name=name)

    def _write(self, path: Path) -> None:
        source = getattr(self, "_source_path", None)
        if source is None:
            raise FileIntegrityError(f"exposure {self.origin} has no original file to copy")
        shutil.copyfile(source, path)
        if md5_of(path) != self.origin_md5:
            raise FileIntegrityError(f"{source} changed since it was read (md5 differs)")

    def _read(self, path: Path) -> None:
        self._local_path = path

    def local_path(self, store: FileStore | None = None) -> Path:
        """Path of the file: the md5-verified stored copy, or the original before saving.

        Raises
        ------
        FileIntegrityError
            The stored copy is missing or its md5 differs from the database's.
        """
        if self.filepath is not None:
            self.load_file(store)
            return self._local_path
        source = getattr(self, "_source_path", None)
        if source is None:
            raise FileIntegrityError(f"exposure {self.id} has neither a stored file nor an original")
        return source

    def open(self, store: FileStore | None = None) -> fits.HDUList:
        """All HDUs of the file, read into memory (cached on the object)."""
        hdul = getattr(self, "_hdul", None)
        if hdul is None:
            hdul = open_fits(self.local_path(store))
            self._hdul = hdul
        return hdul

    @property
    def instrument_object(self) -> Instrument:
        """The `Instrument` named by ``instrument``."""
        from models.context import context_of

        return get_instrument(self.instrument, context=context_of(self))

    def read_section(self, section_id: str, store: FileStore | None = None) -> tuple[np.ndarray, fits.Header]:
        """Pixels and merged (primary + extension) header of one section.

        Raises
        ------
        ValueError
            If the exposure has no such section (the message lists its sections).
        """
        hdul = self.open(store)
        sections = self.instrument_object.section_hdus(hdul, filename=self.origin)
        if section_id not in sections:
            raise ValueError(f"exposure {self.origin} has no section {section_id!r}; sections: "
                             f"{', '.join(sections)}")
        index = sections[section_id]
        header = merged_header(hdul[0].header, hdul[index].header if index else None)
        return np.asarray(hdul[index].data), header

    def section_info(self, section_id: str, store: FileStore | None = None) -> SectionInfo:
        """Gain, read noise, saturation, pixel scale and raw sections of one section."""
        _, header = self.read_section(section_id, store)
        return self.instrument_object.section_info(header, section_id)

    def summary(self) -> dict[str, Any]:
        """The main metadata as a plain dict (for logs and command-line output)."""
        return {"id": str(self.id), "instrument": self.instrument, "origin": self.origin,
                "mjd": self.mjd, "filter": self.filter, "exp_time": self.exp_time,
                "sections": list(self.section_ids), "raw": self.is_raw}
