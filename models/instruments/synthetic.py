"""The ``Synthetic`` instrument: images written by the project's simulator, for tests and demos.

Headers carry ``INSTRUME = 'Synthetic'``, MJD-OBS, EXPTIME, FILTER, GAIN, RDNOISE, SATURATE,
RA and DEC (degrees), AIRMASS, OBJECT and a TAN WCS (the pixel scale is taken from it).  A file
may hold several sections (one image HDU each, named by CCDNAME or EXTNAME) and the weight
(inverse variance) and flags planes in HDUs named WEIGHT and FLAGS; the simulator's flag bits
(1 bad column, 2 saturated, 4 cosmic ray, 8 bleed) are mapped to `improc.flags.PixelFlag`.  A
header with BIASSEC is a raw frame (TRIMSEC / DATASEC give the data section).
"""

from __future__ import annotations

from models.instruments.generic import GenericInstrument

__all__ = ["Synthetic", "SYNTHETIC_DEFINITION"]

SYNTHETIC_DEFINITION = {
    "name": "Synthetic",
    "description": "Images made by the SeeChange simulator (tests and demos).",
    "match": {"INSTRUME": r"^Synthetic$"},
    "product": "auto",
    "keywords": {
        "mjd": ["MJD-OBS"], "date": ["DATE-OBS"], "exp_time": ["EXPTIME"], "filter": ["FILTER"],
        "airmass": ["AIRMASS"], "ra": ["RA"], "dec": ["DEC"], "target": ["OBJECT"],
        "project": ["PROJECT", "PROPID"], "gain": ["GAIN"], "read_noise": ["RDNOISE"],
        "saturation": ["SATURATE"], "pixel_scale": ["PIXSCALE"],
        "section_id": ["CCDNAME", "EXTNAME"],
    },
    "defaults": {"gain": 1.0, "read_noise": 5.0, "saturation": 65535.0, "pixel_scale": 0.2,
                 "section_id": "0", "airmass": None},
    "ra_unit": "deg",
    "weight_hdus": ["WEIGHT"],
    "flags_hdus": ["FLAGS"],
    "flag_bits": {1: "BAD", 2: "SATURATED", 4: "CR", 8: "BLEED"},
}


class Synthetic(GenericInstrument):
    """The simulator's instrument (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(SYNTHETIC_DEFINITION, source="models/instruments/synthetic.py")
