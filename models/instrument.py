"""Instruments: how to read a camera's files, and a registry to find the right one.

An `Instrument` knows, for one camera, which header keywords hold the observation's metadata
(`Observation`: time, exposure time, filter, pointing, ...), which HDUs are sections (CCDs or
amplifiers, named by a section id such as DECam's ``N6``), and each section's detector
properties (`SectionInfo`: gain, read noise, saturation, pixel scale, data and overscan
sections).  Raw frames are told apart from reduced products, and reduced products may come with
companion weight and mask files.  An instrument also declares, per band, the transformation from
Gaia magnitudes to that band (`Instrument.transforms`, `improc.color_transforms.BandTransform`)
that photometric calibration uses; `transform_digests` is what the calibration's provenance
records of them.

Built-in instruments (see ``docs/instruments.md``):

- ``DECam``: raw and community-pipeline (CP) products (`models.instruments.decam`);
- ``Synthetic``: images written by the project's simulator (`models.instruments.synthetic`);
- ``Generic`` and every ``models/instruments/*.yaml``: keyword-driven FITS instruments
  (`models.instruments.generic`), e.g. ``DECamResampled`` (the SFFT cutouts) and ``SAAO-STE3``.

More YAML definitions are loaded from the files listed in the config key
``instruments.extra_files`` of the current context (`models.context`).  Look instruments up with `get_instrument` (by name) or
`guess_instrument` (from a primary header).
"""

from __future__ import annotations

import abc
import logging
import math
import re
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from improc.color_transforms import BandTransform, table_digest
from improc.errors import BadDataError
from improc.flags import FLAGS_DTYPE, PixelFlag
from util.config import ConfigError

__all__ = [
    "BadInputError", "MissingHeaderError", "UnknownInstrumentError",
    "Observation", "SectionInfo", "AmplifierInfo", "Companions", "Instrument",
    "register_instrument", "load_instrument_file", "get_instrument", "guess_instrument",
    "instrument_names", "reset_instruments", "transform_digests",
    "open_fits", "header_to_dict", "dict_to_header", "merged_header",
]

log = logging.getLogger(__name__)


class BadInputError(BadDataError):
    """An input file cannot be used; the message names the file and the problem."""


class MissingHeaderError(BadInputError):
    """A header keyword the instrument needs is missing or unreadable."""


class UnknownInstrumentError(ConfigError, LookupError):
    """No known instrument matches a file, or no instrument has the requested name."""


@dataclass(frozen=True)
class Observation:
    """Metadata of one exposure, read from its headers.

    Attributes
    ----------
    mjd : float
        Start of the exposure, MJD (UTC).
    exp_time : float
        Exposure time, seconds.
    filter : str
        Short filter name (``"r"``), as the instrument maps it.
    airmass, ra, dec : float or None
        Airmass at the start; pointing (telescope or target position), degrees.
    target, project : str or None
        Object / field name and proposal or programme id.
    """

    mjd: float
    exp_time: float
    filter: str
    airmass: float | None = None
    ra: float | None = None
    dec: float | None = None
    target: str | None = None
    project: str | None = None

    #: Observation times accepted, MJD: 1900-01-01 to 2100-01-01 (a header outside is wrong).
    MJD_RANGE = (15020.0, 88069.0)

    def implausible(self) -> str | None:
        """What is physically impossible in these values (a sentence), or None."""
        low, high = self.MJD_RANGE
        if not (math.isfinite(self.mjd) and low <= self.mjd <= high):
            return f"observation time MJD {self.mjd} is outside {low:g}..{high:g} (years 1900-2100)"
        if not (math.isfinite(self.exp_time) and self.exp_time > 0):
            return f"exposure time {self.exp_time} s is not positive"
        if self.dec is not None and not -90.0 <= self.dec <= 90.0:
            return f"pointing declination {self.dec} is not in [-90, 90]"
        return None


@dataclass(frozen=True)
class AmplifierInfo:
    """One amplifier of a section read out by several (DECam CCDs have amplifiers A and B).

    Attributes
    ----------
    name : str
        ``"A"``, ``"B"``, ...
    data_section, overscan_section : str or None
        FITS sections (1-based, inclusive) in the raw frame of the section.
    gain, read_noise, saturation : float
        Electrons per ADU, electrons, ADU.
    """

    name: str
    data_section: str | None
    overscan_section: str | None
    gain: float
    read_noise: float
    saturation: float


