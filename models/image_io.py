"""Reading reduced products into `Image` objects, and ingesting original files.

`image_from_file` builds one `models.image.Image` (in memory) from one section of a reduced
product, with its weight and flags planes taken from (in this order) the arguments, companion
files found by the instrument (DECam ``oow`` / ``ood`` next to an ``ooi``), HDUs of the same file
(the simulator's WEIGHT / FLAGS), or the noise model described in `models.image`.

`ingest_file` stores an original file as an `Exposure` and, for reduced products, one `Image`
per section, atomically (`models.saving.save_products`); ingesting the same file again returns
the stored rows and writes nothing.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from improc.flags import FLAGS_DTYPE, PixelFlag
from models.context import Context, current_context
from models.exposure import Exposure, exposure_provenance
from models.image import Image, ImageType, ingest_provenance
from models.instrument import (BadInputError, Instrument, SectionInfo, get_instrument,
                               guess_instrument, header_to_dict, merged_header, open_fits)
from models.provenance import Provenance
from models.saving import save_products

__all__ = ["image_from_file", "ingest_file", "model_weight", "pixel_flags"]

log = logging.getLogger(__name__)

PlaneSource = str | os.PathLike | np.ndarray | None

_NO_DATA = FLAGS_DTYPE(PixelFlag.NO_DATA)
_SATURATED = FLAGS_DTYPE(PixelFlag.SATURATED)


def model_weight(data: np.ndarray, *, gain: float, read_noise: float, sky_level: float = 0.0) -> np.ndarray:
    """Inverse variance (1/ADU^2) of an image from its gain, read noise and pixel values.

    ``1 / ((read_noise / gain)**2 + max(data + sky_level, 0) / gain)``; ``sky_level`` is the sky
    already subtracted from ``data`` (ADU).  Non-finite pixels get weight 0.
    """
    variance = (read_noise / gain) ** 2 + np.maximum(data + np.float32(sky_level), 0) / np.float32(gain)
    with np.errstate(divide="ignore", invalid="ignore"):
        weight = np.where(np.isfinite(variance) & (variance > 0), 1.0 / variance, 0.0)
    return weight.astype(np.float32)


def pixel_flags(data: np.ndarray, *, saturation: float, sky_level: float = 0.0) -> np.ndarray:
    """NO_DATA where ``data`` is not finite, SATURATED where ``data + sky_level >= saturation``."""
    flags = np.zeros(data.shape, dtype=FLAGS_DTYPE)
    finite = np.isfinite(data)
    flags[~finite] |= _NO_DATA
    with np.errstate(invalid="ignore"):
        flags[finite & (data + sky_level >= saturation)] |= _SATURATED
    return flags


def _celestial_wcs(header: fits.Header, where: str) -> WCS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            wcs = WCS(header)
        except Exception as exc:  # astropy raises several types for malformed WCS keywords
            raise BadInputError(f"{where}: unreadable WCS ({exc})") from exc
    if not wcs.has_celestial:
        raise BadInputError(f"{where}: no celestial WCS (CTYPE1/CTYPE2)")
    return wcs.celestial


#: Largest footprint radius accepted, degrees (wider-field cameras exist; this catches nonsense).
MAX_FOOTPRINT_RADIUS_DEG = 30.0


def _check_footprint(wcs: WCS, shape: tuple[int, int], where: str) -> None:
    """The WCS maps the image to a small, finite patch of sky, and back (BadInputError if not)."""
    from improc import footprint

    ny, nx = shape
    x = np.array([-0.5, nx - 0.5, nx - 0.5, -0.5, (nx - 1) / 2.0])
    y = np.array([-0.5, -0.5, ny - 0.5, ny - 0.5, (ny - 1) / 2.0])
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            ra, dec = wcs.all_pix2world(x, y, 0)
            back_x, back_y = wcs.all_world2pix(ra, dec, 0, tolerance=1e-6, maxiter=50, quiet=False)
        except Exception as exc:  # astropy's NoConvergence and friends: a WCS that does not invert
            raise BadInputError(f"{where}: the WCS does not map the image's corners to the sky and "
                                f"back ({type(exc).__name__})") from None
    if not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))):
        raise BadInputError(f"{where}: the WCS puts the image's corners nowhere on the sky (not finite)")
    if np.max(np.hypot(back_x - x, back_y - y)) > 0.5:
        raise BadInputError(f"{where}: the WCS does not invert (corners come back "
                            f"{np.max(np.hypot(back_x - x, back_y - y)):.3g} pixels off)")
    radius = float(footprint.polygon_radii(ra[:4], dec[:4], np.array([ra[4]]), np.array([dec[4]]))[0])
    if not radius <= MAX_FOOTPRINT_RADIUS_DEG:
        raise BadInputError(f"{where}: the WCS makes the image {radius:.3g} degrees in radius (more than "
                            f"{MAX_FOOTPRINT_RADIUS_DEG:g}): a wrong scale or reference pixel")


def _select_hdu(sections: dict[str, int], hdul: fits.HDUList, *, hdu: int | str | None,
                section_id: str | None, filename: str) -> tuple[str, int]:
    if hdu is not None:
        try:
            index = hdul.index_of(hdu)
        except (KeyError, IndexError):
            raise BadInputError(f"{filename}: no HDU {hdu!r} (it has {len(hdul)} HDUs)") from None
        matching = [sid for sid, i in sections.items() if i == index]
        if not matching:
            raise BadInputError(f"{filename}: HDU {hdu!r} is not an image section; sections: "
                                f"{', '.join(f'{s} (HDU {i})' for s, i in sections.items())}")
        return matching[0], index
    if section_id is not None:
        if section_id not in sections:
            raise BadInputError(f"{filename}: no section {section_id!r}; sections: {', '.join(sections)}")
        return section_id, sections[section_id]
    if len(sections) > 1:
        raise BadInputError(f"{filename} has {len(sections)} image sections ({', '.join(sections)}); "
                            "pass hdu= or section_id=")
    return next(iter(sections.items()))


def _read_plane(source: PlaneSource, inst: Instrument, *, kind: str, section_id: str, index: int,
                shape: tuple[int, int], filename: str,
                cache: dict[Path, fits.HDUList] | None = None) -> np.ndarray | None:
    """The raw weight or mask array from an array, a companion file or None."""
    if source is None:
        return None
    if isinstance(source, np.ndarray):
        plane, where = source, f"{kind} array"
    else:
        path = Path(source)
        cache = {} if cache is None else cache
        if path not in cache:
            cache[path] = open_fits(path)
        hdul = cache[path]
        try:
            sections = inst.section_hdus(hdul, filename=path.name)
        except BadInputError:
            sections = {}
        plane_index = sections.get(section_id, index if index < len(hdul) else None)
        if plane_index is None or hdul[plane_index].data is None:
            raise BadInputError(f"{path.name}: no {kind} plane for section {section_id} of {filename}")
        plane, where = hdul[plane_index].data, f"{kind} file {path.name}"
    if np.shape(plane) != shape:
        raise BadInputError(f"{filename}: {where} has shape {np.shape(plane)}, the image has {shape}")
    return np.asarray(plane)


def _planes(data: np.ndarray, info: SectionInfo, inst: Instrument, header: fits.Header, *,
            weight_raw: np.ndarray | None, mask_raw: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """Cleaned data, weight and flags (see the noise model in `models.image`)."""
    sky = inst.sky_level(header)
    flags = pixel_flags(data, saturation=info.saturation, sky_level=sky)
    if mask_raw is not None:
        flags |= inst.flags_from_mask(mask_raw)
    clean = np.where(np.isfinite(data), data, 0.0).astype(np.float32)
    if weight_raw is not None:
        weight = inst.weight_from_plane(weight_raw)
    else:
        weight = model_weight(clean, gain=info.gain, read_noise=info.read_noise, sky_level=sky)
    flags[weight <= 0] |= _NO_DATA
    weight[flags != 0] = 0.0
    return clean, weight, flags


def _same_file_plane(inst: Instrument, hdul: fits.HDUList, kind: str) -> np.ndarray | None:
    finder = getattr(inst, "plane_hdu", None)
    index = finder(hdul, kind) if finder is not None else None
    return None if index is None else np.asarray(hdul[index].data)


def _build_image(path: Path, hdul: fits.HDUList, inst: Instrument, *, section_id: str, index: int,
                 weight: PlaneSource, flags: PlaneSource, exposure: Exposure | None,
                 provenance: Provenance,
                 cache: dict[Path, fits.HDUList]) -> Image:
    name = path.name
    where = f"HDU {index} of {name}"
    data = hdul[index].data
    if data is None or np.ndim(data) != 2:
        raise BadInputError(f"{where}: not a 2-D image")
    data = np.asarray(data, dtype=np.float32)
    if not np.isfinite(data).any():
        raise BadInputError(f"{where}: no finite pixel (all NaN or infinite)")
    header = merged_header(hdul[0].header, hdul[index].header if index else None)
    wcs = _celestial_wcs(hdul[index].header if index else hdul[0].header, where)
    _check_footprint(wcs, data.shape, where)
    obs = inst.observation(header, filename=name)
    info = inst.section_info(header, section_id)
    companions = inst.companions(path)
    plane_args = dict(section_id=section_id, index=index, shape=data.shape, filename=name, cache=cache)
    weight_raw = _read_plane(weight if weight is not None else companions.weight, inst,
                             kind="weight", **plane_args)
    mask_raw = _read_plane(flags if flags is not None else companions.flags, inst,
                           kind="mask", **plane_args)
    if weight_raw is None:
        weight_raw = _same_file_plane(inst, hdul, "weight")
    if mask_raw is None:
        mask_raw = _same_file_plane(inst, hdul, "flags")
    clean, weight_plane, flag_plane = _planes(data, info, inst, header,
                                              weight_raw=weight_raw, mask_raw=mask_raw)
    # Downstream steps read the detector values from the image header, whatever keywords the
    # instrument uses (DECam has GAINA/GAINB per amplifier): write the section's values.
    header = header.copy()
    header["GAIN"] = (info.gain, "e-/ADU (section value)")
    header["RDNOISE"] = (info.read_noise, "e- (section value)")
    header["SATURATE"] = (info.saturation, "ADU (section value)")
    return Image(
        provenance=provenance, exposure=exposure, data=clean, weight=weight_plane, flags=flag_plane,
        wcs=wcs, section_id=section_id, instrument=inst.name, type=ImageType.SCIENCE,
        filter=obs.filter, mjd=obs.mjd, end_mjd=obs.mjd + obs.exp_time / 86400.0,
        exp_time=obs.exp_time, airmass=obs.airmass, target=obs.target, project=obs.project,
        header=header_to_dict(header),
    )


def image_from_file(path: str | os.PathLike, *, instrument: str | Instrument | None = None,
                    weight: PlaneSource = None, flags: PlaneSource = None,
                    hdu: int | str | None = None, section_id: str | None = None,
                    exposure: Exposure | None = None, provenance: Provenance | None = None) -> Image:
    """An Image (in memory, not saved) from one section of a reduced product.

    Parameters
    ----------
    path : str or path-like
        The image file.
    instrument : str or Instrument, optional
        Default: guessed from the primary header.
    weight, flags : path or numpy.ndarray, optional
        Inverse-variance weight and mask (instrument codes, e.g. DECam ``ood``) as arrays of the
        image's shape or files holding the same section.  None: the instrument's companion file
        next to ``path`` if any, else a WEIGHT / FLAGS HDU of the same file if the instrument
        has one, else the noise model (weight) and the pixel values (flags).
    hdu : int or str, optional
        Index or name of the HDU to read.
    section_id : str, optional
        Section to read (e.g. ``"N6"``); needed when the file has several and ``hdu`` is None.
    exposure : Exposure, optional
        The exposure the image belongs to (sets ``exposure_id``).
    provenance : Provenance, optional
        Default: `models.image.ingest_provenance` of the instrument.

    Returns
    -------
    Image

    Raises
    ------
    BadInputError
        Corrupt file, no image HDU, no celestial WCS, missing header keywords, no finite pixel,
        planes of the wrong shape; the message names the file and the problem.
    UnknownInstrumentError
        The instrument cannot be guessed.
    """
    path = Path(path)
    hdul = open_fits(path)
    inst = (get_instrument(instrument) if instrument is not None
            else guess_instrument(hdul[0].header, filename=path))
    companion = inst.companion_of(path)
    if companion is not None:
        raise BadInputError(companion)
    sections = inst.section_hdus(hdul, filename=path.name)
    chosen, index = _select_hdu(sections, hdul, hdu=hdu, section_id=section_id, filename=path.name)
    return _build_image(path, hdul, inst, section_id=chosen, index=index,
                        weight=weight, flags=flags, exposure=exposure,
                        provenance=provenance or ingest_provenance(), cache={})


def _stored(origin_md5: str, exp_prov: Provenance, img_prov: Provenance,
            context: Context) -> tuple[Exposure, list[Image]] | None:
    with context.session() as sess:
        exposure = Exposure.find_existing(origin_md5, exp_prov.id, session=sess)
        if exposure is None:
            return None
        images = list(sess.scalars(select(Image).where(
            Image.exposure_id == exposure.id, Image.provenance_id == img_prov.id)
            .order_by(Image.section_id)))
        return exposure, images


def ingest_file(path: str | os.PathLike, *, instrument: str | Instrument | None = None,
                weight: PlaneSource = None, flags: PlaneSource = None,
                context: Context | None = None) -> tuple[Exposure, list[Image]]:
    """Store an original file as an Exposure and, for reduced products, one Image per section.

    Parameters
    ----------
    path : str or path-like
        A raw frame or a reduced product (DECam CP ``ooi``, whose ``oow`` / ``ood`` are found
        next to it; a single-HDU generic image; simulator output).
    instrument : str or Instrument, optional
        Default: guessed from the primary header.
    weight, flags : path or numpy.ndarray, optional
        Weight and mask of a reduced product with one section, when they are separate files that
        the instrument does not find by itself (see `image_from_file`).
    context : Context, optional
        Database and file store; default: the current context.

    Returns
    -------
    exposure : Exposure
    images : list of Image
        One per section for reduced products, sorted by section id; empty for raw frames
        (preprocessing makes their images).

    Raises
    ------
    BadInputError, UnknownInstrumentError
        As `image_from_file`; nothing is saved.

    Notes
    -----
    The exposure has the "exposure" provenance and the images the "ingest" provenance (code
    version 1.0.0, parameters ``{"instrument": name}``).  If the same original file (same md5)
    was already ingested with the same provenance, the stored rows are returned and nothing is
    written.  Files and rows are saved atomically with `models.saving.save_products`.
    """
    context = context or current_context()
    path = Path(path)
    with context.activate():      # instruments of the context's configuration
        exposure = Exposure.from_file(path, instrument)
        inst = exposure.instrument_object
    exp_prov, img_prov = exposure_provenance(), ingest_provenance()
    found = _stored(exposure.origin_md5, exp_prov, img_prov, context)
    images: list[Image] = []
    if (weight is not None or flags is not None) and exposure.is_raw:
        raise BadInputError(f"{path.name} is a raw frame: preprocessing makes its weight and flags, "
                            "so it takes no --weight / --flags")
    if found is not None:
        return found
    if not exposure.is_raw:
        hdul = exposure.open()
        sections = inst.section_hdus(hdul, filename=path.name)
        if (weight is not None or flags is not None) and len(sections) != 1:
            raise BadInputError(f"{path.name} has {len(sections)} sections; a weight or flags file "
                                "belongs to a single image")
        cache: dict[Path, Any] = {}
        images = [_build_image(path, hdul, inst, section_id=sid, index=index,
                               weight=weight, flags=flags, exposure=exposure, provenance=img_prov,
                               cache=cache)
                  for sid, index in sorted(sections.items())]
    try:
        with context.session() as sess:
            img_prov.save(sess)
            save_products([exposure, *images], context=context, session=sess)
    except IntegrityError:
        found = _stored(exposure.origin_md5, exp_prov, img_prov, context)
        if found is None:
            raise
        log.info("%s was ingested concurrently by another process; using the stored rows", path.name)
        return found
    return exposure, images
