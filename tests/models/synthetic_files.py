"""Small synthetic FITS files and in-memory images for the model tests (no database needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

__all__ = ["tan_wcs", "synthetic_header", "write_synthetic"]


def tan_wcs(ra: float, dec: float, shape: tuple[int, int], *, scale_arcsec: float = 0.3,
            rotation_deg: float = 0.0) -> WCS:
    """A TAN WCS centred on the image, north up and east left before rotation."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = [(shape[1] + 1) / 2, (shape[0] + 1) / 2]
    s, t = scale_arcsec / 3600.0, np.radians(rotation_deg)
    wcs.wcs.cd = [[-s * np.cos(t), s * np.sin(t)], [s * np.sin(t), s * np.cos(t)]]
    return wcs


def synthetic_header(*, ra: float = 150.0, dec: float = 2.0, mjd: float = 60000.5, filter: str = "r",
                     exptime: float = 60.0, gain: float = 2.0, rdnoise: float = 4.0,
                     saturate: float = 50000.0, airmass: float = 1.2) -> fits.Header:
    """The primary header the simulator writes."""
    return fits.Header({"INSTRUME": "Synthetic", "MJD-OBS": mjd, "EXPTIME": exptime, "FILTER": filter,
                        "GAIN": gain, "RDNOISE": rdnoise, "SATURATE": saturate, "RA": ra, "DEC": dec,
                        "AIRMASS": airmass, "OBJECT": "field1"})


def write_synthetic(path: Path, *, shape: tuple[int, int] = (64, 80), sky: float = 100.0, seed: int = 0,
                    sections: tuple[str, ...] = (), planes: bool = False, wcs: bool = True,
                    data: np.ndarray | None = None, **header_values) -> Path:
    """Write a Synthetic-instrument file.

    With no ``sections``: one primary HDU holding the image.  With sections: an empty primary and
    one image HDU per section (EXTNAME = section id, WCS offset by 0.1 deg in Dec per section).
    ``planes`` adds WEIGHT and FLAGS HDUs (weight 1/(sky/gain), flags 0 except bit 2 at [0, 0]).
    """
    rng = np.random.default_rng(seed)
    header = synthetic_header(**header_values)
    ra, dec = header["RA"], header["DEC"]
    if data is None:
        data = (sky + rng.normal(0, np.sqrt(sky), shape)).astype(np.float32)
    hdus = []
    if not sections:
        if wcs:
            header.update(tan_wcs(ra, dec, shape).to_header())
        hdus.append(fits.PrimaryHDU(data, header=header))
    else:
        hdus.append(fits.PrimaryHDU(header=header))
        for k, name in enumerate(sections):
            ext = tan_wcs(ra, dec + 0.1 * k, shape).to_header() if wcs else fits.Header()
            hdus.append(fits.ImageHDU(data + k, header=ext, name=name))
    if planes:
        hdus.append(fits.ImageHDU(np.full(shape, header["GAIN"] / sky, np.float32), name="WEIGHT"))
        flags = np.zeros(shape, np.uint16)
        flags[0, 0] = 2
        hdus.append(fits.ImageHDU(flags, name="FLAGS"))
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return path


def footprint_rows(n: int, rng: np.random.Generator, *, provenance_id: str,
                   size_deg: tuple[float, float] = (0.1, 0.6)) -> list[dict]:
    """``images`` rows (dicts for a core INSERT) of n square footprints spread over the sky.

    Centres are uniform on the sphere, sizes uniform in ``size_deg``, rotations random; corners
    come from a gnomonic projection (as a TAN WCS would give), bounds and radius from
    `improc.footprint`.  No files: ``filepath`` is None.
    """
    import datetime
    import uuid

    from improc import footprint
    from models.image import ImageType

    ra0 = rng.uniform(0, 360, n)
    dec0 = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    half = np.radians(rng.uniform(*size_deg, n)) / 2
    angle = rng.uniform(0, np.pi / 2, n)
    unit = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float)
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    xi = half[:, None] * (unit[None, :, 0] * cos - unit[None, :, 1] * sin)
    eta = half[:, None] * (unit[None, :, 0] * sin + unit[None, :, 1] * cos)
    ra, dec = footprint.inverse_gnomonic(xi, eta, ra0[:, None], dec0[:, None])
    ra_c, dec_c = footprint.polygon_centers(ra, dec)
    minra, maxra, mindec, maxdec = footprint.polygon_bounds(ra, dec)
    radius = footprint.polygon_radii(ra, dec, ra_c, dec_c)
    mjd = rng.uniform(58000, 60000, n)
    now = datetime.datetime.now(datetime.timezone.utc)
    filters = np.array(["g", "r", "i"])[rng.integers(0, 3, n)]
    rows = []
    for k in range(n):
        rows.append({
            "id": uuid.UUID(int=int(rng.integers(0, 2**63)) << 64 | k), "provenance_id": provenance_id,
            "exposure_id": None, "section_id": "0", "instrument": "Synthetic",
            "type": ImageType.SCIENCE, "filter": str(filters[k]), "mjd": float(mjd[k]),
            "end_mjd": float(mjd[k]) + 0.001, "exp_time": 60.0, "airmass": 1.2, "target": None,
            "project": None, "nx": 2048, "ny": 2048, "ra": float(ra_c[k]), "dec": float(dec_c[k]),
            "ra_corner_00": float(ra[k, 0]), "ra_corner_10": float(ra[k, 1]),
            "ra_corner_11": float(ra[k, 2]), "ra_corner_01": float(ra[k, 3]),
            "dec_corner_00": float(dec[k, 0]), "dec_corner_10": float(dec[k, 1]),
            "dec_corner_11": float(dec[k, 2]), "dec_corner_01": float(dec[k, 3]),
            "minra": float(minra[k]), "maxra": float(maxra[k]), "mindec": float(mindec[k]),
            "maxdec": float(maxdec[k]), "radius": float(radius[k]), "fwhm_estimate": None,
            "zero_point_estimate": None, "lim_mag_estimate": None, "bkg_mean_estimate": None,
            "bkg_rms_estimate": None, "bad_flags": 0, "header": {}, "wcs_header": None,
            "created_at": now, "filepath": None, "md5sum": None,
        })
    return rows
