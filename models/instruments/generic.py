"""Keyword-driven FITS instruments, defined by a mapping (usually a YAML file).

A definition says which header keywords hold each quantity (the first one present wins), what
to use when none is present, how to recognise the instrument's files, and a few reading rules.
Every key is optional except ``name``; unknown keys are errors.  See ``docs/instruments.md``
for a commented example.  Values of the built-in ``Generic`` instrument (`GENERIC_DEFINITION`)
are the defaults that a definition overrides key by key.

Reading rules, in order:

- time: the ``mjd`` keywords; else a ``date`` keyword holding an ISO date-time; else a
  ``date`` keyword holding a date plus a ``time`` keyword (``"2013-07-13"`` + ``"00:57:33"``).
  If a ``basename`` keyword holds a NOIRLab archive name (``c4d_160818_043331_ooi_i_v1``) whose
  time differs from the header's by more than `BASENAME_TOLERANCE_DAYS` (5 minutes), the header
  is wrong (real case: copied DATE-OBS/MJD-OBS); the basename's date and time are used and a
  warning is logged.  Within the tolerance the header wins.
- RA / Dec: numbers are degrees; sexagesimal strings are hours for RA (``ra_unit: auto``)
  and degrees for Dec.
- filter: ``filter_pattern``'s first group (e.g. ``'^(\\S+)'``: first word), then ``filter_map``.
- pixel scale: a ``pixel_scale`` keyword, else the celestial WCS of the header, else the default.
- raw or reduced: ``product`` is ``raw``, ``reduced``, or ``auto`` (raw when an
  ``overscan_section`` keyword is present).
- weight and mask files next to a reduced image (as SWarp and many reductions write them):
  ``companions: {weight: '{stem}.weight.fits', flags: '{stem}.mask.fits'}``, ``{stem}`` being
  the image's file name without its FITS ending.  Such files are then refused as images.
- photometric transformations from Gaia to the camera's bands (`Instrument.transforms`):
  ``transforms: decam_zhou2020`` names a published table
  (`improc.color_transforms.PUBLISHED_TRANSFORMS`), or a mapping gives one per filter name,
  ``{r: {coefficients: [c0, c1, ...], color_range: [-0.5, 3.5], average_color: 1.2}}``
  (``m_r = G + sum c_k (BP-RP)^k``).  A band without one is calibrated on G with a fitted colour
  term and flagged; none is the default.  The whole table is replaced, never merged, by a
  definition that gives one.
"""

from __future__ import annotations

import copy
import datetime
import logging
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import yaml
from astropy.coordinates import Angle
from astropy.io import fits

from improc.color_transforms import transform_table
from improc.flags import FLAGS_DTYPE, PixelFlag, flag_value
from models.instrument import (BadInputError, Companions, Instrument, MissingHeaderError,
                               Observation, SectionInfo)
from util.config import ConfigError

__all__ = ["GenericInstrument", "GENERIC_DEFINITION", "BASENAME_TOLERANCE_DAYS",
           "mjd_from_datetime", "datetime_from_mjd", "basename_datetime"]

log = logging.getLogger(__name__)

#: Larger differences between a header's time and its archive basename's mean the header is wrong.
#: A basename is the exposure's start to the second; 5 minutes allows for clock and naming slop
#: while catching a DATE-OBS copied from another exposure of the same night (real case: decam_sfft).
BASENAME_TOLERANCE_DAYS = 5.0 / 1440.0

_MJD_EPOCH = datetime.datetime(1858, 11, 17, tzinfo=datetime.timezone.utc)
_BASENAME = re.compile(r"^[A-Za-z0-9]+_(\d{6})_(\d{6})(?:_|$)")

