"""Galaxies of simulated images: their catalog, their rendering, and transients placed in them.

A galaxy is a Sersic profile ``I(r) ~ exp(-b_n (r / r_eff)**(1/n))`` (n = 1 exponential disc,
n = 4 de Vaucouleurs) on the sky, with ``r`` the elliptical radius along the major axis (axis
ratio ``q = b/a``, major axis at position angle ``pa_deg`` east of north).  It is tapered to
zero between 4 and 5 ``r_eff``, integrated over pixels by 5 x 5 sub-sampling (40 x 40 within 2 pixels of the centre) through the local
WCS Jacobian (so distortion and the sky orientation are honoured), normalized to a sum of 1,
and convolved exactly (FFT, full support) with the true PSF at its centre: the galaxy's pixels
sum to its flux.

Galaxy catalog columns: ``galaxy_id, ra, dec`` (deg), ``mag`` (in the image band),
``sersic_n``, ``r_eff_arcsec`` (semi-major half-light radius of the untapered profile),
``axis_ratio``, ``pa_deg``.
"""

from __future__ import annotations

import numpy as np
from astropy.table import Table
from scipy.signal import fftconvolve

from improc.sim_catalogs import scatter_objects
from improc.sim_psf import PsfField
from improc.sim_wcs import tangent_offsets_to_radec

__all__ = ["GALAXY_COLUMNS", "draw_galaxies", "check_galaxy_catalog", "render_galaxies",
           "place_transients_in_hosts"]

#: Columns a galaxy catalog must have.
GALAXY_COLUMNS: tuple[str, ...] = ("ra", "dec", "mag", "sersic_n", "r_eff_arcsec",
                                   "axis_ratio", "pa_deg")

#: Taper of the profile: starts and ends at these multiples of r_eff.
_TAPER = (4.0, 5.0)
#: Sub-pixel samples per axis.
_OVERSAMPLE = 5
#: Sub-pixel samples per axis of the pixels within `_CORE_RADIUS` of the centre, where a cuspy
#: profile (a de Vaucouleurs' r**(1/4)) changes too fast for `_OVERSAMPLE`: with 5 x 5 samples a
#: galaxy centred on a pixel put a sample on the cusp and 19% of its flux too much in the central
#: 3 x 3 pixels, another at a different sub-pixel phase 1% too little, so two epochs of one
#: galaxy differed by a point source of a fifth of its flux.  An even count never samples r = 0.
_CORE_OVERSAMPLE = 40
#: Half-side, pixels, of the square of central pixels sampled at `_CORE_OVERSAMPLE`.
_CORE_RADIUS = 2
#: Fraction of galaxies that are exponential discs (the others are de Vaucouleurs).
_DISC_FRACTION = 0.7


def draw_galaxies(*, ra: float, dec: float, half_width_arcsec: float, half_height_arcsec: float,
                  n: int, mag_range: tuple[float, float], rng: np.random.Generator) -> Table:
    """Draw ``n`` galaxies uniformly over a tangent-plane rectangle.

    Parameters
    ----------
    ra, dec : float
        Centre of the rectangle, degrees.
    half_width_arcsec, half_height_arcsec : float
        Half sizes towards the east and the north, arcsec.
    n : int
        Number of galaxies.
    mag_range : tuple of float
        (bright, faint) limits of the magnitude in the image band; counts rise as ``10**(0.3 m)``.
    rng : numpy.random.Generator
        Source of the draws.

    Returns
    -------
    astropy.table.Table
        A galaxy catalog (see the module docstring).
    """
    ra_g, dec_g, mag = scatter_objects(ra=ra, dec=dec, half_width_arcsec=half_width_arcsec,
                                       half_height_arcsec=half_height_arcsec, n=n,
                                       mag_range=mag_range, rng=rng)
    r_eff = 0.8 * 10.0 ** (-0.15 * (mag - 20.0)) * np.exp(0.35 * rng.standard_normal(n))
    return Table({
        "galaxy_id": np.arange(n, dtype=np.int64),
        "ra": ra_g, "dec": dec_g, "mag": mag,
        "sersic_n": np.where(rng.random(n) < _DISC_FRACTION, 1.0, 4.0),
        "r_eff_arcsec": np.clip(r_eff, 0.3, 4.0),
        "axis_ratio": rng.uniform(0.3, 1.0, n),
        "pa_deg": rng.uniform(0.0, 180.0, n),
    })


