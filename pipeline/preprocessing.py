"""Preprocessing: a raw exposure section becomes a calibrated Image.

Overscan subtraction and trimming per amplifier from the instrument's header keywords; bias,
flat and linearity corrections when calibration files are configured; a weight plane from
gain, read noise and the image; flags for saturated and non-finite pixels, BAD (weight 0)
for the instrument's known defects, and CR (weight 0) for the pixels cosmic rays hit
(`improc.cosmic_rays.find_cosmic_rays`, L.A.Cosmic, over the whole section).

Known defects come from a bad-pixel mask that travels with the raw frame: the instrument's
flags plane in the same file (``plane_hdu(hdul, "flags")`` of a `GenericInstrument`, e.g. the
``BPM`` HDU of `models.instruments.synthetic` raw frames), in the raw geometry (overscan
included); any non-zero pixel is bad.  A file without one (DECam raw frames) gets no BAD flags.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from improc.cosmic_rays import find_cosmic_rays
from improc.flags import FLAGS_DTYPE, PixelFlag
from improc.preprocessing import Preprocessed, parse_fits_section, preprocess
from models.exposure import Exposure
from models.file_store import content_md5
from models.image import Image, ImageType
from models.instrument import BadInputError, Instrument, SectionInfo, header_to_dict
from pipeline.data_store import DataStore
from pipeline.parameters import ParameterError, StepParams, param
from pipeline.step import Input, Output, Step
from util.config import ConfigError

__all__ = ["PreprocessingParams", "Preprocessor", "nominal_wcs", "calibration_set_digest"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PreprocessingParams(StepParams):
    """How raw frames are calibrated."""

    step_name = "preprocessing"

    overscan_method: Literal["median", "mean", "row_median", "column_median"] = param(
        "median", "Overscan level: one clipped median/mean per amplifier, or one per row/column.")
    bias_file: str | None = param(
        None, "Master bias FITS file; {instrument}, {section} and {filter} are filled in. null: none.")
    flat_file: str | None = param(
        None, "Master flat FITS file (normalized to 1 here); same fields as bias_file. null: none.")
    linearity: tuple[float, ...] = param(
        (), "Linearity correction: coefficients c0, c1, ... of corrected = sum c_k raw^k (ADU). "
        "Empty: none.")
    cosmic_rays: bool = param(True, "Flag the pixels cosmic rays hit (CR, weight 0) by Laplacian edge detection "
                              "(`improc.cosmic_rays`, L.A.Cosmic).")
    cosmic_ray_sigma: float = param(
        5.0, "Least significance of a hit's sharpness S' (noise sigma).  On simulated 2048 x 2048 frames, 4.5 "
             "flagged ~90 noise pixels besides the 300 hits, 5.0 ~15; hits of 8 sigma or more found: 99.7 %.")
    cosmic_ray_contrast: float = param(
        3.0, "Least ratio of a hit's Laplacian to the fine structure around it (van Dokkum's f_lim: 2 for "
             "well-sampled images, up to 5 for undersampled ones).")
    cosmic_ray_neighbor_fraction: float = param(
        0.3, "A hit's outer neighbours join above this fraction of cosmic_ray_sigma (a track's faint ends).")

    def validate(self) -> None:
        if not (self.cosmic_ray_sigma > 0 and self.cosmic_ray_contrast > 0 and self.cosmic_ray_neighbor_fraction > 0):
            raise ParameterError("preprocessing cosmic_ray_sigma, cosmic_ray_contrast and "
                                 "cosmic_ray_neighbor_fraction must be > 0")

    def hashed(self) -> dict[str, Any]:
        """The parameters, with each calibration file template replaced by the content of the
        files it names (`calibration_set_digest`): moving the files changes nothing, changing
        one changes the provenance."""
        values = super().hashed()
        for name in ("bias_file", "flat_file"):
            if values.get(name) is not None:
                values[name] = calibration_set_digest(values[name])
        return values


_TEMPLATE_FIELDS = ("instrument", "section", "filter")


def calibration_set_digest(template: str) -> str:
    """A digest of every file a calibration template can name: their names below the template's
    fixed folder and their md5s.

    Parameters
    ----------
    template : str
        A path with ``{instrument}``, ``{section}`` and ``{filter}`` fields (or none).

    Raises
    ------
    ConfigError
        The template has another field, or names no file.
    """
    try:
        pattern = template.format(**{field: "*" for field in _TEMPLATE_FIELDS})
    except (KeyError, IndexError) as exc:
        raise ConfigError(f"calibration file template {template!r} uses unknown field {exc}; "
                          f"known: {', '.join(_TEMPLATE_FIELDS)}") from None
    pattern = str(Path(pattern).expanduser())
    files = sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_file())
    if not files:
        raise ConfigError(f"calibration file template {template!r} names no file ({pattern})")
    fixed = Path(pattern.split("*", 1)[0]).parent if "*" in pattern else files[0].parent
    manifest = [[str(path.relative_to(fixed)), content_md5(path)] for path in files]
    return "md5:" + hashlib.md5(json.dumps(manifest).encode()).hexdigest()


def nominal_wcs(ra: float, dec: float, pixel_scale: float, shape: tuple[int, int]) -> WCS:
    """A north-up, east-left TAN WCS centred on (ra, dec): for raw frames without a WCS.

    Astrometric calibration replaces it; it only needs to be within its search radius.
    """
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = [(shape[1] + 1) / 2.0, (shape[0] + 1) / 2.0]
    wcs.wcs.cdelt = [-pixel_scale / 3600.0, pixel_scale / 3600.0]
    return wcs


def _calibration_frame(template: str | None, fields: dict[str, str], shape: tuple[int, int],
                       what: str) -> np.ndarray | None:
    if template is None:
        return None
    path = Path(template.format(**fields)).expanduser()
    try:
        frame = np.asarray(fits.getdata(path), dtype=np.float32)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc}") from exc
    if frame.shape != shape:
        raise ConfigError(f"{what} file {path} has shape {frame.shape}, the trimmed section has {shape}")
    return frame


def _data_box(info: SectionInfo, raw_shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the light-sensitive region: the union of the amplifiers' data sections."""
    texts = [a.data_section for a in info.amplifiers if a.data_section] or (
        [info.data_section] if info.data_section else [])
    if not texts:
        return 0, raw_shape[0], 0, raw_shape[1]
    boxes = [parse_fits_section(t) for t in texts]
    return (min(b[0].start for b in boxes), max(b[0].stop for b in boxes),
            min(b[1].start for b in boxes), max(b[1].stop for b in boxes))


