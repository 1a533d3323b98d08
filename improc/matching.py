"""Cross-matching of positions: on the sky, in the pixel plane, and within one catalog.

Every match in SeeChange goes through this module, with one convention:

* `match_sky` and `match_pixels` give, for each point of the first set, its nearest point of the
  second set when that is closer than the radius (strictly).  They return ``(i1, i2, sep)``:
  indices into set 1 (increasing, each at most once), the indices of their matches in set 2
  (several points of set 1 may share one point of set 2; the match is not one-to-one, as
  astropy's ``SkyCoord.match_to_catalog_sky``), and the separations (arcsec, or pixels).
  Points with a non-finite coordinate never match.  Empty inputs give empty integer arrays.
* `neighbor_free` flags the stars of one catalog that have no comparably bright neighbour.

On the sky, positions are unit vectors in a k-d tree, so that the RA wrap and the poles need no
special case; the nearest point by chord is the nearest by angle.  `match_sky` gives the pairs that
``SkyCoord.match_to_catalog_sky`` followed by ``sep.arcsec < radius_arcsec`` gives (its separations
are computed with the same Vincenty formula), except between two candidates at equal distances to
within rounding.
"""

from __future__ import annotations

import numpy as np
import astropy.units as u
from astropy.coordinates import Angle, Latitude, Longitude, angular_separation
from scipy.spatial import cKDTree

__all__ = ["match_sky", "match_pixels", "neighbor_free", "unit_vectors"]

_ARCSEC_PER_RAD = 180.0 / np.pi * 3600.0
#: Relative margin of the k-d tree search radius over the chord of the match radius; the exact
#: separation then decides, so that rounding in the chord never loses a pair.
_SEARCH_MARGIN = 1e-6