def check_galaxy_catalog(galaxies: Table) -> Table:
    """Validate a user-given galaxy catalog; a copy with ``galaxy_id`` added if missing.

    Parameters
    ----------
    galaxies : astropy.table.Table
        Must have the columns of `GALAXY_COLUMNS`.

    Returns
    -------
    astropy.table.Table
        A copy.

    Raises
    ------
    ValueError
        If columns are missing, or sizes, axis ratios or Sersic indices are out of range.
    """
    missing = [name for name in GALAXY_COLUMNS if name not in galaxies.colnames]
    if missing:
        raise ValueError(f"galaxy catalog must have columns {list(GALAXY_COLUMNS)}, "
                         f"missing {missing}")
    out = Table(galaxies, copy=True)
    checks = [("r_eff_arcsec", 0.0, np.inf), ("axis_ratio", 0.0, 1.0), ("sersic_n", 0.2, 8.0)]
    for name, lo, hi in checks:
        values = np.asarray(out[name], dtype=float)
        if not np.all((values > lo) & (values <= hi)):
            raise ValueError(f"galaxy catalog column {name!r} must lie in ({lo}, {hi}], "
                             f"found {values.min()} to {values.max()}")
    if "galaxy_id" not in out.colnames:
        out["galaxy_id"] = np.arange(len(out), dtype=np.int64)
    return out


def render_galaxies(x: np.ndarray, y: np.ndarray, flux: np.ndarray, galaxies: Table,
                    jacobians: np.ndarray, psf: PsfField, shape: tuple[int, int]) -> np.ndarray:
    """Image of PSF-convolved Sersic galaxies.

    Parameters
    ----------
    x, y : numpy.ndarray
        Shape (n,): 0-based centres of the galaxies.
    flux : numpy.ndarray
        Shape (n,): total counts, ADU.
    galaxies : astropy.table.Table
        Galaxy catalog (for the shapes), n rows.
    jacobians : numpy.ndarray
        Shape (n, 2, 2): pixel offsets to tangent-plane offsets (arcsec) at each centre.
    psf : PsfField
        The true PSF.
    shape : tuple of int
        ``(ny, nx)``.

    Returns
    -------
    numpy.ndarray
        Shape (ny, nx), float64, ADU.
    """
    image = np.zeros(shape)
    for i in range(len(galaxies)):
        row = galaxies[i]
        cx, cy = int(np.rint(x[i])), int(np.rint(y[i]))
        profile = _sersic_stamp(x[i] - cx, y[i] - cy, jacobians[i], n=float(row["sersic_n"]),
                                r_eff=float(row["r_eff_arcsec"]), q=float(row["axis_ratio"]),
                                pa_deg=float(row["pa_deg"]))
        convolved = np.clip(fftconvolve(profile, psf.stamp(x[i], y[i]), mode="full"), 0.0, None)
        _add_stamp(image, convolved * (flux[i] / convolved.sum()), cx, cy)
    return image