def _raw_bad_pixel_mask(exposure: Exposure, instrument: Instrument, section: str,
                        raw_shape: tuple[int, int]) -> np.ndarray | None:
    """The exposure file's bad-pixel mask (see the module docstring) as booleans, or None."""
    finder = getattr(instrument, "plane_hdu", None)
    if finder is None:
        return None
    hdul = exposure.open()
    index = finder(hdul, "flags")
    if index is None:
        return None
    plane = np.asarray(hdul[index].data)
    if plane.shape != tuple(raw_shape):
        raise BadInputError(f"{exposure.origin}: bad-pixel mask HDU {index} ({hdul[index].name}) has "
                            f"shape {plane.shape}, expected the raw frame shape {tuple(raw_shape)} "
                            f"of section {section}")
    return plane != 0


class Preprocessor(Step):
    """Make the Image of one exposure section."""

    process = "preprocessing"
    # 1.1: known defects from the raw frame's bad-pixel mask are flagged BAD
    # 1.2: cosmic-ray hits flagged CR with weight 0 (find_cosmic_rays over the whole section)
    version = "1.2.0"
    Params = PreprocessingParams
    inputs = (Input("exposure"),)
    outputs = (Output("image", Image, parents={"exposure_id": "exposure", "section_id": "section_id"}),)

    def compute(self, raw: np.ndarray, info: SectionInfo, *, bias: np.ndarray | None = None,
                flat: np.ndarray | None = None,
                bad_pixel_mask: np.ndarray | None = None) -> Preprocessed:
        """Preprocess one raw section (each amplifier with its own overscan, gain and noise).

        Parameters
        ----------
        raw
            (ny_raw, nx_raw) raw frame of the section in ADU, overscan included.
        info
            The section's detector values and data / overscan sections (per amplifier if any).
        bias, flat
            Master bias (ADU) and flat, (ny, nx) like the trimmed image; None for none.
        bad_pixel_mask
            (ny_raw, nx_raw) array like ``raw``, non-zero (True) on known bad pixels, which are
            flagged BAD with weight 0 in the trimmed image; None for none.

        Returns
        -------
        Preprocessed
            The trimmed image, weight and flags, and the largest overscan level subtracted.

        Raises
        ------
        ValueError
            If ``bad_pixel_mask`` does not have the shape of ``raw``, or as for
            `improc.preprocessing.preprocess`.
        """
        if bad_pixel_mask is not None and np.shape(bad_pixel_mask) != np.shape(raw):
            raise ValueError(f"bad_pixel_mask must have the raw frame shape {np.shape(raw)} of "
                             f"section {info.section_id}, got {np.shape(bad_pixel_mask)}")
        p = self.params
        linearity = np.asarray(p.linearity, dtype=float) if p.linearity else None
        y0, y1, x0, x1 = _data_box(info, raw.shape)
        amps = info.amplifiers or [info]
        image = np.zeros((y1 - y0, x1 - x0), np.float32)
        weight = np.zeros_like(image)
        flags = np.zeros(image.shape, FLAGS_DTYPE)
        levels = []
        for amp in amps:
            data = parse_fits_section(amp.data_section) if amp.data_section else (slice(y0, y1), slice(x0, x1))
            overscan = parse_fits_section(amp.overscan_section) if amp.overscan_section else None
            out = (slice(data[0].start - y0, data[0].stop - y0), slice(data[1].start - x0, data[1].stop - x0))
            bpm = None if bad_pixel_mask is None else bad_pixel_mask[data]
            part = preprocess(raw, overscan=overscan, data=data, gain=amp.gain, read_noise=amp.read_noise,
                              saturation=amp.saturation, linearity=linearity,
                              bias=None if bias is None else bias[out],
                              flat=None if flat is None else flat[out],
                              bad_pixel_mask=bpm,
                              overscan_method=p.overscan_method if overscan is not None else "median")
            image[out], weight[out], flags[out] = part.image, part.weight, part.flags
            levels.append(float(np.nanmedian(part.overscan_level)) if overscan is not None else 0.0)
        if p.cosmic_rays:
            with np.errstate(divide="ignore"):
                variance = np.where(weight > 0, np.float32(1.0) / weight, np.float32(np.inf))
            hits = find_cosmic_rays(image, variance, flags != 0, sigma_clip=p.cosmic_ray_sigma,
                                    contrast=p.cosmic_ray_contrast, neighbor_fraction=p.cosmic_ray_neighbor_fraction)
            flags[hits] |= FLAGS_DTYPE(PixelFlag.CR)
            weight[hits] = 0.0
        return Preprocessed(image=image, weight=weight, flags=flags, overscan_level=float(np.max(levels)))

    def run(self, ds: DataStore) -> None:
        """Make the Image of ``ds``'s exposure section, unless it exists (see `Step.run`).

        Raises
        ------
        ValueError
            A calibration file cannot be used, or the exposure's bad-pixel mask has a shape
            other than the raw section's (`BadInputError`, naming the file).
        """
        exposure, section = ds.exposure, ds.section_id
        raw, header = exposure.read_section(section)
        instrument = exposure.instrument_object
        info = instrument.section_info(header, section)
        y0, y1, x0, x1 = _data_box(info, raw.shape)
        fields = {"instrument": exposure.instrument, "section": section, "filter": exposure.filter}
        bias = _calibration_frame(self.params.bias_file, fields, (y1 - y0, x1 - x0), "bias")
        flat = _calibration_frame(self.params.flat_file, fields, (y1 - y0, x1 - x0), "flat")
        if flat is not None:
            flat = flat / np.nanmedian(flat)
        mask = _raw_bad_pixel_mask(exposure, instrument, section, np.shape(raw))
        result = self.compute(np.asarray(raw), info, bias=bias, flat=flat, bad_pixel_mask=mask)
        wcs = self._wcs(header, exposure, info, (y0, x0), result.image.shape)
        header = header.copy()
        # The image is overscan-subtracted, so its saturation level is lower by the overscan.
        header["GAIN"], header["RDNOISE"] = info.gain, info.read_noise
        header["SATURATE"] = info.saturation - result.overscan_level
        obs = instrument.observation(header, filename=exposure.origin)
        ds.new_product(self, "image", data=result.image, weight=result.weight, flags=result.flags, wcs=wcs,
                       instrument=exposure.instrument, type=ImageType.SCIENCE, filter=obs.filter,
                       mjd=obs.mjd, end_mjd=obs.mjd + obs.exp_time / 86400.0, exp_time=obs.exp_time,
                       airmass=obs.airmass, target=obs.target, project=obs.project,
                       header=header_to_dict(header))

    def fingerprint_figures(self, ds: DataStore) -> dict[str, Any]:
        image = ds.get_image()
        good = image.flags == 0
        return {**super().fingerprint_figures(ds), "data_median": float(np.median(image.data[good])),
                "data_sum": float(np.sum(image.data[good], dtype=np.float64)),
                "weight_median": float(np.median(image.weight[good])), "flagged": int(np.sum(~good))}

    @staticmethod
    def _wcs(header: fits.Header, exposure, info: SectionInfo, origin: tuple[int, int],
             shape: tuple[int, int]) -> WCS:
        """The header WCS shifted to the trimmed frame, else a nominal one from the pointing."""
        wcs = WCS(header) if "CTYPE1" in header else None
        if wcs is not None and wcs.has_celestial:
            wcs = wcs.celestial.deepcopy()
            wcs.wcs.crpix = [wcs.wcs.crpix[0] - origin[1], wcs.wcs.crpix[1] - origin[0]]
            return wcs
        if exposure.ra is None or exposure.dec is None:
            raise BadInputError(f"exposure {exposure.origin} has neither a WCS nor RA/DEC pointing keywords")
        log.warning("%s has no WCS; using a nominal one from the pointing and pixel scale", exposure.origin)
        return nominal_wcs(exposure.ra, exposure.dec, info.pixel_scale, shape)