#: Keyword lists and defaults of the built-in ``Generic`` instrument (also every definition's base).
GENERIC_DEFINITION: dict[str, Any] = {
    "name": "Generic",
    "description": "Any FITS image with common keywords; never guessed, ask for it by name.",
    "match": {},
    "product": "auto",
    "keywords": {
        "mjd": ["MJD-OBS"], "date": ["DATE-OBS"], "time": ["TIME-OBS", "UT", "UTSTART"],
        "exp_time": ["EXPTIME", "EXPOSURE"], "filter": ["FILTER", "BAND"],
        "airmass": ["AIRMASS"], "ra": ["RA", "OBJCTRA"], "dec": ["DEC", "OBJCTDEC"],
        "target": ["OBJECT"], "project": ["PROPID", "PROGRAM"],
        "gain": ["GAIN", "EGAIN"], "read_noise": ["RDNOISE", "READNOIS"],
        "saturation": ["SATURATE"], "pixel_scale": ["PIXSCALE"],
        "section_id": ["CCDNAME", "EXTNAME", "DETPOS"],
        "data_section": ["TRIMSEC", "DATASEC"], "overscan_section": ["BIASSEC"],
        "sky_level": [], "basename": [],
    },
    "defaults": {"gain": 1.0, "read_noise": 0.0, "saturation": 65535.0, "pixel_scale": 1.0,
                 "section_id": "0", "exp_time": None, "filter": None, "airmass": None},
    "filter_pattern": None,
    "filter_map": {},
    "ra_unit": "auto",
    "weight_hdus": [],
    "flags_hdus": [],
    "flag_bits": {},
    "companions": {"weight": None, "flags": None},
    "transforms": None,
}

#: Endings of FITS file names, stripped to give the ``{stem}`` of a companion template.
_FITS_ENDINGS = (".fits.fz", ".fits.gz", ".fits", ".fit", ".fts")


def fits_stem(name: str) -> str:
    """A FITS file name without its FITS ending (``c.fits.fz`` -> ``c``)."""
    lower = name.lower()
    for ending in _FITS_ENDINGS:
        if lower.endswith(ending):
            return name[: -len(ending)]
    return name

_PRODUCTS = ("raw", "reduced", "auto")
_RA_UNITS = ("auto", "hourangle", "deg")


