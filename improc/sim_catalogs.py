"""Star catalogs of simulated images: the astrophysical scene and its Gaia-like reference catalog.

A *scene catalog* lists the stars of a patch of sky at the catalog epoch with the columns

==========  =====  =================================================
column      unit   meaning
==========  =====  =================================================
source_id          int64, unique
ra, dec     deg    position at the catalog epoch
pmra        mas/yr proper motion in RA, times cos(dec) (as Gaia)
pmdec       mas/yr proper motion in Dec
parallax    mas    (not applied to positions)
G, BP, RP   mag    Gaia mean magnitudes
==========  =====  =================================================

Positions at another epoch are the linear propagation of `propagate_positions`; parallax is
listed but does not move the stars, so propagation with proper motions alone is exact.

The reference catalog of `make_gaia_catalog` holds the same stars (optionally minus a random
fraction) with the Gaia archive's column names and units.  Its values are exact (no noise is
added); its ``*_error`` and ``phot_g_mean_flux_over_error`` columns are realistic for Gaia DR3.
"""

from __future__ import annotations

import numpy as np
import astropy.units as u
from astropy.table import Table

from improc.color_transforms import BandTransform, gaia_to_band
from improc.sim_wcs import tangent_offsets_to_radec

__all__ = [
    "SCENE_COLUMNS", "scatter_objects", "draw_stars", "check_scene_catalog", "propagate_positions",
    "band_magnitudes", "make_gaia_catalog",
]

#: Columns a scene catalog must have.
SCENE_COLUMNS: tuple[str, ...] = ("ra", "dec", "pmra", "pmdec", "G", "BP", "RP")

#: Slope of the cumulative star counts, d log10 N / dm.
_COUNT_SLOPE = 0.3
#: First Gaia-like source_id handed out.
_FIRST_SOURCE_ID = 3_838_000_000_000_000_000
#: Mean and spread of the stars' tangential velocities (east, north), km/s.
_V_MEAN = (-15.0, -25.0)
_V_SIGMA = 45.0