@dataclass(frozen=True)
class SectionInfo:
    """Detector properties of one section (CCD or amplifier) of an instrument.

    Attributes
    ----------
    section_id : str
        Name of the section, e.g. ``"N6"``; ``"0"`` for single-section instruments.
    gain : float
        Electrons per ADU.
    read_noise : float
        Electrons.
    saturation : float
        ADU; pixels at or above it are flagged SATURATED.
    pixel_scale : float
        Nominal arcsec per pixel.
    data_section, overscan_section : str or None
        FITS sections (``"[x1:x2,y1:y2]"``, 1-based, inclusive) of the light-sensitive pixels and
        of the overscan in a raw frame; None for reduced products or when there is none.
    amplifiers : tuple of AmplifierInfo
        Per-amplifier sections and detector values of a raw frame read by several amplifiers
        (then ``gain``, ``read_noise`` are their means and ``saturation`` their minimum); empty
        for single-amplifier sections and reduced products.
    """

    section_id: str
    gain: float
    read_noise: float
    saturation: float
    pixel_scale: float
    data_section: str | None = None
    overscan_section: str | None = None
    amplifiers: tuple[AmplifierInfo, ...] = ()

    def __post_init__(self) -> None:
        for name in ("gain", "read_noise", "saturation", "pixel_scale"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value)) or value < 0 or (
                    value == 0 and name != "read_noise"):
                raise ValueError(f"section {self.section_id}: {name} must be a positive finite "
                                 f"number, got {value!r}")
        from improc.preprocessing import parse_fits_section
        for name in ("data_section", "overscan_section"):
            if getattr(self, name) is not None:
                parse_fits_section(getattr(self, name))  # raises ValueError naming the text

    def slices(self, which: str = "data") -> tuple[slice, slice] | None:
        """``(slice_y, slice_x)`` of the ``"data"`` or ``"overscan"`` section, or None."""
        from improc.preprocessing import parse_fits_section
        text = {"data": self.data_section, "overscan": self.overscan_section}.get(which, ...)
        if text is ...:
            raise ValueError(f"which must be 'data' or 'overscan', got {which!r}")
        return None if text is None else parse_fits_section(text)


@dataclass(frozen=True)
class Companions:
    """Files that belong with a reduced image: its weight and its mask, when they exist."""

    weight: Path | None = None
    flags: Path | None = None


class Instrument(abc.ABC):
    """How to read the files of one camera.

    Subclasses set ``name`` and ``pixel_scale`` and implement the abstract methods.  Headers
    passed to the methods are `astropy.io.fits.Header` objects; for a section, the primary
    header merged with the section's extension header (`merged_header`).
    """

    name: str = ""
    pixel_scale: float = 1.0  #: nominal arcsec per pixel
    #: Gaia-to-band transformations by filter name (as `Observation.filter` gives it); a band
    #: without one is calibrated on G with a fitted colour term and flagged BAND_UNCALIBRATED.
    transforms: Mapping[str, BandTransform] = MappingProxyType({})

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    def band_transform(self, band: str) -> BandTransform | None:
        """This camera's transformation from Gaia to ``band``, or None if it declares none."""
        return self.transforms.get(band)

    def transforms_digest(self) -> str | None:
        """Content digest of the transformation table (`improc.color_transforms.table_digest`);
        None when the instrument declares no transformation."""
        return table_digest(self.transforms) if self.transforms else None

    @abc.abstractmethod
    def matches(self, header: fits.Header) -> bool:
        """Whether a primary header comes from this instrument (used by `guess_instrument`)."""

    @abc.abstractmethod
    def observation(self, header: fits.Header, *, filename: str) -> Observation:
        """The exposure's metadata; `MissingHeaderError` names ``filename`` and the keyword."""

    @abc.abstractmethod
    def section_hdus(self, hdul: fits.HDUList, *, filename: str) -> dict[str, int]:
        """Section id -> HDU index of every science image HDU, in file order."""

    @abc.abstractmethod
    def section_info(self, header: fits.Header, section_id: str) -> SectionInfo:
        """Detector properties of a section, from its (merged) header, else defaults."""

    @abc.abstractmethod
    def is_raw(self, header: fits.Header) -> bool:
        """Whether the file is a raw frame (to be preprocessed) rather than a reduced image."""

    def companions(self, path: Path) -> Companions:
        """Weight and mask files found next to a reduced image (none by default)."""
        return Companions()

    def companion_of(self, path: Path) -> str | None:
        """If ``path`` is itself a weight or mask companion, a sentence saying so; else None."""
        return None

    def weight_from_plane(self, plane: np.ndarray) -> np.ndarray:
        """Inverse variance (1/ADU^2) from a companion weight plane (already one by default)."""
        weight = np.asarray(plane, dtype=np.float32)
        return np.where(np.isfinite(weight) & (weight > 0), weight, np.float32(0.0))

    def flags_from_mask(self, mask: np.ndarray) -> np.ndarray:
        """`PixelFlag` bits from a companion mask: any non-zero value is BAD by default."""
        return np.where(np.asarray(mask) != 0, PixelFlag.BAD, 0).astype(FLAGS_DTYPE)

    def sky_level(self, header: fits.Header) -> float:
        """ADU of sky already subtracted from a reduced image (0 when it was not)."""
        return 0.0