def mjd_from_datetime(moment: datetime.datetime) -> float:
    """MJD of a datetime (naive datetimes are taken as UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return (moment - _MJD_EPOCH).total_seconds() / 86400.0


def datetime_from_mjd(mjd: float) -> datetime.datetime:
    """UTC datetime of an MJD."""
    return _MJD_EPOCH + datetime.timedelta(days=float(mjd))


def basename_datetime(text: str) -> datetime.datetime | None:
    """The UTC date-time in a NOIRLab archive basename (``c4d_160818_043331_...``), or None."""
    match = _BASENAME.match(str(text).strip())
    if match is None:
        return None
    try:
        moment = datetime.datetime.strptime(match.group(1) + match.group(2), "%y%m%d%H%M%S")
    except ValueError:
        return None
    return moment.replace(tzinfo=datetime.timezone.utc)


def _merge_definition(base: dict[str, Any], update: Mapping[str, Any], source: str) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if key not in base:
            raise ConfigError(f"{source}: unknown instrument definition key {key!r}; known keys: "
                             f"{', '.join(sorted(base))}")
        if key in ("keywords", "defaults", "companions"):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: {key} must be a mapping, got {type(value).__name__}")
            for sub in value:
                if sub not in base[key]:
                    raise ConfigError(f"{source}: unknown {key} entry {sub!r}; known: "
                                     f"{', '.join(sorted(base[key]))}")
            merged[key].update(copy.deepcopy(dict(value)))
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class GenericInstrument(Instrument):
    """An instrument whose reading rules come from a definition mapping.

    Parameters
    ----------
    definition : mapping
        Keys of `GENERIC_DEFINITION` to override; ``name`` is required.
    source : str
        Where the definition came from, for error messages.

    Raises
    ------
    ConfigError
        Unknown keys, or values of the wrong kind; the message names ``source`` and the key.
    """

    def __init__(self, definition: Mapping[str, Any], *, source: str = "instrument definition"):
        if not isinstance(definition, Mapping) or not definition.get("name"):
            raise ConfigError(f"{source}: an instrument definition must be a mapping with a 'name'")
        self.definition = _merge_definition(GENERIC_DEFINITION, definition, source)
        self.source = source
        d = self.definition
        self.name = str(d["name"])
        self.description = str(d.get("description") or "")
        if d["product"] not in _PRODUCTS:
            raise ConfigError(f"{source}: product must be one of {_PRODUCTS}, got {d['product']!r}")
        if d["ra_unit"] not in _RA_UNITS:
            raise ConfigError(f"{source}: ra_unit must be one of {_RA_UNITS}, got {d['ra_unit']!r}")
        for key, names in d["keywords"].items():
            if isinstance(names, str):
                d["keywords"][key] = [names]
            elif not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ConfigError(f"{source}: keywords.{key} must be a list of keyword names, got {names!r}")
        self.match_rules = {str(k).upper(): (None if v is None else re.compile(str(v), re.IGNORECASE))
                            for k, v in (d["match"] or {}).items()}
        self.filter_pattern = re.compile(d["filter_pattern"]) if d["filter_pattern"] else None
        self.filter_map = {str(k): str(v) for k, v in (d["filter_map"] or {}).items()}
        self.flag_bits = {int(bit): flag_value(name) for bit, name in (d["flag_bits"] or {}).items()}
        self.companion_templates = {}
        for kind, template in (d["companions"] or {}).items():
            if template is not None and (not isinstance(template, str) or "{stem}" not in template
                                         or "/" in template):
                raise ConfigError(f"{source}: companions.{kind} must be a file name containing "
                                  f"{{stem}} (e.g. '{{stem}}.weight.fits'), got {template!r}")
            if template is not None:
                self.companion_templates[kind] = template
        self.weight_hdus = [str(n).upper() for n in d["weight_hdus"]]
        self.flags_hdus = [str(n).upper() for n in d["flags_hdus"]]
        self.pixel_scale = float(d["defaults"]["pixel_scale"])
        try:
            self.transforms = MappingProxyType(transform_table(d["transforms"], where=f"{source}: transforms"))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> GenericInstrument:
        """Build an instrument from a YAML definition file.

        Raises
        ------
        ConfigError
            Unreadable file, invalid YAML or invalid definition; the message names the file.
        """
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read instrument definition {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"instrument definition {path} is not valid YAML: {exc}") from exc
        return cls(loaded, source=str(path))

    # -- lookups ---------------------------------------------------------------------------------

    def _find(self, header: fits.Header, quantity: str) -> tuple[str | None, Any]:
        """(keyword, value) of the first keyword of ``quantity`` with a usable value."""
        for keyword in self.definition["keywords"][quantity]:
            value = header.get(keyword)
            if value is None or isinstance(value, fits.card.Undefined):
                continue
            if isinstance(value, str) and value.strip() in ("", "NaN", "nan", "UNKNOWN"):
                continue
            return keyword, value
        return None, None

    def _number(self, header: fits.Header, quantity: str, filename: str, *,
                required: bool) -> float | None:
        keyword, value = self._find(header, quantity)
        if keyword is None:
            default = self.definition["defaults"].get(quantity)
            if default is None and required:
                raise MissingHeaderError(
                    f"{filename}: missing header keyword for {quantity} (looked for "
                    f"{', '.join(self.definition['keywords'][quantity]) or 'none configured'}; "
                    f"instrument {self.name})")
            return None if default is None else float(default)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise MissingHeaderError(f"{filename}: header keyword {keyword} must be a number for "
                                     f"{quantity}, got {value!r}") from None
        if not np.isfinite(number):
            raise MissingHeaderError(f"{filename}: header keyword {keyword} is not finite: {value!r}")
        return number

    def _text(self, header: fits.Header, quantity: str) -> str | None:
        _, value = self._find(header, quantity)
        return None if value is None else str(value).strip()

    def matches(self, header: fits.Header) -> bool:
        """All ``match`` rules hold (a None rule: keyword absent); never with no rules."""
        if not self.match_rules:
            return False
        for keyword, pattern in self.match_rules.items():
            value = header.get(keyword)
            if pattern is None:
                if value is not None:
                    return False
            elif value is None or not pattern.search(str(value).strip()):
                return False
        return True

    # -- observation -----------------------------------------------------------------------------

    def observation(self, header: fits.Header, *, filename: str) -> Observation:
        """The exposure's metadata (see the module docstring for the rules).

        Raises
        ------
        MissingHeaderError
            A required quantity (time, exposure time, filter) has no keyword and no default,
            or a keyword's value cannot be read; the message names the file and keyword.
        """
        observation = Observation(
            mjd=self._mjd(header, filename),
            exp_time=self._number(header, "exp_time", filename, required=True),
            filter=self._filter(header, filename),
            airmass=self._number(header, "airmass", filename, required=False),
            ra=self._angle(header, "ra", filename),
            dec=self._angle(header, "dec", filename),
            target=self._text(header, "target"),
            project=self._text(header, "project"),
        )
        problem = observation.implausible()
        if problem:
            raise MissingHeaderError(f"{filename}: {problem}")
        return observation

    def _header_mjd(self, header: fits.Header, filename: str) -> float:
        keyword, value = self._find(header, "mjd")
        if keyword is not None:
            try:
                return float(value)
            except (TypeError, ValueError):
                raise MissingHeaderError(f"{filename}: {keyword} must be a number, got {value!r}") from None
        keyword, date = self._find(header, "date")
        if keyword is None:
            looked = self.definition["keywords"]["mjd"] + self.definition["keywords"]["date"]
            raise MissingHeaderError(f"{filename}: missing header keyword for the observation time "
                                     f"(looked for {', '.join(looked)}; instrument {self.name})")
        text = str(date).strip()
        if "T" not in text:
            time_keyword, time_value = self._find(header, "time")
            if time_keyword is None:
                raise MissingHeaderError(f"{filename}: {keyword}={text!r} has no time of day and no "
                                         f"time keyword ({', '.join(self.definition['keywords']['time'])})")
            text = f"{text}T{str(time_value).strip()}"
        try:
            return mjd_from_datetime(datetime.datetime.fromisoformat(text))
        except ValueError:
            raise MissingHeaderError(f"{filename}: cannot read the observation time {text!r} "
                                     f"from {keyword}") from None

    def _mjd(self, header: fits.Header, filename: str) -> float:
        mjd = self._header_mjd(header, filename)
        keyword, value = self._find(header, "basename")
        moment = basename_datetime(value) if keyword is not None else None
        if moment is not None:
            from_name = mjd_from_datetime(moment)
            if abs(from_name - mjd) > BASENAME_TOLERANCE_DAYS:
                log.warning("%s: header time MJD %.5f (%s) disagrees with %s=%r (%s); using the "
                            "basename's", filename, mjd, datetime_from_mjd(mjd).date(), keyword,
                            str(value).strip(), moment.date())
                return from_name
        return mjd

    def _filter(self, header: fits.Header, filename: str) -> str:
        text = self._text(header, "filter")
        if text is None:
            text = self.definition["defaults"].get("filter")
            if text is None:
                raise MissingHeaderError(f"{filename}: missing header keyword for the filter (looked "
                                         f"for {', '.join(self.definition['keywords']['filter'])})")
        if self.filter_pattern is not None:
            match = self.filter_pattern.search(text)
            if match is not None:
                text = match.group(1) if match.groups() else match.group(0)
        return self.filter_map.get(text, text)

    def _angle(self, header: fits.Header, quantity: str, filename: str) -> float | None:
        keyword, value = self._find(header, quantity)
        if keyword is None:
            return None
        if isinstance(value, (int, float)):
            if quantity == "dec" and not -90.0 <= float(value) <= 90.0:
                raise MissingHeaderError(f"{filename}: {keyword}={value!r} is not a declination "
                                         "(degrees in [-90, 90])")
            return float(value) % 360.0 if quantity == "ra" else float(value)
        text = str(value).strip()
        sexagesimal = ":" in text or " " in text
        hours = quantity == "ra" and (self.definition["ra_unit"] == "hourangle"
                                      or (self.definition["ra_unit"] == "auto" and sexagesimal))
        try:
            angle = Angle(text, unit="hourangle" if hours else "deg").degree
        except (ValueError, TypeError):
            raise MissingHeaderError(f"{filename}: cannot read {quantity} from {keyword}={text!r}") from None
        if quantity == "dec" and not -90.0 <= angle <= 90.0:
            raise MissingHeaderError(f"{filename}: {keyword}={text!r} is not a declination")
        return float(angle) % 360.0 if quantity == "ra" else float(angle)

    # -- sections --------------------------------------------------------------------------------

    def _is_section_hdu(self, hdu) -> bool:
        name = (hdu.name or "").upper()
        return (hdu.is_image and hdu.data is not None and np.ndim(hdu.data) == 2
                and name not in self.weight_hdus and name not in self.flags_hdus)

    def section_hdus(self, hdul: fits.HDUList, *, filename: str) -> dict[str, int]:
        """Section id -> HDU index of every 2-D image HDU (not weight / flags HDUs).

        Raises
        ------
        BadInputError
            No image HDU, or two HDUs with the same section id.
        """
        indices = [i for i, hdu in enumerate(hdul) if self._is_section_hdu(hdu)]
        if not indices:
            raise BadInputError(f"{filename}: no 2-D image HDU among its {len(hdul)} HDUs")
        sections: dict[str, int] = {}
        for index in indices:
            section = self._text(hdul[index].header, "section_id")
            if section is None or section.upper() == "PRIMARY":
                section = str(self.definition["defaults"]["section_id"]) if len(indices) == 1 else str(index)
            if section in sections:
                raise BadInputError(f"{filename}: HDUs {sections[section]} and {index} both have "
                                    f"section id {section!r}")
            sections[section] = index
        return sections

    def plane_hdu(self, hdul: fits.HDUList, kind: str) -> int | None:
        """Index of the HDU holding the ``"weight"`` or ``"flags"`` plane in the same file, if any."""
        names = self.weight_hdus if kind == "weight" else self.flags_hdus
        for index, hdu in enumerate(hdul):
            if (hdu.name or "").upper() in names and hdu.data is not None:
                return index
        return None

    def section_info(self, header: fits.Header, section_id: str) -> SectionInfo:
        """Gain, read noise, saturation and pixel scale from the header, else the defaults."""
        where = f"{self.name} section {section_id}"
        return SectionInfo(
            section_id=section_id,
            gain=self._number(header, "gain", where, required=True),
            read_noise=self._number(header, "read_noise", where, required=True),
            saturation=self._number(header, "saturation", where, required=True),
            pixel_scale=self._pixel_scale(header, where),
            data_section=self._text(header, "data_section"),
            overscan_section=self._text(header, "overscan_section"),
        )

    def _pixel_scale(self, header: fits.Header, where: str) -> float:
        keyword, _ = self._find(header, "pixel_scale")
        if keyword is not None:
            return self._number(header, "pixel_scale", where, required=True)
        from astropy.wcs import WCS, FITSFixedWarning
        from astropy.wcs.utils import proj_plane_pixel_scales

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            try:
                wcs = WCS(header).celestial
            except Exception:  # any malformed WCS: fall back to the nominal scale
                wcs = None
        if wcs is not None and wcs.has_celestial and wcs.naxis == 2:
            scale = float(np.mean(proj_plane_pixel_scales(wcs))) * 3600.0
            if np.isfinite(scale) and scale > 0:
                return scale
        return self.pixel_scale

    def is_raw(self, header: fits.Header) -> bool:
        """Raw frame: ``product: raw``, or ``auto`` and an overscan keyword is present."""
        product = self.definition["product"]
        if product == "auto":
            return self._find(header, "overscan_section")[0] is not None
        return product == "raw"

    def companions(self, path: Path) -> Companions:
        """The weight and mask files that the ``companions`` templates name next to an image."""
        path = Path(path)
        found = {}
        for kind, template in self.companion_templates.items():
            candidate = path.with_name(template.format(stem=fits_stem(path.name)))
            if candidate != path and candidate.is_file():
                found[kind] = candidate
        return Companions(**found)

    def companion_of(self, path: Path) -> str | None:
        """A file that a ``companions`` template names is a weight or mask, not an image."""
        name = Path(path).name
        for kind, template in self.companion_templates.items():
            before, after = template.split("{stem}", 1)
            pattern = re.escape(before) + "(.+)" + re.escape(after)
            found = re.fullmatch(pattern, name)
            if found:
                what = "weight" if kind == "weight" else "mask"
                return (f"{name} is a {self.name} {what} file (companions.{kind}: {template!r}); ingest "
                        f"its image, {found.group(1)}.fits or the like (the {what} is found next to it)")
        return None

    def sky_level(self, header: fits.Header) -> float:
        """The ``sky_level`` keyword's value (ADU already subtracted), else 0."""
        value = self._number(header, "sky_level", self.name, required=False)
        return 0.0 if value is None else value

    def flags_from_mask(self, mask: np.ndarray) -> np.ndarray:
        """Map mask bits with ``flag_bits``; bits not listed (or any value if none is) -> BAD."""
        mask = np.asarray(mask).astype(np.int64)
        if not self.flag_bits:
            return super().flags_from_mask(mask)
        flags = np.zeros(mask.shape, dtype=FLAGS_DTYPE)
        known = 0
        for bit, value in self.flag_bits.items():
            flags[(mask & bit) != 0] |= FLAGS_DTYPE(value)
            known |= bit
        flags[(mask & ~known) != 0] |= FLAGS_DTYPE(PixelFlag.BAD)
        return flags