def _sersic_stamp(phase_x: float, phase_y: float, jac: np.ndarray, *, n: float, r_eff: float,
                  q: float, pa_deg: float) -> np.ndarray:
    """Pixel-integrated, tapered Sersic profile on an odd square stamp, normalized to sum 1."""
    scale = np.linalg.svd(jac, compute_uv=False).min()   # arcsec per pixel, smallest
    half = int(np.ceil(_TAPER[1] * r_eff / scale)) + 1
    grid = np.arange(-half, half + 1, dtype=float)
    shape = dict(jac=jac, n=n, r_eff=r_eff, q=q, pa=np.deg2rad(pa_deg))
    total = _sampled(grid - phase_x, grid - phase_y, _OVERSAMPLE, **shape)
    core = np.arange(-min(_CORE_RADIUS, half), min(_CORE_RADIUS, half) + 1, dtype=float)
    c0 = half - (core.size // 2)
    total[c0:c0 + core.size, c0:c0 + core.size] = _sampled(core - phase_x, core - phase_y,
                                                           _CORE_OVERSAMPLE, **shape)
    return total / total.sum()


def _sampled(dx0: np.ndarray, dy0: np.ndarray, oversample: int, *, jac: np.ndarray, n: float,
             r_eff: float, q: float, pa: float) -> np.ndarray:
    """Mean of the tapered Sersic profile over ``oversample**2`` points of each pixel, for the
    pixels at offsets ``dx0`` (columns) and ``dy0`` (rows) from the centre, pixels."""
    b_n = 2.0 * n - 1.0 / 3.0 + 4.0 / (405.0 * n) + 46.0 / (25515.0 * n * n)
    offsets = (np.arange(oversample) + 0.5) / oversample - 0.5
    total = np.zeros((dy0.size, dx0.size))
    for oy in offsets:
        dy = (dy0 + oy)[:, None]
        for ox in offsets:
            dx = (dx0 + ox)[None, :]
            xi = jac[0, 0] * dx + jac[0, 1] * dy
            eta = jac[1, 0] * dx + jac[1, 1] * dy
            major = xi * np.sin(pa) + eta * np.cos(pa)
            minor = xi * np.cos(pa) - eta * np.sin(pa)
            r = np.sqrt(major**2 + (minor / q) ** 2) / r_eff
            w = np.clip((_TAPER[1] - r) / (_TAPER[1] - _TAPER[0]), 0.0, 1.0)
            total += np.exp(-b_n * r ** (1.0 / n)) * w * w * (3.0 - 2.0 * w)
    return total / oversample**2


def _add_stamp(image: np.ndarray, stamp: np.ndarray, cx: int, cy: int) -> None:
    """Add an odd square ``stamp`` centred on pixel ``(cx, cy)`` into ``image``, clipped at the edges."""
    ny, nx = image.shape
    h = stamp.shape[0] // 2
    x0, x1 = max(cx - h, 0), min(cx + h + 1, nx)
    y0, y1 = max(cy - h, 0), min(cy + h + 1, ny)
    if x0 >= x1 or y0 >= y1:
        return
    image[y0:y1, x0:x1] += stamp[y0 - (cy - h):y1 - (cy - h), x0 - (cx - h):x1 - (cx - h)]


def place_transients_in_hosts(galaxies: Table, mags: np.ndarray,
                              rng: np.random.Generator) -> Table:
    """Transients in random host galaxies, offset from their centres as an exponential disc's light.

    Parameters
    ----------
    galaxies : astropy.table.Table
        Galaxy catalog (e.g. ``SimulatedImage.galaxies``).
    mags : numpy.ndarray
        Shape (n,): magnitudes of the transients in the image band.
    rng : numpy.random.Generator
        Chooses hosts (without repetition while there are enough) and offsets.

    Returns
    -------
    astropy.table.Table
        Columns ``ra, dec, mag, host_id`` (the host's ``galaxy_id``), ready for the
        ``transients`` argument of `improc.simulator.simulate_image`.

    Raises
    ------
    ValueError
        If there are no galaxies to host transients.
    """
    mags = np.atleast_1d(np.asarray(mags, dtype=float))
    if len(galaxies) == 0:
        raise ValueError(f"place_transients_in_hosts needs galaxies, got 0 for {mags.size} "
                         "transients")
    hosts = galaxies[rng.choice(len(galaxies), size=mags.size, replace=mags.size > len(galaxies))]
    radius = rng.gamma(2.0, np.asarray(hosts["r_eff_arcsec"], dtype=float) / 1.678)
    angle = rng.uniform(0.0, 2.0 * np.pi, mags.size)
    major = radius * np.cos(angle)
    minor = radius * np.asarray(hosts["axis_ratio"], dtype=float) * np.sin(angle)
    pa = np.deg2rad(np.asarray(hosts["pa_deg"], dtype=float))
    xi = major * np.sin(pa) + minor * np.cos(pa)
    eta = major * np.cos(pa) - minor * np.sin(pa)
    ra, dec = tangent_offsets_to_radec(np.asarray(hosts["ra"], dtype=float),
                                       np.asarray(hosts["dec"], dtype=float), xi, eta)
    return Table({"ra": ra, "dec": dec, "mag": mags,
                  "host_id": np.asarray(hosts["galaxy_id"], dtype=np.int64)})
