"""Images: one section (CCD) of an exposure, a coadd or a difference, with its pixels on disk.

An `Image` row holds the observation metadata, the footprint on the sky (centre, four corners,
bounding box, radius; see `improc.footprint` for the RA-wrap and pole rules) from the WCS it
came with, a badness bit field (`ImageBadness`), the FITS header and that WCS.  An image is
never changed by the steps that use it: its fitted WCS, seeing, sky and zero point are products
of their own (`models.world_coordinates`, `models.psf`, `models.background`,
`models.zero_point`); only the badness bits are updated, by `pipeline.step.Step` alone.  Its pixels live
in one FITS file in the file store: a primary HDU with the header, then three image HDUs
``DATA`` (float32, ADU), ``WEIGHT`` (float32 inverse variance, 1/ADU^2) and ``FLAGS`` (uint16
`improc.flags.PixelFlag` bits).  ``image.data``, ``.weight`` and ``.flags`` are read lazily, after
checking the file's md5.

`Image.from_file` reads a reduced product; `ingest_file` stores an exposure and its images;
`Image.find_images` (in `models.image_queries`) searches by position and metadata.

Weight and flags of an image read without companion planes (the noise model)::

    variance = (read_noise / gain)**2 + max(data + sky_level, 0) / gain      [ADU^2]
    weight   = 1 / variance

where ``sky_level`` is the sky already subtracted from the image (`Instrument.sky_level`, 0 for
images that still contain their sky).  Flags: NO_DATA where the data are not finite (those
pixels are set to 0) or the weight is not positive, SATURATED where ``data + sky_level`` reaches
the section's saturation, plus whatever a companion mask says.  Every flagged pixel gets weight 0.
"""

from __future__ import annotations

import enum
import os
import uuid
import warnings
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import sqlalchemy as sa
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from sqlalchemy import ForeignKey, Index, UniqueConstraint
from sqlalchemy.orm import Mapped, Session, mapped_column

from improc import footprint
from improc.flags import FLAGS_DTYPE, bits_by_name
from models.base import Base, TimestampMixin, UUIDMixin
from models.exposure import Exposure
from models.file_store import FileBackedMixin, FileStore
from models.instrument import Instrument, dict_to_header
from models.provenance import Provenance

__all__ = ["Image", "ImageType", "ImageBadness", "header_gain", "ingest_file", "ingest_provenance",
           "INGEST_CODE_VERSION"]

#: Code version of the "ingest" process (images read from reduced products).
INGEST_CODE_VERSION = "1.0.0"


class ImageType(str, enum.Enum):
    """What an image is."""

    SCIENCE = "science"        #: one section of one exposure
    COADD = "coadd"            #: a stack of several images
    DIFFERENCE = "difference"  #: new minus reference


class ImageBadness(enum.IntFlag):
    """Why a whole image should not be used (bits of ``Image.bad_flags``; 0 = good)."""

    BAD_ASTROMETRY = 1    #: the WCS solution failed or is poor
    BAD_PHOTOMETRY = 2    #: no reliable zero point
    BAD_BACKGROUND = 4    #: background could not be modelled
    BAD_PSF = 8           #: PSF could not be measured
    BAD_SUBTRACTION = 16  #: the difference image is dominated by artefacts
    NO_STARS = 32         #: too few stars were found
    NO_REFERENCE = 64     #: no usable reference covers the image (subtraction cannot run)


def components_key(image_ids) -> str:
    """The key of a set of component images: md5 of their sorted ids (order-independent)."""
    import hashlib

    text = ",".join(sorted(str(i) for i in image_ids))
    return hashlib.md5(text.encode()).hexdigest()


def ingest_provenance() -> Provenance:
    """Provenance of images that arrived reduced (e.g. DECam community-pipeline ``ooi`` files).

    Their process is ``"preprocessing"`` like that of the images preprocessing makes from raw
    frames, done elsewhere: the parameter ``{"reduced_by": "external"}`` tells the two apart, and
    the upstream is the exposure's provenance.  So ``Provenance.get_for_tag(tag=...,
    process="preprocessing")`` finds the provenance of a tag's images however they were reduced.
    The instrument is data, not a parameter, so one tag covers images of every instrument.
    """
    from models.exposure import exposure_provenance

    return Provenance(process="preprocessing", code_version=INGEST_CODE_VERSION,
                      parameters={"reduced_by": "external"}, upstreams=[exposure_provenance()])