# ---------------------------------------------------------------------------------------------
# Registry

_registry: dict[str, Instrument] = {}
_state = {"loaded": False}
_lock = threading.RLock()


def _add(instrument: Instrument, *, replace: bool) -> Instrument:
    key = instrument.name.lower()
    if not key:
        raise ValueError(f"instrument {instrument!r} has no name")
    if key in _registry and not replace and _registry[key] is not instrument:
        raise ValueError(f"an instrument named {instrument.name!r} is already registered")
    _registry[key] = instrument
    return instrument


def register_instrument(instrument: Instrument, *, replace: bool = False) -> Instrument:
    """Add an instrument to the registry under its (case-insensitive) name.

    Raises
    ------
    ValueError
        If another instrument has the same name and ``replace`` is False.
    """
    _ensure_loaded()
    with _lock:
        return _add(instrument, replace=replace)


def load_instrument_file(path: str | Path, *, replace: bool = False) -> Instrument:
    """Build a generic FITS instrument from a YAML definition and register it.

    Raises
    ------
    ValueError
        If the file cannot be read or defines an invalid instrument (the message names the file).
    """
    from models.instruments.generic import GenericInstrument

    return register_instrument(GenericInstrument.from_yaml(path), replace=replace)


def _ensure_loaded() -> None:
    """Register the built-in instruments and the config's YAML files, once (thread-safe)."""
    if _state["loaded"]:
        return
    with _lock:
        if _state["loaded"]:
            return
        from models.instruments import builtin_instruments, builtin_yaml_files
        from models.instruments.generic import GenericInstrument

        for instrument in builtin_instruments():
            _add(instrument, replace=True)
        for path in builtin_yaml_files():
            _add(GenericInstrument.from_yaml(path), replace=True)
        _state["loaded"] = True


def _known(context=None) -> dict[str, Instrument]:
    """Registered instruments, then those of a context's ``instruments.extra_files`` (default:
    the current context's)."""
    from models.context import current_context

    _ensure_loaded()
    known = dict(_registry)
    context = context or current_context()
    for name in context.instrument_names():
        known[name.lower()] = context.instrument(name)
    return known


def reset_instruments() -> None:
    """Forget every registered instrument; the next lookup reloads the built-in ones."""
    with _lock:
        _registry.clear()
        _state["loaded"] = False


def instrument_names() -> list[str]:
    """Names of every known instrument (built in, registered, or of the current context), sorted."""
    return sorted(inst.name for inst in _known().values())


def get_instrument(name: str | Instrument, *, context=None) -> Instrument:
    """The instrument of this name (case-insensitive); an `Instrument` is returned as is.

    Raises
    ------
    UnknownInstrumentError
        If no instrument has this name; the message lists the known ones.
    """
    if isinstance(name, Instrument):
        return name
    try:
        return _known(context)[str(name).lower()]
    except KeyError:
        raise UnknownInstrumentError(f"unknown instrument {name!r}; known instruments: "
                                     f"{', '.join(instrument_names())}") from None


def transform_digests(context=None) -> dict[str, str]:
    """Instrument name -> digest of its band-transformation table, for every known instrument
    that declares one (built in, registered, and those of a context's ``instruments.extra_files``;
    default: the current context's).

    This is how transformations enter the photometric calibration's provenance: one provenance
    covers the images of every instrument, so it records every instrument's table by content.
    Instruments without a table are left out (adding one changes nothing that was calibrated).
    """
    digests = {inst.name: inst.transforms_digest() for inst in _known(context).values()}
    return {name: digest for name, digest in sorted(digests.items()) if digest is not None}


