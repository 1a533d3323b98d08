"""Gaia reference catalogs: read local healpix-chunked FITS files or query the Gaia archive.

Both readers return an `astropy.table.Table` with Gaia's own column names and units
(`GAIA_COLUMNS`); a column the source lacks is added filled with NaN (``source_id``: -1).

Local folders follow the Legacy Surveys layout (``legacypipe``): one FITS binary table per
HEALPix pixel of the RING scheme at ``nside = 32``, named ``chunk-NNNNN.fits`` with NNNNN the
pixel index.  Only the chunks that can overlap the requested box are opened, so a full-sky
folder can be read quickly.  A folder whose files are not named that way is read whole.
"""

from __future__ import annotations

import math
import re
import socket
import time
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.io import fits
from astropy.table import Table, vstack

from util.config import ConfigError

__all__ = [
    "GAIA_COLUMNS",
    "CatalogError",
    "GaiaQueryError",
    "gaia_folder_files",
    "healpix_ring_index",
    "read_gaia_folder",
    "write_gaia_folder",
    "gaia_adql",
    "query_gaia_astroquery",
]

#: Columns of every returned table, with their units (None: dimensionless).
GAIA_COLUMNS: dict[str, u.UnitBase | None] = {
    "source_id": None,
    "ra": u.deg,
    "dec": u.deg,
    "ra_error": u.mas,
    "dec_error": u.mas,
    "pmra": u.mas / u.yr,
    "pmdec": u.mas / u.yr,
    "parallax": u.mas,
    "ref_epoch": u.yr,
    "phot_g_mean_mag": u.mag,
    "phot_bp_mean_mag": u.mag,
    "phot_rp_mean_mag": u.mag,
}

#: Columns without which a file is not a usable reference catalog.
REQUIRED_COLUMNS: tuple[str, ...] = ("ra", "dec", "phot_g_mean_mag")

_CHUNK_NAME = re.compile(r"^chunk-(\d+)\.fits(\.gz)?$")


class CatalogError(ConfigError):
    """A reference-catalog file that cannot be read as one (not FITS, missing columns).

    A fault of the set-up (the configured catalog), not of an image: no image is marked bad.
    """


class GaiaQueryError(RuntimeError):
    """A query of the Gaia archive failed or timed out."""