def scatter_objects(*, ra: float, dec: float, half_width_arcsec: float, half_height_arcsec: float,
                    n: int, mag_range: tuple[float, float],
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RA, Dec (degrees) and magnitudes of ``n`` objects uniform over a tangent-plane rectangle.

    Magnitudes follow number counts rising as ``10**(0.3 m)`` between ``mag_range`` (bright,
    faint).  Shared by the star and galaxy catalogs.
    """
    xi = rng.uniform(-half_width_arcsec, half_width_arcsec, n)
    eta = rng.uniform(-half_height_arcsec, half_height_arcsec, n)
    ra_o, dec_o = tangent_offsets_to_radec(ra, dec, xi, eta)
    lo, hi = 10.0 ** (_COUNT_SLOPE * np.asarray(mag_range, dtype=float))
    mag = np.log10(lo + rng.random(n) * (hi - lo)) / _COUNT_SLOPE
    return ra_o, dec_o, mag


def draw_stars(*, ra: float, dec: float, half_width_arcsec: float, half_height_arcsec: float,
               n: int, mag_range: tuple[float, float], rng: np.random.Generator) -> Table:
    """Draw a scene catalog of ``n`` stars spread uniformly over a tangent-plane rectangle.

    Parameters
    ----------
    ra, dec : float
        Centre of the rectangle, degrees.
    half_width_arcsec, half_height_arcsec : float
        Half sizes of the rectangle towards the east and the north, arcsec.
    n : int
        Number of stars.
    mag_range : tuple of float
        (bright, faint) limits of G; counts rise as ``10**(0.3 G)``.
    rng : numpy.random.Generator
        Source of the random draws.

    Returns
    -------
    astropy.table.Table
        A scene catalog (see the module docstring).
    """
    ra_s, dec_s, g = scatter_objects(ra=ra, dec=dec, half_width_arcsec=half_width_arcsec,
                                     half_height_arcsec=half_height_arcsec, n=n,
                                     mag_range=mag_range, rng=rng)
    color = _draw_colors(g, mag_range, rng)
    g_minus_rp = 0.08 + 0.52 * color - 0.04 * color**2
    rp = g - g_minus_rp
    bp = rp + color
    parallax = 1.5 * 10.0 ** (-0.2 * (g - 15.0)) * np.exp(0.5 * rng.standard_normal(n))
    pmra = parallax * rng.normal(_V_MEAN[0], _V_SIGMA, n) / 4.74
    pmdec = parallax * rng.normal(_V_MEAN[1], _V_SIGMA, n) / 4.74
    return Table({
        "source_id": _FIRST_SOURCE_ID + np.arange(n, dtype=np.int64),
        "ra": ra_s, "dec": dec_s, "pmra": pmra, "pmdec": pmdec, "parallax": parallax,
        "G": g, "BP": bp, "RP": rp,
    })


def _draw_colors(g: np.ndarray, mag_range: tuple[float, float],
                 rng: np.random.Generator) -> np.ndarray:
    """BP - RP in [0.5, 3]: a blue (turn-off) and a red (M dwarf) population, redder when fainter."""
    span = max(mag_range[1] - mag_range[0], 1e-9)
    red_fraction = 0.2 + 0.4 * np.clip((g - mag_range[0]) / span, 0.0, 1.0)
    red = rng.random(g.size) < red_fraction
    color = np.where(red, rng.normal(2.2, 0.5, g.size), rng.normal(0.9, 0.2, g.size))
    return np.clip(color, 0.5, 3.0)


def check_scene_catalog(stars: Table) -> Table:
    """Validate a user-given scene catalog; a copy with ``source_id`` and ``parallax`` filled in.

    Parameters
    ----------
    stars : astropy.table.Table
        Must have the columns of `SCENE_COLUMNS`.

    Returns
    -------
    astropy.table.Table
        A copy, with ``source_id`` (sequential) and ``parallax`` (0) added if missing.

    Raises
    ------
    ValueError
        If columns are missing or values are not finite.
    """
    missing = [name for name in SCENE_COLUMNS if name not in stars.colnames]
    if missing:
        raise ValueError(f"star catalog must have columns {list(SCENE_COLUMNS)}, "
                         f"missing {missing}")
    out = Table(stars, copy=True)
    for name in SCENE_COLUMNS:
        if not np.all(np.isfinite(np.asarray(out[name], dtype=float))):
            raise ValueError(f"star catalog column {name!r} must be finite, found NaN or inf")
    if "source_id" not in out.colnames:
        out["source_id"] = _FIRST_SOURCE_ID + np.arange(len(out), dtype=np.int64)
    if "parallax" not in out.colnames:
        out["parallax"] = np.zeros(len(out))
    return out


def propagate_positions(ra: np.ndarray, dec: np.ndarray, pmra: np.ndarray, pmdec: np.ndarray,
                        dt_years: float) -> tuple[np.ndarray, np.ndarray]:
    """Move positions by their proper motions over ``dt_years`` (linear, in RA and Dec).

    Parameters
    ----------
    ra, dec : numpy.ndarray
        Degrees.
    pmra, pmdec : numpy.ndarray
        mas/yr; ``pmra`` includes the cos(dec) factor, as in Gaia.
    dt_years : float
        Target epoch minus catalog epoch, Julian years.

    Returns
    -------
    ra, dec : numpy.ndarray
        Degrees at the target epoch.
    """
    dec = np.asarray(dec, dtype=float)
    new_dec = dec + np.asarray(pmdec, dtype=float) * dt_years / 3.6e6
    new_ra = np.asarray(ra, dtype=float) + (np.asarray(pmra, dtype=float) * dt_years / 3.6e6
                                            / np.cos(np.deg2rad(dec)))
    return new_ra % 360.0, new_dec


def band_magnitudes(g: np.ndarray, bp: np.ndarray, rp: np.ndarray, transform: BandTransform | None, *,
                    color_term: float) -> np.ndarray:
    """True magnitudes in the image band: ``transform(G, BP, RP) + color_term (BP - RP - 1)``.

    Parameters
    ----------
    g, bp, rp : numpy.ndarray
        Gaia magnitudes.
    transform : BandTransform or None
        The simulated camera's Gaia-to-band transformation (`improc.color_transforms`); None:
        ``m = G`` (a band no transformation describes).
    color_term : float
        Extra linear color term of the instrument, mag per mag of BP - RP.

    Returns
    -------
    numpy.ndarray
        Magnitudes in the band.
    """
    bp, rp = np.asarray(bp, dtype=float), np.asarray(rp, dtype=float)
    base = np.asarray(g, dtype=float) if transform is None else gaia_to_band(g, bp, rp, transform)
    return base + color_term * (bp - rp - 1.0)


def make_gaia_catalog(stars: Table, *, epoch: float, missing_fraction: float,
                      rng: np.random.Generator) -> tuple[Table, np.ndarray]:
    """A Gaia-archive-like reference catalog of a scene catalog.

    Parameters
    ----------
    stars : astropy.table.Table
        Scene catalog (positions at ``epoch``).
    epoch : float
        Its epoch, Julian years (becomes ``ref_epoch``).
    missing_fraction : float
        Fraction of stars left out at random.
    rng : numpy.random.Generator
        Chooses the missing stars.

    Returns
    -------
    gaia : astropy.table.Table
        Columns ``source_id, ra, dec, ra_error, dec_error, pmra, pmra_error, pmdec,
        pmdec_error, parallax, parallax_error, ref_epoch, phot_g_mean_mag, phot_bp_mean_mag,
        phot_rp_mean_mag, phot_g_mean_flux_over_error``, with units.
    kept : numpy.ndarray
        Shape (len(stars),) bool: which scene stars are in ``gaia``.
    """
    kept = rng.random(len(stars)) >= missing_fraction
    s = stars[kept]
    g = np.asarray(s["G"], dtype=float)
    pos_err = 0.02 + 0.4 * 10.0 ** (0.4 * (g - 20.0))
    sigma_g = np.sqrt(3e-4**2 + 0.01**2 * 10.0 ** (0.4 * (g - 20.0))
                      + 0.017**2 * 10.0 ** (0.8 * (g - 20.0)))
    gaia = Table()
    gaia["source_id"] = np.asarray(s["source_id"], dtype=np.int64)
    columns = [
        ("ra", s["ra"], u.deg), ("dec", s["dec"], u.deg),
        ("ra_error", pos_err, u.mas), ("dec_error", 0.9 * pos_err, u.mas),
        ("pmra", s["pmra"], u.mas / u.yr), ("pmra_error", 1.2 * pos_err, u.mas / u.yr),
        ("pmdec", s["pmdec"], u.mas / u.yr), ("pmdec_error", 1.1 * pos_err, u.mas / u.yr),
        ("parallax", s["parallax"], u.mas), ("parallax_error", 1.3 * pos_err, u.mas),
        ("ref_epoch", np.full(len(s), float(epoch)), u.yr),
        ("phot_g_mean_mag", g, u.mag), ("phot_bp_mean_mag", s["BP"], u.mag),
        ("phot_rp_mean_mag", s["RP"], u.mag),
        ("phot_g_mean_flux_over_error", 2.5 / np.log(10.0) / sigma_g, None),
    ]
    for name, values, unit in columns:
        gaia[name] = np.asarray(values, dtype=float)
        if unit is not None:
            gaia[name].unit = unit
    return gaia, kept
