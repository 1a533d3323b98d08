"""The ``Synthetic`` instrument: images written by the project's simulator, for tests and demos.

Headers carry ``INSTRUME = 'Synthetic'``, MJD-OBS, EXPTIME, FILTER, GAIN, RDNOISE, SATURATE,
RA and DEC (degrees), AIRMASS, OBJECT and a TAN WCS (the pixel scale is taken from it).  A file
may hold several sections (one image HDU each, named by CCDNAME or EXTNAME) and the weight
(inverse variance) and flags planes in HDUs named WEIGHT and FLAGS; the simulator's flag bits
(1 bad column, 2 saturated, 4 cosmic ray, 8 bleed) are mapped to `improc.flags.PixelFlag`.  A
header with BIASSEC is a raw frame (TRIMSEC / DATASEC give the data section).

A raw frame carries its static bad-pixel mask, like a real camera's defect map, in an HDU named
BPM (`BPM_EXTNAME`) of the raw frame's shape, overscan included: 1 on the simulator's bad
columns, 0 elsewhere.  Cosmic rays and saturation are not in it: preprocessing finds those.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from astropy.io import fits

from improc.sim_detector import FLAG_BAD_COLUMN
from models.instruments.generic import GenericInstrument

if TYPE_CHECKING:
    from improc.simulator import SimulatedImage

__all__ = ["Synthetic", "SYNTHETIC_DEFINITION", "BPM_EXTNAME", "write_simulated_file"]

#: Name of the raw frame's bad-pixel-mask HDU (a flags plane of the raw geometry).
BPM_EXTNAME = "BPM"

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
    "flags_hdus": ["FLAGS", BPM_EXTNAME],
    "flag_bits": {1: "BAD", 2: "SATURATED", 4: "CR", 8: "BLEED"},
    # the simulator renders g, r, i, z with DECam's transformation unless told another
    # (improc.simulator.SimulationParams.transform)
    "transforms": "decam_zhou2020",
}


class Synthetic(GenericInstrument):
    """The simulator's instrument (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(SYNTHETIC_DEFINITION, source="models/instruments/synthetic.py")


def write_simulated_file(sim: SimulatedImage, path: str | os.PathLike, *, raw: bool = True,
                         bias_level: float = 1000.0, overscan_width: int = 32,
                         seed: int = 0) -> Path:
    """Write a simulated image as a Synthetic-instrument FITS file.

    Parameters
    ----------
    sim : improc.simulator.SimulatedImage
        The simulated image (its header carries the header WCS and the exposure keywords).
    path : str or path-like
        Destination.
    raw : bool
        True: a raw uint16 frame, the image plus ``bias_level`` with ``overscan_width`` overscan
        columns of bias plus read noise on the right (BIASSEC, TRIMSEC), to be preprocessed,
        followed by its uint8 bad-pixel mask in an HDU named `BPM_EXTNAME` of the same
        (ny, nx + overscan_width) shape: 1 on the simulator's bad columns, 0 elsewhere.
        False: the float32 image with WEIGHT and FLAGS HDUs, as a reduced product.
    bias_level : float
        Bias (ADU) added to the raw frame.
    overscan_width : int
        Overscan columns of the raw frame.
    seed : int
        Seed of the overscan read noise.

    Returns
    -------
    pathlib.Path
        The file written.
    """
    path = Path(path)
    if raw:
        hdus = _raw_hdus(sim, bias_level=bias_level, overscan_width=overscan_width, seed=seed)
    else:
        hdus = [fits.PrimaryHDU(np.asarray(sim.data, np.float32), header=sim.header.copy()),
                fits.ImageHDU(np.asarray(sim.weight, np.float32), name="WEIGHT"),
                fits.ImageHDU(np.asarray(sim.flags, np.uint16), name="FLAGS")]
    fits.HDUList(hdus).writeto(path)
    return path


def _raw_hdus(sim: SimulatedImage, *, bias_level: float, overscan_width: int,
              seed: int) -> list[fits.PrimaryHDU | fits.ImageHDU]:
    """The raw frame (primary HDU) and its bad-pixel mask (HDU `BPM_EXTNAME`)."""
    header = sim.header.copy()
    ny, nx = sim.data.shape
    rng = np.random.default_rng(seed)
    read_noise_adu = float(header["RDNOISE"]) / float(header["GAIN"])
    frame = np.empty((ny, nx + overscan_width), dtype=np.float64)
    frame[:, :nx] = sim.data + bias_level
    frame[:, nx:] = bias_level + rng.normal(0.0, read_noise_adu, (ny, overscan_width))
    frame = np.clip(np.rint(frame), 0, 65535).astype(np.uint16)
    header["BIASSEC"] = f"[{nx + 1}:{nx + overscan_width},1:{ny}]"
    header["TRIMSEC"] = f"[1:{nx},1:{ny}]"
    header["DATASEC"] = header["TRIMSEC"]
    # The simulator clips at its saturation level; in the raw frame that level sits on the bias.
    header["SATURATE"] = float(header["SATURATE"]) + bias_level - 1.0
    # Static defects only: cosmic rays and saturation are for the pipeline to find.
    bpm = np.zeros(frame.shape, dtype=np.uint8)
    bpm[:, :nx] = (np.asarray(sim.flags) & FLAG_BAD_COLUMN) != 0
    bpm_header = fits.Header()
    bpm_header["COMMENT"] = "Bad-pixel mask of the raw frame (overscan included): 1 = bad pixel."
    return [fits.PrimaryHDU(frame, header=header), fits.ImageHDU(bpm, header=bpm_header, name=BPM_EXTNAME)]
