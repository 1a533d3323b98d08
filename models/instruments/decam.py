"""DECam, the Dark Energy Camera on the CTIO Blanco 4 m telescope.

Reads raw multi-extension frames and the NOIRLab community-pipeline (CP) products: ``ooi``
(image, ADU), ``oow`` (inverse variance, 1/ADU^2) and ``ood`` (data-quality mask, integer codes,
non-zero = bad), with file names such as ``c4d_171113_060340_ooi_r_ls9.N6.fits``; the weight and
mask of an ``ooi`` file are found next to it by replacing ``_ooi_`` in its name.

Sections are the 62 science CCDs, named ``S1``..``S31`` and ``N1``..``N31`` (EXTNAME, CCDNAME or
DETPOS, else from CCDNUM); guide and focus CCDs are skipped.  Gain, read noise and saturation
come from each CCD's header (GAINA/GAINB, RDNOISEA/RDNOISEB, SATURATE or SATURATA/SATURATB;
means of the two amplifiers, minimum saturation); when a header lacks them the table values
`DECAM_DEFAULTS` are used.  The nominal pixel scale is 0.2637 arcsec.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

from improc.flags import FLAGS_DTYPE, PixelFlag
from models.instrument import AmplifierInfo, Companions, MissingHeaderError, SectionInfo
from models.instruments.generic import GenericInstrument

__all__ = ["DECam", "DECAM_CCDS", "DECAM_CCDNUM", "DECAM_DEFAULTS", "CP_MASK_CODES"]

#: CCD name of each CCDNUM (1..62).
DECAM_CCDNUM: dict[int, str] = {
    num: name for num, name in enumerate(
        ["S29", "S30", "S31", "S25", "S26", "S27", "S28", "S20", "S21", "S22", "S23", "S24",
         "S14", "S15", "S16", "S17", "S18", "S19", "S8", "S9", "S10", "S11", "S12", "S13",
         "S1", "S2", "S3", "S4", "S5", "S6", "S7"]
        + [f"N{i}" for i in range(1, 32)], start=1)
}
DECAM_CCDS: frozenset[str] = frozenset(DECAM_CCDNUM.values())

#: Values used when a CCD's header does not give them (typical DECam values).
DECAM_DEFAULTS = {"gain": 4.0, "read_noise": 7.0, "saturation": 44000.0, "pixel_scale": 0.2637}

#: Community-pipeline ``ood`` codes -> `PixelFlag` (1 bad pixel, 2 no value, 3 saturated,
#: 4 bleed trail, 5 cosmic ray, 6 low weight, 7 transient in a difference, 8 streak).
CP_MASK_CODES: dict[int, int] = {
    1: PixelFlag.BAD, 2: PixelFlag.NO_DATA, 3: PixelFlag.SATURATED, 4: PixelFlag.BLEED,
    5: PixelFlag.CR, 6: PixelFlag.BAD, 7: PixelFlag.BAD, 8: PixelFlag.BAD,
}

_DEFINITION = {
    "name": "DECam",
    "description": "Dark Energy Camera: raw frames and community-pipeline ooi/oow/ood products.",
    "match": {"INSTRUME": r"^DECam$"},
    "product": "reduced",
    "keywords": {
        "mjd": ["MJD-OBS"], "date": ["DATE-OBS"], "time": ["TIME-OBS"],
        "exp_time": ["EXPTIME"], "filter": ["BAND", "FILTER"], "airmass": ["AIRMASS"],
        "ra": ["RA", "TELRA"], "dec": ["DEC", "TELDEC"], "target": ["OBJECT"],
        "project": ["PROPID"], "gain": [], "read_noise": [], "saturation": ["SATURATE"],
        "pixel_scale": [], "section_id": ["EXTNAME", "CCDNAME", "DETPOS"],
        "data_section": ["DATASEC"], "overscan_section": [],
    },
    "defaults": {**DECAM_DEFAULTS, "section_id": None},
    "filter_pattern": r"^(\S+)",
    "ra_unit": "hourangle",
    "transforms": "decam_zhou2020",     # R. Zhou (2020), as the Legacy Surveys calibrate
}


class DECam(GenericInstrument):
    """The Dark Energy Camera (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(_DEFINITION, source="models/instruments/decam.py")

    def is_raw(self, header: fits.Header) -> bool:
        """Raw when PROCTYPE is ``Raw``; CP products say ``InstCal``, ``Resampled``, ``Stacked``."""
        return str(header.get("PROCTYPE", "")).strip().lower() == "raw"

    def _ccd_name(self, header: fits.Header) -> str | None:
        for keyword in ("EXTNAME", "CCDNAME", "DETPOS"):
            value = str(header.get(keyword, "")).strip().upper()
            if value in DECAM_CCDS:
                return value
        ccdnum = header.get("CCDNUM")
        return DECAM_CCDNUM.get(int(ccdnum)) if isinstance(ccdnum, (int, np.integer)) else None

    def section_hdus(self, hdul: fits.HDUList, *, filename: str) -> dict[str, int]:
        """CCD name -> HDU index of every science-CCD image HDU (guide / focus CCDs skipped).

        Raises
        ------
        BadInputError
            No science CCD in the file, or the same CCD twice.
        """
        from models.instrument import BadInputError

        sections: dict[str, int] = {}
        for index, hdu in enumerate(hdul):
            if not self._is_section_hdu(hdu):
                continue
            name = self._ccd_name(hdu.header)
            if name is None:
                continue
            if name in sections:
                raise BadInputError(f"{filename}: HDUs {sections[name]} and {index} are both CCD {name}")
            sections[name] = index
        if not sections:
            raise BadInputError(f"{filename}: no DECam science-CCD image HDU (EXTNAME/CCDNAME/DETPOS "
                                f"S1..S31 or N1..N31) among its {len(hdul)} HDUs")
        return sections

    @staticmethod
    def _amp_values(header: fits.Header, stem: str) -> list[float]:
        values = [header.get(f"{stem}{amp}") for amp in "AB"]
        return [float(v) for v in values if isinstance(v, (int, float)) and np.isfinite(v)]

    def section_info(self, header: fits.Header, section_id: str) -> SectionInfo:
        """Per-CCD values from the header (two-amplifier means), else `DECAM_DEFAULTS`."""
        gains = self._amp_values(header, "GAIN")
        noises = self._amp_values(header, "RDNOISE")
        saturations = self._amp_values(header, "SATURAT")
        saturate = header.get("SATURATE")
        if isinstance(saturate, (int, float)) and np.isfinite(saturate):
            saturation = float(saturate)
        else:
            saturation = min(saturations) if saturations else DECAM_DEFAULTS["saturation"]
        amplifiers = ()
        if self.is_raw(header):
            amplifiers = tuple(self._amplifier(header, amp, section_id) for amp in "AB"
                               if header.get(f"DATASEC{amp}") is not None)
        return SectionInfo(
            section_id=section_id,
            gain=float(np.mean(gains)) if gains else DECAM_DEFAULTS["gain"],
            read_noise=float(np.mean(noises)) if noises else DECAM_DEFAULTS["read_noise"],
            saturation=saturation,
            pixel_scale=DECAM_DEFAULTS["pixel_scale"],
            data_section=str(header["DATASEC"]).strip() if self.is_raw(header) and "DATASEC" in header else None,
            amplifiers=amplifiers,
        )

    def _amplifier(self, header: fits.Header, amp: str, section_id: str) -> AmplifierInfo:
        def number(key: str, default: float) -> float:
            value = header.get(key)
            return float(value) if isinstance(value, (int, float)) else default

        if header.get(f"BIASSEC{amp}") is None:
            raise MissingHeaderError(f"DECam CCD {section_id}: raw header has DATASEC{amp} but no BIASSEC{amp}")
        return AmplifierInfo(
            name=amp,
            data_section=str(header[f"DATASEC{amp}"]).strip(),
            overscan_section=str(header[f"BIASSEC{amp}"]).strip(),
            gain=number(f"GAIN{amp}", DECAM_DEFAULTS["gain"]),
            read_noise=number(f"RDNOISE{amp}", DECAM_DEFAULTS["read_noise"]),
            saturation=number(f"SATURAT{amp}", DECAM_DEFAULTS["saturation"]),
        )

    def companions(self, path: Path) -> Companions:
        """The ``oow`` weight and ``ood`` mask next to an ``ooi`` image, when they exist."""
        path = Path(path)
        if "_ooi_" not in path.name:
            return Companions()
        weight = path.with_name(path.name.replace("_ooi_", "_oow_"))
        flags = path.with_name(path.name.replace("_ooi_", "_ood_"))
        return Companions(weight=weight if weight.is_file() else None,
                          flags=flags if flags.is_file() else None)

    def companion_of(self, path: Path) -> str | None:
        """CP ``oow`` / ``ood`` files are companions of an ``ooi`` image, not images."""
        name = Path(path).name
        for code, kind in (("_oow_", "weight"), ("_ood_", "mask")):
            if code in name:
                return (f"{name} is a DECam CP {kind} file; ingest its image "
                        f"{name.replace(code, '_ooi_')} (the {kind} is found next to it)")
        return None

    def flags_from_mask(self, mask: np.ndarray) -> np.ndarray:
        """CP mask codes -> `PixelFlag` (`CP_MASK_CODES`); unknown non-zero codes are BAD."""
        mask = np.asarray(mask).astype(np.int64)
        flags = np.where(mask != 0, PixelFlag.BAD, 0).astype(FLAGS_DTYPE)
        for code, flag in CP_MASK_CODES.items():
            flags[mask == code] = flag
        return flags