def guess_instrument(header: fits.Header, *, filename: str | Path | None = None) -> Instrument:
    """The one instrument whose `Instrument.matches` accepts a primary header.

    Raises
    ------
    UnknownInstrumentError
        If none or several match; the message names the file and its INSTRUME value.
    """
    found = [inst for inst in _known().values() if inst.matches(header)]
    where = f"{Path(filename).name}" if filename is not None else "the header"
    if len(found) == 1:
        return found[0]
    instrume = header.get("INSTRUME")
    if not found and filename is not None:
        # a weight or mask file (which often has no instrument keyword) is not an image
        for inst in _known().values():
            companion = inst.companion_of(Path(filename))
            if companion is not None:
                raise BadInputError(companion)
    if not found:
        raise UnknownInstrumentError(
            f"cannot tell the instrument of {where}: INSTRUME={instrume!r} matches none of "
            f"{', '.join(instrument_names())}; pass instrument=... or add a YAML definition "
            "(docs/instruments.md)")
    raise UnknownInstrumentError(f"{where} (INSTRUME={instrume!r}) matches several instruments: "
                                 f"{', '.join(sorted(i.name for i in found))}; pass instrument=...")


# ---------------------------------------------------------------------------------------------
# FITS files and headers

_CORRUPT_WARNING = re.compile(r"truncated|corrupt|multiple of 2880|extra bytes", re.IGNORECASE)
_NOT_CARDS = {"COMMENT", "HISTORY", ""}
_STRUCTURAL = re.compile(r"^(SIMPLE|BITPIX|NAXIS\d*|EXTEND|XTENSION|PCOUNT|GCOUNT|BSCALE|BZERO|"
                         r"BLANK|CHECKSUM|DATASUM|Z[A-Z0-9_]*|TFIELDS|TTYPE\d+|TFORM\d+|EXTNAME|"
                         r"EXTVER|INHERIT|NEXTEND)$")


def open_fits(path: str | Path) -> fits.HDUList:
    """Read a whole FITS file into memory, turning every kind of breakage into `BadInputError`.

    Parameters
    ----------
    path : str or Path
        The file.

    Returns
    -------
    astropy.io.fits.HDUList
        All HDUs with their data loaded (the file is closed).

    Raises
    ------
    BadInputError
        Missing, unreadable, not FITS, truncated or with undecodable data; names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: no such file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            hdul = fits.open(path, memmap=False, lazy_load_hdus=False)
            try:
                for hdu in hdul:
                    _ = hdu.data  # decode now, while the file is open
            finally:
                hdul.close()
        except (OSError, ValueError, TypeError, IndexError, KeyError) as exc:
            failure: Exception | None = exc
        else:
            failure = None
    corrupt = [str(w.message) for w in caught if _CORRUPT_WARNING.search(str(w.message))]
    if corrupt:
        raise BadInputError(f"{path.name}: corrupt or truncated FITS file ({corrupt[0]})") from failure
    if failure is not None:
        raise BadInputError(f"{path.name}: not a readable FITS file ({failure})") from failure
    return hdul


def _json_value(value: Any) -> Any:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return value.rstrip()
    if value is None or isinstance(value, fits.card.Undefined):
        return None
    return str(value)


def header_to_dict(header: fits.Header, *, structural: bool = False) -> dict[str, Any]:
    """The cards of a header as a JSON-safe dict (no COMMENT/HISTORY; non-finite floats as text).

    Parameters
    ----------
    header : astropy.io.fits.Header
    structural : bool
        Keep keywords that describe the HDU's layout (BITPIX, NAXISn, compression, checksums).
    """
    out: dict[str, Any] = {}
    for key, value in header.items():
        if key in _NOT_CARDS or (not structural and _STRUCTURAL.match(key)):
            continue
        out[key] = _json_value(value)
    return out


def dict_to_header(values: dict[str, Any]) -> fits.Header:
    """A FITS header from a dict made by `header_to_dict` (long keywords become HIERARCH)."""
    header = fits.Header()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HIERARCH notices for long keywords
        for key, value in values.items():
            if _STRUCTURAL.match(key):
                continue
            header[key] = "" if value is None else value
    return header


def merged_header(primary: fits.Header, extension: fits.Header | None) -> fits.Header:
    """The primary header overlaid with an extension's cards (what INHERIT = T means)."""
    merged = fits.Header()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HIERARCH notices for long keywords
        for source in (primary, extension):
            if source is None:
                continue
            for card in source.cards:
                if card.keyword in _NOT_CARDS or _STRUCTURAL.match(card.keyword):
                    continue
                merged[card.keyword] = (card.value, card.comment)
    return merged