def healpix_ring_index(ra: np.ndarray, dec: np.ndarray, *, nside: int = 32) -> np.ndarray:
    """HEALPix pixel index, RING scheme, of sky positions (Gorski et al. 2005).

    Parameters
    ----------
    ra, dec : numpy.ndarray
        Positions in degrees, any shape.
    nside : int
        HEALPix resolution parameter (any positive integer for the RING scheme).

    Returns
    -------
    numpy.ndarray
        int64 pixel indices in ``[0, 12 nside^2)``, same shape as ``ra``.
    """
    ra, dec = np.broadcast_arrays(np.asarray(ra, dtype=float), np.asarray(dec, dtype=float))
    z = np.sin(np.radians(dec)).ravel()
    tt = np.mod(np.radians(ra).ravel() / (np.pi / 2.0), 4.0)
    za = np.abs(z)
    ncap = 2 * nside * (nside - 1)
    npix = 12 * nside * nside
    out = np.empty(z.shape, dtype=np.int64)

    eq = za <= 2.0 / 3.0  # equatorial belt
    t1 = nside * (0.5 + tt[eq])
    t2 = nside * z[eq] * 0.75
    jp = np.floor(t1 - t2).astype(np.int64)  # index of ascending edge line
    jm = np.floor(t1 + t2).astype(np.int64)  # index of descending edge line
    ir = nside + 1 + jp - jm  # ring number counted from z = 2/3, in 1 .. 2 nside + 1
    kshift = 1 - (ir & 1)
    ip = np.mod((jp + jm - nside + kshift + 1) // 2, 4 * nside)
    out[eq] = ncap + (ir - 1) * 4 * nside + ip

    cap = ~eq  # polar caps
    tp = tt[cap] - np.floor(tt[cap])
    tmp = nside * np.sqrt(3.0 * (1.0 - za[cap]))
    jp = np.floor(tp * tmp).astype(np.int64)
    jm = np.floor((1.0 - tp) * tmp).astype(np.int64)
    ir = jp + jm + 1  # ring number counted from the closest pole
    ip = np.mod(np.floor(tt[cap] * ir).astype(np.int64), 4 * ir)
    out[cap] = np.where(z[cap] > 0, 2 * ir * (ir - 1) + ip, npix - 2 * ir * (ir + 1) + ip)
    return out.reshape(ra.shape)


def _check_box(ra_min: float, ra_max: float, dec_min: float, dec_max: float) -> None:
    for name, value in (("ra_min", ra_min), ("ra_max", ra_max), ("dec_min", dec_min), ("dec_max", dec_max)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    for name, value in (("ra_min", ra_min), ("ra_max", ra_max)):
        if not 0.0 <= value <= 360.0:
            raise ValueError(f"{name} must be in [0, 360] degrees, got {value}")
    if not -90.0 <= dec_min <= dec_max <= 90.0:
        raise ValueError(f"need -90 <= dec_min <= dec_max <= 90, got dec_min={dec_min}, dec_max={dec_max}")


def _in_box(ra: np.ndarray, dec: np.ndarray, ra_min: float, ra_max: float,
            dec_min: float, dec_max: float) -> np.ndarray:
    """True for positions inside the box; ``ra_min > ra_max`` means the box crosses RA = 0."""
    ra = np.mod(ra, 360.0)
    in_ra = (ra >= ra_min) & (ra <= ra_max) if ra_min <= ra_max else (ra >= ra_min) | (ra <= ra_max)
    return in_ra & (dec >= dec_min) & (dec <= dec_max)


def _box_pixels(ra_min: float, ra_max: float, dec_min: float, dec_max: float, nside: int) -> set[int]:
    """HEALPix RING pixels that may overlap the box.

    Samples the box, widened by a margin of 5 grid steps, on a grid of 0.1 degree (coarser for
    boxes of more than 10^4 square degrees, to keep ~10^6 samples), scaled by 32 / nside.  A
    pixel (~1.8 degree at nside 32) that reaches into the box holds a wedge at least 2.8 grid
    steps long inside the widened box, and so a sample.
    """
    width = ra_max - ra_min if ra_min <= ra_max else ra_max + 360.0 - ra_min
    step = max(0.1, math.sqrt(max(width, 1e-3) * (dec_max - dec_min + 1e-3) / 1e6)) * 32.0 / nside
    margin = 5.0 * step
    d0, d1 = max(dec_min - margin, -90.0), min(dec_max + margin, 90.0)
    cos_min = math.cos(math.radians(max(abs(d0), abs(d1))))
    ra_margin = margin / cos_min if cos_min > margin / 90.0 else 180.0
    if width + 2 * ra_margin >= 360.0:
        ras = np.arange(0.0, 360.0, step)
    else:  # an RA step of `step` degrees is at most `step` on the sky at any Dec
        ras = np.linspace(ra_min - ra_margin, ra_min + width + ra_margin,
                          int(math.ceil((width + 2 * ra_margin) / step)) + 1)
    decs = np.linspace(d0, d1, int(math.ceil((d1 - d0) / step)) + 1)
    grid_ra, grid_dec = np.meshgrid(np.mod(ras, 360.0), decs)
    return set(np.unique(healpix_ring_index(grid_ra, grid_dec, nside=nside)).tolist())


def _candidate_files(folder: Path, box: tuple[float, float, float, float], nside: int | None) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and ".fits" in p.name)
    chunks = {p: _CHUNK_NAME.match(p.name) for p in files}
    if nside is None or not files or not all(chunks.values()):
        return files
    wanted = _box_pixels(*box, nside)
    return [p for p in files if int(chunks[p].group(1)) in wanted]


def _read_table(path: Path) -> Table:
    """Read the first table HDU of a FITS file, raising CatalogError naming the file."""
    try:
        with fits.open(path, memmap=False) as hdul:
            hdu = next((h for h in hdul if isinstance(h, fits.BinTableHDU)), None)
            if hdu is None:
                raise CatalogError(f"no binary table HDU in Gaia catalog file {path}")
            table = Table(hdu.data)
    except CatalogError:
        raise
    except (OSError, ValueError, TypeError) as exc:
        raise CatalogError(f"cannot read Gaia catalog file {path} as FITS: {exc}") from exc
    table.rename_columns(table.colnames, [c.lower() for c in table.colnames])
    missing = [c for c in REQUIRED_COLUMNS if c not in table.colnames]
    if missing:
        raise CatalogError(f"Gaia catalog file {path} lacks required column(s) {missing}; "
                           f"found {table.colnames}")
    return table


def _standardize(table: Table) -> Table:
    """Keep `GAIA_COLUMNS` in order, as plain float64/int64 columns with units; NaN for missing."""
    n = len(table)
    out = Table()
    for name, unit in GAIA_COLUMNS.items():
        if name == "source_id":
            if name in table.colnames:
                values = np.ma.filled(np.ma.asarray(table[name]).astype(np.int64), -1)
            else:
                values = np.full(n, -1, dtype=np.int64)
        elif name in table.colnames:
            values = np.ma.filled(np.ma.asarray(table[name]).astype(np.float64), np.nan)
        else:
            values = np.full(n, np.nan)
        out[name] = np.asarray(values)
        if unit is not None:
            out[name].unit = unit
    return out


def gaia_folder_files(folder: str | Path, *, ra_min: float, ra_max: float, dec_min: float,
                      dec_max: float, nside: int | None = 32) -> list[Path]:
    """The files of a chunked Gaia folder that `read_gaia_folder` reads for a box (same arguments).

    Raises
    ------
    FileNotFoundError
        If ``folder`` is not a directory.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Gaia catalog folder {folder} does not exist or is not a directory")
    _check_box(ra_min, ra_max, dec_min, dec_max)
    return _candidate_files(folder, (float(ra_min), float(ra_max), float(dec_min), float(dec_max)), nside)


def read_gaia_folder(folder: str | Path, *, ra_min: float, ra_max: float, dec_min: float,
                     dec_max: float, nside: int | None = 32) -> Table:
    """Gaia stars inside an RA/Dec box, read from a folder of healpix-chunked FITS files.

    Parameters
    ----------
    folder : str or pathlib.Path
        Folder of FITS binary tables with Gaia columns, e.g. the Legacy Surveys'
        ``gaia/chunk-NNNNN.fits`` (NNNNN = HEALPix RING index at ``nside``).
    ra_min, ra_max : float
        RA limits in degrees, in [0, 360].  ``ra_min > ra_max`` means the box crosses RA = 0,
        i.e. ``ra >= ra_min or ra <= ra_max``.
    dec_min, dec_max : float
        Dec limits in degrees, ``dec_min <= dec_max``.  Limits are inclusive.
    nside : int or None
        HEALPix ``nside`` of the chunk names, used to open only the chunks that can overlap the
        box; None opens every FITS file in the folder (as is done anyway when the files are not
        all named ``chunk-NNNNN.fits``).

    Returns
    -------
    astropy.table.Table
        Columns `GAIA_COLUMNS` (ra, dec in deg; errors, parallax in mas; proper motions in
        mas/yr; ref_epoch in Julian years; magnitudes in mag); possibly zero rows.

    Raises
    ------
    FileNotFoundError
        If ``folder`` is not a directory.
    CatalogError
        If an opened file is not FITS or lacks ra, dec or phot_g_mean_mag; the message names it.
    ValueError
        If the box limits are not finite or out of range.
    """
    box = (float(ra_min), float(ra_max), float(dec_min), float(dec_max))
    pieces = []
    for path in gaia_folder_files(folder, ra_min=ra_min, ra_max=ra_max, dec_min=dec_min, dec_max=dec_max,
                                  nside=nside):
        table = _standardize(_read_table(path))
        keep = _in_box(np.asarray(table["ra"]), np.asarray(table["dec"]), *box)
        pieces.append(table[keep])
    if not pieces:
        return _standardize(Table())
    return vstack(pieces, metadata_conflicts="silent") if len(pieces) > 1 else pieces[0]


def gaia_adql(*, ra: float, dec: float, radius_deg: float, mag_limit: float = 21.0,
              table: str = "gaiadr3.gaia_source") -> str:
    """ADQL query for Gaia sources in a cone brighter than a G magnitude.

    Parameters
    ----------
    ra, dec : float
        Cone centre in degrees (ICRS).
    radius_deg : float
        Cone radius in degrees, in (0, 10].
    mag_limit : float
        Keep ``phot_g_mean_mag < mag_limit``.
    table : str
        Archive table name, ``schema.table`` of letters, digits and underscores.

    Returns
    -------
    str
        The ADQL text selecting the `GAIA_COLUMNS`.

    Raises
    ------
    ValueError
        If a number is not finite or out of range, or ``table`` is not a plain name.
    """
    for name, value in (("ra", ra), ("dec", dec), ("radius_deg", radius_deg), ("mag_limit", mag_limit)):
        if not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not 0.0 <= ra < 360.0 or not -90.0 <= dec <= 90.0:
        raise ValueError(f"need 0 <= ra < 360 and -90 <= dec <= 90 degrees, got ra={ra}, dec={dec}")
    if not 0.0 < radius_deg <= 10.0:
        raise ValueError(f"radius_deg must be in (0, 10], got {radius_deg}")
    if not re.fullmatch(r"[A-Za-z0-9_]+\.[A-Za-z0-9_]+", table):
        raise ValueError(f"table must look like 'schema.table', got {table!r}")
    columns = ", ".join(GAIA_COLUMNS)
    return (f"SELECT {columns} FROM {table} "
            f"WHERE 1 = CONTAINS(POINT('ICRS', ra, dec), "
            f"CIRCLE('ICRS', {float(ra)!r}, {float(dec)!r}, {float(radius_deg)!r})) "
            f"AND phot_g_mean_mag < {float(mag_limit)!r}")


def query_gaia_astroquery(*, ra: float, dec: float, radius_deg: float, mag_limit: float = 21.0,
                          timeout: float = 60.0) -> Table:
    """Gaia DR3 sources in a cone, from the Gaia archive through astroquery (needs the network).

    Parameters
    ----------
    ra, dec : float
        Cone centre in degrees (ICRS).
    radius_deg : float
        Cone radius in degrees.
    mag_limit : float
        Faint limit in G.
    timeout : float
        Seconds to wait, both for each network call and for the asynchronous job to finish;
        the job is aborted after that.

    Returns
    -------
    astropy.table.Table
        Columns `GAIA_COLUMNS` with units (ref_epoch is 2016.0 for DR3).

    Raises
    ------
    GaiaQueryError
        If the archive cannot be reached, the job fails, or it does not finish within ``timeout``.
    ValueError
        If the cone parameters are invalid (see `gaia_adql`).
    """
    adql = gaia_adql(ra=ra, dec=dec, radius_deg=radius_deg, mag_limit=mag_limit)
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        from astroquery.gaia import GaiaClass  # imported here: importing it contacts the archive

        gaia = GaiaClass(show_server_messages=False)
        job = gaia.launch_job_async(adql, background=True)
        deadline = time.monotonic() + timeout
        phase = job.get_phase(update=True).upper().strip()
        while phase in ("PENDING", "QUEUED", "EXECUTING"):
            if time.monotonic() > deadline:
                job.abort()
                raise GaiaQueryError(f"Gaia query did not finish within {timeout} s (phase {phase}): {adql}")
            time.sleep(0.5)
            phase = job.get_phase(update=True).upper().strip()
        if phase != "COMPLETED":
            raise GaiaQueryError(f"Gaia query ended in phase {phase}: {adql}")
        result = job.get_results()
    except GaiaQueryError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:  # network errors, HTTP errors, bad replies
        raise GaiaQueryError(f"Gaia query failed ({type(exc).__name__}: {exc}): {adql}") from exc
    finally:
        socket.setdefaulttimeout(old_timeout)
    result.rename_columns(result.colnames, [c.lower() for c in result.colnames])
    return _standardize(result)


def write_gaia_folder(table: Table, folder: str | Path, *, nside: int = 32) -> list[Path]:
    """Write a Gaia-like table as healpix chunks that `read_gaia_folder` reads.

    Used to turn the simulator's reference catalog into a local catalog folder, so that the
    demo and the tests run the same reader the pipeline uses on real Gaia files.

    Parameters
    ----------
    table : astropy.table.Table
        Rows with at least ``ra``, ``dec`` and ``phot_g_mean_mag``.
    folder : str or pathlib.Path
        Destination; created if missing.  Existing chunks with the same names are replaced.
    nside : int
        HEALPix nside of the chunk names.

    Returns
    -------
    list of pathlib.Path
        The files written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.colnames]
    if missing:
        raise CatalogError(f"table to write to {folder} lacks required column(s) {missing}")
    standard = _standardize(table)
    pixels = healpix_ring_index(np.asarray(standard["ra"]), np.asarray(standard["dec"]), nside=nside)
    written = []
    for pixel in np.unique(pixels):
        path = folder / f"chunk-{int(pixel):05d}.fits"
        standard[pixels == pixel].write(path, format="fits", overwrite=True)
        written.append(path)
    return written