def header_gain(header: dict | None) -> float | None:
    """The ``GAIN`` card of an image's header (e/ADU), or None when missing, not a number or <= 0."""
    try:
        gain = float((header or {}).get("GAIN"))
    except (TypeError, ValueError):
        return None
    return gain if gain > 0 else None


def _badness_value(names: tuple[str, ...]) -> int:
    return bits_by_name(ImageBadness, names, "image badness")


_FLOAT = sa.Double


class Image(UUIDMixin, TimestampMixin, FileBackedMixin, Base):
    """One image and its footprint; pixels in a FITS file (see the module docstring)."""

    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("exposure_id", "section_id", "provenance_id",
                         name="uq_images_exposure_id_section_id_provenance_id"),
        UniqueConstraint("new_image_id", "reference_id", "provenance_id",
                         name="uq_images_new_image_id_reference_id_provenance_id"),
        UniqueConstraint("components_key", "provenance_id", name="uq_images_components_key_provenance_id"),
        Index("ix_images_mjd", "mjd"),
        Index("ix_images_filter", "filter"),
        Index("ix_images_instrument_section_id", "instrument", "section_id"),
        Index("ix_images_mindec", "mindec"),
        Index("ix_images_maxdec", "maxdec"),
        Index("ix_images_minra", "minra"),
        Index("ix_images_maxra", "maxra"),
        Index("ix_images_radius", "radius"),
        Index("ix_images_target", "target"),
    )

    provenance_id: Mapped[str] = mapped_column(ForeignKey("provenances.id", ondelete="RESTRICT"),
                                               index=True)
    exposure_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("exposures.id", ondelete="CASCADE"), index=True, default=None)
    section_id: Mapped[str | None] = mapped_column(sa.String(32), default=None)
    new_image_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), index=True, default=None,
        doc="A difference image's new image (on whose grid and in whose ADU it is).")
    reference_id: Mapped[uuid.UUID | None] = mapped_column(
        # use_alter: references point at images too; the constraint is added after both tables
        ForeignKey("refs.id", ondelete="CASCADE", use_alter=True), index=True, default=None,
        doc="A difference image's reference.")
    components: Mapped[list | None] = mapped_column(
        sa.JSON, default=None, doc="A coadd's component image ids (strings), in the order combined.")
    components_key: Mapped[str | None] = mapped_column(
        sa.String(32), default=None, doc="md5 of a coadd's sorted component ids: one coadd per set and provenance.")
    instrument: Mapped[str] = mapped_column(sa.String(64))
    type: Mapped[ImageType] = mapped_column(
        sa.Enum(ImageType, native_enum=False, length=16, create_constraint=True, name="image_type",
                values_callable=lambda enum_cls: [member.value for member in enum_cls]),
        default=ImageType.SCIENCE)
    filter: Mapped[str] = mapped_column(sa.String(64))
    mjd: Mapped[float] = mapped_column(_FLOAT, doc="Start of the (first) exposure, MJD.")
    end_mjd: Mapped[float] = mapped_column(_FLOAT, doc="End of the (last) exposure, MJD.")
    exp_time: Mapped[float] = mapped_column(_FLOAT, doc="Total exposure time, seconds.")
    airmass: Mapped[float | None] = mapped_column(_FLOAT, default=None)
    target: Mapped[str | None] = mapped_column(sa.String(256), default=None)
    project: Mapped[str | None] = mapped_column(sa.String(128), default=None)
    nx: Mapped[int] = mapped_column(doc="Width, pixels.")
    ny: Mapped[int] = mapped_column(doc="Height, pixels.")

    ra: Mapped[float] = mapped_column(_FLOAT, doc="Footprint centre RA, degrees.")
    dec: Mapped[float] = mapped_column(_FLOAT, doc="Footprint centre Dec, degrees.")
    ra_corner_00: Mapped[float] = mapped_column(_FLOAT, doc="RA at pixel (x, y) = (-0.5, -0.5).")
    ra_corner_01: Mapped[float] = mapped_column(_FLOAT, doc="RA at pixel (-0.5, ny - 0.5).")
    ra_corner_10: Mapped[float] = mapped_column(_FLOAT, doc="RA at pixel (nx - 0.5, -0.5).")
    ra_corner_11: Mapped[float] = mapped_column(_FLOAT, doc="RA at pixel (nx - 0.5, ny - 0.5).")
    dec_corner_00: Mapped[float] = mapped_column(_FLOAT)
    dec_corner_01: Mapped[float] = mapped_column(_FLOAT)
    dec_corner_10: Mapped[float] = mapped_column(_FLOAT)
    dec_corner_11: Mapped[float] = mapped_column(_FLOAT)
    minra: Mapped[float] = mapped_column(_FLOAT, doc="Bounding box; minra > maxra wraps RA = 0.")
    maxra: Mapped[float] = mapped_column(_FLOAT)
    mindec: Mapped[float] = mapped_column(_FLOAT)
    maxdec: Mapped[float] = mapped_column(_FLOAT)
    radius: Mapped[float] = mapped_column(_FLOAT, doc="Centre to farthest corner, degrees.")

    bad_flags: Mapped[int] = mapped_column(default=0, doc="ImageBadness bits; 0 = good.")

    header: Mapped[dict] = mapped_column(default=dict, doc="FITS header cards.")
    wcs_header: Mapped[str | None] = mapped_column(sa.Text, default=None,
                                                   doc="The WCS as FITS header text.")

    #: Corner column suffixes in polygon order (a closed path around the image).
    CORNERS: ClassVar[tuple[str, ...]] = ("00", "10", "11", "01")

    def __init__(self, *, provenance: Provenance | None = None, exposure: Exposure | None = None,
                 data: np.ndarray | None = None, weight: np.ndarray | None = None,
                 flags: np.ndarray | None = None, wcs: WCS | None = None, **columns: Any):
        if provenance is not None:
            columns["provenance_id"] = provenance.id
        if exposure is not None:
            columns["exposure_id"] = exposure.id
        super().__init__(**columns)
        self._provenance = provenance
        self._data = self._weight = self._flags = None
        self._extras: dict[str, np.ndarray] = {}
        if data is not None:
            self.data = data
        if weight is not None:
            self.weight = weight
        if flags is not None:
            self.flags = flags
        if wcs is not None:
            self.set_wcs(wcs)

    def __repr__(self) -> str:
        kind = getattr(self.type, "value", self.type)
        bad = f" bad={','.join(self.badness)}" if self.bad_flags else ""
        where = f"ra={self.ra:.5f} dec={self.dec:+.5f} " if self.ra is not None else ""
        return (f"<Image {kind} {self.instrument} {self.section_id} {self.filter} "
                f"mjd={self.mjd:.5f} {self.nx}x{self.ny} {where}id={str(self.id)[:8]}{bad}>")

    # -- pixels ------------------------------------------------------------------------------------

    def _plane(self, name: str) -> np.ndarray | None:
        if getattr(self, name, None) is None and self.filepath is not None:
            self.load_file()
        return getattr(self, name, None)

    @property
    def data(self) -> np.ndarray | None:
        """(ny, nx) float32 pixels, ADU (read from the file on first use)."""
        return self._plane("_data")

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._data = np.asarray(value, dtype=np.float32)
        self.ny, self.nx = self._data.shape

    @property
    def weight(self) -> np.ndarray | None:
        """(ny, nx) float32 inverse variance, 1/ADU^2."""
        return self._plane("_weight")

    @weight.setter
    def weight(self, value: np.ndarray) -> None:
        self._weight = np.asarray(value, dtype=np.float32)

    @property
    def flags(self) -> np.ndarray | None:
        """(ny, nx) uint16 `PixelFlag` bits."""
        return self._plane("_flags")

    @flags.setter
    def flags(self, value: np.ndarray) -> None:
        self._flags = np.asarray(value, dtype=FLAGS_DTYPE)

    def extra(self, name: str) -> np.ndarray | None:
        """An extra plane stored with the pixels (a difference image's ``SCORE``, ``PSF_D``,
        ``PSF_TILES``; see `pipeline.subtraction`), or None if the image has none by that name."""
        if getattr(self, "_data", None) is None and self.filepath is not None:
            self.load_file()
        return getattr(self, "_extras", {}).get(name.upper())

    def set_extra(self, name: str, values: np.ndarray) -> None:
        """Attach an extra plane (saved as an image HDU of that name after FLAGS)."""
        if getattr(self, "_extras", None) is None:
            self._extras = {}
        self._extras[name.upper()] = np.asarray(values)

    @property
    def wcs(self) -> WCS | None:
        """The WCS rebuilt from ``wcs_header``."""
        if not self.wcs_header:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            return WCS(fits.Header.fromstring(self.wcs_header, sep="\n"))

    def set_wcs(self, wcs: WCS, shape: tuple[int, int] | None = None) -> None:
        """Store a WCS and compute the footprint columns from it.

        Parameters
        ----------
        wcs : astropy.wcs.WCS
            Celestial WCS of the image.
        shape : tuple of int, optional
            ``(ny, nx)``; default: the image's ``ny, nx``.
        """
        shape = shape or (self.ny, self.nx)
        self.ny, self.nx = shape
        self.wcs_header = wcs.to_header(relax=True).tostring(sep="\n")
        ra, dec = footprint.corners_from_wcs(shape, wcs)
        self.set_corners(ra, dec)

    def set_corners(self, ra: np.ndarray, dec: np.ndarray) -> None:
        """Set the corners (in `CORNERS` order) and the centre, bounding box and radius."""
        for suffix, r, d in zip(self.CORNERS, ra, dec):
            setattr(self, f"ra_corner_{suffix}", float(r))
            setattr(self, f"dec_corner_{suffix}", float(d))
        ra_c, dec_c = footprint.polygon_centers(ra, dec)
        self.ra, self.dec = float(ra_c[0]), float(dec_c[0])
        minra, maxra, mindec, maxdec = footprint.polygon_bounds(ra, dec)
        self.minra, self.maxra = float(minra[0]), float(maxra[0])
        self.mindec, self.maxdec = float(mindec[0]), float(maxdec[0])
        self.radius = float(footprint.polygon_radii(ra, dec, ra_c, dec_c)[0])

    @property
    def corners(self) -> tuple[np.ndarray, np.ndarray]:
        """RA and Dec of the four corners, shape (4,), in `CORNERS` order."""
        return (np.array([getattr(self, f"ra_corner_{s}") for s in self.CORNERS]),
                np.array([getattr(self, f"dec_corner_{s}") for s in self.CORNERS]))

    # -- badness -----------------------------------------------------------------------------------

    def set_badness(self, *names: str) -> None:
        """Set badness bits by name (``"BAD_ASTROMETRY"``...); KeyError names an unknown one."""
        self.bad_flags = int(self.bad_flags or 0) | _badness_value(names)

    def clear_badness(self, *names: str) -> None:
        """Clear badness bits by name; with no names, all of them."""
        mask = _badness_value(names) if names else int(sum(ImageBadness))
        self.bad_flags = int(self.bad_flags or 0) & ~mask

    @classmethod
    def update_badness(cls, image_id: uuid.UUID, *, set_bits: int = 0, clear_bits: int = 0,
                       session: Session | None = None) -> int | None:
        """Set and clear badness bits of a stored image in one UPDATE; return the new value.

        Only the bits named change, whatever else another process changed meanwhile (the
        columns are not read back and written whole).  None if no such image is stored.
        """
        from models.base import session_scope

        with session_scope(session) as sess:
            sess.execute(sa.update(cls).where(cls.id == image_id).values(
                bad_flags=cls.bad_flags.op("&")(~int(clear_bits)).op("|")(int(set_bits))))
            return sess.scalar(sa.select(cls.bad_flags).where(cls.id == image_id))

    @property
    def badness(self) -> list[str]:
        """Names of the badness bits that are set."""
        return [b.name for b in ImageBadness if (self.bad_flags or 0) & b]

    @property
    def is_bad(self) -> bool:
        """Whether any badness bit is set."""
        return bool(self.bad_flags)

    # -- file --------------------------------------------------------------------------------------

    def _process(self) -> str:
        prov = getattr(self, "_provenance", None)
        if prov is None and self.provenance_id is not None:
            prov = Provenance.get(self.provenance_id)
            self._provenance = prov
        return prov.process if prov is not None else "unknown"

    def naming_fields(self) -> dict[str, Any]:
        """The fields of ``storage.file_name_convention`` this image gives its products' files."""
        return dict(instrument=self.instrument, mjd=self.mjd, section=self.section_id or "none",
                    filter=self.filter, type=getattr(self.type, "value", self.type) or "science")

    def describe(self) -> str:
        """Short human-readable name: instrument, section, filter, date and id."""
        return (f"{self.instrument} {self.section_id} {self.filter} mjd {self.mjd:.5f} "
                f"(id {str(self.id)[:8]})")

    def file_stem(self, store: FileStore) -> str:
        """``storage.file_name_convention`` filled from this image (name: start of its id)."""
        return store.stem(**self.naming_fields(), process=self._process(), prov=self.provenance_id,
                          name=self.id.hex[:12])

    def _write(self, path: Path) -> None:
        data, weight, flags = self._data, self._weight, self._flags
        if data is None or weight is None or flags is None:
            raise ValueError(f"image {self.id} needs data, weight and flags before it is saved")
        shape = np.shape(data)
        for name, plane in (("weight", weight), ("flags", flags)):
            if np.shape(plane) != shape:
                raise ValueError(f"image {self.id}: {name} has shape {np.shape(plane)}, data has {shape}")
        primary = fits.PrimaryHDU(header=dict_to_header(self.header or {}))
        wcs_header = fits.Header.fromstring(self.wcs_header, sep="\n") if self.wcs_header else None
        hdul = fits.HDUList([
            primary,
            fits.ImageHDU(np.asarray(data, dtype=np.float32), header=wcs_header, name="DATA"),
            fits.ImageHDU(np.asarray(weight, dtype=np.float32), name="WEIGHT"),
            fits.ImageHDU(np.asarray(flags, dtype=FLAGS_DTYPE), name="FLAGS"),
            *(fits.ImageHDU(values, name=name) for name, values in sorted(getattr(self, "_extras", {}).items())),
        ])
        hdul.writeto(path, overwrite=True, output_verify="silentfix")

    def _read(self, path: Path) -> None:
        with fits.open(path, memmap=False) as hdul:
            self._data = hdul["DATA"].data.astype(np.float32)
            self._weight = hdul["WEIGHT"].data.astype(np.float32)
            self._flags = hdul["FLAGS"].data.astype(FLAGS_DTYPE)
            self._extras = {hdu.name: hdu.data for hdu in hdul[4:]}

    # -- queries and constructors (bodies live in their own modules) -------------------------------

    @classmethod
    def find_images(cls, **criteria: Any) -> list[Image]:
        """Search images; see `models.image_queries.find_images` for every criterion."""
        from models.image_queries import find_images

        return find_images(**criteria)

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, instrument: str | Instrument | None = None,
                  weight: str | os.PathLike | np.ndarray | None = None,
                  flags: str | os.PathLike | np.ndarray | None = None,
                  hdu: int | str | None = None, section_id: str | None = None,
                  exposure: Exposure | None = None, provenance: Provenance | None = None) -> Image:
        """An Image (in memory, not saved) from a reduced product; see `models.image_io.image_from_file`."""
        from models.image_io import image_from_file

        return image_from_file(path, instrument=instrument, weight=weight, flags=flags, hdu=hdu,
                               section_id=section_id, exposure=exposure, provenance=provenance)


def ingest_file(path: str | os.PathLike, *, instrument: str | Instrument | None = None,
                weight: str | os.PathLike | np.ndarray | None = None,
                flags: str | os.PathLike | np.ndarray | None = None,
                context: Any = None) -> tuple[Exposure, list[Image]]:
    """Store an original file as an Exposure and, for reduced products, one Image per section.

    See `models.image_io.ingest_file`.
    """
    from models.image_io import ingest_file as _ingest

    return _ingest(path, instrument=instrument, weight=weight, flags=flags, context=context)