def unit_vectors(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Cartesian unit vectors of sky positions.

    Parameters
    ----------
    ra, dec : numpy.ndarray
        Shape (n,) positions in degrees.

    Returns
    -------
    numpy.ndarray
        Shape (n, 3).
    """
    r, d = np.radians(np.asarray(ra, dtype=float)), np.radians(np.asarray(dec, dtype=float))
    return np.column_stack([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)])


def _positive_radius(value: float, name: str) -> float:
    value = float(value)
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def _pair(a, b, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.atleast_1d(np.asarray(a, dtype=float)), np.atleast_1d(np.asarray(b, dtype=float))
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must be 1-d arrays of one length, "
                         f"got shapes {a.shape} and {b.shape}")
    return a, b


def _check_dec(dec: np.ndarray, name: str) -> None:
    bad = np.isfinite(dec) & (np.abs(dec) > 90.0)
    if bad.any():
        raise ValueError(f"{name} must be within [-90, 90] degrees, got {dec[bad][0]}")


def _empty() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.zeros(0, dtype=int), np.zeros(0, dtype=int), np.zeros(0)


def _nearest(points1: np.ndarray, points2: np.ndarray, bound: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices (i1, i2) of the finite points of set 1 whose nearest finite point of set 2 is within bound."""
    good1 = np.flatnonzero(np.all(np.isfinite(points1), axis=1))
    good2 = np.flatnonzero(np.all(np.isfinite(points2), axis=1))
    if len(good1) == 0 or len(good2) == 0:
        return np.zeros(0, dtype=int), np.zeros(0, dtype=int)
    dist, j = cKDTree(points2[good2]).query(points1[good1], distance_upper_bound=bound)
    found = np.isfinite(dist)
    return good1[found], good2[j[found]]


def match_sky(ra1: np.ndarray, dec1: np.ndarray, ra2: np.ndarray, dec2: np.ndarray, *,
              radius_arcsec: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each position of set 1, its nearest position of set 2 closer than a radius.

    Parameters
    ----------
    ra1, dec1 : numpy.ndarray
        Shape (n,) positions of set 1, degrees.
    ra2, dec2 : numpy.ndarray
        Shape (m,) positions of set 2, degrees.
    radius_arcsec : float
        Pairs closer than this (strictly) match, arcsec.

    Returns
    -------
    i1, i2 : numpy.ndarray
        Shape (k,) int indices into set 1 (increasing) and set 2 of the matched pairs.
    separation_arcsec : numpy.ndarray
        Shape (k,) their separations, arcsec (Vincenty formula, as astropy).

    Raises
    ------
    ValueError
        If ``radius_arcsec`` is not finite and > 0, the arrays of a set differ in shape, or a
        declination is outside [-90, 90].
    """
    radius = _positive_radius(radius_arcsec, "radius_arcsec")
    ra1, dec1 = _pair(ra1, dec1, ("ra1", "dec1"))
    ra2, dec2 = _pair(ra2, dec2, ("ra2", "dec2"))
    _check_dec(dec1, "dec1")
    _check_dec(dec2, "dec2")
    if len(ra1) == 0 or len(ra2) == 0:
        return _empty()
    chord = 2.0 * np.sin(min(radius / _ARCSEC_PER_RAD, np.pi) / 2.0)
    i1, i2 = _nearest(unit_vectors(ra1, dec1), unit_vectors(ra2, dec2), chord * (1.0 + _SEARCH_MARGIN))
    if len(i1) == 0:
        return _empty()
    # set 2 first, as astropy's catalogcoord[idx].separation(matchcoord)
    sep = Angle(angular_separation(Longitude(ra2[i2] * u.deg), Latitude(dec2[i2] * u.deg),
                                   Longitude(ra1[i1] * u.deg), Latitude(dec1[i1] * u.deg)),
                unit=u.degree).arcsec
    ok = sep < radius
    return i1[ok], i2[ok], np.asarray(sep[ok], dtype=float)


def match_pixels(x1: np.ndarray, y1: np.ndarray, x2: np.ndarray, y2: np.ndarray, *,
                 radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each point of set 1, its nearest point of set 2 closer than a radius, in a plane.

    Parameters
    ----------
    x1, y1 : numpy.ndarray
        Shape (n,) coordinates of set 1 (pixels, or any unit shared by all arguments).
    x2, y2 : numpy.ndarray
        Shape (m,) coordinates of set 2.
    radius : float
        Pairs closer than this (strictly) match.

    Returns
    -------
    i1, i2 : numpy.ndarray
        Shape (k,) int indices into set 1 (increasing) and set 2 of the matched pairs.
    separation : numpy.ndarray
        Shape (k,) their distances.

    Raises
    ------
    ValueError
        If ``radius`` is not finite and > 0, or the arrays of a set differ in shape.
    """
    radius = _positive_radius(radius, "radius")
    x1, y1 = _pair(x1, y1, ("x1", "y1"))
    x2, y2 = _pair(x2, y2, ("x2", "y2"))
    if len(x1) == 0 or len(x2) == 0:
        return _empty()
    i1, i2 = _nearest(np.column_stack([x1, y1]), np.column_stack([x2, y2]), radius * (1.0 + _SEARCH_MARGIN))
    sep = np.hypot(x1[i1] - x2[i2], y1[i1] - y2[i2])
    ok = sep < radius
    return i1[ok], i2[ok], sep[ok]


def neighbor_free(ra: np.ndarray, dec: np.ndarray, mag: np.ndarray, *, radius_arcsec: float,
                  dmag: float) -> np.ndarray:
    """Which stars of a catalog have no comparably bright neighbour.

    Stars that seeing blends with a neighbour are no calibrators: a catalog resolves pairs that
    a ground-based image shows as one source, whose centroid and flux include the neighbour.

    Parameters
    ----------
    ra, dec : numpy.ndarray
        Shape (n,) positions of the catalog's stars, degrees.
    mag : numpy.ndarray
        Shape (n,) their magnitudes (e.g. Gaia G); NaN for none.
    radius_arcsec : float
        Neighbours closer than this (chord on the unit sphere, to within rounding the angle)
        count, arcsec.
    dmag : float
        A neighbour counts unless it is at least this many magnitudes fainter; one without a
        magnitude always counts, and a star without one has every neighbour count.

    Returns
    -------
    numpy.ndarray
        Shape (n,) bool, False for stars with a neighbour that counts.

    Raises
    ------
    ValueError
        If ``radius_arcsec`` is not > 0 or ``dmag`` is negative, or the arrays differ in shape.
    """
    if not radius_arcsec > 0 or not dmag >= 0:
        raise ValueError(f"neighbour radius_arcsec must be > 0 and dmag >= 0, got {radius_arcsec} and {dmag}")
    ra, dec = _pair(ra, dec, ("ra", "dec"))
    g = np.atleast_1d(np.asarray(mag, dtype=float))
    if g.shape != ra.shape:
        raise ValueError(f"mag must have the shape of ra, {ra.shape}, got {g.shape}")
    free = np.ones(len(g), bool)
    if len(g) < 2:
        return free
    chord = 2.0 * np.sin(np.radians(radius_arcsec / 3600.0) / 2.0)
    pairs = cKDTree(unit_vectors(ra, dec)).query_pairs(chord, output_type="ndarray")
    i, j = pairs[:, 0], pairs[:, 1]
    free[i[~(g[j] >= g[i] + dmag)]] = False  # "not >=" so that a NaN magnitude counts
    free[j[~(g[i] >= g[j] + dmag)]] = False
    return free
